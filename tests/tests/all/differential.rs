//! Differential fuzzing of the two hosts: configurations and requests generated from a
//! seed, each request sent to Envoy + filter and to `meshroute run` + filter loaded with the
//! same rules, and everything a client or upstream can observe compared. A difference fails
//! the test with the case minimised into a conformance scenario (Envoy's answer as the
//! expectation), ready for `tests/conformance/`.
//!
//! `MESHROUTE_DIFF_CASES` (default 1,500) bounds the number of requests, 100 per
//! configuration; `MESHROUTE_DIFF_SEED` picks another sequence. `make fuzz` runs many more.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::engine::{Rng as _, SplitMix64};
use meshroute_core::ir::{OutboundPolicy, ProxyKind, RulesDocument};
use meshroute_tests::{get, Envoy, Harness, Response, Running, Upstream};

const SERVICES: usize = 3;
const REQUESTS_PER_CONFIG: usize = 100;

/// The cases' draws, from the engine's seeded SplitMix64.
struct Rng(SplitMix64);

impl Rng {
    fn seeded(seed: u64) -> Self {
        Self(SplitMix64(seed))
    }
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.0.next_u64() % 100 < percent
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

// The literals matches are drawn from and the requests are made of, so that matches hit.
const URI_LITERALS: &[&str] = &["/", "/api", "/api/v1", "/static", "/login", "/API", "/apix"];
const URI_REGEXES: &[&str] = &["/api/v[0-9]+", ".*\\.css", "/(login|logout)", "/a.*", "/"];
const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/v1",
    "/API/v1",
    "/api/v12/items",
    "/static/app.css",
    "/login",
    "/logout",
    "/apix",
    "/other",
];
const QUERIES: &[&str] = &["", "", "?q=1", "?q=abc", "?q=1&r=2", "?r=q"];
const HEADER_VALUES: &[&str] = &["alpha", "beta", "Alpha", "al", "b"];
const HEADER_REGEXES: &[&str] = &["a.*", "(alpha|beta)", "[ab]l.*"];
const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "PUT", "DELETE"];

/// One condition of a match block, rendered as Istio YAML.
#[derive(Clone, Debug)]
struct Match {
    fields: Vec<String>,
}

