//! Upstream HTTP: pooled keep-alive clients, per-attempt timeouts, and the retry conditions
//! of Envoy's `x-envoy-retry-on`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Response;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::{TokioExecutor, TokioIo};

use meshroute_core::engine::AttemptEnd;

use super::tls::Origination;
use super::Body;
use meshroute_core::ir::TcpKeepalive;
use meshroute_wasm_host::abi::Headers;

type Pool = hyper_util::client::legacy::Client<HttpConnector, Body>;
type H2Connection = (
    hyper::client::conn::http2::SendRequest<Body>,
    Option<SocketAddr>,
);
type Http1Sender = hyper::client::conn::http1::SendRequest<Body>;
type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
/// Free TLS connections with their local address and since when each is free.
type IdleTls = HashMap<TlsKey, Vec<(Http1Sender, Option<SocketAddr>, Instant)>>;

/// At most this many free TLS connections are kept per endpoint, name and configuration.
const IDLE_TLS_PER_KEY: usize = 64;

/// How long a pooled connection whose response was just read may take to be ready again;
/// one that is not by then is closed.
const READY_WAIT: Duration = Duration::from_secs(1);

/// A pooled TLS connection in use, and where it goes back when its response is read.
struct FreeTls {
    sender: Http1Sender,
    local: Option<SocketAddr>,
    key: TlsKey,
    pools: Arc<Mutex<IdleTls>>,
    idle_timeout: Duration,
}

/// Returns its connection to the pool once, when the response body has ended; a body
/// dropped before its end takes the connection with it (it cannot be reused).
struct FreeOnEnd {
    connection: Option<FreeTls>,
}

impl FreeOnEnd {
    fn release(&mut self) {
        let Some(FreeTls {
            sender,
            local,
            key,
            pools,
            idle_timeout,
        }) = self.connection.take()
        else {
            return;
        };
        if let Ok(mut free) = pools.lock() {
            let free = free.entry(key.clone()).or_default();
            if free.len() >= IDLE_TLS_PER_KEY {
                return;
            }
            free.push((sender, local, Instant::now()));
        }
        // `http.idleTimeout` later, the connection is closed (dropped) if it is still free,
        // as the plain pools close theirs.
        tokio::spawn(async move {
            tokio::time::sleep(idle_timeout).await;
            if let Ok(mut all) = pools.lock() {
                if let Some(free) = all.get_mut(&key) {
                    free.retain(|(_, _, since)| since.elapsed() < idle_timeout);
                    if free.is_empty() {
                        all.remove(&key);
                    }
                }
            }
        });
    }
}

/// A response body over a pooled connection, which it frees at its end.
struct ReleasingBody {
    body: hyper::body::Incoming,
    free: FreeOnEnd,
}

impl http_body::Body for ReleasingBody {
    type Data = bytes::Bytes;
    type Error = super::body::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => this.free.release(),
            std::task::Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => {
                this.free.release();
            }
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(super::body::BodyError::Peer)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ReleasingBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, `content-length: 0`) is never polled.
        if http_body::Body::is_end_stream(&self.body) {
            self.free.release();
        }
    }
}

/// What a pooled TLS connection can be reused for: the endpoint, the server name it was
/// made for and the client configuration (certificates, verification) it was made with.
/// The configuration is compared by identity; the key holds it, so that a configuration
/// built later (a reload) can never take the address of one a pooled connection used.
#[derive(Clone)]
struct TlsKey {
    endpoint: String,
    name: String,
    config: Arc<rustls::ClientConfig>,
}

impl PartialEq for TlsKey {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
            && self.name == other.name
            && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsKey {}

impl std::hash::Hash for TlsKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.endpoint.hash(state);
        self.name.hash(state);
        Arc::as_ptr(&self.config).hash(state);
    }
}

/// The multiplexed HTTP/2 connection to an endpoint, plain or over TLS.
#[derive(Clone, PartialEq, Eq, Hash)]
enum H2Key {
    Plain(String),
    Tls(TlsKey),
}

/// How a cluster's connections are made and kept (its DestinationRule `connectionPool`):
/// clusters that agree share one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// `http.idleTimeout`: an idle connection is closed after this (Envoy's default 1 h).
    pub idle_timeout: Duration,
    /// `tcp.tcpKeepalive`.
    pub keepalive: Option<TcpKeepalive>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            keepalive: None,
        }
    }
}

