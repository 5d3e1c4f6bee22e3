//! A `meshroute run` gateway under a steady mixed load (HTTP/1.1, HTTP/2, TLS, TCP, retries,
//! a mirror) while its configuration is reloaded every few seconds (every third reload
//! invalid), one upstream process is killed and restarted, another upstream hangs, another
//! resets every request, and bursts of hostile clients arrive. Every request the gateway
//! accepted must end as its rules say, memory must level off after warm-up, and open files
//! and runtime tasks must come back to where they were.
//!
//! `MESHROUTE_SOAK_SECONDS` sets the length (default 60, as in `make test`; `make soak` runs
//! 600).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshroute_tests::{free_port, get, meshroute_binary, Upstream};

use crate::run::{https_get, write_config, Meshroute};

fn soak_seconds() -> u64 {
    meshroute_tests::env_number("MESHROUTE_SOAK_SECONDS", 60)
}

/// A port offset under which the gateway's ports 80, 443 and 9000 are all free.
fn free_offset() -> u16 {
    for _ in 0..100 {
        let offset = free_port().saturating_sub(9000).max(1000);
        if [80u16, 443, 9000]
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p + offset)).is_ok())
        {
            return offset;
        }
    }
    panic!("no free port offset");
}

/// A `meshroute hello` process on a fixed port: the upstream that is killed and restarted.
struct HelloProcess {
    port: u16,
    child: Option<Child>,
}

impl HelloProcess {
    fn start(&mut self) {
        let child = Command::new(meshroute_binary())
            .args([
                "hello",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--name",
                "flaky",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn meshroute hello");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "hello did not start");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for HelloProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn service_entry(host: &str, endpoints: &[u16], tcp: bool) -> String {
    let ports = if tcp {
        "[{number: 80, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}]"
    } else {
        "[{number: 80, name: http, protocol: HTTP}]"
    };
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|p| {
            let tcp_port = if tcp {
                format!(", tcp: {p}")
            } else {
                String::new()
            };
            format!("{{address: 127.0.0.1, ports: {{http: {p}{tcp_port}}}}}")
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: {ports}
  endpoints: [{endpoints}]
---
",
        name = host.replace('.', "-"),
        endpoints = endpoints.join(", "),
    )
}

/// The routes of one configuration generation (`valid: false` gives a weight istiod refuses).
fn routes(generation: u64, valid: bool) -> String {
    let weight = if valid { 100 } else { -5 };
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: soak, namespace: default}}
spec:
  hosts: ['*']
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /hang}}}}]
    timeout: 1s
    route: [{{destination: {{host: hang.soak}}}}]
  - match: [{{uri: {{prefix: /reset}}}}]
    retries: {{attempts: 1, retryOn: reset}}
    route: [{{destination: {{host: reset.soak}}}}]
  - match: [{{uri: {{prefix: /flaky}}}}]
    retries: {{attempts: 3, retryOn: 'connect-failure,reset'}}
    route: [{{destination: {{host: flaky.soak}}}}]
  - headers: {{response: {{set: {{x-generation: '{generation}'}}}}}}
    mirror: {{host: mirror.soak}}
    route: [{{destination: {{host: web.soak, port: {{number: 80}}}}, weight: {weight}}}]
  tcp:
  - match: [{{port: 9000}}]
    route: [{{destination: {{host: web.soak, port: {{number: 9000}}}}}}]
"
    )
}

/// What the rules say a request's answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `/` over HTTP/1.1, HTTP/2 or TLS: 200 from web, with a generation written valid.
    Web,
    /// `/flaky`: 200, retried past the killed upstream.
    Flaky,
    /// `/hang`: 504 after the 1 s route timeout.
    Hang,
    /// `/reset`: 503, the connection terminated on both tries.
    Reset,
    /// A raw TCP connection through the TCP route: the upstream's HTTP answer.
    Tcp,
}

/// Outcomes of the soak, shared by the load threads.
#[derive(Default)]
struct Tally {
    ok: Mutex<BTreeMap<Kind, u64>>,
    wrong: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, kind: Kind, result: Result<(), String>) {
        match result {
            Ok(()) => *self.ok.lock().unwrap().entry(kind).or_default() += 1,
            Err(e) => {
                let mut w = self.wrong.lock().unwrap();
                if w.len() < 50 {
                    w.push(format!("{kind:?}: {e}"));
                }
            }
        }
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn alive_tasks(admin: u16) -> u64 {
    get("admin", "/stats/prometheus")
        .send(admin)
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("meshroute_runtime_alive_tasks "))
        .and_then(|v| v.trim().parse().ok())
        .expect("meshroute_runtime_alive_tasks")
}

