//! Connections routed by the filter's connection-level rules (Gateway TCP and TLS servers).
//!
//! Each connection gets a network-filter context in an instance started with the listener's
//! root id (`meshroute_tcp_<port>`), as Envoy's network wasm filter does: `on_new_connection`
//! decides, naming the cluster and endpoint as filter state (`set_envoy_filter_state`), then
//! every chunk passes `on_downstream_data` / `on_upstream_data` and the close events follow.
//! TLS is terminated (SIMPLE, MUTUAL) or passed through untouched with the SNI read from the
//! ClientHello (PASSTHROUGH).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use meshroute_core::client_hello::{self, Hello, CLIENT_HELLO_LIMIT};
use meshroute_core::contract::{TCP_CLUSTER_STATE, TCP_ENDPOINT_STATE, TCP_IDLE_TIMEOUT_STATE};

use super::generation::{check_failed, with_vm, ClusterInfo, Generation};
use super::http::serve_http;
use super::{ListenerSpec, Proxy};
use meshroute_wasm_host::abi;
use meshroute_wasm_host::vm::{Action, VmError};

use super::access_log::TcpEntry;

/// How a listener's connections reach the filter.
#[derive(Clone, Debug, Default)]
pub struct ConnectionRouting {
    /// Read the SNI from the ClientHello without terminating TLS (PASSTHROUGH servers).
    pub peek_sni: bool,
    /// SNI patterns of servers on the port that terminate TLS, with whether what they
    /// decrypt is HTTP (served as HTTP requests) rather than TCP; an empty pattern list
    /// stands for any name.
    pub terminate: Vec<(Vec<String>, bool)>,
    /// SNI patterns of servers that pass TLS through (empty list: any name).
    pub pass: Vec<Vec<String>>,
}

/// How well `sni` matches `patterns`: exact beats a longer wildcard beats a shorter one
/// beats "any" (an empty list); `None` when it does not match. Envoy's server-name order.
fn sni_rank(patterns: &[String], sni: &str) -> Option<usize> {
    if patterns.is_empty() {
        return Some(0);
    }
    patterns
        .iter()
        .filter_map(|p| match p.strip_prefix('*') {
            None => (p == sni).then_some(usize::MAX),
            Some(suffix) => {
                (sni.len() > suffix.len() && sni.ends_with(suffix)).then_some(suffix.len() + 1)
            }
        })
        .max()
}

/// What to do with a TLS connection given its SNI: terminate (and whether it is HTTP), or
/// pass it through; `None` when no server takes the name.
fn tls_choice(routing: &ConnectionRouting, sni: &str) -> Option<Option<bool>> {
    let terminate = routing
        .terminate
        .iter()
        .filter_map(|(p, http)| sni_rank(p, sni).map(|r| (r, *http)))
        .max_by_key(|(r, _)| *r);
    let pass = routing.pass.iter().filter_map(|p| sni_rank(p, sni)).max();
    match (terminate, pass) {
        (Some((t, http)), Some(p)) if t > p => Some(Some(http)),
        (_, Some(_)) => Some(None),
        (Some((_, http)), None) => Some(Some(http)),
        (None, None) => None,
    }
}

