//! Resolution for one proxy identity: what the proxy sees (exportTo, Sidecar scope, gateway
//! binding), which VirtualServices and DestinationRules apply to it the way istiod picks them,
//! and VirtualService delegation.

use std::collections::{BTreeMap, HashMap};

use meshroute_core::ir;

use crate::api;
use crate::hosts;
use crate::load::{Config, Resource};
use crate::options::{MeshOptions, ProxyOptions};
pub(crate) use crate::registry::selects;
use crate::registry::{self, Service};

pub(crate) fn visible(export_to: &[String], owner_ns: &str, client_ns: &str) -> bool {
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

/// One egress host of a Sidecar: `ns/dnsName`, possibly excluded with `~`.
struct EgressHost {
    namespace: String,
    dns: String,
    exclude: bool,
}

/// What a sidecar proxy imports: all its egress listeners' hosts together, and each
/// listener's on its own port (`None`: the catch-all listener, for every other port).
pub(crate) struct Scope {
    egress: Option<Vec<EgressHost>>,
    listeners: Vec<(Option<u16>, Vec<EgressHost>)>,
}

impl Scope {
    pub(crate) fn all() -> Self {
        Self {
            egress: None,
            listeners: Vec::new(),
        }
    }

    /// Whether `host` is served on `port`, as Istio's egress listeners narrow it: the
    /// listener for that port decides, else the catch-all one; a port no listener covers
    /// serves nothing (its traffic follows the outbound policy).
    pub(crate) fn imports_on_port(&self, ns: &str, host: &str, port: u16) -> bool {
        if self.egress.is_none() {
            return true;
        }
        let listener = self
            .listeners
            .iter()
            .find(|(p, _)| *p == Some(port))
            .or_else(|| self.listeners.iter().find(|(p, _)| p.is_none()));
        listener.is_some_and(|(_, hosts)| Self::imports(hosts, ns, host))
    }

    fn imports(egress: &[EgressHost], ns: &str, host: &str) -> bool {
        let hit = |e: &EgressHost| Self::ns_ok(&e.namespace, ns) && hosts::intersects(&e.dns, host);
        egress.iter().any(|e| !e.exclude && hit(e)) && !egress.iter().any(|e| e.exclude && hit(e))
    }

    fn ns_ok(filter: &str, ns: &str) -> bool {
        filter == "*" || filter == ns
    }

    pub(crate) fn imports_host(&self, ns: &str, host: &str) -> bool {
        self.egress
            .as_ref()
            .is_none_or(|egress| Self::imports(egress, ns, host))
    }
}

/// The registry services a proxy sees: exported to its namespace and imported by its
/// Sidecar scope.
pub(crate) fn visible_services(
    config: &Config,
    proxy: &ProxyOptions,
    scope: &Scope,
) -> Vec<Service> {
    registry::build(config)
        .into_iter()
        .filter(|svc| {
            visible(&svc.export_to, &svc.namespace, &proxy.namespace)
                && scope.imports_host(&svc.namespace, &svc.host)
        })
        .collect()
}

/// The Sidecar resource in force for a sidecar: the one selecting its workload first, then
/// its namespace's, then the root namespace's (oldest first among equals).
pub(crate) fn sidecar_for<'c>(
    config: &'c Config,
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> Option<&'c Resource<api::Sidecar>> {
    let ns = &proxy.namespace;
    let mut sidecars: Vec<&Resource<api::Sidecar>> = config.sidecars.iter().collect();
    sidecars.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    sidecars
        .iter()
        .find(|s| {
            &s.namespace == ns
                && s.spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|w| selects(&w.labels, &proxy.labels))
        })
        .or_else(|| {
            sidecars
                .iter()
                .find(|s| &s.namespace == ns && s.spec.workload_selector.is_none())
        })
        .or_else(|| {
            sidecars
                .iter()
                .find(|s| s.namespace == mesh.root_namespace && s.spec.workload_selector.is_none())
        })
        .copied()
}

