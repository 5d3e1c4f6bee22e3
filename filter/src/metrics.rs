//! Istio's standard request metrics from inside Envoy, for proxies without Istio's own stats
//! filter (meshroute's generated bootstrap turns them on with
//! [`ISTIO_METRICS_NODE_KEY`]). The series are those `meshroute run` keeps
//! ([`meshroute_core::telemetry`]), defined as tagged stat names that the bootstrap's
//! `stats_tags` take apart, so one dashboard reads both hosts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::warn;
use proxy_wasm::types::MetricType;

use meshroute_core::contract::ISTIO_METRICS_NODE_KEY;
use meshroute_core::engine::Engine;
use meshroute_core::telemetry::{self, PeerLabels, Workload};

use crate::host::{text_property, u64_property, Host};

/// The metric ids of one series: the counter, then the duration and size histograms.
type SeriesIds = [u32; 4];

/// A peer's labels with a number of their own, so that a series is found by what makes it
/// up and its stat name is written once, when it is defined.
struct Peer {
    id: usize,
    labels: PeerLabels,
}

/// What tells one request series from another.
#[derive(PartialEq, Eq, Hash)]
struct SeriesKey {
    peer: usize,
    protocol: &'static str,
    code: u64,
    grpc: String,
    flags: u64,
}

pub(crate) struct Metrics {
    me: Workload,
    /// Outcome-independent labels by cluster and endpoint, built once each.
    peers: RefCell<HashMap<String, HashMap<String, Rc<Peer>>>>,
    /// Defined request series.
    series: RefCell<HashMap<SeriesKey, SeriesIds>>,
    /// Defined TCP counters by peer, metric and response flags.
    counters: RefCell<HashMap<(usize, &'static str, u64), u32>>,
}

/// What the filter noted of a request for its metrics.
pub(crate) struct Noted {
    /// The cluster the filter chose; empty when it answered itself.
    pub cluster: String,
    pub protocol: &'static str,
}

impl Metrics {
    /// The metrics of a proxy whose node metadata asks for them, with the proxy's workload
    /// from its rules and the node's `WORKLOAD_NAME` and `CLUSTER_ID` (as Istio's agent sets
    /// them from `ISTIO_META_*`).
    pub fn from_node(host: &impl Host, engine: &Engine) -> Option<Self> {
        let node = |key: &str| text_property(host, &["xds", "node", "metadata", key]);
        if node(ISTIO_METRICS_NODE_KEY) != "true" {
            return None;
        }
        let (namespace, labels) = engine.identity();
        let name = node("WORKLOAD_NAME");
        let cluster = node("CLUSTER_ID");
        let me = Workload::from_labels(
            labels,
            namespace,
            (!name.is_empty()).then_some(name.as_str()),
            if cluster.is_empty() {
                "Kubernetes"
            } else {
                &cluster
            },
        );
        Some(Self {
            me,
            peers: RefCell::default(),
            series: RefCell::default(),
            counters: RefCell::default(),
        })
    }

    /// Counts a finished request (at `on_log`, when Envoy knows its outcome).
    pub fn record(&self, host: &impl Host, engine: &Engine, noted: &Noted) {
        let endpoint = if noted.cluster.is_empty() {
            String::new()
        } else {
            text_property(host, &["upstream", "address"])
        };
        let peer = self.peer(engine, &noted.cluster, &endpoint);
        let key = SeriesKey {
            peer: peer.id,
            protocol: noted.protocol,
            code: u64_property(host, &["response", "code"]).unwrap_or(0),
            grpc: host.response_header("grpc-status").unwrap_or_default(),
            flags: u64_property(host, &["response", "flags"]).unwrap_or(0),
        };
        let Some(ids) = self.ids(host, &peer.labels, key) else {
            return;
        };
        let duration_ms = u64_property(host, &["request", "duration"]).unwrap_or(0) / 1_000_000;
        let sizes = [
            duration_ms,
            u64_property(host, &["request", "total_size"]).unwrap_or(0),
            u64_property(host, &["response", "total_size"]).unwrap_or(0),
        ];
        let mut result = host.increment_metric(ids[0], 1);
        for (id, value) in ids[1..].iter().zip(sizes) {
            result = result.and(host.record_metric(*id, value));
        }
        if let Err(status) = result {
            warn!("recording metrics failed: {status:?}");
        }
    }