/// A stream whose first bytes were already read: they are replayed before the rest.
pub(super) struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub(super) fn new(head: Vec<u8>, inner: S) -> Self {
        Self { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Envoy's TCP proxy closes a connection idle this long unless told otherwise (Istio's
/// `tcp.idleTimeout` default is the same hour).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's tls_inspector gives a client this long to send its ClientHello.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(15);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Reads until the ClientHello's SNI is known (after the bytes already read, `buf`); returns
/// it with all the bytes read.
async fn peek_client_hello(stream: &mut TcpStream, mut buf: Vec<u8>) -> Option<(String, Vec<u8>)> {
    let read = async {
        loop {
            match client_hello::sni(&buf) {
                Hello::Sni(s) => return Some(s),
                Hello::NoSni => return Some(String::new()),
                Hello::NeedMore if buf.len() >= CLIENT_HELLO_LIMIT => return Some(String::new()),
                Hello::NeedMore => {}
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let sni = tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read)
        .await
        .ok()??;
    Some((sni, buf))
}

/// Where the filter sent the connection.
fn target<'g>(
    generation: &'g Generation,
    state: &[(String, String)],
) -> Result<(String, &'g ClusterInfo), String> {
    let get = |k: &str| state.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let name = get(TCP_CLUSTER_STATE).ok_or("the filter named no cluster")?;
    let cluster = generation
        .clusters
        .get(&name)
        .ok_or_else(|| format!("cluster {name} does not exist"))?;
    let endpoint = cluster
        .endpoint(get(TCP_ENDPOINT_STATE))
        .ok_or_else(|| format!("no endpoint of {name} to connect to"))?;
    Ok((endpoint, cluster))
}

async fn connect(endpoint: &str, cluster: &ClusterInfo) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::time::timeout(cluster.pool.connect_timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| format!("connect to {endpoint} timed out"))?
        .map_err(|e| format!("connect to {endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if let Some(k) = &cluster.pool.keepalive {
        super::upstream::set_keepalive(&tcp, k);
    }
    match &cluster.tls {
        None => Ok(Box::new(tcp)),
        Some(origination) => {
            let name = origination
                .sni
                .clone()
                .unwrap_or_else(|| cluster.service.clone());
            let stream = super::tls::connect(origination, &name, tcp)
                .await
                .map_err(|e| format!("TLS to {endpoint}: {e}"))?;
            Ok(Box::new(stream))
        }
    }
}

/// Serves one accepted connection to its end. `head`: bytes already read from it (a
/// transparent listener's protocol sniffing).
pub(super) async fn serve_connection(
    proxy: Arc<Proxy>,
    spec: ListenerSpec,
    mut stream: TcpStream,
    peer: SocketAddr,
    connection_id: u64,
    head: Vec<u8>,
) {
    // A captured connection's destination is where the client sent it.
    let local = spec.original_destination.or(stream.local_addr().ok());
    let routing = spec.connections.clone().unwrap_or_default();
    // Passthrough ports read the ClientHello first: its SNI picks the server, which either
    // passes the bytes on untouched or terminates TLS here.
    let (mut peeked, mut head) = (None, head);
    if routing.peek_sni {
        let Some((sni, bytes)) = peek_client_hello(&mut stream, std::mem::take(&mut head)).await
        else {
            return;
        };
        let choice = if bytes.first() == Some(&0x16) {
            tls_choice(&routing, &sni)
        } else {
            // Plain bytes on a passthrough port: the filter's routes decide.
            Some(None)
        };
        match choice {
            None => {
                tracing::debug!(
                    "no server on port {} takes SNI {sni:?}; closing",
                    spec.server_port
                );
                return;
            }
            Some(None) => peeked = Some(sni),
            Some(Some(_)) => {}
        }
        head = bytes;
    }
    let (down, sni, initial): (Box<dyn Io>, String, Vec<u8>) = match (peeked, &spec.tls) {
        (Some(sni), _) => (Box::new(stream), sni, head),
        (None, Some(config)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
            // A failed handshake (no or untrusted client certificate for MUTUAL) only closes
            // this connection.
            let replay = Replay::new(head, stream);
            let tls = match acceptor.accept(replay).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(
                        "TLS handshake from {peer} on port {}: {e}",
                        spec.server_port
                    );
                    return;
                }
            };
            let sni = tls
                .get_ref()
                .1
                .server_name()
                .unwrap_or_default()
                .to_ascii_lowercase();
            // A terminating HTTPS server on the port: its requests go to the HTTP filter.
            if tls_choice(&routing, &sni) == Some(Some(true)) {
                serve_http(proxy, spec, tls, peer, local, connection_id, true).await;
                return;
            }
            (Box::new(tls), sni, Vec::new())
        }
        (None, None) => (Box::new(stream), String::new(), head),
    };
    let generation = proxy.current();
    let Some(&root) = generation.l4_roots.get(&spec.server_port) else {
        return;
    };
    let index = generation.next_slot.fetch_add(1, Ordering::Relaxed) % generation.slots.len();
    // A failed instance (reloaded first under the reload policy) routes nothing: closed.
    if check_failed(&proxy, &generation, index).is_some() {
        return;
    }
    let opened = with_vm(&proxy, &generation, index, |vm| {
        let mut s = abi::Stream::new(Vec::new());
        s.source = peer.to_string();
        s.destination = local.map(|a| a.to_string()).unwrap_or_default();
        s.destination_port = spec.server_port;
        s.connection_id = connection_id;
        s.requested_server_name = sni.clone();
        let id = vm.open_stream_in(root, s)?;
        let action = vm.on_new_connection(id)?;
        let s = vm.stream_mut(id).ok_or(VmError::NoContext(id))?;
        let close = s.close_connection || action == Action::Pause;
        Ok((id, close, std::mem::take(&mut s.filter_state)))
    });
    let Some((id, close, state)) = opened else {
        return;
    };
    let started = std::time::Instant::now();
    let cluster_name = state
        .iter()
        .find(|(k, _)| k == TCP_CLUSTER_STATE)
        .map_or_else(String::new, |(_, v)| v.clone());
    let log = |flags: &str, endpoint: &str, received: u64, sent: u64| {
        if !cluster_name.is_empty() {
            proxy.stats.tcp_closed(&cluster_name, flags, received, sent);
        }
        proxy.access_log.tcp(&TcpEntry {
            cluster: &cluster_name,
            endpoint,
            flags,
            received,
            sent,
            duration: started.elapsed(),
            sni: &sni,
        });
    };
    // Both close events run, and a trap in either fails the instance as any other does.
    let finish = |remote_down: bool| {
        with_vm(&proxy, &generation, index, |vm| {
            let downstream = vm.on_connection_close(id, true, remote_down);
            let upstream = vm.on_connection_close(id, false, !remote_down);
            let closed = vm.close_stream(id);
            downstream.and(upstream).and(closed)
        });
    };
    if close {
        log("NR", "", 0, 0);
        finish(false);
        return;
    }
    let mut permit = None;
    let mut chosen = String::new();
    let up = match target(&generation, &state) {
        Ok((endpoint, cluster)) => {
            chosen.clone_from(&endpoint);
            // `tcp.maxConnections`: a connection over the limit is closed at once, as
            // Envoy's TCP proxy does on a cluster overflow.
            match &cluster.connections {
                Some(pool) => match Arc::clone(pool).try_acquire_owned() {
                    Ok(p) => {
                        permit = Some(p);
                        connect(&endpoint, cluster).await.map_err(|e| (e, "UF"))
                    }
                    Err(_) => Err((format!("{endpoint}: maxConnections reached"), "UO")),
                },
                None => connect(&endpoint, cluster).await.map_err(|e| (e, "UF")),
            }
        }
        Err(e) => Err((e, "NC")),
    };
    let up = match up {
        Ok(u) => u,
        Err((e, flag)) => {
            tracing::debug!(
                "connection {connection_id} on port {}: {e}",
                spec.server_port
            );
            log(flag, &chosen, 0, 0);
            finish(false);
            return;
        }
    };
    proxy.stats.tcp_opened(&cluster_name);
    let idle = match state
        .iter()
        .find(|(k, _)| k == TCP_IDLE_TIMEOUT_STATE)
        .and_then(|(_, v)| v.parse::<u64>().ok())
    {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    };
    let (remote_closed, received, sent) =
        relay((&proxy, &generation, index), id, down, up, initial, idle).await;
    drop(permit);
    log("", &chosen, received, sent);
    finish(remote_closed);
}

/// Copies both ways through the filter's data callbacks until both sides are done or the
/// filter closes the connection. Returns whether the client ended it, and the bytes received
/// from the client and sent to it.
async fn relay(
    (proxy, generation, index): (&Arc<Proxy>, &Arc<Generation>, usize),
    id: u32,
    down: Box<dyn Io>,
    up: Box<dyn Io>,
    initial: Vec<u8>,
    idle: Option<Duration>,
) -> (bool, u64, u64) {
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    // The filter sees each chunk and may rewrite it; `None` means close now.
    let through = |downstream: bool, data: Vec<u8>, eos: bool| -> Option<Vec<u8>> {
        with_vm(proxy, generation, index, |vm| {
            let s = vm.stream_mut(id).ok_or(VmError::NoContext(id))?;
            if downstream {
                s.downstream_data = data;
            } else {
                s.upstream_data = data;
            }
            vm.on_data(id, downstream, eos)?;
            let s = vm.stream_mut(id).ok_or(VmError::NoContext(id))?;
            Ok((!s.close_connection).then(|| {
                std::mem::take(if downstream {
                    &mut s.downstream_data
                } else {
                    &mut s.upstream_data
                })
            }))
        })
        .flatten()
    };
    let (mut received, mut sent) = (initial.len() as u64, 0u64);
    if !initial.is_empty() {
        match through(true, initial, false) {
            Some(data) => {
                if uw.write_all(&data).await.is_err() {
                    return (false, received, sent);
                }
            }
            None => return (false, received, sent),
        }
    }
    let (mut down_open, mut up_open) = (true, true);
    let (mut dbuf, mut ubuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut client_ended = false;
    let mut idle_until = idle.map(|d| tokio::time::Instant::now() + d);
    while down_open || up_open {
        // Idle means no bytes either way for the whole timeout: then both sides close.
        let expired = async {
            match idle_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = expired => break,
            r = dr.read(&mut dbuf), if down_open => {
                let n = r.unwrap_or(0);
                received += n as u64;
                idle_until = idle.map(|d| tokio::time::Instant::now() + d);
                let eos = n == 0;
                let Some(data) = through(true, dbuf[..n].to_vec(), eos) else { break };
                if !data.is_empty() && uw.write_all(&data).await.is_err() {
                    break;
                }
                if eos {
                    down_open = false;
                    client_ended = true;
                    let _ = uw.shutdown().await;
                }
            }
            r = ur.read(&mut ubuf), if up_open => {
                let n = r.unwrap_or(0);
                idle_until = idle.map(|d| tokio::time::Instant::now() + d);
                let eos = n == 0;
                let Some(data) = through(false, ubuf[..n].to_vec(), eos) else { break };
                sent += data.len() as u64;
                if !data.is_empty() && dw.write_all(&data).await.is_err() {
                    break;
                }
                if eos {
                    up_open = false;
                    let _ = dw.shutdown().await;
                }
            }
        }
    }
    (client_ended, received, sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn the_most_specific_server_takes_the_sni() {
        let routing = ConnectionRouting {
            peek_sni: true,
            terminate: vec![
                (vec!["secure.example.com".into()], true),
                (vec!["*.db.example.com".into()], false),
            ],
            pass: vec![vec!["*.example.com".into()]],
        };
        assert_eq!(tls_choice(&routing, "secure.example.com"), Some(Some(true)));
        assert_eq!(tls_choice(&routing, "a.db.example.com"), Some(Some(false)));
        assert_eq!(tls_choice(&routing, "other.example.com"), Some(None));
        assert_eq!(tls_choice(&routing, "example.org"), None);
        let any = ConnectionRouting {
            pass: vec![Vec::new()],
            ..routing
        };
        assert_eq!(tls_choice(&any, "example.org"), Some(None));
        assert_eq!(tls_choice(&any, "secure.example.com"), Some(Some(true)));
    }

    #[test]
    fn reads_the_sni_of_a_client_hello_and_waits_for_all_of_it() {
        let h = hello("Db.Example.com");
        assert_eq!(client_hello::sni(&h), Hello::Sni("db.example.com".into()));
        assert_eq!(client_hello::sni(&h[..h.len() - 1]), Hello::NeedMore);
        assert_eq!(client_hello::sni(&h[..3]), Hello::NeedMore);
        assert_eq!(client_hello::sni(b"GET / HTTP/1.1\r\n"), Hello::NoSni);
        assert_eq!(client_hello::sni(&[]), Hello::NeedMore);
    }

    /// The same ClientHello cut into two handshake records, as clients with large
    /// extensions send it.
    #[test]
    fn reads_the_sni_of_a_client_hello_split_across_records() {
        let h = hello("split.example.com");
        let message = &h[5..];
        let cut = message.len() / 3;
        let mut split = Vec::new();
        for part in [&message[..cut], &message[cut..]] {
            split.extend_from_slice(&[0x16, 3, 1]);
            split.extend_from_slice(&u16::try_from(part.len()).unwrap_or(0).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            client_hello::sni(&split),
            Hello::Sni("split.example.com".into())
        );
        let first_record = 5 + cut;
        assert_eq!(client_hello::sni(&split[..first_record]), Hello::NeedMore);
        assert_eq!(
            client_hello::sni(&split[..first_record + 3]),
            Hello::NeedMore
        );
    }

    #[test]
    fn a_client_hello_without_sni_or_garbled_has_none() {
        let h = hello("10.0.0.1");
        assert_eq!(client_hello::sni(&h), Hello::NoSni);
        let mut junk = vec![0x16, 3, 1, 0, 8];
        junk.extend_from_slice(&[1, 0, 0, 4, 3, 3, 0, 0]);
        assert_eq!(client_hello::sni(&junk), Hello::NoSni);
    }
}
