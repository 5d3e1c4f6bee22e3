//! ServiceEntry and WorkloadEntry.

use std::collections::BTreeSet;

use super::virtual_service::cidr;
use super::{SERVICE_PROTOCOLS, V};
use crate::api;
use crate::diag::Diagnostic;
use crate::hosts;
use crate::load::Resource;
use crate::source::FieldPath;

pub(super) fn service_entry(r: &Resource<api::ServiceEntry>, out: &mut Vec<Diagnostic>) {
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
    if !se.subject_alt_names.is_empty() {
        v.warn(
            &spec.key("subjectAltNames"),
            "subjectAltNames has no effect in meshroute: it verifies the ISTIO_MUTUAL peers of the service, and meshroute does not originate ISTIO_MUTUAL",
        );
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
        if matches!(resolution, "DNS" | "DNS_ROUND_ROBIN")
            && se.endpoints.is_empty()
            && hosts::validate_fqdn(h).is_err()
        {
            v.err(&hp, format!("hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode {resolution}: {h:?}"));
        }
        if resolution == "DYNAMIC_DNS" && !hosts::is_wildcard(h) {
            v.err(
                &hp,
                "host must be wildcarded for resolution mode DYNAMIC_DNS",
            );
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
        v.warn(
            &spec.key("ports"),
            "service entry has no ports, so it adds no listener, route or cluster",
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
                    format!(
                        "port number cannot be duplicated: service entry port {n} already defined"
                    ),
                );
            }
        }
        if p.name.is_empty() {
            v.err(&pp.key("name"), "port name must be set");
        } else {
            if !hosts::is_dns1123_label(&p.name) {
                v.err(
                    &pp.key("name"),
                    format!("invalid port name: {} (port name must be valid)", p.name),
                );
            }
            if !names.insert(p.name.as_str()) {
                v.err(
                    &pp.key("name"),
                    format!(
                        "Duplicate value: service entry port name {:?} already defined",
                        p.name
                    ),
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
            "no endpoints should be provided for resolution type none (NONE mode cannot set endpoints)",
        ),
        "NONE" if se.workload_selector.is_some() => v.warn(
            &spec.key("workloadSelector"),
            "workloadSelector should not be set when resolution mode is NONE",
        ),
        "STATIC" if se.endpoints.is_empty() && se.workload_selector.is_none() => v.warn(
            &spec.key("endpoints"),
            "a STATIC service entry without endpoints or workloadSelector has no endpoints of its own: requests get 503 unless WorkloadEntries are selected",
        ),
        "DNS_ROUND_ROBIN" if se.endpoints.len() > 1 => v.err(
            &spec.key("endpoints"),
            "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN (DNS_ROUND_ROBIN mode cannot have multiple endpoints)",
        ),
        "DYNAMIC_DNS" => {
            if !se.addresses.is_empty() {
                v.err(&spec.key("addresses"), "addresses cannot be set for resolution type DYNAMIC_DNS. HTTP route domains will only be generated from the hosts field values");
            }
            if !se.endpoints.is_empty() {
                v.err(&spec.key("endpoints"), "endpoints cannot be set for resolution type DYNAMIC_DNS. Destination IP address determined from hosts field values");
            }
            for (i, p) in se.ports.iter().enumerate() {
                let proto = p.protocol.to_ascii_uppercase();
                if !matches!(proto.as_str(), "HTTP" | "TLS" | "GRPC" | "HTTP2") {
                    v.err(&spec.key("ports").idx(i).key("protocol"), "only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type DYNAMIC_DNS");
                }
            }
            if se.location.as_deref() == Some("MESH_INTERNAL") && uses_waypoint(&r.labels) {
                v.err(&spec.key("location"), "location MESH_INTERNAL with resolution type DYNAMIC_DNS is not supported when using waypoints");
            }
        }
        _ => {}
    }
    let unix = se
        .endpoints
        .iter()
        .any(|e| e.address.starts_with(UNIX_PREFIX));
    if unix && resolution == "STATIC" && se.ports.len() != 1 {
        v.err(
            &spec.key("ports"),
            "exactly 1 service port required for unix endpoints",
        );
    }
    for (i, e) in se.endpoints.iter().enumerate() {
        let ep = spec.key("endpoints").idx(i);
        let addresses = match resolution {
            "STATIC" | "NONE" => Addresses::Ip,
            _ => Addresses::IpOrFqdn,
        };
        workload_entry(&mut v, e, &ep, Some(&port_names), addresses);
    }
    v.export_to(&spec.key("exportTo"), &se.export_to, true);
}

const UNIX_PREFIX: &str = "unix://";

/// What an endpoint's address may be, as istiod allows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Addresses {
    /// A STATIC ServiceEntry's endpoints: IPs or unix sockets.
    Ip,
    /// A DNS ServiceEntry's endpoints: IPs or host names.
    IpOrFqdn,
    /// A WorkloadEntry of its own: any of the three.
    Any,
}

/// `istio.io/use-waypoint` set to a waypoint (anything but `none`).
fn uses_waypoint(labels: &api::Labels) -> bool {
    labels
        .get("istio.io/use-waypoint")
        .is_some_and(|w| !w.is_empty() && !w.eq_ignore_ascii_case("none"))
}

pub(super) fn workload_entry(
    v: &mut V<'_>,
    e: &api::WorkloadEntry,
    p: &FieldPath,
    port_names: Option<&BTreeSet<String>>,
    addresses: Addresses,
) {
    if e.address.is_empty() {
        if e.network.is_empty() {
            v.err(&p.key("address"), "address is required");
        } else {
            v.warn(
                &p.key("address"),
                format!("address is unset with network {:?}", e.network),
            );
        }
    } else if let Some(uds) = e
        .address
        .strip_prefix(UNIX_PREFIX)
        .filter(|_| addresses != Addresses::IpOrFqdn)
    {
        if let Err(err) = super::unix_address(uds) {
            v.err(&p.key("address"), err);
        }
        if !e.ports.is_empty() {
            v.err(
                &p.key("ports"),
                format!(
                    "unix endpoint {} must not include ports (UDS may not include ports)",
                    e.address
                ),
            );
        }
    } else if hosts::is_ip(&e.address) {
    } else if addresses == Addresses::Ip {
        v.err(
            &p.key("address"),
            format!("endpoint address {:?} is not a valid IP address", e.address),
        );
    } else if hosts::validate_fqdn(&e.address).is_err() {
        v.err(
            &p.key("address"),
            format!(
                "endpoint address {:?} is not a valid FQDN or an IP address",
                e.address
            ),
        );
    }
    for (name, port) in &e.ports {
        let pp = p.key("ports").key(name);
        if !hosts::is_dns1123_label(name) {
            v.err(
                &pp,
                format!("invalid port name: {name} (port name must be valid)"),
            );
        }
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
    if !e.network.is_empty() {
        v.warn(
            &p.key("network"),
            "network has no effect in meshroute: every endpoint is reached directly, not through its network's gateway",
        );
    }
    if !e.service_account.is_empty() {
        v.warn(
            &p.key("serviceAccount"),
            "serviceAccount has no effect in meshroute: it names the workload's mesh identity for ISTIO_MUTUAL, which meshroute does not originate",
        );
    }
    if let Some(w) = e.weight {
        if w < 0 || w > i64::from(u32::MAX) {
            v.err(
                &p.key("weight"),
                format!("weight {w} must be a non-negative 32-bit integer"),
            );
        }
    }
}
