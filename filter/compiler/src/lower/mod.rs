//! Lowering to the rules document: route tables, gateway listeners, connection tables and
//! clusters for one proxy, from what resolution found it sees.

use std::collections::{BTreeSet, HashMap};

use meshroute_core::ir::{self, ProxyKind};

use crate::api;
use crate::diag::{Diagnostic, Severity};
use crate::hosts;
use crate::load::{Config, Resource};
use crate::options::{MeshOptions, ProxyOptions};
use crate::registry::Service;
use crate::resolve::{self, Scope};
use crate::source::FieldPath;
use crate::validate::Validated;

mod cluster;
mod gateway;
pub(crate) mod http;
mod inbound;
mod l4;

pub use http::{default_retry_policy, retry_policy};

/// The compiler's working state for one proxy.
struct Lowering<'a> {
    config: &'a Config,
    proxy: &'a ProxyOptions,
    mesh: &'a MeshOptions,
    services: Vec<Service>,
    /// host → indices into `services` (several namespaces may define the same host).
    by_host: HashMap<String, Vec<usize>>,
    diags: Vec<Diagnostic>,
    /// Clusters referenced by routes, to warn about missing ones once.
    warned: BTreeSet<String>,
    /// A sidecar's egress listeners, which narrow what each port serves.
    scope: Scope,
}