#[derive(Clone, Debug)]
enum Action {
    Route {
        /// Subsets and weights; one destination has no weight.
        destinations: Vec<(&'static str, Option<u32>)>,
        rewrite: Option<String>,
        fault: Option<u16>,
    },
    Redirect(String),
    Direct {
        status: u16,
        body: Option<&'static str>,
    },
}

#[derive(Clone, Debug)]
struct Route {
    matches: Vec<Match>,
    action: Action,
    /// `headers:` of the route, rendered.
    headers: Option<String>,
}

#[derive(Clone, Debug)]
struct Generated {
    gateway: bool,
    /// One VirtualService per service index (absent: the service has none).
    virtual_services: Vec<(usize, Vec<Route>)>,
}

fn service(i: usize) -> String {
    format!("s{i}")
}

fn port(i: usize) -> u16 {
    8000 + i as u16
}

fn gen_match(rng: &mut Rng) -> Match {
    let mut fields = Vec::new();
    if rng.chance(65) {
        let uri = match rng.below(3) {
            0 => format!("exact: \"{}\"", rng.pick(URI_LITERALS)),
            1 => format!("prefix: \"{}\"", rng.pick(URI_LITERALS)),
            _ => format!("regex: \"{}\"", rng.pick(URI_REGEXES).replace('\\', "\\\\")),
        };
        fields.push(format!("uri: {{{uri}}}"));
        if rng.chance(15) {
            fields.push("ignoreUriCase: true".into());
        }
    }
    if rng.chance(20) {
        fields.push(format!(
            "method: {{exact: {}}}",
            rng.pick(&["GET", "POST", "PUT"])
        ));
    }
    if rng.chance(30) {
        let name = rng.pick(&["x-a", "x-b"]);
        let value = match rng.below(3) {
            0 => format!("exact: \"{}\"", rng.pick(HEADER_VALUES)),
            1 => format!("prefix: \"{}\"", rng.pick(&["al", "b", "A"])),
            _ => format!("regex: \"{}\"", rng.pick(HEADER_REGEXES)),
        };
        fields.push(format!("headers: {{{name}: {{{value}}}}}"));
    }
    if rng.chance(20) {
        let value = if rng.chance(50) {
            format!("exact: \"{}\"", rng.pick(&["1", "abc"]))
        } else {
            "regex: \"[0-9]+\"".into()
        };
        fields.push(format!("queryParams: {{q: {{{value}}}}}"));
    }
    if rng.chance(10) {
        fields.push(format!(
            "withoutHeaders: {{x-b: {{exact: \"{}\"}}}}",
            rng.pick(HEADER_VALUES)
        ));
    }
    Match { fields }
}

fn gen_headers(rng: &mut Rng) -> Option<String> {
    if !rng.chance(35) {
        return None;
    }
    let mut parts = Vec::new();
    let mut request = Vec::new();
    if rng.chance(50) {
        request.push(format!("set: {{x-hc: \"{}\"}}", rng.pick(&["one", "two"])));
    }
    if rng.chance(40) {
        request.push(format!(
            "add: {{{}: \"added\"}}",
            rng.pick(&["x-hd", "x-a"])
        ));
    }
    if rng.chance(30) {
        request.push(format!("remove: [{}]", rng.pick(&["x-a", "x-b"])));
    }
    if !request.is_empty() {
        parts.push(format!("request: {{{}}}", request.join(", ")));
    }
    let mut response = Vec::new();
    if rng.chance(50) {
        response.push(format!("set: {{x-ra: \"{}\"}}", rng.pick(&["r1", "r2"])));
    }
    if rng.chance(30) {
        response.push("add: {x-rb: \"more\"}".to_string());
    }
    if rng.chance(20) {
        response.push("remove: [content-type]".to_string());
    }
    if !response.is_empty() {
        parts.push(format!("response: {{{}}}", response.join(", ")));
    }
    (!parts.is_empty()).then(|| format!("{{{}}}", parts.join(", ")))
}

fn gen_action(rng: &mut Rng) -> Action {
    match rng.below(20) {
        0..=11 => {
            let destinations = if rng.chance(75) {
                vec![(rng.pick(&["v1", "v2"]), None)]
            } else {
                let first = rng.pick(&["v1", "v2"]);
                let other = if first == "v1" { "v2" } else { "v1" };
                vec![(first, Some(100)), (other, Some(0))]
            };
            let rewrite = rng.chance(30).then(|| {
                let mut parts = Vec::new();
                match rng.below(3) {
                    0 => parts.push(format!("uri: \"{}\"", rng.pick(&["/", "/v2", "/new/"]))),
                    1 => parts.push(
                        "uriRegexRewrite: {match: \"^/api/(.*)$\", rewrite: \"/v2/\\\\1\"}"
                            .to_string(),
                    ),
                    _ => {}
                }
                if parts.is_empty() || rng.chance(30) {
                    parts.push("authority: \"rewritten.example\"".to_string());
                }
                format!("{{{}}}", parts.join(", "))
            });
            let fault = rng
                .chance(15)
                .then(|| *[418u16, 503].get(rng.below(2)).unwrap());
            Action::Route {
                destinations,
                rewrite,
                fault,
            }
        }
        12..=15 => {
            let mut parts = Vec::new();
            if rng.chance(70) {
                parts.push(format!(
                    "uri: \"{}\"",
                    rng.pick(&["/moved", "/", "/new/place"])
                ));
            }
            if rng.chance(40) {
                parts.push(format!(
                    "authority: \"{}\"",
                    rng.pick(&["new.example", "other.example:8443"])
                ));
            }
            if rng.chance(30) {
                parts.push("scheme: https".to_string());
            }
            if rng.chance(20) {
                parts.push("port: 9443".to_string());
            }
            // A redirect must change something (istiod): the URI at least.
            if parts.is_empty() {
                parts.push("uri: /moved".to_string());
            }
            if rng.chance(50) {
                parts.push(format!(
                    "redirectCode: {}",
                    rng.pick(&["302", "307", "308", "303"])
                ));
            }
            Action::Redirect(format!("{{{}}}", parts.join(", ")))
        }
        _ => Action::Direct {
            status: *[200u16, 404, 503, 418].get(rng.below(4)).unwrap(),
            body: rng
                .chance(60)
                .then(|| rng.pick(&["direct answer", "{\"ok\":true}"])),
        },
    }
}

fn gen_config(rng: &mut Rng) -> Generated {
    let gateway = rng.chance(30);
    let mut virtual_services = Vec::new();
    for i in 0..SERVICES {
        // A sidecar service without a VirtualService is routed by the registry alone.
        if !gateway && rng.chance(15) {
            continue;
        }
        let n = 1 + rng.below(4);
        let mut routes = Vec::new();
        for r in 0..n {
            let last = r + 1 == n;
            let blocks = if last && rng.chance(50) {
                0
            } else {
                1 + rng.below(2)
            };
            let matches = (0..blocks).map(|_| gen_match(rng)).collect();
            routes.push(Route {
                matches,
                action: gen_action(rng),
                headers: gen_headers(rng),
            });
        }
        virtual_services.push((i, routes));
    }
    Generated {
        gateway,
        virtual_services,
    }
}

/// The Istio YAML of a generated configuration (without the registry).
fn render(g: &Generated) -> String {
    let mut y = String::new();
    if g.gateway {
        y.push_str("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n---\n");
    }
    for i in 0..SERVICES {
        let s = service(i);
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {s}, namespace: default}}\nspec:\n  host: {s}.default.svc.cluster.local\n  subsets:\n  - {{name: v1, labels: {{version: {s}-v1}}}}\n  - {{name: v2, labels: {{version: {s}-v2}}}}\n---\n"
        );
    }
    for (i, routes) in &g.virtual_services {
        let s = service(*i);
        let (hosts, gateways) = if g.gateway {
            (
                format!("[{s}.example.com]"),
                "\n  gateways: [istio-system/gw]",
            )
        } else {
            (format!("[{s}]"), "")
        };
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {s}, namespace: default}}\nspec:\n  hosts: {hosts}{gateways}\n  http:\n"
        );
        for route in routes {
            let mut items = Vec::new();
            if !route.matches.is_empty() {
                let blocks: Vec<String> = route
                    .matches
                    .iter()
                    .map(|m| format!("{{{}}}", m.fields.join(", ")))
                    .collect();
                items.push(format!("match: [{}]", blocks.join(", ")));
            }
            match &route.action {
                Action::Route {
                    destinations,
                    rewrite,
                    fault,
                } => {
                    let dests: Vec<String> = destinations
                        .iter()
                        .map(|(subset, weight)| {
                            let w = weight.map(|w| format!(", weight: {w}")).unwrap_or_default();
                            format!(
                                "{{destination: {{host: {s}.default.svc.cluster.local, port: {{number: {}}}, subset: {subset}}}{w}}}",
                                port(*i)
                            )
                        })
                        .collect();
                    items.push(format!("route: [{}]", dests.join(", ")));
                    if let Some(r) = rewrite {
                        items.push(format!("rewrite: {r}"));
                    }
                    if let Some(status) = fault {
                        items.push(format!(
                            "fault: {{abort: {{httpStatus: {status}, percentage: {{value: 100}}}}}}"
                        ));
                    }
                }
                Action::Redirect(r) => items.push(format!("redirect: {r}")),
                Action::Direct { status, body } => {
                    let body = body
                        .map(|b| format!(", body: {{string: '{b}'}}"))
                        .unwrap_or_default();
                    items.push(format!("directResponse: {{status: {status}{body}}}"));
                }
            }
            if let Some(h) = &route.headers {
                items.push(format!("headers: {h}"));
            }
            let _ = writeln!(y, "  - {}", items.join("\n    "));
        }
        y.push_str("---\n");
    }
    y
}

