//! `meshroute run`: listeners, the filter on every request, and the host contract executed
//! natively (cluster header, original-destination header, Envoy timeout and retry headers,
//! local replies, side calls, timers).

pub mod admin;
mod body;
mod deadline;
pub mod demo;
mod l4;
pub mod launch;
pub mod tls;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use meshroute_core::contract::{
    self, RouterReply, ATTEMPT_COUNT_HEADER, CLUSTER_HEADER, DEFAULT_BACKOFF_BASE_MS,
    EXPECTED_TIMEOUT_HEADER, INTERNAL_HEADER, LISTENER_PORT_HEADER, PASSTHROUGH_CLUSTER,
    TIMEOUT_HEADER, UPSTREAM_SERVICE_TIME_HEADER,
};
use meshroute_core::engine::{backoff_ms, RetryOn, Rng as _, SplitMix64};
use meshroute_core::ir::{Discovery, ProxyKind, RulesDocument};

use crate::abi::{self, ClusterCheck, Headers, LocalReply, Phase};
use crate::vm::{Action, Plugin, Vm};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Request bodies up to this size are buffered so the filter sees them (mirrors) and retries
/// can resend them; larger bodies stream through in bounded memory, as in Envoy.
const BODY_BUFFER: usize = 1 << 20;

/// What to do with requests once the filter has trapped (Envoy's `failure_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailPolicy {
    /// Every request through the failed instance gets 503.
    FailClosed,
    /// A new instance is started after a back-off.
    Reload,
    /// Requests bypass the failed filter (Envoy's FAIL_OPEN). Without the filter's routing
    /// decision nothing is forwarded: client copies of the control headers were removed at
    /// the listener, so no client can steer the request instead.
    FailOpen,
}

/// Where each route table is served.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub address: SocketAddr,
    /// Route-table port this listener serves (gateway server port; sidecar: 0, the
    /// authority decides).
    pub server_port: u16,
    /// Terminate TLS with this configuration (HTTPS Gateway servers).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections are routed by the filter's connection-level rules (TCP and TLS servers),
    /// not served as HTTP.
    pub connections: Option<l4::ConnectionRouting>,
    pub limits: Limits,
}

/// Per-listener protection against hostile or broken clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections above this are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slow-loris protection).
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            header_timeout: Duration::from_secs(60),
        }
    }
}

/// One loaded configuration: rules, clusters and filter instances.
pub struct Generation {
    pub doc: Arc<RulesDocument>,
    pub rules_json: Arc<Vec<u8>>,
    pub sources: Vec<PathBuf>,
    clusters: HashMap<String, ClusterInfo>,
    slots: Vec<Slot>,
    /// Root context of each connection-level listener port's plugin, the same in every
    /// instance (they are started in the same order).
    l4_roots: HashMap<u16, u32>,
    next_slot: AtomicUsize,
}

struct ClusterInfo {
    discovery: Discovery,
    endpoints: Vec<String>,
    next: AtomicUsize,
    connect_timeout: Duration,
    /// Speak HTTP/2 (prior knowledge) to the endpoints: HTTP2/GRPC ports or `h2UpgradePolicy`.
    h2: bool,
    /// `tcp.maxConnections` for HTTP/1.1: each connection carries one request at a time, so
    /// requests beyond it wait for one to free up (the pending queue the filter bounds).
    connections: Option<Arc<tokio::sync::Semaphore>>,
    /// DestinationRule `tls`: originate TLS to the endpoints.
    tls: Option<tls::Origination>,
    /// The service's host name (TLS name for TCP when `sni` is unset).
    service: String,
}

impl ClusterInfo {
    /// Where to connect: the endpoint the filter named (only one of this cluster's, so a
    /// forged name never reaches elsewhere), the next resolved address when the host
    /// resolves (DNS), or the named original destination. `None`: nowhere to go.
    fn endpoint(&self, named: Option<String>) -> Option<String> {
        match self.discovery {
            Discovery::Static => named.filter(|e| self.endpoints.contains(e)),
            Discovery::Dns => {
                let n = self.endpoints.len();
                (n > 0)
                    .then(|| self.endpoints[self.next.fetch_add(1, Ordering::Relaxed) % n].clone())
            }
            Discovery::OriginalDst => named,
        }
    }
}

/// One filter instance and its bookkeeping.
struct Slot {
    vm: Mutex<Option<Vm>>,
    failed_at: Mutex<Option<Instant>>,
    waiters: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    tick: Notify,
}

/// The running proxy.
pub struct Proxy {
    pub plugin: Arc<Plugin>,
    /// Directory of `credentialName` secrets, for reloads.
    credentials: Option<PathBuf>,
    pub kind: ProxyKind,
    pub fail_policy: FailPolicy,
    pub workers: usize,
    generation: RwLock<Arc<Generation>>,
    pub stats: admin::Stats,
    pub reload_error: Mutex<Option<String>>,
    /// Access log sink (`--access-log`), one line per request.
    pub access_log: Mutex<Option<Box<dyn std::io::Write + Send>>>,
    connection_ids: AtomicU64,
    client: upstream::Client,
}

