//! Resolution for one proxy identity and lowering to the rules document.
//!
//! Istio configuration is per proxy: which objects a proxy sees depends on its namespace,
//! labels and kind (sidecar or gateway). This module decides visibility (exportTo, Sidecar
//! scope, gateway binding), picks VirtualServices and DestinationRules the way istiod does and
//! writes the precomputed rules document.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use meshroute_core::ir::{self, ProxyKind};

use crate::api;
use crate::diag::{Diagnostic, Severity};
use crate::duration;
use crate::hosts;
use crate::load::{Config, Resource};
use crate::registry::{self, Resolution, Service, ServicePort};
use crate::source::FieldPath;
use crate::validate::GRPC_CODES;

mod l4;

/// Who the document is compiled for.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub kind: ProxyKind,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone` (empty: unknown; locality balancing then has no effect).
    pub locality: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            kind: ProxyKind::Sidecar,
            namespace: "default".into(),
            labels: BTreeMap::new(),
            locality: String::new(),
        }
    }
}

/// Mesh-wide settings (MeshConfig) that change the outcome.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub outbound_traffic_policy: ir::OutboundPolicy,
    pub root_namespace: String,
    pub connect_timeout_ms: u64,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            outbound_traffic_policy: ir::OutboundPolicy::AllowAny,
            root_namespace: "istio-system".into(),
            connect_timeout_ms: 10_000,
        }
    }
}

