//! Admin listener: `/ready`, `/healthz`, `/config_dump`, `/clusters`, `/stats/prometheus`
//! with Istio's standard request metrics.

use std::collections::BTreeMap;
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
}

/// reporter, destination service, subset, port, response code, response flags, protocol.
type SeriesKey = (
    &'static str,
    String,
    String,
    String,
    u16,
    String,
    &'static str,
);

/// Istio's `destination_service_name`: a Kubernetes-style host's service name, any other
/// host (a ServiceEntry's, `PassthroughCluster`) whole.
fn service_name(host: &str) -> &str {
    match host.strip_suffix(".svc.cluster.local") {
        Some(service) => service.split('.').next().unwrap_or(host),
        None => host,
    }
}

/// Istio's `request_protocol` of a request: `grpc` for gRPC content, else `http`.
pub fn request_protocol(content_type: Option<&[u8]>) -> &'static str {
    if content_type.is_some_and(|t| t.starts_with(b"application/grpc")) {
        "grpc"
    } else {
        "http"
    }
}

/// Request metrics keyed by (service, subset, port, code, flags).
#[derive(Default)]
pub struct Stats {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
    vm_failures: AtomicU64,
    vm_reloads: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
    connection_overflows: AtomicU64,
    tcp: Mutex<BTreeMap<TcpKey, TcpSeries>>,
}

/// reporter, destination service, subset, port, response flags.
type TcpKey = (&'static str, String, String, String, String);

#[derive(Default)]
struct TcpSeries {
    opened: u64,
    closed: u64,
    received: u64,
    sent: u64,
}

/// The labels a cluster's traffic is reported under: (reporter, host, subset, port).
/// `outbound|PORT|SUBSET|HOST` is the client side's (`source`); a transparent sidecar's
/// `inbound|PORT||SERVICE` (the service appended for metrics) and
/// `InboundPassthroughCluster` are the server side's (`destination`); other clusters
/// (`PassthroughCluster`, `BlackHoleCluster`) name themselves, as in Istio's metrics.
fn cluster_parts(cluster: &str) -> (&'static str, String, String, String) {
    if cluster == "InboundPassthroughCluster" {
        return (
            "destination",
            cluster.to_owned(),
            String::new(),
            String::new(),
        );
    }
    let Some((direction, rest)) = cluster.split_once('|') else {
        return ("source", cluster.to_owned(), String::new(), String::new());
    };
    let mut parts = rest.splitn(3, '|');
    let (port, subset, host) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
        parts
            .next()
            .filter(|h| !h.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    );
    let reporter = if direction == "inbound" {
        "destination"
    } else {
        "source"
    };
    (reporter, host, subset, port)
}

impl Stats {
    /// A proxied connection opened to `cluster`.
    pub fn tcp_opened(&self, cluster: &str) {
        let (reporter, host, subset, port) = cluster_parts(cluster);
        if let Ok(mut t) = self.tcp.lock() {
            t.entry((reporter, host, subset, port, "-".to_owned()))
                .or_default()
                .opened += 1;
        }
    }

    /// A connection to `cluster` ended: bytes received from the client and sent to it.
    pub fn tcp_closed(&self, cluster: &str, flags: &str, received: u64, sent: u64) {
        let (reporter, host, subset, port) = cluster_parts(cluster);
        let flags = if flags.is_empty() { "-" } else { flags };
        if let Ok(mut t) = self.tcp.lock() {
            let e = t
                .entry((reporter, host, subset, port, flags.to_owned()))
                .or_default();
            e.closed += 1;
            e.received += received;
            e.sent += sent;
        }
    }

    pub fn record(
        &self,
        cluster: &str,
        (code, protocol): (u16, &'static str),
        flags: &str,
        elapsed: Duration,
    ) {
        let (reporter, host, subset, port) = cluster_parts(cluster);
        let flags = if flags.is_empty() { "-" } else { flags };
        let ms = elapsed.as_secs_f64() * 1000.0;
        if let Ok(mut s) = self.series.lock() {
            let e = s
                .entry((
                    reporter,
                    host,
                    subset,
                    port,
                    code,
                    flags.to_owned(),
                    protocol,
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
        let label = |(reporter, host, subset, port, code, flags, protocol): &SeriesKey| {
            let subset = if subset.is_empty() { "unknown" } else { subset };
            format!(
                "reporter=\"{reporter}\",destination_service=\"{host}\",destination_service_name=\"{}\",destination_subset=\"{subset}\",destination_port=\"{port}\",request_protocol=\"{protocol}\",response_code=\"{code}\",response_flags=\"{flags}\"",
                service_name(host)
            )
        };
        for (k, s) in series.iter() {
            let _ = writeln!(out, "istio_requests_total{{{}}} {}", label(k), s.count);
        }
        let _ = writeln!(out, "# TYPE istio_request_duration_milliseconds histogram");
        for (k, s) in series.iter() {
            let l = label(k);
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "istio_request_duration_milliseconds_bucket{{{l},le=\"{b}\"}} {}",
                    s.buckets.get(i).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_bucket{{{l},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_sum{{{l}}} {}",
                s.sum_ms
            );
            let _ = writeln!(
                out,
                "istio_request_duration_milliseconds_count{{{l}}} {}",
                s.count
            );
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
            let label = |(reporter, host, subset, port, flags): &TcpKey| {
                let subset = if subset.is_empty() { "unknown" } else { subset };
                format!(
                    "reporter=\"{reporter}\",destination_service=\"{host}\",destination_service_name=\"{}\",destination_subset=\"{subset}\",destination_port=\"{port}\",request_protocol=\"tcp\",response_flags=\"{flags}\"",
                    service_name(host)
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

fn respond(proxy: &Proxy, req: &Request<hyper::body::Incoming>) -> Response<Body> {
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
        _ => text(404, "text/plain", "not found: see /help\n".into()),
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

    #[test]
    fn series_are_labelled_as_istio_labels_them() {
        let stats = Stats::default();
        let ms = Duration::from_millis(3);
        stats.record(
            "outbound|9080|v1|reviews.default.svc.cluster.local",
            (200, "http"),
            "",
            ms,
        );
        stats.record("outbound|443||api.example.com", (200, "grpc"), "", ms);
        stats.record("PassthroughCluster", (502, "http"), "", ms);
        stats.record(
            "inbound|9080||reviews.default.svc.cluster.local",
            (200, "http"),
            "",
            ms,
        );
        let text = stats.prometheus();
        let line = |needle: &[&str]| {
            text.lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .find(|l| needle.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        };
        assert!(
            line(&[
                "destination_service_name=\"reviews\"",
                "destination_subset=\"v1\"",
                "reporter=\"source\""
            ])
            .is_some(),
            "{text}"
        );
        assert!(
            line(&[
                "destination_service_name=\"api.example.com\"",
                "request_protocol=\"grpc\""
            ])
            .is_some(),
            "{text}"
        );
        assert!(
            line(&[
                "destination_service=\"PassthroughCluster\"",
                "destination_service_name=\"PassthroughCluster\""
            ])
            .is_some(),
            "{text}"
        );
        assert!(
            line(&[
                "reporter=\"destination\"",
                "destination_port=\"9080\"",
                "destination_service=\"reviews.default.svc.cluster.local\""
            ])
            .is_some(),
            "{text}"
        );
    }
}
