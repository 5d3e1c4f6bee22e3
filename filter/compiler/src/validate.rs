//! Istio's validation rules (pkg/config/validation) for the kinds meshroute reads.
//! Every error is collected; messages use Istio's words where Istio has words.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;

use crate::api::{self, StringMatch};
use crate::diag::{Diagnostic, Severity};
use crate::duration;
use crate::hosts;
use crate::load::{Config, Resource};
use crate::source::FieldPath;

/// Longest regex Istio accepts.
pub const MAX_REGEX_LEN: usize = 1024;
/// Largest direct-response body (Envoy's default limit as used by Istio).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

pub const GRPC_CODES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

const GATEWAY_PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL",
];
const SERVICE_PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTPS",
    "GRPC",
    "GRPC-WEB",
    "HTTP2",
    "MONGO",
    "TCP",
    "TLS",
    "REDIS",
    "MYSQL",
    "UDP",
    "UNSUPPORTED",
];

/// Validates every resource; returns errors and warnings.
pub fn validate(config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in &config.virtual_services {
        virtual_service(r, &mut out);
    }
    for r in &config.destination_rules {
        destination_rule(r, &mut out);
    }
    for r in &config.gateways {
        gateway(r, &mut out);
    }
    for r in &config.service_entries {
        service_entry(r, &mut out);
    }
    for r in &config.sidecars {
        sidecar(r, &mut out);
    }
    for r in &config.workload_entries {
        let mut v = V::new(r, &mut out);
        workload_entry(&mut v, &r.spec, &FieldPath::root().key("spec"), None, true);
    }
    for r in &config.services {
        let mut v = V::new(r, &mut out);
        for (i, p) in r.spec.ports.iter().enumerate() {
            v.port_number(
                &FieldPath::root()
                    .key("spec")
                    .key("ports")
                    .idx(i)
                    .key("port"),
                p.port,
                true,
            );
        }
    }
    duplicates(config, &mut out);
    sidecar_conflicts(config, &mut out);
    out
}

/// Two objects of one kind with the same namespace and name.
fn duplicates(config: &Config, out: &mut Vec<Diagnostic>) {
    fn check<T>(list: &[Resource<T>], out: &mut Vec<Diagnostic>) {
        let mut seen: BTreeMap<(&str, &str), &Resource<T>> = BTreeMap::new();
        for r in list {
            if let Some(first) = seen.get(&(r.namespace.as_str(), r.name.as_str())) {
                out.push(r.diag(
                    Severity::Error,
                    &FieldPath::root().key("metadata").key("name"),
                    format!(
                        "duplicate {} {}/{}: already defined at {}:{}",
                        r.kind,
                        r.namespace,
                        r.name,
                        first.origin.file,
                        first.origin.object_pos().line
                    ),
                ));
            } else {
                seen.insert((&r.namespace, &r.name), r);
            }
        }
    }
    check(&config.virtual_services, out);
    check(&config.destination_rules, out);
    check(&config.gateways, out);
    check(&config.service_entries, out);
    check(&config.sidecars, out);
    check(&config.workload_entries, out);
    check(&config.services, out);
}

fn sidecar_conflicts(config: &Config, out: &mut Vec<Diagnostic>) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for r in &config.sidecars {
        if r.spec.workload_selector.is_none() && !seen.insert(&r.namespace) {
            out.push(r.diag(
                Severity::Warning,
                &FieldPath::root(),
                format!(
                    "more than one Sidecar without workloadSelector in namespace {:?}; only the oldest is used",
                    r.namespace
                ),
            ));
        }
    }
}

/// Validation context for one resource.
struct V<'a> {
    res: &'a dyn Located,
    out: &'a mut Vec<Diagnostic>,
}

trait Located {
    fn diag(&self, severity: Severity, rel: &FieldPath, message: String) -> Diagnostic;
}

impl<T> Located for Resource<T> {
    fn diag(&self, severity: Severity, rel: &FieldPath, message: String) -> Diagnostic {
        Resource::diag(self, severity, rel, message)
    }
}

impl<'a> V<'a> {
    fn new<T>(res: &'a Resource<T>, out: &'a mut Vec<Diagnostic>) -> Self {
        Self { res, out }
    }

    fn err(&mut self, path: &FieldPath, msg: impl Into<String>) {
        self.out
            .push(self.res.diag(Severity::Error, path, msg.into()));
    }

    fn warn(&mut self, path: &FieldPath, msg: impl Into<String>) {
        self.out
            .push(self.res.diag(Severity::Warning, path, msg.into()));
    }

    fn port_number(&mut self, path: &FieldPath, port: Option<i64>, required: bool) {
        match port {
            None if required => self.err(path, "port number is required"),
            None => {}
            Some(p) if !(1..=65535).contains(&p) => self.err(
                path,
                format!("port number {p} must be in the range 1..65535"),
            ),
            Some(_) => {}
        }
    }

    /// Durations must parse and, unless `allow_zero`, be at least 1ms; ms precision only.
    fn duration(&mut self, path: &FieldPath, d: Option<&String>, allow_zero: bool) -> Option<u64> {
        let d = d?;
        match duration::parse_nanos(d) {
            Err(e) => {
                self.err(path, e);
                None
            }
            Ok(ns) => {
                if ns == 0 && allow_zero {
                    return Some(0);
                }
                if ns < 1_000_000 {
                    self.err(path, format!("duration {d:?} must be at least 1ms"));
                    return None;
                }
                if ns % 1_000_000 != 0 {
                    self.err(
                        path,
                        format!("duration {d:?}: only durations to ms precision are supported"),
                    );
                }
                u64::try_from(ns / 1_000_000).ok()
            }
        }
    }

