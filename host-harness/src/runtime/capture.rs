//! Transparent capture: a sidecar whose pod's iptables rules redirect every outbound TCP
//! connection to [`OUTBOUND_PORT`] and every inbound one to [`INBOUND_PORT`]
//! (`meshroute iptables`). Each connection is dispatched on its original destination, read
//! with `SO_ORIGINAL_DST`, as Istio's `virtualOutbound` and `virtualInbound` listeners do.
//!
//! Outbound, per original destination port: HTTP (sniffed, as Istio's `http_inspector` does)
//! is served on that port's route table; other bytes take the port's connection routes;
//! a port the rules do not know passes through to the original destination under ALLOW_ANY
//! (`PassthroughCluster`) and is closed under REGISTRY_ONLY (`BlackHoleCluster`).
//!
//! Inbound: the connection is handed to the workload (`127.0.0.1`, or the Sidecar ingress
//! listener's `defaultEndpoint`, or by default the original destination from the source
//! address [`INBOUND_SOURCE`], which the capture rules let through), request by request on
//! HTTP ports with `reporter="destination"` metrics, byte for byte otherwise.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use meshroute_core::contract::{RouterReply, DEFAULT_ROUTE, PASSTHROUGH_CLUSTER};
use meshroute_core::ir::{InboundPort, OutboundPolicy, Protocol};

use super::access_log::{self, Entry, TcpEntry};
use super::http::{
    accept_queue, close_when_draining, graceful, header_bytes, header_pairs, listener_builder,
    random_id, request_target, serve_http, Completed, HOP_BY_HOP,
};
use super::l4::{self, Replay};
use super::{full, launch, upstream, Body, Limits, ListenerSpec, Proxy};

/// Where the capture rules send outbound connections (Istio's `virtualOutbound`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Where the capture rules send inbound connections (Istio's `virtualInbound`).
pub const INBOUND_PORT: u16 = 15006;
/// The source address of the proxy's connections to its own workload: the capture rules
/// return traffic from it on the loopback interface, so it is not captured again.
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Istio's cluster for an unknown destination the outbound policy refuses.
const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's cluster for inbound traffic to a port no service declares.
const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// Istio's default connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read to tell HTTP from other protocols before giving up (a request line longer than
/// this is not HTTP as far as routing is concerned).
const SNIFF_LIMIT: usize = 8 * 1024;

/// The destination a redirected connection was sent to; `None` when it was not redirected
/// (a client connecting to the capture port itself).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, PartialEq, Eq)]
enum Sniff {
    NeedMore,
    Http,
    Other,
}

/// HTTP/1 request line or the HTTP/2 connection preface, as Envoy's `http_inspector` tells.
fn sniff(buf: &[u8]) -> Sniff {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if buf.is_empty() {
        return Sniff::NeedMore;
    }
    if PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
        return if buf.len() >= PREFACE.len() {
            Sniff::Http
        } else {
            Sniff::NeedMore
        };
    }
    // `METHOD SP target SP HTTP/1.x CRLF`
    let method_end = buf.iter().position(|&b| b == b' ');
    let method = &buf[..method_end.unwrap_or(buf.len())];
    if method.is_empty() || method.len() > 20 || !method.iter().all(u8::is_ascii_uppercase) {
        return Sniff::Other;
    }
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if method_end.is_none() && buf.len() <= 20 || buf.len() < SNIFF_LIMIT {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    };
    let line = &buf[..line_end];
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Sniff::Http
    } else {
        Sniff::Other
    }
}

