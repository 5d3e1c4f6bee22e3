//! Istio's MeshConfig, given with `--mesh-config`: a bare MeshConfig YAML, or the `istio`
//! ConfigMap that holds it under `data.mesh`. The fields that shape the rules act
//! ([`ACTING`]); every other MeshConfig field is reported as having no effect here, and a
//! field MeshConfig does not have is an error, each at its file:line.

use crate::api;
use crate::diag::{Diagnostic, Severity};
use crate::load::Origin;
use crate::options::MeshOptions;
use crate::source::{parse_documents, FieldPath, Node, NodeValue, Pos};
use meshroute_core::ir::OutboundPolicy;

/// The MeshConfig fields the compiler applies.
pub const ACTING: &[&str] = &[
    "outboundTrafficPolicy",
    "rootNamespace",
    "connectTimeout",
    "defaultHttpRetryPolicy",
    "defaultServiceExportTo",
    "defaultVirtualServiceExportTo",
    "defaultDestinationRuleExportTo",
    "localityLbSetting",
    "h2UpgradePolicy",
    "accessLogFile",
    "accessLogEncoding",
];

/// The other fields of MeshConfig (istio/api `mesh/v1alpha1/config.proto`, Istio 1.28), by
/// their JSON names: accepted as istiod accepts them, reported as not applied.
const NOT_APPLIED: &[&str] = &[
    "proxyListenPort",
    "proxyInboundListenPort",
    "proxyHttpPort",
    "protocolDetectionTimeout",
    "tcpKeepalive",
    "ingressClass",
    "ingressService",
    "ingressControllerMode",
    "ingressSelector",
    "enableTracing",
    "accessLogFormat",
    "enableEnvoyAccessLogService",
    "disableEnvoyListenerLog",
    "defaultConfig",
    "inboundTrafficPolicy",
    "configSources",
    "enableAutoMtls",
    "trustDomain",
    "trustDomainAliases",
    "caCertificates",
    "dnsRefreshRate",
    "inboundClusterStatName",
    "outboundClusterStatName",
    "certificates",
    "serviceSettings",
    "enablePrometheusMerge",
    "verifyCertificateAtClient",
    "ca",
    "extensionProviders",
    "defaultProviders",
    "discoverySelectors",
    "pathNormalization",
    "meshMTLS",
    "tlsDefaults",
    "serviceScopeConfigs",
];

/// The mesh settings in `text` (read from `file`), with what was said about them.
pub fn read(file: &str, text: &str) -> (MeshOptions, Vec<Diagnostic>) {
    let mut reader = Reader {
        file,
        line_offset: 0,
        col_offset: 0,
        prefix: String::new(),
        diags: Vec::new(),
    };
    let mut mesh = MeshOptions {
        // MeshConfig's default: an empty accessLogFile, no access log.
        access_log_file: Some(String::new()),
        ..MeshOptions::default()
    };
    if let Some(config) = reader.mesh_node(text) {
        reader.apply(&config, &mut mesh);
    }
    (mesh, reader.diags)
}

struct Reader<'a> {
    file: &'a str,
    /// Lines before the MeshConfig text, and its indentation (a ConfigMap's `data.mesh`
    /// block).
    line_offset: u32,
    col_offset: u32,
    /// Field path of the MeshConfig inside the file (`data.mesh.` in a ConfigMap).
    prefix: String,
    diags: Vec<Diagnostic>,
}

