//! Transparent sidecars in pods made of network namespaces: `meshroute iptables` installs
//! the capture rules inside each pod, `meshroute run --capture` runs as the proxy's user
//! (1337), and applications that know nothing of the proxy (curl, raw TCP clients, servers
//! on their pod's address) talk through it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use meshroute_tests::pods::{Node, Pod, Process};
use meshroute_tests::{get, meshroute_binary, subsets, wasm_path, Upstream};

const PROXY_UID: u32 = 1337;

/// A file the proxy's user can reach: the file itself when every directory above it lets
/// others through, else a link (or copy) in a directory that does.
fn reachable(path: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let open = path
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if open {
        return path.to_path_buf();
    }
    let dir = std::env::temp_dir().join(format!("meshroute-pods-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = dir.join(path.file_name().unwrap());
    if !target.exists() && std::fs::hard_link(path, &target).is_err() {
        std::fs::copy(path, &target).unwrap();
    }
    target
}

/// A directory the proxy's user can write its module cache to.
fn cache_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("meshroute-pods-cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    dir
}

/// A configuration directory the proxy's user can read.
fn config_dir(files: &[(&str, String)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "meshroute-pods-config-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// Installs the capture rules in `pod` with `meshroute iptables`.
fn capture(node: &Node, pod: &Pod, extra: &[&str]) {
    let bin = meshroute_binary();
    let mut args = vec!["iptables"];
    args.extend_from_slice(extra);
    let out = node.exec(pod, bin.to_str().unwrap(), &args);
    assert!(
        out.status.success(),
        "meshroute iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the transparent sidecar of `pod` as the proxy's user and waits until `/ready`.
fn sidecar(node: &Node, pod: &Pod, config: &Path, extra: &[&str]) -> Process {
    let (bin, wasm, cache) = (
        reachable(&meshroute_binary()),
        reachable(&wasm_path()),
        cache_dir(),
    );
    let mut args = vec![
        "run",
        "--for",
        "sidecar",
        "--namespace",
        "default",
        "--capture",
        "--wasm",
        wasm.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "-f",
        config.to_str().unwrap(),
    ];
    if !extra.contains(&"--access-log") {
        args.extend(["--access-log", "off"]);
    }
    args.extend_from_slice(extra);
    let mut process = node.spawn(pod, Some(PROXY_UID), &bin, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = admin(pod, "/ready").map(|(s, _)| s);
        if status == Some(200) {
            return process;
        }
        assert!(process.running(), "sidecar exited:\n{}", process.log());
        assert!(
            Instant::now() < deadline,
            "sidecar not ready:\n{}",
            process.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// An admin request inside the pod: status and body.
fn admin(pod: &Pod, path: &'static str) -> Option<(u16, String)> {
    pod.run(move || {
        get("admin", path)
            .try_send_to(SocketAddr::from(([127, 0, 0, 1], 15000)))
            .ok()
            .map(|r| (r.status, r.text()))
    })
}

/// The pod's Prometheus stats once `settled` holds for them. A connection is counted when the
/// proxy has finished it, which can be just after the client saw its last byte; if it never holds,
/// after ten seconds it hands back the last answer for the assertion to show.
fn stats_once(pod: &Pod, settled: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, stats) = admin(pod, "/stats/prometheus").unwrap();
        if settled(&stats) || Instant::now() >= deadline {
            return stats;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` from inside `pod` to `address` (a service VIP: the capture rules redirect it),
/// `Host: host`; `None` when the connection failed or was closed without an answer.
fn request(
    pod: &Pod,
    address: &str,
    host: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> Option<(u16, String)> {
    let address: SocketAddr = address.parse().unwrap();
    pod.run(move || {
        let mut req = get(host, path);
        req.headers.extend_from_slice(headers);
        std::panic::catch_unwind(|| req.try_send_to(address))
            .ok()
            .and_then(Result::ok)
            .map(|r| (r.status, r.upstream()))
    })
}

/// The first access-log line of `proxy` that `wanted` picks, waiting up to 10 s for it.
fn logged_line(
    proxy: &Process,
    what: &str,
    wanted: impl Fn(&std::collections::BTreeMap<&'static str, String>) -> bool,
) -> std::collections::BTreeMap<&'static str, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = proxy.log();
        if let Some(line) = log
            .lines()
            .filter_map(meshroute_tests::parse_istio_access_log)
            .find(|l| wanted(l))
        {
            return line;
        }
        assert!(Instant::now() < deadline, "no {what} log line:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP echo server as `pod`'s application on `port`: answers each chunk with
/// `NAME:` and the chunk.
fn echo_server(pod: &Pod, name: &'static str, port: u16) {
    let listener = pod.listen(SocketAddr::from(([0, 0, 0, 0], port)));
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if conn.write_all(&out).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A raw TCP exchange from inside `pod`: what came back for `ping`, if anything.
fn tcp_exchange(pod: &Pod, address: &str) -> Option<String> {
    let address: SocketAddr = address.parse().unwrap();
    pod.run(move || {
        let mut conn = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        conn.write_all(b"ping").ok()?;
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

fn service(name: &str, vip: &str, port: u16, port_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: {name}}}\n  ports: [{{name: {port_name}, port: {port}}}]\n---\n"
    )
}

fn workload(name: &str, app: &str, version: &str, address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  address: {address}\n  labels: {{app: {app}, version: {version}}}\n---\n"
    )
}

const RULES: &str = r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 0.5s
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
    retries: {attempts: 2, retryOn: 5xx}
";

/// The seeds' bookinfo walkthrough, pod by pod: reviews v1/v2/v3 and ratings as
/// applications in their own pods, a TCP database, and an unregistered server elsewhere.
struct Mesh {
    client: Pod,
    reviews: Vec<Upstream>,
    ratings: Upstream,
    /// Not in the registry.
    outside: Pod,
    _outside_apps: [Upstream; 2],
    config: PathBuf,
    /// Last: the applications stop before their pods go.
    node: Node,
}

fn mesh() -> Mesh {
    let mut node = Node::new();
    let client = node.pod("productpage");
    let mut registry = service("reviews", "10.96.0.10", 9080, "http");
    registry.push_str(&service("ratings", "10.96.0.11", 9080, "http"));
    registry.push_str(&service("db", "10.96.0.20", 5432, "tcp"));
    registry.push_str(&subsets("reviews", &["v1", "v2", "v3"]));
    let mut reviews = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let pod = node.pod(&format!("reviews-{v}"));
        reviews.push(pod.upstream(
            &format!("reviews-{v}"),
            SocketAddr::from(([0, 0, 0, 0], 9080)),
        ));
        registry.push_str(&workload(
            &format!("reviews-{v}"),
            "reviews",
            v,
            &pod.ip.to_string(),
        ));
    }
    let ratings_pod = node.pod("ratings");
    let ratings = ratings_pod.upstream("ratings-v1", SocketAddr::from(([0, 0, 0, 0], 9080)));
    registry.push_str(&workload(
        "ratings-v1",
        "ratings",
        "v1",
        &ratings_pod.ip.to_string(),
    ));
    let db = node.pod("db");
    echo_server(&db, "db", 5432);
    registry.push_str(&workload("db-v1", "db", "v1", &db.ip.to_string()));
    let outside = node.pod("outside");
    let outside_apps = [
        outside.upstream("outside", SocketAddr::from(([0, 0, 0, 0], 8000))),
        outside.upstream("outside-9080", SocketAddr::from(([0, 0, 0, 0], 9080))),
    ];
    echo_server(&outside, "outside", 7000);
    node.host("reviews", "10.96.0.10");
    node.host("ratings", "10.96.0.11");
    node.host("db", "10.96.0.20");
    let config = config_dir(&[
        ("registry.yaml", registry),
        ("rules.yaml", RULES.to_owned()),
    ]);
    capture(&node, &client, &[]);
    Mesh {
        node,
        client,
        reviews,
        ratings,
        outside,
        _outside_apps: outside_apps,
        config,
    }
}

#[test]
fn an_application_without_proxy_settings_gets_the_walkthrough_through_its_sidecar() {
    let m = mesh();
    let proxy = sidecar(
        &m.node,
        &m.client,
        &m.config,
        &["--labels", "app=productpage"],
    );

    // curl, as any application: a name from /etc/hosts, no proxy settings.
    let out = m.node.exec(
        &m.client,
        "curl",
        &[
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            "http://reviews:9080/",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("\n200"), "curl: {text}\n{}", proxy.log());
    assert!(
        text.contains("\"reviews-v1\"") || text.contains("\"reviews-v3\""),
        "curl reached {text}"
    );

    // The 90/10 split, over the service address.
    let outcomes: Vec<_> = (0..300)
        .map(|_| request(&m.client, "10.96.0.10:9080", "reviews:9080", "/", &[]))
        .collect();
    let count = |name: &str| {
        outcomes
            .iter()
            .filter(|o| o.as_ref().is_some_and(|(s, u)| *s == 200 && u == name))
            .count()
    };
    let (v1, v2, v3) = (
        count("reviews-v1"),
        count("reviews-v2"),
        count("reviews-v3"),
    );
    assert_eq!(
        v1 + v3,
        300,
        "every request answered by v1 or v3: {outcomes:?}"
    );
    assert_eq!(v2, 0);
    assert!((5..=60).contains(&v3), "v3 took {v3} of 300 (10% expected)");

    // No loop: each request reached an application once.
    let reached: usize = m.reviews.iter().map(Upstream::count).sum();
    assert_eq!(reached, 301, "requests seen by the reviews pods");

    // Header routing.
    for _ in 0..10 {
        let r = request(
            &m.client,
            "10.96.0.10:9080",
            "reviews:9080",
            "/",
            &[("end-user", "jason")],
        );
        assert_eq!(r, Some((200, "reviews-v2".to_owned())));
    }

    // The Host's port does not pick the routes: the port the client connected to does.
    for _ in 0..20 {
        let r = request(&m.client, "10.96.0.10:9080", "reviews:8080", "/", &[]);
        let upstream = r.unwrap_or_default();
        assert_eq!(upstream.0, 200, "Host: reviews:8080 on port 9080");
        assert!(
            upstream.1 == "reviews-v1" || upstream.1 == "reviews-v3",
            "{upstream:?}"
        );
    }

    // Fault, timeout, retries.
    m.ratings.clear();
    let fault = request(&m.client, "10.96.0.11:9080", "ratings:9080", "/fault", &[]);
    assert_eq!(fault.map(|r| r.0), Some(500));
    assert_eq!(m.ratings.count(), 0, "the fault answered in the proxy");
    let started = Instant::now();
    let slow = request(
        &m.client,
        "10.96.0.11:9080",
        "ratings:9080",
        "/slow?sleep_ms=3000",
        &[],
    );
    assert_eq!(slow.map(|r| r.0), Some(504));
    assert!(started.elapsed() < Duration::from_millis(2500));
    m.ratings.clear();
    let failing = request(
        &m.client,
        "10.96.0.11:9080",
        "ratings:9080",
        "/?status=503",
        &[],
    );
    assert_eq!(failing.map(|r| r.0), Some(503));
    assert_eq!(m.ratings.count(), 3, "one try and two retries");

    // A raw TCP client to the database's service address.
    assert_eq!(
        tcp_exchange(&m.client, "10.96.0.20:5432").as_deref(),
        Some("db:ping")
    );

    // The sidecar reports what it proxied, once per request.
    let (_, stats) = admin(&m.client, "/stats/prometheus").unwrap();
    let total: u64 = stats
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"reviews.default.svc.cluster.local\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 301 + 10 + 20, "{stats}");
    assert!(
        metric(
            &stats,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "destination_service=\"db.default.svc.cluster.local\""
            ]
        ) >= 1,
        "{stats}"
    );
}

#[test]
fn allow_any_passes_unknown_destinations_on_and_registry_only_refuses_them() {
    let m = mesh();
    let outside_http = format!("{}:8000", m.outside.ip);
    let outside_tcp = format!("{}:7000", m.outside.ip);
    {
        let _proxy = sidecar(
            &m.node,
            &m.client,
            &m.config,
            &["--labels", "app=productpage"],
        );
        let r = request(&m.client, &outside_http, "outside:8000", "/", &[]);
        assert_eq!(r, Some((200, "outside".to_owned())));
        assert_eq!(
            tcp_exchange(&m.client, &outside_tcp).as_deref(),
            Some("outside:ping")
        );
        let (_, stats) = admin(&m.client, "/stats/prometheus").unwrap();
        assert!(
            stats.contains("destination_service=\"PassthroughCluster\""),
            "{stats}"
        );
        // A port the registry has routes for, with a host it does not know: passed on to
        // the address the client connected to.
        let r = request(
            &m.client,
            &format!("{}:9080", m.outside.ip),
            "elsewhere",
            "/",
            &[],
        );
        assert_eq!(r, Some((200, "outside-9080".to_owned())));
    }
    let mut proxy = sidecar(
        &m.node,
        &m.client,
        &m.config,
        &["--labels", "app=productpage", "--outbound", "registry-only"],
    );
    assert_eq!(
        request(&m.client, &outside_http, "outside:8000", "/", &[]),
        None
    );
    assert_eq!(tcp_exchange(&m.client, &outside_tcp), None);
    // Registered services still answer.
    let r = request(&m.client, "10.96.0.10:9080", "reviews", "/", &[]);
    assert_eq!(r.map(|r| r.0), Some(200));
    // On a port with routes, an unknown host gets Istio's 502 (BlackHoleCluster).
    let r = request(
        &m.client,
        "10.96.0.10:9080",
        "unknown.example.com",
        "/",
        &[],
    );
    assert_eq!(r.map(|r| r.0), Some(502));
    proxy.signal("TERM");
    assert!(proxy
        .wait(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

/// A server pod with its own sidecar: Service `reviews` (HTTP 9080, TCP 5432) selects it.
struct ServerPod {
    bare: Pod,
    server: Pod,
    app: Upstream,
    loopback_app: Upstream,
    config: PathBuf,
    node: Node,
}

fn server_pod() -> ServerPod {
    let mut node = Node::new();
    let bare = node.pod("client");
    let server = node.pod("reviews");
    let app = server.upstream("reviews-app", SocketAddr::from(([0, 0, 0, 0], 9080)));
    let loopback_app =
        server.upstream("reviews-loopback", SocketAddr::from(([127, 0, 0, 1], 8080)));
    echo_server(&server, "reviews-db", 5432);
    echo_server(&server, "undeclared", 7070);
    let registry = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080}}, {{name: tcp-db, port: 5432}}]\n---\n{}",
        workload("reviews-v1", "reviews", "v1", &server.ip.to_string())
    );
    let config = config_dir(&[("registry.yaml", registry)]);
    capture(&node, &server, &[]);
    ServerPod {
        bare,
        server,
        app,
        loopback_app,
        config,
        node,
    }
}

fn metric(stats: &str, name: &str, labels: &[&str]) -> u64 {
    stats
        .lines()
        .filter(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && labels.iter().all(|m| l.contains(m))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_server_pods_sidecar_hands_inbound_traffic_to_its_application() {
    let s = server_pod();
    let proxy = sidecar(
        &s.node,
        &s.server,
        &s.config,
        &[
            "--labels",
            "app=reviews,version=v1",
            "--access-log",
            "/dev/stdout",
        ],
    );
    let pod_http = format!("{}:9080", s.server.ip);
    for _ in 0..5 {
        let r = request(
            &s.bare,
            &pod_http,
            "reviews.default.svc.cluster.local",
            "/",
            &[],
        );
        assert_eq!(r, Some((200, "reviews-app".to_owned())), "{}", proxy.log());
    }
    // Handed over from the inbound source address, with Istio's inbound headers.
    let seen = s.app.received();
    assert_eq!(seen.len(), 5);
    for r in &seen {
        assert!(
            r.peer.starts_with("127.0.0.6:"),
            "the application saw {}",
            r.peer
        );
        assert_eq!(r.header("x-forwarded-proto"), Some("http"));
        assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    }
    // Logged as Istio's inbound listener logs: its cluster, and its route named `default`.
    let inbound_line = logged_line(&proxy, "inbound", |l| {
        l["upstream_cluster"] == "inbound|9080||"
    });
    assert_eq!(inbound_line["route_name"], "default", "{inbound_line:?}");
    assert_eq!(inbound_line["response_code"], "200", "{inbound_line:?}");
    // Headers over the codec's limit are refused and logged as Envoy's inbound listener
    // logs them, as on the outbound path.
    let huge: &'static str = Box::leak("h".repeat(70 * 1024).into_boxed_str());
    let headers: &'static [(&str, &str)] = Box::leak(Box::new([("x-huge", huge)]));
    let refused = request(&s.bare, &pod_http, "reviews", "/huge", headers);
    assert_eq!(refused.map(|r| r.0), Some(431), "{}", proxy.log());
    let line = logged_line(&proxy, "431", |l| l["response_code"] == "431");
    assert_eq!(line["response_flags"], "DPE", "{line:?}");
    assert_eq!(
        line["response_code_details"], "http1.headers_too_large",
        "{line:?}"
    );
    assert_eq!(line["downstream_local_address"], pod_http, "{line:?}");
    // A chunked body declares no length: the bytes received are the bytes that passed.
    let to: SocketAddr = pod_http.parse().unwrap();
    let answer = s.bare.run(move || {
        let mut c = TcpStream::connect(to).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"POST /chunked HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = logged_line(&proxy, "/chunked", |l| l["path"] == "/chunked");
    assert_eq!(line["bytes_received"], "11", "{line:?}");
    // TCP ports are handed over byte for byte; so are ports no service declares.
    assert_eq!(
        tcp_exchange(&s.bare, &format!("{}:5432", s.server.ip)).as_deref(),
        Some("reviews-db:ping")
    );
    assert_eq!(
        tcp_exchange(&s.bare, &format!("{}:7070", s.server.ip)).as_deref(),
        Some("undeclared:ping")
    );
    let closed_db = [
        "reporter=\"destination\"",
        "destination_service=\"reviews.default.svc.cluster.local\"",
        "request_protocol=\"tcp\"",
    ];
    let stats = stats_once(&s.server, |stats| {
        metric(stats, "istio_tcp_connections_closed_total", &closed_db) >= 1
    });
    let inbound = [
        "reporter=\"destination\"",
        "destination_service=\"reviews.default.svc.cluster.local\"",
        "request_protocol=\"http\"",
        "response_code=\"200\"",
    ];
    // The five GETs and the chunked POST (the 431 never reached the application).
    assert_eq!(
        metric(&stats, "istio_requests_total", &inbound),
        6,
        "{stats}"
    );
    assert_eq!(
        metric(&stats, "istio_tcp_connections_closed_total", &closed_db),
        1,
        "{stats}"
    );
    assert_eq!(
        metric(&stats, "istio_requests_total", &["reporter=\"source\""]),
        0,
        "nothing inbound is reported as outbound: {stats}"
    );

    // A Sidecar's ingress listeners: one sends the port to an application on loopback, one
    // caps the connections to the database port; the running proxy picks them up on reload.
    std::fs::write(
        s.config.join("sidecar.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: reviews, namespace: default}\nspec:\n  workloadSelector: {labels: {app: reviews}}\n  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    defaultEndpoint: 127.0.0.1:8080\n  - port: {number: 5432, protocol: TCP, name: db}\n    connectionPool: {tcp: {maxConnections: 1}}\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(&s.bare, &pod_http, "reviews", "/", &[]);
        if r == Some((200, "reviews-loopback".to_owned())) {
            break;
        }
        assert_eq!(r.map(|r| r.0), Some(200), "no failure while reloading");
        assert!(
            Instant::now() < deadline,
            "ingress listener not in force:\n{}",
            proxy.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(s.loopback_app.count() >= 1);
    // maxConnections 1: while one connection is open, a second is closed at once.
    let db: SocketAddr = format!("{}:5432", s.server.ip).parse().unwrap();
    let (held, second) = s.bare.run(move || {
        let mut held = TcpStream::connect(db).unwrap();
        held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        held.write_all(b"ping").unwrap();
        let mut buf = [0u8; 64];
        let n = held.read(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut second = TcpStream::connect(db).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = second.write_all(b"ping");
        let answered = matches!(second.read(&mut buf), Ok(n) if n > 0);
        (first, answered)
    });
    assert_eq!(held, "reviews-db:ping");
    assert!(
        !second,
        "the second connection was served over maxConnections 1"
    );
    // Once the first is gone the port serves again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_exchange(&s.bare, &format!("{}:5432", s.server.ip)).as_deref()
        != Some("reviews-db:ping")
    {
        assert!(Instant::now() < deadline, "the port stayed closed");
        thread::sleep(Duration::from_millis(50));
    }
    let overflowed = [
        "reporter=\"destination\"",
        "request_protocol=\"tcp\"",
        "response_flags=\"UO\"",
    ];
    let stats = stats_once(&s.server, |stats| {
        metric(stats, "istio_tcp_connections_closed_total", &overflowed) >= 1
    });
    assert!(
        metric(&stats, "istio_tcp_connections_closed_total", &overflowed) >= 1,
        "{stats}"
    );
}

#[test]
fn sigterm_lets_accepted_requests_finish_then_exits_cleanly() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let s = server_pod();
    let mut proxy = sidecar(
        &s.node,
        &s.server,
        &s.config,
        &["--labels", "app=reviews", "--drain-seconds", "10"],
    );
    s.app.delay_by(300);
    let pod_http: SocketAddr = format!("{}:9080", s.server.ip).parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // (connected at, answered 200) per request.
    let outcomes = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, outcomes, bare) = (Arc::clone(&stop), Arc::clone(&outcomes), s.bare.clone());
            thread::spawn(move || {
                bare.run(move || {
                    for _ in 0..100 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(mut conn) =
                            TcpStream::connect_timeout(&pod_http, Duration::from_secs(2))
                        else {
                            // Refused: not accepted, nothing to finish.
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        let connected = Instant::now();
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(15)));
                        let _ = conn.write_all(
                            b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n",
                        );
                        let mut answer = Vec::new();
                        let _ = conn.read_to_end(&mut answer);
                        let ok = answer.starts_with(b"HTTP/1.1 200");
                        outcomes.lock().unwrap().push((connected, ok));
                    }
                });
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    proxy.signal("TERM");
    // Readiness fails once the drain starts, while the requests in flight finish.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let ready = admin(&s.server, "/ready").map(|r| r.0);
        if ready == Some(503) {
            break;
        }
        assert!(
            ready == Some(200) && Instant::now() < deadline,
            "/ready answered {ready:?} during the drain:\n{}",
            proxy.log()
        );
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let status = proxy.wait(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}:\n{}",
        proxy.log()
    );
    let outcomes = outcomes.lock().unwrap();
    let before: Vec<_> = outcomes.iter().filter(|(at, _)| *at < signalled).collect();
    let failed = before.iter().filter(|(_, ok)| !ok).count();
    assert!(
        before.len() >= 6,
        "load before the signal: {}",
        before.len()
    );
    assert_eq!(
        failed,
        0,
        "of {} requests accepted before SIGTERM:\n{}",
        before.len(),
        proxy.log()
    );
    // Some were still being answered when the signal came: the drain waited for them.
    let answered_after = s.app.received().len();
    assert!(answered_after >= before.len());
}

#[test]
fn a_configmap_update_swaps_the_rules_under_load_without_a_failed_request() {
    let m = mesh();
    // A mounted ConfigMap: the files in a timestamped directory, `..data` pointing at it,
    // and a link per file at the top.
    let dir = m.config.join("configmap");
    let first = dir.join("..2026_12_02_01_00_00.000000001");
    std::fs::create_dir_all(&first).unwrap();
    for name in ["registry.yaml", "rules.yaml"] {
        std::fs::copy(m.config.join(name), first.join(name)).unwrap();
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    std::os::unix::fs::symlink(first.file_name().unwrap(), dir.join("..data")).unwrap();
    let proxy = sidecar(&m.node, &m.client, &dir, &["--labels", "app=productpage"]);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut swapped = false;
    let mut v2_in_a_row = 0;
    while v2_in_a_row < 30 {
        assert!(
            Instant::now() < deadline,
            "new rules not in force:\n{}",
            proxy.log()
        );
        let r = request(&m.client, "10.96.0.10:9080", "reviews", "/", &[]);
        v2_in_a_row = if r.as_ref().is_some_and(|(_, u)| u == "reviews-v2") {
            v2_in_a_row + 1
        } else {
            0
        };
        outcomes.push(r);
        if outcomes.len() == 50 && !swapped {
            // The kubelet's atomic update: a new directory, `..data` swapped by rename.
            let second = dir.join("..2026_12_02_01_05_00.000000002");
            std::fs::create_dir_all(&second).unwrap();
            std::fs::copy(first.join("registry.yaml"), second.join("registry.yaml")).unwrap();
            let all_v2 = RULES.replace(
                "    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v3}, weight: 10}",
                "    - {destination: {host: reviews, subset: v2}}",
            );
            assert_ne!(all_v2, RULES);
            std::fs::write(second.join("rules.yaml"), all_v2).unwrap();
            std::os::unix::fs::symlink(second.file_name().unwrap(), dir.join("..data_tmp"))
                .unwrap();
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
            std::fs::remove_dir_all(&first).unwrap();
            swapped = true;
        }
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.as_ref().is_none_or(|(s, _)| *s != 200))
        .count();
    assert_eq!(failed, 0, "{outcomes:?}");
    assert!(outcomes[..50]
        .iter()
        .all(|o| o.as_ref().is_some_and(|(_, u)| u != "reviews-v2")));
    let (_, stats) = admin(&m.client, "/stats/prometheus").unwrap();
    assert_eq!(
        metric(&stats, "meshroute_config_reloads_total", &[]),
        1,
        "{stats}"
    );
    assert_eq!(
        metric(&stats, "meshroute_config_reload_failures_total", &[]),
        0
    );
}

#[test]
fn ready_answers_503_until_start_up_completes() {
    let m = mesh();
    // A cold module cache makes start-up take a while: compiling the filter.
    let cold = std::env::temp_dir().join(format!("meshroute-pods-cold-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cold);
    std::fs::create_dir_all(&cold).unwrap();
    std::os::unix::fs::chown(&cold, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    let (bin, wasm) = (reachable(&meshroute_binary()), reachable(&wasm_path()));
    let mut proxy = m.node.spawn(
        &m.client,
        Some(PROXY_UID),
        &bin,
        &[
            "run",
            "--for",
            "sidecar",
            "--capture",
            "--labels",
            "app=productpage",
            "--wasm",
            wasm.to_str().unwrap(),
            "--cache-dir",
            cold.to_str().unwrap(),
            "--status",
            "0.0.0.0:15021",
            "-f",
            m.config.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answers = Vec::new();
    loop {
        assert!(proxy.running(), "{}", proxy.log());
        assert!(Instant::now() < deadline, "{answers:?}\n{}", proxy.log());
        let status = m.client.run(|| {
            get("status", "/healthz/ready")
                .try_send_to(SocketAddr::from(([127, 0, 0, 1], 15021)))
                .ok()
                .map(|r| r.status)
        });
        if let Some(s) = status {
            answers.push(s);
        }
        if status == Some(200) {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        answers.iter().filter(|&&s| s == 503).count() >= 1,
        "{answers:?}"
    );
    assert!(
        answers[..answers.len() - 1].iter().all(|&s| s == 503),
        "{answers:?}"
    );
    // Once ready, the capture listeners serve.
    let r = request(&m.client, "10.96.0.10:9080", "reviews", "/", &[]);
    assert_eq!(r.map(|r| r.0), Some(200));
    let _ = std::fs::remove_dir_all(&cold);
}

#[test]
fn capture_rules_installed_twice_are_there_once_and_remove_takes_them_away() {
    let mut node = Node::new();
    let pod = node.pod("app");
    let nat = |node: &Node| {
        let out = node.exec(&pod, "iptables-save", &["-t", "nat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    capture(&node, &pod, &[]);
    capture(&node, &pod, &[]);
    let rules = nat(&node);
    assert_eq!(
        rules.matches("-A OUTPUT -j ISTIO_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules
            .matches("-A PREROUTING -p tcp -j ISTIO_INBOUND")
            .count(),
        1,
        "{rules}"
    );
    assert_eq!(rules.matches("--to-ports 15001").count(), 1, "{rules}");
    capture(&node, &pod, &["--remove"]);
    let rules = nat(&node);
    assert!(!rules.contains("ISTIO_"), "{rules}");
}
