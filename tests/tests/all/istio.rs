//! The filter inside the configuration istiod generates (`tests/istio/`): loaded by the
//! manifests `meshroute istio-manifest` writes (EnvoyFilter, or WasmPlugins), its decisions
//! take effect whatever istiod's own routes say, through istiod's own clusters.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::Duration;

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::contract::CONTROL_HEADERS;
use meshroute_core::ir::{self, RulesDocument};
use meshroute_harness::istio::{manifest, ManifestKind, Packing, Target};
use meshroute_tests::istio::{IstioProxy, Istiod};
use meshroute_tests::l4::EchoServer;
use meshroute_tests::{get, wasm_path, Received, Upstream};
use serde_json::{json, Value};

const KINDS: [ManifestKind; 2] = [ManifestKind::EnvoyFilter, ManifestKind::WasmPlugin];

/// Bookinfo's Services, namespace default.
const BOOKINFO: &str = r"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: default}
spec: {selector: {app: details}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: default}
spec: {selector: {app: productpage}, ports: [{name: http, port: 9080}]}
";

/// Bookinfo's DestinationRules (`destination-rule-all.yaml`) but for reviews.
const BOOKINFO_SUBSETS: &str = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage, namespace: default}
spec:
  host: productpage
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: default}
spec:
  host: details
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
";

const REVIEWS_SUBSETS: &str = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// The VirtualServices of the scenarios; `routes-9080-same-virtual-services.json` is what
/// istiod makes of them.
const SCENARIO_VIRTUAL_SERVICES: &str = r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v3}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percentage: {value: 100}, fixedDelay: 2s}}
    route: [{destination: {host: ratings, subset: v1}}]
  - route: [{destination: {host: ratings, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: details, subset: v1}}]
    retries: {attempts: 3, retryOn: 5xx}
";

/// istiod's DestinationRules of bookinfo, as applied to it (`destination-rule-all.yaml`).
fn bookinfo_destination_rules() -> Vec<Value> {
    let subsets = |names: &[&str]| -> Value {
        names
            .iter()
            .map(|n| json!({"name": n, "labels": {"version": n}}))
            .collect()
    };
    [
        ("productpage", subsets(&["v1"])),
        ("reviews", subsets(&["v1", "v2", "v3"])),
        ("ratings", subsets(&["v1", "v2"])),
        ("details", subsets(&["v1", "v2"])),
    ]
    .into_iter()
    .map(|(host, subsets)| {
        json!({
            "kind": "DestinationRule",
            "metadata": {"name": host, "namespace": "default"},
            "spec": {"host": host, "subsets": subsets},
        })
    })
    .collect()
}

fn productpage_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), "productpage".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ])
}

/// Compiles `yaml` for a proxy inside Istio and writes the manifest of `kind` for it.
fn istio_manifest(
    yaml: &str,
    proxy: ProxyOptions,
    kind: ManifestKind,
    packing: Packing,
) -> (RulesDocument, Value) {
    let mut config = Config::default();
    let diags = config.add_text("scenario.yaml", yaml);
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    let proxy = proxy.in_istio();
    let out = compile(&config, &proxy, &MeshOptions::default());
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    let doc = out.document.expect("document");
    assert_eq!(doc.proxy.endpoint_selection, ir::EndpointSelection::Host);
    let module = wasm_path().display().to_string();
    let module = match kind {
        ManifestKind::EnvoyFilter => module,
        ManifestKind::WasmPlugin => format!("file://{module}"),
    };
    let selector = proxy.labels.clone();
    let list = manifest(
        &doc,
        meshroute_compiler::istio::destination_rules(&config, &proxy),
        kind,
        &Target {
            name: "meshroute",
            namespace: &proxy.namespace,
            module: &module,
            selector: &selector,
            packing,
        },
    )
    .expect("manifest");
    (doc, list)
}

fn sidecar_proxy() -> ProxyOptions {
    ProxyOptions {
        labels: productpage_labels(),
        ..ProxyOptions::sidecar("default")
    }
}

/// No header of the filter's contract reached the upstream.
fn assert_no_control_headers(received: &[Received]) {
    for r in received {
        for (name, value) in &r.headers {
            assert!(
                !CONTROL_HEADERS.contains(&name.as_str()) && !name.starts_with("x-meshroute"),
                "upstream saw {name}: {value}"
            );
        }
    }
}

