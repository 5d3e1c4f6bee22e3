//! Admin listener: `/ready`, `/healthz`, `/config_dump`, `/clusters`, `/stats/prometheus`
//! with Istio's standard request metrics.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshroute_core::engine::{cluster_health, Engine};
use meshroute_core::ir::RulesDocument;
use meshroute_core::telemetry::{self, PeerLabels};
pub use meshroute_core::telemetry::{request_protocol, Workload};

use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{full, Body, Proxy};

/// The `@type` of meshroute's entry in `/config_dump`.
const CONFIG_DUMP_TYPE: &str = "type.googleapis.com/meshroute.admin.v1.RulesConfigDump";

/// What `/` and `/help` list.
const ADMIN_INDEX: &str = "\
admin commands are:
  /                     this list (also /help)
  /ready                200 LIVE once every listener and the rules are live; 503 while starting, draining or failed
  /healthz/ready        the same, as Istio's agent answers it on its status port
  /healthz              200 while the process serves its admin port
  /server_info          version, state (PRE_INITIALIZING, LIVE, DRAINING) and uptime
  /stats                the same metrics as Envoy's /stats lists them (NAME: VALUE, Istio's
                        tagged names); ?filter=REGEX, ?format=json
  /stats/prometheus     Istio's standard metrics and meshroute's own
  /config_dump          the rules in force, their files and the last reload error
  /clusters             clusters, endpoints and outlier ejections
  /logging              the loggers (meshroute, filter) and their levels; POST ?level=L or
                        ?paths=filter:L,meshroute:L sets them
  /healthcheck/fail     POST: fail readiness until /healthcheck/ok
  /healthcheck/ok       POST: pass readiness again
  /quitquitquit         POST: drain and exit (as SIGTERM)
  /drain_listeners      POST: the same drain
";

/// A histogram whose observations are atomic adds: recording takes no lock.
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (cumulative, as Prometheus' buckets).
    buckets: Box<[AtomicU64]>,
    /// The sum of observations, in thousandths of their unit.
    sum_milli: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_milli: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        self.sum_milli
            .fetch_add((value * 1000.0) as u64, Ordering::Relaxed);
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            if value <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    fn sum(&self) -> f64 {
        self.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// One request series: Istio's counter and its three histograms.
struct Series {
    count: AtomicU64,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            duration_ms: Histogram::new(telemetry::DURATION_BUCKETS),
            request_bytes: Histogram::new(telemetry::BYTE_BUCKETS),
            response_bytes: Histogram::new(telemetry::BYTE_BUCKETS),
        }
    }
}

/// The labels of a request's series that do not depend on its outcome, then response
/// code, response flags, protocol, gRPC status.
type SeriesKey = (Arc<PeerLabels>, u16, Box<str>, &'static str, Box<str>);

fn same_series(
    k: &SeriesKey,
    peer: &Arc<PeerLabels>,
    code: u16,
    flags: &str,
    protocol: &str,
    grpc: &str,
) -> bool {
    Arc::ptr_eq(&k.0, peer) && k.1 == code && *k.2 == *flags && k.3 == protocol && *k.4 == *grpc
}

/// Handles a worker thread has used, by (stats instance, hash of the series key).
type Handles = HashMap<(u64, u64), Vec<(SeriesKey, Arc<Series>)>>;

thread_local! {
    /// This worker's series handles: after a series' first request on a thread, recording
    /// into it is a thread-local look-up and atomic adds, with no shared lock.
    static HANDLES: std::cell::RefCell<Handles> = std::cell::RefCell::new(HashMap::new());
}

/// Tells the thread-local handles of one [`Stats`] from another's (tests make many).
static NEXT_STATS_ID: AtomicU64 = AtomicU64::new(0);

/// What a finished request measured.
pub struct Measured {
    pub elapsed: Duration,
    /// Headers and body, as Envoy's `request.total_size` / `response.total_size`.
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Request metrics keyed by their labels.
pub struct Stats {
    id: u64,
    /// Every series, for scrapes and for a worker's first use of one.
    series: Mutex<BTreeMap<SeriesKey, Arc<Series>>>,
    vm_failures: AtomicU64,
    vm_reloads: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
    connection_overflows: AtomicU64,
    tcp: Mutex<BTreeMap<TcpKey, TcpSeries>>,
    /// The proxy's own workload (`None`: unknown).
    me: std::sync::RwLock<Option<Workload>>,
    /// Outcome-independent labels by cluster and endpoint, built once each.
    peers: Mutex<HashMap<String, HashMap<String, Arc<PeerLabels>>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            id: NEXT_STATS_ID.fetch_add(1, Ordering::Relaxed),
            series: Mutex::default(),
            vm_failures: AtomicU64::default(),
            vm_reloads: AtomicU64::default(),
            config_reloads: AtomicU64::default(),
            config_reload_failures: AtomicU64::default(),
            connection_overflows: AtomicU64::default(),
            tcp: Mutex::default(),
            me: std::sync::RwLock::default(),
            peers: Mutex::default(),
        }
    }
}