/// Applies `tcp.tcpKeepalive` to a connection (unset fields keep the system's values).
pub fn set_keepalive(stream: &tokio::net::TcpStream, keepalive: &TcpKeepalive) {
    let mut k = socket2::TcpKeepalive::new();
    if let Some(t) = keepalive.time_s {
        k = k.with_time(Duration::from_secs(u64::from(t)));
    }
    if let Some(i) = keepalive.interval_s {
        k = k.with_interval(Duration::from_secs(u64::from(i)));
    }
    if let Some(p) = keepalive.probes {
        k = k.with_retries(p);
    }
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&k);
}

/// HTTP/1.1 pools per pool settings and one HTTP/2 connection per endpoint.
pub struct Client {
    pools: Mutex<HashMap<PoolSettings, Pool>>,
    /// To the workload behind a transparent sidecar, from the inbound source address.
    inbound: Pool,
    /// Each with its local address.
    h2: Mutex<HashMap<H2Key, H2Connection>>,
    tls_idle: Arc<Mutex<IdleTls>>,
}

/// A new connection to `endpoint` with the pool's connect timeout and keepalive.
async fn connect(endpoint: &str, pool: &PoolSettings) -> Result<tokio::net::TcpStream, Attempt> {
    let tcp = tokio::time::timeout(
        pool.connect_timeout,
        tokio::net::TcpStream::connect(endpoint),
    )
    .await
    .map_err(|_| Attempt::ConnectTimeout)?
    .map_err(|e| connect_error(&e))?;
    let _ = tcp.set_nodelay(true);
    if let Some(k) = &pool.keepalive {
        set_keepalive(&tcp, k);
    }
    Ok(tcp)
}

/// A header's value (a pseudo-header's, mostly); empty when absent.
pub(super) fn pseudo<'h>(headers: &'h [(String, String)], name: &str) -> &'h str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The request for `headers` (pseudo-headers included). HTTP/1.1: connect by URI, name
/// the service in Host. HTTP/2: the URI carries the service authority (it becomes
/// `:authority`) and the connection is the caller's to pick. `None`: not a valid request.
pub(super) fn request(
    endpoint: &str,
    headers: &[(String, String)],
    body: Body,
    h2: bool,
) -> Option<hyper::Request<Body>> {
    let path = request_path(headers);
    let authority = pseudo(headers, ":authority");
    let uri = if h2 {
        format!("http://{authority}{path}")
    } else {
        format!("http://{endpoint}{path}")
    };
    let mut builder = hyper::Request::builder()
        .method(pseudo(headers, ":method"))
        .uri(uri);
    if !h2 {
        builder = builder.header("host", authority);
    }
    for (k, v) in headers {
        if !k.starts_with(':') {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    builder.body(body).ok()
}

/// The request's `:path`, `/` when it has none.
fn request_path(headers: &[(String, String)]) -> &str {
    match pseudo(headers, ":path") {
        "" => "/",
        p => p,
    }
}

/// The local address of the connection a response came over (Envoy's
/// `%UPSTREAM_LOCAL_ADDRESS%`), in the response's extensions.
#[derive(Clone, Copy)]
pub struct UpstreamLocal(pub SocketAddr);

/// Records the connection's local address in the response, when known.
fn with_local(
    mut response: Response<hyper::body::Incoming>,
    local: Option<SocketAddr>,
) -> Response<hyper::body::Incoming> {
    if let Some(l) = local {
        response.extensions_mut().insert(UpstreamLocal(l));
    }
    response
}

/// A failed connect: refused (nothing listens) or otherwise.
fn connect_error(e: &std::io::Error) -> Attempt {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Attempt::ConnectRefused,
        std::io::ErrorKind::TimedOut => Attempt::ConnectTimeout,
        _ => Attempt::ConnectFailure,
    }
}

/// How a pooled request failed: a connect error (timed out, refused or another), or a
/// reset of the connection.
fn pool_failure(e: &hyper_util::client::legacy::Error) -> Attempt {
    if !e.is_connect() {
        return Attempt::Reset;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return connect_error(io);
        }
        cause = c.source();
    }
    Attempt::ConnectFailure
}

/// How one attempt ended.
pub enum Attempt {
    Response(Response<Body>),
    Timeout,
    ConnectFailure,
    /// The endpoint refused the connection.
    ConnectRefused,
    /// No connection within the pool's connect timeout.
    ConnectTimeout,
    /// TLS origination failed (handshake, certificate or name), with the reason.
    TlsFailure(String),
    Reset,
}

