//! Serving HTTP: each request through the filter's callbacks, forwarded as the filter
//! decided, and the response through the filter again.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use meshroute_core::contract::{
    self, CLUSTER_HEADER, ENDPOINT_HEADER, LISTENER_PORT_HEADER, PASSTHROUGH_CLUSTER,
    UPSTREAM_SERVICE_TIME_HEADER,
};
use meshroute_core::engine::{Rng as _, SplitMix64};
use meshroute_core::ir::ProxyKind;

use meshroute_wasm_host::abi::{self, Headers, LocalReply, Phase};
use meshroute_wasm_host::vm::Action;

use super::access_log::{self, Entry};
use super::generation::Generation;
use super::generation::{
    check_failed, has_reply, instance_failed, is_resumed, register_waiter, stream_fact, take_reply,
    with_vm,
};
use super::router::{forward, router_local, UpstreamHost};
use super::upstream::UpstreamLocal;
use super::{
    body, deadline, full, l4, local, Body, FailPolicy, Limits, ListenerSpec, Proxy, BODY_BUFFER,
};

pub(super) fn header_pairs(map: &http::HeaderMap) -> Headers {
    map.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

pub(super) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
];

/// A request id as Envoy generates them: a version 4 UUID.
pub(super) fn random_id() -> String {
    let mut rng = SplitMix64(random_seed());
    uuid_v4(rng.next_u64(), rng.next_u64())
}

/// The UUID (RFC 9562 version 4, variant 10) made of 128 random bits.
fn uuid_v4(high: u64, low: u64) -> String {
    let high = (high & !0xF000) | 0x4000;
    let low = (low & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xFFFF,
        high & 0xFFFF,
        low >> 48,
        low & 0xFFFF_FFFF_FFFF
    )
}

/// A seed from the clock and a counter (ids and retry jitter need no cryptographic quality).
pub(super) fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64(t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// Binds a listener's address, before it is announced ready.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, super::Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| super::Error::Listen {
            what: "",
            address,
            source,
        })
}

/// Serves one bound listener until the process ends.
pub async fn serve(proxy: Arc<Proxy>, spec: ListenerSpec, listener: TcpListener) {
    serve_shared(proxy, Arc::new(RwLock::new(spec)), listener).await;
}

/// A listener's description, which a reload may replace while it serves.
pub type SharedSpec = Arc<RwLock<ListenerSpec>>;

/// Serves one bound listener, each connection with the description in force when it was
/// accepted. A gateway's listeners stop accepting when the drain starts (connections already
/// in the accept queue are still served); a sidecar's outbound listeners keep serving the
/// application until the process exits, as Istio drains only the inbound side.
pub async fn serve_shared(proxy: Arc<Proxy>, spec: SharedSpec, listener: TcpListener) {
    let limits = read_spec(&spec).limits;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let drains = proxy.kind == ProxyKind::Gateway;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = proxy.draining(), if drains => {
                for (stream, peer) in accept_queue(listener) {
                    accepted_connection(&proxy, &spec, &permits, stream, peer);
                }
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept on {}: {e}", read_spec(&spec).address);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted_connection(&proxy, &spec, &permits, stream, peer);
    }
}

pub(super) fn read_spec(spec: &SharedSpec) -> ListenerSpec {
    match spec.read() {
        Ok(s) => s.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// The connections the kernel accepted for a listener that is closing, so that none of them
/// is reset.
pub(super) fn accept_queue(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let mut out = Vec::new();
    let Ok(std_listener) = listener.into_std() else {
        return out;
    };
    let _ = std_listener.set_nonblocking(true);
    while let Ok((stream, peer)) = std_listener.accept() {
        let _ = stream.set_nonblocking(true);
        if let Ok(s) = TcpStream::from_std(stream) {
            out.push((s, peer));
        }
    }
    out
}

fn accepted_connection(
    proxy: &Arc<Proxy>,
    spec: &SharedSpec,
    permits: &Arc<tokio::sync::Semaphore>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    // Over the connection limit: close at once, the listener stays responsive.
    let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
        drop(stream);
        proxy.stats.connection_overflow();
        return;
    };
    let _ = stream.set_nodelay(true);
    let proxy = Arc::clone(proxy);
    let spec = read_spec(spec);
    let connection_id = proxy.connection_ids.fetch_add(1, Ordering::Relaxed);
    let in_flight = proxy.in_flight();
    if spec.connections.is_some() {
        tokio::spawn(async move {
            let _held = (permit, in_flight);
            l4::serve_connection(proxy, spec, stream, peer, connection_id, Vec::new()).await;
        });
        return;
    }
    tokio::spawn(async move {
        let _held = (permit, in_flight);
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
    let draining = proxy.draining();
    let logged = Arc::clone(&proxy);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let spec = spec.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                handle(proxy, spec, peer, local, connection_id, https, req).await,
            )
        }
    });
    let ended = graceful!(
        builder.serve_connection(TokioIo::new(io), service),
        draining
    );
    if let Err(e) = ended {
        log_codec_error(&logged, &*e, peer, local);
    }
}

