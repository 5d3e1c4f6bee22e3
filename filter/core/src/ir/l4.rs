//! Connection-level routes: TCP, and TLS routed on its SNI without terminating it.

use serde::{Deserialize, Serialize};

use super::{is_false, Destination, SourceRef};

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