    fn percentage(&mut self, path: &FieldPath, p: Option<&api::Percent>) {
        if let Some(p) = p {
            if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
                self.err(
                    &path.key("value"),
                    format!("percentage {} is not in range 0..100", p.value),
                );
            }
        }
    }

    fn regex(&mut self, path: &FieldPath, re: &str) {
        if re.len() > MAX_REGEX_LEN {
            self.err(
                path,
                format!(
                    "regex is {} characters long, more than the maximum {MAX_REGEX_LEN}",
                    re.len()
                ),
            );
            return;
        }
        if let Err(e) = regex::Regex::new(re) {
            let first = e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string();
            self.err(path, format!("{re:?} is not a valid regex: {first}"));
        }
    }

    /// `what` = "uri", "header", ... decides which empty forms are legal.
    fn string_match(&mut self, path: &FieldPath, m: &StringMatch, what: &str) {
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set > 1 {
            self.err(path, "only one of exact, prefix or regex may be set");
            return;
        }
        if let Some(re) = &m.regex {
            if re.is_empty() && what != "header" && what != "query" {
                self.err(
                    &path.key("regex"),
                    format!("{what}: regex string match should not be empty"),
                );
            } else if re != "*" || what != "header" {
                self.regex(&path.key("regex"), re);
            }
        }
        if let Some(p) = &m.prefix {
            if p.is_empty() && matches!(what, "scheme" | "method" | "authority") {
                self.err(
                    &path.key("prefix"),
                    format!("{what}: prefix string match should not be empty"),
                );
            }
        }
    }

    fn header_name(&mut self, path: &FieldPath, name: &str) -> bool {
        let body = name.strip_prefix(':').unwrap_or(name);
        let ok = !body.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !ok {
            self.err(path, format!("invalid header name {name:?}"));
        }
        ok
    }

    fn header_value(&mut self, path: &FieldPath, value: &str) {
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            self.err(
                path,
                format!("header value {value:?} contains control characters"),
            );
            return;
        }
        // Envoy substitutes %VAR% forms; a literal percent must be written %%.
        let bytes = value.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                if bytes.get(i + 1) == Some(&b'%') {
                    i += 2;
                    continue;
                }
                match value[i + 1..].find('%') {
                    Some(end)
                        if end > 0
                            && value[i + 1..i + 1 + end]
                                .bytes()
                                .next()
                                .is_some_and(|b| b.is_ascii_uppercase()) =>
                    {
                        i += end + 2;
                        continue;
                    }
                    _ => {
                        self.err(path, format!("header value configuration {value:?} is invalid: a literal '%' must be written as '%%'"));
                        return;
                    }
                }
            }
            i += 1;
        }
    }

    fn labels(&mut self, path: &FieldPath, labels: &api::Labels) {
        for (k, v) in labels {
            let key_ok = {
                let (prefix, name) = match k.rsplit_once('/') {
                    Some((p, n)) => (Some(p), n),
                    None => (None, k.as_str()),
                };
                prefix.is_none_or(|p| hosts::validate_fqdn(p).is_ok()) && qualified_name(name)
            };
            if !key_ok {
                self.err(&path.key(k), format!("invalid label key {k:?}"));
            }
            if !(v.is_empty() || qualified_name(v)) {
                self.err(
                    &path.key(k),
                    format!("invalid label value {v:?} for key {k:?}"),
                );
            }
        }
    }

    fn export_to(&mut self, path: &FieldPath, export_to: &[String], allow_none: bool) {
        let mut seen = BTreeSet::new();
        let mut public = false;
        for (i, e) in export_to.iter().enumerate() {
            let p = path.idx(i);
            if !seen.insert(e.as_str()) {
                self.err(&p, format!("duplicate entries in exportTo: {e}"));
            }
            match e.as_str() {
                "*" => public = true,
                "." => {}
                "~" if allow_none => {
                    if export_to.len() > 1 {
                        self.err(&p, "exportTo '~' (no namespace) cannot be combined with other values");
                    }
                }
                ns if hosts::is_dns1123_label(ns) => {}
                other => self.err(&p, format!("only .,* or a valid DNS-1123 namespace is allowed as exportTo, got {other:?}")),
            }
        }
        if public && export_to.len() > 1 {
            self.err(
                path,
                "cannot have both public (*) and non-public exportTo values for a resource",
            );
        }
    }

    fn destination(&mut self, path: &FieldPath, d: Option<&api::Destination>) {
        let Some(d) = d else {
            self.err(path, "destination is required");
            return;
        };
        if d.host.is_empty() {
            self.err(&path.key("host"), "destination.host is required");
        } else if d.host == "*" {
            self.err(&path.key("host"), "invalid destination host *");
        } else if let Err(e) = hosts::validate_wildcard_domain(&d.host) {
            self.err(&path.key("host"), e);
        }
        if !d.subset.is_empty() && !hosts::is_dns1123_label(&d.subset) {
            self.err(
                &path.key("subset"),
                format!(
                    "subset name {:?} is invalid: must be a DNS-1123 label",
                    d.subset
                ),
            );
        }
        if let Some(p) = &d.port {
            self.port_number(&path.key("port").key("number"), p.number, false);
        }
    }
}

fn qualified_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

// === VirtualService ===

fn virtual_service(r: &Resource<api::VirtualService>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let vs = &r.spec;
    let spec = FieldPath::root().key("spec");
    let delegate = vs.hosts.is_empty();
    let bound_to_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
    if delegate {
        if !vs.gateways.is_empty() {
            v.err(
                &spec.key("gateways"),
                "delegate virtual service must have no gateways specified",
            );
        }
        if !vs.tls.is_empty() {
            v.err(
                &spec.key("tls"),
                "delegate virtual service must have no tls route specified",
            );
        }
        if !vs.tcp.is_empty() {
            v.err(
                &spec.key("tcp"),
                "delegate virtual service must have no tcp route specified",
            );
        }
    }
    for (i, h) in vs.hosts.iter().enumerate() {
        let p = spec.key("hosts").idx(i);
        if h == "*" && bound_to_mesh {
            v.err(
                &p,
                "wildcard host * is not allowed for virtual services bound to the mesh gateway",
            );
        } else if hosts::is_ip(h) {
            if bound_to_mesh {
                v.warn(&p, "an IP address as a host only takes effect on gateways");
            }
        } else if let Err(e) = hosts::validate_wildcard_domain(h) {
            v.err(&p, e);
        }
    }
    // Duplicate or overlapping hosts within one VirtualService.
    let expanded: Vec<String> = vs
        .hosts
        .iter()
        .map(|h| hosts::resolve_short_name(h, &r.namespace))
        .collect();
    for i in 0..expanded.len() {
        for j in (i + 1)..expanded.len() {
            if hosts::intersects(&expanded[i], &expanded[j]) {
                v.err(
                    &spec.key("hosts").idx(j),
                    format!(
                        "duplicate hosts in virtual service: {} & {}",
                        vs.hosts[i], vs.hosts[j]
                    ),
                );
            }
        }
    }
    for (i, g) in vs.gateways.iter().enumerate() {
        gateway_name(&mut v, &spec.key("gateways").idx(i), g);
    }
    v.export_to(&spec.key("exportTo"), &vs.export_to, false);
    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        v.err(
            &spec,
            "http, tcp or tls must be provided in virtual service",
        );
    }
    let mut names = BTreeSet::new();
    for (i, route) in vs.http.iter().enumerate() {
        let p = spec.key("http").idx(i);
        if !route.name.is_empty() && !names.insert(route.name.as_str()) {
            v.warn(
                &p.key("name"),
                format!("route name {:?} is not unique", route.name),
            );
        }
        http_route(&mut v, &p, route, delegate);
    }
    unreachable_routes(&mut v, &spec, vs);
    for (i, t) in vs.tcp.iter().enumerate() {
        let p = spec.key("tcp").idx(i);
        for (j, m) in t.matches.iter().enumerate() {
            let mp = p.key("match").idx(j);
            for (k, s) in m.destination_subnets.iter().enumerate() {
                cidr(&mut v, &mp.key("destinationSubnets").idx(k), s);
            }
            if let Some(s) = &m.source_subnet {
                cidr(&mut v, &mp.key("sourceSubnet"), s);
            }
            v.port_number(&mp.key("port"), m.port, false);
            v.labels(&mp.key("sourceLabels"), &m.source_labels);
            for (k, g) in m.gateways.iter().enumerate() {
                gateway_name(&mut v, &mp.key("gateways").idx(k), g);
            }
        }
        l4_route(&mut v, &p, &t.route, "TCP");
    }
    for (i, t) in vs.tls.iter().enumerate() {
        let p = spec.key("tls").idx(i);
        if t.matches.is_empty() {
            v.err(
                &p.key("match"),
                "TLS route must have at least one match condition",
            );
        }
        for (j, m) in t.matches.iter().enumerate() {
            let mp = p.key("match").idx(j);
            if m.sni_hosts.is_empty() {
                v.err(
                    &mp.key("sniHosts"),
                    "TLS match must have at least one SNI host",
                );
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                let sp = mp.key("sniHosts").idx(k);
                if hosts::is_ip(sni) {
                    v.warn(
                        &sp,
                        format!(
                            "SNI host {sni:?} is an IP address; clients do not send IPs as SNI"
                        ),
                    );
                    continue;
                }
                if let Err(e) = hosts::validate_wildcard_domain(sni) {
                    v.err(&sp, e);
                    continue;
                }
                let resolved = hosts::resolve_short_name(sni, &r.namespace);
                if !expanded.iter().any(|h| hosts::subset_of(&resolved, h)) {
                    v.err(&sp, format!("the SNI host {sni:?} is not a subset of hosts specified in the virtual service"));
                }
            }
            for (k, s) in m.destination_subnets.iter().enumerate() {
                cidr(&mut v, &mp.key("destinationSubnets").idx(k), s);
            }
            v.port_number(&mp.key("port"), m.port, false);
        }
        l4_route(&mut v, &p, &t.route, "TLS");
    }
}

