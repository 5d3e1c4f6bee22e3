//! Resilience decided by the filter, against upstreams that fail for real, on both hosts:
//! circuit breaking, outlier detection, consistent hashing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::thread;
use std::time::{Duration, Instant};

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{get, registry, rules, start, Host, Running, Upstream};

const HOST: &str = "web:8000";

/// Service `web` on port 8000 served by `upstreams`, with `extra` Istio YAML.
fn serve(host: Host, upstreams: &[&Upstream], extra: &str) -> Box<dyn Running + Sync> {
    let yaml = format!("{}{extra}", registry("web", 8000, upstreams));
    let doc = rules(
        &[("web.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    start(host, &doc)
}

/// A DestinationRule for `web` with `trafficPolicy` (YAML flow mapping).
fn destination_rule(policy: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec:\n  host: web\n  trafficPolicy: {policy}\n---\n")
}

/// Service `web` with a DestinationRule whose `trafficPolicy` is `policy`.
fn web(host: Host, upstreams: &[&Upstream], policy: &str) -> Box<dyn Running + Sync> {
    serve(host, upstreams, &destination_rule(policy))
}

fn circuit_breaker_sheds_overflow_with_503_uo(host: Host) {
    let v1 = Upstream::start("v1");
    let proxy = web(
        host,
        &[&v1],
        "{connectionPool: {http: {http2MaxRequests: 1}}}",
    );
    let port = proxy.port();
    let clients: Vec<_> = (0..6)
        .map(|_| thread::spawn(move || get(HOST, "/?sleep_ms=1500").send(port)))
        .collect();
    let responses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let shed: Vec<_> = responses.iter().filter(|r| r.status == 503).collect();
    assert!(ok >= 1, "{responses:?}");
    assert_eq!(ok + shed.len(), 6, "{responses:?}");
    assert!(!shed.is_empty(), "{responses:?}");
    for r in &shed {
        assert_eq!(r.header("x-envoy-overloaded"), Some("true"), "{r:?}");
        assert!(r.text().contains("overflow"), "{r:?}");
    }
    assert_eq!(v1.peak_in_flight(), 1, "more in flight than allowed");
    // The places are given back: the next request is admitted.
    assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
}

fn pending_requests_queue_behind_max_connections(host: Host) {
    let v1 = Upstream::start("v1");
    // One connection plus one waiting request: two at once are admitted, a third is not.
    let proxy = web(
        host,
        &[&v1],
        "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}",
    );
    let port = proxy.port();
    let clients: Vec<_> = (0..5)
        .map(|_| thread::spawn(move || get(HOST, "/?sleep_ms=1500").send(port)))
        .collect();
    let responses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let shed = responses
        .iter()
        .filter(|r| r.status == 503 && r.header("x-envoy-overloaded") == Some("true"))
        .count();
    assert_eq!(ok + shed, 5, "{responses:?}");
    assert!((1..=2).contains(&ok) && shed >= 3, "{responses:?}");
}

fn requests_beyond_max_connections_wait_for_a_connection(host: Host) {
    let v1 = Upstream::start("v1");
    let proxy = web(
        host,
        &[&v1],
        "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 10}}}",
    );
    // Envoy's ORIGINAL_DST cluster makes the endpoint's host (and its pool) on first use;
    // concurrent first requests could each make one and each get a connection.
    assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
    let port = proxy.port();
    let clients: Vec<_> = (0..3)
        .map(|_| thread::spawn(move || get(HOST, "/?sleep_ms=400").send(port)))
        .collect();
    let responses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Queued, not rejected (Istio CP1), and one at a time at the upstream.
    assert!(responses.iter().all(|r| r.status == 200), "{responses:?}");
    assert_eq!(v1.peak_in_flight(), 1);
    let slowest = responses.iter().map(|r| r.elapsed).max().unwrap();
    assert!(slowest >= Duration::from_millis(1_150), "{slowest:?}");
}

/// Sends `n` sequential requests and returns how many each upstream got.
fn spread(proxy: &(dyn Running + Sync), upstreams: &[&Upstream], n: usize) -> Vec<usize> {
    let before: Vec<usize> = upstreams.iter().map(|u| u.count()).collect();
    for _ in 0..n {
        proxy.send(&get(HOST, "/"));
    }
    upstreams
        .iter()
        .zip(before)
        .map(|(u, b)| u.count() - b)
        .collect()
}

fn outlier_detection_ejects_a_failing_endpoint_and_brings_it_back(host: Host) {
    let (good, bad) = (Upstream::start("good"), Upstream::start("bad"));
    let proxy = web(
        host,
        &[&good, &bad],
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100}}",
    );
    bad.fail_with(Some(500));
    let ejected_at = Instant::now();
    let got = spread(&*proxy, &[&good, &bad], 20);
    // Three consecutive 5xx, then no more traffic for the base ejection time.
    assert_eq!(got[1], 3, "{got:?}");
    assert_eq!(got[0], 17, "{got:?}");
    if matches!(host, Host::Harness) {
        let clusters = get("admin", "/clusters").send(proxy.admin_port()).text();
        let line = format!(
            "127.0.0.1:{}::health_flags::/failed_outlier_check",
            bad.port
        );
        assert!(clusters.contains(&line), "{clusters}");
        let stats = get("admin", "/stats/prometheus")
            .send(proxy.admin_port())
            .text();
        assert!(
            stats.contains("meshroute_outlier_ejections_active{cluster_name=\"outbound|8000||web.default.svc.cluster.local\"} 1"),
            "{stats}"
        );
    }
    bad.fail_with(None);
    let back = ejected_at + Duration::from_millis(2_300);
    thread::sleep(back.saturating_duration_since(Instant::now()));
    let got = spread(&*proxy, &[&good, &bad], 10);
    assert!(got[1] >= 3, "the endpoint did not come back: {got:?}");
}

fn max_ejection_percent_is_never_exceeded(host: Host) {
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = web(
        host,
        &refs,
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 40}}",
    );
    for u in &ups {
        u.fail_with(Some(500));
    }
    let got = spread(&*proxy, &refs, 30);
    // 40 % of three endpoints allows one ejection: one stops at 2, the others keep serving.
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted[0], 2, "{got:?}");
    assert!(sorted[1] > 5 && sorted[2] > 5, "{got:?}");
}

