//! Loading Istio and Kubernetes objects from text, files and directories.

use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::api;
use crate::diag::{Diagnostic, ResourceId, Severity};
use crate::source::{FieldPath, Node, Pos};

/// Where a resource was read from: the file and its whole document tree (for positions).
#[derive(Clone, Debug)]
pub struct Origin {
    pub file: Arc<str>,
    pub doc: Arc<Node>,
    /// Path of the object inside the document (non-empty for `List` items).
    pub base: FieldPath,
}

impl Origin {
    /// Position of a field path relative to the object.
    pub fn pos(&self, rel: &FieldPath) -> Pos {
        let mut full = self.base.clone();
        full.0.extend(rel.0.iter().cloned());
        self.doc.locate(&full)
    }

    pub fn object_pos(&self) -> Pos {
        self.doc.locate(&self.base)
    }
}

/// One object with its metadata, spec and origin.
#[derive(Clone, Debug)]
pub struct Resource<T> {
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub labels: api::Labels,
    pub annotations: api::Labels,
    pub creation_timestamp: Option<String>,
    /// Position in load order; objects without a creation timestamp count as created in this order.
    pub order: usize,
    pub spec: T,
    pub origin: Origin,
}

impl<T> Resource<T> {
    pub fn id(&self) -> ResourceId {
        ResourceId {
            kind: self.kind.to_string(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// A diagnostic about a field of this resource (`rel` is relative to the object).
    pub fn diag(
        &self,
        severity: Severity,
        rel: &FieldPath,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.origin.file.to_string(),
            pos: self.origin.pos(rel),
            resource: Some(self.id()),
            path: rel.to_string(),
            message: message.into(),
        }
    }

    /// The object as it was written (JSON), for tools that hand it on.
    pub fn object_json(&self) -> serde_json::Value {
        self.origin
            .doc
            .at(&self.origin.base)
            .map_or(serde_json::Value::Null, Node::to_json)
    }

    /// Sort key for "oldest wins": creation timestamp (RFC 3339 sorts lexically), then load
    /// order, then name and namespace.
    pub fn age_key(&self) -> (String, usize, &str, &str) {
        (
            self.creation_timestamp.clone().unwrap_or_default(),
            self.order,
            &self.name,
            &self.namespace,
        )
    }
}

/// Everything loaded, by kind.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub virtual_services: Vec<Resource<api::VirtualService>>,
    pub destination_rules: Vec<Resource<api::DestinationRule>>,
    pub gateways: Vec<Resource<api::Gateway>>,
    pub service_entries: Vec<Resource<api::ServiceEntry>>,
    pub sidecars: Vec<Resource<api::Sidecar>>,
    pub workload_entries: Vec<Resource<api::WorkloadEntry>>,
    pub services: Vec<Resource<api::KubeService>>,
    /// Source files, for `/config_dump` and `explain`.
    pub files: Vec<String>,
    /// The `exportTo` of Kubernetes Services (MeshConfig `defaultServiceExportTo`; empty:
    /// every namespace).
    pub default_service_export_to: Vec<String>,
    next_order: usize,
}

impl Config {
    /// Parses one text (YAML or JSON, multi-document) named `file` and adds its objects.
    #[cfg(feature = "yaml")]
    pub fn add_text(&mut self, file: &str, text: &str) -> Vec<Diagnostic> {
        let mut diags = Vec::new();
        self.files.push(file.to_string());
        let docs = match crate::source::parse_documents(text) {
            Ok(docs) => docs,
            Err(e) => {
                diags.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.to_string(),
                    pos: e.pos,
                    resource: None,
                    path: String::new(),
                    message: format!("invalid YAML: {}", e.message),
                });
                return diags;
            }
        };
        let file: Arc<str> = Arc::from(file);
        for doc in docs {
            let doc = Arc::new(doc);
            self.add_object(&file, &doc, FieldPath::root(), &mut diags);
        }
        diags
    }

    /// Reads files and directories (recursively, `.yaml`, `.yml` and `.json`, sorted by name).
    /// Entries named `..*` are skipped: a mounted ConfigMap keeps each file once at the top
    /// (a link into `..data`) and again in `..data` and its timestamped directory.
    #[cfg(feature = "yaml")]
    pub fn add_path(&mut self, path: &std::path::Path) -> Vec<Diagnostic> {
        let io_error = |e: std::io::Error| Diagnostic {
            severity: Severity::Error,
            file: path.display().to_string(),
            pos: Pos::default(),
            resource: None,
            path: String::new(),
            message: format!("cannot read: {e}"),
        };
        if path.is_dir() {
            let mut entries: Vec<std::path::PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => return vec![io_error(e)],
            };
            entries.sort();
            let mut diags = Vec::new();
            for entry in entries {
                if is_hidden(&entry) {
                    continue;
                }
                if entry.is_dir() || is_config_file(&entry) {
                    diags.extend(self.add_path(&entry));
                }
            }
            return diags;
        }
        match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => self.add_text(&path.display().to_string(), &text),
                Err(e) => vec![Diagnostic {
                    severity: Severity::Error,
                    file: path.display().to_string(),
                    pos: Pos::default(),
                    resource: None,
                    path: String::new(),
                    message: format!(
                        "file is not UTF-8 text (byte {})",
                        e.utf8_error().valid_up_to()
                    ),
                }],
            },
            Err(e) => vec![io_error(e)],
        }
    }

    fn add_object(
        &mut self,
        file: &Arc<str>,
        doc: &Arc<Node>,
        base: FieldPath,
        diags: &mut Vec<Diagnostic>,
    ) {
        let Some(obj) = doc.at(&base) else {
            return;
        };
        let at = |rel: &str| {
            let p = if rel.is_empty() {
                base.clone()
            } else {
                base.key(rel)
            };
            doc.locate(&p)
        };
        let whole = |message: String, rel: &str| Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            pos: at(rel),
            resource: None,
            path: rel.to_string(),
            message,
        };
        if !matches!(obj.value, crate::source::NodeValue::Map(_)) {
            diags.push(whole("a Kubernetes object must be a mapping".into(), ""));
            return;
        }
        let kind = obj
            .get("kind")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_string();
        let api_version = obj
            .get("apiVersion")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_string();
        if kind.is_empty() {
            diags.push(whole("object has no `kind`".into(), "kind"));
            return;
        }
        if kind == "List" || kind.ends_with("List") {
            let Some(items) = obj.get("items") else {
                diags.push(whole(format!("{kind} has no `items`"), "items"));
                return;
            };
            if let crate::source::NodeValue::Seq(list) = &items.value {
                for i in 0..list.len() {
                    self.add_object(file, doc, base.key("items").idx(i), diags);
                }
            } else {
                diags.push(whole("`items` must be a list".into(), "items"));
            }
            return;
        }
        let group = api_version.split('/').next().unwrap_or_default();
        let istio = group == "networking.istio.io";
        let version_ok = |versions: &[&str]| {
            versions
                .iter()
                .any(|v| api_version == format!("networking.istio.io/{v}"))
        };
        const ISTIO_VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
        let known = match kind.as_str() {
            "VirtualService" | "DestinationRule" | "Gateway" | "ServiceEntry" | "Sidecar"
            | "WorkloadEntry" => istio,
            "Service" => api_version == "v1",
            _ => false,
        };
        if !known {
            diags.push(Diagnostic {
                severity: Severity::Warning,
                file: file.to_string(),
                pos: at("kind"),
                resource: None,
                path: "kind".into(),
                message: format!("unsupported kind {kind:?} (apiVersion {api_version:?}) skipped"),
            });
            return;
        }
        if istio && !version_ok(ISTIO_VERSIONS) {
            diags.push(whole(
                format!("unknown apiVersion {api_version:?} for {kind}: expected networking.istio.io/v1, v1beta1 or v1alpha3"),
                "apiVersion",
            ));
            return;
        }
        let origin = Origin {
            file: file.clone(),
            doc: doc.clone(),
            base: base.clone(),
        };
        let meta: api::ObjectMeta = match obj.get("metadata") {
            Some(m) => {
                match typed::<api::ObjectMeta>(m, &origin, &FieldPath::root().key("metadata")) {
                    Ok(m) => m,
                    Err(d) => {
                        diags.push(d.into_diag(file, None));
                        return;
                    }
                }
            }
            None => api::ObjectMeta::default(),
        };
        let id = ResourceId {
            kind: kind.clone(),
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone(),
        };
        if meta.name.is_empty() {
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                pos: at("metadata"),
                resource: Some(id),
                path: "metadata.name".into(),
                message: "name is required".into(),
            });
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        let spec_path = FieldPath::root().key("spec");
        let spec_node = obj.get("spec");
        macro_rules! push {
            ($field:ident, $ty:ty, $kind:literal) => {{
                let spec: Result<$ty, TypedError> = match spec_node {
                    Some(n) => typed::<$ty>(n, &origin, &spec_path),
                    None => Ok(<$ty>::default()),
                };
                match spec {
                    Ok(spec) => self.$field.push(Resource {
                        kind: $kind,
                        name: meta.name.clone(),
                        namespace: id.namespace.clone(),
                        labels: meta.labels.clone(),
                        annotations: meta.annotations.clone(),
                        creation_timestamp: meta.creation_timestamp.clone(),
                        order,
                        spec,
                        origin,
                    }),
                    Err(d) => diags.push(d.into_diag(file, Some(id.clone()))),
                }
            }};
        }
        match kind.as_str() {
            "VirtualService" => push!(virtual_services, api::VirtualService, "VirtualService"),
            "DestinationRule" => push!(destination_rules, api::DestinationRule, "DestinationRule"),
            "Gateway" => push!(gateways, api::Gateway, "Gateway"),
            "ServiceEntry" => push!(service_entries, api::ServiceEntry, "ServiceEntry"),
            "Sidecar" => push!(sidecars, api::Sidecar, "Sidecar"),
            "WorkloadEntry" => push!(workload_entries, api::WorkloadEntry, "WorkloadEntry"),
            _ => push!(services, api::KubeService, "Service"),
        }
    }
}

