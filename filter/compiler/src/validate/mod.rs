//! Istio's validation rules (pkg/config/validation) for the kinds meshroute reads, one module
//! per kind. Every error is collected; messages use Istio's words where Istio has words.
//! Lowering takes only a [`Validated`] configuration.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{self, StringMatch};
use crate::diag::{Diagnostic, Severity};
use crate::hosts;
use crate::load::{Config, Resource};
use crate::source::FieldPath;

mod destination_rule;
pub(crate) mod gateway;
mod http_route;
mod service_entry;
mod sidecar;
mod virtual_service;

pub use virtual_service::is_catch_all_route;

/// Longest regex Istio accepts.
pub const MAX_REGEX_LEN: usize = 1024;
/// Largest direct-response body (Envoy's default limit as used by Istio).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

pub(crate) const RETRY_ON_POLICIES: &[&str] = &[
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

pub(crate) const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(crate) const GATEWAY_PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL",
];
pub(crate) const SERVICE_PROTOCOLS: &[&str] = &[
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

/// Configuration that passed validation: what lowering takes. Only [`validate`] makes one.
#[derive(Clone, Copy)]
pub struct Validated<'a> {
    config: &'a Config,
}

impl<'a> Validated<'a> {
    pub fn config(&self) -> &'a Config {
        self.config
    }
}

/// What validation found, and the configuration when none of it is an error.
pub struct Validation<'a> {
    pub diagnostics: Vec<Diagnostic>,
    validated: Option<Validated<'a>>,
}

impl<'a> Validation<'a> {
    pub fn validated(&self) -> Option<Validated<'a>> {
        self.validated
    }
}

/// Validates every resource.
pub fn validate(config: &Config) -> Validation<'_> {
    let diagnostics = diagnostics(config);
    let validated = (!diagnostics.iter().any(Diagnostic::is_error)).then_some(Validated { config });
    Validation {
        diagnostics,
        validated,
    }
}

fn diagnostics(config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for r in &config.virtual_services {
        virtual_service::virtual_service(r, &mut out);
    }
    for r in &config.destination_rules {
        destination_rule::destination_rule(r, &mut out);
    }
    for r in &config.gateways {
        gateway::gateway(r, &mut out);
    }
    for r in &config.service_entries {
        service_entry::service_entry(r, &mut out);
    }
    for r in &config.sidecars {
        sidecar::sidecar(r, &mut out);
    }
    for r in &config.workload_entries {
        let mut v = V::new(r, &mut out);
        service_entry::workload_entry(
            &mut v,
            &r.spec,
            &FieldPath::root().key("spec"),
            None,
            service_entry::Addresses::Any,
        );
    }
    for r in &config.services {
        let mut v = V::new(r, &mut out);
        kube_service(&mut v, &r.spec);
    }
    duplicates(config, &mut out);
    sidecar_conflicts(config, &mut out);
    out
}

