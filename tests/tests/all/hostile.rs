//! Hostile clients: oversized or ambiguous requests get Envoy's answers, and a well-behaved
//! client keeps getting 200 meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use meshroute_core::contract::{CLUSTER_HEADER, ENDPOINT_HEADER};
use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{get, raw_status, registry, rules, start, Host, Upstream};

fn hostile_requests_get_envoy_answers(host: Host) {
    let up = Upstream::start("web");
    let doc = rules(
        &[("r.yaml", registry("web", 8000, &[&up]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(host, &doc);
    let port = proxy.port();
    // A well-behaved client in parallel, bounded in count.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let good = {
        let (stop, ok, bad) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&bad));
        thread::spawn(move || {
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if get("web:8000", "/fine").send(port).status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let big = "x".repeat(70 * 1024);
    let oversized = format!("GET / HTTP/1.1\r\nhost: web:8000\r\nx-big: {big}\r\n\r\n");
    assert_eq!(
        raw_status(port, oversized.as_bytes()),
        431,
        "headers above 60 KiB"
    );
    let mut many = String::from("GET / HTTP/1.1\r\nhost: web:8000\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        raw_status(port, many.as_bytes()),
        431,
        "more than 100 header fields"
    );
    let conflicting =
        b"POST / HTTP/1.1\r\nhost: web:8000\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello";
    assert_eq!(
        raw_status(port, conflicting),
        400,
        "conflicting Content-Length"
    );
    let folded =
        b"GET / HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\nx-a: one\r\n two\r\n\r\n";
    let status = raw_status(port, folded);
    match host {
        // Envoy 1.40 unfolds obsolete line folding and serves the request.
        Host::Envoy => assert_eq!(status, 200, "Envoy unfolds"),
        Host::Harness => assert_eq!(status, 400, "obsolete line folding is refused"),
    }
    let smuggle = b"POST / HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: web:8000\r\n\r\n";
    let _ = raw_status(port, smuggle);
    assert!(
        up.received().iter().all(|r| r.path != "/smuggled"),
        "a request hidden in a body never reaches the upstream"
    );
    // Let the well-behaved client get some answers in before stopping it (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < 20 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    good.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "the well-behaved client kept getting 200"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
}

#[test]
fn harness_rejects_absolute_form_host_disagreeing_with_host_header() {
    let up = Upstream::start("web");
    let doc = rules(
        &[("r.yaml", registry("web", 8000, &[&up]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(Host::Harness, &doc);
    let status = raw_status(
        proxy.port(),
        b"GET http://web:8000/ HTTP/1.1\r\nhost: other.example\r\n\r\n",
    );
    assert_eq!(status, 400);
    let status = raw_status(
        proxy.port(),
        b"GET http://web:8000/ HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert_eq!(up.count(), 1);
}

/// With the filter failed and bypassed (fail-open), forged control headers still steer
/// nothing: they were removed before the filter, so no request reaches any upstream.
fn forged_headers_steer_nothing_when_the_filter_is_bypassed(host: Host) {
    use meshroute_harness::envoy_config::FailurePolicy;
    use meshroute_harness::runtime::FailPolicy;
    let web = Upstream::start("web");
    let target = Upstream::start("forbidden");
    let doc = rules(
        &[("r.yaml", registry("web", 8000, &[&web]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy: Box<dyn meshroute_tests::Running + Sync> = match host {
        Host::Envoy => Box::new(meshroute_tests::Envoy::start_module(
            &meshroute_tests::guest_wasm_path(),
            &doc,
            FailurePolicy::FailOpen,
        )),
        Host::Harness => {
            let plugin = Arc::new(
                meshroute_wasm_host::vm::Plugin::load(&meshroute_tests::guest_wasm_path(), None)
                    .unwrap(),
            );
            Box::new(
                meshroute_tests::Harness::start_plugin(plugin, &doc, FailPolicy::FailOpen, 1)
                    .unwrap(),
            )
        }
    };
    assert_eq!(
        proxy
            .send(&get("web:8000", "/").header("x-guest", "panic"))
            .status,
        503
    );
    let forbidden = format!("127.0.0.1:{}", target.port);
    for _ in 0..5 {
        let r = proxy.send(
            &get("web:8000", "/")
                .header(
                    CLUSTER_HEADER,
                    "outbound|8000||web.default.svc.cluster.local",
                )
                .header(ENDPOINT_HEADER, &forbidden)
                .header("x-envoy-fault-abort-request", "418"),
        );
        assert_eq!(r.status, 503, "{r:?}");
    }
    assert_eq!(target.count(), 0, "the forged endpoint was never reached");
    assert_eq!(
        web.count(),
        0,
        "nothing is routed without the filter's decision"
    );
}

meshroute_tests::on_both_hosts!(
    hostile_requests_get_envoy_answers,
    forged_headers_steer_nothing_when_the_filter_is_bypassed,
);

#[test]
fn harness_closes_slow_clients_and_connections_over_the_cap() {
    use meshroute_harness::runtime::{FailPolicy, Limits};
    let up = Upstream::start("web");
    let doc = rules(
        &[("r.yaml", registry("web", 8000, &[&up]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let limits = Limits {
        max_connections: 3,
        header_timeout: Duration::from_secs(1),
    };
    let h = meshroute_tests::Harness::start_limited(
        meshroute_tests::plugin(),
        &doc,
        FailPolicy::FailClosed,
        1,
        limits,
    )
    .unwrap();
    // A slow client that never finishes its headers is cut off after the deadline.
    let mut slow = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: web:8000\r\nx-slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "closed after the header deadline: {:?}",
        start.elapsed()
    );
    let reply = String::from_utf8_lossy(&buf);
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "Envoy's answer to a slow client: {reply:?}"
    );
    // Hold the connection cap with idle connections; one more is closed at once, and once
    // they go a normal client is served again.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", h.port)).unwrap())
        .collect();
    // The proxy counts a connection once it accepts it and frees the slow client's slot
    // once that task ends: under load both take a moment, so ask until the cap shows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut over = 200;
    while over != 0 && std::time::Instant::now() < deadline {
        over = raw_status(
            h.port,
            b"GET / HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\n\r\n",
        );
        if over != 0 {
            thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(over, 0, "over the cap");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    while std::time::Instant::now() < deadline {
        status = raw_status(
            h.port,
            b"GET / HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\n\r\n",
        );
        if status == 200 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, 200);
    let metrics = get("admin", "/stats/prometheus").send(h.admin).text();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshroute_downstream_connections_refused_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // At least the one over the cap (retries may meet the cap while it drains).
    assert!(refused >= 1, "{metrics}");
}