/// The Sidecar resource in force for a sidecar, as its scope and outbound policy.
pub(crate) fn sidecar_scope(
    config: &Config,
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> (Scope, Option<ir::OutboundPolicy>) {
    let ns = &proxy.namespace;
    let chosen = sidecar_for(config, proxy, mesh);
    let Some(sc) = chosen else {
        return (Scope::all(), None);
    };
    let policy = sc
        .spec
        .outbound_traffic_policy
        .as_ref()
        // An unset mode is the enum's zero value, REGISTRY_ONLY, as in istiod.
        .map(|o| match o.mode.as_deref() {
            Some("ALLOW_ANY") => ir::OutboundPolicy::AllowAny,
            _ => ir::OutboundPolicy::RegistryOnly,
        });
    if sc.spec.egress.is_empty() {
        return (Scope::all(), policy);
    }
    let mut egress = Vec::new();
    let mut listeners = Vec::new();
    for e in &sc.spec.egress {
        let first = egress.len();
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
            } else if exclude && nsf.is_empty() {
                "*".to_string()
            } else {
                nsf.to_string()
            };
            egress.push(EgressHost {
                namespace,
                dns: dns.to_ascii_lowercase(),
                exclude,
            });
        }
        let port = e
            .port
            .as_ref()
            .and_then(|p| p.number)
            .and_then(|n| u16::try_from(n).ok());
        let hosts = egress[first..]
            .iter()
            .map(|h| EgressHost {
                namespace: h.namespace.clone(),
                dns: h.dns.clone(),
                exclude: h.exclude,
            })
            .collect();
        listeners.push((port, hosts));
    }
    (
        Scope {
            egress: Some(egress),
            listeners,
        },
        policy,
    )
}

/// The VirtualServices a sidecar sees, in the order istiod applies them.
pub(crate) fn sidecar_vss<'a>(
    config: &'a Config,
    proxy: &ProxyOptions,
    scope: &Scope,
) -> Vec<&'a Resource<api::VirtualService>> {
    let ns = &proxy.namespace;
    let mut vss: Vec<&Resource<api::VirtualService>> = config
        .virtual_services
        .iter()
        .filter(|vs| !vs.spec.hosts.is_empty())
        .filter(|vs| vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh"))
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

/// DestinationRules visible to the proxy, by namespace and host, resolved once.
pub(crate) struct DrIndex<'a> {
    by_namespace: HashMap<&'a str, DrNamespace<'a>>,
}

#[derive(Default)]
struct DrNamespace<'a> {
    exact: HashMap<String, Vec<&'a Resource<api::DestinationRule>>>,
    wildcard: Vec<(&'a Resource<api::DestinationRule>, String)>,
}

impl<'a> DrIndex<'a> {
    pub(crate) fn new(config: &'a Config, client: &str, labels: &BTreeMap<String, String>) -> Self {
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

pub(crate) struct MergedRule {
    pub policy: Option<api::TrafficPolicy>,
    pub subsets: Vec<api::Subset>,
}

/// The four policy blocks in force for one cluster.
#[derive(Clone, Debug, Default)]
pub(crate) struct Blocks {
    pub load_balancer: Option<api::LoadBalancerSettings>,
    pub connection_pool: Option<api::ConnectionPoolSettings>,
    pub outlier_detection: Option<api::OutlierDetection>,
    pub tls: Option<api::ClientTlsSettings>,
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
pub(crate) fn port_policy(p: Option<&api::TrafficPolicy>, port: u16) -> Blocks {
    let Some(p) = p else { return Blocks::default() };
    match port_level(p, port) {
        Some(pl) => Blocks::from_port(pl),
        None => Blocks::from_policy(p),
    }
}

/// subset port-level > subset top-level (per block) > DR port-level > DR top-level.
pub(crate) fn subset_policy(
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

/// DestinationRule lookup: client namespace → service namespace → root namespace; within a
/// namespace the most specific host wins; DRs for the same host in one namespace merge.
pub(crate) fn destination_rule(
    index: &DrIndex<'_>,
    svc: &Service,
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> Option<MergedRule> {
    let client = &proxy.namespace;
    let tiers = [
        client.as_str(),
        svc.namespace.as_str(),
        mesh.root_namespace.as_str(),
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
pub(crate) fn merge_delegate(
    root: &api::HttpRoute,
    del: &api::HttpRoute,
) -> Option<api::HttpRoute> {
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
