//! Admin listener: `/ready`, `/healthz`, `/config_dump`, `/clusters`, `/stats/prometheus`
//! with Istio's standard request metrics.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshroute_core::engine::{cluster_health, Engine};
use meshroute_core::ir::RulesDocument;

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

/// Istio's duration buckets (milliseconds).
const BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum_ms: f64,
    buckets: Vec<u64>,
    request_bytes: Sizes,
    response_bytes: Sizes,
}

/// A byte-size histogram (Istio's `istio_request_bytes` / `istio_response_bytes`).
#[derive(Default)]
struct Sizes {
    sum: u64,
    buckets: Vec<u64>,
}

impl Sizes {
    fn observe(&mut self, bytes: u64) {
        self.sum += bytes;
        if self.buckets.is_empty() {
            self.buckets = vec![0; BYTE_BUCKETS.len()];
        }
        for (i, b) in BYTE_BUCKETS.iter().enumerate() {
            if bytes as f64 <= *b {
                self.buckets[i] += 1;
            }
        }
    }
}

/// Istio's size buckets (bytes): powers of ten from 1 to 10^8.
const BYTE_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

/// The labels of a request's series that do not depend on its outcome (`reporter` to
/// `destination_cluster`), then response code, response flags, protocol, gRPC status.
type SeriesKey = (Arc<str>, u16, String, &'static str, String);

/// What a finished request measured.
pub struct Measured {
    pub elapsed: Duration,
    /// Headers and body, as Envoy's `request.total_size` / `response.total_size`.
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Istio's `destination_service_name`: a Kubernetes-style host's service name, any other
/// host (a ServiceEntry's, `PassthroughCluster`) whole.
fn service_name(host: &str) -> &str {
    match host.strip_suffix(".svc.cluster.local") {
        Some(service) => service.split('.').next().unwrap_or(host),
        None => host,
    }
}

/// The namespace of a Kubernetes-style host, `unknown` for any other.
fn service_namespace(host: &str) -> &str {
    host.strip_suffix(".svc.cluster.local")
        .and_then(|s| s.split_once('.'))
        .map_or("unknown", |(_, ns)| ns)
}

/// Istio's `request_protocol` of a request: `grpc` for gRPC content, else `http`.
pub fn request_protocol(content_type: Option<&[u8]>) -> &'static str {
    if content_type.is_some_and(|t| t.starts_with(b"application/grpc")) {
        "grpc"
    } else {
        "http"
    }
}

/// A workload's labels as Istio's metrics name it: from its Kubernetes labels and, for
/// the workload name and cluster, the agent's `ISTIO_META_WORKLOAD_NAME` and
/// `ISTIO_META_CLUSTER_ID`.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Workload {
    const UNKNOWN: &'static str = "unknown";

    /// A workload nothing is known of.
    pub fn unknown() -> Self {
        Self {
            name: Self::UNKNOWN.into(),
            namespace: Self::UNKNOWN.into(),
            app: Self::UNKNOWN.into(),
            version: Self::UNKNOWN.into(),
            canonical_service: Self::UNKNOWN.into(),
            canonical_revision: "latest".into(),
            cluster: Self::UNKNOWN.into(),
        }
    }

    /// A workload from its labels, namespace, name and cluster (as much as is known).
    pub fn from_labels(
        labels: &BTreeMap<String, String>,
        namespace: &str,
        name: Option<&str>,
        cluster: &str,
    ) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let name = name.map(str::to_owned);
        Self {
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .or_else(|| name.clone())
            .unwrap_or_else(|| Self::UNKNOWN.into()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| Self::UNKNOWN.into()),
            version: label(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| Self::UNKNOWN.into()),
            name: name.unwrap_or_else(|| Self::UNKNOWN.into()),
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
        }
    }

    /// The proxy's own workload, from its rules' identity and the agent's environment.
    pub fn of_proxy(identity: &meshroute_core::ir::ProxyIdentity) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::from_labels(
            &identity.labels,
            &identity.namespace,
            env("ISTIO_META_WORKLOAD_NAME").as_deref(),
            &env("ISTIO_META_CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
        )
    }
}