fn gateway_name(v: &mut V<'_>, path: &FieldPath, g: &str) {
    if g == "mesh" {
        return;
    }
    let name = match g.split_once('/') {
        Some((ns, name)) => {
            if ns != "." && !hosts::is_dns1123_label(ns) {
                v.err(path, format!("invalid gateway namespace {ns:?} in {g:?}"));
            }
            name
        }
        None => g,
    };
    // Legacy form name.ns.svc.cluster.local is accepted.
    if hosts::validate_fqdn(name).is_err() {
        v.err(path, format!("invalid gateway name {g:?}"));
    }
}

fn cidr(v: &mut V<'_>, path: &FieldPath, s: &str) {
    let ok = match s.split_once('/') {
        Some((ip, bits)) => {
            let max = if ip.contains(':') { 128 } else { 32 };
            hosts::is_ip(ip) && bits.parse::<u8>().is_ok_and(|b| b <= max)
        }
        None => hosts::is_ip(s),
    };
    if !ok {
        v.err(path, format!("{s:?} is not a valid IP address or CIDR"));
    }
}

fn l4_route(v: &mut V<'_>, path: &FieldPath, route: &[api::RouteDestination], what: &str) {
    if route.is_empty() {
        v.err(&path.key("route"), format!("{what} route is required"));
    }
    let weights: Vec<Option<i64>> = route.iter().map(|d| d.weight).collect();
    for (i, d) in route.iter().enumerate() {
        v.destination(
            &path.key("route").idx(i).key("destination"),
            d.destination.as_ref(),
        );
    }
    weights_check(v, &path.key("route"), &weights);
}

fn weights_check(v: &mut V<'_>, path: &FieldPath, weights: &[Option<i64>]) {
    let mut total: i64 = 0;
    for (i, w) in weights.iter().enumerate() {
        let w = w.unwrap_or(0);
        if w < 0 {
            v.err(&path.idx(i).key("weight"), format!("weight {w} < 0"));
        }
        if w > i64::from(u32::MAX) {
            v.err(
                &path.idx(i).key("weight"),
                format!("weight {w} is too large"),
            );
        }
        total = total.saturating_add(w.max(0));
    }
    if weights.len() > 1 && total == 0 {
        v.err(path, "total destination weight = 0");
    } else if weights.len() > 1 && total != 100 {
        v.warn(
            path,
            format!(
                "total destination weight {total} != 100; weights are used relative to their sum"
            ),
        );
    }
}

