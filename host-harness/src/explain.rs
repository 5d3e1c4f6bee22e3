//! `meshroute explain` and `meshroute simulate`: the decision path of one request through the
//! compiled rules, and the outcome distribution over many draws.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use meshroute_core::engine::{
    ConnectionOutcome, ConnectionView, Engine, Forward, Outcome, RequestView, SplitMix64,
};
use meshroute_core::ir::{Action, Destination, RouteTable, RulesDocument, SourceRef, StringMatch};

/// A request as given on the command line.
pub struct Probe {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Probe {
    /// `METHOD URL` plus `name: value` headers; `tcp://ADDRESS:PORT` and `tls://SNI:PORT`
    /// stand for connections (the method is then ignored).
    pub fn parse(method: &str, url: &str, headers: &[String]) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?}: expected an absolute URL such as http://reviews:9080/path")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut parsed = Vec::new();
        for h in headers {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| format!("header {h:?}: expected 'name: value'"))?;
            parsed.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Self {
            method: method.to_ascii_uppercase(),
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_owned(),
            path: path.to_owned(),
            headers: parsed,
        })
    }

    fn all_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            (":method".to_owned(), self.method.clone()),
            (":scheme".to_owned(), self.scheme.clone()),
            (":authority".to_owned(), self.authority.clone()),
            (":path".to_owned(), self.path.clone()),
        ];
        h.extend(self.headers.iter().cloned());
        h
    }

    fn view<'a>(&'a self, engine: &Engine, headers: &'a [(String, String)]) -> RequestView<'a> {
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        let listener = meshroute_core::engine::split_host_port(&self.authority)
            .1
            .unwrap_or(default_port);
        RequestView {
            method: &self.method,
            scheme: &self.scheme,
            authority: &self.authority,
            path: &self.path,
            port: engine.route_port(&self.authority, &self.scheme, Some(listener)),
            headers,
            source_ip: Some("127.0.0.1"),
            transparent: false,
        }
    }
}

fn at(source: Option<&SourceRef>) -> String {
    source.map_or_else(String::new, |s| {
        format!(
            " ({} {}/{} at {}:{})",
            s.kind, s.namespace, s.name, s.file, s.line
        )
    })
}

fn describe(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(s) => format!("exact {s:?}"),
        StringMatch::Prefix(s) => format!("prefix {s:?}"),
        StringMatch::Regex(s) => format!("regex {s:?}"),
        StringMatch::Present => "present".to_owned(),
    }
}

