//! Upstream HTTP: pooled keep-alive clients, per-attempt timeouts, and the retry conditions
//! of Envoy's `x-envoy-retry-on`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
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
type Http1Sender = hyper::client::conn::http1::SendRequest<Body>;
type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
/// Free HTTP/1.1 connections of our own pools (TLS, or limited in requests or lifetime).
type IdleH1 = HashMap<ConnKey, Vec<FreeConnection>>;

/// At most this many free connections are kept per endpoint, name and configuration.
const IDLE_PER_KEY: usize = 64;

/// How long a pooled connection whose response was just read may take to be ready again;
/// one that is not by then is closed.
const READY_WAIT: Duration = Duration::from_secs(1);

/// An HTTP/1.1 connection of our own pools: its sender, local address, when it was made and
/// how many requests it has carried.
struct Connection {
    sender: Http1Sender,
    local: Option<SocketAddr>,
    born: Instant,
    requests: u32,
}

/// A connection waiting in the pool, and since when.
struct FreeConnection {
    connection: Connection,
    since: Instant,
}

impl Connection {
    /// Whether the pool's limits still let it carry a request: `maxRequestsPerConnection`
    /// and `maxConnectionDuration`, as Envoy retires a connection that reached either.
    fn reusable(&self, settings: &PoolSettings) -> bool {
        settings.admits(self.requests, self.born)
    }
}

/// A pooled connection in use, and where it goes back when its response is read.
struct InUse {
    connection: Connection,
    key: ConnKey,
    pools: Arc<Mutex<IdleH1>>,
}

/// Returns its connection to the pool once, when the response body has ended; a body
/// dropped before its end takes the connection with it (it cannot be reused).
struct FreeOnEnd {
    connection: Option<InUse>,
}

impl FreeOnEnd {
    fn release(&mut self) {
        let Some(InUse {
            connection,
            key,
            pools,
        }) = self.connection.take()
        else {
            return;
        };
        let settings = key.settings;
        // One that reached its limits is closed (dropped) instead.
        if !connection.reusable(&settings) {
            return;
        }
        let lifetime_left = settings
            .max_connection_duration
            .map(|d| d.saturating_sub(connection.born.elapsed()));
        if let Ok(mut free) = pools.lock() {
            let free = free.entry(key.clone()).or_default();
            if free.len() >= IDLE_PER_KEY {
                return;
            }
            free.push(FreeConnection {
                connection,
                since: Instant::now(),
            });
        }
        // `http.idleTimeout` (or the end of its `maxConnectionDuration`) later, the
        // connection is closed if it is still free, as the plain pools close theirs.
        let wait = lifetime_left.map_or(settings.idle_timeout, |l| l.min(settings.idle_timeout));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Ok(mut all) = pools.lock() {
                if let Some(free) = all.get_mut(&key) {
                    free.retain(|f| {
                        f.since.elapsed() < settings.idle_timeout
                            && f.connection.reusable(&settings)
                    });
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

/// A multiplexed HTTP/2 connection: its sender, local address, when it was made, how many
/// requests it has carried and how many streams are open on it now.
struct H2Connection {
    sender: hyper::client::conn::http2::SendRequest<Body>,
    local: Option<SocketAddr>,
    born: Instant,
    requests: u32,
    open_streams: Arc<AtomicU32>,
}

impl H2Connection {
    /// Whether it may still take new requests (`maxRequestsPerConnection`,
    /// `maxConnectionDuration`); one that may not is forgotten, and closes when its last
    /// stream ends.
    fn reusable(&self, settings: &PoolSettings) -> bool {
        !self.sender.is_closed() && settings.admits(self.requests, self.born)
    }

    /// Whether a stream may open on it now (`maxConcurrentStreams`, as Envoy's pool opens
    /// another connection when every one is at the limit).
    fn has_room(&self, settings: &PoolSettings) -> bool {
        settings.max_concurrent_streams == 0
            || self.open_streams.load(Ordering::Relaxed) < settings.max_concurrent_streams
    }

    /// Takes a stream: counts the request and the open stream until the slot is dropped.
    fn take_stream(&mut self) -> OpenStream {
        self.requests = self.requests.saturating_add(1);
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(&self.open_streams))
    }
}

/// One open stream of an HTTP/2 connection, until its response body ends or is dropped.
struct OpenStream(Arc<AtomicU32>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its stream open.
struct StreamBody {
    body: hyper::body::Incoming,
    _stream: OpenStream,
}

impl http_body::Body for StreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What a pooled connection can be reused for: the endpoint, the pool settings it was made
/// under and, over TLS, the server name and client configuration (certificates,
/// verification) it was made with. The configuration is compared by identity; the key
/// holds it, so that a configuration built later (a reload) can never take the address of
/// one a pooled connection used.
#[derive(Clone)]
struct ConnKey {
    endpoint: String,
    settings: PoolSettings,
    tls: Option<(String, Arc<rustls::ClientConfig>)>,
}

impl ConnKey {
    fn new(endpoint: &str, settings: &PoolSettings, tls: Option<(&Origination, &str)>) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            settings: *settings,
            tls: tls.map(|(o, name)| (name.to_owned(), Arc::clone(&o.config))),
        }
    }
}

impl PartialEq for ConnKey {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
            && self.settings == other.settings
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some((a, x)), Some((b, y))) => a == b && Arc::ptr_eq(x, y),
                _ => false,
            }
    }
}

