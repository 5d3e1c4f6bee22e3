//! VirtualService: hosts, gateways, HTTP, TCP and TLS routes, delegation.

use std::collections::BTreeSet;

use super::http_route::http_route;
use super::V;
use crate::api;
use crate::diag::Diagnostic;
use crate::hosts;
use crate::load::Resource;
use crate::source::FieldPath;

pub(super) fn virtual_service(r: &Resource<api::VirtualService>, out: &mut Vec<Diagnostic>) {
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
    // istiod lets a gateway's SNI routes name Envoy's generated `outbound_.PORT_._.HOST`.
    let auto_sni = vs.gateways.iter().any(|g| g != "mesh")
        && vs
            .tls
            .iter()
            .any(|t| t.matches.iter().any(|m| !m.sni_hosts.is_empty()));
    for (i, h) in vs.hosts.iter().enumerate() {
        let p = spec.key("hosts").idx(i);
        if auto_sni && h.starts_with("outbound_") {
            if let Err(e) = hosts::validate_auto_sni_domain(h) {
                v.err(&p, e);
            }
        } else if h == "*" && bound_to_mesh {
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
                v.warn(
                    &mp.key("sourceSubnet"),
                    "sourceSubnet has no effect: istiod does not apply it either",
                );
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
                let checked = if auto_sni && sni.starts_with("outbound_") {
                    hosts::validate_auto_sni_domain(sni)
                } else {
                    hosts::validate_wildcard_domain(sni)
                };
                if let Err(e) = checked {
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

pub(super) fn gateway_name(v: &mut V<'_>, path: &FieldPath, g: &str) {
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

pub(super) fn cidr(v: &mut V<'_>, path: &FieldPath, s: &str) {
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

pub(super) fn l4_route(
    v: &mut V<'_>,
    path: &FieldPath,
    route: &[api::RouteDestination],
    what: &str,
) {
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

pub(super) fn weights_check(v: &mut V<'_>, path: &FieldPath, weights: &[Option<i64>]) {
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

pub(super) fn http_match(v: &mut V<'_>, p: &FieldPath, m: &api::HttpMatchRequest) {
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
            if name.starts_with("@request.auth.claims") {
                // istiod turns these into matches on the claims its RequestAuthentication's
                // JWT filter leaves in the request's metadata, which the filter cannot read:
                // matched as a header, the route would never match (or, under
                // withoutHeaders, always match).
                v.err(
                    &hp,
                    format!("{name}: JWT claim matches are not supported by meshroute (the claims of Istio's RequestAuthentication are not visible to the filter); match a header the authenticating proxy sets instead"),
                );
            } else {
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
    if m.stat_prefix.is_some() {
        v.warn(
            &p.key("statPrefix"),
            "statPrefix has no effect in meshroute: routes keep no statistics of their own",
        );
    }
}

pub(super) fn headers(v: &mut V<'_>, p: &FieldPath, h: &api::Headers) {
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

pub fn is_catch_all_route(r: &api::HttpRoute) -> bool {
    r.matches.is_empty() || r.matches.iter().any(crate::matches::is_catch_all)
}

pub(super) fn unreachable_routes(v: &mut V<'_>, spec: &FieldPath, vs: &api::VirtualService) {
    if let Some(first) = vs.http.iter().position(is_catch_all_route) {
        for i in (first + 1)..vs.http.len() {
            v.warn(
                &spec.key("http").idx(i),
                format!("route is unreachable: spec.http[{first}] matches every request before it"),
            );
        }
    }
}
