//! The fault table of README.md ("Faults as the access log tells them"): for every upstream
//! and client fault it lists, the status, response flags and response code details that
//! Envoy + filter and `meshroute run` both log in Istio's access-log format. The test reads
//! the table, makes each fault happen on both hosts and asserts each logged line reads as
//! its row; a fault without a row, or a row without a fault, fails it too.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{
    raw_status, refusing_port, repo_root, status_of, Envoy, Unanswered, Upstream,
};

use crate::run::{write_config, Meshroute};

/// One row of the README's table.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    fault: String,
    status: String,
    flags: String,
    details: String,
}

fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split_once("## Faults as the access log tells them")
        .expect("README has the fault table")
        .1;
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').replace("\\|", "|"))
                .collect();
            assert_eq!(cells.len(), 4, "a fault row has four cells: {l}");
            Row {
                fault: cells[0].clone(),
                status: cells[1].clone(),
                flags: cells[2].clone(),
                details: cells[3].clone(),
            }
        })
        .collect()
}

/// A Kubernetes Service `web:8000` with one instance at `port`.
fn service_on(port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 8000}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: web-1, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {port}}}\n  labels: {{app: web}}\n---\n"
    )
}

/// Routes to `web` without retries (so that each fault shows alone), `timeout` bounding
/// the upstream's answer.
fn route(timeout: &str, traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web}}}}]\n    retries: {{attempts: 0}}\n    timeout: {timeout}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec:\n  host: web\n  trafficPolicy: {traffic_policy}\n"
    )
}

/// A traffic policy that changes nothing the faults depend on.
const NO_POLICY: &str = "{connectionPool: {tcp: {connectTimeout: 2s}}}";

/// An upstream that reads a request and answers with `parts`, pausing `pause` between them,
/// then closes.
struct Scripted {
    port: u16,
    _thread: thread::JoinHandle<()>,
}

