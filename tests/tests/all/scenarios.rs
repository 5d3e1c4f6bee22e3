//! Every feature of the filter observed through real Envoy and through the harness (the
//! same module and rules on both hosts): at the client or at upstreams that report what
//! they received. Each scenario runs once per host.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::thread;
use std::time::{Duration, Instant};

use meshroute_core::contract::{CLUSTER_HEADER, ENDPOINT_HEADER, LISTENER_PORT_HEADER};
use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{get, registry, rules, start, subsets, Host, Running, Upstream};

const VS_HEAD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n";

/// Envoy with service `web` (port 8000) served by upstreams `v1` and `v2`, subsets `v1`,
/// `v2` and `ghost` (no endpoints), and the given VirtualService routes.
struct Web {
    v1: Upstream,
    v2: Upstream,
    envoy: Box<dyn Running + Sync>,
}

fn web(host: Host, routes: &str) -> Web {
    web_with(host, routes, OutboundPolicy::AllowAny, "")
}

fn web_with(host: Host, routes: &str, outbound: OutboundPolicy, extra: &str) -> Web {
    let v1 = Upstream::start("v1");
    let v2 = Upstream::start("v2");
    let yaml = format!(
        "{}{}{VS_HEAD}{routes}---\n{extra}",
        registry("web", 8000, &[&v1, &v2]),
        subsets("web", &["v1", "v2", "ghost"]),
    );
    let doc = rules(&[("web.yaml", yaml)], ProxyKind::Sidecar, outbound);
    let envoy = start(host, &doc);
    Web { v1, v2, envoy }
}

const HOST: &str = "web:8000";

fn outcomes_404_503_nc_503_uh_and_unknown_hosts(host: Host) {
    let w = web_with(
        host,
        "  - match: [{uri: {prefix: /nc}}]
    route: [{destination: {host: web, subset: undeclared}}]
  - match: [{uri: {prefix: /uh}}]
    route: [{destination: {host: web, subset: ghost}}]
  - match: [{uri: {prefix: /ok}}]
    route: [{destination: {host: web, subset: v1}}]
",
        OutboundPolicy::AllowAny,
        "",
    );
    let nr = w.envoy.send(&get(HOST, "/nothing"));
    assert_eq!((nr.status, nr.text().as_str()), (404, ""), "{nr:?}");
    let nc = w.envoy.send(&get(HOST, "/nc"));
    assert_eq!((nc.status, nc.text().as_str()), (503, ""), "{nc:?}");
    let uh = w.envoy.send(&get(HOST, "/uh"));
    assert_eq!(
        (uh.status, uh.text().as_str()),
        (503, "no healthy upstream"),
        "{uh:?}"
    );
    assert_eq!(w.envoy.send(&get(HOST, "/ok")).upstream(), "v1");
    assert_eq!(w.v2.count(), 0);

    // ALLOW_ANY: an unknown host goes to the address the client asked for.
    let outside = Upstream::start("outside");
    let authority = format!("127.0.0.1:{}", outside.port);
    let r = w.envoy.send(&get(&authority, "/direct"));
    assert_eq!(r.upstream(), "outside", "{r:?}");
    let by_name = format!("localhost:{}", outside.port);
    let r = w.envoy.send(&get(&by_name, "/by-name"));
    assert_eq!(r.upstream(), "outside", "{r:?}");

    // REGISTRY_ONLY: 502 for the same request, known services still route.
    let strict = web_with(
        host,
        "  - route: [{destination: {host: web, subset: v2}}]\n",
        OutboundPolicy::RegistryOnly,
        "",
    );
    let r = strict.envoy.send(&get(&authority, "/direct"));
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(strict.envoy.send(&get(HOST, "/")).upstream(), "v2");
    assert_eq!(outside.count(), 2);
}