/// Reads until the protocol is known; returns whether it is HTTP and the bytes read, or
/// `None` when the client closed first.
async fn read_protocol(stream: &mut TcpStream) -> Option<(bool, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        match sniff(&buf) {
            Sniff::Http => return Some((true, buf)),
            Sniff::Other => return Some((false, buf)),
            Sniff::NeedMore => {}
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return (!buf.is_empty()).then_some((false, buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Accepts on a capture listener; every connection runs `handle`. A listener that `drains`
/// stops accepting when the drain starts (serving what the kernel already accepted).
async fn accept_loop<F, Fut>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    limits: Limits,
    drains: bool,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let start = |stream: TcpStream, peer: SocketAddr| {
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(stream);
            proxy.stats.connection_overflow();
            return;
        };
        let _ = stream.set_nodelay(true);
        let id = proxy.connection_ids.fetch_add(1, Ordering::Relaxed);
        let work = handle(Arc::clone(&proxy), stream, peer, id);
        let held = (permit, proxy.in_flight());
        tokio::spawn(async move {
            let _held = held;
            work.await;
        });
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = proxy.draining(), if drains => {
                for (stream, peer) in accept_queue(listener) {
                    start(stream, peer);
                }
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => start(stream, peer),
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves the outbound capture listener.
pub async fn serve_outbound(proxy: Arc<Proxy>, listener: TcpListener, limits: Limits) {
    // The application may still be calling out while it shuts down: outbound keeps serving
    // until the process exits, as Istio drains only the inbound side.
    accept_loop(
        proxy,
        listener,
        limits,
        false,
        move |proxy, stream, peer, id| outbound(proxy, stream, peer, id, limits),
    )
    .await;
}

/// Serves the inbound capture listener.
pub async fn serve_inbound(proxy: Arc<Proxy>, listener: TcpListener, limits: Limits) {
    let pools = Arc::new(InboundPools::default());
    accept_loop(
        proxy,
        listener,
        limits,
        true,
        move |proxy, stream, _peer, _id| inbound(proxy, Arc::clone(&pools), stream, limits),
    )
    .await;
}

async fn outbound(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    connection_id: u64,
    limits: Limits,
) {
    let Some(original) = original_destination(&stream) else {
        // Sent to the capture port itself: passing it on would loop.
        return;
    };
    let generation = proxy.current();
    let doc = &generation.doc;
    let port = original.port();
    let l4_table = doc.l4_tables.iter().find(|t| t.port == port);
    let http_table = doc.route_tables.iter().any(|t| t.port == port);
    let (is_http, head) = if http_table {
        match read_protocol(&mut stream).await {
            Some(r) => r,
            None => return,
        }
    } else {
        (false, Vec::new())
    };
    if is_http {
        let spec = ListenerSpec {
            address: original,
            server_port: port,
            tls: None,
            connections: None,
            limits,
            original_destination: Some(original),
        };
        let io = Replay::new(head, stream);
        serve_http(proxy, spec, io, peer, Some(original), connection_id, false).await;
        return;
    }
    if let Some(table) = l4_table {
        let mut spec = launch::sidecar_connection_listener(table, original, limits);
        spec.original_destination = Some(original);
        l4::serve_connection(proxy, spec, stream, peer, connection_id, head).await;
        return;
    }
    match doc.outbound_traffic_policy {
        OutboundPolicy::AllowAny => {
            splice(&proxy, stream, head, original, None, PASSTHROUGH_CLUSTER).await;
        }
        OutboundPolicy::RegistryOnly => {
            proxy.stats.tcp_opened(BLACKHOLE_CLUSTER);
            proxy
                .stats
                .tcp_closed(BLACKHOLE_CLUSTER, "UH", head.len() as u64, 0);
            proxy.access_log.tcp(&TcpEntry {
                cluster: BLACKHOLE_CLUSTER,
                endpoint: "",
                flags: "UH",
                received: head.len() as u64,
                sent: 0,
                duration: Duration::ZERO,
                sni: "",
            });
        }
    }
}

/// Connects to `target` (from `source` when given) and copies both ways until both sides
/// are done, counting the connection for `cluster`.
async fn splice(
    proxy: &Proxy,
    stream: TcpStream,
    head: Vec<u8>,
    target: SocketAddr,
    source: Option<IpAddr>,
    cluster: &str,
) {
    let started = Instant::now();
    let endpoint = target.to_string();
    let log = |flags: &str, received: u64, sent: u64| {
        proxy.access_log.tcp(&TcpEntry {
            cluster,
            endpoint: &endpoint,
            flags,
            received,
            sent,
            duration: started.elapsed(),
            sni: "",
        });
    };
    let Ok(mut upstream) = connect_from(target, source).await else {
        proxy.stats.tcp_opened(cluster);
        proxy.stats.tcp_closed(cluster, "UF", head.len() as u64, 0);
        log("UF", head.len() as u64, 0);
        return;
    };
    proxy.stats.tcp_opened(cluster);
    let mut down = Replay::new(head, stream);
    let (received, sent) = copy(&mut down, &mut upstream).await;
    proxy.stats.tcp_closed(cluster, "", received, sent);
    log("", received, sent);
}

async fn connect_from(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connection and request limits of the inbound ports (`connectionPool`), kept across
/// connections and sized by the rules in force.
#[derive(Default)]
struct InboundPools {
    by_port: Mutex<HashMap<(u16, u32, u32), PortPool>>,
}

#[derive(Clone)]
struct PortPool {
    connections: Option<Arc<Semaphore>>,
    requests: Option<Arc<Semaphore>>,
}

impl InboundPools {
    fn get(&self, port: &InboundPort) -> PortPool {
        let limit = |n: u32| (n > 0).then(|| Arc::new(Semaphore::new(n as usize)));
        let key = (port.port, port.max_connections, port.max_requests);
        match self.by_port.lock() {
            Ok(mut m) => m
                .entry(key)
                .or_insert_with(|| PortPool {
                    connections: limit(port.max_connections),
                    requests: limit(port.max_requests),
                })
                .clone(),
            Err(_) => PortPool {
                connections: None,
                requests: None,
            },
        }
    }
}

/// Where the workload listens for an inbound port.
enum Workload {
    Tcp(SocketAddr),
    Unix(String),
}

fn workload(port: Option<&InboundPort>, original: SocketAddr) -> Option<Workload> {
    let Some(endpoint) = port.and_then(|p| p.endpoint.as_deref()) else {
        return Some(Workload::Tcp(original));
    };
    if let Some(path) = endpoint.strip_prefix("unix://") {
        return Some(Workload::Unix(path.to_owned()));
    }
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host {
        // The address the connection was sent to, on the endpoint's port.
        "" | "0.0.0.0" | "::" => original.ip(),
        h => h.parse().ok()?,
    };
    Some(Workload::Tcp(SocketAddr::new(ip, port)))
}

async fn inbound(
    proxy: Arc<Proxy>,
    pools: Arc<InboundPools>,
    mut stream: TcpStream,
    limits: Limits,
) {
    let Some(original) = original_destination(&stream) else {
        return;
    };
    let peer = stream.peer_addr().ok();
    let generation = proxy.current();
    let port = generation
        .doc
        .inbound
        .iter()
        .find(|p| p.port == original.port())
        .cloned();
    let cluster = match &port {
        Some(p) => format!("inbound|{}||", p.port),
        None => INBOUND_PASSTHROUGH_CLUSTER.to_owned(),
    };
    let pool = port.as_ref().map(|p| pools.get(p));
    // `tcp.maxConnections`: a connection over the limit is closed at once (UO).
    let _connection_permit = match pool.as_ref().and_then(|p| p.connections.clone()) {
        Some(s) => match s.try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let cluster = with_service(cluster, port.as_ref());
                proxy.stats.tcp_opened(&cluster);
                proxy.stats.tcp_closed(&cluster, "UO", 0, 0);
                return;
            }
        },
        None => None,
    };
    let Some(target) = workload(port.as_ref(), original) else {
        return;
    };
    let protocol = port.as_ref().map_or(Protocol::Tcp, |p| p.protocol);
    let (is_http, head) = if protocol.is_http() {
        (true, Vec::new())
    } else if protocol.is_unspecified() && port.is_some() {
        match read_protocol(&mut stream).await {
            Some(r) => r,
            None => return,
        }
    } else {
        (false, Vec::new())
    };
    match target {
        Workload::Tcp(address) if is_http => {
            let service = port.as_ref().map_or("", |p| p.service.as_str()).to_owned();
            let inbound = Arc::new(InboundHttp {
                proxy: Arc::clone(&proxy),
                cluster,
                service,
                address,
                requests: pool.and_then(|p| p.requests),
                h2: protocol.is_http2(),
                h2_sender: tokio::sync::Mutex::new(None),
            });
            let io = super::deadline::HeaderDeadline::new(
                Replay::new(head, stream),
                limits.header_timeout,
            );
            let service = service_fn(move |req| {
                let inbound = Arc::clone(&inbound);
                async move { Ok::<_, std::convert::Infallible>(inbound.handle(req).await) }
            });
            let builder = listener_builder(limits);
            let ended = graceful!(
                builder.serve_connection(TokioIo::new(io), service),
                proxy.draining()
            );
            if let (Err(e), Some(peer)) = (ended, peer) {
                super::http::log_codec_error(&proxy, &*e, peer, Some(original));
            }
        }
        // TCP connections are counted and logged under the service's inbound cluster, so
        // that the metrics name the service as Istio's do.
        Workload::Tcp(address) => {
            let source = (!address.ip().is_loopback()).then_some(IpAddr::V4(INBOUND_SOURCE));
            let cluster = with_service(cluster, port.as_ref());
            splice(&proxy, stream, head, address, source, &cluster).await;
        }
        Workload::Unix(path) => {
            let cluster = with_service(cluster, port.as_ref());
            splice_unix(&proxy, stream, head, &path, &cluster).await;
        }
    }
}

/// `inbound|PORT||` with the port's service appended (when it has one).
fn with_service(mut cluster: String, port: Option<&InboundPort>) -> String {
    if let Some(p) = port {
        if cluster.ends_with("||") {
            cluster.push_str(&p.service);
        }
    }
    cluster
}

async fn splice_unix(proxy: &Proxy, stream: TcpStream, head: Vec<u8>, path: &str, cluster: &str) {
    proxy.stats.tcp_opened(cluster);
    let Ok(mut upstream) = tokio::net::UnixStream::connect(path).await else {
        proxy.stats.tcp_closed(cluster, "UF", head.len() as u64, 0);
        return;
    };
    let mut down = Replay::new(head, stream);
    let (received, sent) = copy(&mut down, &mut upstream).await;
    proxy.stats.tcp_closed(cluster, "", received, sent);
}

async fn copy<A, B>(a: &mut A, b: &mut B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(a, b).await.unwrap_or((0, 0))
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// One inbound HTTP port's requests to the workload.
struct InboundHttp {
    proxy: Arc<Proxy>,
    /// `inbound|PORT||`.
    cluster: String,
    /// The service the port belongs to (metrics' `destination_service`).
    service: String,
    address: SocketAddr,
    requests: Option<Arc<Semaphore>>,
    h2: bool,
    /// HTTP/2 ports: one connection to the workload per client connection.
    h2_sender: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>,
}

impl InboundHttp {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let version = parts.version;
        let protocol = super::admin::request_protocol(
            parts
                .headers
                .get("content-type")
                .map(http::HeaderValue::as_bytes),
        );
        let (authority, path) = request_target(&parts);
        let mut headers = vec![
            (":authority".to_owned(), authority.clone()),
            (":path".to_owned(), path.clone()),
            (":method".to_owned(), parts.method.as_str().to_owned()),
        ];
        headers.extend(
            header_pairs(&parts.headers)
                .into_iter()
                .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()) && k != "x-forwarded-proto"),
        );
        // As Istio's inbound listener: the scheme the request arrived with, and an id for
        // requests that come without one.
        headers.push(("x-forwarded-proto".to_owned(), "http".to_owned()));
        let request_id = match headers.iter().find(|(k, _)| k == "x-request-id") {
            Some((_, v)) => v.clone(),
            None => {
                let id = random_id();
                headers.push(("x-request-id".to_owned(), id.clone()));
                id
            }
        };
        let request_size = header_bytes(&headers);
        // The request body goes to the workload as it arrives, counted as it passes.
        let received = Arc::new(AtomicU64::new(0));
        let body = super::body::counted(body, Arc::clone(&received));
        let (response, flags) = match self.send(headers, body).await {
            Ok(r) => (r, ""),
            Err(reply) => {
                let response = Response::builder()
                    .status(reply.status())
                    .header("content-type", "text/plain")
                    .body(full(reply.body()))
                    .unwrap_or_else(|_| Response::new(full(Vec::new())));
                (response, reply.flag().code())
            }
        };
        let mut response = response;
        close_when_draining(&self.proxy, version, &mut response);
        let entry = self.proxy.access_log.enabled().then(|| Entry {
            method: parts.method.as_str().to_owned(),
            path,
            protocol: access_log::protocol(version),
            details: flags.is_empty().then(|| "via_upstream".to_owned()),
            forwarded_for: header(&parts.headers, "x-forwarded-for"),
            user_agent: header(&parts.headers, "user-agent"),
            request_id,
            authority,
            upstream_host: self.address.to_string(),
            upstream_cluster: self.cluster.clone(),
            // Istio's inbound listener routes every request with its route named `default`.
            route_name: DEFAULT_ROUTE.to_owned(),
            ..Entry::new()
        });
        // The server side reports its own workload: no endpoint labels.
        let done = Completed {
            proxy: Arc::clone(&self.proxy),
            cluster: format!("{}{}", self.cluster, self.service),
            labelled_endpoint: String::new(),
            protocol,
            flags,
            started,
            request_size,
            received,
        };
        done.on_sent(response, entry)
    }

    async fn send(
        &self,
        headers: Vec<(String, String)>,
        body: Body,
    ) -> Result<Response<Body>, RouterReply> {
        // `http.http2MaxRequests`: a request over the limit gets Envoy's overflow answer.
        let _permit = match &self.requests {
            Some(s) => Some(
                Arc::clone(s)
                    .try_acquire_owned()
                    .map_err(|_| RouterReply::Overflow)?,
            ),
            None => None,
        };
        let attempt = if self.h2 {
            self.send_h2(&headers, body).await
        } else {
            let endpoint = self.address.to_string();
            self.proxy
                .client
                .send_inbound(&endpoint, &headers, body)
                .await
        };
        match attempt {
            upstream::Attempt::Response(r) => Ok(r),
            upstream::Attempt::ConnectFailure | upstream::Attempt::TlsFailure(_) => {
                Err(RouterReply::ConnectFailure)
            }
            upstream::Attempt::ConnectRefused => Err(RouterReply::ConnectRefused),
            upstream::Attempt::ConnectTimeout => Err(RouterReply::ConnectTimeout),
            upstream::Attempt::Timeout => Err(RouterReply::Timeout),
            upstream::Attempt::Reset => Err(RouterReply::Reset),
        }
    }
}

impl InboundHttp {
    async fn send_h2(&self, headers: &[(String, String)], body: Body) -> upstream::Attempt {
        let mut sender = {
            let mut cached = self.h2_sender.lock().await;
            match cached.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => {
                    let source =
                        (!self.address.ip().is_loopback()).then_some(IpAddr::V4(INBOUND_SOURCE));
                    let Ok(tcp) = connect_from(self.address, source).await else {
                        return upstream::Attempt::ConnectFailure;
                    };
                    let Ok((sender, conn)) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        TokioIo::new(tcp),
                    )
                    .await
                    else {
                        return upstream::Attempt::ConnectFailure;
                    };
                    tokio::spawn(conn);
                    *cached = Some(sender.clone());
                    sender
                }
            }
        };
        let endpoint = self.address.to_string();
        let Some(request) = upstream::request(&endpoint, headers, body, true) else {
            return upstream::Attempt::Reset;
        };
        if sender.ready().await.is_err() {
            return upstream::Attempt::Reset;
        }
        match sender.send_request(request).await {
            Ok(r) => upstream::Attempt::Response(r.map(super::body::from_peer)),
            Err(_) => upstream::Attempt::Reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_from_other_protocols_by_the_first_bytes() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a\r\n"), Sniff::Http);
        assert_eq!(sniff(b"POST /x?y HTTP/1.0\r\n"), Sniff::Http);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniff::Http);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HT"), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        // A database handshake, TLS, lower-case words, a line that is not HTTP.
        assert_eq!(sniff(&[0x16, 3, 1, 0, 200]), Sniff::Other);
        assert_eq!(sniff(b"\x00\x00\x00\x08"), Sniff::Other);
        assert_eq!(sniff(b"hello world\r\n"), Sniff::Other);
        assert_eq!(sniff(b"PING\r\n"), Sniff::Other);
        assert_eq!(sniff(b"SET key value\r\n"), Sniff::Other);
    }

    #[test]
    fn an_inbound_port_goes_to_its_default_endpoint_or_the_original_destination() {
        let original: SocketAddr = "10.1.0.5:9080".parse().unwrap_or_else(|_| unreachable!());
        let port = |endpoint: Option<&str>| InboundPort {
            port: 9080,
            endpoint: endpoint.map(str::to_owned),
            ..Default::default()
        };
        let tcp = |w: Option<Workload>| match w {
            Some(Workload::Tcp(a)) => Some(a.to_string()),
            _ => None,
        };
        assert_eq!(
            tcp(workload(None, original)).as_deref(),
            Some("10.1.0.5:9080")
        );
        assert_eq!(
            tcp(workload(Some(&port(None)), original)).as_deref(),
            Some("10.1.0.5:9080")
        );
        assert_eq!(
            tcp(workload(Some(&port(Some("127.0.0.1:8080"))), original)).as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            tcp(workload(Some(&port(Some("0.0.0.0:8081"))), original)).as_deref(),
            Some("10.1.0.5:8081")
        );
        assert_eq!(
            tcp(workload(Some(&port(Some("[::1]:8082"))), original)).as_deref(),
            Some("[::1]:8082")
        );
        assert!(matches!(
            workload(Some(&port(Some("unix:///run/app.sock"))), original),
            Some(Workload::Unix(p)) if p == "/run/app.sock"
        ));
    }
}
