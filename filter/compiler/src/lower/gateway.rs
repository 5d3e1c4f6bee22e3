//! Gateways: the servers that select the proxy, their listeners, and the route tables and
//! connection tables of the VirtualServices bound to them.

use std::collections::BTreeMap;

use meshroute_core::ir;

use super::Lowering;
use crate::api;
use crate::diag::Severity;
use crate::hosts;
use crate::load::Resource;
use crate::registry;
use crate::resolve::{resolve_gateway_name, selects, visible};
use crate::source::FieldPath;

/// Istio's default ingress gateway Service: port 80 on container port 8080, 443 on 8443.
const ISTIO_GATEWAY_TARGET_PORTS: [(u16, u16); 2] = [(80, 8080), (443, 8443)];

impl Lowering<'_> {
    /// The container ports the gateway listens on for its server ports, from the Kubernetes
    /// Service that selects the gateway (`port` → `targetPort`), or Istio's default gateway
    /// Service's when the configuration holds none.
    pub(super) fn gateway_port_aliases(&self, listeners: &[ir::Listener]) -> Vec<ir::PortAlias> {
        let service =
            self.config.services.iter().find(|s| {
                !s.spec.selector.is_empty() && selects(&s.spec.selector, &self.proxy.labels)
            });
        let targets: Vec<(u16, u16)> = match service {
            Some(s) => s
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.port?).ok()?;
                    // A named targetPort names a container port this configuration cannot see.
                    let target = p
                        .target_port
                        .as_ref()
                        .and_then(serde_json::Value::as_i64)
                        .and_then(|t| u16::try_from(t).ok())?;
                    Some((port, target))
                })
                .collect(),
            None => ISTIO_GATEWAY_TARGET_PORTS.to_vec(),
        };
        let serves = |port: u16| listeners.iter().any(|l| l.port == port);
        targets
            .into_iter()
            .filter(|&(port, target)| port != target && serves(port) && !serves(target))
            .map(|(table, listener)| ir::PortAlias { listener, table })
            .collect()
    }

    pub(super) fn gateway_routes(
        &mut self,
    ) -> (Vec<ir::RouteTable>, Vec<ir::Listener>, Vec<ir::L4Table>) {
        let labels = &self.proxy.labels;
        let gateways: Vec<&Resource<api::Gateway>> = self
            .config
            .gateways
            .iter()
            .filter(|g| g.spec.selector.as_ref().is_none_or(|s| selects(s, labels)))
            .collect();
        let mut vss: Vec<&Resource<api::VirtualService>> = self
            .config
            .virtual_services
            .iter()
            .filter(|v| !v.spec.hosts.is_empty())
            .collect();
        vss.sort_by(|a, b| a.age_key().cmp(&b.age_key()));

        // port → domain → (require_tls, routes in VS order, catch-alls separated)
        struct VHost {
            require_tls: bool,
            routes: Vec<ir::Route>,
            catch_alls: Vec<ir::Route>,
            source: Option<ir::SourceRef>,
        }
        let mut tables: BTreeMap<u16, BTreeMap<String, VHost>> = BTreeMap::new();
        let mut listeners: BTreeMap<u16, ir::Listener> = BTreeMap::new();
        let mut l4_tables: BTreeMap<u16, ir::L4Table> = BTreeMap::new();
        for gw in &gateways {
            let gw_name = format!("{}/{}", gw.namespace, gw.name);
            for (server_index, server) in gw.spec.servers.iter().enumerate() {
                let Some(port) = server
                    .port
                    .as_ref()
                    .and_then(|p| p.number)
                    .and_then(|n| u16::try_from(n).ok())
                else {
                    continue;
                };
                let protocol = server
                    .port
                    .as_ref()
                    .map(|p| p.protocol.to_ascii_uppercase())
                    .unwrap_or_default();
                let listener = listeners.entry(port).or_insert_with(|| ir::Listener {
                    port,
                    servers: Vec::new(),
                });
                // The TLS mode of an HTTPS or TLS server defaults to PASSTHROUGH (Istio's
                // ServerTLSSettings); plain HTTP servers only redirect.
                let tls_server = matches!(protocol.as_str(), "HTTPS" | "TLS");
                let mode = server
                    .tls
                    .as_ref()
                    .and_then(|t| t.mode.as_deref().or(tls_server.then_some("PASSTHROUGH")));
                let routing = server_routing(&protocol, mode);
                listener.servers.push(ir::ListenerServer {
                    hosts: server.hosts.clone(),
                    routing,
                    tls: server
                        .tls
                        .as_ref()
                        .filter(|_| routing.terminates_tls())
                        .map(|t| ir::ServerTls {
                            mode: match t.mode.as_deref() {
                                Some("MUTUAL") => ir::ServerTlsMode::Mutual,
                                Some("OPTIONAL_MUTUAL") => ir::ServerTlsMode::OptionalMutual,
                                _ => ir::ServerTlsMode::Simple,
                            },
                            server_certificate: t.server_certificate.clone(),
                            private_key: t.private_key.clone(),
                            ca_certificates: t.ca_certificates.clone(),
                            credential_name: t.credential_name.clone(),
                            credential_names: t.credential_names.clone(),
                            tls_certificates: t
                                .tls_certificates
                                .iter()
                                .map(|c| ir::CertificateFiles {
                                    server_certificate: c
                                        .server_certificate
                                        .clone()
                                        .unwrap_or_default(),
                                    private_key: c.private_key.clone().unwrap_or_default(),
                                })
                                .collect(),
                            ca_cert_credential_name: t.ca_cert_credential_name.clone(),
                            subject_alt_names: t.subject_alt_names.clone(),
                            verify_certificate_spki: t.verify_certificate_spki.clone(),
                            verify_certificate_hash: t.verify_certificate_hash.clone(),
                            ca_crl: t.ca_crl.clone(),
                            min_protocol_version: tls_version(t.min_protocol_version.as_deref()),
                            max_protocol_version: tls_version(t.max_protocol_version.as_deref()),
                            cipher_suites: crate::validate::gateway::filter_cipher_suites(
                                &t.cipher_suites,
                            ),
                        }),
                });
                if server.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL")
                    && self.proxy.endpoint_selection == ir::EndpointSelection::Filter
                {
                    let path = FieldPath::root()
                        .key("spec")
                        .key("servers")
                        .idx(server_index)
                        .key("tls")
                        .key("mode");
                    self.diags.push(gw.diag(
                        Severity::Error,
                        &path,
                        "ISTIO_MUTUAL is not supported: it needs the mesh certificates istiod issues, which meshroute does not have; use MUTUAL with serverCertificate, privateKey and caCertificates files",
                    ));
                    continue;
                }
                if !routing.serves_http() {
                    let table = l4_tables.entry(port).or_insert_with(|| ir::L4Table {
                        port,
                        ..Default::default()
                    });
                    self.gateway_l4(gw, server_index, routing, port, &vss, table);
                    continue;
                }
                let require_tls = protocol == "HTTP"
                    && server.tls.as_ref().and_then(|t| t.https_redirect) == Some(true);
                let table = tables.entry(port).or_default();
                let mut bound_any = false;
                for vs in &vss {
                    if !vs
                        .spec
                        .gateways
                        .iter()
                        .any(|g| resolve_gateway_name(g, &vs.namespace) == gw_name)
                    {
                        continue;
                    }
                    if !visible(&vs.spec.export_to, &vs.namespace, &gw.namespace) {
                        continue;
                    }
                    for server_host in &server.hosts {
                        let (ns_filter, dns) = match server_host.split_once('/') {
                            Some((n, d)) => (n, d),
                            None => ("*", server_host.as_str()),
                        };
                        let ns_ok = match ns_filter {
                            "*" => true,
                            "." => vs.namespace == gw.namespace,
                            n => vs.namespace == n,
                        };
                        if !ns_ok {
                            continue;
                        }
                        for vh in &vs.spec.hosts {
                            let rh = hosts::resolve_short_name(vh, &vs.namespace);
                            let dns = dns.to_ascii_lowercase();
                            if !hosts::intersects(&rh, &dns) {
                                continue;
                            }
                            bound_any = true;
                            let domain = hosts::more_specific(&rh, &dns).to_string();
                            let routes = self.vs_routes(vs, port, Some(&gw_name));
                            let entry = table.entry(domain).or_insert_with(|| VHost {
                                require_tls,
                                routes: Vec::new(),
                                catch_alls: Vec::new(),
                                source: Some(registry::source_of(*vs)),
                            });
                            entry.require_tls |= require_tls;
                            // Several VirtualServices for one gateway host are merged; every
                            // catch-all route moves behind the specific ones.
                            for r in routes {
                                if r.matches.is_empty()
                                    || r.matches.iter().any(ir::RouteMatch::is_catch_all)
                                {
                                    entry.catch_alls.push(r);
                                } else {
                                    entry.routes.push(r);
                                }
                            }
                        }
                    }
                }
                if require_tls && !bound_any {
                    for h in &server.hosts {
                        let dns = h
                            .split_once('/')
                            .map(|(_, d)| d)
                            .unwrap_or(h)
                            .to_ascii_lowercase();
                        table.entry(dns).or_insert_with(|| VHost {
                            require_tls,
                            routes: Vec::new(),
                            catch_alls: Vec::new(),
                            source: None,
                        });
                    }
                }
            }
        }
        let route_tables = tables
            .into_iter()
            .map(|(port, vhosts)| {
                let mut virtual_hosts: Vec<ir::VirtualHost> = vhosts
                    .into_iter()
                    .map(|(domain, mut vh)| {
                        vh.routes.append(&mut vh.catch_alls);
                        ir::VirtualHost {
                            name: format!("{domain}:{port}"),
                            domains: vec![domain],
                            require_tls: vh.require_tls,
                            routes: vh.routes,
                            source: vh.source,
                        }
                    })
                    .collect();
                virtual_hosts.sort_by(|a, b| hosts::specificity_cmp(&a.domains[0], &b.domains[0]));
                ir::RouteTable {
                    port,
                    virtual_hosts,
                }
            })
            .collect();
        (
            route_tables,
            listeners.into_values().collect(),
            l4_tables.into_values().collect(),
        )
    }
}

/// How a Gateway server is served, from its protocol (upper case) and TLS mode: the one
/// place the rules document's [`ir::ServerRouting`] is decided.
pub(crate) fn server_routing(protocol: &str, tls_mode: Option<&str>) -> ir::ServerRouting {
    use ir::ServerRouting as R;
    let http = matches!(
        protocol,
        "" | "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "GRPC-WEB"
    );
    match tls_mode {
        Some("PASSTHROUGH") => R::Passthrough,
        Some("AUTO_PASSTHROUGH") => R::AutoPassthrough,
        Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") if http => R::TerminatedHttp,
        Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") => R::TerminatedTcp,
        _ if http => R::Http,
        _ => R::Tcp,
    }
}

/// An Istio TLS version as the hosts serve it: TLS 1.0 and 1.1 are not served (a minimum
/// of either is TLS 1.2, which validation says), `TLS_AUTO` is no limit.
fn tls_version(v: Option<&str>) -> Option<ir::TlsVersion> {
    match v? {
        "TLSV1_0" | "TLSV1_1" | "TLSV1_2" => Some(ir::TlsVersion::Tls12),
        "TLSV1_3" => Some(ir::TlsVersion::Tls13),
        _ => None,
    }
}
