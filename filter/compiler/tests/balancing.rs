//! Load balancing, outlier ejection and circuit-breaker limits decided by the engine, from
//! DestinationRules the compiler lowered; time comes from a fake clock.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions"
)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use wasm_bindgen_test::wasm_bindgen_test;

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::engine::{
    AttemptResult, EndpointState, Engine, Forward, Outcome, RequestView, SplitMix64, Ticket,
};

/// Service `web` (port 80) with the given WorkloadEntries (`spec` flow mappings, `app: web`
/// among their labels) and DestinationRule `trafficPolicy`, compiled for a sidecar with
/// network label `n1` at `locality`.
fn web_engine(workloads: &[String], policy: &str, locality: &str) -> Engine {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80}]\n---\n",
    );
    for (i, spec) in workloads.iter().enumerate() {
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: web-{i}, namespace: default}}\nspec: {spec}\n---\n"
        ));
    }
    yaml.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec:\n  host: web\n  trafficPolicy: {policy}\n"
    ));
    let mut c = Config::default();
    let load = c.add_text("t.yaml", &yaml);
    assert!(load.iter().all(|d| !d.is_error()), "{load:?}");
    let proxy = ProxyOptions {
        labels: BTreeMap::from([("network".to_string(), "n1".to_string())]),
        locality: locality.into(),
        ..ProxyOptions::sidecar("default")
    };
    let out = compile(&c, &proxy, &MeshOptions::default());
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    Engine::new(out.document.expect("document")).expect("engine")
}

/// Endpoints 10.0.0.1..=n on port 8080.
fn engine(endpoints: usize, policy: &str) -> Engine {
    let workloads: Vec<String> = (1..=endpoints)
        .map(|i| format!("{{address: 10.0.0.{i}, ports: {{http: 8080}}, labels: {{app: web}}}}"))
        .collect();
    web_engine(&workloads, policy, "")
}

const CLUSTER: &str = "outbound|80||web.default.svc.cluster.local";

/// Shared state as the filter keeps it: outlier records by cluster, and a clock.
#[derive(Default)]
struct FakeShared {
    now_ms: u64,
    records: RefCell<HashMap<String, Vec<u8>>>,
}

impl EndpointState for FakeShared {
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn outlier_record(&self, cluster: &str) -> Option<Vec<u8>> {
        self.records.borrow().get(cluster).cloned()
    }
}

impl FakeShared {
    /// Reports an attempt as the filter does from its response callback.
    fn report(&self, engine: &Engine, ticket: Ticket, result: AttemptResult) -> bool {
        let stored = self.outlier_record(CLUSTER);
        let (cluster, record, ejected) = engine
            .observe(ticket, result, stored.as_deref(), self.now_ms)
            .expect("cluster has outlier detection");
        self.records.borrow_mut().insert(cluster.to_owned(), record);
        ejected
    }
}

struct Headers(Vec<(String, String)>);

impl Headers {
    fn new(extra: &[(&str, &str)]) -> Self {
        let mut h: Vec<(String, String)> = vec![
            (":method".into(), "GET".into()),
            (":authority".into(), "web".into()),
            (":path".into(), "/".into()),
        ];
        h.extend(extra.iter().map(|(k, v)| ((*k).into(), (*v).into())));
        Self(h)
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: "GET",
            scheme: "http",
            authority: "web",
            path: "/",
            port: 80,
            headers: &self.0,
            source_ip: Some("10.9.9.9"),
            transparent: false,
        }
    }
}

fn forward<'e>(
    engine: &'e Engine,
    h: &Headers,
    rng: &mut SplitMix64,
    state: &FakeShared,
) -> Option<Forward<'e>> {
    match engine.decide_with(&h.view(), rng, state).outcome {
        Outcome::Forward(f) => Some(f),
        Outcome::Reply(_) => None,
    }
}

/// Endpoint counts over `n` decisions, each released at once.
fn counts(
    engine: &Engine,
    state: &FakeShared,
    extra: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let h = Headers::new(extra);
    let mut rng = SplitMix64(11);
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let f = forward(engine, &h, &mut rng, state).expect("forwarded");
        *out.entry(f.endpoint.clone().expect("endpoint"))
            .or_insert(0) += 1;
        if let Some(t) = f.ticket {
            engine.release(t);
        }
    }
    out
}

