//! The engine from rules documents written by hand: host lookup, route order and matches,
//! splits, rewrites, redirects, direct responses, faults, unknown hosts and endpoints. One
//! table row per behaviour, as linkerd's route-matching tests.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;

use base64::Engine as _;
use wasm_bindgen_test::wasm_bindgen_test;

use super::*;
use crate::ir::*;

/// Draws the scripted values in turn (then zeros).
struct Scripted(Vec<u64>);

impl Rng for Scripted {
    fn next_u64(&mut self) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.remove(0)
        }
    }
}

/// The fraction `n/d` of `u64`'s range: `below(m)` then gives `m*n/d`.
fn at(n: u64, d: u64) -> u64 {
    ((u128::from(u64::MAX) * u128::from(n)) / u128::from(d)) as u64
}

fn dest(host: &str, subset: &str, weight: u32) -> Destination {
    Destination {
        host: host.into(),
        subset: subset.into(),
        port: Some(80),
        weight,
        ..Destination::default()
    }
}

fn forward_to(dests: Vec<Destination>) -> Action {
    Action::Route(RouteAction {
        destinations: dests,
        rewrite: None,
    })
}

fn route(name: &str, matches: Vec<RouteMatch>, action: Action) -> Route {
    Route {
        name: name.into(),
        matches,
        action,
        ..Route::default()
    }
}

fn cluster(host: &str, subset: &str, endpoints: &[&str]) -> Cluster {
    Cluster {
        name: cluster_name(80, subset, host),
        service: host.into(),
        port: 80,
        subset: subset.into(),
        discovery: Discovery::Static,
        endpoints: endpoints
            .iter()
            .map(|a| Endpoint {
                address: (*a).into(),
                port: 80,
                weight: 1,
                labels: BTreeMap::new(),
                locality: String::new(),
            })
            .collect(),
        connect_timeout_ms: 1000,
        lb: LoadBalancer {
            policy: LbPolicy::RoundRobin,
            ..LoadBalancer::default()
        },
        ..Cluster::default()
    }
}

fn doc(kind: ProxyKind, outbound: OutboundPolicy, vhosts: Vec<VirtualHost>) -> RulesDocument {
    RulesDocument {
        version: VERSION,
        proxy: ProxyIdentity {
            kind,
            namespace: "default".into(),
            ..ProxyIdentity::default()
        },
        outbound_traffic_policy: outbound,
        route_tables: vec![RouteTable {
            port: 80,
            virtual_hosts: vhosts,
        }],
        clusters: vec![
            cluster("a.svc", "", &["10.0.0.1", "10.0.0.2"]),
            cluster("a.svc", "v2", &["10.0.0.3"]),
            cluster("b.svc", "", &["10.0.1.1"]),
            cluster("empty.svc", "", &[]),
        ],
        ..RulesDocument::default()
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| (*d).to_string()).collect(),
        require_tls: false,
        routes,
        source: None,
    }
}

struct Req<'a> {
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    headers: Vec<(String, String)>,
}

fn req<'a>(authority: &'a str, path: &'a str) -> Req<'a> {
    Req {
        method: "GET",
        authority,
        path,
        headers: Vec::new(),
    }
}

impl Req<'_> {
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }

    /// The request as the engine sees it, on port 80.
    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: self.method,
            scheme: "http",
            authority: self.authority,
            path: self.path,
            port: 80,
            headers: &self.headers,
            source_ip: None,
            transparent: false,
        }
    }
}

/// What a decision comes to, in one line: `forward CLUSTER ENDPOINT [path] [authority]` or
/// `reply STATUS [FLAG]`.
fn outcome(engine: &Engine, r: &Req<'_>, rng: &mut dyn Rng) -> String {
    match engine.decide(&r.view(), rng).outcome {
        Outcome::Forward(f) => {
            let mut s = format!("forward {} {}", f.cluster, f.endpoint.unwrap_or_default());
            if let Some(p) = f.path {
                s.push_str(&format!(" path={p}"));
            }
            if let Some(a) = f.authority {
                s.push_str(&format!(" authority={a}"));
            }
            s
        }
        Outcome::Reply(reply) => {
            let mut s = format!("reply {}", reply.status);
            if let Some(flag) = reply.flag {
                s.push_str(&format!(" {}", flag.code()));
            }
            if let Some((_, l)) = reply.headers.iter().find(|(k, _)| k == "location") {
                s.push_str(&format!(" location={l}"));
            }
            if !reply.body.is_empty() {
                s.push_str(&format!(" body={}", String::from_utf8_lossy(&reply.body)));
            }
            s
        }
    }
}