/// Istio's built-in retry policy for routes without `retries` (RETRY DefaultPolicy).
pub fn default_retry_policy() -> ir::RetryPolicy {
    ir::RetryPolicy {
        num_retries: 2,
        per_try_timeout_ms: None,
        retry_on: [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        retriable_status_codes: Vec::new(),
        backoff_base_ms: None,
        avoid_previous_hosts: true,
        retry_remote_localities: false,
    }
}

fn visible(export_to: &[String], owner_ns: &str, client_ns: &str) -> bool {
    if export_to.is_empty() {
        return true;
    }
    export_to.iter().any(|e| match e.as_str() {
        "*" => true,
        "." => owner_ns == client_ns,
        "~" => false,
        ns => ns == client_ns,
    })
}

fn selects(selector: &api::Labels, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One egress host of a Sidecar: `ns/dnsName`, possibly excluded with `~`.
struct EgressHost {
    namespace: String,
    dns: String,
    exclude: bool,
}

/// What a sidecar proxy imports.
struct Scope {
    egress: Option<Vec<EgressHost>>,
}

impl Scope {
    fn all() -> Self {
        Self { egress: None }
    }

    fn ns_ok(filter: &str, ns: &str) -> bool {
        filter == "*" || filter == ns
    }

    fn imports_host(&self, ns: &str, host: &str) -> bool {
        let Some(egress) = &self.egress else {
            return true;
        };
        let hit = |e: &EgressHost| Self::ns_ok(&e.namespace, ns) && hosts::intersects(&e.dns, host);
        egress.iter().any(|e| !e.exclude && hit(e)) && !egress.iter().any(|e| e.exclude && hit(e))
    }
}

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
}

/// Lowers `config` for one proxy. Returns the document and warnings.
pub fn lower(
    config: &Config,
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> (ir::RulesDocument, Vec<Diagnostic>) {
    let mut l = Lowering {
        config,
        proxy,
        mesh,
        services: Vec::new(),
        by_host: HashMap::new(),
        diags: Vec::new(),
        warned: BTreeSet::new(),
    };
    let all = registry::build(config);
    let mut outbound = mesh.outbound_traffic_policy;
    let scope = if proxy.kind == ProxyKind::Sidecar {
        let (scope, policy) = l.sidecar_scope();
        if let Some(p) = policy {
            outbound = p;
        }
        scope
    } else {
        Scope::all()
    };
    for svc in all {
        if visible(&svc.export_to, &svc.namespace, &proxy.namespace)
            && scope.imports_host(&svc.namespace, &svc.host)
        {
            let idx = l.services.len();
            l.by_host.entry(svc.host.clone()).or_default().push(idx);
            l.services.push(svc);
        }
    }
    let (route_tables, listeners, l4_tables) = match proxy.kind {
        ProxyKind::Sidecar => {
            let vss = l.sidecar_vss(&scope);
            let l4 = l.sidecar_l4(&vss);
            (l.sidecar_routes(&vss), Vec::new(), l4)
        }
        ProxyKind::Gateway => l.gateway_routes(),
    };
    let clusters = l.clusters();
    l.reject_istio_mutual(&clusters);
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
        },
        outbound_traffic_policy: outbound,
        route_tables,
        clusters,
        listeners,
        l4_tables,
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

    /// Picks the Sidecar resource for this workload and turns it into a scope.
    fn sidecar_scope(&mut self) -> (Scope, Option<ir::OutboundPolicy>) {
        let ns = &self.proxy.namespace;
        let mut sidecars: Vec<&Resource<api::Sidecar>> = self.config.sidecars.iter().collect();
        sidecars.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let chosen = sidecars
            .iter()
            .find(|s| {
                &s.namespace == ns
                    && s.spec
                        .workload_selector
                        .as_ref()
                        .is_some_and(|w| selects(&w.labels, &self.proxy.labels))
            })
            .or_else(|| {
                sidecars
                    .iter()
                    .find(|s| &s.namespace == ns && s.spec.workload_selector.is_none())
            })
            .or_else(|| {
                sidecars.iter().find(|s| {
                    s.namespace == self.mesh.root_namespace && s.spec.workload_selector.is_none()
                })
            });
        let Some(sc) = chosen else {
            return (Scope::all(), None);
        };
        let policy = sc
            .spec
            .outbound_traffic_policy
            .as_ref()
            .map(|o| match o.mode.as_deref() {
                Some("REGISTRY_ONLY") => ir::OutboundPolicy::RegistryOnly,
                _ => ir::OutboundPolicy::AllowAny,
            });
        if sc.spec.egress.is_empty() {
            return (Scope::all(), policy);
        }
        let mut egress = Vec::new();
        for e in &sc.spec.egress {
            for h in &e.hosts {
                let Some((nsf, dns)) = h.split_once('/') else {
                    continue;
                };
                let (exclude, nsf) = match nsf.strip_prefix('~') {
                    Some(rest) => (true, rest),
                    None => (false, nsf),
                };
                let namespace = if nsf == "." {
                    ns.clone()
                } else {
                    nsf.to_string()
                };
                egress.push(EgressHost {
                    namespace,
                    dns: dns.to_ascii_lowercase(),
                    exclude,
                });
            }
        }
        (
            Scope {
                egress: Some(egress),
            },
            policy,
        )
    }

    fn service(&self, host: &str) -> Option<&Service> {
        // When several namespaces define the host, the oldest definition (first loaded) wins.
        self.by_host
            .get(host)
            .and_then(|v| v.first())
            .map(|i| &self.services[*i])
    }

    // === Sidecar ===

    /// The VirtualServices a sidecar sees, in the order istiod applies them.
    fn sidecar_vss(&self, scope: &Scope) -> Vec<&'a Resource<api::VirtualService>> {
        let ns = &self.proxy.namespace;
        let mut vss: Vec<&Resource<api::VirtualService>> = self
            .config
            .virtual_services
            .iter()
            .filter(|vs| !vs.spec.hosts.is_empty())
            .filter(|vs| {
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh")
            })
            .filter(|vs| visible(&vs.spec.export_to, &vs.namespace, ns))
            .filter(|vs| {
                vs.spec.hosts.iter().any(|h| {
                    scope.imports_host(&vs.namespace, &hosts::resolve_short_name(h, &vs.namespace))
                })
            })
            .collect();
        // Private (same namespace, exportTo ".") first, then by age (oldest wins).
        vss.sort_by(|a, b| {
            let private = |v: &Resource<api::VirtualService>| {
                !(v.namespace == *ns && v.spec.export_to.iter().any(|e| e == "."))
            };
            (private(a), a.age_key()).cmp(&(private(b), b.age_key()))
        });
        vss
    }

    fn sidecar_routes(&mut self, vss: &[&Resource<api::VirtualService>]) -> Vec<ir::RouteTable> {
        let ns = self.proxy.namespace.clone();

        // Index the claimed hosts once: exact names by value, wildcards most specific first.
        let mut exact_hosts: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard_hosts: Vec<(String, usize)> = Vec::new();
        for (vi, vs) in vss.iter().enumerate() {
            for h in &vs.spec.hosts {
                let rh = hosts::resolve_short_name(h, &vs.namespace);
                if hosts::is_wildcard(&rh) {
                    wildcard_hosts.push((rh, vi));
                } else {
                    exact_hosts.entry(rh).or_default().push(vi);
                }
            }
        }
        // Stable sort keeps age order among equally specific wildcards.
        wildcard_hosts.sort_by(|a, b| hosts::specificity_cmp(&a.0, &b.0));

        // For every visible service, the most specific claiming VirtualService host.
        let mut tables: BTreeMap<u16, Vec<ir::VirtualHost>> = BTreeMap::new();
        let services = self.services.clone();
        for svc in &services {
            // Exact host beats any wildcard; among equals the oldest (first) wins.
            let best_vs = exact_hosts
                .get(svc.host.as_str())
                .and_then(|v| v.first().copied())
                .or_else(|| {
                    wildcard_hosts
                        .iter()
                        .find(|(h, _)| hosts::matches(h, &svc.host))
                        .map(|(_, vi)| *vi)
                });
            for port in svc.ports.iter().filter(|p| p.is_http()) {
                let name = format!("{}:{}", svc.host, port.number);
                let (routes, source) = match best_vs {
                    Some(vi) => {
                        let vs = vss[vi];
                        (
                            self.vs_routes(vs, port.number, None),
                            Some(registry::source_of(vs)),
                        )
                    }
                    None => (vec![self.default_route(svc, port)], None),
                };
                tables
                    .entry(port.number)
                    .or_default()
                    .push(ir::VirtualHost {
                        name,
                        domains: svc.aliases(&ns),
                        require_tls: false,
                        routes,
                        source,
                    });
            }
        }
        // VirtualService hosts that name no registry service live on port 80 only.
        let mut seen_domains: BTreeSet<String> = BTreeSet::new();
        for vs in vss {
            let mut domains = Vec::new();
            for (hi, h) in vs.spec.hosts.iter().enumerate() {
                let rh = hosts::resolve_short_name(h, &vs.namespace);
                if self.by_host.contains_key(&rh) {
                    continue;
                }
                if !seen_domains.insert(rh.clone()) {
                    self.warn(vs, &FieldPath::root().key("spec").key("hosts").idx(hi), format!("host {h:?} is already claimed by an older VirtualService; this one is ignored for it"));
                    continue;
                }
                if !hosts::is_wildcard(&rh) {
                    self.warn(vs, &FieldPath::root().key("spec").key("hosts").idx(hi), format!("host {h:?} matches no service in the registry; it is routed on port 80 only"));
                }
                domains.push(rh);
            }
            if domains.is_empty() {
                continue;
            }
            let routes = self.vs_routes(vs, 80, None);
            tables.entry(80).or_default().push(ir::VirtualHost {
                name: format!("{}:80", domains.join(",")),
                domains,
                require_tls: false,
                routes,
                source: Some(registry::source_of(vs)),
            });
        }
        tables
            .into_iter()
            .map(|(port, virtual_hosts)| ir::RouteTable {
                port,
                virtual_hosts,
            })
            .collect()
    }

    fn default_route(&self, svc: &Service, port: &ServicePort) -> ir::Route {
        ir::Route {
            name: "default".into(),
            action: ir::Action::Route(ir::RouteAction {
                destinations: vec![ir::Destination {
                    host: svc.host.clone(),
                    port: Some(port.number),
                    weight: 100,
                    ..Default::default()
                }],
                rewrite: None,
            }),
            retry: Some(default_retry_policy()),
            ..Default::default()
        }
    }

    // === Gateway ===

    fn gateway_routes(&mut self) -> (Vec<ir::RouteTable>, Vec<ir::Listener>, Vec<ir::L4Table>) {
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
                        }),
                });
                if server.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL") {
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
                                if r.matches.is_empty() || r.matches.iter().any(is_catch_all_ir) {
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

    // === Routes ===

    /// Translates the HTTP routes of `vs` for a listener port; `gateway` is `ns/name` for
    /// gateway proxies (None = the mesh).
    fn vs_routes(
        &mut self,
        vs: &Resource<api::VirtualService>,
        port: u16,
        gateway: Option<&str>,
    ) -> Vec<ir::Route> {
        let mut out = Vec::new();
        let spec_path = FieldPath::root().key("spec");
        for (i, route) in vs.spec.http.iter().enumerate() {
            let rpath = spec_path.key("http").idx(i);
            let line = vs.origin.pos(&rpath).line;
            let source = ir::SourceRef {
                kind: "VirtualService".into(),
                namespace: vs.namespace.clone(),
                name: vs.name.clone(),
                file: vs.origin.file.to_string(),
                line,
            };
            if let Some(delegate) = &route.delegate {
                let dns = if delegate.namespace.is_empty() {
                    vs.namespace.clone()
                } else {
                    delegate.namespace.clone()
                };
                let found = self.config.virtual_services.iter().find(|d| {
                    d.name == delegate.name && d.namespace == dns && d.spec.hosts.is_empty()
                });
                let Some(dvs) = found else {
                    self.warn(vs, &rpath.key("delegate"), format!("delegate VirtualService {dns}/{} not found; its routes are missing (404)", delegate.name));
                    continue;
                };
                if !visible(&dvs.spec.export_to, &dvs.namespace, &vs.namespace) {
                    self.warn(
                        vs,
                        &rpath.key("delegate"),
                        format!(
                            "delegate VirtualService {dns}/{} is not exported to namespace {}",
                            delegate.name, vs.namespace
                        ),
                    );
                    continue;
                }
                for (j, droute) in dvs.spec.http.iter().enumerate() {
                    let Some(merged) = merge_delegate(route, droute) else {
                        self.warn(
                            dvs,
                            &spec_path.key("http").idx(j),
                            "route conflicts with the root VirtualService match and is dropped",
                        );
                        continue;
                    };
                    let dsource = ir::SourceRef {
                        kind: "VirtualService".into(),
                        namespace: dvs.namespace.clone(),
                        name: dvs.name.clone(),
                        file: dvs.origin.file.to_string(),
                        line: dvs.origin.pos(&spec_path.key("http").idx(j)).line,
                    };
                    if let Some(r) =
                        self.translate_route(&merged, &dvs.namespace, port, gateway, dsource)
                    {
                        out.push(r);
                    }
                }
                continue;
            }
            if let Some(r) = self.translate_route(route, &vs.namespace, port, gateway, source) {
                out.push(r);
            }
        }
        out
    }

    fn translate_route(
        &mut self,
        route: &api::HttpRoute,
        ns: &str,
        port: u16,
        gateway: Option<&str>,
        source: ir::SourceRef,
    ) -> Option<ir::Route> {
        let proxy = self.proxy;
        // Install-time selectors: gateways, sourceLabels, sourceNamespace, port.
        let applies = |m: &api::HttpMatchRequest| {
            let gw_ok = if m.gateways.is_empty() {
                true
            } else {
                match gateway {
                    None => m.gateways.iter().any(|g| g == "mesh"),
                    Some(gw) => m.gateways.iter().any(|g| resolve_gateway_name(g, ns) == gw),
                }
            };
            let labels_ok = gateway.is_some() || selects(&m.source_labels, &proxy.labels);
            let ns_ok = gateway.is_some()
                || m.source_namespace
                    .as_ref()
                    .is_none_or(|s| *s == proxy.namespace);
            let port_ok = m.port.is_none_or(|p| p == i64::from(port));
            gw_ok && labels_ok && ns_ok && port_ok
        };
        let matches: Vec<ir::RouteMatch> = if route.matches.is_empty() {
            Vec::new()
        } else {
            let kept: Vec<ir::RouteMatch> = route
                .matches
                .iter()
                .filter(|m| applies(m))
                .map(translate_match)
                .collect();
            if kept.is_empty() {
                return None;
            }
            kept
        };
        let mut request_headers = ir::HeaderOps::default();
        let mut response_headers = ir::HeaderOps::default();
        let mut route_authority = None;
        if let Some(h) = &route.headers {
            route_authority = header_ops(h, &mut request_headers, &mut response_headers);
        }
        let action = if let Some(r) = &route.redirect {
            let status = r.redirect_code.unwrap_or(301);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return None;
            }
            ir::Action::Redirect(ir::Redirect {
                uri: r.uri.clone(),
                prefix_rewrite: r.prefix_rewrite.clone(),
                authority: r.authority.clone(),
                scheme: r.scheme.clone(),
                port: match (r.port, r.derive_port.as_deref()) {
                    (Some(p), _) => u16::try_from(p).ok().map(ir::RedirectPort::Number),
                    (None, Some("FROM_REQUEST_PORT")) => Some(ir::RedirectPort::FromRequestPort),
                    _ => None,
                },
                status: u16::try_from(status).unwrap_or(301),
            })
        } else if let Some(d) = &route.direct_response {
            let body = d.body.as_ref().and_then(|b| match (&b.string, &b.bytes) {
                (Some(s), _) => {
                    Some(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
                }
                (None, Some(bytes)) => Some(bytes.clone()),
                _ => None,
            });
            ir::Action::DirectResponse(ir::DirectResponse {
                status: d.status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                body,
            })
        } else {
            let single = route.route.len() == 1;
            let mut destinations = Vec::new();
            for d in &route.route {
                let Some(dest) = &d.destination else { continue };
                let weight = if single {
                    100
                } else {
                    u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0)
                };
                if weight == 0 {
                    continue;
                }
                let mut dreq = ir::HeaderOps::default();
                let mut dresp = ir::HeaderOps::default();
                let mut dest_authority = None;
                if let Some(h) = &d.headers {
                    dest_authority = header_ops(h, &mut dreq, &mut dresp);
                }
                // Route-level authority wins; the destination's applies when the route sets none.
                if let Some(a) = dest_authority {
                    if route_authority.is_none()
                        && route
                            .rewrite
                            .as_ref()
                            .and_then(|r| r.authority.as_ref())
                            .is_none()
                    {
                        dreq.set.push((":authority".into(), a));
                    }
                }
                let host = hosts::resolve_short_name(&dest.host, ns);
                destinations.push(ir::Destination {
                    port: self.dest_port(&host, dest.port.as_ref().and_then(|p| p.number)),
                    host,
                    subset: dest.subset.clone(),
                    weight,
                    request_headers: dreq,
                    response_headers: dresp,
                });
            }
            if destinations.is_empty() {
                return None;
            }
            let mut rewrite = route.rewrite.as_ref().map(|rw| ir::Rewrite {
                uri: rw.uri.clone(),
                uri_regex: rw.uri_regex_rewrite.as_ref().map(|r| ir::RegexRewrite {
                    pattern: r.pattern.clone(),
                    substitution: r.rewrite.clone(),
                }),
                authority: rw.authority.clone(),
            });
            if let Some(a) = route_authority {
                rewrite
                    .get_or_insert_with(ir::Rewrite::default)
                    .authority
                    .get_or_insert(a);
            }
            ir::Action::Route(ir::RouteAction {
                destinations,
                rewrite,
            })
        };
        let is_forward = matches!(action, ir::Action::Route(_));
        let timeout_ms = route
            .timeout
            .as_deref()
            .and_then(|t| duration::parse_ms(t).ok())
            .filter(|t| *t > 0);
        let retry = if !is_forward {
            None
        } else {
            match &route.retries {
                None => Some(default_retry_policy()),
                Some(r) if r.attempts.unwrap_or(0) <= 0 => None,
                Some(r) => {
                    let mut policy = ir::RetryPolicy {
                        num_retries: u32::try_from(r.attempts.unwrap_or(0)).unwrap_or(0),
                        per_try_timeout_ms: r
                            .per_try_timeout
                            .as_deref()
                            .and_then(|t| duration::parse_ms(t).ok()),
                        retry_on: Vec::new(),
                        retriable_status_codes: Vec::new(),
                        backoff_base_ms: r
                            .backoff
                            .as_deref()
                            .and_then(|t| duration::parse_ms(t).ok()),
                        avoid_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
                        retry_remote_localities: r.retry_remote_localities.unwrap_or(false),
                    };
                    match r.retry_on.as_deref() {
                        None => policy.retry_on = default_retry_policy().retry_on,
                        Some(on) => {
                            for tok in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                                if let Ok(code) = tok.parse::<u16>() {
                                    policy.retriable_status_codes.push(code);
                                } else if !policy.retry_on.iter().any(|x| x == tok) {
                                    policy.retry_on.push(tok.to_string());
                                }
                            }
                            if !policy.retriable_status_codes.is_empty()
                                && !policy
                                    .retry_on
                                    .iter()
                                    .any(|x| x == "retriable-status-codes")
                            {
                                policy.retry_on.push("retriable-status-codes".into());
                            }
                        }
                    }
                    Some(policy)
                }
            }
        };
        let fault = route.fault.as_ref().map(|f| ir::Fault {
            delay: f.delay.as_ref().and_then(|d| {
                let delay_ms = duration::parse_ms(d.fixed_delay.as_deref()?).ok()?;
                let pct = match (&d.percentage, d.percent) {
                    (Some(p), _) => p.value,
                    (None, Some(p)) => p as f64,
                    (None, None) => 0.0,
                };
                Some(ir::FaultDelay {
                    delay_ms,
                    per_million: per_million(pct),
                })
            }),
            abort: f.abort.as_ref().and_then(|a| {
                let pct = a.percentage.as_ref().map_or(0.0, |p| p.value);
                Some(ir::FaultAbort {
                    http_status: a.http_status.and_then(|s| u16::try_from(s).ok()),
                    grpc_status: a
                        .grpc_status
                        .as_ref()
                        .and_then(|g| GRPC_CODES.iter().position(|c| c == g))
                        .and_then(|i| u32::try_from(i).ok()),
                    per_million: per_million(pct),
                })
                .filter(|a| a.http_status.is_some() || a.grpc_status.is_some())
            }),
        });
        let mut mirrors = Vec::new();
        if let Some(m) = &route.mirror {
            let pct = match (&route.mirror_percentage, route.mirror_percent) {
                (Some(p), _) => p.value,
                (None, Some(p)) => p as f64,
                (None, None) => 100.0,
            };
            mirrors.push(self.mirror(m, ns, pct));
        }
        for m in &route.mirrors {
            if let Some(d) = &m.destination {
                mirrors.push(self.mirror(d, ns, m.percentage.as_ref().map_or(100.0, |p| p.value)));
            }
        }
        mirrors.retain(|m| m.per_million > 0);
        let cors = route.cors_policy.as_ref().map(|c| ir::CorsPolicy {
            allow_origins: c
                .allow_origin
                .iter()
                .map(|o| ir::StringMatch::Exact(o.clone()))
                .chain(c.allow_origins.iter().filter_map(string_match))
                .collect(),
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age_s: c
                .max_age
                .as_deref()
                .and_then(|m| duration::parse_ms(m).ok())
                .map(|ms| ms / 1000),
            allow_credentials: c.allow_credentials,
            ignore_unmatched_preflights: c.unmatched_preflights.as_deref() == Some("IGNORE"),
        });
        Some(ir::Route {
            name: route.name.clone(),
            matches,
            action,
            request_headers,
            response_headers,
            cors,
            fault: fault.filter(|f| f.delay.is_some() || f.abort.is_some()),
            mirrors,
            timeout_ms,
            retry,
            source: Some(source),
        })
    }

    fn mirror(&self, d: &api::Destination, ns: &str, pct: f64) -> ir::Mirror {
        let host = hosts::resolve_short_name(&d.host, ns);
        ir::Mirror {
            port: self.dest_port(&host, d.port.as_ref().and_then(|p| p.number)),
            host,
            subset: d.subset.clone(),
            per_million: per_million(pct),
        }
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

    // === Clusters ===

    fn clusters(&self) -> Vec<ir::Cluster> {
        let mut out = Vec::new();
        let services = &self.services;
        let dr_index = DrIndex::new(self.config, &self.proxy.namespace, &self.proxy.labels);
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for svc in services {
            if seen.contains(&svc.host) {
                continue;
            }
            seen.insert(svc.host.clone());
            let dr = self.destination_rule(&dr_index, svc);
            for port in &svc.ports {
                let base = dr.as_ref().and_then(|d| d.policy.clone());
                let policy = port_policy(base.as_ref(), port.number);
                out.push(self.cluster(svc, port, "", &BTreeMap::new(), &policy));
                if let Some(dr) = &dr {
                    for subset in &dr.subsets {
                        let merged = subset_policy(
                            base.as_ref(),
                            subset.traffic_policy.as_ref(),
                            port.number,
                        );
                        out.push(self.cluster(svc, port, &subset.name, &subset.labels, &merged));
                    }
                }
            }
        }
        out
    }

    fn cluster(
        &self,
        svc: &Service,
        port: &ServicePort,
        subset: &str,
        labels: &api::Labels,
        policy: &Blocks,
    ) -> ir::Cluster {
        let endpoints: Vec<ir::Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| selects(labels, &e.labels))
            .map(|e| ir::Endpoint {
                address: e.address.clone(),
                port: Service::endpoint_port(e, port),
                weight: e.weight,
                labels: e.labels.clone(),
                locality: e.locality.clone(),
            })
            .collect();
        let discovery = match svc.resolution {
            Resolution::None => ir::Discovery::OriginalDst,
            Resolution::Dns => ir::Discovery::Dns,
            Resolution::Static => ir::Discovery::Static,
        };
        let cp = policy.connection_pool.as_ref();
        let tcp = cp.and_then(|c| c.tcp.as_ref());
        let http = cp.and_then(|c| c.http.as_ref());
        let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        let ms = |v: Option<&String>| v.and_then(|d| duration::parse_ms(d).ok());
        ir::Cluster {
            name: ir::cluster_name(port.number, subset, &svc.host),
            service: svc.host.clone(),
            port: port.number,
            subset: subset.to_string(),
            discovery,
            endpoints,
            protocol: ir::Protocol::parse(&port.protocol).unwrap_or_default(),
            connect_timeout_ms: ms(tcp.and_then(|t| t.connect_timeout.as_ref()))
                .unwrap_or(self.mesh.connect_timeout_ms),
            lb: load_balancer(policy.load_balancer.as_ref()),
            connection_pool: ir::ConnectionPool {
                max_connections: n(tcp.and_then(|t| t.max_connections)),
                http1_max_pending_requests: n(http.and_then(|h| h.http1_max_pending_requests)),
                http2_max_requests: n(http.and_then(|h| h.http2_max_requests)),
                max_requests_per_connection: n(http.and_then(|h| h.max_requests_per_connection)),
                max_retries: n(http.and_then(|h| h.max_retries)),
                idle_timeout_ms: ms(http.and_then(|h| h.idle_timeout.as_ref()))
                    .or_else(|| ms(tcp.and_then(|t| t.idle_timeout.as_ref()))),
                tcp_idle_timeout_ms: ms(tcp.and_then(|t| t.idle_timeout.as_ref())),
                max_connection_duration_ms: ms(tcp.and_then(|t| t.max_connection_duration.as_ref())),
                max_concurrent_streams: http
                    .and_then(|h| h.max_concurrent_streams)
                    .and_then(|v| u32::try_from(v).ok()),
                h2_upgrade: http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE"),
            },
            outlier_detection: policy.outlier_detection.as_ref().map(|o| {
                let c5 = o
                    .consecutive_5xx_errors
                    .or(o.consecutive_errors)
                    .unwrap_or(5);
                ir::OutlierDetection {
                    consecutive_5xx: u32::try_from(c5).ok().filter(|v| *v > 0),
                    consecutive_gateway_errors: o
                        .consecutive_gateway_errors
                        .and_then(|v| u32::try_from(v).ok())
                        .filter(|v| *v > 0),
                    consecutive_local_origin_failures: if o.split_external_local_origin_errors
                        == Some(true)
                    {
                        Some(
                            o.consecutive_local_origin_failures
                                .and_then(|v| u32::try_from(v).ok())
                                .unwrap_or(5),
                        )
                    } else {
                        None
                    },
                    split_external_local_origin_errors: o.split_external_local_origin_errors
                        == Some(true),
                    interval_ms: ms(o.interval.as_ref()).unwrap_or(10_000),
                    base_ejection_time_ms: ms(o.base_ejection_time.as_ref()).unwrap_or(30_000),
                    max_ejection_percent: o
                        .max_ejection_percent
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(10),
                    min_health_percent: o
                        .min_health_percent
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(0),
                }
            }),
            tls: policy
                .tls
                .as_ref()
                .and_then(|t| {
                    let mode = match t.mode.as_deref()? {
                        "SIMPLE" => ir::ClientTlsMode::Simple,
                        "MUTUAL" => ir::ClientTlsMode::Mutual,
                        "ISTIO_MUTUAL" => ir::ClientTlsMode::IstioMutual,
                        _ => return None,
                    };
                    Some((t, mode))
                })
                .map(|(t, mode)| ir::ClientTls {
                    mode,
                    sni: t.sni.clone(),
                    subject_alt_names: t.subject_alt_names.clone(),
                    ca_certificates: t.ca_certificates.clone(),
                    client_certificate: t.client_certificate.clone(),
                    private_key: t.private_key.clone(),
                    insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
                    credential_name: t.credential_name.clone(),
                }),
            source: Some(svc.source.clone()),
        }
    }

    /// DestinationRule lookup: client namespace → service namespace → root namespace; within a
    /// namespace the most specific host wins; DRs for the same host in one namespace merge.
    fn destination_rule(&self, index: &DrIndex<'_>, svc: &Service) -> Option<MergedRule> {
        let client = &self.proxy.namespace;
        let tiers = [
            client.as_str(),
            svc.namespace.as_str(),
            self.mesh.root_namespace.as_str(),
        ];
        for ns in tiers {
            let Some(in_ns) = index.by_namespace.get(ns) else {
                continue;
            };
            let exact = in_ns
                .exact
                .get(svc.host.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let wild = in_ns
                .wildcard
                .iter()
                .filter(|(_, h)| hosts::matches(h, &svc.host));
            let mut candidates: Vec<(&Resource<api::DestinationRule>, String)> = exact
                .iter()
                .map(|d| (*d, svc.host.clone()))
                .chain(wild.map(|(d, h)| (*d, h.clone())))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            candidates.sort_by(|a, b| {
                hosts::specificity_cmp(&a.1, &b.1).then_with(|| a.0.age_key().cmp(&b.0.age_key()))
            });
            let best_host = candidates[0].1.clone();
            let mut merged = MergedRule {
                policy: None,
                subsets: Vec::new(),
            };
            for (d, _) in candidates.iter().filter(|(_, h)| *h == best_host) {
                if merged.policy.is_none() {
                    merged.policy.clone_from(&d.spec.traffic_policy);
                }
                for s in &d.spec.subsets {
                    if !merged.subsets.iter().any(|x| x.name == s.name) {
                        merged.subsets.push(s.clone());
                    }
                }
            }
            return Some(merged);
        }
        None
    }
}

