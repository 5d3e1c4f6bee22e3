//! Istio's standard metrics, defined once for both hosts: which labels a request's series
//! carries and how they are written, as Prometheus labels (`meshroute run`) or as the tagged
//! stat names Envoy's tag extractors take apart (the filter inside Envoy).
//!
//! The label set and its order are those of istio/proxy
//! `testdata/metric/client_request_total.yaml.tmpl` (commit 0578ad51).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::contract::ResponseFlag;

const UNKNOWN: &str = "unknown";

/// The labels that depend only on who talks to whom, in Istio's order.
pub const PEER_LABELS: [&str; 19] = [
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
];

/// The labels that follow the peer labels of a request series.
pub const REQUEST_LABELS: [&str; 6] = [
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's standard HTTP metrics: the counter, then the histograms.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
pub const REQUEST_DURATION: &str = "istio_request_duration_milliseconds";
pub const REQUEST_BYTES: &str = "istio_request_bytes";
pub const RESPONSE_BYTES: &str = "istio_response_bytes";
pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
/// Bytes from the client (Istio: "received during request").
pub const TCP_RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";
/// Bytes to the client (Istio: "sent during response").
pub const TCP_SENT_BYTES: &str = "istio_tcp_sent_bytes_total";

/// Istio's duration buckets (milliseconds).
pub const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets (bytes): powers of ten from 1 to 10^8.
pub const BYTE_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// A workload as Istio's metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// A workload nothing is known of.
    pub fn unknown() -> Self {
        Self {
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: "latest".into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// A workload from its Kubernetes labels, namespace, name and cluster (as much as is
    /// known), with the canonical-name fallbacks Istio applies.
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
            .unwrap_or_else(|| UNKNOWN.into()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.into()),
            name: name.unwrap_or_else(|| UNKNOWN.into()),
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
        }
    }
}

/// How a cluster's traffic is reported: (reporter, service host). `outbound|PORT|SUBSET|HOST`
/// is the client side's (`source`); a transparent sidecar's `inbound|PORT||SERVICE` (the
/// service appended for metrics) and `InboundPassthroughCluster` are the server side's
/// (`destination`); other clusters (`PassthroughCluster`, `BlackHoleCluster`) name
/// themselves, as in Istio's metrics.
pub fn cluster_parts(cluster: &str) -> (&'static str, &str) {
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

/// Istio's `destination_service_name`: a Kubernetes-style host's service name, any other
/// host (a ServiceEntry's, `PassthroughCluster`) whole.
pub fn service_name(host: &str) -> &str {
    match host.strip_suffix(".svc.cluster.local") {
        Some(service) => service.split('.').next().unwrap_or(host),
        None => host,
    }
}

/// The namespace of a Kubernetes-style host, `unknown` for any other.
pub fn service_namespace(host: &str) -> &str {
    host.strip_suffix(".svc.cluster.local")
        .and_then(|s| s.split_once('.'))
        .map_or(UNKNOWN, |(_, ns)| ns)
}

/// Istio's `request_protocol` of a request: `grpc` for gRPC content, else `http`.
pub fn request_protocol(content_type: Option<&[u8]>) -> &'static str {
    if content_type.is_some_and(|t| t.starts_with(b"application/grpc")) {
        "grpc"
    } else {
        "http"
    }
}

/// Istio's `response_flags` value: the flags' codes joined by commas, `-` for none.
pub fn response_flags(bits: u64) -> String {
    let codes: Vec<&str> = ResponseFlag::from_bits(bits)
        .map(ResponseFlag::code)
        .collect();
    if codes.is_empty() {
        "-".into()
    } else {
        codes.join(",")
    }
}

/// The outcome-independent labels of traffic to `cluster`: `me` is the proxy's workload,
/// `destination` the answering endpoint's labels when they are known.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerLabels {
    values: Vec<(&'static str, String)>,
    /// `destination_cluster`: the proxy's cluster on either side (single-cluster mesh).
    cluster: String,
}

impl PeerLabels {
    pub fn new(
        cluster: &str,
        me: &Workload,
        destination: Option<&BTreeMap<String, String>>,
    ) -> Self {
        let (reporter, host) = cluster_parts(cluster);
        let unknown = Workload::unknown();
        let (source, destination) = if reporter == "destination" {
            (unknown, me.clone())
        } else {
            let d = match destination {
                Some(labels) => {
                    Workload::from_labels(labels, service_namespace(host), None, &me.cluster)
                }
                None => unknown,
            };
            (me.clone(), d)
        };
        let (service, name, namespace) = if host.is_empty() {
            (UNKNOWN, UNKNOWN, UNKNOWN)
        } else {
            (host, service_name(host), service_namespace(host))
        };
        let values: [&str; 19] = [
            reporter,
            &source.name,
            &source.canonical_service,
            &source.canonical_revision,
            &source.namespace,
            UNKNOWN,
            &source.app,
            &source.version,
            &source.cluster,
            &destination.name,
            &destination.namespace,
            UNKNOWN,
            &destination.app,
            &destination.version,
            service,
            &destination.canonical_service,
            &destination.canonical_revision,
            name,
            namespace,
        ];
        Self {
            values: PEER_LABELS
                .into_iter()
                .zip(values.map(str::to_owned))
                .collect(),
            cluster: destination.cluster.clone(),
        }
    }

    pub fn reporter(&self) -> &str {
        self.values.first().map_or(UNKNOWN, |(_, v)| v.as_str())
    }