impl Reader<'_> {
    fn report(&mut self, severity: Severity, pos: Pos, path: &str, message: String) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_owned(),
            pos: Pos {
                line: pos.line + self.line_offset,
                col: pos.col + self.col_offset,
            },
            resource: None,
            path: format!("{}{path}", self.prefix),
            message,
        });
    }

    fn one_document(&mut self, text: &str) -> Option<Node> {
        match parse_documents(text) {
            Err(e) => {
                self.report(Severity::Error, e.pos, "", e.message);
                None
            }
            Ok(mut docs) if docs.len() == 1 => docs.pop(),
            Ok(docs) => {
                let pos = docs.get(1).map_or(Pos { line: 1, col: 1 }, |d| d.pos);
                self.report(
                    Severity::Error,
                    pos,
                    "",
                    format!("a mesh configuration is one document, found {}", docs.len()),
                );
                None
            }
        }
    }

    /// The MeshConfig itself: the document, or the ConfigMap's `data.mesh` text.
    fn mesh_node(&mut self, text: &str) -> Option<Node> {
        let doc = self.one_document(text)?;
        if doc.get("kind").and_then(Node::as_str) != Some("ConfigMap") {
            return Some(doc);
        }
        let Some(mesh) = doc.get("data").and_then(|d| d.get("mesh")) else {
            self.report(
                Severity::Error,
                doc.pos,
                "data.mesh",
                "the ConfigMap holds no MeshConfig under data.mesh".into(),
            );
            return None;
        };
        let Some(inner) = mesh.as_str() else {
            self.report(
                Severity::Error,
                mesh.pos,
                "data.mesh",
                "data.mesh must be a string holding the MeshConfig YAML".into(),
            );
            return None;
        };
        // The scalar's position is where its text starts (a block scalar's first line,
        // whose indentation every line of it shares).
        self.line_offset = mesh.pos.line.saturating_sub(1);
        let first = text
            .lines()
            .nth(self.line_offset as usize)
            .unwrap_or_default();
        if !first.trim_start().starts_with("mesh:") {
            let indent = first.len() - first.trim_start().len();
            self.col_offset = u32::try_from(indent).unwrap_or(0);
        }
        self.prefix = "data.mesh.".into();
        self.one_document(inner)
    }

    fn apply(&mut self, config: &Node, mesh: &mut MeshOptions) {
        let NodeValue::Map(entries) = &config.value else {
            if !matches!(config.value, NodeValue::Null) {
                self.report(
                    Severity::Error,
                    config.pos,
                    "",
                    "a MeshConfig is a mapping of its fields".into(),
                );
            }
            return;
        };
        for (key, key_pos, value) in entries {
            match key.as_str() {
                "outboundTrafficPolicy" => self.outbound(value, mesh),
                "rootNamespace" => match value.as_str() {
                    Some(ns) if !ns.is_empty() => mesh.root_namespace = ns.to_owned(),
                    _ => self.report(
                        Severity::Error,
                        value.pos,
                        key,
                        "rootNamespace must be a namespace name".into(),
                    ),
                },
                "connectTimeout" => match value.as_str().map(crate::duration::parse_ms) {
                    Some(Ok(ms)) if ms >= 1 => mesh.connect_timeout_ms = ms,
                    Some(Ok(_)) => self.report(
                        Severity::Error,
                        value.pos,
                        key,
                        "duration must be greater than 1ms".into(),
                    ),
                    Some(Err(e)) => self.report(Severity::Error, value.pos, key, e),
                    None => self.report(
                        Severity::Error,
                        value.pos,
                        key,
                        "connectTimeout must be a duration such as 10s".into(),
                    ),
                },
                "defaultHttpRetryPolicy" => {
                    if let Some(r) = self.typed::<api::HttpRetry>(key, value) {
                        mesh.default_http_retry = crate::lower::retry_policy(&r);
                    }
                }
                "accessLogFile" => match value.as_str() {
                    Some(f) => mesh.access_log_file = Some(f.to_owned()),
                    None => self.report(
                        Severity::Error,
                        value.pos,
                        key,
                        "accessLogFile must be a file name such as /dev/stdout".into(),
                    ),
                },
                "accessLogEncoding" => {
                    let json = self.choice(key, value, "AccessLogEncoding", ["TEXT", "JSON"]);
                    if json.is_some() {
                        mesh.access_log_json = json;
                    }
                }
                "h2UpgradePolicy" => {
                    let names = ["DO_NOT_UPGRADE", "UPGRADE"];
                    if let Some(upgrade) = self.choice(key, value, "H2UpgradePolicy", names) {
                        mesh.h2_upgrade = upgrade;
                    }
                }
                "localityLbSetting" => {
                    if let Some(l) = self.typed::<api::LocalityLbSetting>(key, value) {
                        mesh.locality_lb_setting = Some(l);
                    }
                }
                "defaultServiceExportTo" => {
                    mesh.default_export_to.services = self.export_to(key, value);
                }
                "defaultVirtualServiceExportTo" => {
                    mesh.default_export_to.virtual_services = self.export_to(key, value);
                }
                "defaultDestinationRuleExportTo" => {
                    mesh.default_export_to.destination_rules = self.export_to(key, value);
                }
                k if NOT_APPLIED.contains(&k) => self.report(
                    Severity::Warning,
                    *key_pos,
                    key,
                    format!("MeshConfig {k} is not applied by meshroute: it has no effect here"),
                ),
                k => self.report(
                    Severity::Error,
                    *key_pos,
                    key,
                    format!("unknown field \"{k}\" in v1alpha1.MeshConfig"),
                ),
            }
        }
    }

    fn outbound(&mut self, value: &Node, mesh: &mut MeshOptions) {
        const FIELD: &str = "outboundTrafficPolicy";
        if let NodeValue::Map(entries) = &value.value {
            for (key, key_pos, _) in entries.iter().filter(|(k, _, _)| k != "mode") {
                self.report(
                    Severity::Error,
                    *key_pos,
                    &format!("{FIELD}.{key}"),
                    format!("unknown field \"{key}\" in v1alpha1.MeshConfig.OutboundTrafficPolicy"),
                );
            }
        }
        // An absent mode is proto3's zero value, REGISTRY_ONLY.
        let allow_any = match value.get("mode") {
            None => Some(false),
            Some(mode) => self.choice(
                &format!("{FIELD}.mode"),
                mode,
                "OutboundTrafficPolicy.Mode",
                ["REGISTRY_ONLY", "ALLOW_ANY"],
            ),
        };
        match allow_any {
            Some(true) => mesh.outbound_traffic_policy = OutboundPolicy::AllowAny,
            Some(false) => mesh.outbound_traffic_policy = OutboundPolicy::RegistryOnly,
            None => {}
        }
    }

    /// A two-valued MeshConfig enum `name`: whether `value` is the second of `names`, or
    /// `None` (reported in istiod's words) when it is neither.
    fn choice(
        &mut self,
        field: &str,
        value: &Node,
        name: &str,
        [first, second]: [&str; 2],
    ) -> Option<bool> {
        match value.as_str() {
            Some(v) if v == first => Some(false),
            Some(v) if v == second => Some(true),
            other => {
                let message = format!(
                    "invalid value {:?} for enum v1alpha1.MeshConfig.{name}: {first} or {second}",
                    other.unwrap_or_default()
                );
                self.report(Severity::Error, value.pos, field, message);
                None
            }
        }
    }

    /// A default `exportTo`: namespaces, `.` (its own), `*` (all) or `~` (none).
    fn export_to(&mut self, field: &str, value: &Node) -> Vec<String> {
        let NodeValue::Seq(items) = &value.value else {
            self.report(
                Severity::Error,
                value.pos,
                field,
                format!("{field} must be a list of namespaces, \".\", \"*\" or \"~\""),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let valid = item.as_str().filter(|ns| {
                matches!(*ns, "." | "*" | "~")
                    || (!ns.is_empty()
                        && ns.len() <= 63
                        && ns
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !ns.starts_with('-')
                        && !ns.ends_with('-'))
            });
            match valid {
                Some(ns) => out.push(ns.to_owned()),
                None => self.report(
                    Severity::Error,
                    item.pos,
                    &format!("{field}[{i}]"),
                    format!(
                        "invalid exportTo value {:?}: a namespace name, \".\", \"*\" or \"~\"",
                        item.as_str().unwrap_or_default()
                    ),
                ),
            }
        }
        out
    }

    /// `value` read as the API type `T` (the same type the API field has), errors at
    /// their position.
    fn typed<T: serde::de::DeserializeOwned>(&mut self, field: &str, value: &Node) -> Option<T> {
        let origin = Origin {
            file: self.file.into(),
            doc: std::sync::Arc::new(value.clone()),
            base: FieldPath::root(),
        };
        match crate::load::typed::<T>(value, &origin, &FieldPath::root()) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = if e.path.is_empty() {
                    field.to_owned()
                } else {
                    format!("{field}.{}", e.path)
                };
                self.report(Severity::Error, e.pos, &path, e.message);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn acting_fields_shape_the_options() {
        let (mesh, diags) = read(
            "mesh.yaml",
            "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\nrootNamespace: mesh-root\nconnectTimeout: 250ms\ndefaultHttpRetryPolicy: {attempts: 5, retryOn: 5xx}\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(mesh.outbound_traffic_policy, OutboundPolicy::RegistryOnly);
        assert_eq!(mesh.root_namespace, "mesh-root");
        assert_eq!(mesh.connect_timeout_ms, 250);
        let retry = mesh.default_http_retry.unwrap();
        assert_eq!(
            (retry.num_retries, retry.retry_on),
            (5, vec!["5xx".to_string()])
        );
    }

    #[test]
    fn no_retries_by_default_when_the_mesh_says_zero_attempts() {
        let (mesh, diags) = read("mesh.yaml", "defaultHttpRetryPolicy: {attempts: 0}\n");
        assert!(diags.is_empty(), "{diags:?}");
        assert!(mesh.default_http_retry.is_none());
    }

    #[test]
    fn the_istio_configmap_is_read_with_positions_inside_it() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    accessLogFormat: \"%START_TIME%\"\n    rootNamespace: other\n    conectTimeout: 1s\n";
        let (mesh, diags) = read("istio.yaml", text);
        assert_eq!(mesh.root_namespace, "other");
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert_eq!(diags[0].severity, Severity::Warning);
        assert_eq!(
            (diags[0].pos.line, diags[0].pos.col, diags[0].path.as_str()),
            (6, 5, "data.mesh.accessLogFormat")
        );
        assert!(diags[1].is_error());
        assert_eq!(
            (diags[1].pos.line, diags[1].path.as_str()),
            (8, "data.mesh.conectTimeout")
        );
        assert!(diags[1].message.contains("unknown field \"conectTimeout\""));
    }

    #[test]
    fn default_export_to_hides_what_sets_none_from_other_namespaces() {
        let (mesh, diags) = read(
            "mesh.yaml",
            "defaultServiceExportTo: [\".\"]\ndefaultVirtualServiceExportTo: [\".\", other]\ndefaultDestinationRuleExportTo: [\"Bad_NS\"]\n",
        );
        assert_eq!(mesh.default_export_to.services, ["."]);
        assert_eq!(mesh.default_export_to.virtual_services, [".", "other"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].path, "defaultDestinationRuleExportTo[0]");
    }

    #[test]
    fn the_meshs_locality_settings_are_read_as_a_destination_rules() {
        let (mesh, diags) = read(
            "mesh.yaml",
            "localityLbSetting:\n  enabled: true\n  failover: [{from: us-east, to: eu-west}]\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        let l = mesh.locality_lb_setting.unwrap();
        assert_eq!(
            (l.failover[0].from.as_str(), l.failover[0].to.as_str()),
            ("us-east", "eu-west")
        );
        let (_, diags) = read("mesh.yaml", "localityLbSetting:\n  failovr: []\n");
        assert_eq!(
            diags
                .iter()
                .map(|d| (d.pos.line, d.path.as_str()))
                .collect::<Vec<_>>(),
            [(2, "localityLbSetting.failovr")]
        );
    }

    #[test]
    fn invalid_values_are_errors_at_their_position() {
        let (mesh, diags) = read(
            "mesh.yaml",
            "outboundTrafficPolicy:\n  mode: ALLOW_SOME\nconnectTimeout: 0s\ndefaultHttpRetryPolicy: {attempts: 2, retryOn: 5xx, perTry: 1s}\n",
        );
        let at: Vec<(u32, &str)> = diags
            .iter()
            .map(|d| (d.pos.line, d.path.as_str()))
            .collect();
        assert_eq!(
            at,
            [
                (2, "outboundTrafficPolicy.mode"),
                (3, "connectTimeout"),
                (4, "defaultHttpRetryPolicy.perTry")
            ],
            "{diags:?}"
        );
        assert!(diags.iter().all(Diagnostic::is_error));
        assert_eq!(
            mesh.connect_timeout_ms,
            MeshOptions::default().connect_timeout_ms
        );
    }
}