fn http_route(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute, delegate_vs: bool) {
    // Action exclusivity.
    let has_route = !route.route.is_empty();
    if let Some(_r) = &route.redirect {
        if has_route {
            v.err(
                &p.key("redirect"),
                "HTTP route cannot contain both route and redirect",
            );
        }
        if route.fault.is_some() {
            v.err(
                &p.key("fault"),
                "HTTP route cannot contain both fault and redirect",
            );
        }
        if route.rewrite.is_some() {
            v.err(
                &p.key("rewrite"),
                "HTTP route rule cannot contain both rewrite and redirect",
            );
        }
        if route.direct_response.is_some() {
            v.err(
                &p.key("directResponse"),
                "HTTP route cannot contain both redirect and directResponse",
            );
        }
    }
    if route.direct_response.is_some() {
        if has_route {
            v.err(
                &p.key("directResponse"),
                "HTTP route cannot contain both route and directResponse",
            );
        }
        if route.fault.is_some() {
            v.err(
                &p.key("fault"),
                "HTTP route cannot contain both fault and directResponse",
            );
        }
        if route.rewrite.is_some() {
            v.err(
                &p.key("rewrite"),
                "HTTP route rule cannot contain both rewrite and directResponse",
            );
        }
    }
    if let Some(d) = &route.delegate {
        if delegate_vs {
            v.err(&p.key("delegate"), "delegate is not allowed in a delegate virtual service (only one level of delegation)");
        }
        if has_route {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both route and delegate",
            );
        }
        if route.redirect.is_some() {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both redirect and delegate",
            );
        }
        if route.direct_response.is_some() {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both directResponse and delegate",
            );
        }
        if d.name.is_empty() {
            v.err(&p.key("delegate").key("name"), "delegate name is required");
        } else if hosts::validate_fqdn(&d.name).is_err() {
            v.err(
                &p.key("delegate").key("name"),
                format!("invalid delegate name {:?}", d.name),
            );
        }
        if !d.namespace.is_empty() && !hosts::is_dns1123_label(&d.namespace) {
            v.err(
                &p.key("delegate").key("namespace"),
                format!("invalid delegate namespace {:?}", d.namespace),
            );
        }
    }
    if !has_route
        && route.redirect.is_none()
        && route.delegate.is_none()
        && route.direct_response.is_none()
    {
        v.err(
            p,
            "HTTP route, redirect, delegate or directResponse is required",
        );
    }
    if route.mirror.is_some() && !route.mirrors.is_empty() {
        v.err(
            &p.key("mirrors"),
            "HTTP route cannot contain both mirror and mirrors",
        );
    }

    for (i, m) in route.matches.iter().enumerate() {
        http_match(v, &p.key("match").idx(i), m);
    }
    let weights: Vec<Option<i64>> = route.route.iter().map(|d| d.weight).collect();
    for (i, d) in route.route.iter().enumerate() {
        let dp = p.key("route").idx(i);
        v.destination(&dp.key("destination"), d.destination.as_ref());
        if let Some(h) = &d.headers {
            headers(v, &dp.key("headers"), h);
        }
    }
    weights_check(v, &p.key("route"), &weights);
    if let Some(h) = &route.headers {
        headers(v, &p.key("headers"), h);
    }
    // rewrite.authority together with an authority header set is ambiguous.
    let sets_authority = |h: &Option<api::Headers>| {
        h.as_ref()
            .and_then(|h| h.request.as_ref())
            .is_some_and(|r| {
                r.set
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host"))
            })
    };
    if let Some(rw) = &route.rewrite {
        let rp = p.key("rewrite");
        if rw.uri.is_none() && rw.authority.is_none() && rw.uri_regex_rewrite.is_none() {
            v.err(
                &rp,
                "rewrite must specify URI, authority, or uriRegexRewrite",
            );
        }
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            v.err(
                &rp,
                "rewrite may only contain one of URI or UriRegexRewrite",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            let rrp = rp.key("uriRegexRewrite");
            if rr.pattern.is_empty() {
                v.err(
                    &rrp.key("match"),
                    "UriRegexRewrite requires Match to be set",
                );
            } else {
                v.regex(&rrp.key("match"), &rr.pattern);
            }
            if rr.rewrite.is_empty() {
                v.err(
                    &rrp.key("rewrite"),
                    "UriRegexRewrite requires Rewrite to be set",
                );
            }
        }
        if rw.authority.is_some()
            && (sets_authority(&route.headers)
                || route.route.iter().any(|d| sets_authority(&d.headers)))
        {
            v.err(
                &rp.key("authority"),
                "authority header cannot be set in both rewrite and headers",
            );
        }
    }
    if let Some(r) = &route.redirect {
        let rp = p.key("redirect");
        if r.uri.is_some() && r.prefix_rewrite.is_some() {
            v.err(
                &rp.key("prefixRewrite"),
                "only one of uri or prefixRewrite may be set",
            );
        }
        if r.prefix_rewrite.is_some() {
            let all_prefix = route
                .matches
                .iter()
                .all(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
            if route.matches.is_empty() || !all_prefix {
                v.err(
                    &rp.key("prefixRewrite"),
                    "prefixRewrite requires every match of the route to have a uri prefix",
                );
            }
        }
        if r.uri.is_none()
            && r.prefix_rewrite.is_none()
            && r.authority.is_none()
            && r.port.is_none()
            && r.derive_port.is_none()
            && r.scheme.is_none()
        {
            v.err(&rp, "redirect must specify URI, authority, scheme, or port");
        }
        if let Some(code) = r.redirect_code {
            if !(300..=399).contains(&code) {
                v.err(
                    &rp.key("redirectCode"),
                    format!("{code} is not a valid redirect code, must be 3xx"),
                );
            } else if ![301, 302, 303, 307, 308].contains(&code) {
                v.warn(&rp.key("redirectCode"), format!("redirect code {code} is not supported by the proxy; the route will be dropped"));
            }
        }
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                v.err(
                    &rp.key("scheme"),
                    "invalid redirect scheme, must be http or https",
                );
            }
        }
        if r.port.is_some() && r.derive_port.is_some() {
            v.err(
                &rp.key("derivePort"),
                "only one of port or derivePort may be set",
            );
        }
        v.port_number(&rp.key("port"), r.port, false);
        if let Some(d) = &r.derive_port {
            if d != "FROM_PROTOCOL_DEFAULT" && d != "FROM_REQUEST_PORT" {
                v.err(&rp.key("derivePort"), format!("unknown derivePort {d:?}: expected FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"));
            }
        }
        if let Some(a) = &r.authority {
            if a.is_empty() {
                v.err(&rp.key("authority"), "redirect authority must not be empty");
            }
        }
    }
    if let Some(d) = &route.direct_response {
        let dp = p.key("directResponse");
        match d.status {
            Some(s) if (200..=599).contains(&s) => {}
            Some(s) => v.err(
                &dp.key("status"),
                format!("status {s} must be in range 200-599"),
            ),
            None => v.err(&dp.key("status"), "status must be in range 200-599"),
        }
        if let Some(b) = &d.body {
            let bp = dp.key("body");
            let len = match (&b.string, &b.bytes) {
                (Some(_), Some(_)) => {
                    v.err(&bp, "only one of string or bytes may be set");
                    0
                }
                (Some(s), None) => s.len(),
                (None, Some(bytes)) => {
                    match base64::engine::general_purpose::STANDARD.decode(bytes) {
                        Ok(b) => b.len(),
                        Err(e) => {
                            v.err(&bp.key("bytes"), format!("bytes must be base64: {e}"));
                            0
                        }
                    }
                }
                (None, None) => 0,
            };
            if len > MAX_DIRECT_RESPONSE_BODY {
                v.err(&bp, format!("large direct_responses may impact control plane performance, must be less than {MAX_DIRECT_RESPONSE_BODY} bytes"));
            } else if len > 100 * 1024 {
                v.warn(
                    &bp,
                    "large direct_responses may impact control plane performance",
                );
            }
        }
    }
    v.duration(&p.key("timeout"), route.timeout.as_ref(), true);
    if let Some(r) = &route.retries {
        let rp = p.key("retries");
        let attempts = r.attempts.unwrap_or(0);
        if attempts < 0 {
            v.err(&rp.key("attempts"), "attempts cannot be negative");
        }
        if attempts == 0
            && (r.per_try_timeout.is_some()
                || r.retry_on.is_some()
                || r.retry_remote_localities.is_some())
        {
            v.err(
                &rp,
                "http retry policy configured when attempts are set to 0 (disabled)",
            );
        }
        v.duration(&rp.key("perTryTimeout"), r.per_try_timeout.as_ref(), false);
        v.duration(&rp.key("backoff"), r.backoff.as_ref(), false);
        if let Some(on) = &r.retry_on {
            for tok in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let status_ok = tok.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status_ok && !RETRY_ON_POLICIES.contains(&tok) {
                    v.err(
                        &rp.key("retryOn"),
                        format!("{tok:?} is not a valid retryOn policy"),
                    );
                }
            }
        }
    }
    if let Some(f) = &route.fault {
        let fp = p.key("fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(
                &fp,
                "HTTP fault injection must have an abort and/or a delay",
            );
        }
        if let Some(d) = &f.delay {
            let dp = fp.key("delay");
            if let Some(pc) = d.percent {
                if !(0..=100).contains(&pc) {
                    v.err(
                        &dp.key("percent"),
                        format!("percentage {pc} is not in range 0..100"),
                    );
                }
            }
            v.percentage(&dp.key("percentage"), d.percentage.as_ref());
            if d.exponential_delay.is_some() {
                v.err(
                    &dp.key("exponentialDelay"),
                    "exponentialDelay not supported yet",
                );
            } else if d.fixed_delay.is_none() {
                v.err(&dp.key("fixedDelay"), "duration required");
            } else {
                v.duration(&dp.key("fixedDelay"), d.fixed_delay.as_ref(), false);
            }
        }
        if let Some(a) = &f.abort {
            let ap = fp.key("abort");
            v.percentage(&ap.key("percentage"), a.percentage.as_ref());
            if a.http2_error.is_some() {
                v.err(
                    &ap.key("http2Error"),
                    "HTTP/2 abort fault injection not supported yet",
                );
            }
            match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => v.err(&ap, "only one of httpStatus or grpcStatus may be set"),
                (Some(s), None) if !(200..=599).contains(&s) => v.err(
                    &ap.key("httpStatus"),
                    format!("invalid abort http status {s}"),
                ),
                (None, Some(g)) if !GRPC_CODES.contains(&g.as_str()) => v.err(
                    &ap.key("grpcStatus"),
                    format!("invalid abort grpc status {g:?}"),
                ),
                (None, None) if a.http2_error.is_none() => {
                    v.err(&ap, "abort must specify either httpStatus or grpcStatus")
                }
                _ => {}
            }
        }
    }
    if let Some(m) = &route.mirror {
        v.destination(&p.key("mirror"), Some(m));
    }
    v.percentage(&p.key("mirrorPercentage"), route.mirror_percentage.as_ref());
    if let Some(pc) = route.mirror_percent {
        if !(0..=100).contains(&pc) {
            v.err(
                &p.key("mirrorPercent"),
                format!("percentage {pc} is not in range 0..100"),
            );
        }
    }
    for (i, m) in route.mirrors.iter().enumerate() {
        let mp = p.key("mirrors").idx(i);
        v.destination(&mp.key("destination"), m.destination.as_ref());
        v.percentage(&mp.key("percentage"), m.percentage.as_ref());
    }
    if let Some(c) = &route.cors_policy {
        let cp = p.key("corsPolicy");
        for (i, o) in c.allow_origins.iter().enumerate() {
            v.string_match(&cp.key("allowOrigins").idx(i), o, "origin");
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) {
                v.err(
                    &cp.key("allowMethods").idx(i),
                    format!("{m:?} is not a supported HTTP method"),
                );
            }
        }
        for (i, h) in c.allow_headers.iter().enumerate() {
            v.header_name(&cp.key("allowHeaders").idx(i), h);
        }
        for (i, h) in c.expose_headers.iter().enumerate() {
            v.header_name(&cp.key("exposeHeaders").idx(i), h);
        }
        if let Some(ma) = &c.max_age {
            if let Ok(ns) = duration::parse_nanos(ma) {
                if ns % 1_000_000_000 != 0 {
                    v.err(
                        &cp.key("maxAge"),
                        "max_age duration is accurate only to seconds precision",
                    );
                }
            } else {
                v.duration(&cp.key("maxAge"), Some(ma), true);
            }
        }
        if let Some(u) = &c.unmatched_preflights {
            if !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE") {
                v.err(
                    &cp.key("unmatchedPreflights"),
                    format!("unknown unmatchedPreflights {u:?}: expected FORWARD or IGNORE"),
                );
            }
        }
    }
}