/// A Kubernetes Service: its ports, and the fields that shape how Kubernetes exposes or
/// balances it but not meshroute, said where they differ from Kubernetes' defaults.
fn kube_service(v: &mut V<'_>, s: &api::KubeService) {
    let spec = FieldPath::root().key("spec");
    for (i, p) in s.ports.iter().enumerate() {
        let at = spec.key("ports").idx(i);
        v.port_number(&at.key("port"), p.port, true);
        if !p.is_tcp() {
            v.warn(
                &at.key("protocol"),
                format!(
                    "{} ports have no effect in meshroute: only TCP ports are proxied, as istiod builds no listener for others",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
        }
        if p.node_port.is_some() {
            v.warn(&at.key("nodePort"), format!("nodePort {EXPOSURE}"));
        }
    }
    match s.service_type.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") if s.external_name().is_none() => {
            v.err(&spec.key("externalName"), "Required value: externalName is required for ExternalName services");
        }
        Some("ExternalName") => {}
        Some(other) => v.err(
            &spec.key("type"),
            format!("Unsupported value: {other:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        ),
    }
    if s.external_name.is_some() && s.service_type.as_deref() != Some("ExternalName") {
        v.warn(
            &spec.key("externalName"),
            "externalName has no effect unless type is ExternalName",
        );
    }
    let exposure = [
        ("externalIPs", !s.external_ips.is_empty()),
        ("loadBalancerIP", s.load_balancer_ip.is_some()),
        (
            "loadBalancerSourceRanges",
            !s.load_balancer_source_ranges.is_empty(),
        ),
        ("loadBalancerClass", s.load_balancer_class.is_some()),
        (
            "externalTrafficPolicy",
            s.external_traffic_policy
                .as_deref()
                .is_some_and(|p| p != "Cluster"),
        ),
        ("healthCheckNodePort", s.health_check_node_port.is_some()),
        (
            "allocateLoadBalancerNodePorts",
            s.allocate_load_balancer_node_ports == Some(false),
        ),
    ];
    for (field, set) in exposure {
        if set {
            v.warn(&spec.key(field), format!("{field} {EXPOSURE}"));
        }
    }
    let balancing = [
        (
            "sessionAffinity",
            s.session_affinity.as_deref().is_some_and(|a| a != "None"),
            "client IP affinity is a DestinationRule consistentHash with useSourceIp",
        ),
        (
            "sessionAffinityConfig",
            s.session_affinity_config.is_some(),
            "client IP affinity is a DestinationRule consistentHash with useSourceIp",
        ),
        (
            "internalTrafficPolicy",
            s.internal_traffic_policy
                .as_deref()
                .is_some_and(|p| p != "Cluster"),
            "meshroute knows no nodes, and every endpoint is used",
        ),
        (
            "trafficDistribution",
            s.traffic_distribution.is_some(),
            "locality preference is a DestinationRule localityLbSetting",
        ),
        (
            "publishNotReadyAddresses",
            s.publish_not_ready_addresses == Some(true),
            "endpoints are the WorkloadEntries given, ready or not",
        ),
        (
            "ipFamilyPolicy",
            s.ip_family_policy
                .as_deref()
                .is_some_and(|p| p != "SingleStack"),
            "the Service's addresses are its clusterIPs",
        ),
        (
            "ipFamilies",
            s.ip_families.len() > 1,
            "the Service's addresses are its clusterIPs",
        ),
    ];
    for (field, set, why) in balancing {
        if set {
            v.warn(
                &spec.key(field),
                format!("{field} has no effect on mesh traffic in meshroute: {why}"),
            );
        }
    }
}

/// Why the fields that expose a Service outside the cluster do nothing in meshroute.
const EXPOSURE: &str = "has no effect in meshroute: it exposes the Service outside the cluster, which Kubernetes does, not the mesh's proxies";

/// Two objects of one kind with the same namespace and name.
fn duplicates(config: &Config, out: &mut Vec<Diagnostic>) {
    pub(crate) fn check<T>(list: &[Resource<T>], out: &mut Vec<Diagnostic>) {
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
pub(crate) struct V<'a> {
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
    pub(crate) fn new<T>(res: &'a Resource<T>, out: &'a mut Vec<Diagnostic>) -> Self {
        Self { res, out }
    }

    pub(crate) fn err(&mut self, path: &FieldPath, msg: impl Into<String>) {
        self.out
            .push(self.res.diag(Severity::Error, path, msg.into()));
    }

    pub(crate) fn warn(&mut self, path: &FieldPath, msg: impl Into<String>) {
        self.out
            .push(self.res.diag(Severity::Warning, path, msg.into()));
    }

    pub(crate) fn port_number(&mut self, path: &FieldPath, port: Option<i64>, required: bool) {
        match port {
            None if required => self.err(path, "port number is required"),
            None => {}
            Some(p) if !(1..=65535).contains(&p) => {
                self.err(path, format!("port must be between 1-65535 (got {p})"))
            }
            Some(_) => {}
        }
    }

    /// Durations must parse and, unless `allow_zero`, be at least 1ms; ms precision only.
    pub(crate) fn duration(
        &mut self,
        path: &FieldPath,
        d: Option<&api::Duration>,
        allow_zero: bool,
    ) -> Option<u64> {
        let d = d?;
        match d.nanos() {
            Err(e) => {
                self.err(path, e);
                None
            }
            Ok(ns) => {
                if ns == 0 && allow_zero {
                    return Some(0);
                }
                let d = &d.text;
                if ns < 1_000_000 {
                    self.err(
                        path,
                        format!("must be a valid duration greater than 1ms (got {d:?})"),
                    );
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

    pub(crate) fn percentage(&mut self, path: &FieldPath, p: Option<&api::Percent>) {
        if let Some(p) = p {
            if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
                self.err(
                    &path.key("value"),
                    format!("percentage {} is not in range 0..100", p.value),
                );
            }
        }
    }

    pub(crate) fn regex(&mut self, path: &FieldPath, re: &str) {
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
    pub(crate) fn string_match(&mut self, path: &FieldPath, m: &StringMatch, what: &str) {
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

    pub(crate) fn header_name(&mut self, path: &FieldPath, name: &str) -> bool {
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

    pub(crate) fn header_value(&mut self, path: &FieldPath, value: &str) {
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

    pub(crate) fn labels(&mut self, path: &FieldPath, labels: &api::Labels) {
        for (k, v) in labels {
            let key_ok = {
                let (prefix, name) = match k.rsplit_once('/') {
                    Some((p, n)) => (Some(p), n),
                    None => (None, k.as_str()),
                };
                prefix.is_none_or(|p| hosts::validate_fqdn(p).is_ok()) && qualified_name(name)
            };
            if !key_ok {
                self.err(&path.key(k), format!("invalid tag key: {k:?}"));
            }
            if !(v.is_empty() || qualified_name(v)) {
                self.err(
                    &path.key(k),
                    format!("invalid tag value: {v:?} (for key {k:?})"),
                );
            }
        }
    }

    pub(crate) fn export_to(&mut self, path: &FieldPath, export_to: &[String], allow_none: bool) {
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

    pub(crate) fn destination(&mut self, path: &FieldPath, d: Option<&api::Destination>) {
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

pub(crate) fn qualified_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A `unix://` socket path, as istiod checks it: absolute and not a directory, or abstract
/// (`@name`). The words in brackets are the CRD schema's.
pub(crate) fn unix_address(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if path.starts_with('@') {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(format!(
            "{path} is not an absolute path to a file (UDS must be an absolute path or abstract socket)"
        ));
    }
    if path.ends_with('/') {
        return Err(format!(
            "{path} is not an absolute path to a file (UDS may not be a dir)"
        ));
    }
    Ok(())
}