fn cluster_table(
    doc: &RulesDocument,
    credentials: Option<&std::path::Path>,
) -> Result<HashMap<String, ClusterInfo>, String> {
    let mut clusters: HashMap<String, ClusterInfo> =
        doc.clusters
            .iter()
            .map(|c| {
                let tls = c
                    .tls
                    .as_ref()
                    .map(|t| tls::origination(t, credentials))
                    .transpose()
                    .map_err(|e| format!("cluster {}: tls: {e}", c.name))?;
                let endpoints = c
                    .endpoints
                    .iter()
                    .filter(|e| e.weight > 0)
                    .map(|e| {
                        if e.address.contains(':') {
                            format!("[{}]:{}", e.address, e.port)
                        } else {
                            format!("{}:{}", e.address, e.port)
                        }
                    })
                    .collect();
                Ok((
                    c.name.clone(),
                    ClusterInfo {
                        tls,
                        service: c.service.clone(),
                        discovery: c.discovery,
                        endpoints,
                        next: AtomicUsize::new(0),
                        connect_timeout: Duration::from_millis(c.connect_timeout_ms.max(1)),
                        h2: c.upstream_h2(),
                        connections: (c.connection_pool.max_connections > 0 && !c.upstream_h2())
                            .then(|| {
                                Arc::new(tokio::sync::Semaphore::new(
                                    c.connection_pool.max_connections as usize,
                                ))
                            }),
                    },
                ))
            })
            .collect::<Result<_, String>>()?;
    clusters.insert(
        PASSTHROUGH_CLUSTER.to_owned(),
        ClusterInfo {
            discovery: Discovery::OriginalDst,
            endpoints: Vec::new(),
            next: AtomicUsize::new(0),
            connect_timeout: Duration::from_secs(10),
            h2: false,
            connections: None,
            tls: None,
            service: String::new(),
        },
    );
    Ok(clusters)
}

/// Side calls reach known clusters; those where the filter picks endpoints need the endpoint
/// header (Envoy answers INTERNAL_FAILURE without it).
fn cluster_check(clusters: &HashMap<String, ClusterInfo>) -> Arc<ClusterCheck> {
    let needs_endpoint: HashMap<String, bool> = clusters
        .iter()
        .map(|(k, c)| (k.clone(), c.discovery != Discovery::Dns))
        .collect();
    Arc::new(move |c: &str| needs_endpoint.get(c).copied())
}

impl Proxy {
    /// `credentials` is the directory of `credentialName` secrets (`--credentials-dir`).
    pub fn new(
        plugin: Arc<Plugin>,
        fail_policy: FailPolicy,
        workers: usize,
        doc: RulesDocument,
        sources: Vec<PathBuf>,
        credentials: Option<PathBuf>,
    ) -> Result<Arc<Self>, String> {
        let kind = doc.proxy.kind;
        let generation = Self::generation(&plugin, workers, doc, sources, credentials.as_deref())?;
        Ok(Arc::new(Self {
            credentials,
            plugin,
            kind,
            fail_policy,
            workers,
            generation: RwLock::new(Arc::new(generation)),
            stats: admin::Stats::default(),
            reload_error: Mutex::new(None),
            connection_ids: AtomicU64::new(1),
            access_log: Mutex::new(None),
            client: upstream::Client::new(),
        }))
    }

    fn generation(
        plugin: &Plugin,
        workers: usize,
        doc: RulesDocument,
        sources: Vec<PathBuf>,
        credentials: Option<&std::path::Path>,
    ) -> Result<Generation, String> {
        let rules_json =
            serde_json::to_vec(&doc).map_err(|e| format!("cannot serialize rules: {e}"))?;
        let clusters = cluster_table(&doc, credentials)?;
        let known = cluster_check(&clusters);
        let l4_ports: Vec<u16> = doc.l4_tables.iter().map(|t| t.port).collect();
        let mut l4_roots = HashMap::new();
        let mut slots = Vec::with_capacity(workers);
        for _ in 0..workers.max(1) {
            let (vm, roots) = start_instance(plugin, &rules_json, &known, &l4_ports)?;
            l4_roots = roots;
            slots.push(Slot {
                vm: Mutex::new(Some(vm)),
                failed_at: Mutex::new(None),
                waiters: Mutex::new(HashMap::new()),
                tick: Notify::new(),
            });
        }
        Ok(Generation {
            doc: Arc::new(doc),
            rules_json: Arc::new(rules_json),
            sources,
            clusters,
            slots,
            l4_roots,
            next_slot: AtomicUsize::new(0),
        })
    }

