//! Cost of one routing decision as the number of services grows (20 routes per host; the
//! request matches the last route, so every matcher of the host runs).
#![allow(clippy::expect_used, reason = "benchmark setup fails loudly")]

use meshroute_core::engine::{Engine, Forward, Outcome, RequestView, SplitMix64};
use meshroute_core::ir::{
    self, Action, Cluster, Destination, Discovery, Endpoint, HeaderMatch, RouteAction, RouteMatch,
    RouteTable, RulesDocument, StringMatch, VirtualHost,
};

// Counts allocations, so `load_rules` also shows the memory a loaded rule set keeps:
// bytes allocated minus bytes freed while loading (the engine itself is dropped afterwards).
#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

const ROUTES_PER_HOST: usize = 20;

fn document(services: usize) -> RulesDocument {
    let mut virtual_hosts = Vec::with_capacity(services + 1);
    let mut clusters = Vec::with_capacity(services);
    for s in 0..services {
        let host = format!("svc-{s}.ns.svc.cluster.local");
        let cluster = ir::cluster_name(80, "", &host);
        let routes = (0..ROUTES_PER_HOST)
            .map(|r| ir::Route {
                name: format!("r{r}"),
                matches: if r + 1 == ROUTES_PER_HOST {
                    Vec::new()
                } else {
                    vec![RouteMatch {
                        uri: Some(StringMatch::Prefix(format!("/api/v{r}/"))),
                        headers: vec![HeaderMatch {
                            name: "x-tenant".into(),
                            matcher: StringMatch::Regex(format!("tenant-{r}-[a-z]+")),
                            invert: false,
                        }],
                        ..RouteMatch::default()
                    }]
                },
                action: Action::Route(RouteAction {
                    destinations: vec![Destination {
                        host: host.clone(),
                        port: Some(80),
                        weight: 100,
                        ..Destination::default()
                    }],
                    rewrite: None,
                }),
                ..ir::Route::default()
            })
            .collect();
        virtual_hosts.push(VirtualHost {
            name: format!("{host}:80"),
            domains: vec![host.clone(), format!("svc-{s}.ns"), format!("svc-{s}")],
            require_tls: false,
            routes,
            source: None,
        });
        clusters.push(Cluster {
            name: cluster,
            service: host,
            port: 80,
            discovery: Discovery::Static,
            endpoints: (0..3)
                .map(|e| Endpoint {
                    address: format!("10.{}.{}.{e}", s / 256 % 256, s % 256),
                    port: 8080,
                    weight: 1,
                    ..Endpoint::default()
                })
                .collect(),
            connect_timeout_ms: 10_000,
            ..Cluster::default()
        });
    }
    virtual_hosts.push(VirtualHost {
        name: "wildcard".into(),
        domains: vec!["*.example.com".into()],
        require_tls: false,
        routes: Vec::new(),
        source: None,
    });
    RulesDocument {
        version: ir::VERSION,
        route_tables: vec![RouteTable {
            port: 80,
            virtual_hosts,
        }],
        clusters,
        ..RulesDocument::default()
    }
}

#[divan::bench(args = [100, 1_000, 10_000])]
fn decide_last_route(bencher: divan::Bencher<'_, '_>, services: usize) {
    let engine = Engine::new(document(services)).expect("engine");
    let authority = format!("svc-{}.ns:80", services / 2);
    let headers = vec![
        (":authority".to_string(), authority.clone()),
        (":path".to_string(), "/api/v99/items?id=1".to_string()),
        ("x-tenant".to_string(), "tenant-none".to_string()),
        ("user-agent".to_string(), "bench".to_string()),
    ];
    let mut rng = SplitMix64(1);
    bencher.bench_local(|| {
        let view = RequestView {
            method: "GET",
            scheme: "http",
            authority: &authority,
            path: "/api/v99/items?id=1",
            port: 80,
            headers: &headers,
            source_ip: None,
            transparent: false,
        };
        let d = engine.decide(divan::black_box(&view), &mut rng);
        if let Outcome::Forward(Forward {
            ticket: Some(t), ..
        }) = d.outcome
        {
            engine.release(t);
        }
        divan::black_box(d.route);
    });
}

#[divan::bench(args = [100, 10_000])]
fn decide_unknown_host(bencher: divan::Bencher<'_, '_>, services: usize) {
    let engine = Engine::new(document(services)).expect("engine");
    let headers = vec![(":authority".to_string(), "a.b.c.d.nowhere.test".to_string())];
    let mut rng = SplitMix64(1);
    bencher.bench_local(|| {
        let view = RequestView {
            method: "GET",
            scheme: "http",
            authority: "a.b.c.d.nowhere.test",
            path: "/",
            port: 80,
            headers: &headers,
            source_ip: None,
            transparent: false,
        };
        divan::black_box(engine.decide(&view, &mut rng).vhost);
    });
}

#[divan::bench(args = [100, 1_000, 10_000], sample_count = 5, sample_size = 1)]
fn load_rules(bencher: divan::Bencher<'_, '_>, services: usize) {
    let json = serde_json::to_string(&document(services)).expect("json");
    bencher.bench(|| {
        let doc: RulesDocument = serde_json::from_str(&json).expect("doc");
        Engine::new(doc).expect("engine")
    });
}