#[wasm_bindgen_test(unsupported = test)]
fn round_robin_cycles_and_random_spreads_evenly() {
    let state = FakeShared::default();
    let rr = counts(
        &engine(3, "{loadBalancer: {simple: ROUND_ROBIN}}"),
        &state,
        &[],
        300,
    );
    assert!(rr.values().all(|&c| c == 100), "{rr:?}");
    let random = counts(
        &engine(4, "{loadBalancer: {simple: RANDOM}}"),
        &state,
        &[],
        8_000,
    );
    assert_eq!(random.len(), 4);
    assert!(
        random.values().all(|&c| (1_800..=2_200).contains(&c)),
        "{random:?}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn least_request_avoids_the_busy_endpoint() {
    // No loadBalancer: LEAST_REQUEST is Istio's default.
    let engine = engine(2, "{connectionPool: {http: {http2MaxRequests: 100}}}");
    let state = FakeShared::default();
    let h = Headers::new(&[]);
    let mut rng = SplitMix64(5);
    // Ten slow requests stay in flight on 10.0.0.1.
    let mut held = Vec::new();
    while held.len() < 10 {
        let f = forward(&engine, &h, &mut rng, &state).unwrap();
        if f.endpoint.as_deref() == Some("10.0.0.1:8080") {
            held.push(f.ticket.unwrap());
        } else {
            engine.release(f.ticket.unwrap());
        }
    }
    // Two choices: the busy endpoint wins only when both draws land on it (1 in 4).
    let c = counts(&engine, &state, &[], 4_000);
    let busy = c.get("10.0.0.1:8080").copied().unwrap_or(0);
    assert!((800..=1_200).contains(&busy), "{c:?}");
    // Once they finish, the two are even again.
    for t in held {
        engine.release(t);
    }
    let c = counts(&engine, &state, &[], 4_000);
    let busy = c.get("10.0.0.1:8080").copied().unwrap_or(0);
    assert!((1_800..=2_200).contains(&busy), "{c:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn consistent_hash_moves_only_the_keys_of_a_removed_endpoint() {
    let policy = "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}";
    let (four, three) = (engine(4, policy), engine(3, policy));
    let state = FakeShared::default();
    let mut rng = SplitMix64(1);
    let (mut moved, mut on_removed) = (0, 0);
    let mut per_endpoint = BTreeMap::new();
    for user in 0..2_000 {
        let user = user.to_string();
        let h = Headers::new(&[("x-user", &user)]);
        let before = forward(&four, &h, &mut rng, &state)
            .unwrap()
            .endpoint
            .unwrap();
        // Stable for the same key.
        assert_eq!(
            forward(&four, &h, &mut rng, &state)
                .unwrap()
                .endpoint
                .unwrap(),
            before
        );
        let after = forward(&three, &h, &mut rng, &state)
            .unwrap()
            .endpoint
            .unwrap();
        *per_endpoint.entry(before.clone()).or_insert(0) += 1;
        if before == "10.0.0.4:8080" {
            on_removed += 1;
        } else if before != after {
            moved += 1;
        }
    }
    assert_eq!(moved, 0, "keys of remaining endpoints moved");
    // The removed endpoint held about a quarter of the keys: only those move (≤ 1/N).
    assert!((400..=600).contains(&on_removed), "{per_endpoint:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn hashing_on_source_ip_and_query_parameter() {
    let state = FakeShared::default();
    let by_ip = counts(
        &engine(4, "{loadBalancer: {consistentHash: {useSourceIp: true}}}"),
        &state,
        &[],
        50,
    );
    assert_eq!(by_ip.len(), 1, "{by_ip:?}");
    let e = engine(
        4,
        "{loadBalancer: {consistentHash: {httpQueryParameterName: user}}}",
    );
    let mut rng = SplitMix64(3);
    let view = |path: &'static str, h: &'static [(String, String)]| RequestView {
        method: "GET",
        scheme: "http",
        authority: "web",
        path,
        port: 80,
        headers: h,
        source_ip: None,
        transparent: false,
    };
    let pick = |path: &'static str, rng: &mut SplitMix64| match e
        .decide_with(&view(path, &[]), rng, &state)
        .outcome
    {
        Outcome::Forward(f) => f.endpoint.unwrap(),
        Outcome::Reply(r) => panic!("{r:?}"),
    };
    let seen: std::collections::BTreeSet<String> = (0..40)
        .map(|i| {
            pick(
                if i % 2 == 0 {
                    "/?user=ann"
                } else {
                    "/x?a=1&user=ann"
                },
                &mut rng,
            )
        })
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn cookie_hash_generates_a_cookie_only_with_a_ttl() {
    let state = FakeShared::default();
    let h = Headers::new(&[]);
    let mut rng = SplitMix64(9);
    let with_ttl = engine(
        3,
        "{loadBalancer: {consistentHash: {httpCookie: {name: s, path: /a, ttl: 90s}}}}",
    );
    let f = forward(&with_ttl, &h, &mut rng, &state).unwrap();
    let set: Vec<_> = f
        .response_edits
        .iter()
        .filter(|e| e.name == "set-cookie")
        .collect();
    assert_eq!(set.len(), 1);
    let value = set[0].value.to_string();
    assert!(
        value.starts_with("s=\"") && value.ends_with("; Max-Age=90; Path=/a; HttpOnly"),
        "{value}"
    );
    // Attributes follow the path, as Envoy writes them.
    let with_attributes = engine(
        3,
        "{loadBalancer: {consistentHash: {httpCookie: {name: s, path: /a, ttl: 90s, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}}}}",
    );
    let f3 = forward(&with_attributes, &h, &mut rng, &state).unwrap();
    let set = f3
        .response_edits
        .iter()
        .find(|e| e.name == "set-cookie")
        .unwrap()
        .value
        .to_string();
    assert!(
        set.ends_with("; Max-Age=90; Path=/a; SameSite=Strict; Secure; HttpOnly"),
        "{set}"
    );
    // Sending it back lands on the same endpoint and sets nothing.
    let cookie = value.split(';').next().unwrap().to_owned();
    let again = Headers::new(&[("cookie", &cookie)]);
    let f2 = forward(&with_ttl, &again, &mut rng, &state).unwrap();
    assert_eq!(f2.endpoint, f.endpoint);
    assert!(f2.response_edits.iter().all(|e| e.name != "set-cookie"));
    let no_ttl = engine(
        3,
        "{loadBalancer: {consistentHash: {httpCookie: {name: s}}}}",
    );
    let f3 = forward(&no_ttl, &h, &mut rng, &state).unwrap();
    assert!(f3.response_edits.iter().all(|e| e.name != "set-cookie"));
}

#[wasm_bindgen_test(unsupported = test)]
fn ejected_endpoints_are_skipped_by_every_policy_until_their_time_is_up() {
    for lb in ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"] {
        let engine = engine(
            3,
            &format!("{{loadBalancer: {{simple: {lb}}}, outlierDetection: {{consecutive5xxErrors: 2, interval: 5s, baseEjectionTime: 30s, maxEjectionPercent: 100}}}}"),
        );
        let mut state = FakeShared {
            now_ms: 1_000,
            ..FakeShared::default()
        };
        let h = Headers::new(&[]);
        let mut rng = SplitMix64(2);
        // Endpoint 10.0.0.2 fails twice in a row.
        let mut failures = 0;
        while failures < 2 {
            let f = forward(&engine, &h, &mut rng, &state).unwrap();
            let t = f.ticket.unwrap();
            engine.release(t);
            if f.endpoint.as_deref() == Some("10.0.0.2:8080") {
                failures += 1;
                assert_eq!(
                    state.report(&engine, t, AttemptResult::Status(503)),
                    failures == 2,
                    "{lb}"
                );
            } else {
                state.report(&engine, t, AttemptResult::Status(200));
            }
        }
        let c = counts(&engine, &state, &[], 300);
        assert!(!c.contains_key("10.0.0.2:8080"), "{lb}: {c:?}");
        // 30 s later (fake clock) it is back.
        state.now_ms += 30_000;
        let c = counts(&engine, &state, &[], 300);
        assert!(
            c.get("10.0.0.2:8080").copied().unwrap_or(0) > 30,
            "{lb}: {c:?}"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn hash_policies_also_skip_ejected_endpoints() {
    let engine = engine(
        3,
        "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}, outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 100}}",
    );
    let state = FakeShared {
        now_ms: 5,
        ..FakeShared::default()
    };
    let h = Headers::new(&[("x-user", "ann")]);
    let mut rng = SplitMix64(2);
    let f = forward(&engine, &h, &mut rng, &state).unwrap();
    assert!(state.report(&engine, f.ticket.unwrap(), AttemptResult::Status(500)));
    let moved = forward(&engine, &h, &mut rng, &state).unwrap();
    assert_ne!(moved.endpoint, f.endpoint);
    // And it keeps the new place while the first is out.
    assert_eq!(
        forward(&engine, &h, &mut rng, &state).unwrap().endpoint,
        moved.endpoint
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn panic_mode_ignores_ejections_below_min_health_percent() {
    let policy = |min: u32| {
        format!("{{loadBalancer: {{simple: ROUND_ROBIN}}, outlierDetection: {{consecutive5xxErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 100, minHealthPercent: {min}}}}}")
    };
    for (min, expect_both) in [(0, false), (40, false), (60, true)] {
        let engine = engine(2, &policy(min));
        let state = FakeShared {
            now_ms: 5,
            ..FakeShared::default()
        };
        let h = Headers::new(&[]);
        let mut rng = SplitMix64(2);
        let f = forward(&engine, &h, &mut rng, &state).unwrap();
        assert!(state.report(&engine, f.ticket.unwrap(), AttemptResult::Status(500)));
        // One of two ejected: 50 % healthy.
        let c = counts(&engine, &state, &[], 100);
        assert_eq!(c.len() == 2, expect_both, "minHealthPercent {min}: {c:?}");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn circuit_breaker_limits_follow_the_connection_pool() {
    let state = FakeShared::default();
    let h = Headers::new(&[]);
    let limit = |policy: &str| {
        let e = engine(1, policy);
        forward(&e, &h, &mut SplitMix64(1), &state)
            .unwrap()
            .max_active
    };
    assert_eq!(limit("{loadBalancer: {simple: RANDOM}}"), None);
    assert_eq!(
        limit("{connectionPool: {http: {http2MaxRequests: 7}}}"),
        Some(7)
    );
    // HTTP/1.1: connections each carry one request, plus the pending queue.
    assert_eq!(
        limit("{connectionPool: {tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3}}}"),
        Some(5)
    );
    assert_eq!(
        limit("{connectionPool: {tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3, http2MaxRequests: 4}}}"),
        Some(4)
    );
    // Connections alone only queue requests (Istio CP1): no rejection.
    assert_eq!(limit("{connectionPool: {tcp: {maxConnections: 2}}}"), None);
}

/// Statistical properties over random cluster shapes (native only: proptest needs an OS
/// random source).
#[cfg(not(target_arch = "wasm32"))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Endpoints 10.0.1.0.. with the given weights.
    fn weighted(weights: &[u32], policy: &str) -> Engine {
        let workloads: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!("{{address: 10.0.1.{i}, ports: {{http: 8080}}, labels: {{app: web}}, weight: {w}}}")
            })
            .collect();
        web_engine(&workloads, policy, "")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn random_and_round_robin_follow_endpoint_weights(
            weights in proptest::collection::vec(1u32..8, 2..5),
            round_robin in any::<bool>(),
        ) {
            let policy = if round_robin { "{loadBalancer: {simple: ROUND_ROBIN}}" } else { "{loadBalancer: {simple: RANDOM}}" };
            let engine = weighted(&weights, policy);
            let total: u32 = weights.iter().sum();
            let n = 400 * total as usize;
            let c = counts(&engine, &FakeShared::default(), &[], n);
            for (i, w) in weights.iter().enumerate() {
                let got = c.get(&format!("10.0.1.{i}:8080")).copied().unwrap_or(0) as f64;
                let expected = n as f64 * f64::from(*w) / f64::from(total);
                // Round robin is exact; random within 5 standard deviations.
                let sd = (expected * (1.0 - f64::from(*w) / f64::from(total))).sqrt();
                prop_assert!((got - expected).abs() <= 5.0 * sd + 1.0, "{i}: {got} vs {expected} ({c:?})");
            }
        }

        #[test]
        fn consistent_hash_follows_endpoint_weights(weights in proptest::collection::vec(1u32..6, 2..4)) {
            let engine = weighted(&weights, "{loadBalancer: {consistentHash: {httpHeaderName: k}}}");
            let state = FakeShared::default();
            let mut rng = SplitMix64(1);
            let total: u32 = weights.iter().sum();
            let keys = 3_000;
            let mut c = BTreeMap::new();
            for key in 0..keys {
                let key = key.to_string();
                let h = Headers::new(&[("k", &key)]);
                let e = forward(&engine, &h, &mut rng, &state).unwrap().endpoint.unwrap();
                *c.entry(e).or_insert(0usize) += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let got = c.get(&format!("10.0.1.{i}:8080")).copied().unwrap_or(0) as f64;
                let expected = keys as f64 * f64::from(*w) / f64::from(total);
                prop_assert!((got - expected).abs() <= 0.2 * expected + 30.0, "{i}: {got} vs {expected} ({c:?})");
            }
        }

        #[test]
        fn consistent_hash_moves_at_most_the_removed_endpoints_keys(n in 2usize..7, seed in any::<u64>()) {
            let policy = "{loadBalancer: {consistentHash: {httpHeaderName: k}}}";
            let (before, after) = (engine(n + 1, policy), engine(n, policy));
            let state = FakeShared::default();
            let mut rng = SplitMix64(seed);
            let removed = format!("10.0.0.{}:8080", n + 1);
            let mut moved = 0;
            for key in 0..300u64 {
                let key = (key ^ seed).to_string();
                let h = Headers::new(&[("k", &key)]);
                let b = forward(&before, &h, &mut rng, &state).unwrap().endpoint.unwrap();
                let a = forward(&after, &h, &mut rng, &state).unwrap().endpoint.unwrap();
                if b != a {
                    prop_assert_eq!(&b, &removed);
                    moved += 1;
                }
            }
            // About 1/(n+1) of the keys lived on the removed endpoint.
            let share = f64::from(moved) / 300.0;
            prop_assert!(share <= 1.0 / (n as f64 + 1.0) + 0.12, "{share}");
        }
    }
}

/// Endpoints 10.0.2.1.. per `(locality, network label)`, for a proxy at `proxy_locality`
/// on network `n1`.
fn engine_at(proxy_locality: &str, endpoints: &[(&str, &str)], policy: &str) -> Engine {
    let workloads: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (locality, network))| {
            format!(
                "{{address: 10.0.2.{}, ports: {{http: 8080}}, labels: {{app: web, network: {network}}}, locality: {locality}}}",
                i + 1
            )
        })
        .collect();
    web_engine(&workloads, policy, proxy_locality)
}

/// Ejects endpoint `address` by failing it once (the policies below eject on one 5xx).
fn eject(engine: &Engine, state: &FakeShared, address: &str) {
    let h = Headers::new(&[]);
    let mut rng = SplitMix64(77);
    for _ in 0..10_000 {
        let f = forward(engine, &h, &mut rng, state).unwrap();
        let t = f.ticket.unwrap();
        engine.release(t);
        if f.endpoint.as_deref() == Some(address) {
            assert!(state.report(engine, t, AttemptResult::Status(500)));
            return;
        }
    }
    panic!("{address} never chosen");
}

const FAIL_ONCE: &str =
    "outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}";

#[wasm_bindgen_test(unsupported = test)]
fn locality_failover_prefers_the_nearest_healthy_endpoints() {
    let endpoints = [
        ("us-east/zone1/sub1", "n1"),
        ("us-east/zone2/sub1", "n1"),
        ("eu-west/zone1/sub1", "n1"),
    ];
    let engine = engine_at(
        "us-east/zone1/sub1",
        &endpoints,
        &format!("{{{FAIL_ONCE}}}"),
    );
    let state = FakeShared {
        now_ms: 10,
        ..FakeShared::default()
    };
    let only = |c: BTreeMap<String, usize>| c.keys().cloned().collect::<Vec<_>>();
    assert_eq!(only(counts(&engine, &state, &[], 200)), ["10.0.2.1:8080"]);
    eject(&engine, &state, "10.0.2.1:8080");
    assert_eq!(only(counts(&engine, &state, &[], 200)), ["10.0.2.2:8080"]);
    eject(&engine, &state, "10.0.2.2:8080");
    assert_eq!(only(counts(&engine, &state, &[], 200)), ["10.0.2.3:8080"]);
}

#[wasm_bindgen_test(unsupported = test)]
fn locality_failover_needs_outlier_detection_and_can_be_disabled() {
    let endpoints = [("us-east/zone1/sub1", "n1"), ("eu-west/zone1/sub1", "n1")];
    let state = FakeShared::default();
    for policy in [
        "{loadBalancer: {simple: RANDOM}}".to_string(),
        format!("{{loadBalancer: {{simple: RANDOM, localityLbSetting: {{enabled: false}}}}, {FAIL_ONCE}}}"),
    ] {
        let c = counts(&engine_at("us-east/zone1/sub1", &endpoints, &policy), &state, &[], 400);
        assert_eq!(c.len(), 2, "{policy}: {c:?}");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn a_level_keeps_its_traffic_while_enough_of_it_is_healthy() {
    let mut endpoints = vec![("us-east/zone1/sub1", "n1"); 4];
    endpoints.push(("eu-west/zone1/sub1", "n1"));
    let engine = engine_at(
        "us-east/zone1/sub1",
        &endpoints,
        &format!("{{loadBalancer: {{simple: RANDOM}}, {FAIL_ONCE}}}"),
    );
    let state = FakeShared {
        now_ms: 10,
        ..FakeShared::default()
    };
    eject(&engine, &state, "10.0.2.1:8080");
    // 3 of 4 healthy × 1.4 = 105 %: all traffic stays near.
    let c = counts(&engine, &state, &[], 2_000);
    assert!(!c.contains_key("10.0.2.5:8080"), "{c:?}");
    eject(&engine, &state, "10.0.2.2:8080");
    // 2 of 4 × 1.4 = 70 % near, 30 % to the next level.
    let c = counts(&engine, &state, &[], 4_000);
    let far = c.get("10.0.2.5:8080").copied().unwrap_or(0);
    assert!((1_000..=1_400).contains(&far), "{c:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn failover_goes_to_the_named_region_first() {
    let endpoints = [
        ("us-east/zone1/sub1", "n1"),
        ("ap-south/zone1/sub1", "n1"),
        ("eu-west/zone1/sub1", "n1"),
    ];
    let engine = engine_at(
        "us-east/zone1/sub1",
        &endpoints,
        &format!("{{loadBalancer: {{localityLbSetting: {{failover: [{{from: us-east, to: eu-west}}]}}}}, {FAIL_ONCE}}}"),
    );
    let state = FakeShared {
        now_ms: 10,
        ..FakeShared::default()
    };
    eject(&engine, &state, "10.0.2.1:8080");
    let c = counts(&engine, &state, &[], 300);
    assert_eq!(c.keys().collect::<Vec<_>>(), ["10.0.2.3:8080"], "{c:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn failover_priority_ranks_endpoints_by_matching_labels() {
    let endpoints = [("us-east/zone1/sub1", "n2"), ("eu-west/zone9/sub1", "n1")];
    let engine = engine_at(
        "us-east/zone1/sub1",
        &endpoints,
        &format!("{{loadBalancer: {{localityLbSetting: {{failoverPriority: [network, topology.kubernetes.io/region]}}}}, {FAIL_ONCE}}}"),
    );
    // Same network beats same region.
    let c = counts(&engine, &FakeShared::default(), &[], 200);
    assert_eq!(c.keys().collect::<Vec<_>>(), ["10.0.2.2:8080"], "{c:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn distribute_sends_each_locality_its_weight() {
    let endpoints = [
        ("us-east/zone1/sub1", "n1"),
        ("us-east/zone2/sub1", "n1"),
        ("us-east/zone2/sub2", "n1"),
        ("eu-west/zone1/sub1", "n1"),
    ];
    let engine = engine_at(
        "us-east/zone1/sub1",
        &endpoints,
        "{loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {distribute: [{from: us-east/zone1/*, to: {\"us-east/zone1/*\": 80, \"us-east/zone2/*\": 20}}]}}}",
    );
    let c = counts(&engine, &FakeShared::default(), &[], 10_000);
    let n = |a: &str| c.get(a).copied().unwrap_or(0);
    assert!((7_700..=8_300).contains(&n("10.0.2.1:8080")), "{c:?}");
    // zone2's 20 % is shared by its two localities.
    assert!((800..=1_200).contains(&n("10.0.2.2:8080")), "{c:?}");
    assert!((800..=1_200).contains(&n("10.0.2.3:8080")), "{c:?}");
    assert_eq!(n("10.0.2.4:8080"), 0, "{c:?}");
}