    /// Istio's `connection_security_policy`: `unknown` as the client side reports it, `none`
    /// (plaintext) as the server side does.
    pub fn security_policy(&self) -> &'static str {
        if self.reporter() == "destination" {
            "none"
        } else {
            UNKNOWN
        }
    }

    /// Every label of a request series with this peer and outcome, in Istio's order.
    pub fn request_labels<'a>(
        &'a self,
        protocol: &'a str,
        code: &'a str,
        grpc_status: &'a str,
        flags: &'a str,
    ) -> impl Iterator<Item = (&'static str, &'a str)> {
        let outcome: [&'a str; 6] = [
            &self.cluster,
            protocol,
            code,
            grpc_status,
            flags,
            self.security_policy(),
        ];
        self.values
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(REQUEST_LABELS.into_iter().zip(outcome))
    }

    /// The labels of a TCP series (`request_protocol="tcp"`, no code or gRPC status).
    pub fn tcp_labels<'a>(
        &'a self,
        flags: &'a str,
    ) -> impl Iterator<Item = (&'static str, &'a str)> {
        let outcome: [(&'static str, &'a str); 4] = [
            ("destination_cluster", &self.cluster),
            ("request_protocol", "tcp"),
            ("response_flags", flags),
            ("connection_security_policy", self.security_policy()),
        ];
        self.values
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(outcome)
    }
}

/// Labels in Prometheus' text form, `k="v",…` (values escaped).
pub fn prometheus_labels<'k, 'v>(labels: impl IntoIterator<Item = (&'k str, &'v str)>) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// A tagged stat name as Istio's proxies write them, `k=.=v;.;…;.;METRIC`: Envoy's tag
/// extractors ([`envoy_stats_tags`]) turn each `k=.=v;.;` into a tag, so Prometheus sees
/// `METRIC{k="v",…}`.
pub fn envoy_stat_name<'k, 'v>(
    metric: &str,
    labels: impl IntoIterator<Item = (&'k str, &'v str)>,
) -> String {
    let mut out = String::new();
    for (k, v) in labels {
        // The separators cannot occur in a value: they would end the tag early.
        let v = v.replace(";.;", "_");
        let _ = write!(out, "{k}=.={v};.;");
    }
    out.push_str(metric);
    out
}

/// Envoy `stats_tags` entries (tag name, regex) that extract every label [`envoy_stat_name`]
/// writes: the first group is cut from the name, the second is the value.
pub fn envoy_stats_tags() -> impl Iterator<Item = (&'static str, String)> {
    PEER_LABELS
        .into_iter()
        .chain(REQUEST_LABELS)
        .map(|l| (l, format!(r"({l}=\.=(.*?);\.;)")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_outbound_series_names_both_workloads_in_istios_order() {
        let me = Workload::from_labels(
            &labels(&[("app", "productpage"), ("version", "v1")]),
            "default",
            Some("productpage-v1"),
            "Kubernetes",
        );
        let peer = PeerLabels::new(
            "outbound|9080|v2|reviews.default.svc.cluster.local",
            &me,
            Some(&labels(&[("app", "reviews"), ("version", "v2")])),
        );
        let all: Vec<_> = peer.request_labels("http", "200", "", "-").collect();
        let names: Vec<_> = all.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, [&PEER_LABELS[..], &REQUEST_LABELS[..]].concat());
        let get = |k: &str| all.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        assert_eq!(get("reporter"), Some("source"));
        assert_eq!(get("source_workload"), Some("productpage-v1"));
        assert_eq!(get("destination_version"), Some("v2"));
        assert_eq!(get("destination_service_name"), Some("reviews"));
        assert_eq!(get("destination_cluster"), Some("Kubernetes"));
        assert_eq!(get("connection_security_policy"), Some("unknown"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_inbound_series_is_the_destinations_report() {
        let me = Workload::from_labels(&labels(&[("app", "reviews")]), "shop", None, "c1");
        let peer = PeerLabels::new("inbound|9080||reviews.shop.svc.cluster.local", &me, None);
        assert_eq!(peer.reporter(), "destination");
        assert_eq!(peer.security_policy(), "none");
        let all: Vec<_> = peer.tcp_labels("-").collect();
        assert!(all.contains(&("source_workload", "unknown")));
        assert!(all.contains(&("destination_app", "reviews")));
        assert!(all.contains(&("request_protocol", "tcp")));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn prometheus_values_are_escaped() {
        assert_eq!(
            prometheus_labels([("a", "x\"y\\z"), ("b", "1")]),
            r#"a="x\"y\\z",b="1""#
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn every_tag_of_a_stat_name_is_extracted_by_its_regex() {
        let peer = PeerLabels::new("PassthroughCluster", &Workload::unknown(), None);
        let name = envoy_stat_name(
            REQUESTS_TOTAL,
            peer.request_labels("http", "200", "", "UF,URX"),
        );
        let mut rest = name.clone();
        let mut found = BTreeMap::new();
        for (tag, pattern) in envoy_stats_tags() {
            let re = regex::Regex::new(&pattern).unwrap();
            let caps = re
                .captures(&rest)
                .unwrap_or_else(|| panic!("{tag} in {rest}"));
            found.insert(tag, caps[2].to_owned());
            rest = rest.replacen(&caps[1].to_owned(), "", 1);
        }
        assert_eq!(rest, REQUESTS_TOTAL, "{name}");
        assert_eq!(found["response_flags"], "UF,URX");
        assert_eq!(found["destination_service"], "PassthroughCluster");
        assert_eq!(found["grpc_response_status"], "");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn flags_are_envoys_codes() {
        let bits =
            ResponseFlag::UpstreamConnectionFailure.bit() | ResponseFlag::NoHealthyUpstream.bit();
        assert_eq!(response_flags(bits), "UH,UF");
        assert_eq!(response_flags(0), "-");
    }
}
