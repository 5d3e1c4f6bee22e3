//! Host ABI conformance: the conformance guest (`tests/abi-guest`) reports what each host
//! function returned; the harness must answer as Envoy does. And a module that panics, loops
//! or allocates without bound must not take the host down.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_harness::envoy_config::FailurePolicy;
use meshroute_harness::runtime::FailPolicy;
use meshroute_tests::{get, guest_wasm_path, registry, rules, Envoy, Harness, Running, Upstream};
use meshroute_wasm_host::vm::Plugin;
use serde_json::Value;

fn guest() -> Arc<Plugin> {
    static GUEST: OnceLock<Arc<Plugin>> = OnceLock::new();
    Arc::clone(
        GUEST.get_or_init(|| Arc::new(Plugin::load(&guest_wasm_path(), None).expect("guest"))),
    )
}

fn doc(upstream: &Upstream) -> meshroute_core::ir::RulesDocument {
    rules(
        &[("r.yaml", registry("web", 8000, &[upstream]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    )
}

fn report(proxy: &dyn Running) -> Value {
    let r = proxy.send(
        &get("web:8000", "/some/path?q=1")
            .header("x-guest", "report")
            .header("x-empty", ""),
    );
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not a report: {}", r.text()))
}

#[test]
fn host_functions_answer_as_envoy_does() {
    let up = Upstream::start("web");
    let d = doc(&up);
    let envoy = Envoy::start_module(&guest_wasm_path(), &d, FailurePolicy::FailClosed);
    // A fresh module: shared data lives as long as the plugin, like Envoy's per process.
    let fresh = Arc::new(Plugin::load(&guest_wasm_path(), None).expect("guest"));
    let harness = Harness::start_plugin(fresh, &d, FailPolicy::FailClosed, 1).unwrap();
    let (e, h) = (report(&envoy), report(&harness));
    let (eo, ho) = (e.as_object().unwrap(), h.as_object().unwrap());
    assert_eq!(
        eo.keys().collect::<Vec<_>>(),
        ho.keys().collect::<Vec<_>>(),
        "same probes on both hosts"
    );
    // Values that depend on the connection (addresses, ports) may differ; their status and
    // encoding length (8-byte integers) may not.
    let run_dependent = [
        "source.address",
        "source.port",
        "destination.port",
        "request header count",
    ];
    for (k, ev) in eo {
        let hv = &ho[k];
        if run_dependent.contains(&k.as_str()) {
            assert_eq!(ev.get("st"), hv.get("st"), "{k}: envoy {ev} harness {hv}");
            if k.ends_with(".port") {
                assert_eq!(hv["len"], 8, "{k} is an 8-byte integer");
            }
        } else {
            assert_eq!(ev, hv, "{k}: envoy {ev} harness {hv}");
        }
    }
    // A sanity check that the comparison is about something.
    assert_eq!(h["no.such.property"]["st"], 1);
    assert_eq!(h["filter_state"]["st"], 3);
    assert_eq!(h["shared"]["set_stale_cas"], 8);
    assert_eq!(
        h["metric"],
        serde_json::json!({"value": 3}),
        "{}",
        h["metric"]
    );
    assert_eq!(
        h["header edits"],
        serde_json::json!([
            ["x-guest-added", "a"],
            ["x-guest-added", "b"],
            ["x-guest-replaced", "two"]
        ])
    );

    // A stream paused in the request phase is resumed from the root context's tick.
    for proxy in [&envoy as &dyn Running, &harness] {
        let start = Instant::now();
        let r = proxy.send(&get("web:8000", "/").header("x-guest", "pause"));
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "{:?}",
            start.elapsed()
        );
        // Resumed without a routing decision: no cluster header, so no upstream.
        assert_eq!(r.status, 503, "{r:?}");
    }
}

#[test]
fn side_call_errors_are_synchronous_as_in_envoy() {
    let up = Upstream::start("web");
    let d = doc(&up);
    let static_cluster = d.clusters[0].name.clone();
    let envoy = Envoy::start_module(&guest_wasm_path(), &d, FailurePolicy::FailClosed);
    let harness = Harness::start_plugin(guest(), &d, FailPolicy::FailClosed, 1).unwrap();
    for proxy in [&envoy as &dyn Running, &harness] {
        let unknown = proxy.send(
            &get("web:8000", "/")
                .header("x-guest", "call")
                .header("x-guest-cluster", "nope"),
        );
        assert_eq!(unknown.text(), r#"{"dispatch_error":2}"#);
        // Without the endpoint header a cluster whose endpoints the filter picks has no host.
        let no_host = proxy.send(
            &get("web:8000", "/")
                .header("x-guest", "call")
                .header("x-guest-cluster", &static_cluster),
        );
        assert_eq!(no_host.text(), r#"{"dispatch_error":10}"#);
    }
}

#[test]
fn resets_and_done_behave_as_in_envoy() {
    let up = Upstream::start("web");
    let d = doc(&up);
    let envoy = Envoy::start_module(&guest_wasm_path(), &d, FailurePolicy::FailClosed);
    let harness = Harness::start_plugin(guest(), &d, FailPolicy::FailClosed, 1).unwrap();
    let done: Vec<u16> = [&envoy as &dyn Running, &harness]
        .iter()
        .map(|p| {
            p.send(&get("web:8000", "/").header("x-guest", "done"))
                .status
        })
        .collect();
    assert_eq!(done[0], done[1], "proxy_done from a stream context");
    // Closing the stream from the request phase: Envoy answers 503 without a body.
    for proxy in [&envoy as &dyn Running, &harness] {
        let r = proxy.send(&get("web:8000", "/").header("x-guest", "reset"));
        assert_eq!((r.status, r.text().as_str()), (503, ""), "{r:?}");
    }
}

fn contained(proxy: &dyn Running, how: &str) -> Duration {
    let start = Instant::now();
    let r = proxy.send(&get("web:8000", "/").header("x-guest", how));
    assert_eq!(r.status, 503, "{how}: {r:?}");
    start.elapsed()
}

#[test]
fn a_trapping_looping_or_hoarding_module_is_contained() {
    let up = Upstream::start("web");
    let d = doc(&up);
    for how in [
        "panic",
        "loop",
        "alloc",
        "response-header-early",
        "grpc-cancel-unknown",
    ] {
        let h = Harness::start_plugin(guest(), &d, FailPolicy::FailClosed, 1).unwrap();
        assert_eq!(
            h.send(&get("web:8000", "/")).status,
            200,
            "healthy before {how}"
        );
        let took = contained(&h, how);
        assert!(took < Duration::from_secs(20), "{how} took {took:?}");
        // Fail-closed: the failed instance answers 503 from now on, and the process lives.
        assert_eq!(h.send(&get("web:8000", "/")).status, 503, "after {how}");
        let admin = get("admin", "/ready").send(h.admin_port());
        assert_eq!(admin.status, 200);
    }
}

/// Waits (bounded) until the harness on `admin` has counted one failed instance.
fn wait_for_one_failure(admin: u16) {
    let failures = || {
        get("admin", "/stats/prometheus")
            .send(admin)
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("meshroute_wasm_failures_total "))
            .map(str::to_owned)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures().as_deref() != Some("1") {
        assert!(
            Instant::now() < deadline,
            "trap not recorded: {:?}",
            failures()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A trap in a request's `on_log` (after its answer went out) fails the instance like any
/// other trap: it is logged and counted, and the next request gets 503 (fail closed), as
/// Envoy does with a VM that failed.
#[test]
fn a_trap_in_on_log_is_recorded_and_fails_the_instance() {
    let up = Upstream::start("web");
    let h = Harness::start_plugin(guest(), &doc(&up), FailPolicy::FailClosed, 1).unwrap();
    let r = h.send(&get("web:8000", "/").header("x-guest", "panic-at-log"));
    assert_eq!((r.status, r.text().as_str()), (200, "answered"));
    wait_for_one_failure(h.admin_port());
    assert_eq!(h.send(&get("web:8000", "/")).status, 503, "fail closed");
}

#[test]
fn reload_policy_replaces_a_failed_instance_after_a_back_off() {
    let up = Upstream::start("web");
    let h = Harness::start_plugin(guest(), &doc(&up), FailPolicy::Reload, 1).unwrap();
    contained(&h, "panic");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    while Instant::now() < deadline {
        status = h.send(&get("web:8000", "/")).status;
        if status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, 200, "a new instance serves again");
    let metrics = get("admin", "/stats/prometheus")
        .send(h.admin_port())
        .text();
    assert!(
        metrics.contains("meshroute_wasm_reloads_total 1"),
        "{metrics}"
    );
}

#[test]
fn envoy_survives_a_panicking_module() {
    let up = Upstream::start("web");
    let mut envoy = Envoy::start_module(&guest_wasm_path(), &doc(&up), FailurePolicy::FailClosed);
    let r = envoy.send(&get("web:8000", "/").header("x-guest", "panic"));
    assert_eq!(r.status, 503);
    assert_eq!(envoy.send(&get("web:8000", "/")).status, 503, "fail closed");
    assert!(envoy.alive());
    assert!(envoy.log_text().contains("asked to panic"));
}

#[test]
fn a_module_rejecting_its_configuration_is_not_started() {
    let up = Upstream::start("web");
    let _ = up;
    let err = guest()
        .start(
            "meshroute",
            b"reject",
            Arc::new(|_: &str, _: &[(String, String)]| {
                meshroute_wasm_host::abi::CallTarget::UnknownCluster
            }),
        )
        .err()
        .expect("rejected");
    assert!(
        err.to_string().contains("rejected its configuration"),
        "{err}"
    );
}

/// A side call that reaches the upstream answers through on_http_call_response (with the
/// call's status readable there) on both hosts. A request body rewritten in the body callback
/// is checked on the harness alone: Envoy's router starts on the headers, before the body.
#[test]
fn side_call_callbacks_and_body_edits() {
    let up = Upstream::start("web");
    let d = doc(&up);
    let cluster = d.clusters[0].name.clone();
    let envoy = Envoy::start_module(&guest_wasm_path(), &d, FailurePolicy::FailClosed);
    let harness = Harness::start_plugin(guest(), &d, FailPolicy::FailClosed, 1).unwrap();
    let endpoint = format!("127.0.0.1:{}", up.port);
    let answers: Vec<Value> = [&envoy as &dyn Running, &harness]
        .iter()
        .map(|proxy| {
            let r = proxy.send(
                &get("web:8000", "/")
                    .header("x-guest", "call")
                    .header("x-guest-cluster", &cluster)
                    .header("x-guest-endpoint", &endpoint),
            );
            assert_eq!(r.header("x-guest"), Some("call"), "{r:?}");
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect();
    for a in &answers {
        assert_eq!(a["status"], "200", "{a}");
        assert!(a["token"].as_u64().unwrap() > 0);
    }
    assert_eq!(
        answers[0]["get_status"], answers[1]["get_status"],
        "{answers:?}"
    );
    let side: Vec<_> = up
        .received()
        .into_iter()
        .filter(|r| r.path == "/side")
        .collect();
    assert_eq!(side.len(), 2, "one side call per host");
    for call in &side {
        assert_eq!(call.header("host"), Some("side.example"));
    }

    let r = harness.send(
        &get("web:8000", "/")
            .method("POST")
            .header("x-guest", "body")
            .body(b"original body"),
    );
    assert_eq!(r.text(), r#"{"after":"replaced","size":13}"#, "{r:?}");
}

/// A trap in a connection's close callback fails the instance like any other trap: it is
/// counted, and the next connection through that instance is refused (fail closed).
#[test]
fn a_trap_when_a_connection_closes_is_recorded() {
    let echo = meshroute_tests::l4::EchoServer::tcp("db");
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {}}}}}]
",
        echo.port
    );
    let doc = rules(
        &[("db.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let harness = Harness::start_plugin(
        Arc::new(guest().fresh_copy()),
        &doc,
        FailPolicy::FailClosed,
        1,
    )
    .expect("harness");
    let port = harness.port_for(5432);
    assert_eq!(
        meshroute_tests::l4::tcp_exchange(port, "hello"),
        Ok("db:hello".to_string())
    );
    wait_for_one_failure(harness.admin_port());
    assert_ne!(
        meshroute_tests::l4::tcp_exchange(port, "again"),
        Ok("db:again".to_string()),
        "a failed instance routes nothing"
    );
}