    /// Counts a connection the filter sent to `cluster` (when it opens; flags not known yet).
    pub fn tcp_opened(&self, host: &impl Host, engine: &Engine, cluster: &str) {
        let peer = self.peer(engine, cluster, "");
        self.add(host, &peer, telemetry::TCP_OPENED, 0, 1);
    }

    /// Counts a connection to `cluster` that ended (at `on_log`), with the bytes it carried
    /// from the client (`received`) and to it (`sent`).
    pub fn tcp_closed(
        &self,
        host: &impl Host,
        engine: &Engine,
        cluster: &str,
        received: u64,
        sent: u64,
    ) {
        let peer = self.peer(engine, cluster, "");
        let flags = u64_property(host, &["response", "flags"]).unwrap_or(0);
        for (metric, value) in [
            (telemetry::TCP_CLOSED, 1),
            (telemetry::TCP_RECEIVED_BYTES, received),
            (telemetry::TCP_SENT_BYTES, sent),
        ] {
            self.add(host, &peer, metric, flags, value);
        }
    }

    /// Adds `value` to a TCP counter, defining it on first use.
    fn add(&self, host: &impl Host, peer: &Peer, metric: &'static str, flags: u64, value: u64) {
        let key = (peer.id, metric, flags);
        let known = self.counters.borrow().get(&key).copied();
        let id = match known {
            Some(id) => id,
            None => {
                let flags = telemetry::response_flags(flags);
                let name = telemetry::envoy_stat_name(metric, peer.labels.tcp_labels(&flags));
                let Some(id) = define(host, MetricType::Counter, &name) else {
                    return;
                };
                self.counters.borrow_mut().insert(key, id);
                id
            }
        };
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        if let Err(status) = host.increment_metric(id, value) {
            warn!("recording metrics failed: {status:?}");
        }
    }

    fn peer(&self, engine: &Engine, cluster: &str, endpoint: &str) -> Rc<Peer> {
        if let Some(p) = self
            .peers
            .borrow()
            .get(cluster)
            .and_then(|e| e.get(endpoint))
        {
            return Rc::clone(p);
        }
        let mut peers = self.peers.borrow_mut();
        let id = peers.values().map(HashMap::len).sum();
        let peer = Rc::new(Peer {
            id,
            labels: PeerLabels::new(cluster, &self.me, engine.endpoint_labels(cluster, endpoint)),
        });
        peers
            .entry(cluster.to_owned())
            .or_default()
            .insert(endpoint.to_owned(), Rc::clone(&peer));
        peer
    }

    /// The series' metric ids, defined (their stat names written) on its first request.
    fn ids(&self, host: &impl Host, peer: &PeerLabels, key: SeriesKey) -> Option<SeriesIds> {
        if let Some(ids) = self.series.borrow().get(&key) {
            return Some(*ids);
        }
        let (code, flags) = (key.code.to_string(), telemetry::response_flags(key.flags));
        let name = |metric: &str| {
            telemetry::envoy_stat_name(
                metric,
                peer.request_labels(key.protocol, &code, &key.grpc, &flags),
            )
        };
        let ids = [
            define(host, MetricType::Counter, &name(telemetry::REQUESTS_TOTAL))?,
            define(
                host,
                MetricType::Histogram,
                &name(telemetry::REQUEST_DURATION),
            )?,
            define(host, MetricType::Histogram, &name(telemetry::REQUEST_BYTES))?,
            define(
                host,
                MetricType::Histogram,
                &name(telemetry::RESPONSE_BYTES),
            )?,
        ];
        self.series.borrow_mut().insert(key, ids);
        Some(ids)
    }
}

/// Defines a metric, warning (and recording nothing) when the host refuses.
fn define(host: &impl Host, kind: MetricType, name: &str) -> Option<u32> {
    host.define_metric(kind, name)
        .map_err(|status| warn!("defining metric {name} failed: {status:?}"))
        .ok()
}
