//! What a proxy inside Istio needs from istiod besides the filter: the DestinationRules it
//! sees, handed to istiod so that every subset cluster the rules name exists (istiod builds
//! `outbound|port|subset|host` clusters, with their endpoints and policies, only for subsets a
//! DestinationRule defines).

use serde_json::{json, Value};

use crate::load::Config;
use crate::options::ProxyOptions;
use crate::resolve::{selects, visible};

/// Prefix of the names the copies carry, so that they sit beside the user's own.
pub const COPY_PREFIX: &str = "meshroute-";

/// The DestinationRules visible to `proxy`, as written, renamed `meshroute-<name>`: applied
/// to istiod they give the mesh the subsets and policies the rules were compiled with.
/// istiod merges them with identical rules of the user's (subsets by name, the first
/// traffic policy standing), so applying both is harmless.
pub fn destination_rules(config: &Config, proxy: &ProxyOptions) -> Vec<Value> {
    config
        .destination_rules
        .iter()
        .filter(|d| visible(&d.spec.export_to, &d.namespace, &proxy.namespace))
        .filter(|d| {
            d.spec.workload_selector.as_ref().is_none_or(|w| {
                d.namespace == proxy.namespace && selects(&w.match_labels, &proxy.labels)
            })
        })
        .map(|d| {
            let written = d.object_json();
            let source = format!("{}:{}", d.origin.file, d.origin.object_pos().line);
            json!({
                "apiVersion": written["apiVersion"],
                "kind": "DestinationRule",
                "metadata": {
                    "name": format!("{COPY_PREFIX}{}", d.name),
                    "namespace": d.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "meshroute"},
                    "annotations": {"meshroute.io/source": source},
                },
                "spec": written["spec"],
            })
        })
        .collect()
}