    pub fn current(&self) -> Arc<Generation> {
        match self.generation.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in new rules; in-flight requests finish on the generation they started with.
    pub fn reload(
        self: &Arc<Self>,
        doc: RulesDocument,
        sources: Vec<PathBuf>,
    ) -> Result<(), String> {
        let generation = Arc::new(Self::generation(
            &self.plugin,
            self.workers,
            doc,
            sources,
            self.credentials.as_deref(),
        )?);
        for i in 0..generation.slots.len() {
            spawn_ticker(Arc::clone(self), Arc::clone(&generation), i);
        }
        match self.generation.write() {
            Ok(mut g) => *g = generation,
            Err(poisoned) => *poisoned.into_inner() = generation,
        }
        Ok(())
    }

    /// Starts the tick loops of the current generation.
    pub fn start_tickers(self: &Arc<Self>) {
        let generation = self.current();
        for i in 0..generation.slots.len() {
            spawn_ticker(Arc::clone(self), Arc::clone(&generation), i);
        }
    }
}

/// One filter instance: the HTTP filter's plugin, then one plugin per connection-level
/// listener port (root id `meshroute_tcp_<port>`) in the same VM, as Envoy runs a worker's
/// plugins in one VM. Returns it with the root context of each port's plugin.
fn start_instance(
    plugin: &Plugin,
    rules_json: &[u8],
    known: &Arc<ClusterCheck>,
    l4_ports: &[u16],
) -> Result<(Vm, HashMap<u16, u32>), String> {
    let mut vm = plugin
        .start(rules_json, Arc::clone(known))
        .map_err(|e| e.to_string())?;
    let mut roots = HashMap::with_capacity(l4_ports.len());
    for &port in l4_ports {
        let root = vm
            .add_root(&contract::l4_root_id(port), rules_json)
            .map_err(|e| format!("connection filter for port {port}: {e}"))?;
        roots.insert(port, root);
    }
    print_logs(&mut vm);
    Ok((vm, roots))
}

fn print_logs(vm: &mut Vm) {
    for l in vm.take_logs() {
        let level = ["trace", "debug", "info", "warn", "error", "critical"]
            .get(l.level as usize)
            .copied()
            .unwrap_or("info");
        eprintln!("[filter {level}] {}", l.message);
    }
}

/// Drives `proxy_on_tick` for one instance while its generation is current.
fn spawn_ticker(proxy: Arc<Proxy>, generation: Arc<Generation>, index: usize) {
    tokio::spawn(async move {
        loop {
            if !Arc::ptr_eq(&proxy.current(), &generation) {
                // Replaced by a reload; let paused requests of this generation finish.
                let pending = generation.slots[index]
                    .waiters
                    .lock()
                    .map(|w| w.is_empty())
                    .unwrap_or(true);
                if pending {
                    return;
                }
            }
            let slot = &generation.slots[index];
            let period = slot
                .vm
                .lock()
                .ok()
                .and_then(|vm| vm.as_ref().and_then(|v| v.store.data().tick_period));
            match period {
                None => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), slot.tick.notified()).await;
                }
                Some(p) => {
                    tokio::select! {
                        () = tokio::time::sleep(p) => {
                            with_vm(&proxy, &generation, index, |vm| vm.on_tick());
                        }
                        () = slot.tick.notified() => {}
                    }
                }
            }
        }
    });
}

/// Runs `f` on instance `index` and then applies what the guest asked for.
fn with_vm<R>(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    f: impl FnOnce(&mut Vm) -> Result<R, String>,
) -> Option<R> {
    let slot = &generation.slots[index];
    let mut guard = slot.vm.lock().ok()?;
    let vm = guard.as_mut()?;
    let result = f(vm);
    print_logs(vm);
    if let Err(e) = &result {
        eprintln!("meshroute: {e}");
        if let Ok(mut at) = slot.failed_at.lock() {
            at.get_or_insert_with(Instant::now);
        }
        proxy.stats.vm_failure();
    }
    let state = vm.store.data_mut();
    if std::mem::take(&mut state.tick_changed) {
        slot.tick.notify_one();
    }
    let calls = std::mem::take(&mut state.calls);
    // Wake requests that a tick or a side-call response resumed or answered.
    if let Ok(mut waiters) = slot.waiters.lock() {
        let ready: Vec<u32> = waiters
            .keys()
            .copied()
            .filter(|id| {
                state.streams.get(id).is_none_or(|s| {
                    s.local_reply.is_some()
                        || if s.phase == Phase::Response {
                            s.response_resumed
                        } else {
                            s.resumed
                        }
                })
            })
            .collect();
        for id in ready {
            if let Some(tx) = waiters.remove(&id) {
                let _ = tx.send(());
            }
        }
    }
    drop(guard);
    spawn_calls(proxy, generation, index, calls);
    result.ok()
}