/// DestinationRules visible to the proxy, by namespace and host, resolved once.
struct DrIndex<'a> {
    by_namespace: HashMap<&'a str, DrNamespace<'a>>,
}

#[derive(Default)]
struct DrNamespace<'a> {
    exact: HashMap<String, Vec<&'a Resource<api::DestinationRule>>>,
    wildcard: Vec<(&'a Resource<api::DestinationRule>, String)>,
}

impl<'a> DrIndex<'a> {
    fn new(config: &'a Config, client: &str, labels: &BTreeMap<String, String>) -> Self {
        let mut by_namespace: HashMap<&'a str, DrNamespace<'a>> = HashMap::new();
        for d in &config.destination_rules {
            if !visible(&d.spec.export_to, &d.namespace, client) {
                continue;
            }
            if let Some(ws) = &d.spec.workload_selector {
                if d.namespace != client || !selects(&ws.match_labels, labels) {
                    continue;
                }
            }
            let host = hosts::resolve_short_name(&d.spec.host, &d.namespace);
            let entry = by_namespace.entry(d.namespace.as_str()).or_default();
            if hosts::is_wildcard(&host) {
                entry.wildcard.push((d, host));
            } else {
                entry.exact.entry(host).or_default().push(d);
            }
        }
        Self { by_namespace }
    }
}