fn http_match(v: &mut V<'_>, p: &FieldPath, m: &api::HttpMatchRequest) {
    if let Some(u) = &m.uri {
        v.string_match(&p.key("uri"), u, "uri");
    }
    for (field, sm) in [
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            v.string_match(&p.key(field), sm, field);
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let hp = p.key(field).key(name);
            if name.chars().any(|c| c.is_ascii_uppercase()) {
                v.err(&hp, format!("header match {name} must be lowercase"));
            }
            if !name.starts_with("@request.auth.claims") {
                v.header_name(&hp, name);
            }
            v.string_match(&hp, sm, "header");
        }
    }
    for (name, sm) in &m.query_params {
        v.string_match(&p.key("queryParams").key(name), sm, "query");
    }
    v.port_number(&p.key("port"), m.port, false);
    v.labels(&p.key("sourceLabels"), &m.source_labels);
    for (i, g) in m.gateways.iter().enumerate() {
        gateway_name(v, &p.key("gateways").idx(i), g);
    }
    if let Some(ns) = &m.source_namespace {
        if !hosts::is_dns1123_label(ns) {
            v.err(
                &p.key("sourceNamespace"),
                format!("invalid sourceNamespace {ns:?}"),
            );
        }
    }
}

fn headers(v: &mut V<'_>, p: &FieldPath, h: &api::Headers) {
    for (dir, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let dp = p.key(dir);
        for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in map {
                let hp = dp.key(op).key(name);
                let lower = name.to_ascii_lowercase();
                if dir == "response" && (lower == "host" || lower.starts_with(':')) {
                    v.err(&hp, format!("invalid header {name:?}: host and pseudo-headers cannot be modified on responses"));
                    continue;
                }
                if v.header_name(&hp, name) {
                    v.header_value(&hp, value);
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            let hp = dp.key("remove").idx(i);
            let lower = name.to_ascii_lowercase();
            if lower == "host" || lower.starts_with(':') {
                v.err(
                    &hp,
                    format!(
                        "invalid header {name:?}: {name:?} is not a valid header name to remove"
                    ),
                );
            } else {
                v.header_name(&hp, name);
            }
        }
    }
}

/// Whether a match block matches every request (a catch-all), as Istio decides it.
pub fn is_catch_all_match(m: &api::HttpMatchRequest) -> bool {
    let uri_all = match &m.uri {
        None => true,
        Some(u) => {
            u.prefix.as_deref() == Some("/")
                || u.regex.as_deref() == Some("*")
                || u.regex.as_deref() == Some(".*")
                || (u.exact.is_none() && u.prefix.is_none() && u.regex.is_none())
        }
    };
    uri_all
        && m.headers.is_empty()
        && m.without_headers.is_empty()
        && m.query_params.is_empty()
        && m.scheme.is_none()
        && m.method.is_none()
        && m.authority.is_none()
        && m.port.is_none()
        && m.source_labels.is_empty()
        && m.gateways.is_empty()
        && m.source_namespace.is_none()
}

pub fn is_catch_all_route(r: &api::HttpRoute) -> bool {
    r.matches.is_empty() || r.matches.iter().any(is_catch_all_match)
}

fn unreachable_routes(v: &mut V<'_>, spec: &FieldPath, vs: &api::VirtualService) {
    if let Some(first) = vs.http.iter().position(is_catch_all_route) {
        for i in (first + 1)..vs.http.len() {
            v.warn(
                &spec.key("http").idx(i),
                format!("route is unreachable: spec.http[{first}] matches every request before it"),
            );
        }
    }
}

// === DestinationRule ===

fn destination_rule(r: &Resource<api::DestinationRule>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let dr = &r.spec;
    let spec = FieldPath::root().key("spec");
    if dr.host.is_empty() {
        v.err(&spec.key("host"), "host is required");
    } else if let Err(e) = hosts::validate_wildcard_domain(&dr.host) {
        v.err(&spec.key("host"), e);
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(&mut v, &spec.key("trafficPolicy"), tp, true);
    }
    let mut names = BTreeSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let sp = spec.key("subsets").idx(i);
        if s.name.is_empty() {
            v.err(&sp.key("name"), "subset name is required");
        } else if !hosts::is_dns1123_label(&s.name) {
            v.err(
                &sp.key("name"),
                format!(
                    "subset name {:?} is invalid: must be a DNS-1123 label",
                    s.name
                ),
            );
        } else if !names.insert(s.name.as_str()) {
            v.err(
                &sp.key("name"),
                format!("duplicate subset names: {}", s.name),
            );
        }
        v.labels(&sp.key("labels"), &s.labels);
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(&mut v, &sp.key("trafficPolicy"), tp, true);
        }
    }
    v.export_to(&spec.key("exportTo"), &dr.export_to, false);
    if let Some(ws) = &dr.workload_selector {
        v.labels(
            &spec.key("workloadSelector").key("matchLabels"),
            &ws.match_labels,
        );
        if dr.export_to.iter().any(|e| e != ".") {
            v.err(&spec.key("exportTo"), "destination rule with workloadSelector can only be exported to its own namespace (\".\")");
        }
    }
}

fn traffic_policy(v: &mut V<'_>, p: &FieldPath, tp: &api::TrafficPolicy, allow_ports: bool) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        v.err(p, "traffic policy must have at least one field");
    }
    policy_blocks(
        v,
        p,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    if !allow_ports && !tp.port_level_settings.is_empty() {
        v.err(
            &p.key("portLevelSettings"),
            "portLevelSettings are not allowed here",
        );
    }
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = p.key("portLevelSettings").idx(i);
        match pl.port.as_ref().and_then(|p| p.number) {
            None => v.err(&pp.key("port"), "port must be specified"),
            Some(n) => {
                v.port_number(&pp.key("port").key("number"), Some(n), true);
                if !ports.insert(n) {
                    v.err(
                        &pp.key("port"),
                        format!("port {n} is specified more than once in portLevelSettings"),
                    );
                }
            }
        }
        policy_blocks(
            v,
            &pp,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
}

fn policy_blocks(
    v: &mut V<'_>,
    p: &FieldPath,
    lb: Option<&api::LoadBalancerSettings>,
    cp: Option<&api::ConnectionPoolSettings>,
    od: Option<&api::OutlierDetection>,
    tls: Option<&api::ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        load_balancer(v, &p.key("loadBalancer"), lb);
    }
    if let Some(cp) = cp {
        connection_pool(v, &p.key("connectionPool"), cp);
    }
    if let Some(od) = od {
        outlier(v, &p.key("outlierDetection"), od);
    }
    if let Some(t) = tls {
        client_tls(v, &p.key("tls"), t);
    }
}

