//! Sidecar: ingress, egress and the outbound traffic policy.

use std::collections::BTreeSet;

use super::destination_rule::connection_pool;

use super::{SERVICE_PROTOCOLS, V};
use crate::api;
use crate::diag::Diagnostic;
use crate::hosts;
use crate::load::Resource;
use crate::source::FieldPath;

pub(super) fn sidecar(r: &Resource<api::Sidecar>, out: &mut Vec<Diagnostic>) {
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
    ingress(&mut v, &spec, sc);
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
                if p.target_port.is_some_and(|t| t > 0) {
                    v.err(
                        &ep.key("port").key("targetPort"),
                        "targetPort has no impact on Sidecars",
                    );
                }
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
            let Some((raw_ns, dns)) = h.split_once('/') else {
                v.err(
                    &hp,
                    format!("sidecar: host must be of form namespace/dnsName: {h:?}"),
                );
                continue;
            };
            if raw_ns.is_empty() || dns.is_empty() {
                v.err(
                    &hp,
                    "sidecar: config namespace and dnsName in host entry cannot be empty",
                );
                continue;
            }
            // `~ns/host` leaves a host out; a bare `~` leaves it out of every namespace.
            let ns = raw_ns.strip_prefix('~').unwrap_or(raw_ns);
            if !ns.is_empty() && ns != "*" && ns != "." && !hosts::is_dns1123_label(ns) {
                v.err(
                    &hp,
                    format!("sidecar: invalid namespace value {raw_ns:?} in sidecar"),
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
        // Unset is the enum's zero value, REGISTRY_ONLY.
        let mode = o.mode.as_deref().unwrap_or("REGISTRY_ONLY");
        match mode {
            "ALLOW_ANY" | "REGISTRY_ONLY" => {}
            "ALLOW_ANY_DYNAMIC_DNS" => v.err(
                &op.key("mode"),
                "sidecar: ALLOW_ANY_DYNAMIC_DNS mode is only supported in MeshConfig, not in Sidecar resource",
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
            if d.port.is_none() {
                v.err(
                    &op.key("egressProxy").key("port"),
                    "sidecar: egress_proxy port must be non-nil",
                );
            }
            v.warn(
                &op.key("egressProxy"),
                "egressProxy has no effect in meshroute: traffic to unknown hosts goes to its original destination directly",
            );
        }
    }
    if let Some(cp) = &sc.inbound_connection_pool {
        connection_pool(&mut v, &spec.key("inboundConnectionPool"), cp);
    }
}

/// `ingress` listeners, with istiod's checks and words.
fn ingress(v: &mut V<'_>, spec: &FieldPath, sc: &api::Sidecar) {
    let mut ports = BTreeSet::new();
    for (i, l) in sc.ingress.iter().enumerate() {
        let ip = spec.key("ingress").idx(i);
        let Some(port) = &l.port else {
            v.err(&ip, "sidecar: port is required for ingress listeners");
            continue;
        };
        let pp = ip.key("port");
        if port.target_port.is_some_and(|t| t > 0) {
            v.err(
                &pp.key("targetPort"),
                "targetPort has no impact on Sidecars",
            );
        }
        if !port.name.is_empty() && !hosts::is_dns1123_label(&port.name) {
            v.err(&pp.key("name"), format!("invalid port name: {}", port.name));
        }
        let protocol = port.protocol.to_ascii_uppercase();
        if !protocol.is_empty() && !SERVICE_PROTOCOLS.contains(&protocol.as_str()) {
            v.err(
                &pp.key("protocol"),
                format!("unrecognized protocol {:?}", port.protocol),
            );
        }
        v.port_number(&pp.key("number"), port.number, true);
        if let Some(bind) = &l.bind {
            if bind.parse::<std::net::IpAddr>().is_err() {
                v.err(&ip.key("bind"), format!("{bind} is not a valid IP"));
            }
        }
        if let Some(n) = port.number {
            if !ports.insert(n) {
                v.err(&pp, "sidecar: ports on IP bound listeners must be unique");
            }
        }
        if let Some(m) = &l.capture_mode {
            if !matches!(m.as_str(), "DEFAULT" | "IPTABLES" | "NONE") {
                v.err(&ip.key("captureMode"), format!("unknown captureMode {m:?}"));
            }
        }
        if let Some(e) = &l.default_endpoint {
            default_endpoint(v, &ip.key("defaultEndpoint"), e);
        }
        if l.tls.is_some() {
            // The inbound side serves plain text; terminating TLS there is not built.
            v.err(
                &ip.key("tls"),
                "sidecar: ingress tls is not supported by meshroute (the inbound listener does not terminate TLS)",
            );
        }
        if let Some(cp) = &l.connection_pool {
            connection_pool(v, &ip.key("connectionPool"), cp);
            if cp.http.is_some() && !HTTP_PROTOCOLS.contains(&protocol.as_str()) {
                v.warn(
                    &ip.key("connectionPool").key("http"),
                    format!(
                        "sidecar: HTTP connection pool settings are configured for port {} ({:?}) but its protocol is not HTTP ({}); only TCP settings will apply",
                        port.number.unwrap_or(0),
                        port.name,
                        port.protocol
                    ),
                );
            }
        }
    }
}

const HTTP_PROTOCOLS: &[&str] = &["HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"];

/// `127.0.0.1:PORT`, `0.0.0.0:PORT`, `[::1]:PORT`, `[::]:PORT` or `unix://PATH`.
fn default_endpoint(v: &mut V<'_>, path: &FieldPath, e: &str) {
    if let Some(socket) = e.strip_prefix("unix://") {
        if let Err(err) = super::unix_address(socket) {
            v.err(path, err);
        }
        return;
    }
    let Some((host, port)) = e.rsplit_once(':') else {
        v.err(path, format!("address {e}: missing port in address"));
        return;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if !matches!(host, "" | "127.0.0.1" | "0.0.0.0" | "::1" | "::") {
        v.err(path, "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset");
    }
    match port.parse::<i64>() {
        Ok(n) => v.port_number(path, Some(n), true),
        Err(e) => v.err(
            path,
            format!("sidecar: defaultEndpoint port ({port}) is not a number: {e}"),
        ),
    }
}