/// The decision path as text and as JSON.
pub fn explain(doc: &RulesDocument, probe: &Probe) -> Result<(String, Value), String> {
    if is_connection(probe) {
        return explain_connection(doc, probe);
    }
    let engine = Engine::new(doc.clone()).map_err(|e| e.to_string())?;
    let headers = probe.all_headers();
    let view = probe.view(&engine, &headers);
    let trace = engine.trace(&view);
    let decision = engine.decide(&view, &mut SplitMix64(1));
    let mut out = String::new();
    let mut steps = Vec::new();
    proxy_line(&mut out, doc);
    let _ = writeln!(
        out,
        "request: {} {}://{}{} (route table port {})",
        probe.method, probe.scheme, probe.authority, probe.path, view.port
    );
    let table: Option<&RouteTable> = doc.route_tables.iter().find(|t| t.port == view.port);
    match (table, trace.vhost) {
        (Some(t), Some(i)) => {
            let vh = &t.virtual_hosts[i];
            let _ = writeln!(out, "virtual host: {}{}", vh.name, at(vh.source.as_ref()));
            steps.push(json!({"virtual_host": vh.name, "source": vh.source}));
            for (r, result) in trace.routes.iter().enumerate() {
                let route = &vh.routes[r];
                let name = if route.name.is_empty() {
                    String::new()
                } else {
                    format!(" {:?}", route.name)
                };
                match result {
                    None => {
                        let _ = writeln!(
                            out,
                            "  route {r}{name}{}: matched",
                            at(route.source.as_ref())
                        );
                        steps.push(json!({"route": r, "matched": true, "source": route.source}));
                    }
                    Some(failures) => {
                        let why: Vec<String> = failures
                            .iter()
                            .zip(&route.matches)
                            .map(|(c, m)| {
                                let detail = match c {
                                    meshroute_core::engine::Condition::Uri => {
                                        m.uri.as_ref().map(describe)
                                    }
                                    meshroute_core::engine::Condition::Header(h) => {
                                        m.headers.iter().find(|x| x.name == *h).map(|x| {
                                            format!(
                                                "{}{}",
                                                if x.invert { "not " } else { "" },
                                                describe(&x.matcher)
                                            )
                                        })
                                    }
                                    _ => None,
                                };
                                match detail {
                                    Some(d) => format!("{c} is not {d}"),
                                    None => format!("{c} does not match"),
                                }
                            })
                            .collect();
                        let _ = writeln!(
                            out,
                            "  route {r}{name}{}: no match: {}",
                            at(route.source.as_ref()),
                            why.join("; ")
                        );
                        steps.push(json!({"route": r, "matched": false, "failed": why, "source": route.source}));
                    }
                }
            }
            if let Some(route) = trace
                .routes
                .len()
                .checked_sub(1)
                .filter(|_| matches!(trace.routes.last(), Some(None)))
                .map(|r| &vh.routes[r])
            {
                if let Action::Route(ra) = &route.action {
                    destinations(&mut out, doc, &ra.destinations, view.port);
                }
                let mut policies = Vec::new();
                policies.push(format!(
                    "timeout {}",
                    route
                        .timeout_ms
                        .map_or("none".to_owned(), |t| format!("{t}ms"))
                ));
                if let Some(r) = &route.retry {
                    policies.push(format!(
                        "retries {} on {}",
                        r.num_retries,
                        r.retry_on.join(",")
                    ));
                }
                if route.fault.is_some() {
                    policies.push("fault injection".into());
                }
                if !route.mirrors.is_empty() {
                    policies.push(format!("{} mirror(s)", route.mirrors.len()));
                }
                if route.cors.is_some() {
                    policies.push("CORS".into());
                }
                let _ = writeln!(out, "  policies: {}", policies.join(", "));
            }
        }
        _ => {
            let _ = writeln!(
                out,
                "virtual host: none matches {:?} on port {}",
                probe.authority, view.port
            );
        }
    }
    let outcome = match &decision.outcome {
        Outcome::Forward(f) => format!(
            "forward to {}{}",
            f.cluster,
            f.endpoint
                .as_deref()
                .map_or(String::new(), |e| format!(" endpoint {e}"))
        ),
        Outcome::Reply(r) => {
            let flag = r.flag.map_or(String::new(), |f| format!(" {}", f.code()));
            let loc = r
                .headers
                .iter()
                .find(|(k, _)| k == "location")
                .map_or(String::new(), |(_, v)| format!(" location {v}"));
            let body = if r.body.is_empty() {
                String::new()
            } else {
                format!(" body {:?}", String::from_utf8_lossy(&r.body))
            };
            format!("reply {}{flag}{loc}{body}", r.status)
        }
    };
    let delay = decision
        .delay_ms
        .map_or(String::new(), |d| format!(" after a {d}ms fault delay"));
    let _ = writeln!(out, "outcome: {outcome}{delay}");
    // Compiler warnings about the host this request reached.
    let host = meshroute_core::engine::split_host_port(&probe.authority)
        .0
        .to_ascii_lowercase();
    for w in doc.warnings.iter().filter(|w| w.contains(&host)) {
        let _ = writeln!(out, "warning: {w}");
    }
    Ok((
        out,
        json!({"steps": steps, "outcome": outcome, "delay_ms": decision.delay_ms}),
    ))
}

fn proxy_line(out: &mut String, doc: &RulesDocument) {
    let _ = writeln!(
        out,
        "proxy: {:?} in namespace {} (outbound policy {:?})",
        doc.proxy.kind, doc.proxy.namespace, doc.outbound_traffic_policy
    );
}