/// A request the HTTP codec refused before it reached the router: headers over the limits
/// get Envoy's 431, logged as Envoy logs it (DPE, `http1.headers_too_large`).
pub(super) fn log_codec_error(
    proxy: &Proxy,
    error: &(dyn std::error::Error + Send + Sync + 'static),
    peer: SocketAddr,
    local: Option<SocketAddr>,
) {
    let too_large = error
        .downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_parse_too_large);
    if too_large && proxy.access_log.enabled() {
        proxy.access_log.log(Entry {
            protocol: "HTTP/1.1",
            status: 431,
            flags: "DPE".to_owned(),
            details: Some("http1.headers_too_large".to_owned()),
            downstream_local: local,
            downstream_remote: Some(peer),
            ..Entry::new()
        });
    }
}

/// How long a connection still reads requests once the drain starts: a request already on
/// its way is answered, not cut off with its connection.
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Serves a connection (a hyper server connection future). Once the drain starts, responses
/// carry `Connection: close` (see [`close_when_draining`]); after [`DRAIN_GRACE`] the
/// connection finishes what it is answering and closes (HTTP/2: GOAWAY). Evaluates to the
/// connection's result.
macro_rules! graceful {
    ($connection:expr, $draining:expr) => {{
        let connection = $connection;
        let draining = $draining;
        tokio::pin!(connection);
        let ended = tokio::select! {
            r = connection.as_mut() => Some(r),
            () = draining => None,
        };
        match ended {
            Some(r) => r,
            None => {
                let grace = tokio::time::sleep($crate::runtime::http::DRAIN_GRACE);
                tokio::pin!(grace);
                let ended = tokio::select! {
                    r = connection.as_mut() => Some(r),
                    () = &mut grace => None,
                };
                match ended {
                    Some(r) => r,
                    None => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            }
        }
    }};
}
pub(super) use graceful;

/// Downstream limits, with Envoy's defaults: 60 KiB of request headers and 100 header fields
/// (over either: 431), a deadline for the request headers of a new request (slow clients),
/// and at most 1024 concurrent HTTP/2 streams per connection.
pub(super) fn listener_builder(
    limits: Limits,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
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

/// During the drain, HTTP/1.1 responses ask the client to close the connection (Envoy's
/// drain behaviour), so it reconnects elsewhere rather than reusing a closing proxy.
pub(super) fn close_when_draining(
    proxy: &Proxy,
    version: http::Version,
    response: &mut Response<Body>,
) {
    if proxy.is_draining() && version < http::Version::HTTP_2 {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

pub(super) fn reply_response(kind: ProxyKind, reply: LocalReply) -> Response<Body> {
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

pub(super) fn server_name(kind: ProxyKind) -> &'static str {
    match kind {
        ProxyKind::Sidecar => "envoy",
        ProxyKind::Gateway => "istio-envoy",
    }
}

/// A request's authority (the absolute-form URI's, else the Host header) and path.
pub(super) fn request_target(parts: &http::request::Parts) -> (String, String) {
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
    (authority, path)
}

/// The headers Envoy removes from an external request at the edge (its header-sanitizing
/// list, envoyproxy.io/docs/envoy/v1.40.0 configuration/http/http_conn_man/header_sanitizing;
/// `x-envoy-external-address` is then set, the `x-forwarded-*` ones rewritten).
const EDGE_SANITIZED_HEADERS: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
];

/// The last address of `x-forwarded-for`, with port 0; `None` when absent or not an address.
fn forwarded_client(headers: &Headers) -> Option<SocketAddr> {
    let (_, xff) = headers.iter().find(|(k, _)| k == "x-forwarded-for")?;
    let last = xff.rsplit(',').next()?.trim();
    Some(SocketAddr::new(last.parse().ok()?, 0))
}

/// One downstream request through the filter and upstream.
pub(super) async fn handle(
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
    let version = parts.version;
    let protocol = super::admin::request_protocol(
        parts
            .headers
            .get("content-type")
            .map(http::HeaderValue::as_bytes),
    );
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
    let (authority, path) = request_target(&parts);
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
    // No client address is internal (Envoy's default internal_address_config): a request's
    // claim to be internal is dropped. Gateways are the edge (Envoy's use_remote_address):
    // the client is external, so the headers Envoy trusts only from inside are dropped too,
    // and its address is recorded and appended to x-forwarded-for.
    let edge = proxy.kind == ProxyKind::Gateway;
    headers.retain(|(k, _)| {
        k != "x-envoy-internal" && !(edge && EDGE_SANITIZED_HEADERS.contains(&k.as_str()))
    });
    if edge {
        let ip = peer.ip().to_string();
        headers.push(("x-envoy-external-address".into(), ip.clone()));
        match headers.iter_mut().find(|(k, _)| k == "x-forwarded-for") {
            Some((_, v)) => {
                v.push(',');
                v.push_str(&ip);
            }
            None => headers.push(("x-forwarded-for".into(), ip)),
        }
    }
    // A sidecar trusts x-forwarded-for: its last address is the downstream remote address
    // (port 0), as Envoy without use_remote_address takes it.
    let peer = match proxy.kind {
        ProxyKind::Sidecar => forwarded_client(&headers).unwrap_or(peer),
        ProxyKind::Gateway => peer,
    };
    headers.retain(|(k, _)| k != "x-forwarded-proto");
    headers.push(("x-forwarded-proto".into(), scheme.into()));
    // The route table's port: the server port, or (0) take it from the authority.
    headers.push((
        LISTENER_PORT_HEADER.to_owned(),
        spec.server_port.to_string(),
    ));

    let mut entry = proxy.access_log.enabled().then(|| {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        Entry {
            method: method.clone(),
            path: path.clone(),
            protocol: access_log::protocol(version),
            forwarded_for: header("x-forwarded-for"),
            user_agent: header("user-agent"),
            request_id: request_id.clone(),
            authority: authority.clone(),
            downstream_local: local_addr,
            downstream_remote: Some(peer),
            ..Entry::new()
        }
    });
    let request_size = header_bytes(&headers);
    let received = Arc::new(AtomicU64::new(0));
    let body = match body::read_prefix(body, BODY_BUFFER, Arc::clone(&received)).await {
        Ok(body) => body,
        Err(e) => {
            // A body its framing cannot carry is a codec error (400); otherwise the client
            // went away before its request was whole (Envoy: status 0, DC).
            let (status, flags, details) = if body::malformed(&e) {
                (400, "DPE", "http1.codec_error")
            } else {
                (0, "DC", "downstream_remote_disconnect")
            };
            if let Some(mut line) = entry {
                line.status = status;
                line.flags = flags.to_owned();
                line.details = Some(details.to_owned());
                line.bytes_received = received.load(Ordering::Relaxed);
                line.duration = started.elapsed();
                proxy.access_log.log(line);
            }
            return reply_response(proxy.kind, local(400, "Bad Request"));
        }
    };

    let outcome = run_request(
        &proxy,
        &generation,
        headers,
        body,
        (peer, local_addr, spec.original_destination),
        connection_id,
        entry.as_mut().map(|e| &mut e.route_name),
    )
    .await;
    let (mut response, cluster, flags, details) = match outcome {
        Ok((resp, cluster)) => (resp, cluster, "", Some(Cow::Borrowed("via_upstream"))),
        Err(mut refused) => {
            if refused.before_body {
                received.store(0, Ordering::Relaxed);
            }
            // The guest's details as it gave them (Envoy logs an empty string as given).
            let details = match refused.reply.details.take() {
                Some(given) => Some(Cow::Owned(given)),
                None => (!refused.details.is_empty()).then_some(Cow::Borrowed(refused.details)),
            };
            (
                reply_response(proxy.kind, refused.reply),
                refused.cluster,
                refused.flags,
                details,
            )
        }
    };
    close_when_draining(&proxy, version, &mut response);
    let upstream_host = response
        .extensions()
        .get::<UpstreamHost>()
        .map(|UpstreamHost(h)| h.clone())
        .unwrap_or_default();
    if let Some(e) = entry.as_mut() {
        e.details = details.map(Cow::into_owned);
        e.upstream_service_time = response
            .headers()
            .get(UPSTREAM_SERVICE_TIME_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        e.upstream_host.clone_from(&upstream_host);
        e.upstream_local = response
            .extensions()
            .get::<UpstreamLocal>()
            .map(|UpstreamLocal(l)| *l);
    }
    let labelled = generation
        .clusters
        .get(&cluster)
        .is_some_and(|c| c.discovery == meshroute_core::ir::Discovery::Static);
    let done = Completed {
        proxy: Arc::clone(&proxy),
        cluster,
        labelled_endpoint: if labelled {
            upstream_host
        } else {
            String::new()
        },
        protocol,
        flags,
        started,
        request_size,
        received,
    };
    done.on_sent(response, entry)
}

/// Envoy's header map size: names and values.
pub(super) fn header_bytes(headers: &Headers) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum()
}

fn header_bytes_of(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum()
}

/// Istio's `grpc_response_status` as the response headers carry it (a trailers-only
/// reply); empty otherwise.
fn grpc_status(headers: &http::HeaderMap) -> String {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// What a request's metrics and log line need once its response has been sent.
pub(super) struct Completed {
    pub proxy: Arc<Proxy>,
    /// The cluster the metrics name.
    pub cluster: String,
    /// The endpoint whose workload labels the metrics carry: the one that answered, for a
    /// static cluster; empty for any other (an original destination, a resolved name), so
    /// that the labels cached stay bounded by the configuration.
    pub labelled_endpoint: String,
    pub protocol: &'static str,
    pub flags: &'static str,
    pub started: Instant,
    /// Request header bytes (Envoy's `request.total_size` adds the body).
    pub request_size: u64,
    /// Request body bytes, counted as they arrive.
    pub received: Arc<AtomicU64>,
}

/// What the response itself tells the metrics.
struct Answered {
    status: u16,
    grpc_status: String,
    header_bytes: u64,
}

impl Completed {
    /// `response` with its body wrapped so that, once it has been sent (or dropped), the
    /// request is recorded and `entry` logged.
    pub fn on_sent(self, response: Response<Body>, entry: Option<Entry>) -> Response<Body> {
        let answered = Answered {
            status: response.status().as_u16(),
            grpc_status: grpc_status(response.headers()),
            header_bytes: header_bytes_of(response.headers()),
        };
        let (parts, body) = response.into_parts();
        let body = body::on_end(body, move |sent, cut| {
            self.finish(&answered, sent, cut, entry);
        });
        Response::from_parts(parts, body)
    }

    /// Records the request (`sent` response body bytes; `cut`: how the body broke off, if
    /// it did) and queues its log line.
    fn finish(
        self,
        answered: &Answered,
        sent: u64,
        cut: Option<body::CutShort>,
        entry: Option<Entry>,
    ) {
        let flags = cut.map_or(self.flags, |c| c.flags);
        let received = self.received.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let proxy = &self.proxy;
        let endpoint = self.labelled_endpoint.as_str();
        let peer = proxy.stats.peer(&self.cluster, endpoint, || {
            proxy.endpoint_labels(&self.cluster, endpoint)
        });
        proxy.stats.record(
            peer,
            (answered.status, self.protocol, &answered.grpc_status),
            flags,
            &super::admin::Measured {
                elapsed,
                request_bytes: self.request_size + received,
                response_bytes: answered.header_bytes + sent,
            },
        );
        if let Some(mut e) = entry {
            e.status = answered.status;
            e.flags = flags.to_owned();
            if let Some(c) = cut {
                e.details = Some(c.details.to_owned());
            }
            e.bytes_received = received;
            e.bytes_sent = sent;
            e.duration = elapsed;
            if e.upstream_cluster.is_empty() {
                e.upstream_cluster = self.cluster;
            }
            self.proxy.access_log.log(e);
        }
    }
}

/// A request's response and cluster, or the local reply in its place.
pub(super) type Outcome = Result<(Response<Body>, String), Refused>;

/// A local reply in place of the upstream's response, with what the access log says of it.
pub(super) struct Refused {
    reply: LocalReply,
    cluster: String,
    flags: &'static str,
    /// The host's response code details (empty: none); the guest's own come with its reply.
    details: &'static str,
    /// The filter answered from the request's headers, before the body was handed to it.
    before_body: bool,
}

impl Refused {
    fn new(reply: LocalReply, cluster: String, flags: &'static str, details: &'static str) -> Self {
        Self {
            reply,
            cluster,
            flags,
            details,
            before_body: false,
        }
    }
}

pub(super) async fn run_request(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    headers: Headers,
    body: body::RequestBody,
    (peer, local_addr, original): (SocketAddr, Option<SocketAddr>, Option<SocketAddr>),
    connection_id: u64,
    route_name: Option<&mut String>,
) -> Outcome {
    let index = generation.next_slot.fetch_add(1, Ordering::Relaxed) % generation.slots.len();
    let slot = &generation.slots[index];
    if proxy.fail_policy == FailPolicy::FailOpen && instance_failed(generation, index) {
        return match forward(proxy, generation, headers, body, true).await {
            Ok(r) => Ok((r, String::new())),
            Err(reply) => Err(Refused::new(
                router_local(reply),
                String::new(),
                reply.flag().code(),
                reply.details(),
            )),
        };
    }
    if let Some(reply) = check_failed(proxy, generation, index) {
        return Err(Refused::new(reply, String::new(), "UH", ""));
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
        // The filter decides in its request-headers callback and leaves the route's name.
        if let (Some(name), Some(set)) = (
            route_name,
            vm.stream_property(id, contract::ROUTE_NAME_PROPERTY),
        ) {
            *name = String::from_utf8_lossy(set).into_owned();
        }
        Ok((id, action))
    });
    let Some((id, action)) = started else {
        return Err(Refused::new(local(503, ""), String::new(), "UH", ""));
    };
    let _close = CloseOnDrop {
        proxy,
        generation,
        index,
        id,
    };
    let mut paused = action == Action::Pause && !has_reply(generation, index, id);
    if paused {
        register_waiter(proxy, generation, index, id, tx);
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
        // Answered from the request's headers: as in Envoy, the body was never read.
        return Err(Refused {
            before_body: true,
            ..Refused::new(reply, String::new(), "", "")
        });
    }
    if buffered.as_ref().is_some_and(|b| !b.is_empty()) {
        with_vm(proxy, generation, index, |vm| vm.on_request_body(id, true));
        if let Some(reply) = take_reply(generation, index, id) {
            return Err(Refused::new(reply, String::new(), "", ""));
        }
    }
    let upstream_headers = {
        let Ok(mut guard) = slot.vm.lock() else {
            return Err(Refused::new(local(503, ""), String::new(), "UH", ""));
        };
        let Some(s) = guard.as_mut().and_then(|vm| vm.stream_mut(id)) else {
            return Err(Refused::new(local(503, ""), String::new(), "UH", ""));
        };
        s.phase = Phase::Upstream;
        std::mem::take(&mut s.request_headers)
    };
    let mut upstream_headers = upstream_headers;
    // A captured request the filter passed through without naming an endpoint goes on to
    // where the client sent it (Envoy's ORIGINAL_DST cluster).
    if let Some(original) = original {
        let passes = upstream_headers
            .iter()
            .any(|(k, v)| k == CLUSTER_HEADER && v == PASSTHROUGH_CLUSTER);
        if passes && !upstream_headers.iter().any(|(k, _)| k == ENDPOINT_HEADER) {
            upstream_headers.push((ENDPOINT_HEADER.to_owned(), original.to_string()));
        }
    }
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
                Err(replaced) => return Err(Refused::new(replaced, cluster, "", "")),
            };
            let mut local = router_local(reply);
            for (k, v) in final_headers.unwrap_or_default() {
                match k.as_str() {
                    ":status" => local.status = v.parse().unwrap_or(local.status),
                    k if k.starts_with(':') => {}
                    _ => local.headers.push((k, v)),
                }
            }
            return Err(Refused::new(local, cluster, flag, reply.details()));
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
        Err(reply) => return Err(Refused::new(reply, cluster, "", "")),
    };
    let Some(final_headers) = final_headers else {
        return Err(Refused::new(local(503, ""), cluster, "UH", ""));
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
    Ok((Response::from_parts(parts, body), cluster))
}

/// A response as the filter's response callback sees it.
pub(super) struct ResponseSeen {
    headers: Headers,
    status: u16,
    flags: u64,
    details: &'static str,
}

/// Runs the filter's response-headers callback; when it pauses (to retry elsewhere), waits
/// until it resumes the response or answers in its place. `Ok` carries the headers to send
/// (`None` when the instance is gone), `Err` the filter's replacement.
pub(super) async fn response_phase(
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
        register_waiter(proxy, generation, index, id, tx);
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
pub(super) struct CloseOnDrop<'a> {
    proxy: &'a Arc<Proxy>,
    generation: &'a Arc<Generation>,
    index: usize,
    id: u32,
}

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let id = self.id;
        with_vm(self.proxy, self.generation, self.index, |vm| {
            vm.close_stream(id)
        });
        if let Ok(mut w) = self.generation.slots[self.index].waiters.lock() {
            w.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = uuid_v4(u64::MAX, 0);
        assert_eq!(id, "ffffffff-ffff-4fff-8000-000000000000");
        let id = uuid_v4(0, u64::MAX);
        assert_eq!(id, "00000000-0000-4000-bfff-ffffffffffff");
        let a = random_id();
        assert_ne!(a, random_id());
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
