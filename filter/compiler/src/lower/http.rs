//! HTTP route tables: sidecar virtual hosts per service port, VirtualService routes (with
//! delegation), matches, header operations, and Istio's default route and retry policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use meshroute_core::ir;

use super::Lowering;
use crate::api;
use crate::hosts;
use crate::load::Resource;
use crate::matches::{string_match, translate_match};
use crate::registry::{self, Service, ServicePort};
use crate::resolve::{merge_delegate, resolve_gateway_name, selects, visible};
use crate::source::FieldPath;
use crate::validate::GRPC_CODES;

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

/// A route's (or the mesh's default) `retries` as Envoy's retry policy; `None` when it
/// makes no retries.
pub fn retry_policy(r: &api::HttpRetry) -> Option<ir::RetryPolicy> {
    if r.attempts.unwrap_or(0) <= 0 {
        return None;
    }
    let mut policy = ir::RetryPolicy {
        num_retries: u32::try_from(r.attempts.unwrap_or(0)).unwrap_or(0),
        per_try_timeout_ms: r.per_try_timeout.as_ref().and_then(api::Duration::ms),
        retry_on: Vec::new(),
        retriable_status_codes: Vec::new(),
        backoff_base_ms: r.backoff.as_ref().and_then(api::Duration::ms),
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

impl Lowering<'_> {
    pub(super) fn sidecar_routes(
        &mut self,
        vss: &[&Resource<api::VirtualService>],
    ) -> Vec<ir::RouteTable> {
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
            let served: Vec<_> = svc
                .ports
                .iter()
                .filter(|p| {
                    p.is_http()
                        && self
                            .scope
                            .imports_on_port(&svc.namespace, &svc.host, p.number)
                })
                .collect();
            for port in served {
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
            name: meshroute_core::contract::DEFAULT_ROUTE.into(),
            action: ir::Action::Route(ir::RouteAction {
                destinations: vec![ir::Destination {
                    host: svc.host.clone(),
                    port: Some(port.number),
                    weight: 100,
                    ..Default::default()
                }],
                rewrite: None,
            }),
            retry: self.mesh.default_http_retry.clone(),
            ..Default::default()
        }
    }

    // === Routes ===

    /// Translates the HTTP routes of `vs` for a listener port; `gateway` is `ns/name` for
    /// gateway proxies (None = the mesh).
    pub(super) fn vs_routes(
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
            .as_ref()
            .and_then(api::Duration::ms)
            .filter(|t| *t > 0);
        let retry = if !is_forward {
            None
        } else {
            match &route.retries {
                None => self.mesh.default_http_retry.clone(),
                Some(r) => retry_policy(r),
            }
        };
        let fault = route.fault.as_ref().map(|f| ir::Fault {
            delay: f.delay.as_ref().and_then(|d| {
                let delay_ms = d.fixed_delay.as_ref()?.ms()?;
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
            // istiod reads the deprecated `allowOrigin` only when `allowOrigins` is unset.
            allow_origins: if c.allow_origins.is_empty() {
                c.allow_origin
                    .iter()
                    .map(|o| ir::StringMatch::Exact(o.clone()))
                    .collect()
            } else {
                c.allow_origins.iter().filter_map(string_match).collect()
            },
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age_s: c
                .max_age
                .as_ref()
                .and_then(api::Duration::ms)
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
}

pub(super) fn per_million(pct: f64) -> u32 {
    (pct.clamp(0.0, 100.0) * 10_000.0).round() as u32
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
