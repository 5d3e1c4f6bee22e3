//! Gateway listeners: the servers on each port and how each one's traffic is served.

use serde::{Deserialize, Serialize};

/// A gateway listener: one per Gateway server port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ListenerServer>,
}

/// One Gateway server on a listener, with what a host needs to terminate TLS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerServer {
    pub hosts: Vec<String>,
    /// How the server's traffic is served, decided by the compiler from the server's
    /// protocol and TLS mode (servers of several kinds may share a port).
    pub routing: ServerRouting,
    /// Certificates, for the servers that terminate TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

/// How a Gateway server's connections are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRouting {
    /// Plain HTTP (HTTP, HTTP2, GRPC, GRPC-WEB).
    #[default]
    Http,
    /// TLS terminated, HTTP inside (HTTPS with SIMPLE, MUTUAL or OPTIONAL_MUTUAL).
    TerminatedHttp,
    /// TLS terminated, TCP inside (TLS with SIMPLE, MUTUAL or OPTIONAL_MUTUAL).
    TerminatedTcp,
    /// TLS passed through, routed on its SNI by `tls` routes (PASSTHROUGH).
    Passthrough,
    /// TLS passed through; the SNI names the cluster (AUTO_PASSTHROUGH).
    AutoPassthrough,
    /// Plain TCP (TCP, MONGO, ...).
    Tcp,
}

impl ServerRouting {
    /// The proxy terminates TLS for this server.
    pub fn terminates_tls(self) -> bool {
        matches!(self, Self::TerminatedHttp | Self::TerminatedTcp)
    }

    /// TLS passes through, routed on its SNI.
    pub fn passes_tls_through(self) -> bool {
        matches!(self, Self::Passthrough | Self::AutoPassthrough)
    }

    /// What reaches the filter is HTTP (plain, or after termination).
    pub fn serves_http(self) -> bool {
        matches!(self, Self::Http | Self::TerminatedHttp)
    }
}

impl ListenerServer {
    pub fn terminates_tls(&self) -> bool {
        self.routing.terminates_tls()
    }

    pub fn passes_tls_through(&self) -> bool {
        self.routing.passes_tls_through()
    }

    pub fn serves_http(&self) -> bool {
        self.routing.serves_http()
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

/// Which client certificates a TLS-terminating server asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// None (SIMPLE).
    #[default]
    Simple,
    /// One the CA signed, required (MUTUAL).
    Mutual,
    /// One the CA signed, if the client offers one (OPTIONAL_MUTUAL).
    OptionalMutual,
}

impl ServerTlsMode {
    /// Istio's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
            Self::OptionalMutual => "OPTIONAL_MUTUAL",
        }
    }

    /// A client certificate is verified when offered.
    pub fn verifies_clients(self) -> bool {
        self != Self::Simple
    }
}

impl std::fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// `credentialNames`: up to two secrets (an RSA and an ECDSA certificate); the client CA
    /// comes from the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credential_names: Vec<String>,
    /// `tlsCertificates`: up to two certificate files with their keys (RSA and ECDSA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_certificates: Vec<CertificateFiles>,
    /// `caCertCredentialName`: the secret whose `ca.crt` verifies client certificates (it
    /// takes precedence over `credentialName`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_credential_name: Option<String>,
    /// MUTUAL / OPTIONAL_MUTUAL: a client certificate must also carry one of these subject
    /// alternative names (DNS, URI, IP or email; exact match), ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// ... have one of these base64 SHA-256 hashes of its SubjectPublicKeyInfo, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_spki: Vec<String>,
    /// ... have one of these hex SHA-256 hashes of the whole certificate (colons optional),
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_hash: Vec<String>,
    /// ... and not be revoked by the CRLs in this PEM file (one per CA of the chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
    /// `minProtocolVersion` (`TLSV1_2`, `TLSV1_3`; `None`: TLS 1.2, Envoy's server default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<TlsVersion>,
    /// `maxProtocolVersion` (`None`: TLS 1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<TlsVersion>,
    /// `cipherSuites` for TLS 1.2, in OpenSSL's names as Envoy takes them (TLS 1.3's suites
    /// are not configurable, as in Envoy); empty: the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
}

/// A server certificate and its private key, as files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub server_certificate: String,
    pub private_key: String,
}

/// A TLS protocol version a server may be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSV1_2")]
    Tls12,
    #[serde(rename = "TLSV1_3")]
    Tls13,
}

/// The TLS 1.2 cipher suites both hosts serve (OpenSSL names, as Istio and Envoy take them).
pub const TLS12_CIPHER_SUITES: [&str; 6] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

/// A sidecar's inbound port: traffic captured on its way to the workload (Istio's
/// `inbound|PORT||` clusters), from the Services that select the workload or from the
/// Sidecar's `ingress` listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The workload's port (a Service's `targetPort`, an ingress listener's port).
    pub port: u16,
    /// HTTP-family ports are proxied request by request, the others as connections.
    #[serde(default, skip_serializing_if = "super::Protocol::is_unspecified")]
    pub protocol: super::Protocol,
    /// Where the workload listens: `127.0.0.1:PORT`, `[::1]:PORT`, `0.0.0.0:PORT` (the
    /// address the connection was sent to, with this port) or `unix://PATH`; `None`: the
    /// connection's original destination, as Istio forwards since 1.10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The service the port belongs to (metrics' `destination_service`); empty when none
    /// does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// `connectionPool.tcp.maxConnections` (0: no limit).
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub max_connections: u32,
    /// `connectionPool.http.http2MaxRequests`: requests at once (0: no limit).
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub max_requests: u32,
}