/// The outcome-independent labels of one series, in the order Istio's Prometheus output
/// has them.
fn peer_labels(reporter: &str, source: &Workload, destination: &Workload, host: &str) -> String {
    let (service, name, namespace) = if host.is_empty() {
        ("unknown", "unknown", "unknown")
    } else {
        (host, service_name(host), service_namespace(host))
    };
    format!(
        "reporter=\"{reporter}\",source_workload=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\",source_workload_namespace=\"{}\",source_principal=\"unknown\",source_app=\"{}\",source_version=\"{}\",source_cluster=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"unknown\",destination_app=\"{}\",destination_version=\"{}\",destination_service=\"{service}\",destination_canonical_service=\"{}\",destination_canonical_revision=\"{}\",destination_service_name=\"{name}\",destination_service_namespace=\"{namespace}\",destination_cluster=\"{}\"",
        source.name,
        source.canonical_service,
        source.canonical_revision,
        source.namespace,
        source.app,
        source.version,
        source.cluster,
        destination.name,
        destination.namespace,
        destination.app,
        destination.version,
        destination.canonical_service,
        destination.canonical_revision,
        destination.cluster,
    )
}

/// Request metrics keyed by their labels.
#[derive(Default)]
pub struct Stats {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
    vm_failures: AtomicU64,
    vm_reloads: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
    connection_overflows: AtomicU64,
    tcp: Mutex<BTreeMap<TcpKey, TcpSeries>>,
    /// The proxy's own workload (`None`: unknown).
    me: std::sync::RwLock<Option<Workload>>,
    /// Outcome-independent labels by cluster and endpoint, built once each.
    peers: Mutex<HashMap<String, HashMap<String, Arc<str>>>>,
}

/// Outcome-independent labels, response flags.
type TcpKey = (Arc<str>, String);

#[derive(Default)]
struct TcpSeries {
    opened: u64,
    closed: u64,
    received: u64,
    sent: u64,
}

/// How a cluster's traffic is reported: (reporter, service host). `outbound|PORT|SUBSET|HOST`
/// is the client side's (`source`); a transparent sidecar's `inbound|PORT||SERVICE` (the
/// service appended for metrics) and `InboundPassthroughCluster` are the server side's
/// (`destination`); other clusters (`PassthroughCluster`, `BlackHoleCluster`) name
/// themselves, as in Istio's metrics.
fn cluster_parts(cluster: &str) -> (&'static str, &str) {
    if cluster == "InboundPassthroughCluster" {
        return ("destination", cluster);
    }
    let Some((direction, rest)) = cluster.split_once('|') else {
        return ("source", cluster);
    };
    let host = rest.splitn(3, '|').nth(2).unwrap_or("");
    let reporter = if direction == "inbound" {
        "destination"
    } else {
        "source"
    };
    (reporter, host)
}

/// Istio's `connection_security_policy`: `unknown` as the client side reports it, `none`
/// (plaintext) as the server side does.
fn security_policy(peer: &str) -> &'static str {
    if peer.starts_with("reporter=\"destination\"") {
        "none"
    } else {
        "unknown"
    }
}