impl Eq for ConnKey {}

impl std::hash::Hash for ConnKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.endpoint.hash(state);
        self.settings.hash(state);
        if let Some((name, config)) = &self.tls {
            name.hash(state);
            Arc::as_ptr(config).hash(state);
        }
    }
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
    /// `http.maxRequestsPerConnection` (0: unlimited).
    pub max_requests_per_connection: u32,
    /// `tcp.maxConnectionDuration`.
    pub max_connection_duration: Option<Duration>,
    /// `http.maxConcurrentStreams` on an HTTP/2 connection (0: the peer's limit alone).
    pub max_concurrent_streams: u32,
}

impl PoolSettings {
    /// Whether connections retire after a number of requests or a lifetime, which the
    /// plain HTTP/1.1 pool cannot do; such clusters use our own pool.
    fn limits_connections(&self) -> bool {
        self.max_requests_per_connection > 0 || self.max_connection_duration.is_some()
    }

    /// Whether a connection made at `born` that carried `requests` may take another:
    /// `maxRequestsPerConnection` and `maxConnectionDuration`, as Envoy retires a
    /// connection that reached either.
    fn admits(&self, requests: u32, born: Instant) -> bool {
        (self.max_requests_per_connection == 0 || requests < self.max_requests_per_connection)
            && self
                .max_connection_duration
                .is_none_or(|d| born.elapsed() < d)
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            keepalive: None,
            max_requests_per_connection: 0,
            max_connection_duration: None,
            max_concurrent_streams: 0,
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
    h2: Mutex<HashMap<ConnKey, Vec<H2Connection>>>,
    idle_h1: Arc<Mutex<IdleH1>>,
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

/// As [`connect`], with the connection's local address (`%UPSTREAM_LOCAL_ADDRESS%`).
async fn connect_with_local(
    endpoint: &str,
    pool: &PoolSettings,
) -> Result<(tokio::net::TcpStream, Option<SocketAddr>), Attempt> {
    let tcp = connect(endpoint, pool).await?;
    let local = tcp.local_addr().ok();
    Ok((tcp, local))
}

/// An HTTP/1.1 client connection over `stream`, its connection task running.
async fn h1_handshake<S>(stream: S) -> Result<Http1Sender, Attempt>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Attempt::ConnectFailure)?;
    tokio::spawn(conn);
    Ok(sender)
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
            idle_h1: Arc::default(),
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
                self.send_h2(endpoint, pool, request).await
            } else if pool.limits_connections() {
                self.send_h1_pooled(endpoint, None, pool, request).await
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
        if h2 {
            let key = ConnKey::new(endpoint, pool, Some((origination, name)));
            return self
                .send_h2_over(key, request, || {
                    Self::tls_stream(endpoint, origination, name, pool)
                })
                .await;
        }
        self.send_h1_pooled(endpoint, Some((origination, name)), pool, request)
            .await
    }

    /// One HTTP/1.1 request over a connection of our own pool: a free one of the same
    /// endpoint, settings and TLS when there is one, else a new one.
    async fn send_h1_pooled(
        &self,
        endpoint: &str,
        tls: Option<(&Origination, &str)>,
        pool: &PoolSettings,
        request: hyper::Request<Body>,
    ) -> Result<Response<Body>, Attempt> {
        let key = ConnKey::new(endpoint, pool, tls);
        let mut connection = match self.idle_h1(&key).await {
            Some(free) => free,
            None => {
                let (sender, local) = match tls {
                    Some((origination, name)) => {
                        let (stream, local) =
                            Self::tls_stream(endpoint, origination, name, pool).await?;
                        (h1_handshake(stream).await?, local)
                    }
                    None => {
                        let (tcp, local) = connect_with_local(endpoint, pool).await?;
                        (h1_handshake(tcp).await?, local)
                    }
                };
                Connection {
                    sender,
                    local,
                    born: Instant::now(),
                    requests: 0,
                }
            }
        };
        // HTTP/1.1 over a connection of our own: the request line takes the path only.
        let (mut parts, body) = request.into_parts();
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = pq.as_str().parse().unwrap_or_default();
        }
        connection.requests = connection.requests.saturating_add(1);
        let local = connection.local;
        let response = connection
            .sender
            .send_request(hyper::Request::from_parts(parts, body))
            .await
            .map(|r| with_local(r, local))
            .map_err(|_| Attempt::Reset)?;
        // The connection is free again the moment this response's body has been read, before
        // its end reaches the client: a client's next request then finds it in the pool.
        let free = FreeOnEnd {
            connection: Some(InUse {
                connection,
                key,
                pools: Arc::clone(&self.idle_h1),
            }),
        };
        Ok(response.map(|body| ReleasingBody { body, free }.boxed()))
    }

    /// A free pooled connection for `key`, dropping those idle longer than `idle_timeout`,
    /// past their limits or closed by the upstream. A connection is pooled as soon as its
    /// last response is read, so it may need a moment to be ready for the next request.
    async fn idle_h1(&self, key: &ConnKey) -> Option<Connection> {
        loop {
            let FreeConnection {
                mut connection,
                since,
            } = {
                let mut pools = self.idle_h1.lock().ok()?;
                pools.get_mut(key)?.pop()?
            };
            if since.elapsed() >= key.settings.idle_timeout || !connection.reusable(&key.settings) {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, connection.sender.ready()).await {
                return Some(connection);
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
        let (tcp, local) = connect_with_local(endpoint, pool).await?;
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
    ) -> Result<Response<Body>, Attempt> {
        self.send_h2_over(ConnKey::new(endpoint, pool, None), request, || {
            connect_with_local(endpoint, pool)
        })
        .await
    }

    /// One multiplexed HTTP/2 connection per `key`, made by `open` when there is none open.
    async fn send_h2_over<S, F>(
        &self,
        key: ConnKey,
        request: hyper::Request<Body>,
        open: impl FnOnce() -> F,
    ) -> Result<Response<Body>, Attempt>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: std::future::Future<Output = Result<(S, Option<SocketAddr>), Attempt>>,
    {
        let settings = key.settings;
        let cached = self.h2.lock().ok().and_then(|mut all| {
            let connections = all.get_mut(&key)?;
            connections.retain(|c| c.reusable(&settings));
            let c = connections.iter_mut().find(|c| c.has_room(&settings))?;
            Some((c.sender.clone(), c.local, c.take_stream()))
        });
        let (mut sender, local, stream) = match cached {
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
                let mut connection = H2Connection {
                    sender: sender.clone(),
                    local,
                    born: Instant::now(),
                    requests: 0,
                    open_streams: Arc::default(),
                };
                let stream = connection.take_stream();
                if let Ok(mut all) = self.h2.lock() {
                    all.entry(key).or_default().push(connection);
                }
                (sender, local, stream)
            }
        };
        sender.ready().await.map_err(|_| Attempt::Reset)?;
        let response = sender
            .send_request(request)
            .await
            .map(|r| with_local(r, local))
            .map_err(|_| Attempt::Reset)?;
        Ok(response.map(|body| {
            super::body::from_peer(StreamBody {
                body,
                _stream: stream,
            })
        }))
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