/// Performs side calls and delivers each response to the instance that made it.
fn spawn_calls(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    calls: Vec<abi::PendingCall>,
) {
    for call in calls {
        let (proxy, generation) = (Arc::clone(proxy), Arc::clone(generation));
        tokio::spawn(async move {
            let response = side_call(&proxy, &generation, &call).await;
            deliver_call_response(&proxy, &generation, index, call.token, response);
        });
    }
}

fn deliver_call_response(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    token: u32,
    response: abi::CallResponse,
) {
    with_vm(proxy, generation, index, |vm| {
        vm.on_http_call_response(token, response)
    });
}

/// A side call (`proxy_http_call`) through the same cluster logic as requests.
async fn side_call(
    proxy: &Proxy,
    generation: &Generation,
    call: &abi::PendingCall,
) -> abi::CallResponse {
    let mut headers = call.headers.clone();
    headers.push((CLUSTER_HEADER.to_owned(), call.cluster.clone()));
    headers.push((INTERNAL_HEADER.into(), "true".into()));
    let timeout = call.timeout.map(|t| t.as_millis().to_string());
    if let Some(t) = &timeout {
        headers.push((TIMEOUT_HEADER.into(), t.clone()));
    }
    let body = body::RequestBody::Buffered(Bytes::from(call.body.clone()));
    match forward(proxy, generation, headers, body, false).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let mut out: Headers = vec![(":status".into(), status.to_string())];
            out.extend(header_pairs(resp.headers()));
            let body = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(_) => Vec::new(),
            };
            abi::CallResponse { headers: out, body }
        }
        Err(reply) => abi::CallResponse {
            headers: vec![
                (":status".into(), reply.status().to_string()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: reply.body().as_bytes().to_vec(),
        },
    }
}

fn header_pairs(map: &http::HeaderMap) -> Headers {
    map.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
];

fn random_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}-{n:08x}",
        random_seed() ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

/// A seed from the clock and a counter (ids and retry jitter need no cryptographic quality).
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64(t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// Serves one listener until the process ends.
pub async fn serve(proxy: Arc<Proxy>, spec: ListenerSpec) -> Result<(), String> {
    let listener = TcpListener::bind(spec.address)
        .await
        .map_err(|e| format!("listen on {}: {e}", spec.address))?;
    let permits = Arc::new(tokio::sync::Semaphore::new(spec.limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("meshroute: accept on {}: {e}", spec.address);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the connection limit: close at once, the listener stays responsive.
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(stream);
            proxy.stats.connection_overflow();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        let spec = spec.clone();
        let connection_id = proxy.connection_ids.fetch_add(1, Ordering::Relaxed);
        if spec.connections.is_some() {
            tokio::spawn(async move {
                let _permit = permit;
                l4::serve_connection(proxy, spec, stream, peer, connection_id).await;
            });
            continue;
        }
        tokio::spawn(async move {
            let _permit = permit;
            let local = stream.local_addr().ok();
            match &spec.tls {
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                    // A failed handshake only closes this connection.
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve_http(proxy, spec, tls, peer, local, connection_id, true).await;
                    }
                }
                None => serve_http(proxy, spec, stream, peer, local, connection_id, false).await,
            }
        });
    }
}

/// Serves HTTP on one accepted (and, for `https`, decrypted) connection.
pub(super) async fn serve_http<I>(
    proxy: Arc<Proxy>,
    spec: ListenerSpec,
    io: I,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    connection_id: u64,
    https: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let builder = listener_builder(spec.limits);
    let io = deadline::HeaderDeadline::new(io, spec.limits.header_timeout);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let spec = spec.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                handle(proxy, spec, peer, local, connection_id, https, req).await,
            )
        }
    });
    let _ = builder.serve_connection(TokioIo::new(io), service).await;
}

/// Downstream limits, with Envoy's defaults: 60 KiB of request headers and 100 header fields
/// (over either: 431), a deadline for the request headers of a new request (slow clients),
/// and at most 1024 concurrent HTTP/2 streams per connection.
fn listener_builder(limits: Limits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_buf_size(60 * 1024)
        .max_headers(100)
        // The first request's deadline is enforced (with a 408) by `HeaderDeadline`; this
        // one, a little later, bounds the requests that follow on a kept-alive connection.
        .header_read_timeout(limits.header_timeout + Duration::from_secs(1));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(60 * 1024);
    builder
}