/// The bookinfo reviews pods (`endpoints.json`: v1 .195, v2 .193, v3 .192) as upstreams.
struct Reviews {
    v1: Upstream,
    v2: Upstream,
    v3: Upstream,
}

impl Reviews {
    fn start() -> Self {
        Self {
            v1: Upstream::start("reviews-v1"),
            v2: Upstream::start("reviews-v2"),
            v3: Upstream::start("reviews-v3"),
        }
    }

    fn pods(&self) -> Vec<(&'static str, u16)> {
        vec![
            ("10.244.0.195", self.v1.port),
            ("10.244.0.193", self.v2.port),
            ("10.244.0.192", self.v3.port),
        ]
    }
}

/// istiod variant → what istiod has besides the Services.
fn sidecar_istiod(variant: &str) -> Istiod {
    let istiod = Istiod::sidecar(variant);
    match variant {
        "services-only" => istiod,
        _ => bookinfo_destination_rules()
            .into_iter()
            .fold(istiod, Istiod::destination_rule),
    }
}

fn rules_yaml(extra: &str) -> String {
    format!("{BOOKINFO}---{BOOKINFO_SUBSETS}---{REVIEWS_SUBSETS}---{extra}")
}

#[test]
fn sidecar_routes_follow_the_filter_whatever_istiod_routes() {
    for variant in ["services-only", "all-v1", "same-virtual-services"] {
        for kind in KINDS {
            let (_, list) = istio_manifest(
                &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
                sidecar_proxy(),
                kind,
                Packing::Auto,
            );
            let reviews = Reviews::start();
            let proxy = sidecar_istiod(variant).apply(&list).start(&reviews.pods());
            let context = format!("{variant}, {kind:?}");
            for _ in 0..5 {
                // `Host` without a port: the service port is the listener's.
                let r = proxy.send(9080, &get("reviews", "/reviews/0"));
                assert_eq!(r.status, 200, "{context}: {}", r.text());
                assert_eq!(r.upstream(), "reviews-v3", "{context}");
                let r = proxy.send(
                    9080,
                    &get("reviews.default.svc.cluster.local:9080", "/reviews/0")
                        .header("end-user", "jason"),
                );
                assert_eq!(r.upstream(), "reviews-v2", "{context}");
            }
            // Istio ignores the port in host matching (`ignore_port_in_host_matching`).
            let r = proxy.send(9080, &get("reviews:1234", "/"));
            assert_eq!(r.upstream(), "reviews-v3", "{context}");
            assert_eq!(reviews.v1.count(), 0, "{context}: istiod's own route ran");
            assert_no_control_headers(&reviews.v2.received());
            assert_no_control_headers(&reviews.v3.received());
        }
    }
}

#[test]
fn weights_split_as_the_filter_decides_not_as_istiod_routes() {
    let split = r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v3}, weight: 25}