fn uri(m: StringMatch) -> RouteMatch {
    RouteMatch {
        uri: Some(m),
        ..RouteMatch::default()
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn hosts_match_exact_then_longest_wildcard_then_any() {
    let only = |name: &str| vec![route(name, vec![], forward_to(vec![dest("b.svc", "", 1)]))];
    let engine = Engine::new(doc(
        ProxyKind::Gateway,
        OutboundPolicy::AllowAny,
        vec![
            vhost("any", &["*"], only("any")),
            vhost("wild", &["*.example.com"], only("wild")),
            vhost("deep", &["*.api.example.com"], only("deep")),
            vhost("exact", &["www.example.com"], only("exact")),
        ],
    ))
    .unwrap();
    for (authority, expected) in [
        ("www.example.com", "exact"),
        ("WWW.Example.COM:8080", "exact"),
        ("www.example.com.", "exact"),
        ("shop.example.com", "wild"),
        ("v1.api.example.com", "deep"),
        ("example.com", "any"),
        ("other.org", "any"),
    ] {
        let view = RequestView {
            method: "GET",
            scheme: "http",
            authority,
            path: "/",
            port: 80,
            headers: &[],
            source_ip: None,
            transparent: false,
        };
        let d = engine.decide(&view, &mut SplitMix64(1));
        assert_eq!(d.vhost, Some(expected), "{authority}");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn the_first_matching_route_decides() {
    let header = |name: &str, m: StringMatch, invert: bool| RouteMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            matcher: m,
            invert,
        }],
        ..RouteMatch::default()
    };
    let to = |host: &str, subset: &str| forward_to(vec![dest(host, subset, 1)]);
    let routes = vec![
        route(
            "jason",
            vec![header(
                "end-user",
                StringMatch::Exact("jason".into()),
                false,
            )],
            to("a.svc", "v2"),
        ),
        route(
            "api",
            vec![
                uri(StringMatch::Prefix("/api".into())),
                // A named match: Istio names its Envoy route `<route>.<match>`.
                RouteMatch {
                    name: "versioned".into(),
                    ..uri(StringMatch::Regex("/v[0-9]+/.*".into()))
                },
            ],
            to("b.svc", ""),
        ),
        route(
            "case",
            vec![RouteMatch {
                uri: Some(StringMatch::Exact("/Login".into())),
                ignore_uri_case: true,
                ..RouteMatch::default()
            }],
            to("b.svc", ""),
        ),
        route(
            "no-debug",
            vec![header("x-debug", StringMatch::Present, true)],
            to("a.svc", ""),
        ),
        route("rest", vec![], Action::default()),
    ];
    let engine = Engine::new(doc(
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
        vec![vhost("a", &["a"], routes)],
    ))
    .unwrap();
    let cases = [
        (req("a", "/").header("end-user", "jason"), "jason"),
        (req("a", "/api/x").header("end-user", "bob"), "api"),
        (req("a", "/v2/items"), "api.versioned"),
        (req("a", "/login"), "case"),
        (req("a", "/apix?x=1"), "api"),
        (req("a", "/other"), "no-debug"),
        (req("a", "/other").header("x-debug", ""), "rest"),
    ];
    for (r, expected) in cases {
        assert_eq!(
            engine.decide(&r.view(), &mut SplitMix64(1)).route,
            Some(expected),
            "{}",
            r.path
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn weights_split_and_endpoints_rotate() {
    let routes = vec![route(
        "split",
        vec![],
        forward_to(vec![dest("a.svc", "", 75), dest("a.svc", "v2", 25)]),
    )];
    let engine = Engine::new(doc(
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
        vec![vhost("a", &["a"], routes)],
    ))
    .unwrap();
    let r = req("a", "/");
    assert_eq!(
        outcome(&engine, &r, &mut Scripted(vec![at(74, 100)])),
        "forward outbound|80||a.svc 10.0.0.1:80"
    );
    assert_eq!(
        outcome(&engine, &r, &mut Scripted(vec![at(76, 100)])),
        "forward outbound|80|v2|a.svc 10.0.0.3:80"
    );
    // Round robin over the subset-less cluster's two endpoints.
    let mut seen: Vec<String> = (0..4)
        .map(|_| outcome(&engine, &r, &mut Scripted(vec![0])))
        .collect();
    seen.dedup();
    assert_eq!(seen.len(), 4, "endpoints alternate: {seen:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn rewrites_redirects_and_direct_responses() {
    let rewrite = |uri: Option<&str>, regex: Option<(&str, &str)>, authority: Option<&str>| {
        Action::Route(RouteAction {
            destinations: vec![dest("b.svc", "", 1)],
            rewrite: Some(Rewrite {
                uri: uri.map(str::to_owned),
                uri_regex: regex.map(|(p, s)| RegexRewrite {
                    pattern: p.into(),
                    substitution: s.into(),
                }),
                authority: authority.map(str::to_owned),
            }),
        })
    };
    let routes = vec![
        route(
            "prefix",
            vec![uri(StringMatch::Prefix("/old".into()))],
            rewrite(Some("/new"), None, Some("b.internal")),
        ),
        route(
            "regex",
            vec![uri(StringMatch::Prefix("/users".into()))],
            rewrite(None, Some(("^/users/([0-9]+)$", "/u/\\1")), None),
        ),
        route(
            "moved",
            vec![uri(StringMatch::Prefix("/moved".into()))],
            Action::Redirect(Redirect {
                uri: None,
                prefix_rewrite: Some("/here".into()),
                authority: Some("example.com".into()),
                scheme: Some("https".into()),
                port: Some(RedirectPort::Number(8443)),
                status: 308,
            }),
        ),
        route(
            "hello",
            vec![uri(StringMatch::Exact("/hello".into()))],
            Action::DirectResponse(DirectResponse {
                status: 200,
                body: Some(base64::engine::general_purpose::STANDARD.encode("hi")),
            }),
        ),
        route(
            "gone",
            vec![uri(StringMatch::Prefix("/empty".into()))],
            forward_to(vec![dest("empty.svc", "", 1)]),
        ),
        route(
            "nowhere",
            vec![uri(StringMatch::Prefix("/nowhere".into()))],
            forward_to(vec![dest("missing.svc", "", 1)]),
        ),
    ];
    let engine = Engine::new(doc(
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
        vec![vhost("a", &["a"], routes)],
    ))
    .unwrap();
    let rng = &mut SplitMix64(1);
    for (path, expected) in [
        (
            "/old/x?q=1",
            "forward outbound|80||b.svc 10.0.1.1:80 path=/new/x?q=1 authority=b.internal",
        ),
        (
            "/users/42",
            "forward outbound|80||b.svc 10.0.1.1:80 path=/u/42",
        ),
        (
            "/moved/a?b=c",
            "reply 308 location=https://example.com:8443/here/a?b=c",
        ),
        ("/hello", "reply 200 body=hi"),
        ("/empty", "reply 503 UH body=no healthy upstream"),
        ("/nowhere", "reply 503 NC"),
        ("/none", "reply 404 NR"),
    ] {
        assert_eq!(outcome(&engine, &req("a", path), rng), expected, "{path}");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn faults_are_sampled_per_million() {
    let mut r = route("f", vec![], forward_to(vec![dest("b.svc", "", 1)]));
    r.fault = Some(Fault {
        delay: Some(FaultDelay {
            delay_ms: 2000,
            per_million: 500_000,
        }),
        abort: Some(FaultAbort {
            http_status: Some(418),
            grpc_status: None,
            per_million: 100_000,
        }),
    });
    let engine = Engine::new(doc(
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
        vec![vhost("a", &["a"], vec![r])],
    ))
    .unwrap();
    let view = RequestView {
        method: "GET",
        scheme: "http",
        authority: "a",
        path: "/",
        port: 80,
        headers: &[],
        source_ip: None,
        transparent: false,
    };
    // The delay draw comes first, then the abort draw.
    let d = engine.decide(&view, &mut Scripted(vec![at(1, 4), at(1, 20)]));
    assert_eq!(d.delay_ms, Some(2000));
    assert!(matches!(d.outcome, Outcome::Reply(ref r) if r.status == 418));
    let d = engine.decide(&view, &mut Scripted(vec![at(3, 4), at(1, 2)]));
    assert_eq!(d.delay_ms, None);
    assert!(matches!(d.outcome, Outcome::Forward(_)));
}

#[wasm_bindgen_test(unsupported = test)]
fn unknown_hosts_follow_the_proxy_and_its_outbound_policy() {
    // With the route Istio's catch-all virtual host names (`allow_any`, `block_all`).
    let cases = [
        (
            ProxyKind::Sidecar,
            OutboundPolicy::AllowAny,
            "forward PassthroughCluster example.org:8080",
            Some("allow_any"),
        ),
        (
            ProxyKind::Sidecar,
            OutboundPolicy::RegistryOnly,
            "reply 502",
            Some("block_all"),
        ),
        (
            ProxyKind::Gateway,
            OutboundPolicy::AllowAny,
            "reply 404 NR",
            None,
        ),
    ];
    for (kind, outbound, expected, route) in cases {
        let engine = Engine::new(doc(kind, outbound, vec![])).unwrap();
        let r = req("example.org:8080", "/");
        assert_eq!(
            outcome(&engine, &r, &mut SplitMix64(1)),
            expected,
            "{kind:?} {outbound:?}"
        );
        assert_eq!(engine.decide(&r.view(), &mut SplitMix64(1)).route, route);
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn unknown_hosts_of_captured_connections_go_to_their_original_destination() {
    let mut d = doc(ProxyKind::Sidecar, OutboundPolicy::AllowAny, vec![]);
    let engine = Engine::new(d.clone()).unwrap();
    let view = |transparent| RequestView {
        method: "GET",
        scheme: "http",
        authority: "example.org:8080",
        path: "/",
        port: 80,
        headers: &[],
        source_ip: None,
        transparent,
    };
    let endpoint =
        |e: &Engine, transparent| match e.decide(&view(transparent), &mut SplitMix64(1)).outcome {
            Outcome::Forward(f) => (f.cluster.into_owned(), f.endpoint),
            Outcome::Reply(r) => (format!("reply {}", r.status), None),
        };
    // Explicit proxy: the authority; captured: the host's original destination.
    assert_eq!(
        endpoint(&engine, false),
        ("PassthroughCluster".into(), Some("example.org:8080".into()))
    );
    assert_eq!(endpoint(&engine, true), ("PassthroughCluster".into(), None));
    // Inside Istio the PassthroughCluster is ORIGINAL_DST on the connection's destination.
    d.proxy.endpoint_selection = EndpointSelection::Host;
    let in_istio = Engine::new(d).unwrap();
    assert_eq!(
        endpoint(&in_istio, false),
        ("PassthroughCluster".into(), None)
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn unrouted_connections_pass_through_under_allow_any_but_never_to_loopback() {
    let table = L4Table {
        port: 5432,
        auto_passthrough: false,
        routes: vec![L4Route {
            name: "db".into(),
            matches: vec![L4Match {
                sni_hosts: vec![],
                destination_subnets: vec!["10.9.0.0/16".into()],
            }],
            destinations: vec![dest("a.svc", "", 1)],
            source: None,
        }],
    };
    let decide = |kind, outbound, destination: &str| {
        let mut d = doc(kind, outbound, vec![]);
        d.l4_tables = vec![table.clone()];
        let engine = Engine::new(d).unwrap();
        let conn = ConnectionView {
            port: 5432,
            sni: "",
            destination,
            source_ip: None,
        };
        match engine.decide_connection(&conn, &mut SplitMix64(1), &NoEndpointState) {
            ConnectionOutcome::Forward {
                cluster, endpoint, ..
            } => {
                format!("{cluster} {}", endpoint.unwrap_or_default())
            }
            ConnectionOutcome::Close { reason } => format!("closed: {reason}"),
        }
    };
    let (s, g) = (ProxyKind::Sidecar, ProxyKind::Gateway);
    let (any, only) = (OutboundPolicy::AllowAny, OutboundPolicy::RegistryOnly);
    assert!(decide(s, any, "10.9.0.7:5432").starts_with("outbound|80||a.svc"));
    assert_eq!(
        decide(s, any, "10.20.0.1:5432"),
        "PassthroughCluster 10.20.0.1:5432"
    );
    for (kind, outbound, destination) in [
        (s, only, "10.20.0.1:5432"),
        (g, any, "10.20.0.1:5432"),
        // An explicit listener's own address, or the capture port: passing it on would loop.
        (s, any, "127.0.0.1:5432"),
        (s, any, "[::1]:5432"),
    ] {
        assert_eq!(
            decide(kind, outbound, destination),
            "closed: no route matches the connection",
            "{kind:?} {outbound:?} {destination}"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn a_tls_only_host_redirects_plain_text() {
    let mut v = vhost(
        "a",
        &["a.example.com"],
        vec![route("r", vec![], forward_to(vec![dest("b.svc", "", 1)]))],
    );
    v.require_tls = true;
    let engine = Engine::new(doc(ProxyKind::Gateway, OutboundPolicy::AllowAny, vec![v])).unwrap();
    assert_eq!(
        outcome(&engine, &req("a.example.com", "/x?y"), &mut SplitMix64(1)),
        "reply 301 location=https://a.example.com/x?y"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn documents_that_cannot_run_are_refused() {
    let mut d = doc(ProxyKind::Sidecar, OutboundPolicy::AllowAny, vec![]);
    d.version = VERSION + 1;
    assert!(matches!(Engine::new(d), Err(BuildError::Version { .. })));
    let bad = vhost(
        "a",
        &["a"],
        vec![route(
            "r",
            vec![uri(StringMatch::Regex("(".into()))],
            Action::default(),
        )],
    );
    let err =
        Engine::new(doc(ProxyKind::Sidecar, OutboundPolicy::AllowAny, vec![bad])).unwrap_err();
    assert!(matches!(err, BuildError::Regex { .. }), "{err}");
}
