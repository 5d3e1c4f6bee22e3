//! The service registry: Kubernetes Services (+ WorkloadEntries they select) and ServiceEntries.

use std::collections::{BTreeMap, HashMap};

use meshroute_core::ir::SourceRef;

use crate::api;
use crate::hosts::{self, DOMAIN_SUFFIX};
use crate::load::{Config, Resource};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Static,
    Dns,
    None,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    /// Upper-case protocol; empty when the port relies on protocol sniffing.
    pub protocol: String,
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// HTTP routing applies to HTTP-family ports and to unspecified ones (sniffed as HTTP here).
    pub fn is_http(&self) -> bool {
        matches!(
            self.protocol.as_str(),
            "" | "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "UNSUPPORTED"
        )
    }
}

#[derive(Clone, Debug)]
pub struct ServiceEndpoint {
    pub address: String,
    /// Port per service port name (WorkloadEntry `ports`).
    pub ports: BTreeMap<String, u16>,
    pub labels: api::Labels,
    pub weight: u32,
    pub locality: String,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub host: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<ServiceEndpoint>,
    pub resolution: Resolution,
    pub export_to: Vec<String>,
    /// VIPs or CIDRs (ServiceEntry `addresses`, a Service's `clusterIP`): TCP traffic to them
    /// belongs to this service.
    pub addresses: Vec<String>,
    pub source: SourceRef,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Port an endpoint listens on for a service port.
    pub fn endpoint_port(ep: &ServiceEndpoint, port: &ServicePort) -> u16 {
        ep.ports
            .get(&port.name)
            .copied()
            .or(port.target_port)
            .unwrap_or(port.number)
    }

    /// Names a client in `client_ns` may use for this service (Istio's alternate vhost
    /// names): any host of the form `NAME.NS.svc.DOMAIN`, whatever registry it comes from,
    /// is also `NAME.NS.svc` and `NAME.NS`, and `NAME` in namespace `NS`.
    pub fn aliases(&self, client_ns: &str) -> Vec<String> {
        let mut names = vec![self.host.clone()];
        let Some(service) = self.host.strip_suffix(&format!(".{DOMAIN_SUFFIX}")) else {
            return names;
        };
        let Some((short, namespace)) = service.split_once('.') else {
            return names;
        };
        if short.is_empty() || namespace.is_empty() {
            return names;
        }
        names.push(format!("{service}.svc"));
        names.push(service.to_owned());
        if client_ns == namespace {
            names.push(short.to_owned());
        }
        names
    }
}

pub fn source_of<T>(r: &Resource<T>) -> SourceRef {
    SourceRef {
        kind: r.kind.to_string(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        file: r.origin.file.to_string(),
        line: r.origin.object_pos().line,
    }
}

fn port_u16(n: Option<i64>) -> Option<u16> {
    n.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0)
}

pub(crate) fn protocol_of(name: &str, declared: &str) -> String {
    let declared = declared.to_ascii_uppercase();
    if !declared.is_empty() {
        return declared;
    }
    // Istio's port-name convention: `http`, `http-web`, `grpc-api`, ...
    let prefix = name
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    match prefix.as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "HTTPS" | "TCP" | "TLS" | "MONGO" | "REDIS"
        | "MYSQL" => prefix,
        _ => String::new(),
    }
}

fn entry_endpoint(we: &api::WorkloadEntry) -> ServiceEndpoint {
    ServiceEndpoint {
        address: we.address.clone(),
        ports: we
            .ports
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), port_u16(Some(*v))?)))
            .collect(),
        labels: we.labels.clone(),
        weight: we
            .weight
            .and_then(|w| u32::try_from(w).ok())
            .filter(|w| *w > 0)
            .unwrap_or(1),
        locality: we.locality.clone(),
    }
}

