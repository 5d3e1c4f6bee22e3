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
    /// `defaultServiceExportTo`, `defaultVirtualServiceExportTo`,
    /// `defaultDestinationRuleExportTo`: the `exportTo` of what sets none (empty: `*`).
    pub default_export_to: DefaultExportTo,
    /// `localityLbSetting`: the locality balancing of DestinationRules that set none.
    pub locality_lb_setting: Option<crate::api::LocalityLbSetting>,
    /// `h2UpgradePolicy: UPGRADE`: HTTP/1.1 ports are sent HTTP/2 unless a DestinationRule
    /// says `DO_NOT_UPGRADE`.
    pub h2_upgrade: bool,
    /// `accessLogFile` (`None`: no mesh configuration says; empty: logging off) and
    /// `accessLogEncoding: JSON`, for the proxies that log.
    pub access_log_file: Option<String>,
    pub access_log_json: Option<bool>,
}

/// The mesh's default `exportTo` per kind; an empty list exports to every namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefaultExportTo {
    /// Kubernetes Services and ServiceEntries.
    pub services: Vec<String>,
    pub virtual_services: Vec<String>,
    pub destination_rules: Vec<String>,
}

impl DefaultExportTo {
    /// `config` with each of these defaults given to the objects that set no `exportTo`.
    pub fn apply(&self, config: &crate::Config) -> crate::Config {
        let mut out = config.clone();
        let fill = |export_to: &mut Vec<String>, default: &[String]| {
            if export_to.is_empty() {
                export_to.extend_from_slice(default);
            }
        };
        for vs in &mut out.virtual_services {
            fill(&mut vs.spec.export_to, &self.virtual_services);
        }
        for dr in &mut out.destination_rules {
            fill(&mut dr.spec.export_to, &self.destination_rules);
        }
        for se in &mut out.service_entries {
            fill(&mut se.spec.export_to, &self.services);
        }
        out.default_service_export_to.clone_from(&self.services);
        out
    }
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            outbound_traffic_policy: ir::OutboundPolicy::AllowAny,
            root_namespace: "istio-system".into(),
            connect_timeout_ms: 10_000,
            default_http_retry: Some(crate::lower::default_retry_policy()),
            default_export_to: DefaultExportTo::default(),
            locality_lb_setting: None,
            h2_upgrade: false,
            access_log_file: None,
            access_log_json: None,
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