/// Each weighted destination with its cluster, endpoints and policies.
fn destinations(out: &mut String, doc: &RulesDocument, dests: &[Destination], port: u16) {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    for d in dests {
        let cluster = meshroute_core::ir::cluster_name(d.port.unwrap_or(port), &d.subset, &d.host);
        let endpoints: Vec<String> = doc
            .clusters
            .iter()
            .find(|c| c.name == cluster)
            .map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| format!("{}:{}", e.address, e.port))
                    .collect()
            })
            .unwrap_or_default();
        let share = if total == 0 {
            0.0
        } else {
            f64::from(d.weight) * 100.0 / f64::from(total)
        };
        let subset = if d.subset.is_empty() {
            String::new()
        } else {
            format!(" subset {}", d.subset)
        };
        let ends = if doc.clusters.iter().any(|c| c.name == cluster) {
            format!("endpoints [{}]", endpoints.join(", "))
        } else {
            "cluster not defined (no DestinationRule declares the subset)".to_owned()
        };
        let _ = writeln!(
            out,
            "    -> {}{subset} {share:.1}%: cluster {cluster}, {ends}",
            d.host
        );
        if let Some(c) = doc.clusters.iter().find(|c| c.name == cluster) {
            let mut p = vec![format!("lb {:?}", c.lb.policy)];
            if c.lb.consistent_hash.is_some() {
                p.push("consistent hash".into());
            }
            if !c.connection_pool.is_default() {
                p.push(format!("connection pool {:?}", c.connection_pool));
            }
            if let Some(o) = &c.outlier_detection {
                p.push(format!("outlier detection {o:?}"));
            }
            if let Some(t) = &c.tls {
                p.push(format!(
                    "TLS {}{}",
                    t.mode,
                    t.sni
                        .as_deref()
                        .map_or(String::new(), |s| format!(" sni {s}"))
                ));
            }
            let _ = writeln!(out, "       {}{}", p.join(", "), at(c.source.as_ref()));
            if c.endpoints.is_empty() && c.discovery == meshroute_core::ir::Discovery::Static {
                let _ = writeln!(
                    out,
                    "       warning: no endpoint matches this cluster (503 no healthy upstream)"
                );
            }
        }
    }
}

/// A connection given as `tcp://ADDRESS:PORT` or `tls://SNI:PORT`.
fn connection_view(probe: &Probe) -> Result<(String, String, u16), String> {
    let (host, port) = meshroute_core::engine::split_host_port(&probe.authority);
    let port = port
        .or((probe.scheme == "tls").then_some(443))
        .ok_or_else(|| {
            format!(
                "{}://{}: a connection needs a port",
                probe.scheme, probe.authority
            )
        })?;
    Ok(if probe.scheme == "tls" {
        (host.to_ascii_lowercase(), String::new(), port)
    } else {
        (String::new(), probe.authority.clone(), port)
    })
}

/// Whether the probe is a connection (`tcp://` or `tls://`) rather than a request.
pub fn is_connection(probe: &Probe) -> bool {
    matches!(probe.scheme.as_str(), "tcp" | "tls")
}

fn connection_outcome(o: &ConnectionOutcome<'_>) -> String {
    match o {
        ConnectionOutcome::Forward {
            cluster, endpoint, ..
        } => format!(
            "forward to {cluster}{}",
            endpoint
                .as_deref()
                .map_or(String::new(), |e| format!(" endpoint {e}"))
        ),
        ConnectionOutcome::Close { reason } => format!("close ({reason})"),
    }
}