/// Whether every label of `selector` is among `labels` (an empty selector selects all).
pub(crate) fn selects(selector: &api::Labels, labels: &api::Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The annotation that sets a Kubernetes Service's `exportTo`, comma-separated.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// Builds the registry from every Service and ServiceEntry (visibility is decided later).
pub fn build(config: &Config) -> Vec<Service> {
    let mut out = Vec::new();
    // WorkloadEntries are selected within their namespace only: index them once.
    let mut entries_by_ns: HashMap<&str, Vec<&Resource<api::WorkloadEntry>>> = HashMap::new();
    for we in &config.workload_entries {
        entries_by_ns
            .entry(we.namespace.as_str())
            .or_default()
            .push(we);
    }
    let entries_in = |ns: &str| {
        entries_by_ns
            .get(ns)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .copied()
    };
    for r in &config.services {
        let svc = &r.spec;
        let ports: Vec<ServicePort> = svc
            .ports
            .iter()
            .filter(|p| p.is_tcp())
            .filter_map(|p| {
                let number = port_u16(p.port)?;
                let protocol = match &p.app_protocol {
                    Some(ap) => ap.to_ascii_uppercase(),
                    None => protocol_of(&p.name, ""),
                };
                let target_port = match &p.target_port {
                    Some(serde_json::Value::Number(n)) => port_u16(n.as_i64()),
                    _ => None,
                };
                Some(ServicePort {
                    number,
                    name: p.name.clone(),
                    protocol,
                    target_port,
                })
            })
            .collect();
        let endpoints = if let Some(name) = svc.external_name() {
            // istiod: one endpoint, the external name, on each Service port.
            vec![ServiceEndpoint {
                address: name.to_ascii_lowercase(),
                ports: ports.iter().map(|p| (p.name.clone(), p.number)).collect(),
                labels: BTreeMap::new(),
                weight: 1,
                locality: String::new(),
            }]
        } else if svc.selector.is_empty() {
            Vec::new()
        } else {
            entries_in(&r.namespace)
                .filter(|we| selects(&svc.selector, &we.spec.labels))
                .map(|we| {
                    let mut labels = we.labels.clone();
                    labels.extend(we.spec.labels.clone());
                    ServiceEndpoint {
                        labels,
                        ..entry_endpoint(&we.spec)
                    }
                })
                .collect()
        };
        let resolution = if endpoints.iter().all(|e| hosts::is_ip(&e.address)) {
            Resolution::Static
        } else {
            Resolution::Dns
        };
        out.push(Service {
            host: format!("{}.{}.{DOMAIN_SUFFIX}", r.name, r.namespace),
            namespace: r.namespace.clone(),
            ports,
            endpoints,
            resolution,
            // istiod reads a Service's visibility from this annotation.
            export_to: match r.annotations.get(EXPORT_TO_ANNOTATION) {
                Some(list) => list
                    .split(',')
                    .map(str::trim)
                    .filter(|ns| !ns.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => config.default_service_export_to.clone(),
            },
            addresses: {
                // `clusterIPs` holds `clusterIP` first and, dual-stack, the other family's.
                let mut ips: Vec<String> = Vec::new();
                for ip in svc.cluster_ip.iter().chain(&svc.cluster_ips) {
                    if hosts::is_ip(ip) && !ips.contains(ip) {
                        ips.push(ip.clone());
                    }
                }
                ips
            },
            source: source_of(r),
        });
    }
    for r in &config.service_entries {
        let se = &r.spec;
        let resolution = match se.resolution.as_deref() {
            Some("STATIC") => Resolution::Static,
            Some("DNS") | Some("DNS_ROUND_ROBIN") | Some("DYNAMIC_DNS") => Resolution::Dns,
            _ => Resolution::None,
        };
        let ports: Vec<ServicePort> = se
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    number: port_u16(p.number)?,
                    name: p.name.clone(),
                    protocol: protocol_of(&p.name, &p.protocol),
                    target_port: port_u16(p.target_port),
                })
            })
            .collect();
        let mut endpoints: Vec<ServiceEndpoint> = match &se.workload_selector {
            Some(sel) => entries_in(&r.namespace)
                .filter(|we| selects(&sel.labels, &we.spec.labels))
                .map(|we| entry_endpoint(&we.spec))
                .collect(),
            None => se.endpoints.iter().map(entry_endpoint).collect(),
        };
        for host in &se.hosts {
            let host = host.to_ascii_lowercase();
            if resolution == Resolution::Dns
                && se.endpoints.is_empty()
                && se.workload_selector.is_none()
            {
                // DNS without endpoints: the host itself resolves.
                endpoints = vec![ServiceEndpoint {
                    address: host.clone(),
                    ports: BTreeMap::new(),
                    labels: BTreeMap::new(),
                    weight: 1,
                    locality: String::new(),
                }];
            }
            out.push(Service {
                host,
                namespace: r.namespace.clone(),
                ports: ports.clone(),
                endpoints: endpoints.clone(),
                resolution,
                export_to: se.export_to.clone(),
                addresses: se.addresses.clone(),
                source: source_of(r),
            });
        }
    }
    out
}
