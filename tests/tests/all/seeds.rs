//! The seed documents' examples, unchanged from `examples/`, served by real Envoy with the
//! filter and by the harness. The examples pin their upstream ports, so these tests take
//! turns.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Mutex;

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{example, get, rules, start, Host, Upstream};

static FIXED_PORTS: Mutex<()> = Mutex::new(());

fn hello_upstreams() -> (Upstream, Upstream) {
    (
        Upstream::start_on("hello-v1", 18081),
        Upstream::start_on("hello-v2", 18082),
    )
}

fn hello_uri_prefix_sends_v2_prefix_to_v2_and_the_rest_to_v1(host: Host) {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let _ups = hello_upstreams();
    let doc = rules(
        &[
            example("examples/hello/registry.yaml"),
            example("examples/hello/case3-uri-prefix.yaml"),
        ],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let envoy = start(host, &doc);
    let host = "svc-hello.default.svc.cluster.local:8080";
    assert_eq!(envoy.send(&get(host, "/v2/hello")).upstream(), "hello-v2");
    assert_eq!(envoy.send(&get(host, "/v2")).upstream(), "hello-v2");
    assert_eq!(envoy.send(&get(host, "/v1/hello")).upstream(), "hello-v1");
    assert_eq!(
        envoy.send(&get("svc-hello:8080", "/")).upstream(),
        "hello-v1"
    );
}

fn split_share(host: Host, case: &str) -> f64 {
    let _ups = hello_upstreams();
    let doc = rules(
        &[example("examples/hello/registry.yaml"), example(case)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let envoy = start(host, &doc);
    let total = 1000;
    let mut v2 = 0;
    for _ in 0..total {
        let r = envoy.send(&get("svc-hello:8080", "/"));
        assert_eq!(r.status, 200, "{r:?}");
        if r.upstream() == "hello-v2" {
            v2 += 1;
        }
    }
    f64::from(v2) / f64::from(total)
}

fn hello_weights_split_90_10_over_a_thousand_requests(host: Host) {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    // Binomial(1000, 0.1): sd ≈ 0.0095; ±4 sd.
    let share = split_share(host, "examples/hello/case4-weights.yaml");
    assert!((0.062..=0.138).contains(&share), "v2 share {share}");
}

fn hello_subsets_split_90_10_over_a_thousand_requests(host: Host) {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let share = split_share(host, "examples/hello/case5-subsets.yaml");
    assert!((0.062..=0.138).contains(&share), "v2 share {share}");
}

fn bookinfo_upstreams() -> Vec<Upstream> {
    [
        ("reviews-v1", 19081),
        ("reviews-v2", 19082),
        ("reviews-v3", 19083),
        ("ratings-v1", 19084),
        ("details-v1", 19085),
        ("productpage-v1", 19086),
    ]
    .into_iter()
    .map(|(n, p)| Upstream::start_on(n, p))
    .collect()
}

fn bookinfo_jason_goes_to_v2_everyone_else_to_v3(host: Host) {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let _ups = bookinfo_upstreams();
    let doc = rules(
        &[
            example("examples/bookinfo/registry.yaml"),
            example("examples/bookinfo/destination-rules.yaml"),
            example("examples/bookinfo/reviews-jason.yaml"),
        ],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let envoy = start(host, &doc);
    for _ in 0..10 {
        let jason = envoy.send(&get("reviews:9080", "/reviews/0").header("end-user", "jason"));
        assert_eq!(jason.upstream(), "reviews-v2", "{jason:?}");
        let other = envoy.send(&get("reviews:9080", "/reviews/0").header("end-user", "json"));
        assert_eq!(other.upstream(), "reviews-v3", "{other:?}");
        assert_eq!(
            envoy.send(&get("reviews:9080", "/")).upstream(),
            "reviews-v3"
        );
    }
    // Services without a VirtualService still route to their endpoints.
    assert_eq!(
        envoy.send(&get("details:9080", "/details/0")).upstream(),
        "details-v1"
    );
}

fn bookinfo_ratings_timeout_and_fault_delay_examples_serve(host: Host) {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let ups = bookinfo_upstreams();
    let base = [
        example("examples/bookinfo/registry.yaml"),
        example("examples/bookinfo/destination-rules.yaml"),
    ];
    let mut files = base.to_vec();
    files.push(example("examples/bookinfo/ratings-timeout.yaml"));
    let envoy = start(
        host,
        &rules(&files, ProxyKind::Sidecar, OutboundPolicy::AllowAny),
    );
    let r = envoy.send(&get("ratings:9080", "/ratings/0"));
    assert_eq!(r.upstream(), "ratings-v1");
    // The router applies the VirtualService timeout and tells the upstream about it.
    let seen = ups[3].received();
    assert_eq!(
        seen.last()
            .unwrap()
            .header("x-envoy-expected-rq-timeout-ms"),
        Some("10000")
    );
    drop(envoy);

    let mut files = base.to_vec();
    files.push(example(
        "examples/bookinfo-variants/ratings-fault-delay.yaml",
    ));
    let envoy = start(
        host,
        &rules(&files, ProxyKind::Sidecar, OutboundPolicy::AllowAny),
    );
    for _ in 0..20 {
        assert_eq!(envoy.send(&get("ratings:9080", "/ratings/0")).status, 200);
    }
}

meshroute_tests::on_both_hosts!(
    hello_uri_prefix_sends_v2_prefix_to_v2_and_the_rest_to_v1,
    hello_weights_split_90_10_over_a_thousand_requests,
    hello_subsets_split_90_10_over_a_thousand_requests,
    bookinfo_jason_goes_to_v2_everyone_else_to_v3,
    bookinfo_ratings_timeout_and_fault_delay_examples_serve,
);
