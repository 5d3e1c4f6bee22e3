//! The rules document: what `meshroute compile` writes and the filter reads.
//!
//! Everything here is already validated and resolved for one proxy identity; the data path
//! never re-validates Istio semantics, it only builds matchers (regexes) once at configure time.
//! Any change to the wire shape bumps [`VERSION`]; readers reject versions they do not know.

mod cluster;
mod l4;
mod listener;
pub mod packed;
mod route;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use cluster::*;
pub use l4::*;
pub use listener::*;
pub use route::*;

/// Wire version of the rules document. The golden-document test (`tests/golden.rs`) fails
/// when the wire shape changes, so that every change bumps it.
pub const VERSION: u32 = 5;

/// Why bytes are not a rules document this build can read.
#[derive(Debug)]
pub enum ReadError {
    /// Another version: the shape may differ, so the rest is not read.
    Version {
        found: u32,
    },
    Invalid(serde_json::Error),
    /// A packed document (see [`packed`]) that does not unpack.
    Packed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version { found } => write!(
                f,
                "rules document version {found} is not supported (this filter reads version {VERSION})"
            ),
            Self::Invalid(e) => write!(f, "rules document is not valid: {e}"),
            Self::Packed(e) => write!(f, "packed rules document: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl RulesDocument {
    /// Reads a document, checking its version before anything else: a document of another
    /// version is refused as such, not for the fields this version does not know.
    /// A packed document (see [`packed`]) is unpacked first.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReadError> {
        if let Some(unpacked) = packed::unpack(bytes) {
            return Self::from_plain_json(&unpacked?);
        }
        Self::from_plain_json(bytes)
    }

    fn from_plain_json(bytes: &[u8]) -> Result<Self, ReadError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let found = serde_json::from_slice::<Versioned>(bytes)
            .map_err(ReadError::Invalid)?
            .version;
        if found != VERSION {
            return Err(ReadError::Version { found });
        }
        serde_json::from_slice(bytes).map_err(ReadError::Invalid)
    }
}

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
    /// Gateway ports a proxy listens on for a server port of another number (a Kubernetes
    /// Service's `targetPort`: Istio's ingress gateway takes port 80 on 8080).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_aliases: Vec<PortAlias>,
    /// A sidecar's inbound ports (what a transparent sidecar serves on its inbound side).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<InboundPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Requests arriving on `listener` are served by the route table of `table`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortAlias {
    pub listener: u16,
    pub table: u16,
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
    /// Who picks endpoints and applies the clusters' policies.
    #[serde(default, skip_serializing_if = "EndpointSelection::is_filter")]
    pub endpoint_selection: EndpointSelection,
}

/// Who chooses the endpoint of a cluster, and so who applies its balancing, outlier
/// detection, connection pool and TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointSelection {
    /// The filter, from the endpoints the document lists (meshroute's own Envoy bootstrap
    /// and `meshroute run`).
    #[default]
    Filter,
    /// The host, from its own discovery (inside Istio: istiod's EDS clusters, configured by
    /// istiod from the DestinationRules). The filter names clusters only.
    Host,
}

impl EndpointSelection {
    pub fn is_filter(&self) -> bool {
        *self == Self::Filter
    }
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

/// A port's protocol, as Istio names them (`ports[].protocol`, or the port name's prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    /// Not declared: Istio sniffs it.
    #[default]
    Unspecified,
    Http,
    Http2,
    Https,
    Grpc,
    #[serde(rename = "GRPC-WEB")]
    GrpcWeb,
    Tcp,
    Tls,
    Mongo,
    Redis,
    Mysql,
    Udp,
}

impl Protocol {
    /// Istio's protocol names, case-insensitively (`None`: not one of them).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "" => Self::Unspecified,
            "HTTP" => Self::Http,
            "HTTP2" => Self::Http2,
            "HTTPS" => Self::Https,
            "GRPC" => Self::Grpc,
            "GRPC-WEB" => Self::GrpcWeb,
            "TCP" => Self::Tcp,
            "TLS" => Self::Tls,
            "MONGO" => Self::Mongo,
            "REDIS" => Self::Redis,
            "MYSQL" => Self::Mysql,
            "UDP" => Self::Udp,
            _ => return None,
        })
    }

    pub fn is_unspecified(&self) -> bool {
        *self == Self::Unspecified
    }

    /// Served request by request (HTTP, HTTP2, GRPC, GRPC-WEB); unspecified ports are sniffed.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc | Self::GrpcWeb)
    }

    /// HTTP/2 to the endpoints (HTTP2, GRPC, GRPC-WEB).
    pub fn is_http2(self) -> bool {
        matches!(self, Self::Http2 | Self::Grpc | Self::GrpcWeb)
    }
}

/// Builds the Istio cluster name `outbound|port|subset|host`.
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

pub(crate) fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub(crate) fn default_true() -> bool {
    true
}

pub(crate) fn default_weight() -> u32 {
    1
}