fn all_endpoints_ejected_gives_503_uh_without_panic_mode(host: Host) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let proxy = web(
        host,
        &[&a, &b],
        "{outlierDetection: {consecutive5xxErrors: 1, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 100}}",
    );
    a.fail_with(Some(502));
    b.fail_with(Some(502));
    let statuses: Vec<u16> = (0..6).map(|_| proxy.send(&get(HOST, "/")).status).collect();
    assert_eq!(a.count() + b.count(), 2, "{statuses:?}");
    let last = proxy.send(&get(HOST, "/"));
    assert_eq!(
        (last.status, last.text().as_str()),
        (503, "no healthy upstream")
    );
}

fn consistent_hash_keeps_a_key_on_one_endpoint(host: Host) {
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = web(
        host,
        &refs,
        "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}",
    );
    let mut used = std::collections::BTreeSet::new();
    for user in 0..12 {
        let user = format!("user-{user}");
        let seen: std::collections::BTreeSet<String> = (0..4)
            .map(|_| {
                proxy
                    .send(&get(HOST, "/").header("x-user", &user))
                    .upstream()
            })
            .collect();
        assert_eq!(seen.len(), 1, "{user} moved: {seen:?}");
        used.extend(seen);
    }
    assert!(used.len() >= 2, "every key on one endpoint: {used:?}");
}

