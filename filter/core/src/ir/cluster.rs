//! Upstream clusters: endpoints and the DestinationRule policies of each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{default_weight, is_false, is_zero, Protocol, SourceRef};

/// One upstream cluster: `outbound|port|subset|host`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub service: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    pub discovery: Discovery,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Service port protocol, as declared or implied by the port name.
    #[serde(default, skip_serializing_if = "Protocol::is_unspecified")]
    pub protocol: Protocol,
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub lb: LoadBalancer,
    #[serde(default, skip_serializing_if = "ConnectionPool::is_default")]
    pub connection_pool: ConnectionPool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// Endpoints listed in the document; the filter picks one.
    #[default]
    Static,
    /// Endpoint addresses are DNS names resolved by the host.
    Dns,
    /// Forward to the address the client asked for (ServiceEntry `resolution: NONE`).
    OriginalDst,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// IP address or (for DNS discovery) host name.
    pub address: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub policy: LbPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<u64>,
    /// Locality-aware balancing (the mesh default: on, failover by proximity).
    #[serde(default, skip_serializing_if = "LocalityLb::is_default")]
    pub locality: LocalityLb,
}

/// Istio's `localityLbSetting`; empty lists mean failover by proximity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLb {
    /// `enabled: false`: endpoints are balanced without regard to locality.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// From a proxy locality (pattern) to weights per endpoint locality (patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<(String, BTreeMap<String, u32>)>,
    /// From a region to the region that takes over when it has no healthy endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<(String, String)>,
    /// Endpoint labels that rank endpoints by how many match the proxy's, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    Passthrough,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistentHash {
    pub key: HashKey,
    /// `maglev` table size, or `None` for a ring hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(String),
    Cookie {
        name: String,
        path: Option<String>,
        ttl_ms: Option<u64>,
        /// Added to the cookie the proxy generates, after `Path`, as Envoy adds them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attributes: Vec<CookieAttribute>,
    },
    #[default]
    SourceIp,
    QueryParameter(String),
}

/// An attribute of a generated cookie: `; name` or `; name=value`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieAttribute {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

/// Connection pool settings; zero means "unlimited / default" as in Istio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_connections: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub http1_max_pending_requests: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub http2_max_requests: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_requests_per_connection: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// `tcp.idleTimeout` alone: what a proxied TCP connection may sit idle (`Some(0)`: no
    /// limit; `None`: Istio's default, 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub h2_upgrade: bool,
    /// `tcp.tcpKeepalive`: keepalive probes on the connections to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// TCP keepalive on upstream connections; unset fields take the system's values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpKeepalive {
    /// Probes sent without an answer before the connection is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    /// Seconds idle before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<u32>,
    /// Seconds between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u32>,
}

impl ConnectionPool {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub split_external_local_origin_errors: bool,
    pub interval_ms: u64,
    pub base_ejection_time_ms: u64,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

/// TLS the proxy originates to the endpoints (DestinationRule `tls.mode`; DISABLE is the
/// absence of [`ClientTls`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    #[default]
    Simple,
    Mutual,
    /// The mesh's own mTLS, with the workload certificates istiod issues.
    IstioMutual,
}

impl ClientTlsMode {
    /// Istio's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
            Self::IstioMutual => "ISTIO_MUTUAL",
        }
    }
}

impl std::fmt::Display for ClientTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
    /// Revocation lists the upstream's chain is checked against (`caCrl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
    /// A secret holding the client certificate, key and CA (`tls.crt`, `tls.key`, `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
}

impl Cluster {
    /// Whether the host speaks HTTP/2 to the endpoints: HTTP2/gRPC ports or `h2UpgradePolicy`.
    pub fn upstream_h2(&self) -> bool {
        self.connection_pool.h2_upgrade || self.protocol.is_http2()
    }
}

impl LocalityLb {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}