/// A typed-deserialization failure, positioned.
pub(crate) struct TypedError {
    pub pos: Pos,
    pub path: String,
    pub message: String,
}

impl TypedError {
    fn into_diag(self, file: &str, resource: Option<ResourceId>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            pos: self.pos,
            resource,
            path: self.path,
            message: self.message,
        }
    }
}

/// Deserializes `node` (found at `rel` inside the object) as `T`, mapping errors to positions.
pub(crate) fn typed<T: DeserializeOwned>(
    node: &Node,
    origin: &Origin,
    rel: &FieldPath,
) -> Result<T, TypedError> {
    serde_path_to_error::deserialize::<_, T>(node).map_err(|e| {
        let inner = FieldPath::parse(&e.path().to_string());
        let mut full = rel.clone();
        full.0.extend(inner.0.iter().cloned());
        let full = full;
        let raw = e.inner().to_string();
        // For an unknown field, point at the offending key itself.
        let mut pos = origin.pos(&full);
        let mut full = full;
        let mut path = full.to_string();
        if let Some(name) = raw
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            // The reported path may already end with the unknown key.
            if full.0.last() == Some(&crate::source::Seg::Key(name.to_string())) {
                full.0.pop();
            }
            let mut abs = origin.base.clone();
            abs.0.extend(full.0.iter().cloned());
            if let Some(p) = origin.doc.locate_key(&abs, name) {
                pos = p;
            }
            path = full.key(name).to_string();
        }
        TypedError {
            pos,
            path,
            message: raw,
        }
    })
}

/// Whether a directory entry is skipped: `..data` and the timestamped directories of a
/// Kubernetes ConfigMap volume, reached through their links instead.
pub fn is_hidden(entry: &std::path::Path) -> bool {
    entry
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."))
}

/// Whether a file found in a directory is configuration (`.yaml`, `.yml`, `.json`); other
/// files there are not read (a file named on its own always is).
pub fn is_config_file(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}
