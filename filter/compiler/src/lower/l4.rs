//! Connection-level routes: VirtualService `tcp` and `tls` routes, the default routes of TCP
//! and TLS service ports, and Gateway TCP/TLS servers (PASSTHROUGH, AUTO_PASSTHROUGH, and
//! TLS terminated into `tcp` routes).

use std::collections::BTreeMap;

use meshroute_core::ir;

use super::Lowering;
use crate::api;
use crate::hosts;
use crate::load::Resource;
use crate::registry::Service;
use crate::resolve::{resolve_gateway_name, selects, visible};
use crate::source::FieldPath;

/// Install-time selectors of an L4 match, shared by `tcp` and `tls` matches.
struct Selectors<'a> {
    port: Option<i64>,
    gateways: &'a [String],
    source_labels: &'a api::Labels,
    source_namespace: Option<&'a str>,
}

impl<'a> From<&'a api::L4MatchAttributes> for Selectors<'a> {
    fn from(m: &'a api::L4MatchAttributes) -> Self {
        Self {
            port: m.port,
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_deref(),
        }
    }
}

impl<'a> From<&'a api::TlsMatchAttributes> for Selectors<'a> {
    fn from(m: &'a api::TlsMatchAttributes) -> Self {
        Self {
            port: m.port,
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_deref(),
        }
    }
}

/// Whether a service port carries TLS that the proxy routes on SNI without terminating.
fn is_tls_port(protocol: &str) -> bool {
    matches!(protocol, "TLS" | "HTTPS")
}