impl Scripted {
    fn start(parts: &'static [&'static [u8]], pause: Duration) -> Self {
        Self::start_answering(parts, pause, false)
    }

    /// As `start`; `at_once`: answers the first bytes, whatever they are (a plaintext
    /// server meeting a TLS ClientHello).
    fn start_answering(parts: &'static [&'static [u8]], pause: Duration, at_once: bool) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = thread::spawn(move || {
            // Bounded: the fault is made a few times at most.
            for conn in listener.incoming().take(4) {
                let Ok(mut conn) = conn else { continue };
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    while seen.is_empty() || !(at_once || seen.windows(4).any(|w| w == b"\r\n\r\n"))
                    {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    for (i, part) in parts.iter().enumerate() {
                        if i > 0 {
                            thread::sleep(pause);
                        }
                        if conn.write_all(part).is_err() {
                            return;
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Both);
                });
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// The faults the test makes, in the README's order.
const FAULTS: &[&str] = &[
    "upstream refuses the connection",
    "upstream never answers the handshake (connectTimeout 200ms)",
    "upstream closes before answering",
    "upstream closes in the middle of the body",
    "upstream answers 503",
    "upstream headers later than the route timeout (500ms)",
    "upstream body later than the route timeout (500ms)",
    "upstream TLS handshake fails (plaintext endpoint, tls SIMPLE)",
    "client sends its body over 1s (route timeout 500ms)",
    "client disconnects in the middle of its body",
    "client sends headers over 60 KiB",
];

/// What a client does to make a fault happen; returns the status it saw (0: none).
type Client = fn(u16) -> u16;

fn plain_get(port: u16) -> u16 {
    raw_status(
        port,
        b"GET /fault HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\n\r\n",
    )
}

/// Sends `bytes` and leaves before the request is whole: the proxy sees the client
/// disconnect. No answer: 0.
fn leave_after(port: u16, bytes: &[u8]) -> u16 {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = conn.write_all(bytes);
    thread::sleep(Duration::from_millis(100));
    0
}

fn client_resets_mid_body(port: u16) -> u16 {
    leave_after(
        port,
        b"POST /fault HTTP/1.1\r\nhost: web:8000\r\ncontent-length: 100\r\n\r\nonly ten b",
    )
}

/// Half the body, a pause longer than the route timeout, the rest: the route timeout starts
/// once the request is whole, so the request is answered.
fn slow_body(port: u16) -> u16 {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = conn.write_all(
        b"POST /fault HTTP/1.1\r\nhost: web:8000\r\nconnection: close\r\ncontent-length: 10\r\n\r\nfirst",
    );
    thread::sleep(Duration::from_millis(1_000));
    let _ = conn.write_all(b"later");
    status_of(conn)
}

fn oversized_headers(port: u16) -> u16 {
    let big = "x".repeat(70 * 1024);
    raw_status(
        port,
        format!("GET /fault HTTP/1.1\r\nhost: web:8000\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
}

/// A fault: the configuration that exposes it, what keeps its upstream alive, and the
/// client's part.
struct Fault {
    config: String,
    _keep: Box<dyn std::any::Any>,
    client: Client,
}

/// A fault behind the endpoint at `port` (kept alive by `keep`), reached through a route
/// with `timeout` and the traffic policy `policy`.
fn behind(
    port: u16,
    keep: impl std::any::Any,
    timeout: &str,
    policy: &str,
    client: Client,
) -> Fault {
    Fault {
        config: format!("{}{}", service_on(port), route(timeout, policy)),
        _keep: Box::new(keep),
        client,
    }
}

fn fault(name: &str) -> Option<Fault> {
    let echo = || Upstream::start("web");
    Some(match name {
        "upstream refuses the connection" => {
            behind(refusing_port(), (), "5s", NO_POLICY, plain_get)
        }
        "upstream never answers the handshake (connectTimeout 200ms)" => {
            let u = Unanswered::start();
            let policy = "{connectionPool: {tcp: {connectTimeout: 200ms}}}";
            behind(u.port, u, "5s", policy, plain_get)
        }
        "upstream closes before answering" => {
            let u = echo();
            u.reset_always(true);
            behind(u.port, u, "5s", NO_POLICY, plain_get)
        }
        "upstream closes in the middle of the body" => {
            let u = Scripted::start(
                &[b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf of it"],
                Duration::ZERO,
            );
            behind(u.port, u, "5s", NO_POLICY, plain_get)
        }
        "upstream answers 503" => {
            let u = echo();
            u.fail_with(Some(503));
            behind(u.port, u, "5s", NO_POLICY, plain_get)
        }
        "upstream headers later than the route timeout (500ms)" => {
            let u = echo();
            u.delay_by(2_000);
            behind(u.port, u, "500ms", NO_POLICY, plain_get)
        }
        "upstream body later than the route timeout (500ms)" => {
            let u = Scripted::start(
                &[
                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst",
                    b"later",
                ],
                Duration::from_millis(2_000),
            );
            behind(u.port, u, "500ms", NO_POLICY, plain_get)
        }
        "upstream TLS handshake fails (plaintext endpoint, tls SIMPLE)" => {
            let u = Scripted::start_answering(
                &[b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"],
                Duration::ZERO,
                true,
            );
            behind(u.port, u, "5s", "{tls: {mode: SIMPLE}}", plain_get)
        }
        "client sends its body over 1s (route timeout 500ms)" => {
            let u = echo();
            behind(u.port, u, "500ms", NO_POLICY, slow_body)
        }
        "client disconnects in the middle of its body" => {
            let u = echo();
            behind(u.port, u, "5s", NO_POLICY, client_resets_mid_body)
        }
        "client sends headers over 60 KiB" => {
            let u = echo();
            behind(u.port, u, "5s", NO_POLICY, oversized_headers)
        }
        _ => return None,
    })
}

/// The first access-log line in the text `read` returns, waiting for it (bounded).
fn first_line(read: impl Fn() -> String) -> Option<BTreeMap<&'static str, String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = read();
        let line = text
            .lines()
            .find_map(meshroute_tests::parse_istio_access_log);
        if line.is_some() || Instant::now() > deadline {
            return line;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How `line` differs from `row`, if it does.
fn check(
    host: &str,
    row: &Row,
    client_saw: u16,
    line: Option<BTreeMap<&'static str, String>>,
) -> Option<String> {
    let Some(line) = line else {
        return Some(format!("{host}: {}: no access-log line", row.fault));
    };
    let got = Row {
        fault: row.fault.clone(),
        status: line["response_code"].clone(),
        flags: line["response_flags"].clone(),
        details: line["response_code_details"].clone(),
    };
    if &got != row {
        return Some(format!(
            "{host}: | {} | {} | {} | `{}` |\n  (the whole line: {line:?})",
            got.fault, got.status, got.flags, got.details
        ));
    }
    // What the client saw agrees with the log (0: no answer, as for a client that left).
    (client_saw.to_string() != row.status)
        .then(|| format!("{host}: {}: the client saw {client_saw}", row.fault))
}

fn on_envoy(row: &Row, f: &Fault) -> Option<String> {
    let doc = meshroute_tests::rules(
        &[("web.yaml", f.config.clone())],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let envoy = Envoy::start(&doc);
    let saw = (f.client)(envoy.port);
    let line = first_line(|| std::fs::read_to_string(&envoy.log).unwrap_or_default());
    check("envoy", row, saw, line)
}

fn on_meshroute_run(row: &Row, f: &Fault, dir: &Path) -> Option<String> {
    write_config(dir, "web.yaml", &f.config);
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let (_run, port, _) = Meshroute::run_on_fresh_ports(
        &dir.join("web.yaml"),
        &["--access-log", log.to_str().unwrap()],
    );
    let saw = (f.client)(port);
    let line = first_line(|| std::fs::read_to_string(&log).unwrap_or_default());
    check("meshroute run", row, saw, line)
}

#[test]
fn the_readme_fault_table_is_what_both_hosts_log() {
    let rows = readme_rows();
    let named: Vec<&str> = rows.iter().map(|r| r.fault.as_str()).collect();
    assert_eq!(
        named, FAULTS,
        "the README's rows are the faults the test makes"
    );
    let dir = std::env::temp_dir().join(format!("meshroute-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut differences = Vec::new();
    for row in &rows {
        let f = fault(&row.fault)
            .unwrap_or_else(|| panic!("README row {:?} names no fault the test makes", row.fault));
        differences.extend(on_envoy(row, &f));
        // Each host meets the fault afresh (scripted upstreams answer a few connections).
        let f = fault(&row.fault).unwrap();
        differences.extend(on_meshroute_run(row, &f, &dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        differences.is_empty(),
        "rows that differ from what the hosts logged:\n{}",
        differences.join("\n")
    );
}