";
    let (_, list) = istio_manifest(
        &rules_yaml(split),
        sidecar_proxy(),
        ManifestKind::EnvoyFilter,
        Packing::Always,
    );
    let reviews = Reviews::start();
    let proxy = sidecar_istiod("all-v1").apply(&list).start(&reviews.pods());
    for _ in 0..200 {
        let r = proxy.send(9080, &get("reviews:9080", "/"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // istiod's route sends everything to v1; the filter sends a quarter to v3
    // (binomial(200, 0.25): 50 ± 6).
    assert_eq!(reviews.v1.count() + reviews.v3.count(), 200);
    assert!(
        (25..=75).contains(&reviews.v3.count()),
        "v3 got {}",
        reviews.v3.count()
    );
}

const FAULT_DELAYS: &str = "http.outbound_0.0.0.0_9080.fault.delays_injected";

#[test]
fn a_fault_istiod_also_configured_is_injected_once() {
    let ratings = Upstream::start("ratings-v1");
    let pods = [("10.244.0.191", ratings.port)];
    // Without the filter, istiod's route has Envoy's fault filter delay jason's requests.
    let plain = sidecar_istiod("same-virtual-services").start(&pods);
    let r = plain.send(9080, &get("ratings", "/").header("end-user", "jason"));
    assert_eq!(r.status, 200);
    assert_eq!(plain.stat(FAULT_DELAYS), 1, "the fixture's fault is live");
    drop(plain);
    for kind in KINDS {
        let (_, list) = istio_manifest(
            &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
            sidecar_proxy(),
            kind,
            Packing::Auto,
        );
        let proxy = sidecar_istiod("same-virtual-services")
            .apply(&list)
            .start(&pods);
        let r = proxy.send(9080, &get("ratings", "/").header("end-user", "jason"));
        assert_eq!(r.status, 200, "{kind:?}");
        assert!(
            r.elapsed >= Duration::from_secs(2),
            "{kind:?}: the filter's delay: {:?}",
            r.elapsed
        );
        assert_eq!(
            proxy.stat(FAULT_DELAYS),
            0,
            "{kind:?}: Envoy's fault ran too"
        );
        let r = proxy.send(9080, &get("ratings", "/"));
        assert!(
            r.elapsed < Duration::from_secs(2),
            "{kind:?}: no delay for others"
        );
    }
}

#[test]
fn retries_go_to_another_pod_of_istiods_cluster() {
    let good = Upstream::start("details-a");
    let bad = Upstream::start("details-b");
    bad.fail_with(Some(500));
    let (_, list) = istio_manifest(
        &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
        sidecar_proxy(),
        ManifestKind::WasmPlugin,
        Packing::Auto,
    );
    // istiod's default retry policy retries 503, not 500: only the VirtualService's `5xx`
    // retries save these requests.
    let proxy = sidecar_istiod("services-only")
        .pod(
            "outbound|9080||details.default.svc.cluster.local",
            "10.244.0.196",
            9080,
            "v1",
        )
        .apply(&list)
        .start(&[("10.244.0.190", good.port), ("10.244.0.196", bad.port)]);
    for _ in 0..20 {
        let r = proxy.send(9080, &get("details", "/details/0"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.upstream(), "details-a");
    }
    assert_eq!(good.count(), 20);
    // Balanced over two pods, 20 first tries all missing the failing one: 2^-20.
    assert!(bad.count() >= 1, "the failing pod was never tried");
    assert_no_control_headers(&good.received());
}

#[test]
fn istiods_default_retries_do_not_stack_on_the_filters() {
    let retries = r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: details}}]
    retries: {attempts: 1, retryOn: 5xx}
";
    let details = Upstream::start("details");
    details.fail_with(Some(503));
    for kind in KINDS {
        details.clear();
        let (_, list) = istio_manifest(
            &format!("{BOOKINFO}---{retries}"),
            sidecar_proxy(),
            kind,
            Packing::Auto,
        );
        // istiod's routes retry twice; the filter's route retries as the rules say: once
        // for details, and for ratings (no VirtualService) Istio's default, twice, on
        // connection failures (the ratings pod is not there).
        let proxy = Istiod::sidecar("services-only")
            .apply(&list)
            .start(&[("10.244.0.190", details.port)]);
        assert_eq!(proxy.send(9080, &get("details", "/")).status, 503);
        assert_eq!(details.count(), 2, "{kind:?}: one try and one retry");
        let r = proxy.send(9080, &get("ratings", "/"));
        assert_eq!(r.status, 503, "{kind:?}: {}", r.text());
        assert_eq!(
            proxy
                .stat("cluster.outbound|9080||ratings.default.svc.cluster.local.upstream_rq_retry"),
            2,
            "{kind:?}: Istio's default, once"
        );
    }
}

#[test]
fn the_filters_timeout_is_kept_by_envoys_router() {
    let timeout = r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
    timeout: 0.5s
";
    let ratings = Upstream::start("ratings");
    let (_, list) = istio_manifest(
        &format!("{BOOKINFO}---{timeout}"),
        sidecar_proxy(),
        ManifestKind::WasmPlugin,
        Packing::Auto,
    );
    // istiod's own route has no timeout (`0s`).
    let proxy = Istiod::sidecar("services-only")
        .apply(&list)
        .start(&[("10.244.0.191", ratings.port)]);
    let r = proxy.send(9080, &get("ratings", "/?sleep_ms=3000"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.elapsed >= Duration::from_millis(400) && r.elapsed < Duration::from_millis(2500),
        "{:?}",
        r.elapsed
    );
}

#[test]
fn istiods_outlier_detection_ejects_a_failing_pod_on_the_filters_route() {
    let outlier = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: default}
spec:
  host: details
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 100}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: details, subset: v1}}]
    retries: {attempts: 0}