/// A held-open connection that sent half a request, and one that sent garbage.
fn hostile_burst(port: u16, n: usize) {
    let mut held = Vec::new();
    for i in 0..n {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let bytes: &[u8] = if i % 2 == 0 {
                b"GET / HTTP/1.1\r\nhost: soak.example\r\nx-slow: "
            } else {
                b"\x16\x03\x01\x02\x00\x01\x00\xff\xff\xff garbage \r\n\r\n"
            };
            let _ = c.write_all(bytes);
            held.push(c);
        }
    }
    thread::sleep(Duration::from_secs(2));
}

/// One HTTP/1.1 answer read off a raw connection: its head and `content-length` bytes of
/// body (the upstream keeps the connection open after answering).
fn read_http_answer(c: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head_text = String::from_utf8_lossy(&got[..head]).to_ascii_lowercase();
            let length: usize = head_text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= head + 4 + length {
                break;
            }
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn check_web(
    how: &str,
    status: u16,
    generation: Option<&str>,
    body: &str,
    valid: &Mutex<Vec<u64>>,
) -> Result<(), String> {
    if status != 200 {
        return Err(format!("{how}: status {status}: {body:.200}"));
    }
    let g: u64 = generation
        .and_then(|g| g.parse().ok())
        .ok_or("no x-generation")?;
    if valid.lock().unwrap().contains(&g) {
        Ok(())
    } else {
        Err(format!("generation {g} was never a valid configuration"))
    }
}

fn h2_load(port: u16, until: Instant, tally: &Tally, valid: &Mutex<Vec<u64>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut sent = 0u64;
        while Instant::now() < until && sent < 200_000 {
            let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                tally.record(Kind::Web, Err("HTTP/2: connect refused".into()));
                continue;
            };
            let Ok((mut sender, conn)) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
            else {
                tally.record(Kind::Web, Err("HTTP/2: handshake failed".into()));
                continue;
            };
            tokio::spawn(conn);
            // A few hundred requests per connection, then a new connection.
            for _ in 0..300 {
                if Instant::now() >= until {
                    break;
                }
                sent += 1;
                let req = hyper::Request::builder()
                    .uri("http://soak.example/h2")
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let answer =
                    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await;
                let result = match answer {
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        let generation = resp
                            .headers()
                            .get("x-generation")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                            .unwrap_or_default();
                        check_web("HTTP/2", status, generation.as_deref(), &body, valid)
                    }
                    Ok(Err(e)) => Err(format!("HTTP/2: {e}")),
                    Err(_) => Err("HTTP/2: no answer in 10 s".into()),
                };
                tally.record(Kind::Web, result);
            }
        }
    });
}

