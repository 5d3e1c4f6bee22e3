//! `meshroute run`: listeners, the filter on every request, and the host contract executed
//! natively (cluster header, original-destination header, Envoy timeout and retry headers,
//! local replies, side calls, timers).
//!
//! - [`generation`]: one loaded configuration: its clusters and filter instances, and running
//!   callbacks on them;
//! - [`http`]: serving HTTP on a listener, each request through the filter;
//! - [`router`]: Envoy's router as the filter's contract asks for it (cluster, endpoint,
//!   timeouts, retries) and side calls;
//! - [`l4`]: connections routed by the filter's connection-level rules;
//! - [`access_log`], [`admin`], [`tls`], [`upstream`], [`launch`].

pub mod access_log;
pub mod admin;
mod body;
pub mod capture;
mod client_auth;
mod deadline;
pub mod demo;
mod generation;
mod http;
mod l4;
pub mod launch;
mod router;
pub mod tls;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;

use meshroute_core::ir::{ProxyKind, RulesDocument};

use meshroute_wasm_host::abi::LocalReply;
use meshroute_wasm_host::vm::{Plugin, VmError};

pub use generation::Generation;

/// Why a proxy could not start, or new rules could not be swapped in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration does not compile; the diagnostics, a line each.
    #[error("{0}")]
    Compile(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("connection filter for port {port}: {source}")]
    ConnectionFilter { port: u16, source: VmError },
    #[error("cannot serialize rules: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("gateway port {port}: {source}")]
    GatewayTls { port: u16, source: tls::TlsError },
    #[error("cluster {cluster}: tls: {source}")]
    ClusterTls {
        cluster: String,
        source: tls::TlsError,
    },
    #[error("port {port} + offset {offset} exceeds 65535")]
    PortRange { port: u16, offset: u16 },
    #[error("no Gateway server selects this proxy")]
    NoServer,
    #[error("{what}listen on {address}: {source}")]
    Listen {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("access log {path}: {source}")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
    #[error("a listener stopped")]
    ListenerStopped,
    #[error("the proxy kind cannot change on reload")]
    KindChanged,
    #[error("transparent capture is for sidecars: a gateway serves its Gateway server ports")]
    CaptureNeedsSidecar,
    #[error("cannot handle signals: {source}")]
    Signal { source: std::io::Error },
}
use generation::{cluster_check, cluster_table, spawn_ticker, start_instance, Slot};
pub use http::{bind, serve, serve_shared, SharedSpec};

pub type Body = BoxBody<Bytes, body::BodyError>;

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
    /// Where the client sent the connection, for connections a transparent listener
    /// captured: routing reads it, and the PassthroughCluster connects to it.
    pub original_destination: Option<SocketAddr>,
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
    /// Access log (`--access-log`), one line per request and connection.
    pub access_log: access_log::AccessLog,
    connection_ids: AtomicU64,
    client: upstream::Client,
    lifecycle: Arc<Lifecycle>,
}

/// Start-up and shutdown as a pod sees them: `/ready` answers 200 only between the moment
/// every listener and the rules are live and the start of the drain.
pub struct Lifecycle {
    started: std::time::Instant,
    ready: AtomicBool,
    /// `/healthcheck/fail`: out of rotation, still serving.
    health_failed: AtomicBool,
    drain: tokio::sync::watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// One connection being served: the drain waits for these.
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
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
    ) -> Result<Arc<Self>, Error> {
        let kind = doc.proxy.kind;
        let stats = admin::Stats::default();
        stats.set_workload(admin::proxy_workload(&doc.proxy));
        let generation = Self::generation(&plugin, workers, doc, sources, credentials.as_deref())?;
        Ok(Arc::new(Self {
            credentials,
            plugin,
            kind,
            fail_policy,
            workers,
            generation: RwLock::new(Arc::new(generation)),
            stats,
            reload_error: Mutex::new(None),
            connection_ids: AtomicU64::new(1),
            access_log: access_log::AccessLog::default(),
            client: upstream::Client::new(),
            lifecycle: Arc::new(Lifecycle {
                started: std::time::Instant::now(),
                ready: AtomicBool::new(false),
                health_failed: AtomicBool::new(false),
                drain: tokio::sync::watch::channel(false).0,
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }))
    }

    /// Every listener is bound and the rules are loaded.
    pub fn set_ready(&self) {
        self.lifecycle.ready.store(true, Ordering::Release);
    }

    /// Live, not draining and not failed by `/healthcheck/fail` (`/ready`).
    pub fn is_ready(&self) -> bool {
        self.lifecycle.ready.load(Ordering::Acquire)
            && !*self.lifecycle.drain.borrow()
            && !self.lifecycle.health_failed.load(Ordering::Acquire)
    }

    /// Every listener is bound and the rules are loaded (whatever the drain or health).
    pub fn started_up(&self) -> bool {
        self.lifecycle.ready.load(Ordering::Acquire)
    }

    /// `/healthcheck/fail` and `/healthcheck/ok`.
    pub fn set_health_failed(&self, failed: bool) {
        self.lifecycle
            .health_failed
            .store(failed, Ordering::Release);
    }

    /// Time since the proxy started.
    pub fn uptime(&self) -> Duration {
        self.lifecycle.started.elapsed()
    }

    /// Starts the drain (SIGTERM, `/quitquitquit`): readiness fails, listeners that drain
    /// stop accepting, HTTP connections close once their requests are answered.
    pub fn start_drain(&self) {
        self.lifecycle.drain.send_replace(true);
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.lifecycle.drain.borrow()
    }

    /// Resolves once the drain has started.
    pub fn draining(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.lifecycle.drain.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Counts a connection as in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.lifecycle.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(&self.lifecycle))
    }

    /// Waits until no connection is in flight, or `within` has passed; whether all ended.
    pub async fn drained(&self, within: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.lifecycle.idle.notified();
                if self.lifecycle.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    fn generation(
        plugin: &Plugin,
        workers: usize,
        doc: RulesDocument,
        sources: Vec<PathBuf>,
        credentials: Option<&std::path::Path>,
    ) -> Result<Generation, Error> {
        let rules_json = serde_json::to_vec(&doc)?;
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
                ticking: AtomicBool::new(false),
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
    ) -> Result<(), Error> {
        let workload = admin::proxy_workload(&doc.proxy);
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
        self.stats.set_workload(workload);
        Ok(())
    }

    /// The workload labels of `endpoint` (`ip:port`) of `cluster`, from the rules in force.
    pub fn endpoint_labels(
        &self,
        cluster: &str,
        endpoint: &str,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let generation = self.current();
        let c = generation.doc.clusters.iter().find(|c| c.name == cluster)?;
        c.endpoints
            .iter()
            .find(|e| {
                endpoint.rsplit_once(':').is_some_and(|(a, p)| {
                    a.trim_matches(['[', ']']) == e.address && p == e.port.to_string()
                })
            })
            .map(|e| e.labels.clone())
    }

    /// Starts the tick loops of the current generation.
    pub fn start_tickers(self: &Arc<Self>) {
        let generation = self.current();
        for i in 0..generation.slots.len() {
            spawn_ticker(Arc::clone(self), Arc::clone(&generation), i);
        }
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
        details: None,
    }
}