fn redirects_direct_responses_and_rewrites(host: Host) {
    let w = web(
        host,
        r"  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new/path, redirectCode: 302}
  - match: [{uri: {prefix: /moved/}}]
    redirect: {prefixRewrite: /here/, authority: other.example, scheme: https}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
    headers: {response: {set: {x-kind: teapot}}}
  - match: [{uri: {prefix: /api}}]
    rewrite: {uri: /v2/api, authority: backend.internal}
    route: [{destination: {host: web, subset: v1}}]
  - match: [{uri: {prefix: /svc}}]
    rewrite:
      uriRegexRewrite: {match: '^/svc/([^/]+)/(.*)$', rewrite: '/\2/\1'}
    route: [{destination: {host: web, subset: v2}}]
",
    );
    let r = w.envoy.send(&get(HOST, "/old?keep=1"));
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("http://web:8000/new/path?keep=1")
    );
    let r = w.envoy.send(&get(HOST, "/moved/a/b"));
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://other.example/here/a/b"));

    let r = w.envoy.send(&get(HOST, "/teapot"));
    assert_eq!((r.status, r.text().as_str()), (418, "short and stout"));
    assert_eq!(r.header("x-kind"), Some("teapot"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let content_types = r
        .headers
        .iter()
        .filter(|(k, _)| k == "content-type")
        .count();
    assert_eq!(content_types, 1, "{r:?}");

    let r = w.envoy.send(&get(HOST, "/api/items?x=1"));
    let report = r.report();
    assert_eq!(report["path"], "/v2/api/items?x=1");
    let seen = w.v1.received();
    let last = seen.last().unwrap();
    assert_eq!(last.header("host"), Some("backend.internal"));
    assert_eq!(last.header("x-envoy-original-path"), Some("/api/items?x=1"));

    let r = w.envoy.send(&get(HOST, "/svc/orders/list/all"));
    assert_eq!(r.report()["path"], "/list/all/orders");
    assert_eq!(w.v2.count(), 1);
}

fn header_operations_reach_upstream_and_client(host: Host) {
    let w = web(
        host,
        "  - headers:
      request:
        set: {x-set: route}
        add: {x-added: one}
        remove: [x-drop]
      response:
        set: {x-resp: route}
        remove: [x-upstream-secret]
    route:
    - destination: {host: web, subset: v1}
      headers:
        request: {set: {x-dest: v1}}
        response: {add: {x-dest-resp: v1}}
",
    );
    let r = w.envoy.send(
        &get(HOST, "/")
            .header("x-set", "client")
            .header("x-added", "client")
            .header("x-drop", "please"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-resp"), Some("route"));
    assert_eq!(r.header("x-dest-resp"), Some("v1"));
    let seen = w.v1.received();
    let req = seen.last().unwrap();
    assert_eq!(req.header("x-set"), Some("route"));
    assert_eq!(req.header("x-dest"), Some("v1"));
    assert_eq!(req.header("x-drop"), None);
    let added: Vec<_> = req
        .headers
        .iter()
        .filter(|(k, _)| k == "x-added")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        added.join(",").contains("client") && added.join(",").contains("one"),
        "{added:?}"
    );
}

fn cors_preflight_answered_and_actual_response_decorated(host: Host) {
    let w = web(
        host,
        "  - corsPolicy:
      allowOrigins: [{exact: 'https://app.example'}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-trace]
      maxAge: 1h
      allowCredentials: true
    route: [{destination: {host: web, subset: v1}}]
",
    );
    let pre = w.envoy.send(
        &get(HOST, "/cart")
            .method("OPTIONS")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST"),
    );
    assert_eq!(pre.status, 200);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(pre.header("access-control-max-age"), Some("3600"));
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(w.v1.count(), 0, "preflight answered by the proxy");

    let actual = w
        .envoy
        .send(&get(HOST, "/cart").header("origin", "https://app.example"));
    assert_eq!(
        actual.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        actual.header("access-control-expose-headers"),
        Some("x-trace")
    );
    let foreign = w
        .envoy
        .send(&get(HOST, "/cart").header("origin", "https://evil.example"));
    assert_eq!(foreign.status, 200);
    assert_eq!(foreign.header("access-control-allow-origin"), None);
    // An unmatched preflight is forwarded (Istio's default).
    let before = w.v1.count();
    w.envoy.send(
        &get(HOST, "/cart")
            .method("OPTIONS")
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "POST"),
    );
    assert_eq!(w.v1.count(), before + 1);
}

fn fault_abort_and_delay_at_their_percentages(host: Host) {
    let w = web(
        host,
        "  - match: [{uri: {prefix: /abort-all}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: web, subset: v1}}]
  - match: [{uri: {prefix: /abort-some}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 30}}}
    route: [{destination: {host: web, subset: v1}}]
  - match: [{uri: {prefix: /grpc}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: web, subset: v1}}]
  - match: [{uri: {prefix: /delay-all}}]
    fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
    route: [{destination: {host: web, subset: v1}}]
  - match: [{uri: {prefix: /delay-some}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 50}}}
    route: [{destination: {host: web, subset: v2}}]