/// Lowers a validated configuration for one proxy. Returns the document and the
/// diagnostics of resolution and lowering.
pub fn lower(
    valid: &Validated<'_>,
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> (ir::RulesDocument, Vec<Diagnostic>) {
    let config = valid.config();
    let mut l = Lowering {
        config,
        proxy,
        mesh,
        services: Vec::new(),
        by_host: HashMap::new(),
        diags: Vec::new(),
        warned: BTreeSet::new(),
        scope: Scope::all(),
    };
    let mut outbound = mesh.outbound_traffic_policy;
    let scope = if proxy.kind == ProxyKind::Sidecar {
        let (scope, policy) = resolve::sidecar_scope(config, proxy, mesh);
        if let Some(p) = policy {
            outbound = p;
        }
        scope
    } else {
        Scope::all()
    };
    for svc in resolve::visible_services(config, proxy, &scope) {
        let idx = l.services.len();
        l.by_host.entry(svc.host.clone()).or_default().push(idx);
        l.services.push(svc);
    }
    let (route_tables, listeners, l4_tables) = match proxy.kind {
        ProxyKind::Sidecar => {
            let vss = resolve::sidecar_vss(config, proxy, &scope);
            l.scope = scope;
            let l4 = l.sidecar_l4(&vss);
            (l.sidecar_routes(&vss), Vec::new(), l4)
        }
        ProxyKind::Gateway => l.gateway_routes(),
    };
    let clusters = l.clusters();
    // Inside Istio, istiod's clusters originate the mesh's mTLS.
    if proxy.endpoint_selection == ir::EndpointSelection::Filter {
        l.reject_istio_mutual(&clusters);
    }
    let port_aliases = if proxy.kind == ProxyKind::Gateway {
        l.gateway_port_aliases(&listeners)
    } else {
        Vec::new()
    };
    let inbound = if proxy.kind == ProxyKind::Sidecar {
        l.sidecar_inbound()
    } else {
        Vec::new()
    };
    let cluster_names: BTreeSet<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    let mut missing = Vec::new();
    for table in &route_tables {
        for vh in &table.virtual_hosts {
            for route in &vh.routes {
                if let ir::Action::Route(ra) = &route.action {
                    for d in &ra.destinations {
                        let port = d.port.unwrap_or(table.port);
                        let name = ir::cluster_name(port, &d.subset, &d.host);
                        if !cluster_names.contains(name.as_str()) {
                            missing.push((
                                name,
                                route.source.clone(),
                                d.host.clone(),
                                d.subset.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    for (name, source, host, subset) in missing {
        if !l.warned.insert(name.clone()) {
            continue;
        }
        let message = if l.by_host.contains_key(&host) && !subset.is_empty() {
            format!("subset {subset:?} of {host} is not defined in any DestinationRule visible to this proxy; requests get 503 (NC)")
        } else if l.by_host.contains_key(&host) {
            format!(
                "destination {host} has no port {}; requests get 503 (NC)",
                name.split('|').nth(1).unwrap_or_default()
            )
        } else {
            format!("destination host {host} is not in the registry visible to this proxy; requests get 503 (NC)")
        };
        if let Some(src) = source {
            l.diags.push(Diagnostic {
                severity: Severity::Warning,
                file: src.file,
                pos: crate::source::Pos {
                    line: src.line,
                    col: 1,
                },
                resource: Some(crate::diag::ResourceId {
                    kind: src.kind,
                    namespace: src.namespace,
                    name: src.name,
                }),
                path: String::new(),
                message,
            });
        }
    }
    let doc = ir::RulesDocument {
        version: ir::VERSION,
        proxy: ir::ProxyIdentity {
            kind: proxy.kind,
            namespace: proxy.namespace.clone(),
            labels: proxy.labels.clone(),
            locality: proxy.locality.clone(),
            endpoint_selection: proxy.endpoint_selection,
        },
        outbound_traffic_policy: outbound,
        route_tables,
        clusters,
        listeners,
        l4_tables,
        port_aliases,
        inbound,
        warnings: l.diags.iter().map(ToString::to_string).collect(),
    };
    (doc, l.diags)
}

impl<'a> Lowering<'a> {
    fn warn<T>(&mut self, r: &Resource<T>, path: &FieldPath, msg: impl Into<String>) {
        self.diags.push(r.diag(Severity::Warning, path, msg));
    }

    /// `ISTIO_MUTUAL` needs the mesh's workload certificates (issued by istiod), which a
    /// meshroute proxy does not have: sending plain text instead would silently drop the
    /// security the user asked for, so the rules are not produced.
    fn reject_istio_mutual(&mut self, clusters: &[ir::Cluster]) {
        const WHY: &str = "ISTIO_MUTUAL is not supported: it needs the mesh certificates istiod issues, which meshroute does not have; use MUTUAL with clientCertificate, privateKey and caCertificates files";
        let used: BTreeSet<&str> = clusters
            .iter()
            .filter(|c| {
                c.tls
                    .as_ref()
                    .is_some_and(|t| t.mode == ir::ClientTlsMode::IstioMutual)
            })
            .map(|c| c.service.as_str())
            .collect();
        if used.is_empty() {
            return;
        }
        let is_istio_mutual = |t: &Option<api::ClientTlsSettings>| {
            t.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL")
        };
        let mut found = Vec::new();
        for dr in &self.config.destination_rules {
            let host = hosts::resolve_short_name(&dr.spec.host, &dr.namespace);
            if !used.iter().any(|u| hosts::matches(&host, u)) {
                continue;
            }
            let spec = FieldPath::root().key("spec");
            let mut policies: Vec<(FieldPath, &api::TrafficPolicy)> = Vec::new();
            if let Some(tp) = &dr.spec.traffic_policy {
                policies.push((spec.key("trafficPolicy"), tp));
            }
            for (i, sub) in dr.spec.subsets.iter().enumerate() {
                if let Some(tp) = &sub.traffic_policy {
                    policies.push((spec.key("subsets").idx(i).key("trafficPolicy"), tp));
                }
            }
            for (path, tp) in policies {
                if is_istio_mutual(&tp.tls) {
                    found.push(dr.diag(Severity::Error, &path.key("tls").key("mode"), WHY));
                }
                for (i, pl) in tp.port_level_settings.iter().enumerate() {
                    if is_istio_mutual(&pl.tls) {
                        let p = path.key("portLevelSettings").idx(i).key("tls").key("mode");
                        found.push(dr.diag(Severity::Error, &p, WHY));
                    }
                }
            }
        }
        self.diags.extend(found);
    }

    fn service(&self, host: &str) -> Option<&Service> {
        // When several namespaces define the host, the oldest definition (first loaded) wins.
        self.by_host
            .get(host)
            .and_then(|v| v.first())
            .map(|i| &self.services[*i])
    }

    /// Destination port: explicit, else the service's only port, else the listener port (None).
    fn dest_port(&self, host: &str, explicit: Option<i64>) -> Option<u16> {
        if let Some(p) = explicit.and_then(|p| u16::try_from(p).ok()) {
            return Some(p);
        }
        let svc = self.service(host)?;
        if svc.ports.len() == 1 {
            Some(svc.ports[0].number)
        } else {
            None
        }
    }
}
