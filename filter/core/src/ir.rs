//! The rules document: what `meshroute compile` writes and the filter reads.
//!
//! Everything here is already validated and resolved for one proxy identity; the data path
//! never re-validates Istio semantics, it only builds matchers (regexes) once at configure time.
//! Any change to the wire shape bumps [`VERSION`]; readers reject versions they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Wire version of the rules document.
pub const VERSION: u32 = 1;

/// The whole document, for one proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesDocument {
    pub version: u32,
    pub proxy: ProxyIdentity,
    #[serde(default)]
    pub outbound_traffic_policy: OutboundPolicy,
    /// One route table per listener port (sidecar: service port; gateway: server port).
    #[serde(default)]
    pub route_tables: Vec<RouteTable>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    /// Connection-level routes (TCP, and TLS routed on SNI without terminating it), one table
    /// per listener port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l4_tables: Vec<L4Table>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Who this document was compiled for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyIdentity {
    pub kind: ProxyKind,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone` of the proxy, for locality-aware balancing; empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyKind {
    #[default]
    Sidecar,
    Gateway,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// A gateway listener (one per Gateway server port) or the sidecar's outbound listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub port: u16,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ListenerServer>,
}

/// One Gateway server on a listener, with what a host needs to terminate TLS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerServer {
    pub hosts: Vec<String>,
    /// The server's own protocol (servers of several protocols may share a TLS port).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

impl ListenerServer {
    fn tls_mode(&self) -> &str {
        self.tls.as_ref().map_or("", |t| t.mode.as_str())
    }

    /// The proxy terminates TLS for this server (SIMPLE, MUTUAL, OPTIONAL_MUTUAL).
    pub fn terminates_tls(&self) -> bool {
        matches!(self.tls_mode(), "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL")
    }

    /// TLS passes through, routed on its SNI (PASSTHROUGH, AUTO_PASSTHROUGH).
    pub fn passes_tls_through(&self) -> bool {
        matches!(self.tls_mode(), "PASSTHROUGH" | "AUTO_PASSTHROUGH")
    }

    /// What reaches the filter is HTTP (plain, or after termination).
    pub fn serves_http(&self) -> bool {
        !self.passes_tls_through()
            && matches!(
                self.protocol.as_str(),
                "" | "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "GRPC-WEB"
            )
    }

    /// The hosts as SNI patterns: lower case, without the namespace part; empty when the
    /// server takes any name (`*`).
    pub fn sni_names(&self) -> Vec<String> {
        let names: Vec<String> = self
            .hosts
            .iter()
            .map(|h| {
                h.rsplit_once('/')
                    .map_or(h.as_str(), |(_, d)| d)
                    .to_ascii_lowercase()
            })
            .collect();
        if names.iter().any(|n| n == "*") {
            Vec::new()
        } else {
            names
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
}

/// Connection-level routes of one listener port: the first route that matches takes the
/// connection; none matching closes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Table {
    pub port: u16,
    /// Gateway `AUTO_PASSTHROUGH`: the SNI names the cluster (`outbound_.PORT_.SUBSET_.HOST`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_passthrough: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<L4Route>,
}

impl L4Table {
    /// Whether routing needs the ClientHello's SNI (hosts read it before the filter runs).
    pub fn routes_on_sni(&self) -> bool {
        self.auto_passthrough
            || self
                .routes
                .iter()
                .any(|r| r.matches.iter().any(|m| !m.sni_hosts.is_empty()))
    }
}

/// One `tcp` or `tls` route (or the default route of a TCP service).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// OR across entries; an empty list matches every connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4Match>,
    /// Weighted; each names its port (the connection has no authority to take one from).
    pub destinations: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}

/// AND of every condition present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Match {
    /// ClientHello SNI: exact names or `*.suffix` (which also matches `suffix`); lower case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// CIDRs of the connection's original destination address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
}

/// Routes for one listener port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    pub port: u16,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    /// Lower-case host names without port: exact names, `*.suffix` wildcards or `*`.
    pub domains: Vec<String>,
    /// Gateway `httpsRedirect`: every plain-text request is answered with a 301 to https.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_tls: bool,
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}

/// Where an object came from, for logs and `explain`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub file: String,
    pub line: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// OR across entries; an empty list matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// Whole-request timeout; `None` means disabled (Istio's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}

/// AND of every condition present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_uri_case: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole value.
    Regex(String),
    /// Header or parameter present, any value.
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Lower-case; may be a pseudo-header (`:path`, `:authority`, ...).
    pub name: String,
    pub matcher: StringMatch,
    /// `withoutHeaders`: the result is inverted and a missing header counts as empty.
    #[serde(default, skip_serializing_if = "is_false")]
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    pub name: String,
    pub matcher: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

impl Default for Action {
    fn default() -> Self {
        Self::DirectResponse(DirectResponse {
            status: 404,
            body: None,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    /// Non-empty; weights are relative and already > 0.
    pub destinations: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Fully qualified service host.
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    /// `None`: the listener port of the request decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
}

/// Header operations of one level. Applied remove → set → add, as Envoy does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched prefix (prefix match) or the whole path (other matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    /// Substitution with `\1`-style group references (RE2 / Envoy syntax).
    pub substitution: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<RedirectPort>,
    pub status: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectPort {
    Number(u16),
    FromRequestPort,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    /// Body bytes, base64 in the document so binary bodies survive JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// `unmatchedPreflights: IGNORE` answers unmatched preflights locally instead of forwarding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_unmatched_preflights: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub delay_ms: u64,
    /// Chance in millionths (Envoy's FractionalPercent MILLION).
    pub per_million: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub per_million: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub per_million: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio `attempts`).
    pub num_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Envoy retry-on conditions (no integers).
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<u64>,
    #[serde(default = "default_true")]
    pub avoid_previous_hosts: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retry_remote_localities: bool,
}

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
    /// Service protocol as declared (HTTP, HTTP2, GRPC, TCP, ...); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
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
    },
    #[default]
    SourceIp,
    QueryParameter(String),
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

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    pub mode: String,
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
    /// A secret holding the client certificate, key and CA (`tls.crt`, `tls.key`, `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
}

impl Cluster {
    /// Whether the host speaks HTTP/2 to the endpoints: HTTP2/gRPC ports or `h2UpgradePolicy`.
    pub fn upstream_h2(&self) -> bool {
        self.connection_pool.h2_upgrade
            || matches!(self.protocol.as_str(), "HTTP2" | "GRPC" | "GRPC-WEB")
    }
}

impl LocalityLb {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Builds the Istio cluster name `outbound|port|subset|host`.
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_true() -> bool {
    true
}

fn default_weight() -> u32 {
    1
}