",
    );
    let r = w.envoy.send(&get(HOST, "/abort-all"));
    assert_eq!((r.status, r.text().as_str()), (418, "fault filter abort"));
    assert_eq!(w.v1.count(), 0);

    let total = 300;
    let aborted = (0..total)
        .filter(|_| w.envoy.send(&get(HOST, "/abort-some")).status == 503)
        .count();
    // Binomial(300, 0.3): sd ≈ 7.9; ±4 sd.
    assert!(
        (58..=122).contains(&aborted),
        "{aborted} of {total} aborted"
    );
    assert_eq!(w.v1.count(), total - aborted);

    let g = w
        .envoy
        .send(&get(HOST, "/grpc").header("content-type", "application/grpc"));
    assert_eq!(g.status, 200, "{g:?}");
    assert_eq!(g.header("grpc-status"), Some("14"), "{g:?}");

    let r = w.envoy.send(&get(HOST, "/delay-all"));
    assert_eq!(r.status, 200);
    assert!(r.elapsed >= Duration::from_millis(400), "{:?}", r.elapsed);

    // Half the requests wait 300 ms: count the slow ones, sent in parallel to bound the time.
    let n = 40;
    let slow = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| s.spawn(|| w.envoy.send(&get(HOST, "/delay-some"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .inspect(|r| assert_eq!(r.status, 200))
            .filter(|r| r.elapsed >= Duration::from_millis(300))
            .count()
    });
    // Binomial(40, 0.5): sd ≈ 3.2; ±4 sd.
    assert!((7..=33).contains(&slow), "{slow} of {n} delayed");
}

fn timeout_gives_504_upstream_request_timeout(host: Host) {
    let w = web(
        host,
        "  - timeout: 300ms
    route: [{destination: {host: web, subset: v1}}]
",
    );
    let start = Instant::now();
    let r = w.envoy.send(&get(HOST, "/?sleep_ms=3000"));
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    let ok = w.envoy.send(&get(HOST, "/?sleep_ms=50"));
    assert_eq!(ok.status, 200);
}