/// Kubernetes Services `s0..` with two instances each, as WorkloadEntries on `ports`.
fn registry(ports: &BTreeMap<String, u16>) -> String {
    let mut y = String::new();
    for i in 0..SERVICES {
        let s = service(i);
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {s}, namespace: default}}\nspec:\n  selector: {{app: {s}}}\n  ports: [{{name: http, port: {}}}]\n---\n",
            port(i)
        );
        for v in ["v1", "v2"] {
            let name = format!("{s}-{v}");
            let _ = write!(
                y,
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {}}}\n  labels: {{app: {s}, version: {name}}}\n---\n",
                ports[&name]
            );
        }
    }
    y
}

#[derive(Clone, Debug)]
struct Request {
    /// The service the authority names (`None`: one the registry does not know).
    service: Option<usize>,
    method: &'static str,
    authority: String,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
}

fn gen_request(rng: &mut Rng, gateway: bool) -> Request {
    let i = rng.below(SERVICES);
    let s = service(i);
    let unknown = rng.below(10) == 0;
    let authority = if gateway {
        match rng.below(10) {
            _ if unknown => "nosuch.example.com".into(),
            1 | 2 => format!("{s}.example.com:80"),
            _ => format!("{s}.example.com"),
        }
    } else {
        match rng.below(10) {
            _ if unknown => "nosuch:9000".into(),
            1 => format!("{s}.default:{}", port(i)),
            2 => format!("{s}.default.svc.cluster.local:{}", port(i)),
            _ => format!("{s}:{}", port(i)),
        }
    };
    let path = format!("{}{}", rng.pick(PATHS), rng.pick(QUERIES));
    let mut headers = Vec::new();
    if rng.chance(40) {
        headers.push(("x-a", rng.pick(HEADER_VALUES)));
    }
    if rng.chance(25) {
        headers.push(("x-b", rng.pick(HEADER_VALUES)));
    }
    Request {
        service: (!unknown).then_some(i),
        method: rng.pick(METHODS),
        authority,
        path,
        headers,
    }
}