/// One histogram series in Prometheus' text format.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    (bounds, counts): (&[f64], &[u64]),
    count: u64,
    sum: &str,
) {
    for (i, b) in bounds.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{b}\"}} {}",
            counts.get(i).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
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
    ) -> Arc<str> {
        if let Ok(p) = self.peers.lock() {
            if let Some(l) = p.get(cluster).and_then(|e| e.get(endpoint)) {
                return Arc::clone(l);
            }
        }
        let (reporter, host) = cluster_parts(cluster);
        let me = self
            .me
            .read()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_else(Workload::unknown);
        let labels: Arc<str> = if reporter == "destination" {
            peer_labels(reporter, &Workload::unknown(), &me, host).into()
        } else {
            let destination = match endpoint_labels() {
                Some(labels) => {
                    Workload::from_labels(&labels, service_namespace(host), None, &me.cluster)
                }
                None => Workload::unknown(),
            };
            peer_labels(reporter, &me, &destination, host).into()
        };
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

    /// A finished request: its peer labels ([`Stats::peer`]), response code, protocol and
    /// gRPC status, response flags and measurements.
    pub fn record(
        &self,
        peer: Arc<str>,
        (code, protocol, grpc_status): (u16, &'static str, &str),
        flags: &str,
        m: &Measured,
    ) {
        let flags = if flags.is_empty() { "-" } else { flags };
        let ms = m.elapsed.as_secs_f64() * 1000.0;
        if let Ok(mut s) = self.series.lock() {
            let e = s
                .entry((
                    peer,
                    code,
                    flags.to_owned(),
                    protocol,
                    grpc_status.to_owned(),
                ))
                .or_default();
            e.count += 1;
            e.sum_ms += ms;
            if e.buckets.is_empty() {
                e.buckets = vec![0; BUCKETS.len()];
            }
            for (i, b) in BUCKETS.iter().enumerate() {
                if ms <= *b {
                    e.buckets[i] += 1;
                }
            }
            e.request_bytes.observe(m.request_bytes);
            e.response_bytes.observe(m.response_bytes);
        }
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

    /// Istio's standard metrics: a sidecar's outbound traffic and a gateway's as the client
    /// side reports them (`reporter="source"`), a transparent sidecar's inbound traffic as
    /// the server side does (`reporter="destination"`).
    fn prometheus(&self) -> String {
        let mut out = String::new();
        let Ok(series) = self.series.lock() else {
            return out;
        };
        let _ = writeln!(out, "# TYPE istio_requests_total counter");
        let label = |(peer, code, flags, protocol, grpc): &SeriesKey| {
            format!(
                "{peer},request_protocol=\"{protocol}\",response_code=\"{code}\",grpc_response_status=\"{grpc}\",response_flags=\"{flags}\",connection_security_policy=\"{}\"",
                security_policy(peer)
            )
        };
        for (k, s) in series.iter() {
            let _ = writeln!(out, "istio_requests_total{{{}}} {}", label(k), s.count);
        }
        let _ = writeln!(out, "# TYPE istio_request_duration_milliseconds histogram");
        for (k, s) in series.iter() {
            let l = label(k);
            histogram(
                &mut out,
                "istio_request_duration_milliseconds",
                &l,
                (BUCKETS, &s.buckets),
                s.count,
                &s.sum_ms.to_string(),
            );
        }
        type Field = fn(&Series) -> &Sizes;
        let sizes: [(&str, Field); 2] = [
            ("istio_request_bytes", |s| &s.request_bytes),
            ("istio_response_bytes", |s| &s.response_bytes),
        ];
        for (name, field) in sizes {
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (k, s) in series.iter() {
                let sizes = field(s);
                histogram(
                    &mut out,
                    name,
                    &label(k),
                    (BYTE_BUCKETS, &sizes.buckets),
                    s.count,
                    &sizes.sum.to_string(),
                );
            }
        }
        for (name, v) in [
            ("meshroute_wasm_failures_total", &self.vm_failures),
            ("meshroute_wasm_reloads_total", &self.vm_reloads),
            ("meshroute_config_reloads_total", &self.config_reloads),
            (
                "meshroute_config_reload_failures_total",
                &self.config_reload_failures,
            ),
            (
                "meshroute_downstream_connections_refused_total",
                &self.connection_overflows,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        drop(series);
        if let Ok(tcp) = self.tcp.lock() {
            let label = |(peer, flags): &TcpKey| {
                format!(
                    "{peer},request_protocol=\"tcp\",response_flags=\"{flags}\",connection_security_policy=\"{}\"",
                    security_policy(peer)
                )
            };
            type Field = fn(&TcpSeries) -> u64;
            let metrics: [(&str, Field); 4] = [
                ("istio_tcp_connections_opened_total", |s| s.opened),
                ("istio_tcp_connections_closed_total", |s| s.closed),
                ("istio_tcp_received_bytes_total", |s| s.received),
                ("istio_tcp_sent_bytes_total", |s| s.sent),
            ];
            for (name, field) in metrics {
                let _ = writeln!(out, "# TYPE {name} counter");
                for (k, s) in tcp.iter() {
                    let _ = writeln!(out, "{name}{{{}}} {}", label(k), field(s));
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

    /// The label names of `istio_requests_total` as Istio's Prometheus output has them:
    /// istio/proxy `testdata/metric/client_request_total.yaml.tmpl` (commit 0578ad51),
    /// with the cluster labels as Prometheus names them (`source_cluster`,
    /// `destination_cluster`; the template's `*_cluster_id`) and without its two
    /// configurable test metrics.
    const ISTIO_REQUEST_LABELS: &[&str] = &[
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_service",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_service_name",
        "destination_service_namespace",
        "destination_cluster",
        "request_protocol",
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ];

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
            assert_eq!(names, ISTIO_REQUEST_LABELS, "{line}");
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
