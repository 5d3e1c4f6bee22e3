//! Who a rules document is compiled for, and the mesh-wide settings that shape it.

use std::collections::BTreeMap;

use meshroute_core::ir::{self, ProxyKind};

/// Who the document is compiled for.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub kind: ProxyKind,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone` (empty: unknown; locality balancing then has no effect).
    pub locality: String,
    /// Who picks endpoints: the filter (meshroute's own hosts) or the proxy's own discovery
    /// (inside Istio, istiod's EDS clusters).
    pub endpoint_selection: ir::EndpointSelection,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            kind: ProxyKind::Sidecar,
            namespace: "default".into(),
            labels: BTreeMap::new(),
            locality: String::new(),
            endpoint_selection: ir::EndpointSelection::Filter,
        }
    }
}

/// Mesh-wide settings (MeshConfig) that change the outcome.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub outbound_traffic_policy: ir::OutboundPolicy,
    pub root_namespace: String,
    pub connect_timeout_ms: u64,
    /// `defaultHttpRetryPolicy`: the retries of routes that set none (`None`: no retries).
    pub default_http_retry: Option<ir::RetryPolicy>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            outbound_traffic_policy: ir::OutboundPolicy::AllowAny,
            root_namespace: "istio-system".into(),
            connect_timeout_ms: 10_000,
            default_http_retry: Some(crate::lower::default_retry_policy()),
        }
    }
}

impl ProxyOptions {
    /// A sidecar in `namespace`, without workload labels.
    pub fn sidecar(namespace: &str) -> Self {
        Self {
            kind: ProxyKind::Sidecar,
            namespace: namespace.into(),
            ..Self::default()
        }
    }

    /// For a proxy inside Istio: istiod's clusters discover the endpoints and carry the
    /// DestinationRule policies; the filter names clusters.
    pub fn in_istio(mut self) -> Self {
        self.endpoint_selection = ir::EndpointSelection::Host;
        self
    }

    /// A gateway in `namespace` with Istio's default ingress labels (`istio=ingressgateway`).
    pub fn gateway(namespace: &str) -> Self {
        Self {
            kind: ProxyKind::Gateway,
            namespace: namespace.into(),
            labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            ..Self::default()
        }
    }
}