#[test]
fn soak_mixed_load_through_reloads_failures_and_hostile_clients() {
    let seconds = soak_seconds();
    let web_a = Upstream::start("a");
    let web_b = Upstream::start("b");
    let mirror = Upstream::start("mirror");
    let hang = Upstream::start("hang");
    hang.delay_by(60_000);
    let reset = Upstream::start("reset");
    reset.reset_always(true);
    let mut flaky = HelloProcess {
        port: free_port(),
        child: None,
    };
    flaky.start();

    let dir = std::env::temp_dir().join(format!("meshroute-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_dir = std::env::temp_dir().join(format!("meshroute-soak-log-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["soak.example".to_owned()]).unwrap();
    std::fs::write(dir.join("soak.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("soak.key"), cert.signing_key.serialize_pem()).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let registry = [
        service_entry("web.soak", &[web_a.port, web_b.port], true),
        service_entry("mirror.soak", &[mirror.port], false),
        service_entry("hang.soak", &[hang.port], false),
        service_entry("reset.soak", &[reset.port], false),
        service_entry("flaky.soak", &[flaky.port, web_a.port], false),
        format!(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ['*']
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [soak.example]
    tls: {{mode: SIMPLE, serverCertificate: {crt}, privateKey: {key}}}
  - port: {{number: 9000, name: tcp, protocol: TCP}}
    hosts: ['*']
",
            crt = path(&dir.join("soak.crt")),
            key = path(&dir.join("soak.key")),
        ),
    ]
    .concat();
    write_config(&dir, "registry.yaml", &registry);
    let valid = Arc::new(Mutex::new(vec![1u64]));
    write_config(&dir, "routes.yaml", &routes(1, true));

    let offset = free_offset();
    let (http, https, tcp) = (80 + offset, 443 + offset, 9000 + offset);
    let admin = free_port();
    let m = Meshroute::start(
        &[
            "run",
            "-f",
            &path(&dir),
            "--for",
            "gateway",
            "--port-offset",
            &offset.to_string(),
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--access-log",
            &path(&log_dir.join("access.log")),
        ],
        http,
    );
    let pid = m.pid();
    let root = cert.cert.pem();

    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    // HTTP/1.1: web, the flaky upstream's route and the resetting one's, in turn.
    for lane in 0..2u64 {
        let (tally, valid) = (Arc::clone(&tally), Arc::clone(&valid));
        load.push(thread::spawn(move || {
            let mut n = lane;
            while Instant::now() < until && n < 400_000 {
                n += 1;
                let (kind, path) = match n % 4 {
                    0 | 1 => (Kind::Web, "/"),
                    2 => (Kind::Flaky, "/flaky"),
                    _ => (Kind::Reset, "/reset"),
                };
                let answer = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    get("soak.example", path).try_send(http)
                }));
                let result = match answer {
                    Ok(Ok(r)) => match kind {
                        Kind::Web => check_web(
                            "HTTP/1.1",
                            r.status,
                            r.header("x-generation"),
                            &r.text(),
                            &valid,
                        ),
                        Kind::Flaky if r.status == 200 => Ok(()),
                        Kind::Reset
                            if r.status == 503 && r.text().contains("connection termination") =>
                        {
                            Ok(())
                        }
                        _ => Err(format!("{path}: {} {}", r.status, r.text())),
                    },
                    Ok(Err(e)) => Err(format!("{path}: {e}")),
                    Err(_) => Err(format!("{path}: no HTTP answer")),
                };
                tally.record(kind, result);
            }
        }));
    }
    // The hanging upstream: each request ends with the route timeout.
    {
        let tally = Arc::clone(&tally);
        load.push(thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < until && n < 10_000 {
                n += 1;
                let result = match get("soak.example", "/hang").try_send(http) {
                    Ok(r) if r.status == 504 && r.elapsed >= Duration::from_millis(950) => Ok(()),
                    Ok(r) => Err(format!("{} after {:?}: {}", r.status, r.elapsed, r.text())),
                    Err(e) => Err(e.to_string()),
                };
                tally.record(Kind::Hang, result);
            }
        }));
    }
    // HTTP/2 with prior knowledge, many requests per connection.
    {
        let (tally, valid) = (Arc::clone(&tally), Arc::clone(&valid));
        load.push(thread::spawn(move || h2_load(http, until, &tally, &valid)));
    }
    // TLS, a connection per request.
    {
        let (tally, valid) = (Arc::clone(&tally), Arc::clone(&valid));
        load.push(thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < until && n < 100_000 {
                n += 1;
                let result = https_get(https, "soak.example", &root, "/tls").and_then(|text| {
                    let status = text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let generation = text.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("x-generation:")
                            .map(|g| g.trim().to_owned())
                    });
                    check_web("TLS", status, generation.as_deref(), &text, &valid)
                });
                tally.record(Kind::Web, result);
            }
        }));
    }
    // TCP: an HTTP request written through the TCP route.
    {
        let tally = Arc::clone(&tally);
        load.push(thread::spawn(move || {
            let mut n = 0;
            while Instant::now() < until && n < 100_000 {
                n += 1;
                let began = Instant::now();
                let result = (|| {
                    let mut c =
                        TcpStream::connect(("127.0.0.1", tcp)).map_err(|e| e.to_string())?;
                    c.set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| e.to_string())?;
                    c.write_all(b"GET /tcp HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                        .map_err(|e| e.to_string())?;
                    let text = read_http_answer(&mut c);
                    if text.starts_with("HTTP/1.1 200") && began.elapsed() < Duration::from_secs(5)
                    {
                        Ok(())
                    } else {
                        Err(format!("after {:?}: {text:.200}", began.elapsed()))
                    }
                })();
                tally.record(Kind::Tcp, result);
            }
        }));
    }

    // Chaos: reloads every 3 s (every third invalid), the flaky upstream killed for a second
    // every 5 s, a hostile burst every 10 s. Memory and files are measured after warm-up.
    let warm_up = Duration::from_secs((seconds / 3).max(15).min(seconds.saturating_sub(5)));
    let mut baseline = None;
    let mut generation = 1u64;
    let mut last_reload = Instant::now();
    let mut last_kill = Instant::now();
    let mut last_burst = Instant::now();
    let (mut kills, mut bursts) = (0u32, 0u32);
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(100));
        if baseline.is_none() && start.elapsed() >= warm_up {
            baseline = Some((
                proc_status_kb(pid, "VmRSS:"),
                open_files(pid),
                alive_tasks(admin),
            ));
        }
        if last_reload.elapsed() >= Duration::from_secs(3) {
            last_reload = Instant::now();
            generation += 1;
            let good = !generation.is_multiple_of(3);
            if good {
                // Valid before the file is written: a response may carry it at once.
                valid.lock().unwrap().push(generation);
            }
            write_config(&dir, "routes.yaml", &routes(generation, good));
        }
        if last_kill.elapsed() >= Duration::from_secs(5) {
            last_kill = Instant::now();
            flaky.kill();
            thread::sleep(Duration::from_secs(1));
            flaky.start();
            kills += 1;
        }
        if last_burst.elapsed() >= Duration::from_secs(10) {
            last_burst = Instant::now();
            let port = if generation.is_multiple_of(2) {
                http
            } else {
                https
            };
            thread::spawn(move || hostile_burst(port, 100));
            bursts += 1;
        }
    }
    for t in load {
        t.join().unwrap();
    }

    let ok = tally.ok.lock().unwrap().clone();
    let wrong = tally.wrong.lock().unwrap().clone();
    eprintln!(
        "soak: {seconds}s, {} reloads, {kills} upstream kills, {bursts} hostile bursts; answers as the rules say: {ok:?}",
        generation - 1
    );
    let own_metrics = || {
        get("admin", "/stats/prometheus")
            .send(admin)
            .text()
            .lines()
            .filter(|l| l.starts_with("meshroute_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        wrong.is_empty(),
        "requests not answered as their rules say (first {}):\n{}\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        own_metrics(),
        m.log()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .filter(|l| !l.contains("reload failed"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for kind in [Kind::Web, Kind::Flaky, Kind::Hang, Kind::Reset, Kind::Tcp] {
        assert!(
            ok.get(&kind).copied().unwrap_or(0) > 0,
            "no {kind:?} traffic ran"
        );
    }
    assert!(mirror.count() > 0, "the mirror received copies");
    let metrics = get("admin", "/stats/prometheus").send(admin).text();
    assert!(
        metrics.contains("meshroute_config_reload_failures_total ")
            && !metrics.contains("meshroute_config_reload_failures_total 0\n"),
        "the invalid reloads were seen and refused:\n{metrics}"
    );

    // Once the load is over, memory has not kept growing and what it opened is closed again.
    let (rss_before, files_before, tasks_before) = baseline.expect("measured after warm-up");
    let settle = Instant::now() + Duration::from_secs(10);
    let (mut files, mut tasks) = (open_files(pid), alive_tasks(admin));
    while (files > files_before + 8 || tasks > tasks_before + 8) && Instant::now() < settle {
        thread::sleep(Duration::from_millis(200));
        files = open_files(pid);
        tasks = alive_tasks(admin);
    }
    let rss = proc_status_kb(pid, "VmRSS:");
    eprintln!(
        "soak: RSS {rss_before} kB after warm-up, {rss} kB at the end; open files {files_before} → {files}; tasks {tasks_before} → {tasks}"
    );
    assert!(
        rss * 10 <= rss_before * 11,
        "RSS grew more than 10 % after warm-up: {rss_before} kB → {rss} kB"
    );
    assert!(
        files <= files_before + 8,
        "open files did not come back: {files_before} → {files}"
    );
    assert!(
        tasks <= tasks_before + 8,
        "runtime tasks did not come back: {tasks_before} → {tasks}"
    );
    drop(m);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&log_dir);
}