/// Everything of an exchange a client or upstream can observe and the rules decide.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    status: u16,
    /// The instance that answered.
    upstream: Option<String>,
    /// Response headers the rules set or remove, sorted.
    response_headers: Vec<(String, String)>,
    /// The body of a reply no upstream made.
    local_body: Option<String>,
    upstream_method: Option<String>,
    upstream_path: Option<String>,
    /// Request headers at the upstream that the rules or the client set, sorted.
    upstream_headers: Vec<(String, String)>,
}

fn observe(r: &Response) -> Observed {
    let upstream = r.header("x-upstream").map(str::to_owned);
    let mut response_headers: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-r") || k == "location" || k == "content-type")
        .cloned()
        .collect();
    response_headers.sort();
    let mut o = Observed {
        status: r.status,
        upstream: upstream.clone(),
        response_headers,
        local_body: None,
        upstream_method: None,
        upstream_path: None,
        upstream_headers: Vec::new(),
    };
    match upstream {
        None => o.local_body = Some(r.text()),
        Some(_) => {
            let report = r.report();
            o.upstream_method = report["method"].as_str().map(str::to_owned);
            o.upstream_path = report["path"].as_str().map(str::to_owned);
            let mut seen: Vec<(String, String)> = report["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|kv| {
                    let k = kv[0].as_str()?.to_owned();
                    let v = kv[1].as_str()?.to_owned();
                    (k == "host"
                        || k.starts_with("x-a")
                        || k.starts_with("x-b")
                        || k.starts_with("x-h"))
                    .then_some((k, v))
                })
                .collect();
            seen.sort();
            o.upstream_headers = seen;
        }
    }
    o
}