";
    let (doc, list) = istio_manifest(
        &format!("{BOOKINFO}---{outlier}"),
        sidecar_proxy(),
        ManifestKind::EnvoyFilter,
        Packing::Auto,
    );
    assert!(
        doc.clusters.iter().all(|c| c.outlier_detection.is_none()),
        "inside Istio the filter ejects nothing itself"
    );
    let good = Upstream::start("details-a");
    let bad = Upstream::start("details-b");
    bad.fail_with(Some(500));
    let proxy = Istiod::sidecar("services-only")
        .pod(
            "outbound|9080||details.default.svc.cluster.local",
            "10.244.0.196",
            9080,
            "v1",
        )
        .apply(&list)
        .start(&[("10.244.0.190", good.port), ("10.244.0.196", bad.port)]);
    let statuses: Vec<u16> = (0..20)
        .map(|_| proxy.send(9080, &get("details", "/")).status)
        .collect();
    // Balanced over two pods, 20 requests all missing the failing one: 2^-20. Envoy ejects
    // from its main thread, so on a busy machine the next request may still reach the pod
    // before the ejection is in force; after that, none does.
    let failures = statuses.iter().filter(|s| **s == 500).count();
    assert!(
        (1..=2).contains(&bad.count()),
        "ejected after its first 5xx: {} requests reached it ({statuses:?})",
        bad.count()
    );
    assert_eq!(failures, bad.count(), "{statuses:?}");
    assert!(
        statuses[10..].iter().all(|s| *s == 200),
        "the ejected pod gets nothing more: {statuses:?}"
    );
}

#[test]
fn client_copies_of_the_filters_headers_steer_nothing() {
    let reviews = Reviews::start();
    let productpage = Upstream::start("productpage");
    let mut pods = reviews.pods();
    pods.push(("10.244.0.194", productpage.port));
    for kind in KINDS {
        let (_, list) = istio_manifest(
            &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
            sidecar_proxy(),
            kind,
            Packing::Auto,
        );
        let proxy = sidecar_istiod("all-v1").apply(&list).start(&pods);
        let r = proxy.send(
            9080,
            &get("productpage", "/")
                .header(
                    "x-meshroute-cluster",
                    "outbound|9080|v2|reviews.default.svc.cluster.local",
                )
                .header("x-envoy-original-dst-host", "127.0.0.1:1")
                .header("x-meshroute-listener-port", "1"),
        );
        assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
        assert_eq!(r.upstream(), "productpage", "{kind:?}");
    }
    assert_eq!(reviews.v2.count(), 0);
    assert_no_control_headers(&productpage.received());
}

#[test]
fn endpoints_follow_istiods_discovery_without_recompiling() {
    let reviews = Reviews::start();
    let moved = Upstream::start("reviews-v3-new");
    let (_, list) = istio_manifest(
        &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
        sidecar_proxy(),
        ManifestKind::EnvoyFilter,
        Packing::Auto,
    );
    let proxy = sidecar_istiod("services-only")
        .apply(&list)
        .start(&reviews.pods());
    assert_eq!(
        proxy.send(9080, &get("reviews", "/")).upstream(),
        "reviews-v3"
    );
    // The v3 pod is replaced by one at another address.
    proxy.replace_pods(
        "outbound|9080||reviews.default.svc.cluster.local",
        &[
            ("10.244.0.195", 9080, "v1"),
            ("10.244.0.193", 9080, "v2"),
            ("10.244.0.197", 9080, "v3"),
        ],
        &[("10.244.0.197", moved.port)],
    );
    for _ in 0..5 {
        let r = proxy.send(9080, &get("reviews", "/"));
        assert_eq!(r.upstream(), "reviews-v3-new", "{}", r.text());
    }
}

