//! Upstream HTTP: pooled keep-alive clients, per-attempt timeouts, and the retry conditions
//! of Envoy's `x-envoy-retry-on`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Response;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use meshroute_core::engine::AttemptEnd;

use super::tls::Origination;
use super::Body;
use meshroute_core::ir::TcpKeepalive;
use meshroute_wasm_host::abi::Headers;

type Pool = hyper_util::client::legacy::Client<HttpConnector, Body>;

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
    h2: Mutex<HashMap<String, hyper::client::conn::http2::SendRequest<Body>>>,
}

/// A new connection to `endpoint` with the pool's connect timeout and keepalive.
async fn connect(endpoint: &str, pool: &PoolSettings) -> Result<tokio::net::TcpStream, Attempt> {
    let tcp = tokio::time::timeout(
        pool.connect_timeout,
        tokio::net::TcpStream::connect(endpoint),
    )
    .await
    .map_err(|_| Attempt::ConnectFailure)?
    .map_err(|_| Attempt::ConnectFailure)?;
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

/// How one attempt ended.
pub enum Attempt {
    Response(Response<Body>),
    Timeout,
    ConnectFailure,
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
            Ok(resp) => Attempt::Response(resp.map(BodyExt::boxed)),
            Err(e) if e.is_connect() => Attempt::ConnectFailure,
            Err(_) => Attempt::Reset,
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
                Self::send_tls(endpoint, origination, name, pool, h2, request).await
            } else if h2 {
                self.send_h2(endpoint, pool, request).await
            } else {
                match self.pool(pool) {
                    Some(pool) => pool.request(request).await.map_err(|e| {
                        if e.is_connect() {
                            Attempt::ConnectFailure
                        } else {
                            Attempt::Reset
                        }
                    }),
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
            Ok(resp) => Attempt::Response(resp.map(BodyExt::boxed)),
            Err(attempt) => attempt,
        }
    }

    /// One request over a new TLS connection (DestinationRule `tls`).
    async fn send_tls(
        endpoint: &str,
        origination: &Origination,
        name: &str,
        pool: &PoolSettings,
        h2: bool,
        request: hyper::Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, Attempt> {
        let tcp = connect(endpoint, pool).await?;
        let stream = super::tls::connect(origination, name, tcp)
            .await
            .map_err(|reason| {
                tracing::debug!("TLS to {endpoint} ({name}): {reason}");
                Attempt::TlsFailure(reason)
            })?;
        let io = TokioIo::new(stream);
        if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| Attempt::ConnectFailure)?;
            tokio::spawn(conn);
            return sender
                .send_request(request)
                .await
                .map_err(|_| Attempt::Reset);
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| Attempt::ConnectFailure)?;
        tokio::spawn(conn);
        // HTTP/1.1 over a connection of its own: the request line takes the path only.
        let (mut parts, body) = request.into_parts();
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = pq.as_str().parse().unwrap_or_default();
        }
        sender
            .send_request(hyper::Request::from_parts(parts, body))
            .await
            .map_err(|_| Attempt::Reset)
    }

    /// One multiplexed HTTP/2 connection per endpoint, re-established when it closes.
    async fn send_h2(
        &self,
        endpoint: &str,
        pool: &PoolSettings,
        request: hyper::Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, Attempt> {
        let cached = self
            .h2
            .lock()
            .ok()
            .and_then(|m| m.get(endpoint).filter(|s| !s.is_closed()).cloned());
        let mut sender = match cached {
            Some(s) => s,
            None => {
                let tcp = connect(endpoint, pool).await?;
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                        .await
                        .map_err(|_| Attempt::ConnectFailure)?;
                tokio::spawn(conn);
                if let Ok(mut m) = self.h2.lock() {
                    m.insert(endpoint.to_owned(), sender.clone());
                }
                sender
            }
        };
        sender.ready().await.map_err(|_| Attempt::Reset)?;
        sender
            .send_request(request)
            .await
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
            Self::ConnectFailure | Self::TlsFailure(_) => AttemptEnd::ConnectFailure,
            Self::Reset => AttemptEnd::Reset,
        }
    }
}