struct MergedRule {
    policy: Option<api::TrafficPolicy>,
    subsets: Vec<api::Subset>,
}

/// The four policy blocks in force for one cluster.
#[derive(Clone, Debug, Default)]
struct Blocks {
    load_balancer: Option<api::LoadBalancerSettings>,
    connection_pool: Option<api::ConnectionPoolSettings>,
    outlier_detection: Option<api::OutlierDetection>,
    tls: Option<api::ClientTlsSettings>,
}

impl Blocks {
    fn from_policy(p: &api::TrafficPolicy) -> Self {
        Self {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            tls: p.tls.clone(),
        }
    }

    fn from_port(p: &api::PortTrafficPolicy) -> Self {
        Self {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            tls: p.tls.clone(),
        }
    }
}

fn port_level(p: &api::TrafficPolicy, port: u16) -> Option<&api::PortTrafficPolicy> {
    p.port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().and_then(|x| x.number) == Some(i64::from(port)))
}

/// Port-level settings replace all four blocks (no inheritance from the top level).
fn port_policy(p: Option<&api::TrafficPolicy>, port: u16) -> Blocks {
    let Some(p) = p else { return Blocks::default() };
    match port_level(p, port) {
        Some(pl) => Blocks::from_port(pl),
        None => Blocks::from_policy(p),
    }
}