#[test]
fn consistent_hash_keeps_each_user_on_one_pod() {
    let hashed = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
";
    let (doc, list) = istio_manifest(
        &format!("{BOOKINFO}---{hashed}"),
        sidecar_proxy(),
        ManifestKind::EnvoyFilter,
        Packing::Auto,
    );
    assert!(doc.clusters.iter().any(|c| c.lb.consistent_hash.is_some()));
    let a = Upstream::start("reviews-v1-a");
    let b = Upstream::start("reviews-v1-b");
    let proxy = Istiod::sidecar("services-only")
        .pod(
            "outbound|9080||reviews.default.svc.cluster.local",
            "10.244.0.198",
            9080,
            "v1",
        )
        .apply(&list)
        .start(&[("10.244.0.195", a.port), ("10.244.0.198", b.port)]);
    let mut seen = BTreeSet::new();
    for user in ["ann", "bob", "cid", "dee", "eve", "fay"] {
        let first = proxy
            .send(9080, &get("reviews", "/").header("x-user", user))
            .upstream();
        for _ in 0..7 {
            let r = proxy.send(9080, &get("reviews", "/").header("x-user", user));
            assert_eq!(r.upstream(), first, "{user} moved");
        }
        seen.insert(first);
    }
    assert!(seen.iter().all(|u| u.starts_with("reviews-v1")));
}

#[test]
fn istiods_circuit_breaker_guards_the_filters_route() {
    let limited = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: default}
spec:
  host: details
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: details, subset: v1}}]
";
    let (doc, list) = istio_manifest(
        &format!("{BOOKINFO}---{limited}"),
        sidecar_proxy(),
        ManifestKind::WasmPlugin,
        Packing::Auto,
    );
    // Inside Istio the filter keeps no breaker of its own.
    let details = doc
        .clusters
        .iter()
        .find(|c| c.name == "outbound|9080|v1|details.default.svc.cluster.local")
        .expect("details v1");
    assert_eq!(details.connection_pool, ir::ConnectionPool::default());
    let slow = Upstream::start("details");
    slow.delay_by(500);
    let proxy = Istiod::sidecar("services-only")
        .apply(&list)
        .start(&[("10.244.0.190", slow.port)]);
    let proxy = &proxy;
    let statuses: Vec<u16> = thread::scope(|s| {
        let calls: Vec<_> = (0..6)
            .map(|_| s.spawn(move || proxy.send(9080, &get("details", "/")).status))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(
        proxy.stat("cluster.outbound|9080|v1|details.default.svc.cluster.local.upstream_rq_pending_overflow") > 0,
        "Envoy's breaker of istiod's cluster did not trip"
    );
}

const HTTPBIN: &str = r"
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: mirror, namespace: default}
spec: {selector: {app: mirror}, ports: [{name: http, port: 8000}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: httpbin-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [httpbin.example.com, extra.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: extra, namespace: default}
spec:
  hosts: [extra.example.com]
  gateways: [istio-system/httpbin-gateway]
  http:
  - route: [{destination: {host: httpbin, port: {number: 8000}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/httpbin-gateway]
  http:
  - match: [{uri: {prefix: /get}}]
    route: [{destination: {host: httpbin, port: {number: 8000}}}]
    mirror: {host: mirror, port: {number: 8000}}
  - match: [{uri: {prefix: /headers}}]
    headers: {request: {set: {x-route: filter-only}}}
    corsPolicy:
      allowOrigins: [{exact: 'https://example.com'}]
      allowMethods: [GET]
    route: [{destination: {host: httpbin, port: {number: 8000}}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /get}
";

const MIRROR_CLUSTER: &str = "outbound|8000||mirror.default.svc.cluster.local";

#[test]
fn the_gateway_serves_port_80_rules_on_istios_8080_listener() {
    for routes in [
        "routes-http.8080.json",
        "routes-http.8080-no-virtual-service.json",
    ] {
        for kind in KINDS {
            let (doc, list) = istio_manifest(
                HTTPBIN,
                ProxyOptions::gateway("istio-system"),
                kind,
                Packing::Auto,
            );
            assert_eq!(
                doc.port_aliases,
                vec![ir::PortAlias {
                    listener: 8080,
                    table: 80
                }]
            );
            let httpbin = Upstream::start("httpbin");
            let mirror = Upstream::start("mirror");
            let proxy = Istiod::gateway(&["listener-0.0.0.0_8080.json"], &[routes])
                .pod(MIRROR_CLUSTER, "10.244.0.179", 8000, "v1")
                .apply(&list)
                .start(&[
                    ("10.244.0.178", httpbin.port),
                    ("10.244.0.179", mirror.port),
                ]);
            let context = format!("{routes}, {kind:?}");
            let r = proxy.send(8080, &get("httpbin.example.com", "/get"));
            assert_eq!(r.status, 200, "{context}: {}", r.text());
            assert_eq!(r.upstream(), "httpbin");
            // The mirror is sent to istiod's cluster of the mirror service, answer ignored.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while mirror.count() == 0 && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(mirror.count(), 1, "{context}: mirrored");
            // Istio keeps the Host of mirrored requests (DISABLE_SHADOW_HOST_SUFFIX).
            assert_eq!(
                mirror.received()[0].header("host"),
                Some("httpbin.example.com"),
                "{context}"
            );
            let r = proxy.send(8080, &get("httpbin.example.com", "/old"));
            assert_eq!(r.status, 301, "{context}");
            assert_eq!(r.header("location"), Some("http://httpbin.example.com/get"));
            let r = proxy.send(
                8080,
                &get("httpbin.example.com", "/headers")
                    .method("OPTIONS")
                    .header("origin", "https://example.com")
                    .header("access-control-request-method", "GET"),
            );
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("https://example.com"),
                "{context}: {}",
                r.status
            );
            // istiod has no route for /headers: the filter's route takes it.
            let r = proxy.send(8080, &get("httpbin.example.com", "/headers"));
            assert_eq!(r.status, 200, "{context}: {}", r.text());
            assert_eq!(r.upstream(), "httpbin");
            // istiod has no virtual host for extra.example.com: the filter's own takes it.
            let r = proxy.send(8080, &get("extra.example.com", "/anything"));
            assert_eq!(r.status, 200, "{context}: {}", r.text());
            let seen = httpbin.received();
            assert_eq!(
                seen.len(),
                3,
                "{context}: the preflight is answered at the gateway"
            );
            assert_eq!(seen[1].header("x-route"), Some("filter-only"));
            assert_no_control_headers(&seen);
            // A host no Gateway server takes is not the filter's to route.
            let r = proxy.send(8080, &get("other.example.com", "/get"));
            assert_eq!(r.status, 404, "{context}");
        }
    }
}

const TCP_ECHO: &str = r"
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: istio-io-tcp-traffic-shifting}
spec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 9000}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-echo-gateway, namespace: istio-io-tcp-traffic-shifting}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo-destination, namespace: istio-io-tcp-traffic-shifting}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: istio-io-tcp-traffic-shifting}
spec:
  hosts: ['*']
  gateways: [tcp-echo-gateway]
  tcp:
  - match: [{port: 31400}]
    route:
    - {destination: {host: tcp-echo, port: {number: 9000}, subset: v1}, weight: 20}
    - {destination: {host: tcp-echo, port: {number: 9000}, subset: v2}, weight: 80}