/// What `host` answers to `req` under `g`. A service without a VirtualService balances
/// over both its instances, each host by its own choice: then only the service counts.
fn send(host: &dyn Running, g: &Generated, req: &Request) -> Observed {
    let mut r = get(&req.authority, &req.path).method(req.method);
    for (k, v) in &req.headers {
        r = r.header(k, v);
    }
    let mut o = observe(&host.send(&r));
    let balanced = req
        .service
        .is_some_and(|i| g.virtual_services.iter().all(|(s, _)| *s != i));
    if balanced {
        if let Some(u) = o.upstream.as_mut() {
            u.truncate(u.find('-').unwrap_or(u.len()));
        }
    }
    o
}

fn compile_rules(g: &Generated, ports: &BTreeMap<String, u16>) -> RulesDocument {
    let yaml = format!("{}{}", registry(ports), render(g));
    let mut config = Config::default();
    let diags = config.add_text("generated.yaml", &yaml);
    assert!(
        diags.iter().all(|d| !d.is_error()),
        "the generator made invalid YAML: {diags:?}\n{yaml}"
    );
    let proxy = if g.gateway {
        ProxyOptions::gateway("istio-system")
    } else {
        ProxyOptions::sidecar("default")
    };
    let mesh = MeshOptions {
        outbound_traffic_policy: OutboundPolicy::RegistryOnly,
        ..MeshOptions::default()
    };
    let out = compile(&config, &proxy, &mesh);
    assert!(
        !out.has_errors(),
        "the generator made a configuration istiod would reject: {:?}\n{yaml}",
        out.diagnostics
    );
    let doc = out.document.expect("document");
    assert_eq!(
        doc.proxy.kind,
        if g.gateway {
            ProxyKind::Gateway
        } else {
            ProxyKind::Sidecar
        }
    );
    doc
}

/// Both hosts' observations of `req` under `g`, each host started afresh.
fn both(g: &Generated, ports: &BTreeMap<String, u16>, req: &Request) -> (Observed, Observed) {
    let doc = compile_rules(g, ports);
    let envoy = Envoy::start(&doc);
    let harness = Harness::start(&doc);
    (send(&envoy, g, req), send(&harness, g, req))
}

/// The smallest configuration found that still shows the difference for `req`: other
/// VirtualServices, then routes, then each route's optional parts dropped while it does.
fn minimise(g: &Generated, ports: &BTreeMap<String, u16>, req: &Request) -> Generated {
    let differs = |c: &Generated| {
        let (e, h) = both(c, ports, req);
        e != h
    };
    let mut best = g.clone();
    let keep_only: Vec<usize> = (0..best.virtual_services.len()).collect();
    for idx in keep_only.into_iter().rev() {
        let mut c = best.clone();
        c.virtual_services.remove(idx);
        if differs(&c) {
            best = c;
        }
    }
    for v in 0..best.virtual_services.len() {
        let mut r = best.virtual_services[v].1.len();
        while r > 0 {
            r -= 1;
            if best.virtual_services[v].1.len() > 1 {
                let mut c = best.clone();
                c.virtual_services[v].1.remove(r);
                if differs(&c) {
                    best = c;
                    continue;
                }
            }
            let mut c = best.clone();
            let route = &mut c.virtual_services[v].1[r];
            let mut changed = false;
            if route.headers.take().is_some() {
                changed = true;
            }
            if !route.matches.is_empty() {
                route.matches.clear();
                changed = true;
            }
            if let Action::Route { rewrite, fault, .. } = &mut route.action {
                changed |= rewrite.take().is_some() | fault.take().is_some();
            }
            if changed && differs(&c) {
                best = c;
            }
        }
    }
    best
}