impl Lowering<'_> {
    fn selectors_apply(
        &self,
        s: &Selectors<'_>,
        ns: &str,
        port: u16,
        gateway: Option<&str>,
    ) -> bool {
        let gw_ok = if s.gateways.is_empty() {
            true
        } else {
            match gateway {
                None => s.gateways.iter().any(|g| g == "mesh"),
                Some(gw) => s.gateways.iter().any(|g| resolve_gateway_name(g, ns) == gw),
            }
        };
        let labels_ok = gateway.is_some() || selects(s.source_labels, &self.proxy.labels);
        let ns_ok =
            gateway.is_some() || s.source_namespace.is_none_or(|n| n == self.proxy.namespace);
        gw_ok && labels_ok && ns_ok && s.port.is_none_or(|p| p == i64::from(port))
    }

    fn l4_destinations(&self, route: &[api::RouteDestination], ns: &str) -> Vec<ir::Destination> {
        let single = route.len() == 1;
        route
            .iter()
            .filter_map(|d| {
                let dest = d.destination.as_ref()?;
                let weight = if single {
                    100
                } else {
                    u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0)
                };
                (weight > 0).then(|| {
                    let host = hosts::resolve_short_name(&dest.host, ns);
                    ir::Destination {
                        port: self.dest_port(&host, dest.port.as_ref().and_then(|p| p.number)),
                        host,
                        subset: dest.subset.clone(),
                        weight,
                        ..Default::default()
                    }
                })
            })
            .collect()
    }

    fn l4_source(vs: &Resource<api::VirtualService>, kind: &str, i: usize) -> ir::SourceRef {
        ir::SourceRef {
            kind: "VirtualService".into(),
            namespace: vs.namespace.clone(),
            name: vs.name.clone(),
            file: vs.origin.file.to_string(),
            line: vs
                .origin
                .pos(&FieldPath::root().key("spec").key(kind).idx(i))
                .line,
        }
    }

    /// The `tcp` routes of `vs` for a listener port. `identify` is what tells this service's
    /// connections apart on a shared port (its addresses, or its SNI on TLS ports); a match's
    /// own `destinationSubnets` replace the addresses.
    fn tcp_routes(
        &self,
        vs: &Resource<api::VirtualService>,
        port: u16,
        gateway: Option<&str>,
        identify: &ir::L4Match,
    ) -> Vec<ir::L4Route> {
        let mut out = Vec::new();
        for (i, r) in vs.spec.tcp.iter().enumerate() {
            let kept: Vec<&api::L4MatchAttributes> = r
                .matches
                .iter()
                .filter(|m| self.selectors_apply(&(*m).into(), &vs.namespace, port, gateway))
                .collect();
            if !r.matches.is_empty() && kept.is_empty() {
                continue;
            }
            let matches: Vec<ir::L4Match> = if kept.is_empty() {
                vec![identify.clone()]
            } else {
                kept.iter()
                    .map(|m| ir::L4Match {
                        sni_hosts: identify.sni_hosts.clone(),
                        destination_subnets: if m.destination_subnets.is_empty() {
                            identify.destination_subnets.clone()
                        } else {
                            m.destination_subnets.clone()
                        },
                    })
                    .collect()
            };
            let destinations = self.l4_destinations(&r.route, &vs.namespace);
            if destinations.is_empty() {
                continue;
            }
            out.push(ir::L4Route {
                name: format!("{}/{} tcp[{i}]", vs.namespace, vs.name),
                matches: matches.into_iter().filter(|m| !is_any(m)).collect(),
                destinations,
                source: Some(Self::l4_source(vs, "tcp", i)),
            });
        }
        out
    }

    /// The `tls` routes of `vs` for a listener port; `allowed` narrows each SNI to the hosts
    /// a gateway server accepts (`None`: any).
    fn tls_routes(
        &self,
        vs: &Resource<api::VirtualService>,
        port: u16,
        gateway: Option<&str>,
        allowed: Option<&[String]>,
    ) -> Vec<ir::L4Route> {
        let mut out = Vec::new();
        for (i, r) in vs.spec.tls.iter().enumerate() {
            let mut matches = Vec::new();
            for m in &r.matches {
                if !self.selectors_apply(&m.into(), &vs.namespace, port, gateway) {
                    continue;
                }
                let mut sni: Vec<String> = Vec::new();
                for h in &m.sni_hosts {
                    let h = h.to_ascii_lowercase();
                    match allowed {
                        None => sni.push(h),
                        Some(server_hosts) => {
                            for s in server_hosts {
                                if hosts::intersects(&h, s) {
                                    let narrowed = hosts::more_specific(&h, s).to_owned();
                                    if !sni.contains(&narrowed) {
                                        sni.push(narrowed);
                                    }
                                }
                            }
                        }
                    }
                }
                if sni.is_empty() {
                    continue;
                }
                matches.push(ir::L4Match {
                    sni_hosts: sni,
                    destination_subnets: m.destination_subnets.clone(),
                });
            }
            if matches.is_empty() {
                continue;
            }
            let destinations = self.l4_destinations(&r.route, &vs.namespace);
            if destinations.is_empty() {
                continue;
            }
            out.push(ir::L4Route {
                name: format!("{}/{} tls[{i}]", vs.namespace, vs.name),
                matches,
                destinations,
                source: Some(Self::l4_source(vs, "tls", i)),
            });
        }
        out
    }

    /// Sidecar: one table per TCP or TLS service port. A service's connections are told apart
    /// by its addresses, or on TLS ports by its host as SNI; a VirtualService claiming the host
    /// replaces the default route with its `tls` (TLS ports) or `tcp` routes.
    pub(super) fn sidecar_l4(
        &mut self,
        vss: &[&Resource<api::VirtualService>],
    ) -> Vec<ir::L4Table> {
        let mut tables: BTreeMap<u16, Vec<ir::L4Route>> = BTreeMap::new();
        let services = self.services.clone();
        for svc in &services {
            let best_vs = vss
                .iter()
                .filter(|vs| {
                    vs.spec.hosts.iter().any(|h| {
                        hosts::matches(&hosts::resolve_short_name(h, &vs.namespace), &svc.host)
                    })
                })
                .min_by(|a, b| {
                    let spec = |vs: &Resource<api::VirtualService>| {
                        vs.spec
                            .hosts
                            .iter()
                            .map(|h| hosts::resolve_short_name(h, &vs.namespace))
                            .filter(|h| hosts::matches(h, &svc.host))
                            .min_by(|x, y| hosts::specificity_cmp(x, y))
                            .unwrap_or_default()
                    };
                    hosts::specificity_cmp(&spec(a), &spec(b))
                });
            let served: Vec<_> = svc
                .ports
                .iter()
                .filter(|p| {
                    !p.is_http()
                        && self
                            .scope
                            .imports_on_port(&svc.namespace, &svc.host, p.number)
                })
                .collect();
            for port in served {
                let tls = is_tls_port(&port.protocol);
                let identify = identify(svc, tls);
                let mut routes = Vec::new();
                if let Some(vs) = best_vs {
                    if tls {
                        routes = self.tls_routes(vs, port.number, None, None);
                    }
                    if routes.is_empty() {
                        routes = self.tcp_routes(vs, port.number, None, &identify);
                    }
                }
                if routes.is_empty() {
                    routes.push(ir::L4Route {
                        name: format!("{}:{}", svc.host, port.number),
                        matches: if is_any(&identify) {
                            Vec::new()
                        } else {
                            vec![identify]
                        },
                        destinations: vec![ir::Destination {
                            host: svc.host.clone(),
                            port: Some(port.number),
                            weight: 100,
                            ..Default::default()
                        }],
                        source: Some(svc.source.clone()),
                    });
                }
                tables.entry(port.number).or_default().extend(routes);
            }
        }
        tables
            .into_iter()
            .map(|(port, mut routes)| {
                // Routes that single out their service go before the ones that take any
                // connection on the port; among equals, registry order stands.
                routes.sort_by_key(|r| r.matches.is_empty());
                ir::L4Table {
                    port,
                    auto_passthrough: false,
                    routes,
                }
            })
            .collect()
    }

    /// Gateway: the table of one TCP/TLS server port, from the VirtualServices bound to the
    /// server: `tls` routes on the SNI for PASSTHROUGH servers, `tcp` routes for TCP servers
    /// and TLS servers that terminate.
    pub(super) fn gateway_l4(
        &mut self,
        gw: &Resource<api::Gateway>,
        server_index: usize,
        routing: ir::ServerRouting,
        port: u16,
        vss: &[&Resource<api::VirtualService>],
        table: &mut ir::L4Table,
    ) {
        let server = &gw.spec.servers[server_index];
        match routing {
            ir::ServerRouting::Http | ir::ServerRouting::TerminatedHttp => return,
            ir::ServerRouting::AutoPassthrough => {
                // The SNI names the cluster.
                table.auto_passthrough = true;
                return;
            }
            ir::ServerRouting::Passthrough
            | ir::ServerRouting::TerminatedTcp
            | ir::ServerRouting::Tcp => {}
        }
        let gw_name = format!("{}/{}", gw.namespace, gw.name);
        // Server hosts without their namespace part, with the namespace filter kept aside.
        let server_hosts: Vec<(String, String)> = server
            .hosts
            .iter()
            .map(|h| match h.split_once('/') {
                Some((n, d)) => (n.to_owned(), d.to_ascii_lowercase()),
                None => ("*".to_owned(), h.to_ascii_lowercase()),
            })
            .collect();
        for vs in vss {
            if !vs
                .spec
                .gateways
                .iter()
                .any(|g| resolve_gateway_name(g, &vs.namespace) == gw_name)
                || !visible(&vs.spec.export_to, &vs.namespace, &gw.namespace)
            {
                continue;
            }
            let allowed: Vec<String> = server_hosts
                .iter()
                .filter(|(n, _)| match n.as_str() {
                    "*" => true,
                    "." => vs.namespace == gw.namespace,
                    n => vs.namespace == n,
                })
                .filter(|(_, d)| {
                    vs.spec
                        .hosts
                        .iter()
                        .any(|h| hosts::intersects(&hosts::resolve_short_name(h, &vs.namespace), d))
                })
                .map(|(_, d)| d.clone())
                .collect();
            if allowed.is_empty() {
                continue;
            }
            let routes = if routing == ir::ServerRouting::Passthrough {
                self.tls_routes(vs, port, Some(&gw_name), Some(&allowed))
            } else {
                self.tcp_routes(vs, port, Some(&gw_name), &ir::L4Match::default())
            };
            table.routes.extend(routes);
        }
    }
}

/// What singles out a service's connections on a shared port.
fn identify(svc: &Service, tls: bool) -> ir::L4Match {
    ir::L4Match {
        sni_hosts: if tls && svc.addresses.is_empty() {
            vec![svc.host.clone()]
        } else {
            Vec::new()
        },
        destination_subnets: svc.addresses.clone(),
    }
}

fn is_any(m: &ir::L4Match) -> bool {
    m.sni_hosts.is_empty() && m.destination_subnets.is_empty()
}