";

const TCP_ECHO_CLUSTER: &str =
    "outbound|9000||tcp-echo.istio-io-tcp-traffic-shifting.svc.cluster.local";

#[test]
fn gateway_tcp_weights_are_the_filters() {
    for listener in [
        "listener-0.0.0.0_31400-80-20.json",
        "listener-0.0.0.0_31400-all-v1.json",
    ] {
        for kind in KINDS {
            let (_, list) = istio_manifest(
                TCP_ECHO,
                ProxyOptions::gateway("istio-system"),
                kind,
                Packing::Auto,
            );
            let v1 = EchoServer::tcp("v1");
            let v2 = EchoServer::tcp("v2");
            let proxy: IstioProxy = Istiod::gateway(&[listener], &[])
                .pod(TCP_ECHO_CLUSTER, "10.244.0.201", 9000, "v1")
                .pod(TCP_ECHO_CLUSTER, "10.244.0.202", 9000, "v2")
                .apply(&list)
                .start(&[("10.244.0.201", v1.port), ("10.244.0.202", v2.port)]);
            let context = format!("{listener}, {kind:?}");
            let mut to_v2 = 0;
            for i in 0..100 {
                let reply = proxy.tcp(31400, &format!("hello {i}")).expect(&context);
                match reply.split(':').next() {
                    Some("v2") => to_v2 += 1,
                    Some("v1") => {}
                    _ => panic!("{context}: {reply:?}\n{}", proxy.log_text()),
                }
            }
            // The filter's 20/80 (binomial(100, 0.8): 80 ± 4), not istiod's 80/20 or 100/0.
            assert!((60..=95).contains(&to_v2), "{context}: v2 took {to_v2}");
        }
    }
}