/// Outcome-independent labels, response flags.
type TcpKey = (Arc<PeerLabels>, String);

#[derive(Default)]
struct TcpSeries {
    opened: u64,
    closed: u64,
    received: u64,
    sent: u64,
}

/// One histogram series in Prometheus' text format.
fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram, count: u64) {
    for (b, n) in h.bounds.iter().zip(h.counts()) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum());
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

/// The proxy's own workload, from its rules' identity and the agent's environment
/// (`ISTIO_META_WORKLOAD_NAME`, `ISTIO_META_CLUSTER_ID`).
pub fn proxy_workload(identity: &meshroute_core::ir::ProxyIdentity) -> Workload {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Workload::from_labels(
        &identity.labels,
        &identity.namespace,
        env("ISTIO_META_WORKLOAD_NAME").as_deref(),
        &env("ISTIO_META_CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
    )
}

/// A metric sample as `/stats` lists it.
enum Sample {
    Counter(u64),
    Histogram {
        bounds: &'static [f64],
        counts: Vec<u64>,
        count: u64,
    },
}

/// Envoy's quantiles of a histogram line in `/stats`.
const QUANTILES: [(&str, f64); 10] = [
    ("P0", 0.0),
    ("P25", 0.25),
    ("P50", 0.5),
    ("P75", 0.75),
    ("P90", 0.9),
    ("P95", 0.95),
    ("P99", 0.99),
    ("P99.5", 0.995),
    ("P99.9", 0.999),
    ("P100", 1.0),
];

impl Sample {
    /// The value as Envoy's `/stats` writes it; a histogram's quantiles are interpolated
    /// within its (cumulative) buckets.
    fn text(&self) -> String {
        let (bounds, counts, count) = match self {
            Self::Counter(v) => return v.to_string(),
            Self::Histogram {
                bounds,
                counts,
                count,
            } => (bounds, counts, *count),
        };
        if count == 0 {
            return "No recorded values".into();
        }
        let quantile = |q: f64| {
            let rank = q * count as f64;
            let (mut lower, mut below) = (0.0, 0u64);
            for (bound, at) in bounds.iter().zip(counts) {
                if (*at as f64) >= rank && *at > below {
                    let within = (rank - below as f64) / (*at - below) as f64;
                    return lower + (bound - lower) * within.clamp(0.0, 1.0);
                }
                (lower, below) = (*bound, *at);
            }
            lower
        };
        QUANTILES
            .iter()
            .map(|(name, q)| format!("{name}(nan,{})", quantile(*q)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Envoy's `/stats`: `NAME: VALUE` lines, or `{"stats":[{"name","value"}]}` with
/// `format=json`; `filter=REGEX` keeps the names it matches.
fn envoy_stats(stats: &Stats, query: &str) -> Result<(&'static str, String), String> {
    let mut filter = None;
    let mut json = false;
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "filter" => {
                let pattern = meshroute_core::engine::percent_decode(value);
                filter =
                    Some(regex::Regex::new(&pattern).map_err(|e| format!("Invalid regex: {e}"))?);
            }
            "format" if value == "json" => json = true,
            "format" if value == "text" => json = false,
            "format" => return Err(format!("unsupported format {value}")),
            _ => {}
        }
    }
    let samples = stats
        .samples()
        .into_iter()
        .filter(|(name, _)| filter.as_ref().is_none_or(|f| f.is_match(name)));
    if json {
        let stats: Vec<serde_json::Value> = samples
            .map(|(name, s)| match s {
                Sample::Counter(v) => serde_json::json!({"name": name, "value": v}),
                h => serde_json::json!({"name": name, "value": h.text()}),
            })
            .collect();
        return Ok((
            "application/json",
            serde_json::json!({ "stats": stats }).to_string(),
        ));
    }
    let mut out = String::new();
    for (name, s) in samples {
        let _ = writeln!(out, "{name}: {}", s.text());
    }
    Ok(("text/plain", out))
}

impl Stats {
    /// The proxy's own workload, whose labels the series carry from now on.
    pub fn set_workload(&self, me: Workload) {
        if let Ok(mut w) = self.me.write() {
            *w = Some(me);
        }
        if let Ok(mut p) = self.peers.lock() {
            p.clear();
        }
    }

    /// The outcome-independent labels of traffic to `cluster` answered by `endpoint`
    /// (whose workload labels `endpoint_labels` finds, the first time only).
    pub fn peer(
        &self,
        cluster: &str,
        endpoint: &str,
        endpoint_labels: impl FnOnce() -> Option<BTreeMap<String, String>>,
    ) -> Arc<PeerLabels> {
        if let Ok(p) = self.peers.lock() {
            if let Some(l) = p.get(cluster).and_then(|e| e.get(endpoint)) {
                return Arc::clone(l);
            }
        }
        let me = self
            .me
            .read()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_else(Workload::unknown);
        let destination = match telemetry::cluster_parts(cluster).0 {
            "destination" => None,
            _ => endpoint_labels(),
        };
        let labels = Arc::new(PeerLabels::new(cluster, &me, destination.as_ref()));
        if let Ok(mut p) = self.peers.lock() {
            p.entry(cluster.to_owned())
                .or_default()
                .insert(endpoint.to_owned(), Arc::clone(&labels));
        }
        labels
    }

    /// A proxied connection opened to `cluster`.
    pub fn tcp_opened(&self, cluster: &str) {
        let peer = self.peer(cluster, "", || None);
        if let Ok(mut t) = self.tcp.lock() {
            t.entry((peer, "-".to_owned())).or_default().opened += 1;
        }
    }

    /// A connection to `cluster` ended: bytes received from the client and sent to it.
    pub fn tcp_closed(&self, cluster: &str, flags: &str, received: u64, sent: u64) {
        let peer = self.peer(cluster, "", || None);
        let flags = if flags.is_empty() { "-" } else { flags };
        if let Ok(mut t) = self.tcp.lock() {
            let e = t.entry((peer, flags.to_owned())).or_default();
            e.closed += 1;
            e.received += received;
            e.sent += sent;
        }
    }

    /// This worker's handle on a series, registered on its first use by any worker.
    fn series(
        &self,
        peer: &Arc<PeerLabels>,
        code: u16,
        flags: &str,
        protocol: &'static str,
        grpc: &str,
    ) -> Arc<Series> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (Arc::as_ptr(peer) as usize, code, flags, protocol, grpc).hash(&mut hasher);
        let slot = (self.id, hasher.finish());
        let cached = HANDLES.with(|h| {
            h.borrow().get(&slot).and_then(|keys| {
                keys.iter()
                    .find(|(k, _)| same_series(k, peer, code, flags, protocol, grpc))
                    .map(|(_, s)| Arc::clone(s))
            })
        });
        if let Some(s) = cached {
            return s;
        }
        let key: SeriesKey = (Arc::clone(peer), code, flags.into(), protocol, grpc.into());
        let series = match self.series.lock() {
            Ok(mut all) => Arc::clone(
                all.entry(key.clone())
                    .or_insert_with(|| Arc::new(Series::new())),
            ),
            Err(_) => Arc::new(Series::new()),
        };
        HANDLES.with(|h| {
            h.borrow_mut()
                .entry(slot)
                .or_default()
                .push((key, Arc::clone(&series)));
        });
        series
    }

    /// A finished request: its peer labels ([`Stats::peer`]), response code, protocol and
    /// gRPC status, response flags and measurements.
    pub fn record(
        &self,
        peer: Arc<PeerLabels>,
        (code, protocol, grpc_status): (u16, &'static str, &str),
        flags: &str,
        m: &Measured,
    ) {
        let flags = if flags.is_empty() { "-" } else { flags };
        let s = self.series(&peer, code, flags, protocol, grpc_status);
        s.count.fetch_add(1, Ordering::Relaxed);
        s.duration_ms.observe(m.elapsed.as_secs_f64() * 1000.0);
        s.request_bytes.observe(m.request_bytes as f64);
        s.response_bytes.observe(m.response_bytes as f64);
    }

    pub fn vm_failure(&self) {
        self.vm_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_overflow(&self) {
        self.connection_overflows.fetch_add(1, Ordering::Relaxed);
    }

    pub fn vm_reload(&self) {
        self.vm_reloads.fetch_add(1, Ordering::Relaxed);
    }

    fn own_counters(&self) -> [(&'static str, u64); 5] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("meshroute_wasm_failures_total", v(&self.vm_failures)),
            ("meshroute_wasm_reloads_total", v(&self.vm_reloads)),
            ("meshroute_config_reloads_total", v(&self.config_reloads)),
            (
                "meshroute_config_reload_failures_total",
                v(&self.config_reload_failures),
            ),
            (
                "meshroute_downstream_connections_refused_total",
                v(&self.connection_overflows),
            ),
        ]
    }

    /// Every sample as Envoy's `/stats` names it: Istio's series under their tagged stat
    /// names (`reporter=.=source;.;…;.;istio_requests_total`), meshroute's own plainly.
    fn samples(&self) -> Vec<(String, Sample)> {
        let mut out = Vec::new();
        if let Ok(series) = self.series.lock() {
            for ((peer, code, flags, protocol, grpc), s) in series.iter() {
                let code = code.to_string();
                let name = |metric| {
                    telemetry::envoy_stat_name(
                        metric,
                        peer.request_labels(protocol, &code, grpc, flags),
                    )
                };
                let count = s.count.load(Ordering::Relaxed);
                out.push((name(telemetry::REQUESTS_TOTAL), Sample::Counter(count)));
                for (metric, h) in [
                    (telemetry::REQUEST_DURATION, &s.duration_ms),
                    (telemetry::REQUEST_BYTES, &s.request_bytes),
                    (telemetry::RESPONSE_BYTES, &s.response_bytes),
                ] {
                    let counts = h.counts();
                    out.push((
                        name(metric),
                        Sample::Histogram {
                            bounds: h.bounds,
                            counts,
                            count,
                        },
                    ));
                }
            }
        }
        if let Ok(tcp) = self.tcp.lock() {
            for ((peer, flags), s) in tcp.iter() {
                for (metric, v) in [
                    (telemetry::TCP_OPENED, s.opened),
                    (telemetry::TCP_CLOSED, s.closed),
                    (telemetry::TCP_RECEIVED_BYTES, s.received),
                    (telemetry::TCP_SENT_BYTES, s.sent),
                ] {
                    let name = telemetry::envoy_stat_name(metric, peer.tcp_labels(flags));
                    out.push((name, Sample::Counter(v)));
                }
            }
        }
        for (name, v) in self.own_counters() {
            out.push((name.to_owned(), Sample::Counter(v)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Istio's standard metrics: a sidecar's outbound traffic and a gateway's as the client
    /// side reports them (`reporter="source"`), a transparent sidecar's inbound traffic as
    /// the server side does (`reporter="destination"`).
    fn prometheus(&self) -> String {
        let mut out = String::new();
        let Ok(series) = self.series.lock() else {
            return out;
        };
        let labels: Vec<String> = series
            .keys()
            .map(|(peer, code, flags, protocol, grpc)| {
                telemetry::prometheus_labels(peer.request_labels(
                    protocol,
                    &code.to_string(),
                    grpc,
                    flags,
                ))
            })
            .collect();
        let _ = writeln!(out, "# TYPE {} counter", telemetry::REQUESTS_TOTAL);
        for (l, s) in labels.iter().zip(series.values()) {
            let _ = writeln!(
                out,
                "{}{{{l}}} {}",
                telemetry::REQUESTS_TOTAL,
                s.count.load(Ordering::Relaxed)
            );
        }
        type Field = fn(&Series) -> &Histogram;
        let histograms: [(&str, Field); 3] = [
            (telemetry::REQUEST_DURATION, |s| &s.duration_ms),
            (telemetry::REQUEST_BYTES, |s| &s.request_bytes),
            (telemetry::RESPONSE_BYTES, |s| &s.response_bytes),
        ];
        for (name, field) in histograms {
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (l, s) in labels.iter().zip(series.values()) {
                histogram(&mut out, name, l, field(s), s.count.load(Ordering::Relaxed));
            }
        }
        drop(series);
        for (name, v) in self.own_counters() {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
        }
        if let Ok(tcp) = self.tcp.lock() {
            type Field = fn(&TcpSeries) -> u64;
            let metrics: [(&str, Field); 4] = [
                (telemetry::TCP_OPENED, |s| s.opened),
                (telemetry::TCP_CLOSED, |s| s.closed),
                (telemetry::TCP_RECEIVED_BYTES, |s| s.received),
                (telemetry::TCP_SENT_BYTES, |s| s.sent),
            ];
            for (name, field) in metrics {
                let _ = writeln!(out, "# TYPE {name} counter");
                for ((peer, flags), s) in tcp.iter() {
                    let l = telemetry::prometheus_labels(peer.tcp_labels(flags));
                    let _ = writeln!(out, "{name}{{{l}}} {}", field(s));
                }
            }
        }
        out
    }
}

fn respond(proxy: &Arc<Proxy>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let text = |status: u16, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(full(body))
            .unwrap_or_else(|_| Response::new(full("")))
    };
    match req.uri().path() {
        // Istio's agent answers `/healthz/ready` on its status port; Envoy's admin `/ready`.
        "/ready" | "/healthz/ready" if proxy.is_ready() => text(200, "text/plain", "LIVE\n".into()),
        "/ready" | "/healthz/ready" => text(
            503,
            "text/plain",
            "not ready: starting or draining\n".into(),
        ),
        // Istio's agent: stop the proxy (a job's last container ends its sidecar this way).
        "/quitquitquit" if req.method() == hyper::Method::POST => {
            proxy.start_drain();
            text(200, "text/plain", "OK\n".into())
        }
        "/drain_listeners" if req.method() == hyper::Method::POST => {
            proxy.start_drain();
            text(200, "text/plain", "OK\n".into())
        }
        "/healthz" => text(200, "text/plain", "OK\n".into()),
        "/stats" => match envoy_stats(&proxy.stats, req.uri().query().unwrap_or("")) {
            Ok((ctype, body)) => text(200, ctype, body),
            Err(e) => text(400, "text/plain", format!("{e}\n")),
        },
        "/stats/prometheus" => {
            let mut out = proxy.stats.prometheus();
            // Ejections in force, per cluster with outlier detection (Envoy's
            // `outlier_detection.ejections_active`).
            let g = proxy.current();
            let now = now_ms();
            let name = "meshroute_outlier_ejections_active";
            let _ = writeln!(out, "# TYPE {name} gauge");
            for c in g
                .doc
                .clusters
                .iter()
                .filter(|c| c.outlier_detection.is_some())
            {
                let ejected = outlier_health(proxy, &g.doc, &c.name, now)
                    .iter()
                    .filter(|(_, until)| until.is_some())
                    .count();
                let _ = writeln!(out, "{name}{{cluster_name=\"{}\"}} {ejected}", c.name);
            }
            // Tasks alive in the runtime (connections, timers, pooled connections): one that
            // only grows is a leak.
            let tasks = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            let name = "meshroute_runtime_alive_tasks";
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {tasks}");
            text(200, "text/plain; version=0.0.4", out)
        }
        "/config_dump" => {
            let g = proxy.current();
            // Envoy's envelope (`configs`, each entry typed by `@type`), so tools that walk
            // an Envoy config dump find meshroute's entry and skip what they do not know.
            let dump = serde_json::json!({
                "configs": [{
                    "@type": CONFIG_DUMP_TYPE,
                    "rules": &*g.doc,
                    "sources": g.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "last_reload_error": proxy.reload_error.lock().ok().and_then(|e| e.clone()),
                }],
            });
            text(
                200,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        "/clusters" => {
            let g = proxy.current();
            let mut out = String::new();
            let mut names: Vec<_> = g.clusters.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            let now = now_ms();
            // Envoy's line format: `CLUSTER::KEY::VALUE`, `CLUSTER::ENDPOINT::KEY::VALUE`.
            for (name, c) in names {
                let _ = writeln!(out, "{name}::observability_name::{name}");
                let _ = writeln!(out, "{name}::added_via_api::false");
                let health = outlier_health(proxy, &g.doc, name, now);
                for e in &c.endpoints {
                    // Envoy's spelling of an endpoint ejected by outlier detection.
                    let flags = match health.iter().find(|(a, _)| a == e) {
                        Some((_, Some(_))) => "/failed_outlier_check",
                        _ => "healthy",
                    };
                    let _ = writeln!(out, "{name}::{e}::health_flags::{flags}");
                }
            }
            text(200, "text/plain", out)
        }
        "/" | "/help" => text(200, "text/plain", ADMIN_INDEX.into()),
        "/server_info" => {
            let uptime = format!("{}s", proxy.uptime().as_secs());
            let state = if proxy.is_draining() {
                "DRAINING"
            } else if proxy.started_up() {
                "LIVE"
            } else {
                "PRE_INITIALIZING"
            };
            let info = serde_json::json!({
                "version": concat!("meshroute/", env!("CARGO_PKG_VERSION")),
                "state": state,
                "uptime_current_epoch": uptime,
                "uptime_all_epochs": uptime,
            });
            text(200, "application/json", format!("{info:#}\n"))
        }
        // Envoy's: fail (or pass again) the health checks a load balancer or kubelet reads,
        // to take the proxy out of rotation without stopping it.
        "/healthcheck/fail" if req.method() == hyper::Method::POST => {
            proxy.set_health_failed(true);
            text(200, "text/plain", "OK\n".into())
        }
        "/healthcheck/ok" if req.method() == hyper::Method::POST => {
            proxy.set_health_failed(false);
            text(200, "text/plain", "OK\n".into())
        }
        // Envoy's: list the loggers, or (POST) set all with `level=` or some with
        // `paths=logger:level,...`.
        "/logging" => {
            if req.method() != hyper::Method::POST {
                return text(200, "text/plain", crate::logging::listing());
            }
            match set_logging(req.uri().query().unwrap_or("")) {
                Ok(()) => {
                    // The module reads its level when configured: reconfigure it with the
                    // rules in force (as a reload would) so the new level is in force now.
                    let g = proxy.current();
                    if let Err(e) = proxy.reload((*g.doc).clone(), g.sources.clone()) {
                        return text(500, "text/plain", format!("{e}\n"));
                    }
                    text(200, "text/plain", crate::logging::listing())
                }
                Err(e) => text(
                    400,
                    "text/plain",
                    format!("{e}\n{}", crate::logging::listing()),
                ),
            }
        }
        _ => text(404, "text/plain", "not found: see /help\n".into()),
    }
}

/// `/logging`'s query: `level=L` or `paths=logger:L,logger:L`.
fn set_logging(query: &str) -> Result<(), String> {
    let level =
        |s: &str| crate::logging::Level::parse(s).ok_or_else(|| format!("unknown level {s:?}"));
    let mut changed = false;
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "level" => crate::logging::set(None, level(value)?)?,
            "paths" => {
                for path in value.split(',') {
                    let (logger, l) = path
                        .split_once(':')
                        .ok_or_else(|| format!("expected logger:level, got {path:?}"))?;
                    crate::logging::set(Some(logger), level(l)?)?;
                }
            }
            other => return Err(format!("unknown parameter {other:?}: level, paths")),
        }
        changed = true;
    }
    if changed {
        Ok(())
    } else {
        Err("usage: POST /logging?level=debug or /logging?paths=filter:debug".into())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Endpoints of a cluster with their ejection end, from the filter's shared outlier record.
fn outlier_health(
    proxy: &Proxy,
    doc: &RulesDocument,
    cluster: &str,
    now: u64,
) -> Vec<(String, Option<u64>)> {
    let Some(c) = doc
        .clusters
        .iter()
        .find(|c| c.name == cluster && c.outlier_detection.is_some())
    else {
        return Vec::new();
    };
    let stored = proxy.plugin.shared.get(&Engine::outlier_key(cluster));
    cluster_health(c, stored.as_ref().map(|(v, _)| v.as_slice()), now)
}

/// Serves the admin interface on a bound listener until the process ends.
/// Answers 503 to every request (`/ready` included) while the proxy starts, until `stop`;
/// then hands the listener back so the admin interface proper takes it over.
pub async fn serve_starting(
    listener: TcpListener,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> TcpListener {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => return listener,
        };
        let Ok((stream, _)) = accepted else { continue };
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(503)
                        .header("content-type", "text/plain")
                        .body(full("not ready: starting\n"))
                        .unwrap_or_else(|_| Response::new(full(""))),
                )
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    serve_on(proxy, listener, false).await;
}

/// Serves the admin interface, or with `status_only` just readiness (`/healthz/ready`,
/// `/ready`), for a status port that kubelets probe.
pub async fn serve_on(proxy: Arc<Proxy>, listener: TcpListener, status_only: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = if status_only && !matches!(req.uri().path(), "/healthz/ready" | "/ready") {
                    Response::builder()
                        .status(404)
                        .body(full(""))
                        .unwrap_or_else(|_| Response::new(full("")))
                } else {
                    respond(&proxy, &req)
                };
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's label names of `istio_requests_total`, in order: the anchor the integration
    /// tests use too.
    fn istio_request_labels() -> Vec<&'static str> {
        include_str!("../../../tests/istio/request-labels.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    fn labels_of(line: &str) -> Vec<(String, String)> {
        let inner = line
            .split_once('{')
            .and_then(|(_, r)| r.rsplit_once('}'))
            .map_or("", |(l, _)| l);
        inner
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
            .collect()
    }

    fn measured() -> Measured {
        Measured {
            elapsed: Duration::from_millis(3),
            request_bytes: 120,
            response_bytes: 4000,
        }
    }

    #[test]
    fn series_carry_istios_label_set_with_source_and_destination_workloads() {
        let stats = Stats::default();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        stats.set_workload(Workload::from_labels(
            &labels(&[("app", "productpage"), ("version", "v1")]),
            "default",
            Some("productpage-v1"),
            "Kubernetes",
        ));
        let cluster = "outbound|9080|v2|reviews.default.svc.cluster.local";
        let peer = stats.peer(cluster, "10.0.0.2:9080", || {
            Some(labels(&[("app", "reviews"), ("version", "v2")]))
        });
        stats.record(peer, (200, "http", ""), "", &measured());
        let peer = stats.peer(
            "inbound|9080||reviews.default.svc.cluster.local",
            "",
            || None,
        );
        stats.record(peer, (503, "grpc", "14"), "UF", &measured());
        let text = stats.prometheus();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in &lines {
            let names: Vec<String> = labels_of(line).into_iter().map(|(k, _)| k).collect();
            assert_eq!(names, istio_request_labels(), "{line}");
        }
        let source: BTreeMap<_, _> = labels_of(lines[1]).into_iter().collect();
        let get = |m: &BTreeMap<String, String>, k: &str| m[k].clone();
        assert_eq!(get(&source, "reporter"), "source");
        assert_eq!(get(&source, "source_workload"), "productpage-v1");
        assert_eq!(get(&source, "source_app"), "productpage");
        assert_eq!(get(&source, "source_version"), "v1");
        assert_eq!(get(&source, "destination_app"), "reviews");
        assert_eq!(get(&source, "destination_version"), "v2");
        assert_eq!(get(&source, "destination_service_name"), "reviews");
        assert_eq!(get(&source, "destination_service_namespace"), "default");
        assert_eq!(get(&source, "connection_security_policy"), "unknown");
        let inbound: BTreeMap<_, _> = labels_of(lines[0]).into_iter().collect();
        assert_eq!(get(&inbound, "reporter"), "destination");
        assert_eq!(get(&inbound, "source_workload"), "unknown");
        assert_eq!(get(&inbound, "destination_workload"), "productpage-v1");
        assert_eq!(get(&inbound, "request_protocol"), "grpc");
        assert_eq!(get(&inbound, "grpc_response_status"), "14");
        assert_eq!(get(&inbound, "response_flags"), "UF");
        assert_eq!(get(&inbound, "connection_security_policy"), "none");
        // Sizes: 120 bytes in the le=1000 bucket and above, not below.
        assert!(text.contains("istio_request_bytes_bucket{"), "{text}");
        let bucket = |name: &str, le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("{name}_bucket{{reporter=\"source\""))
                        && l.contains(&format!("le=\"{le}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(bucket("istio_request_bytes", "100").as_deref(), Some("0"));
        assert_eq!(bucket("istio_request_bytes", "1000").as_deref(), Some("1"));
        assert_eq!(bucket("istio_response_bytes", "1000").as_deref(), Some("0"));
        assert_eq!(
            bucket("istio_response_bytes", "10000").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn workers_record_into_one_series_through_their_own_handles() {
        let stats = Arc::new(Stats::default());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let stats = Arc::clone(&stats);
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let peer = stats.peer("PassthroughCluster", "", || None);
                        stats.record(peer, (200, "http", ""), "", &measured());
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let text = stats.prometheus();
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(counts.len(), 1, "{text}");
        assert!(counts[0].ends_with(" 200"), "{text}");
        assert!(
            text.contains("istio_request_duration_milliseconds_sum{"),
            "{text}"
        );
        assert!(
            text.lines().any(
                |l| l.starts_with("istio_request_duration_milliseconds_sum{")
                    && l.ends_with(" 600")
            ),
            "200 requests of 3 ms: {text}"
        );
    }

    #[test]
    fn stats_lists_istios_tagged_names_as_envoy_does() {
        let stats = Stats::default();
        let peer = stats.peer("outbound|443||api.example.com", "", || None);
        stats.record(peer, (503, "http", ""), "UF", &measured());
        let (ctype, text) = envoy_stats(&stats, "").unwrap();
        assert_eq!(ctype, "text/plain");
        let line = text
            .lines()
            .find(|l| l.ends_with(";.;istio_requests_total: 1"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.starts_with("reporter=.=source;.;source_workload=.=unknown;.;"),
            "{line}"
        );
        assert!(line.contains(";.;response_code=.=503;.;"), "{line}");
        assert!(line.contains(";.;response_flags=.=UF;.;"), "{line}");
        // One 3 ms request: every quantile within the 1–5 ms bucket.
        let duration = text
            .lines()
            .find(|l| l.contains(";.;istio_request_duration_milliseconds: "))
            .unwrap();
        assert!(duration.contains(" P50(nan,3)"), "{duration}");
        assert!(
            text.contains("meshroute_config_reloads_total: 0\n"),
            "{text}"
        );
        // filter= (percent-encoded) keeps what matches; format=json is Envoy's envelope.
        let (_, only) = envoy_stats(&stats, "filter=%5Emeshroute_config").unwrap();
        assert_eq!(only.lines().count(), 2, "{only}");
        let (ctype, json) = envoy_stats(&stats, "format=json&filter=istio_requests_total").unwrap();
        assert_eq!(ctype, "application/json");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["stats"][0]["value"], 1, "{v}");
        assert!(envoy_stats(&stats, "filter=(")
            .unwrap_err()
            .contains("regex"));
    }

    #[test]
    fn service_entry_and_passthrough_hosts_name_themselves() {
        let stats = Stats::default();
        for cluster in ["outbound|443||api.example.com", "PassthroughCluster"] {
            let peer = stats.peer(cluster, "", || None);
            stats.record(peer, (200, "http", ""), "", &measured());
        }
        let text = stats.prometheus();
        for name in ["api.example.com", "PassthroughCluster"] {
            assert!(
                text.contains(&format!(
                    "destination_service=\"{name}\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"latest\",destination_service_name=\"{name}\",destination_service_namespace=\"unknown\""
                )),
                "{text}"
            );
        }
    }
}
