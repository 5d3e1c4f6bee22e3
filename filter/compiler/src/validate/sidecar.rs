//! Sidecar: ingress, egress and the outbound traffic policy.

use std::collections::BTreeSet;

use super::destination_rule::connection_pool;
use super::V;
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