fn cookie_hash_generates_the_cookie_and_sticks_to_it(host: Host) {
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = web(
        host,
        &refs,
        "{loadBalancer: {consistentHash: {httpCookie: {name: sticky, path: /, ttl: 60s}}}}",
    );
    for _ in 0..3 {
        let first = proxy.send(&get(HOST, "/"));
        assert_eq!(first.status, 200);
        let set = first.header("set-cookie").expect("set-cookie").to_owned();
        assert!(set.starts_with("sticky=\""), "{set}");
        assert!(
            set.contains("Max-Age=60") && set.contains("Path=/"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_owned();
        let upstream = first.upstream();
        for _ in 0..4 {
            let r = proxy.send(&get(HOST, "/").header("cookie", &cookie));
            assert_eq!(r.upstream(), upstream, "{cookie}");
            assert!(r.header("set-cookie").is_none(), "{r:?}");
        }
    }
}

fn five_xx_is_retried_only_when_retry_on_says_so(host: Host) {
    let v1 = Upstream::start("v1");
    v1.fail_with(Some(500));
    // Istio's default policy does not retry an upstream 500.
    let proxy = web_routes(host, &[&v1], "", "");
    let r = proxy.send(&get(HOST, "/"));
    assert_eq!((r.status, v1.count()), (500, 1), "{r:?}");
    drop(proxy);
    v1.clear();
    let proxy = web_routes(host, &[&v1], "", "    retries: {attempts: 2, retryOn: 5xx}");
    let r = proxy.send(&get(HOST, "/"));
    assert_eq!(r.status, 500, "{r:?}");
    let attempts: Vec<String> = v1
        .received()
        .iter()
        .map(|q| q.header("x-envoy-attempt-count").unwrap_or("-").to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
}

fn per_try_timeout_bounds_each_attempt_of_a_hanging_endpoint(host: Host) {
    let v1 = Upstream::start("v1");
    let proxy = web_routes(
        host,
        &[&v1],
        "",
        "    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}",
    );
    let r = proxy.send(&get(HOST, "/?sleep_ms=2500"));
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout"),
        "{r:?}"
    );
    // Three tries of 300 ms each (plus back-off), well before the endpoint would answer.
    assert!(
        r.elapsed >= Duration::from_millis(850) && r.elapsed < Duration::from_millis(2_300),
        "{:?}",
        r.elapsed
    );
    assert_eq!(v1.count(), 3);
}

/// A WorkloadEntry of `web` on a loopback port that refuses connections.
fn dead_endpoint() -> String {
    let port = meshroute_tests::refusing_port();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: web-dead, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {port}}}\n  labels: {{app: web, version: dead}}\n---\n"
    )
}

/// Service `web` with `extra` YAML and one VirtualService route with `route` fields.
fn web_routes(
    host: Host,
    upstreams: &[&Upstream],
    extra: &str,
    route: &str,
) -> Box<dyn Running + Sync> {
    serve(
        host,
        upstreams,
        &format!("{extra}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web}}}}]\n{route}\n"),
    )
}

fn default_policy_retries_a_refused_connection_on_the_other_endpoint(host: Host) {
    let good = Upstream::start("good");
    // No VirtualService retries: Istio's default policy (connect-failure among them).
    let proxy = web_routes(host, &[&good], &dead_endpoint(), "");
    for i in 0..12 {
        let r = proxy.send(&get(HOST, "/"));
        assert_eq!(
            (r.status, r.upstream()),
            (200, "good".to_owned()),
            "request {i}: {r:?}"
        );
    }
    // Some requests met the dead endpoint first: the good one saw them as second tries.
    let attempts: Vec<String> = good
        .received()
        .iter()
        .map(|q| q.header("x-envoy-attempt-count").unwrap_or("-").to_owned())
        .collect();
    assert!(attempts.iter().any(|a| a == "2"), "{attempts:?}");
    assert!(
        attempts.iter().all(|a| a == "1" || a == "2"),
        "{attempts:?}"
    );
}