/// istio.io "Ingress Gateway without TLS Termination", with a second nginx version: istiod
/// routes the SNI to the service (both pods), the rules to v2 only.
const NGINX_PASSTHROUGH: &str = r"
apiVersion: v1
kind: Service
metadata: {name: my-nginx, namespace: default}
spec: {selector: {run: my-nginx}, ports: [{name: https, port: 443}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: my-nginx, namespace: default}
spec:
  host: my-nginx
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mygateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    tls: {mode: PASSTHROUGH}
    hosts: [nginx.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: nginx, namespace: default}
spec:
  hosts: [nginx.example.com]
  gateways: [istio-system/mygateway]
  tls:
  - match: [{port: 443, sniHosts: [nginx.example.com]}]
    route: [{destination: {host: my-nginx, port: {number: 443}, subset: v2}}]
";

#[test]
fn gateway_sni_routes_are_the_filters_on_istios_8443_listener() {
    use meshroute_tests::l4::{TestCa, TlsClient};
    let ca = TestCa::new("istio-passthrough");
    let cert = ca.issue("nginx", &["nginx.example.com"]);
    let (v1, v2) = (
        EchoServer::tls("nginx-v1", &cert),
        EchoServer::tls("nginx-v2", &cert),
    );
    let cluster = "outbound|443||my-nginx.default.svc.cluster.local";
    for kind in KINDS {
        let (doc, list) = istio_manifest(
            NGINX_PASSTHROUGH,
            ProxyOptions::gateway("istio-system"),
            kind,
            Packing::Auto,
        );
        assert!(doc.port_aliases.contains(&ir::PortAlias {
            listener: 8443,
            table: 443
        }));
        let proxy = Istiod::gateway(&["listener-0.0.0.0_8443-passthrough.json"], &[])
            .pod(cluster, "10.244.0.211", 443, "v1")
            .pod(cluster, "10.244.0.212", 443, "v2")
            .apply(&list)
            .start(&[("10.244.0.211", v1.port), ("10.244.0.212", v2.port)]);
        let client = TlsClient::new(&ca.cert_pem, None);
        for _ in 0..6 {
            let r = client
                .get_at(proxy.addr(8443), "nginx.example.com", "/")
                .unwrap_or_else(|e| panic!("{kind:?}: {e}\n{}", proxy.log_text()));
            assert!(r.contains("x-upstream: nginx-v2"), "{kind:?}: {r}");
        }
    }
    assert_eq!(v1.connections(), 0, "istiod's route to both pods ran");
}

/// Envoy ≥ 1.33 trusts no address as internal unless told (istiod tells it only with mesh
/// networks), so a sidecar's HTTP connection manager strips an application's own
/// `x-envoy-*` router headers (istio/istio#14923); the filter does the same.
#[test]
fn an_applications_router_headers_are_dropped_as_istios_sidecar_drops_them() {
    let ratings = Upstream::start("ratings");
    let pods = [("10.244.0.191", ratings.port)];
    let slow = || {
        get("ratings", "/?sleep_ms=800")
            .header("x-envoy-upstream-rq-timeout-ms", "100")
            .header("x-envoy-max-retries", "5")
    };
    let plain = Istiod::sidecar("services-only").start(&pods);
    assert_eq!(
        plain.send(9080, &slow()).status,
        200,
        "istiod's sidecar alone"
    );
    drop(plain);
    for kind in KINDS {
        let (_, list) = istio_manifest(
            &rules_yaml(SCENARIO_VIRTUAL_SERVICES),
            sidecar_proxy(),
            kind,
            Packing::Auto,
        );
        let proxy = Istiod::sidecar("services-only").apply(&list).start(&pods);
        let r = proxy.send(9080, &slow());
        assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    }
    assert_no_control_headers(&ratings.received());
}