fn reply_response(kind: ProxyKind, reply: LocalReply) -> Response<Body> {
    let mut builder = Response::builder();
    let (status, body) = match reply.grpc_status {
        Some(code) => {
            builder = builder
                .header("content-type", "application/grpc")
                .header("grpc-status", code.to_string())
                .header(
                    "grpc-message",
                    String::from_utf8_lossy(&reply.body).into_owned(),
                );
            (200, Vec::new())
        }
        None => (reply.status, reply.body),
    };
    let has_type = reply.headers.iter().any(|(k, _)| k == "content-type");
    if !body.is_empty() && !has_type && reply.grpc_status.is_none() {
        builder = builder.header("content-type", "text/plain");
    }
    for (k, v) in &reply.headers {
        if !k.starts_with(':') {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    builder = builder.header("server", server_name(kind));
    builder
        .status(status)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

fn server_name(kind: ProxyKind) -> &'static str {
    match kind {
        ProxyKind::Sidecar => "envoy",
        ProxyKind::Gateway => "istio-envoy",
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn local(status: u16, body: &str) -> LocalReply {
    LocalReply {
        status,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
        grpc_status: None,
    }
}

/// One downstream request through the filter and upstream.
async fn handle(
    proxy: Arc<Proxy>,
    spec: ListenerSpec,
    peer: SocketAddr,
    local_addr: Option<SocketAddr>,
    connection_id: u64,
    https: bool,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let generation = proxy.current();
    let scheme = if https { "https" } else { "http" };
    let (parts, body) = req.into_parts();
    // Absolute-form URIs (explicit proxy) carry the authority; otherwise the Host header.
    // An absolute-form URI whose host disagrees with Host is ambiguous: refuse it rather
    // than pick one (request smuggling past host-based rules).
    if let (Some(uri_authority), Some(host)) = (
        parts.uri.authority(),
        parts.headers.get("host").and_then(|h| h.to_str().ok()),
    ) {
        if parts.version < http::Version::HTTP_2
            && !uri_authority.as_str().eq_ignore_ascii_case(host)
        {
            return reply_response(proxy.kind, local(400, "Bad Request"));
        }
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let method = parts.method.as_str().to_owned();
    let mut headers: Headers = vec![
        (":authority".into(), authority.clone()),
        (":path".into(), path.clone()),
        (":method".into(), parts.method.as_str().to_owned()),
        (":scheme".into(), scheme.into()),
    ];
    for (k, v) in &parts.headers {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name) || contract::is_control_header(name) {
            continue;
        }
        headers.push((
            name.to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    let request_id = match headers.iter().find(|(k, _)| k == "x-request-id") {
        Some((_, v)) => v.clone(),
        None => {
            let id = random_id();
            headers.push(("x-request-id".into(), id.clone()));
            id
        }
    };
    if proxy.kind == ProxyKind::Gateway {
        // Gateways are the edge (Envoy's use_remote_address): append the client's address.
        let ip = peer.ip().to_string();
        match headers.iter_mut().find(|(k, _)| k == "x-forwarded-for") {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(&ip);
            }
            None => headers.push(("x-forwarded-for".into(), ip)),
        }
    }
    headers.retain(|(k, _)| k != "x-forwarded-proto");
    headers.push(("x-forwarded-proto".into(), scheme.into()));
    let server_port = if spec.server_port == 0 {
        spec.address.port()
    } else {
        spec.server_port
    };
    headers.push((LISTENER_PORT_HEADER.to_owned(), server_port.to_string()));

    let Ok(body) = body::read_prefix(body, BODY_BUFFER).await else {
        return reply_response(proxy.kind, local(400, "Bad Request"));
    };

    let outcome = run_request(
        &proxy,
        &generation,
        headers,
        body,
        peer,
        local_addr,
        connection_id,
    )
    .await;
    let (response, cluster, flags) = match outcome {
        Ok((resp, cluster)) => (resp, cluster, ""),
        Err((reply, cluster, flags)) => (reply_response(proxy.kind, reply), cluster, flags),
    };
    proxy.stats.record(
        &cluster,
        response.status().as_u16(),
        flags,
        started.elapsed(),
    );
    if let Ok(mut sink) = proxy.access_log.lock() {
        if let Some(out) = sink.as_mut() {
            // Envoy's default format, with the fields a proxy here knows.
            let line = format!(
                "[{}] \"{} {} {}\" {} {} {} \"{}\" {}ms \"{}\"\n",
                httpdate(SystemTime::now()),
                method,
                path,
                if https { "HTTPS/1.1" } else { "HTTP/1.1" },
                response.status().as_u16(),
                if flags.is_empty() { "-" } else { flags },
                if cluster.is_empty() {
                    "-"
                } else {
                    cluster.as_str()
                },
                request_id,
                started.elapsed().as_millis(),
                authority,
            );
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
    response
}

/// RFC 3339 UTC timestamp with milliseconds.
pub(super) fn httpdate(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

type Outcome = Result<(Response<Body>, String), (LocalReply, String, &'static str)>;

async fn run_request(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    headers: Headers,
    body: body::RequestBody,
    peer: SocketAddr,
    local_addr: Option<SocketAddr>,
    connection_id: u64,
) -> Outcome {
    let index = generation.next_slot.fetch_add(1, Ordering::Relaxed) % generation.slots.len();
    let slot = &generation.slots[index];
    if proxy.fail_policy == FailPolicy::FailOpen && instance_failed(generation, index) {
        return match forward(proxy, generation, headers, body, true).await {
            Ok(r) => Ok((r, String::new())),
            Err(reply) => Err((router_local(reply), String::new(), reply.flag().code())),
        };
    }
    if let Some(reply) = check_failed(proxy, generation, index) {
        return Err((reply, String::new(), "UH"));
    }
    let mut stream = abi::Stream::new(headers);
    // The filter sees buffered bodies; a streamed body never passes through guest memory.
    let end_of_stream = body.is_empty();
    let buffered = body.buffered().map(|b| b.to_vec());
    stream.request_body = buffered.clone().unwrap_or_default();
    stream.source = peer.to_string();
    if let Some(l) = local_addr {
        stream.destination = l.to_string();
        stream.destination_port = l.port();
    }
    stream.connection_id = connection_id;
    let (tx, rx) = oneshot::channel();
    let started = with_vm(proxy, generation, index, |vm| {
        let id = vm.open_stream(stream)?;
        let action = vm.on_request_headers(id, end_of_stream)?;
        Ok((id, action))
    });
    let Some((id, action)) = started else {
        return Err((local(503, ""), String::new(), "UH"));
    };
    let _close = CloseOnDrop {
        proxy,
        generation,
        index,
        id,
    };
    let mut paused = action == Action::Pause && !has_reply(generation, index, id);
    if paused {
        if let Ok(mut w) = slot.waiters.lock() {
            w.insert(id, tx);
        }
        // Re-check: the tick may have resumed the stream before the waiter was registered.
        paused = !(is_resumed(generation, index, id) || has_reply(generation, index, id));
        if paused {
            let _ = rx.await;
        }
        if let Ok(mut w) = slot.waiters.lock() {
            w.remove(&id);
        }
    }
    if let Some(reply) = take_reply(generation, index, id) {
        return Err((reply, String::new(), ""));
    }
    if buffered.as_ref().is_some_and(|b| !b.is_empty()) {
        with_vm(proxy, generation, index, |vm| vm.on_request_body(id, true));
        if let Some(reply) = take_reply(generation, index, id) {
            return Err((reply, String::new(), ""));
        }
    }
    let upstream_headers = {
        let Ok(mut guard) = slot.vm.lock() else {
            return Err((local(503, ""), String::new(), "UH"));
        };
        let Some(s) = guard.as_mut().and_then(|vm| vm.stream_mut(id)) else {
            return Err((local(503, ""), String::new(), "UH"));
        };
        s.phase = Phase::Upstream;
        std::mem::take(&mut s.request_headers)
    };
    let cluster = upstream_headers
        .iter()
        .find(|(k, _)| k == CLUSTER_HEADER)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let upstream_start = Instant::now();
    let response = match forward(proxy, generation, upstream_headers, body, true).await {
        Ok(r) => r,
        Err(reply) => {
            // As in Envoy, the router's own answer passes through the filter's response
            // callback, which sees it with its response flags.
            let flag = reply.flag().code();
            let mut headers: Headers = vec![(":status".into(), reply.status().to_string())];
            if !reply.body().is_empty() {
                headers.push(("content-type".into(), "text/plain".into()));
            }
            let seen = ResponseSeen {
                headers,
                status: reply.status(),
                flags: reply.flag().bit(),
                details: reply.details(),
            };
            let final_headers = match response_phase(proxy, generation, index, id, seen).await {
                Ok(h) => h,
                Err(replaced) => return Err((replaced, cluster, "")),
            };
            let mut local = router_local(reply);
            for (k, v) in final_headers.unwrap_or_default() {
                match k.as_str() {
                    ":status" => local.status = v.parse().unwrap_or(local.status),
                    k if k.starts_with(':') => {}
                    _ => local.headers.push((k, v)),
                }
            }
            return Err((local, cluster, flag));
        }
    };
    let (mut parts, body) = response.into_parts();
    let mut response_headers: Headers = vec![(":status".into(), parts.status.as_u16().to_string())];
    response_headers.extend(
        header_pairs(&parts.headers)
            .into_iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()) || k == "content-length"),
    );
    response_headers.push((
        UPSTREAM_SERVICE_TIME_HEADER.into(),
        upstream_start.elapsed().as_millis().to_string(),
    ));
    let seen = ResponseSeen {
        headers: response_headers,
        status: parts.status.as_u16(),
        flags: 0,
        details: "",
    };
    let final_headers = match response_phase(proxy, generation, index, id, seen).await {
        Ok(h) => h,
        Err(reply) => return Err((reply, cluster, "")),
    };
    let Some(final_headers) = final_headers else {
        return Err((local(503, ""), cluster, "UH"));
    };
    parts.headers.clear();
    for (k, v) in &final_headers {
        if k == ":status" {
            if let Some(s) = v
                .parse::<u16>()
                .ok()
                .and_then(|c| http::StatusCode::from_u16(c).ok())
            {
                parts.status = s;
            }
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            parts.headers.append(name, value);
        }
    }
    parts.headers.insert(
        "server",
        http::HeaderValue::from_static(server_name(proxy.kind)),
    );
    Ok((Response::from_parts(parts, body.boxed()), cluster))
}

/// A response as the filter's response callback sees it.
struct ResponseSeen {
    headers: Headers,
    status: u16,
    flags: u64,
    details: &'static str,
}

/// Runs the filter's response-headers callback; when it pauses (to retry elsewhere), waits
/// until it resumes the response or answers in its place. `Ok` carries the headers to send
/// (`None` when the instance is gone), `Err` the filter's replacement.
async fn response_phase(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    id: u32,
    seen: ResponseSeen,
) -> Result<Option<Headers>, LocalReply> {
    let slot = &generation.slots[index];
    // One lock for the callback and, unless it paused, the headers it left.
    let outcome = with_vm(proxy, generation, index, |vm| {
        if let Some(s) = vm.stream_mut(id) {
            s.phase = Phase::Response;
            s.response_headers = seen.headers;
            s.response_code = Some(seen.status);
            s.response_flags = seen.flags;
            s.response_details = seen.details;
        }
        let action = vm.on_response_headers(id, false)?;
        let done = |s: &abi::Stream| s.response_resumed || s.local_reply.is_some();
        Ok(match vm.stream_mut(id) {
            Some(s) if s.local_reply.is_some() => (action, None),
            Some(s) if action != Action::Pause || done(s) => {
                (action, Some(std::mem::take(&mut s.response_headers)))
            }
            _ => (action, None),
        })
    });
    let (action, headers) = match outcome {
        Some(o) => o,
        None => (Action::Continue, None),
    };
    if headers.is_some() {
        return Ok(headers);
    }
    let waiting = |generation: &Generation| {
        !stream_fact(generation, index, id, true, |s| {
            s.response_resumed || s.local_reply.is_some()
        })
    };
    if action == Action::Pause && waiting(generation) {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = slot.waiters.lock() {
            w.insert(id, tx);
        }
        // Re-check: the answer may have come before the waiter was registered.
        if waiting(generation) {
            let _ = rx.await;
        }
        if let Ok(mut w) = slot.waiters.lock() {
            w.remove(&id);
        }
    }
    if let Some(reply) = take_reply(generation, index, id) {
        return Err(reply);
    }
    let Ok(mut guard) = slot.vm.lock() else {
        return Ok(None);
    };
    Ok(guard
        .as_mut()
        .and_then(|vm| vm.stream_mut(id))
        .map(|s| std::mem::take(&mut s.response_headers)))
}

/// Runs the end-of-stream callbacks when the request is finished or abandoned.
struct CloseOnDrop<'a> {
    proxy: &'a Arc<Proxy>,
    generation: &'a Arc<Generation>,
    index: usize,
    id: u32,
}

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let id = self.id;
        with_vm(self.proxy, self.generation, self.index, |vm| {
            vm.close_stream(id);
            Ok(())
        });
        if let Ok(mut w) = self.generation.slots[self.index].waiters.lock() {
            w.remove(&id);
        }
    }
}

/// Reads one fact about a stream; `missing` when the stream or the instance is gone.
fn stream_fact(
    generation: &Generation,
    index: usize,
    id: u32,
    missing: bool,
    f: impl Fn(&abi::Stream) -> bool,
) -> bool {
    generation.slots[index]
        .vm
        .lock()
        .ok()
        .and_then(|mut g| g.as_mut().and_then(|vm| vm.stream_mut(id).map(|s| f(s))))
        .unwrap_or(missing)
}

fn is_resumed(generation: &Generation, index: usize, id: u32) -> bool {
    stream_fact(generation, index, id, true, |s| s.resumed)
}

fn has_reply(generation: &Generation, index: usize, id: u32) -> bool {
    stream_fact(generation, index, id, false, |s| s.local_reply.is_some())
}

fn take_reply(generation: &Generation, index: usize, id: u32) -> Option<LocalReply> {
    let mut guard = generation.slots[index].vm.lock().ok()?;
    let vm = guard.as_mut()?;
    if vm.failed.load(Ordering::Relaxed) {
        // The request whose callback trapped gets a 503, as in Envoy.
        return Some(local(503, ""));
    }
    vm.stream_mut(id)?.local_reply.take()
}

/// Fail policy: a failed instance answers 503, or is replaced after a back-off.
fn instance_failed(generation: &Generation, index: usize) -> bool {
    generation.slots[index].vm.lock().ok().is_none_or(|g| {
        g.as_ref()
            .is_none_or(|vm| vm.failed.load(Ordering::Relaxed))
    })
}

fn check_failed(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
) -> Option<LocalReply> {
    let slot = &generation.slots[index];
    if !instance_failed(generation, index) {
        return None;
    }
    if proxy.fail_policy == FailPolicy::Reload {
        let since = slot.failed_at.lock().ok().and_then(|g| *g);
        if since.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let known = cluster_check(&generation.clusters);
            let mut ports: Vec<u16> = generation.l4_roots.keys().copied().collect();
            // Roots are started in table order, as at first, so their ids stay the same.
            ports.sort_by_key(|p| generation.l4_roots[p]);
            match start_instance(&proxy.plugin, &generation.rules_json, &known, &ports) {
                Ok((vm, _)) => {
                    if let Ok(mut g) = slot.vm.lock() {
                        *g = Some(vm);
                    }
                    if let Ok(mut at) = slot.failed_at.lock() {
                        *at = None;
                    }
                    proxy.stats.vm_reload();
                    return None;
                }
                Err(e) => eprintln!("meshroute: reloading the filter failed: {e}"),
            }
            if let Ok(mut at) = slot.failed_at.lock() {
                *at = Some(Instant::now());
            }
        }
    }
    Some(local(503, ""))
}

fn router_local(r: RouterReply) -> LocalReply {
    local(r.status(), r.body())
}

/// Executes the host contract: cluster header, endpoint header, timeout and retry headers.
/// `count_attempts` sends `x-envoy-attempt-count` (requests; Envoy's side calls have none).
async fn forward(
    proxy: &Proxy,
    generation: &Generation,
    mut headers: Headers,
    mut body: body::RequestBody,
    count_attempts: bool,
) -> Result<Response<Body>, RouterReply> {
    let directive = contract::decode(&mut headers)?;
    let cluster = generation
        .clusters
        .get(&directive.cluster)
        .ok_or(RouterReply::NoCluster)?;
    let endpoint = cluster
        .endpoint(directive.endpoint)
        .ok_or(RouterReply::NoHealthyUpstream)?;
    let timeout = directive.timeout_ms.map(Duration::from_millis);
    let per_try = directive.per_try_timeout_ms.map(Duration::from_millis);
    let (max_retries, policy) = match &directive.retry {
        Some(r) => (
            u64::from(r.num_retries),
            RetryOn::parse(
                r.retry_on.iter().map(String::as_str),
                &r.retriable_status_codes,
            ),
        ),
        None => (0, RetryOn::default()),
    };
    if let Some(t) = per_try.or(timeout) {
        headers.push((EXPECTED_TIMEOUT_HEADER.into(), t.as_millis().to_string()));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut rng = SplitMix64(random_seed());
    let mut attempt = 0;
    loop {
        if count_attempts {
            // Istio turns on Envoy's include_request_attempt_count.
            headers.retain(|(k, _)| k != ATTEMPT_COUNT_HEADER);
            headers.push((ATTEMPT_COUNT_HEADER.into(), (attempt + 1).to_string()));
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let attempt_timeout = match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        let started = Instant::now();
        let permit = match &cluster.connections {
            None => None,
            Some(pool) => {
                let wait = Arc::clone(pool).acquire_owned();
                match attempt_timeout {
                    None => wait.await.ok(),
                    Some(t) => match tokio::time::timeout(t, wait).await {
                        Ok(p) => p.ok(),
                        // Still queued when the time is up: Envoy's 504.
                        Err(_) => return Err(RouterReply::Timeout),
                    },
                }
            }
        };
        let result = proxy
            .client
            .send(
                &endpoint,
                &headers,
                body.for_attempt(),
                cluster.connect_timeout,
                cluster.h2,
                cluster.tls.as_ref(),
                attempt_timeout.map(|t| t.saturating_sub(started.elapsed())),
            )
            .await;
        // The connection stays taken until the response body is read.
        let result = match (result, permit) {
            (upstream::Attempt::Response(r), Some(p)) => {
                upstream::Attempt::Response(r.map(|b| body::holding(b, p)))
            }
            (other, _) => other,
        };
        let retriable = policy.retriable(result.end());
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        // A streamed body was consumed by the first attempt and cannot be resent.
        if retriable && attempt < max_retries && !out_of_time && body.replayable() {
            attempt += 1;
            let wait = backoff_ms(
                DEFAULT_BACKOFF_BASE_MS,
                u32::try_from(attempt).unwrap_or(u32::MAX),
                &mut rng,
            );
            tokio::time::sleep(Duration::from_millis(wait)).await;
            continue;
        }
        return match result {
            upstream::Attempt::Response(r) => Ok(r),
            upstream::Attempt::Timeout => Err(RouterReply::Timeout),
            upstream::Attempt::ConnectFailure => Err(RouterReply::ConnectFailure),
            upstream::Attempt::TlsFailure(reason)
                if reason.contains("CERTIFICATE_VERIFY_FAILED") =>
            {
                Err(RouterReply::TlsVerifyFailure)
            }
            upstream::Attempt::TlsFailure(_) => Err(RouterReply::TlsFailure),
            upstream::Attempt::Reset => Err(RouterReply::Reset),
        };
    }
}