fn five_xx_retries_go_to_another_endpoint_with_the_body(host: Host) {
    let (bad, good) = (Upstream::start("bad"), Upstream::start("good"));
    bad.fail_with(Some(503));
    let proxy = web_routes(
        host,
        &[&bad, &good],
        "",
        "    retries: {attempts: 1, retryOn: 5xx}",
    );
    for i in 0..10 {
        let body = format!("payload {i}");
        let r = proxy.send(&get(HOST, "/").method("POST").body(body.as_bytes()));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.report()["body"], body.as_str());
    }
    // Every request that met the failing endpoint went on to the other one.
    assert_eq!(good.count(), 10);
    for q in bad.received() {
        assert_eq!(q.header("x-envoy-attempt-count"), Some("1"));
    }
    assert!(bad.count() >= 1, "the failing endpoint was never tried");
}

fn exhausted_retries_answer_with_the_last_try(host: Host) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.fail_with(Some(502));
    b.fail_with(Some(502));
    let proxy = web_routes(
        host,
        &[&a, &b],
        "",
        "    retries: {attempts: 3, retryOn: gateway-error}",
    );
    let r = proxy.send(&get(HOST, "/"));
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(a.count() + b.count(), 4);
    // Tries alternate between the two while both fail.
    assert!(
        a.count() >= 1 && b.count() >= 1,
        "{} {}",
        a.count(),
        b.count()
    );
}

fn route_timeout_bounds_all_tries(host: Host) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let proxy = web_routes(
        host,
        &[&a, &b],
        "",
        "    timeout: 1s\n    retries: {attempts: 5, perTryTimeout: 400ms, retryOn: 5xx}",
    );
    let r = proxy.send(&get(HOST, "/?sleep_ms=3000"));
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        r.elapsed >= Duration::from_millis(950) && r.elapsed < Duration::from_millis(2_500),
        "{:?}",
        r.elapsed
    );
    assert!(
        (2..=3).contains(&(a.count() + b.count())),
        "{} {}",
        a.count(),
        b.count()
    );
}

fn max_retries_limits_concurrent_retries(host: Host) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.fail_with(Some(503));
    b.fail_with(Some(503));
    let proxy = web_routes(
        host,
        &[&a, &b],
        &destination_rule("{connectionPool: {http: {maxRetries: 1}}}"),
        "    retries: {attempts: 1, retryOn: 5xx}",
    );
    let port = proxy.port();
    // Four slow failures at once: their retries overlap, and only one may be in flight.
    let clients: Vec<_> = (0..4)
        .map(|_| thread::spawn(move || get(HOST, "/?sleep_ms=800").send(port)))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().status, 503);
    }
    let tries = a.count() + b.count();
    assert!((5..=6).contains(&tries), "{tries} tries for 4 requests");
}

fn random_balancing_spreads_requests_over_endpoints(host: Host) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let proxy = web(host, &[&a, &b], "{loadBalancer: {simple: RANDOM}}");
    let got = spread(&*proxy, &[&a, &b], 200);
    // Binomial(200, 1/2): 5 standard deviations either side.
    assert!(got.iter().all(|&n| (65..=135).contains(&n)), "{got:?}");
}