/// A conformance scenario for the case, Envoy's answer as what is expected.
fn scenario(name: &str, g: &Generated, req: &Request, envoy: &Observed) -> String {
    let mut s = format!(
        "- name: {name}\n  source: differential fuzzing of the hosts (tests/tests/all/differential.rs)\n"
    );
    let _ = writeln!(
        s,
        "  proxy: {{gateway: {}, registry_only: true}}",
        g.gateway
    );
    let services: Vec<String> = (0..SERVICES)
        .map(|i| {
            let n = service(i);
            format!(
                "{n}: {{port: {}, instances: {{{n}-v1: {{}}, {n}-v2: {{}}}}}}",
                port(i)
            )
        })
        .collect();
    let _ = writeln!(s, "  services: {{{}}}", services.join(", "));
    s.push_str("  config: |\n");
    for line in render(g).lines() {
        let _ = writeln!(s, "    {line}");
    }
    let headers: Vec<String> = req
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: \"{v}\""))
        .collect();
    let mut expect = vec![format!("status: {}", envoy.status)];
    expect.push(format!(
        "upstream: {}",
        envoy.upstream.as_deref().unwrap_or("none")
    ));
    if let Some(p) = &envoy.upstream_path {
        expect.push(format!("upstream_path: \"{p}\""));
    }
    let _ = writeln!(
        s,
        "  steps:\n  - {{method: {}, authority: \"{}\", path: \"{}\", headers: {{{}}}, expect: {{{}}}}}",
        req.method,
        req.authority,
        req.path,
        headers.join(", "),
        expect.join(", ")
    );
    s
}

#[test]
fn both_hosts_answer_generated_configurations_and_requests_alike() {
    let cases: usize = meshroute_tests::env_number("MESHROUTE_DIFF_CASES", 1_500);
    let seed: u64 = meshroute_tests::env_number("MESHROUTE_DIFF_SEED", 0x6d65_7368);
    let upstreams: Vec<Upstream> = (0..SERVICES)
        .flat_map(|i| ["v1", "v2"].map(|v| Upstream::start(&format!("{}-{v}", service(i)))))
        .collect();
    let ports: BTreeMap<String, u16> = upstreams.iter().map(|u| (u.name.clone(), u.port)).collect();
    let configs = cases.div_ceil(REQUESTS_PER_CONFIG);
    let (mut sent, mut by_status) = (0usize, BTreeMap::<u16, usize>::new());
    for c in 0..configs {
        let mut rng = Rng::seeded(seed ^ (c as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let g = gen_config(&mut rng);
        let doc = compile_rules(&g, &ports);
        let envoy = Envoy::start(&doc);
        let harness = Harness::start(&doc);
        for r in 0..REQUESTS_PER_CONFIG.min(cases - sent) {
            let req = gen_request(&mut rng, g.gateway);
            let (e, h) = (send(&envoy, &g, &req), send(&harness, &g, &req));
            sent += 1;
            *by_status.entry(e.status).or_default() += 1;
            if e != h {
                drop((envoy, harness));
                let small = minimise(&g, &ports, &req);
                let (e2, h2) = both(&small, &ports, &req);
                panic!(
                    "configuration {c} (seed {seed}), request {r}: {req:?}\nenvoy:   {e:?}\nharness: {h:?}\n\
                     minimised (envoy {e2:?}, harness {h2:?}):\n{}",
                    scenario(&format!("differential-{seed}-{c}-{r}"), &small, &req, &e2)
                );
            }
        }
        let line = format!("differential: [{}/{configs}] {sent} cases alike\n", c + 1);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "differential: {sent} cases over {configs} configurations, statuses {by_status:?}\n"
        )
        .as_bytes(),
    );
    // The generator must reach the rules' different outcomes, not only one.
    assert!(
        by_status.len() >= 4,
        "generated cases reached too few outcomes: {by_status:?}"
    );
    assert_eq!(sent, cases);
}