/// subset port-level > subset top-level (per block) > DR port-level > DR top-level.
fn subset_policy(
    dr: Option<&api::TrafficPolicy>,
    subset: Option<&api::TrafficPolicy>,
    port: u16,
) -> Blocks {
    let mut blocks = port_policy(dr, port);
    let Some(s) = subset else { return blocks };
    if let Some(pl) = port_level(s, port) {
        return Blocks::from_port(pl);
    }
    if s.load_balancer.is_some() {
        blocks.load_balancer.clone_from(&s.load_balancer);
    }
    if s.connection_pool.is_some() {
        blocks.connection_pool.clone_from(&s.connection_pool);
    }
    if s.outlier_detection.is_some() {
        blocks.outlier_detection.clone_from(&s.outlier_detection);
    }
    if s.tls.is_some() {
        blocks.tls.clone_from(&s.tls);
    }
    blocks
}

fn load_balancer(lb: Option<&api::LoadBalancerSettings>) -> ir::LoadBalancer {
    let Some(lb) = lb else {
        return ir::LoadBalancer::default();
    };
    let policy = match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => ir::LbPolicy::RoundRobin,
        Some("RANDOM") => ir::LbPolicy::Random,
        Some("PASSTHROUGH") => ir::LbPolicy::Passthrough,
        _ => ir::LbPolicy::LeastRequest,
    };
    let consistent_hash = lb.consistent_hash.as_ref().and_then(|ch| {
        let key = if let Some(h) = &ch.http_header_name {
            ir::HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            ir::HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl_ms: c.ttl.as_deref().and_then(|t| duration::parse_ms(t).ok()),
            }
        } else if ch.use_source_ip == Some(true) {
            ir::HashKey::SourceIp
        } else if let Some(q) = &ch.http_query_parameter_name {
            ir::HashKey::QueryParameter(q.clone())
        } else {
            return None;
        };
        Some(ir::ConsistentHash {
            key,
            maglev_table_size: ch.maglev.as_ref().map(|m| m.table_size.unwrap_or(65537)),
            minimum_ring_size: if ch.maglev.is_some() {
                None
            } else {
                Some(
                    ch.ring_hash
                        .as_ref()
                        .and_then(|r| r.minimum_ring_size)
                        .or(ch.minimum_ring_size)
                        .unwrap_or(1024),
                )
            },
        })
    });
    let warmup_ms = lb
        .warmup
        .as_ref()
        .and_then(|w| w.duration.as_deref())
        .or(lb.warmup_duration_secs.as_deref())
        .and_then(|d| duration::parse_ms(d).ok());
    let locality = lb
        .locality_lb_setting
        .as_ref()
        .map_or_else(ir::LocalityLb::default, |l| ir::LocalityLb {
            disabled: l.enabled == Some(false),
            distribute: l
                .distribute
                .iter()
                .map(|d| {
                    let to =
                        d.to.iter()
                            .filter_map(|(k, v)| Some((k.clone(), u32::try_from(*v).ok()?)))
                            .collect();
                    (d.from.clone(), to)
                })
                .collect(),
            failover: l
                .failover
                .iter()
                .map(|f| (f.from.clone(), f.to.clone()))
                .collect(),
            failover_priority: l.failover_priority.clone(),
        });
    ir::LoadBalancer {
        policy,
        consistent_hash,
        warmup_ms,
        locality,
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

fn per_million(pct: f64) -> u32 {
    (pct.clamp(0.0, 100.0) * 10_000.0).round() as u32
}

/// `name` → `ns/name`; `./name` → VS namespace; legacy `name.ns.svc…` → `ns/name`.
pub fn resolve_gateway_name(g: &str, vs_ns: &str) -> String {
    if g == "mesh" {
        return g.to_string();
    }
    if let Some((ns, name)) = g.split_once('/') {
        let ns = if ns == "." { vs_ns } else { ns };
        return format!("{ns}/{name}");
    }
    if let Some((name, rest)) = g.split_once('.') {
        let ns = rest.split('.').next().unwrap_or(vs_ns);
        return format!("{ns}/{name}");
    }
    format!("{vs_ns}/{g}")
}

fn string_match(m: &api::StringMatch) -> Option<ir::StringMatch> {
    if let Some(e) = &m.exact {
        Some(ir::StringMatch::Exact(e.clone()))
    } else if let Some(p) = &m.prefix {
        Some(ir::StringMatch::Prefix(p.clone()))
    } else {
        m.regex.as_ref().map(|r| ir::StringMatch::Regex(r.clone()))
    }
}

/// Header/query matcher: `{}` and `regex: "*"` mean presence.
fn presence_or_match(m: &api::StringMatch) -> ir::StringMatch {
    if m.regex.as_deref() == Some("*") {
        return ir::StringMatch::Present;
    }
    string_match(m).unwrap_or(ir::StringMatch::Present)
}

fn translate_match(m: &api::HttpMatchRequest) -> ir::RouteMatch {
    // Keys that name the request line are matched through their own fields in Istio.
    const IGNORED: &[&str] = &["uri", "scheme", "method", "authority"];
    let mut headers: Vec<ir::HeaderMatch> = Vec::new();
    for (name, sm) in &m.headers {
        if IGNORED.contains(&name.as_str()) {
            continue;
        }
        headers.push(ir::HeaderMatch {
            name: name.to_ascii_lowercase(),
            matcher: presence_or_match(sm),
            invert: false,
        });
    }
    for (name, sm) in &m.without_headers {
        if IGNORED.contains(&name.as_str()) {
            continue;
        }
        headers.push(ir::HeaderMatch {
            name: name.to_ascii_lowercase(),
            matcher: presence_or_match(sm),
            invert: true,
        });
    }
    ir::RouteMatch {
        name: m.name.clone(),
        uri: m.uri.as_ref().and_then(string_match),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
        scheme: m.scheme.as_ref().and_then(string_match),
        method: m.method.as_ref().and_then(string_match),
        authority: m.authority.as_ref().and_then(string_match),
        headers,
        query_params: m
            .query_params
            .iter()
            .map(|(name, sm)| ir::QueryMatch {
                name: name.clone(),
                matcher: presence_or_match(sm),
            })
            .collect(),
        port: m.port.and_then(|p| u16::try_from(p).ok()),
    }
}

/// Fills header ops; returns an authority set through `:authority`/`host`.
fn header_ops(
    h: &api::Headers,
    req: &mut ir::HeaderOps,
    resp: &mut ir::HeaderOps,
) -> Option<String> {
    let mut authority = None;
    if let Some(r) = &h.request {
        for (k, v) in &r.set {
            let k = k.to_ascii_lowercase();
            if k == ":authority" || k == "host" {
                authority = Some(v.clone());
            } else if !k.starts_with(':') {
                req.set.push((k, v.clone()));
            }
        }
        for (k, v) in &r.add {
            let k = k.to_ascii_lowercase();
            if !k.starts_with(':') {
                req.add.push((k, v.clone()));
            }
        }
        req.remove
            .extend(r.remove.iter().map(|k| k.to_ascii_lowercase()));
    }
    if let Some(r) = &h.response {
        resp.set.extend(
            r.set
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        resp.add.extend(
            r.add
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        resp.remove
            .extend(r.remove.iter().map(|k| k.to_ascii_lowercase()));
    }
    authority
}

fn is_catch_all_ir(m: &ir::RouteMatch) -> bool {
    let uri_all = match &m.uri {
        None => true,
        Some(ir::StringMatch::Prefix(p)) => p == "/",
        Some(ir::StringMatch::Regex(r)) => r == ".*" || r == "*",
        _ => false,
    };
    uri_all
        && m.headers.is_empty()
        && m.query_params.is_empty()
        && m.scheme.is_none()
        && m.method.is_none()
        && m.authority.is_none()
        && m.port.is_none()
}

// === Delegation ===

fn sm_conflict(root: &Option<api::StringMatch>, del: &Option<api::StringMatch>) -> bool {
    let (Some(r), Some(d)) = (root, del) else {
        return false;
    };
    if r.regex.is_some() || d.regex.is_some() {
        return r != d;
    }
    match (&r.exact, &r.prefix, &d.exact, &d.prefix) {
        (Some(re), _, Some(de), _) => re != de,
        (Some(_), _, _, Some(_)) => true,
        (_, Some(rp), Some(de), _) => !de.starts_with(rp.as_str()),
        (_, Some(rp), _, Some(dp)) => !dp.starts_with(rp.as_str()),
        _ => false,
    }
}

fn match_conflict(r: &api::HttpMatchRequest, d: &api::HttpMatchRequest) -> bool {
    sm_conflict(&r.uri, &d.uri)
        || sm_conflict(&r.scheme, &d.scheme)
        || sm_conflict(&r.method, &d.method)
        || sm_conflict(&r.authority, &d.authority)
        || (r.port.is_some() && d.port.is_some() && r.port != d.port)
        || (r.ignore_uri_case.is_some()
            && d.ignore_uri_case.is_some()
            && r.ignore_uri_case != d.ignore_uri_case)
        || r.headers.iter().any(|(k, v)| {
            d.headers
                .get(k)
                .is_some_and(|dv| sm_conflict(&Some(v.clone()), &Some(dv.clone())))
        })
        || r.query_params.iter().any(|(k, v)| {
            d.query_params
                .get(k)
                .is_some_and(|dv| sm_conflict(&Some(v.clone()), &Some(dv.clone())))
        })
}

fn merge_match(r: &api::HttpMatchRequest, d: &api::HttpMatchRequest) -> api::HttpMatchRequest {
    let mut m = r.clone();
    if d.uri.is_some() {
        m.uri.clone_from(&d.uri);
    }
    if d.scheme.is_some() {
        m.scheme.clone_from(&d.scheme);
    }
    if d.method.is_some() {
        m.method.clone_from(&d.method);
    }
    if d.authority.is_some() {
        m.authority.clone_from(&d.authority);
    }
    if d.port.is_some() {
        m.port = d.port;
    }
    if d.ignore_uri_case.is_some() {
        m.ignore_uri_case = d.ignore_uri_case;
    }
    m.headers.extend(d.headers.clone());
    m.without_headers.extend(d.without_headers.clone());
    m.query_params.extend(d.query_params.clone());
    if !d.name.is_empty() {
        m.name = if r.name.is_empty() {
            d.name.clone()
        } else {
            format!("{}-{}", r.name, d.name)
        };
    }
    m
}

/// Merges a delegate route into its root route (VSMODEL mergeHTTPRoute); `None` on conflict.
fn merge_delegate(root: &api::HttpRoute, del: &api::HttpRoute) -> Option<api::HttpRoute> {
    let mut out = del.clone();
    if !root.matches.is_empty() {
        if del.matches.is_empty() {
            out.matches.clone_from(&root.matches);
        } else {
            let mut merged = Vec::new();
            for d in &del.matches {
                let compatible: Vec<_> = root
                    .matches
                    .iter()
                    .filter(|r| !match_conflict(r, d))
                    .collect();
                if compatible.is_empty() {
                    return None;
                }
                merged.extend(compatible.into_iter().map(|r| merge_match(r, d)));
            }
            out.matches = merged;
        }
    }
    if !root.name.is_empty() {
        out.name = if del.name.is_empty() {
            root.name.clone()
        } else {
            format!("{}-{}", root.name, del.name)
        };
    }
    macro_rules! inherit {
        ($($f:ident),*) => {$( if out.$f.is_none() { out.$f.clone_from(&root.$f); } )*};
    }
    inherit!(
        rewrite,
        direct_response,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percentage,
        mirror_percent,
        cors_policy,
        headers
    );
    if out.mirrors.is_empty() {
        out.mirrors.clone_from(&root.mirrors);
    }
    Some(out)
}