impl Client {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        connector.set_local_addresses(
            super::capture::INBOUND_SOURCE,
            std::net::Ipv6Addr::LOCALHOST,
        );
        Self {
            inbound: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(3600))
                .build(connector),
            pools: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
            tls_idle: Arc::default(),
        }
    }

    fn pool(&self, settings: &PoolSettings) -> Option<Pool> {
        let mut pools = self.pools.lock().ok()?;
        Some(
            pools
                .entry(*settings)
                .or_insert_with(|| {
                    let mut connector = HttpConnector::new();
                    connector.set_connect_timeout(Some(settings.connect_timeout));
                    connector.set_nodelay(true);
                    if let Some(k) = &settings.keepalive {
                        // The connector's keepalive is SO_KEEPALIVE with these timings.
                        connector.set_keepalive(Some(Duration::from_secs(u64::from(
                            k.time_s.unwrap_or(7200),
                        ))));
                        connector.set_keepalive_interval(
                            k.interval_s.map(|i| Duration::from_secs(u64::from(i))),
                        );
                        connector.set_keepalive_retries(k.probes);
                    }
                    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(settings.idle_timeout)
                        // Idle connections are closed when their time is up, not only when
                        // next taken from the pool.
                        .pool_timer(hyper_util::rt::TokioTimer::new())
                        .build(connector)
                })
                .clone(),
        )
    }

    /// One HTTP/1.1 request to the workload of a transparent sidecar's inbound port.
    pub async fn send_inbound(&self, endpoint: &str, headers: &Headers, body: Body) -> Attempt {
        let Some(request) = request(endpoint, headers, body, false) else {
            return Attempt::Reset;
        };
        match self.inbound.request(request).await {
            Ok(resp) => Attempt::Response(resp.map(super::body::from_peer)),
            Err(e) => pool_failure(&e),
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one attempt's whole description")]
    pub async fn send(
        &self,
        endpoint: &str,
        headers: &Headers,
        body: Body,
        pool: &PoolSettings,
        h2: bool,
        tls: Option<&Origination>,
        timeout: Option<Duration>,
    ) -> Attempt {
        let authority = pseudo(headers, ":authority");
        let Some(request) = request(endpoint, headers, body, h2) else {
            return Attempt::Reset;
        };
        let call = async {
            if let Some(origination) = tls {
                // Istio's default SNI is the request's host.
                let host = meshroute_core::engine::split_host_port(authority).0;
                let name = origination.sni.as_deref().unwrap_or(host);
                self.send_tls(endpoint, origination, name, pool, h2, request)
                    .await
            } else if h2 {
                self.send_h2(endpoint, pool, request)
                    .await
                    .map(|r| r.map(super::body::from_peer))
            } else {
                match self.pool(pool) {
                    Some(pool) => match pool.request(request).await {
                        Ok(r) => {
                            let local = r.extensions().get::<HttpInfo>().map(HttpInfo::local_addr);
                            Ok(with_local(r, local).map(super::body::from_peer))
                        }
                        Err(e) => Err(pool_failure(&e)),
                    },
                    None => Err(Attempt::Reset),
                }
            }
        };
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r,
                Err(_) => return Attempt::Timeout,
            },
            None => call.await,
        };
        match result {
            Ok(resp) => Attempt::Response(resp),
            Err(attempt) => attempt,
        }
    }

    /// One request over TLS (DestinationRule `tls`): HTTP/1.1 connections are kept and
    /// reused per endpoint, server name and client configuration, HTTP/2 multiplexed over
    /// one; a new connection is made only when none is free.
    async fn send_tls(
        &self,
        endpoint: &str,
        origination: &Origination,
        name: &str,
        pool: &PoolSettings,
        h2: bool,
        request: hyper::Request<Body>,
    ) -> Result<Response<Body>, Attempt> {
        let key = TlsKey {
            endpoint: endpoint.to_owned(),
            name: name.to_owned(),
            config: Arc::clone(&origination.config),
        };
        if h2 {
            return self
                .send_h2_over(H2Key::Tls(key), request, || {
                    Self::tls_stream(endpoint, origination, name, pool)
                })
                .await
                .map(|r| r.map(super::body::from_peer));
        }
        let (mut sender, local) = match self.idle_tls(&key, pool.idle_timeout).await {
            Some(idle) => idle,
            None => {
                let (stream, local) = Self::tls_stream(endpoint, origination, name, pool).await?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|_| Attempt::ConnectFailure)?;
                tokio::spawn(conn);
                (sender, local)
            }
        };
        // HTTP/1.1 over a connection of our own: the request line takes the path only.
        let (mut parts, body) = request.into_parts();
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = pq.as_str().parse().unwrap_or_default();
        }
        let response = sender
            .send_request(hyper::Request::from_parts(parts, body))
            .await
            .map(|r| with_local(r, local))
            .map_err(|_| Attempt::Reset)?;
        // The connection is free again the moment this response's body has been read, before
        // its end reaches the client: a client's next request then finds it in the pool.
        let free = FreeOnEnd {
            connection: Some(FreeTls {
                sender,
                local,
                key,
                pools: Arc::clone(&self.tls_idle),
                idle_timeout: pool.idle_timeout,
            }),
        };
        Ok(response.map(|body| ReleasingBody { body, free }.boxed()))
    }

    /// A free pooled TLS connection for `key`, dropping those idle longer than `idle_timeout`
    /// or closed by the upstream. A connection is pooled as soon as its last response is
    /// read, so it may need a moment to be ready for the next request.
    async fn idle_tls(
        &self,
        key: &TlsKey,
        idle_timeout: Duration,
    ) -> Option<(Http1Sender, Option<SocketAddr>)> {
        loop {
            let (mut sender, local, since) = {
                let mut pools = self.tls_idle.lock().ok()?;
                pools.get_mut(key)?.pop()?
            };
            if since.elapsed() >= idle_timeout {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some((sender, local));
            }
        }
    }

    /// A new TLS connection to `endpoint`, with its local address.
    async fn tls_stream(
        endpoint: &str,
        origination: &Origination,
        name: &str,
        pool: &PoolSettings,
    ) -> Result<(TlsStream, Option<SocketAddr>), Attempt> {
        let tcp = connect(endpoint, pool).await?;
        let local = tcp.local_addr().ok();
        let stream = super::tls::connect(origination, name, tcp)
            .await
            .map_err(|reason| {
                tracing::debug!("TLS to {endpoint} ({name}): {reason}");
                Attempt::TlsFailure(reason)
            })?;
        Ok((stream, local))
    }

    /// One multiplexed HTTP/2 connection per endpoint, re-established when it closes.
    async fn send_h2(
        &self,
        endpoint: &str,
        pool: &PoolSettings,
        request: hyper::Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, Attempt> {
        self.send_h2_over(H2Key::Plain(endpoint.to_owned()), request, || async {
            let tcp = connect(endpoint, pool).await?;
            let local = tcp.local_addr().ok();
            Ok((tcp, local))
        })
        .await
    }

    /// One multiplexed HTTP/2 connection per `key`, made by `open` when there is none open.
    async fn send_h2_over<S, F>(
        &self,
        key: H2Key,
        request: hyper::Request<Body>,
        open: impl FnOnce() -> F,
    ) -> Result<Response<hyper::body::Incoming>, Attempt>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: std::future::Future<Output = Result<(S, Option<SocketAddr>), Attempt>>,
    {
        let cached = self
            .h2
            .lock()
            .ok()
            .and_then(|m| m.get(&key).filter(|(s, _)| !s.is_closed()).cloned());
        let (mut sender, local) = match cached {
            Some(s) => s,
            None => {
                let (stream, local) = open().await?;
                let (sender, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .map_err(|_| Attempt::ConnectFailure)?;
                tokio::spawn(conn);
                if let Ok(mut m) = self.h2.lock() {
                    m.insert(key, (sender.clone(), local));
                }
                (sender, local)
            }
        };
        sender.ready().await.map_err(|_| Attempt::Reset)?;
        sender
            .send_request(request)
            .await
            .map(|r| with_local(r, local))
            .map_err(|_| Attempt::Reset)
    }
}

impl Attempt {
    /// How the attempt ended, in the terms of Envoy's retry conditions.
    pub fn end(&self) -> AttemptEnd {
        match self {
            Self::Response(r) => AttemptEnd::Response {
                status: r.status().as_u16(),
                grpc_status: r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            },
            Self::Timeout => AttemptEnd::Timeout,
            Self::ConnectFailure
            | Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::TlsFailure(_) => AttemptEnd::ConnectFailure,
            Self::Reset => AttemptEnd::Reset,
        }
    }
}