/// `http.idleTimeout`: the proxy closes a pooled upstream connection once it has been idle
/// that long (Envoy's `common_http_protocol_options.idle_timeout`; default one hour).
fn idle_upstream_connections_close_after_the_pool_idle_timeout(host: Host) {
    let (short, long) = (Upstream::start("short"), Upstream::start("long"));
    let idle = serve(
        host,
        &[&short],
        &destination_rule("{connectionPool: {http: {idleTimeout: 300ms}}}"),
    );
    let kept = web(host, &[&long], "{loadBalancer: {simple: ROUND_ROBIN}}");
    assert_eq!(idle.send(&get(HOST, "/")).status, 200);
    assert_eq!(kept.send(&get(HOST, "/")).status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while short.connections().1 == 0 {
        assert!(
            Instant::now() < deadline,
            "idle connection never closed: {:?}",
            short.connections()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(short.connections().0 >= 1);
    // The default keeps it for an hour.
    thread::sleep(Duration::from_millis(600));
    let (accepted, closed) = long.connections();
    assert!(accepted >= 1);
    assert_eq!(closed, 0, "a connection without idleTimeout closed");
}

/// `http.maxRequestsPerConnection` and `tcp.maxConnectionDuration`: an upstream connection
/// that carried its requests, or lived its time, is closed and a new one made (Envoy's
/// `common_http_protocol_options`); without them one connection carries every request.
fn upstream_connections_retire_after_their_requests_and_lifetime(host: Host) {
    let connections_of = |up: &Upstream| {
        up.received()
            .iter()
            .map(|r| r.peer.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let (limited, unlimited) = (Upstream::start("limited"), Upstream::start("unlimited"));
    let proxy = web(
        host,
        &[&limited],
        "{connectionPool: {http: {maxRequestsPerConnection: 2}}}",
    );
    let plain = web(host, &[&unlimited], "{loadBalancer: {simple: ROUND_ROBIN}}");
    for _ in 0..6 {
        assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
        assert_eq!(plain.send(&get(HOST, "/")).status, 200);
    }
    assert_eq!(
        connections_of(&limited),
        3,
        "six requests, two per connection"
    );
    assert_eq!(connections_of(&unlimited), 1);
    let aged = Upstream::start("aged");
    let proxy = web(
        host,
        &[&aged],
        "{connectionPool: {tcp: {maxConnectionDuration: 400ms}}}",
    );
    assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while aged.connections().1 == 0 {
        assert!(
            Instant::now() < deadline,
            "the connection outlived maxConnectionDuration: {:?}",
            aged.connections()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
    assert_eq!(
        connections_of(&aged),
        2,
        "a new connection after the first one's time"
    );
}

/// `tcp.tcpKeepalive`: keepalive probes on the proxy's connections to the endpoints, with
/// the configured time (seen in the kernel's socket timers, `ss -o`).
fn tcp_keepalive_is_set_on_upstream_connections(host: Host) {
    let up = Upstream::start("up");
    let proxy = web(
        host,
        &[&up],
        "{connectionPool: {tcp: {tcpKeepalive: {time: 37s, interval: 5s, probes: 3}}}}",
    );
    assert_eq!(proxy.send(&get(HOST, "/")).status, 200);
    let out = std::process::Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            "dst",
            &format!("127.0.0.1:{}", up.port),
        ])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let timer = text
        .lines()
        .find_map(|l| l.split("timer:(keepalive,").nth(1))
        .unwrap_or_else(|| panic!("no keepalive timer on the upstream connection:\n{text}"));
    let seconds: f64 = timer
        .split("sec")
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("timer {timer}"));
    assert!(
        (30.0..=37.0).contains(&seconds),
        "keepalive timer {seconds}s, 37s configured:\n{text}"
    );
}

meshroute_tests::on_both_hosts!(
    upstream_connections_retire_after_their_requests_and_lifetime,
    idle_upstream_connections_close_after_the_pool_idle_timeout,
    tcp_keepalive_is_set_on_upstream_connections,
    requests_beyond_max_connections_wait_for_a_connection,
    max_retries_limits_concurrent_retries,
    random_balancing_spreads_requests_over_endpoints,
    default_policy_retries_a_refused_connection_on_the_other_endpoint,
    five_xx_retries_go_to_another_endpoint_with_the_body,
    exhausted_retries_answer_with_the_last_try,
    route_timeout_bounds_all_tries,
    five_xx_is_retried_only_when_retry_on_says_so,
    per_try_timeout_bounds_each_attempt_of_a_hanging_endpoint,
    circuit_breaker_sheds_overflow_with_503_uo,
    pending_requests_queue_behind_max_connections,
    outlier_detection_ejects_a_failing_endpoint_and_brings_it_back,
    max_ejection_percent_is_never_exceeded,
    all_endpoints_ejected_gives_503_uh_without_panic_mode,
    consistent_hash_keeps_a_key_on_one_endpoint,
    cookie_hash_generates_the_cookie_and_sticks_to_it,
);