fn mirrors_copy_requests_with_bodies_without_delaying_the_client(host: Host) {
    let w = web(
        host,
        "  - mirror: {host: web, subset: v2}
    route: [{destination: {host: web, subset: v1}}]
",
    );
    let r = w
        .envoy
        .send(&get(HOST, "/orders?id=7").header("x-trace", "abc"));
    assert_eq!(r.upstream(), "v1");
    let r = w
        .envoy
        .send(&get(HOST, "/orders").method("POST").body(b"{\"qty\":2}"));
    assert_eq!(r.upstream(), "v1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.v2.count() < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let copies = w.v2.received();
    assert_eq!(copies.len(), 2, "{copies:?}");
    // Mirrors are fire-and-forget: their arrival order is not the clients'.
    let get_copy = copies
        .iter()
        .find(|c| c.method == "GET")
        .expect("GET mirrored");
    let post_copy = copies
        .iter()
        .find(|c| c.method == "POST")
        .expect("POST mirrored");
    assert_eq!(get_copy.path, "/orders?id=7");
    assert_eq!(get_copy.header("x-trace"), Some("abc"));
    assert_eq!(
        get_copy.header("host"),
        Some(HOST),
        "Istio keeps the original host"
    );
    assert_eq!(post_copy.body, b"{\"qty\":2}");
    assert_eq!(w.v1.count(), 2);
}

fn client_control_headers_never_steer_or_leak(host: Host) {
    let w = web(
        host,
        "  - route: [{destination: {host: web, subset: v1}}]\n",
    );
    let v2_endpoint = format!("127.0.0.1:{}", w.v2.port);
    for _ in 0..5 {
        let r = w.envoy.send(
            &get(HOST, "/")
                .header(
                    CLUSTER_HEADER,
                    "outbound|8000|v2|web.default.svc.cluster.local",
                )
                .header(ENDPOINT_HEADER, &v2_endpoint)
                .header(LISTENER_PORT_HEADER, "1")
                .header("x-envoy-fault-abort-request", "418")
                .header("x-envoy-upstream-rq-timeout-ms", "1"),
        );
        assert_eq!(r.upstream(), "v1", "{r:?}");
    }
    assert_eq!(w.v2.count(), 0);
    for req in w.v1.received() {
        assert_eq!(req.header(CLUSTER_HEADER), None);
        assert_eq!(req.header(LISTENER_PORT_HEADER), None);
        assert_eq!(req.header("x-envoy-fault-abort-request"), None);
    }
}

fn gateway_routes_by_host_and_redirects_to_https(host: Host) {
    let v1 = Upstream::start("v1");
    let v2 = Upstream::start("v2");
    let yaml = format!(
        "{}{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: web-gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ['web.example.com']
  - port: {{number: 80, name: http-redirect, protocol: HTTP}}
    hosts: ['secure.example.com']
    tls: {{httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: default}}
spec:
  hosts: ['secure.example.com']
  gateways: [istio-system/web-gw]
  http:
  - route: [{{destination: {{host: web.default.svc.cluster.local, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: ['web.example.com']
  gateways: [istio-system/web-gw]
  http:
  - match: [{{uri: {{prefix: /two}}}}]
    route: [{{destination: {{host: web.default.svc.cluster.local, subset: v2}}}}]
  - route: [{{destination: {{host: web.default.svc.cluster.local, subset: v1}}}}]
",
        registry("web", 8000, &[&v1, &v2]),
        subsets("web", &["v1", "v2"]),
    );
    let doc = rules(
        &[("gw.yaml", yaml)],
        ProxyKind::Gateway,
        OutboundPolicy::AllowAny,
    );
    let envoy = start(host, &doc);
    assert_eq!(envoy.send(&get("web.example.com", "/")).upstream(), "v1");
    assert_eq!(
        envoy.send(&get("WEB.example.com:80", "/two")).upstream(),
        "v2"
    );
    let unknown = envoy.send(&get("other.example.com", "/"));
    assert_eq!(unknown.status, 404, "{unknown:?}");
    let redirect = envoy.send(&get("secure.example.com", "/pay?x=1"));
    assert_eq!(redirect.status, 301, "{redirect:?}");
    assert_eq!(
        redirect.header("location"),
        Some("https://secure.example.com/pay?x=1")
    );
    assert_eq!(
        v1.count() + v2.count(),
        2,
        "the redirected request never reached an upstream"
    );
}

#[test]
fn envoy_invalid_rules_are_rejected_with_the_reason_in_the_log() {
    let dir = std::env::temp_dir().join(format!("meshroute-bad-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut doc = rules(
        &[("r.yaml", registry("web", 8000, &[]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    doc.version = 99;
    let (port, admin) = (meshroute_tests::free_port(), meshroute_tests::free_port());
    let wasm = meshroute_tests::wasm_path();
    let bind = |port| meshroute_harness::envoy_config::Bind {
        server_port: None,
        address: "127.0.0.1".into(),
        port,
    };
    let (bootstrap, _) = meshroute_harness::envoy_config::bootstrap(
        &doc,
        &meshroute_harness::envoy_config::Options {
            wasm: &wasm,
            binds: &[bind(port)],
            admin: Some(&bind(admin)),
            failure_policy: meshroute_harness::envoy_config::FailurePolicy::FailClosed,
            credentials: None,
            access_log_encoding: Default::default(),
        },
    )
    .unwrap();
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, bootstrap.to_string()).unwrap();
    let log = dir.join("envoy.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new("setsid")
        .arg(meshroute_tests::envoy_binary())
        .args(["-c"])
        .arg(&config)
        .args(["--concurrency", "1", "--disable-hot-restart"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("configuration rejected") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        text.contains("rules document version 99 is not supported"),
        "no reason in the log:\n{text}"
    );
}

fn http2_cleartext_clients_are_served(host: Host) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let w = web(
        host,
        "  - route: [{destination: {host: web, subset: v2}}]\n",
    );
    let port = w.envoy.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(format!("http://{HOST}/over-h2"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"upstream\":\"v2\""), "{body}");
    assert!(body.contains("/over-h2"), "{body}");
}

#[test]
fn harness_invalid_rules_are_rejected_with_the_reason() {
    let mut doc = rules(
        &[("r.yaml", registry("web", 8000, &[]))],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    doc.version = 99;
    let err = meshroute_tests::Harness::try_start(&doc)
        .err()
        .expect("rejected");
    assert!(
        err.contains("rules document version 99 is not supported"),
        "{err}"
    );
}

meshroute_tests::on_both_hosts!(
    http2_upstream_connections_follow_the_pool_limits,
    http2_upstreams_of_grpc_ports_get_http2,
    http2_cleartext_clients_are_served,
    outcomes_404_503_nc_503_uh_and_unknown_hosts,
    redirects_direct_responses_and_rewrites,
    header_operations_reach_upstream_and_client,
    cors_preflight_answered_and_actual_response_decorated,
    fault_abort_and_delay_at_their_percentages,
    timeout_gives_504_upstream_request_timeout,
    mirrors_copy_requests_with_bodies_without_delaying_the_client,
    client_control_headers_never_steer_or_leak,
    gateway_routes_by_host_and_redirects_to_https,
);

/// An upstream that only speaks HTTP/2 (prior knowledge), answering with what it saw.
fn h2_upstream() -> u16 {
    h2_upstream_recording().0
}

/// As [`h2_upstream`], recording the peer address (the proxy's connection) of each request;
/// a path under `/slow` is answered after 600 ms.
fn h2_upstream_recording() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&peers);
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let seen = std::sync::Arc::clone(&seen);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            seen.lock().unwrap().push(peer);
                            async move {
                                if req.uri().path().starts_with("/slow") {
                                    tokio::time::sleep(Duration::from_millis(600)).await;
                                }
                                let text = format!(
                                    "h2 {:?} authority={} host={} path={}",
                                    req.version(),
                                    req.uri().authority().map_or("", |a| a.as_str()),
                                    req.headers()
                                        .get("host")
                                        .and_then(|h| h.to_str().ok())
                                        .unwrap_or(""),
                                    req.uri().path(),
                                );
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(text)),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    (port, peers)
}

/// A gRPC service `grpc:9000` on the HTTP/2 upstream at `port`, with a DestinationRule
/// `trafficPolicy` when given.
fn grpc_service(port: u16, policy: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: default}}\nspec:\n  selector: {{app: grpc}}\n  ports: [{{name: grpc, port: 9000, protocol: TCP, appProtocol: grpc}}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: grpc-1, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{grpc: {port}}}\n  labels: {{app: grpc}}\n"
    );
    if !policy.is_empty() {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: grpc, namespace: default}}\nspec:\n  host: grpc\n  trafficPolicy: {policy}\n"
        ));
    }
    yaml
}

/// `http.maxConcurrentStreams` and `http.maxRequestsPerConnection` on an HTTP/2 upstream:
/// a connection at its stream limit makes the proxy open another (Envoy's HTTP/2 pool), and
/// one that carried its requests is replaced; without them one connection carries all.
fn http2_upstream_connections_follow_the_pool_limits(host: Host) {
    let distinct = |peers: &[std::net::SocketAddr]| {
        peers
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let concurrently = |policy: &str| {
        let (port, peers) = h2_upstream_recording();
        let doc = rules(
            &[("g.yaml", grpc_service(port, policy))],
            ProxyKind::Sidecar,
            OutboundPolicy::AllowAny,
        );
        let proxy = start(host, &doc);
        // A first request makes the connection; three slow ones then overlap.
        assert_eq!(proxy.send(&get("grpc:9000", "/first")).status, 200);
        let proxy_port = proxy.port();
        let clients: Vec<_> = (0..3)
            .map(|_| thread::spawn(move || get("grpc:9000", "/slow").send(proxy_port)))
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().status, 200);
        }
        let peers = peers.lock().unwrap().clone();
        distinct(&peers[1..])
    };
    assert_eq!(
        concurrently("{connectionPool: {http: {maxConcurrentStreams: 1}}}"),
        3,
        "one stream per connection"
    );
    assert_eq!(
        concurrently(""),
        1,
        "the overlapping requests share a connection"
    );
    let (port, peers) = h2_upstream_recording();
    let doc = rules(
        &[(
            "g.yaml",
            grpc_service(
                port,
                "{connectionPool: {http: {maxRequestsPerConnection: 2}}}",
            ),
        )],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(host, &doc);
    for _ in 0..4 {
        assert_eq!(proxy.send(&get("grpc:9000", "/")).status, 200);
    }
    assert_eq!(
        distinct(&peers.lock().unwrap()),
        2,
        "four requests, two per connection"
    );
}

fn http2_upstreams_of_grpc_ports_get_http2(host: Host) {
    let port = h2_upstream();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: default}}\nspec:\n  selector: {{app: grpc}}\n  ports: [{{name: grpc, port: 9000, protocol: TCP, appProtocol: grpc}}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: grpc-1, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{grpc: {port}}}\n  labels: {{app: grpc}}\n"
    );
    let doc = rules(
        &[("g.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(host, &doc);
    let r = proxy.send(&get("grpc:9000", "/pkg.Svc/Call"));
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.text();
    assert!(text.starts_with("h2 HTTP/2.0"), "{text}");
    assert!(
        text.contains("authority=grpc:9000"),
        "the service authority, not the endpoint: {text}"
    );
}