/// The decision path of a connection: its table, each route tried, destinations, outcome.
pub fn explain_connection(doc: &RulesDocument, probe: &Probe) -> Result<(String, Value), String> {
    let engine = Engine::new(doc.clone()).map_err(|e| e.to_string())?;
    let (sni, destination, port) = connection_view(probe)?;
    let view = ConnectionView {
        port,
        sni: &sni,
        destination: &destination,
        source_ip: Some("127.0.0.1"),
    };
    let mut out = String::new();
    let mut steps = Vec::new();
    proxy_line(&mut out, doc);
    let _ = writeln!(
        out,
        "connection: {}://{} (connection table port {port}{})",
        probe.scheme,
        probe.authority,
        if sni.is_empty() {
            String::new()
        } else {
            format!(", SNI {sni}")
        }
    );
    match doc.l4_tables.iter().find(|t| t.port == port) {
        None => {
            let _ = writeln!(out, "table: no TCP/TLS routes on port {port}");
        }
        Some(t) if t.auto_passthrough => {
            let _ = writeln!(out, "table: AUTO_PASSTHROUGH, the SNI names the cluster");
            steps.push(json!({"auto_passthrough": true}));
        }
        Some(t) => {
            let chosen = engine.connection_route(&view);
            for (i, r) in t.routes.iter().enumerate() {
                let matched = chosen == Some(i);
                let verdict = if matched { "matched" } else { "no match" };
                let conditions: Vec<String> = r
                    .matches
                    .iter()
                    .map(|m| {
                        let mut c = Vec::new();
                        if !m.sni_hosts.is_empty() {
                            c.push(format!("SNI in [{}]", m.sni_hosts.join(", ")));
                        }
                        if !m.destination_subnets.is_empty() {
                            c.push(format!(
                                "destination in [{}]",
                                m.destination_subnets.join(", ")
                            ));
                        }
                        c.join(" and ")
                    })
                    .collect();
                let when = if conditions.is_empty() {
                    "any connection".to_owned()
                } else {
                    conditions.join(" or ")
                };
                let _ = writeln!(
                    out,
                    "  route {i} {:?}{} ({when}): {verdict}",
                    r.name,
                    at(r.source.as_ref())
                );
                steps.push(
                    json!({"route": i, "name": r.name, "matched": matched, "source": r.source}),
                );
                if matched {
                    destinations(&mut out, doc, &r.destinations, port);
                    break;
                }
            }
        }
    }
    let outcome = connection_outcome(&engine.decide_connection(
        &view,
        &mut SplitMix64(1),
        &meshroute_core::engine::NoEndpointState,
    ));
    let _ = writeln!(out, "outcome: {outcome}");
    Ok((out, json!({"steps": steps, "outcome": outcome})))
}

/// Runs the decision `n` times with a seeded generator and counts outcomes.
pub fn simulate(
    doc: &RulesDocument,
    probe: &Probe,
    n: u64,
    seed: u64,
) -> Result<BTreeMap<String, u64>, String> {
    let engine = Engine::new(doc.clone()).map_err(|e| e.to_string())?;
    let mut rng = SplitMix64(seed);
    let mut counts = BTreeMap::new();
    if is_connection(probe) {
        let (sni, destination, port) = connection_view(probe)?;
        let view = ConnectionView {
            port,
            sni: &sni,
            destination: &destination,
            source_ip: Some("127.0.0.1"),
        };
        for _ in 0..n {
            let d =
                engine.decide_connection(&view, &mut rng, &meshroute_core::engine::NoEndpointState);
            let key = match &d {
                ConnectionOutcome::Forward { cluster, .. } => format!("forward {cluster}"),
                ConnectionOutcome::Close { reason } => format!("close ({reason})"),
            };
            *counts.entry(key).or_insert(0) += 1;
            if let ConnectionOutcome::Forward {
                ticket: Some(t), ..
            } = d
            {
                engine.release(t);
            }
        }
        return Ok(counts);
    }
    let headers = probe.all_headers();
    let view = probe.view(&engine, &headers);
    for _ in 0..n {
        let d = engine.decide(&view, &mut rng);
        let mut key = match &d.outcome {
            Outcome::Forward(f) => format!("forward {}", f.cluster),
            Outcome::Reply(r) => match r.flag {
                None => format!("reply {}", r.status),
                Some(f) => format!("reply {} {}", r.status, f.code()),
            },
        };
        if d.delay_ms.is_some() {
            key.push_str(" (delayed)");
        }
        *counts.entry(key).or_insert(0) += 1;
        // Each simulated request is over before the next: LEAST_REQUEST sees an idle cluster.
        if let Outcome::Forward(Forward {
            ticket: Some(t), ..
        }) = d.outcome
        {
            engine.release(t);
        }
    }
    Ok(counts)
}