fn load_balancer(v: &mut V<'_>, p: &FieldPath, lb: &api::LoadBalancerSettings) {
    if let Some(s) = &lb.simple {
        if !matches!(
            s.as_str(),
            "UNSPECIFIED"
                | "LEAST_CONN"
                | "RANDOM"
                | "PASSTHROUGH"
                | "ROUND_ROBIN"
                | "LEAST_REQUEST"
        ) {
            v.err(&p.key("simple"), format!("unknown load balancer {s:?}: expected LEAST_REQUEST, ROUND_ROBIN, RANDOM or PASSTHROUGH"));
        } else if s == "LEAST_CONN" {
            v.warn(
                &p.key("simple"),
                "LEAST_CONN is deprecated; use LEAST_REQUEST",
            );
        }
        if lb.consistent_hash.is_some() {
            v.err(p, "only one of simple or consistentHash may be set");
        }
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = p.key("consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip == Some(true),
            ch.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if keys != 1 {
            v.err(&cp, "consistentHash must set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName");
        }
        if let Some(h) = &ch.http_header_name {
            v.header_name(&cp.key("httpHeaderName"), h);
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                v.err(
                    &cp.key("httpCookie").key("name"),
                    "name required for HttpCookie",
                );
            }
            v.duration(&cp.key("httpCookie").key("ttl"), c.ttl.as_ref(), true);
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            v.err(&cp, "only one of ringHash or maglev may be set");
        }
        if let Some(m) = &ch.maglev {
            if let Some(ts) = m.table_size {
                if !is_prime(ts) || ts >= 5_000_011 {
                    v.err(
                        &cp.key("maglev").key("tableSize"),
                        format!("table size {ts} must be a prime number less than 5000011"),
                    );
                }
            }
        }
        if ch.minimum_ring_size.is_some() {
            v.warn(
                &cp.key("minimumRingSize"),
                "minimumRingSize is deprecated; use ringHash.minimumRingSize",
            );
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let lp = p.key("localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            v.err(
                &lp,
                "can not simultaneously set 'distribute' and 'failover'",
            );
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let total: i64 = d.to.values().sum();
            if total != 100 {
                v.err(
                    &lp.key("distribute").idx(i).key("to"),
                    format!("total weight across localities must be 100, got {total}"),
                );
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from == f.to {
                v.err(
                    &lp.key("failover").idx(i),
                    "locality lb failover settings must specify different regions",
                );
            }
            if f.from.contains('/') || f.to.contains('/') {
                v.err(
                    &lp.key("failover").idx(i),
                    "locality lb failover only specify region",
                );
            }
        }
    }
    if let Some(w) = &lb.warmup_duration_secs {
        v.duration(&p.key("warmupDurationSecs"), Some(w), false);
    }
    if let Some(w) = &lb.warmup {
        v.duration(&p.key("warmup").key("duration"), w.duration.as_ref(), false);
        v.percentage(
            &p.key("warmup").key("minimumPercent"),
            w.minimum_percent.as_ref(),
        );
        if w.aggression.is_some_and(|a| a < 1.0) {
            v.err(
                &p.key("warmup").key("aggression"),
                "aggression must be at least 1.0",
            );
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn connection_pool(v: &mut V<'_>, p: &FieldPath, cp: &api::ConnectionPoolSettings) {
    if cp.tcp.is_none() && cp.http.is_none() {
        v.err(p, "must set either tcp or http or both");
    }
    let non_neg = |v: &mut V<'_>, path: FieldPath, n: Option<i64>, what: &str| {
        if let Some(n) = n {
            if n < 0 {
                v.err(&path, format!("{what} must be non-negative"));
            } else if n > i64::from(u32::MAX) {
                v.err(&path, format!("{what} is too large"));
            }
        }
    };
    if let Some(t) = &cp.tcp {
        let tp = p.key("tcp");
        non_neg(
            v,
            tp.key("maxConnections"),
            t.max_connections,
            "max connections",
        );
        v.duration(&tp.key("connectTimeout"), t.connect_timeout.as_ref(), false);
        v.duration(
            &tp.key("maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
            false,
        );
        v.duration(&tp.key("idleTimeout"), t.idle_timeout.as_ref(), true);
        if let Some(k) = &t.tcp_keepalive {
            v.duration(&tp.key("tcpKeepalive").key("time"), k.time.as_ref(), false);
            v.duration(
                &tp.key("tcpKeepalive").key("interval"),
                k.interval.as_ref(),
                false,
            );
        }
    }
    if let Some(h) = &cp.http {
        let hp = p.key("http");
        non_neg(
            v,
            hp.key("http1MaxPendingRequests"),
            h.http1_max_pending_requests,
            "http1 max pending requests",
        );
        non_neg(
            v,
            hp.key("http2MaxRequests"),
            h.http2_max_requests,
            "http2 max requests",
        );
        non_neg(
            v,
            hp.key("maxRequestsPerConnection"),
            h.max_requests_per_connection,
            "max requests per connection",
        );
        non_neg(v, hp.key("maxRetries"), h.max_retries, "max retries");
        non_neg(
            v,
            hp.key("maxConcurrentStreams"),
            h.max_concurrent_streams,
            "max concurrent streams",
        );
        v.duration(&hp.key("idleTimeout"), h.idle_timeout.as_ref(), true);
        if let Some(u) = &h.h2_upgrade_policy {
            if !matches!(u.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") {
                v.err(
                    &hp.key("h2UpgradePolicy"),
                    format!("unknown h2UpgradePolicy {u:?}"),
                );
            }
            if u == "UPGRADE" && h.use_client_protocol == Some(true) {
                v.err(
                    &hp.key("useClientProtocol"),
                    "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
                );
            }
        }
    }
}

fn outlier(v: &mut V<'_>, p: &FieldPath, od: &api::OutlierDetection) {
    for (field, val, what) in [
        (
            "consecutiveErrors",
            od.consecutive_errors,
            "outlier detection consecutive errors",
        ),
        (
            "consecutiveGatewayErrors",
            od.consecutive_gateway_errors,
            "outlier detection consecutive gateway errors",
        ),
        (
            "consecutive5xxErrors",
            od.consecutive_5xx_errors,
            "outlier detection consecutive 5xx errors",
        ),
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures,
            "outlier detection consecutive local origin failures",
        ),
    ] {
        if val.is_some_and(|n| n < 0) {
            v.err(&p.key(field), format!("{what} cannot be negative"));
        }
    }
    if od.consecutive_errors.is_some() {
        v.warn(&p.key("consecutiveErrors"), "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead");
    }
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        v.err(
            &p.key("consecutiveLocalOriginFailures"),
            "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
        );
    }
    v.duration(&p.key("interval"), od.interval.as_ref(), false);
    v.duration(
        &p.key("baseEjectionTime"),
        od.base_ejection_time.as_ref(),
        false,
    );
    if let Some(m) = od.max_ejection_percent {
        if !(0..=100).contains(&m) {
            v.err(
                &p.key("maxEjectionPercent"),
                "max ejection percent must be in range [0, 100]",
            );
        }
    }
    if let Some(m) = od.min_health_percent {
        if !(0..=100).contains(&m) {
            v.err(
                &p.key("minHealthPercent"),
                "minimum health percent must be in range [0, 100]",
            );
        }
    }
}

fn client_tls(v: &mut V<'_>, p: &FieldPath, t: &api::ClientTlsSettings) {
    let mode = t.mode.as_deref().unwrap_or("DISABLE");
    let has_files =
        t.client_certificate.is_some() || t.private_key.is_some() || t.ca_certificates.is_some();
    match mode {
        "DISABLE" | "SIMPLE" => {}
        "MUTUAL" => {
            if t.credential_name.is_none() {
                if t.client_certificate.is_none() {
                    v.err(
                        &p.key("clientCertificate"),
                        "client certificate required for mutual tls",
                    );
                }
                if t.private_key.is_none() {
                    v.err(&p.key("privateKey"), "private key required for mutual tls");
                }
            }
        }
        "ISTIO_MUTUAL" => {
            if has_files
                || t.credential_name.is_some()
                || !t.subject_alt_names.is_empty()
                || t.sni.is_some()
            {
                v.err(p, "cannot specify client certificates, CA certificate, credentialName, SNI or SANs if use ISTIO_MUTUAL");
            }
        }
        other => v.err(
            &p.key("mode"),
            format!("unknown TLS mode {other:?}: expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
        ),
    }
    if t.credential_name.is_some() && has_files {
        v.err(
            &p.key("credentialName"),
            "cannot specify client certificates or CA certificate when credentialName is set",
        );
    }
    if t.insecure_skip_verify == Some(true)
        && (t.ca_certificates.is_some() || !t.subject_alt_names.is_empty())
    {
        v.err(
            &p.key("insecureSkipVerify"),
            "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set",
        );
    }
}

// === Gateway ===

fn gateway(r: &Resource<api::Gateway>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let spec = FieldPath::root().key("spec");
    if r.spec.servers.is_empty() {
        v.err(
            &spec.key("servers"),
            "gateway must have at least one server",
        );
    }
    if let Some(sel) = &r.spec.selector {
        v.labels(&spec.key("selector"), sel);
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in r.spec.servers.iter().enumerate() {
        let sp = spec.key("servers").idx(i);
        if s.hosts.is_empty() {
            v.err(
                &sp.key("hosts"),
                "server config must contain at least one host",
            );
        }
        for (j, h) in s.hosts.iter().enumerate() {
            let hp = sp.key("hosts").idx(j);
            let (ns, dns) = match h.split_once('/') {
                Some((ns, dns)) => (Some(ns), dns),
                None => (None, h.as_str()),
            };
            if let Some(ns) = ns {
                if ns != "*" && ns != "." && !hosts::is_dns1123_label(ns) {
                    v.err(&hp, format!("invalid namespace value {ns:?} in host {h:?}"));
                }
            }
            if hosts::is_ip(dns) {
                continue;
            }
            if let Err(e) = hosts::validate_wildcard_domain(dns) {
                v.err(&hp, e);
            } else if dns != "*" && !dns.contains('.') {
                v.err(
                    &hp,
                    format!(
                        "short names (non FQDN) are not allowed in Gateway server hosts: {dns:?}"
                    ),
                );
            }
        }
        let Some(port) = &s.port else {
            v.err(&sp.key("port"), "port is required");
            continue;
        };
        let pp = sp.key("port");
        v.port_number(&pp.key("number"), port.number, true);
        let proto = port.protocol.to_ascii_uppercase();
        if !GATEWAY_PROTOCOLS.contains(&proto.as_str()) {
            v.err(&pp.key("protocol"), format!("invalid protocol {:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP, TLS, HTTPS", port.protocol));
        }
        if port.name.is_empty() {
            v.err(&pp.key("name"), "port name must be set");
        } else if let Some(first) = names.insert(&port.name, i) {
            v.err(&pp.key("name"), format!("port names in servers must be unique: duplicate name {} (also spec.servers[{first}])", port.name));
        }
        if port.target_port.is_some() {
            v.err(
                &pp.key("targetPort"),
                "targetPort has no impact on Gateways",
            );
        }
        if let Some(b) = &s.bind {
            if !hosts::is_ip(b) && !b.starts_with("unix://") {
                v.err(
                    &sp.key("bind"),
                    format!("{b:?} is not a valid IP address or unix:// socket"),
                );
            }
        }
        let tls_proto = proto == "HTTPS" || proto == "TLS";
        match &s.tls {
            None if tls_proto => v.err(
                &sp.key("tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            ),
            None => {}
            Some(t) => {
                let tp = sp.key("tls");
                let has_settings = t.mode.is_some()
                    || t.server_certificate.is_some()
                    || t.private_key.is_some()
                    || t.ca_certificates.is_some()
                    || t.credential_name.is_some();
                if !tls_proto && has_settings {
                    v.err(
                        &tp,
                        "server cannot have TLS settings for plain text HTTP ports",
                    );
                }
                if t.https_redirect == Some(true) && proto != "HTTP" {
                    v.warn(
                        &tp.key("httpsRedirect"),
                        "tls.httpsRedirect should only be used with http servers",
                    );
                }
                if tls_proto {
                    server_tls(&mut v, &tp, t);
                }
            }
        }
    }
}

fn server_tls(v: &mut V<'_>, p: &FieldPath, t: &api::ServerTlsSettings) {
    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
    let has_cred = t.credential_name.is_some()
        || !t.credential_names.is_empty()
        || !t.tls_certificates.is_empty();
    match mode {
        "PASSTHROUGH" | "AUTO_PASSTHROUGH" => {}
        "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" => {
            if !has_cred {
                if t.server_certificate.is_none() {
                    v.err(
                        &p.key("serverCertificate"),
                        format!("{mode} TLS requires a server certificate"),
                    );
                }
                if t.private_key.is_none() {
                    v.err(
                        &p.key("privateKey"),
                        format!("{mode} TLS requires a private key"),
                    );
                }
                if mode != "SIMPLE" && t.ca_certificates.is_none() {
                    v.err(
                        &p.key("caCertificates"),
                        format!("{mode} TLS requires a client CA bundle"),
                    );
                }
            }
        }
        "ISTIO_MUTUAL" => {
            if t.server_certificate.is_some()
                || t.private_key.is_some()
                || t.ca_certificates.is_some()
                || has_cred
            {
                v.err(p, "cannot have associated private key/server certificate/credentialName in ISTIO_MUTUAL mode");
            }
        }
        other => v.err(&p.key("mode"), format!("unknown TLS mode {other:?}")),
    }
    for (f, val) in [
        ("minProtocolVersion", &t.min_protocol_version),
        ("maxProtocolVersion", &t.max_protocol_version),
    ] {
        if let Some(val) = val {
            if !matches!(
                val.as_str(),
                "TLS_AUTO" | "TLSV1_0" | "TLSV1_1" | "TLSV1_2" | "TLSV1_3"
            ) {
                v.err(&p.key(f), format!("unknown TLS version {val:?}"));
            }
        }
    }
}

// === ServiceEntry ===

fn service_entry(r: &Resource<api::ServiceEntry>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let se = &r.spec;
    let spec = FieldPath::root().key("spec");
    let resolution = se.resolution.as_deref().unwrap_or("NONE");
    if !matches!(
        resolution,
        "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN" | "DYNAMIC_DNS"
    ) {
        v.err(&spec.key("resolution"), format!("unknown resolution {resolution:?}: expected NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS"));
    }
    if let Some(l) = &se.location {
        if l != "MESH_EXTERNAL" && l != "MESH_INTERNAL" {
            v.err(
                &spec.key("location"),
                format!("unknown location {l:?}: expected MESH_EXTERNAL or MESH_INTERNAL"),
            );
        }
    }
    if se.hosts.is_empty() {
        v.err(
            &spec.key("hosts"),
            "service entry must have at least one host",
        );
    }
    for (i, h) in se.hosts.iter().enumerate() {
        let hp = spec.key("hosts").idx(i);
        if h == "*" {
            v.err(&hp, "invalid host *");
            continue;
        }
        match hosts::validate_wildcard_domain(h) {
            Ok(()) => {}
            Err(e) if h.contains('*') && !h.starts_with("*.") && resolution != "DYNAMIC_DNS" => {
                v.warn(&hp, e)
            }
            Err(e) => v.err(&hp, e),
        }
        if resolution == "DNS" && se.endpoints.is_empty() && hosts::is_wildcard(h) {
            v.err(&hp, format!("hosts must be FQDN if no endpoints are provided for resolution mode DNS: {h:?}"));
        }
    }
    for (i, a) in se.addresses.iter().enumerate() {
        cidr(&mut v, &spec.key("addresses").idx(i), a);
        if a.contains('/') && !matches!(resolution, "NONE" | "STATIC") {
            v.err(
                &spec.key("addresses").idx(i),
                "CIDR addresses are allowed only for NONE/STATIC resolution types",
            );
        }
    }
    if se.ports.is_empty() && resolution != "NONE" {
        v.err(
            &spec.key("ports"),
            "service entry must have at least one port",
        );
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    let mut has_tcp = false;
    for (i, p) in se.ports.iter().enumerate() {
        let pp = spec.key("ports").idx(i);
        v.port_number(&pp.key("number"), p.number, true);
        v.port_number(&pp.key("targetPort"), p.target_port, false);
        if let Some(n) = p.number {
            if !numbers.insert(n) {
                v.err(
                    &pp.key("number"),
                    format!("service entry port {n} already defined"),
                );
            }
        }
        if p.name.is_empty() {
            v.err(&pp.key("name"), "port name must be set");
        } else {
            if !hosts::is_dns1123_label(&p.name) {
                v.err(
                    &pp.key("name"),
                    format!("invalid port name {:?}: must be a DNS-1123 label", p.name),
                );
            }
            if !names.insert(p.name.as_str()) {
                v.err(
                    &pp.key("name"),
                    format!("service entry port name {:?} already defined", p.name),
                );
            }
            port_names.insert(p.name.clone());
        }
        let proto = p.protocol.to_ascii_uppercase();
        if !proto.is_empty() && !SERVICE_PROTOCOLS.contains(&proto.as_str()) {
            v.err(
                &pp.key("protocol"),
                format!("unrecognized protocol {:?}", p.protocol),
            );
        }
        if matches!(proto.as_str(), "TCP" | "MONGO" | "REDIS" | "MYSQL") {
            has_tcp = true;
        }
    }
    if has_tcp && se.hosts.len() > 1 && resolution != "NONE" && se.addresses.is_empty() {
        v.err(
            &spec.key("hosts"),
            "multiple hosts provided with non-HTTP, non-TLS ports",
        );
    }
    if se.workload_selector.is_some() && !se.endpoints.is_empty() {
        v.err(
            &spec.key("workloadSelector"),
            "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        );
    }
    if let Some(ws) = &se.workload_selector {
        v.labels(&spec.key("workloadSelector").key("labels"), &ws.labels);
    }
    match resolution {
        "NONE" if !se.endpoints.is_empty() => v.err(
            &spec.key("endpoints"),
            "no endpoints should be provided for resolution type none",
        ),
        "STATIC" if se.endpoints.is_empty() && se.workload_selector.is_none() => v.err(
            &spec.key("endpoints"),
            "endpoints must be provided for resolution type static",
        ),
        "DNS_ROUND_ROBIN" if se.endpoints.len() > 1 => v.err(
            &spec.key("endpoints"),
            "there must only be 0 or 1 endpoint for resolution type DNS_ROUND_ROBIN",
        ),
        "DYNAMIC_DNS" if !se.endpoints.is_empty() || !se.addresses.is_empty() => v.err(
            &spec,
            "DYNAMIC_DNS resolution allows neither endpoints nor addresses",
        ),
        _ => {}
    }
    for (i, e) in se.endpoints.iter().enumerate() {
        let ep = spec.key("endpoints").idx(i);
        workload_entry(&mut v, e, &ep, Some(&port_names), resolution == "STATIC");
    }
    v.export_to(&spec.key("exportTo"), &se.export_to, true);
}

fn workload_entry(
    v: &mut V<'_>,
    e: &api::WorkloadEntry,
    p: &FieldPath,
    port_names: Option<&BTreeSet<String>>,
    require_ip: bool,
) {
    if e.address.is_empty() {
        if port_names.is_none() {
            v.err(&p.key("address"), "address must be set");
        }
    } else if let Some(uds) = e.address.strip_prefix("unix://") {
        if uds.is_empty() {
            v.err(
                &p.key("address"),
                "unix domain socket path must not be empty",
            );
        }
    } else if require_ip && !hosts::is_ip(&e.address) {
        v.err(
            &p.key("address"),
            format!("endpoint address {:?} is not a valid IP address", e.address),
        );
    } else if !hosts::is_ip(&e.address) {
        if let Err(err) = hosts::validate_fqdn(&e.address) {
            v.err(&p.key("address"), err);
        }
    }
    for (name, port) in &e.ports {
        let pp = p.key("ports").key(name);
        if let Some(names) = port_names {
            if !names.contains(name) {
                v.err(
                    &pp,
                    format!("endpoint port {name:?} is not defined by the service entry"),
                );
            }
        }
        v.port_number(&pp, Some(*port), true);
    }
    v.labels(&p.key("labels"), &e.labels);
    if let Some(w) = e.weight {
        if w < 0 || w > i64::from(u32::MAX) {
            v.err(
                &p.key("weight"),
                format!("weight {w} must be a non-negative 32-bit integer"),
            );
        }
    }
}

// === Sidecar ===

fn sidecar(r: &Resource<api::Sidecar>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let sc = &r.spec;
    let spec = FieldPath::root().key("spec");
    if sc.egress.is_empty()
        && sc.ingress.is_empty()
        && sc.outbound_traffic_policy.is_none()
        && sc.inbound_connection_pool.is_none()
    {
        v.err(&spec, "sidecar: empty configuration provided");
    }
    if let Some(ws) = &sc.workload_selector {
        v.labels(&spec.key("workloadSelector").key("labels"), &ws.labels);
    }
    let mut ports = BTreeSet::new();
    let mut portless = 0;
    for (i, e) in sc.egress.iter().enumerate() {
        let ep = spec.key("egress").idx(i);
        match &e.port {
            None => {
                portless += 1;
                if portless > 1 {
                    v.err(
                        &ep,
                        "sidecar: egress can have only one listener with empty port",
                    );
                } else if i + 1 != sc.egress.len() {
                    v.err(&ep, "sidecar: the egress listener with empty port should be the last listener in the list");
                }
            }
            Some(p) => {
                v.port_number(&ep.key("port").key("number"), p.number, true);
                if let Some(n) = p.number {
                    if !ports.insert((e.bind.clone(), n)) {
                        v.err(
                            &ep.key("port"),
                            format!(
                                "sidecar: ports on IP bound listeners must be unique (port {n})"
                            ),
                        );
                    }
                }
            }
        }
        if e.hosts.is_empty() {
            v.err(
                &ep.key("hosts"),
                "sidecar: egress listener must contain at least one host",
            );
        }
        for (j, h) in e.hosts.iter().enumerate() {
            let hp = ep.key("hosts").idx(j);
            let Some((ns, dns)) = h.split_once('/') else {
                v.err(
                    &hp,
                    format!("sidecar: host {h:?} must be of form namespace/dnsName"),
                );
                continue;
            };
            let ns = ns.strip_prefix('~').unwrap_or(ns);
            if ns != "*" && ns != "." && !hosts::is_dns1123_label(ns) {
                v.err(
                    &hp,
                    format!("sidecar: invalid namespace {ns:?} in host {h:?}"),
                );
            }
            if let Err(e) = hosts::validate_wildcard_domain(dns) {
                v.err(&hp, format!("sidecar: {e}"));
            }
        }
        if let Some(m) = &e.capture_mode {
            if !matches!(m.as_str(), "DEFAULT" | "IPTABLES" | "NONE") {
                v.err(&ep.key("captureMode"), format!("unknown captureMode {m:?}"));
            }
        }
    }
    if let Some(o) = &sc.outbound_traffic_policy {
        let op = spec.key("outboundTrafficPolicy");
        let mode = o.mode.as_deref().unwrap_or("ALLOW_ANY");
        match mode {
            "ALLOW_ANY" | "REGISTRY_ONLY" => {}
            "ALLOW_ANY_DYNAMIC_DNS" => v.err(
                &op.key("mode"),
                "ALLOW_ANY_DYNAMIC_DNS is only allowed in MeshConfig, not in a Sidecar",
            ),
            other => v.err(
                &op.key("mode"),
                format!("unknown outboundTrafficPolicy mode {other:?}"),
            ),
        }
        if o.egress_proxy.is_some() && mode != "ALLOW_ANY" {
            v.err(&op.key("egressProxy"), "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode");
        }
        if let Some(d) = &o.egress_proxy {
            v.destination(&op.key("egressProxy"), Some(d));
        }
    }
    if let Some(cp) = &sc.inbound_connection_pool {
        connection_pool(&mut v, &spec.key("inboundConnectionPool"), cp);
    }
}
