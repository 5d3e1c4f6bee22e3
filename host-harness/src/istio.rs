//! Manifests that load the filter into Istio's own proxies and make its decisions take effect
//! in the configuration istiod generates (see ARCHITECTURE.md, "Inside Istio").
//!
//! istiod's routes name their own clusters, so a filter that only sets a cluster header would
//! be ignored. The manifests therefore add, before anything else, to every virtual host of the
//! proxy's route configurations, a route that matches only when the filter named a cluster and
//! sends the request there (`cluster_header`) with Envoy's previous-hosts retry predicate; the
//! filter mutates the request headers, so Envoy matches the routes again and takes it. The
//! clusters are istiod's own EDS clusters (`outbound|port|subset|host`): endpoints stay
//! current, and DestinationRule policies (balancing, outlier detection, pools, TLS, the mesh's
//! mTLS) are Envoy's, configured by istiod. The DestinationRules the rules were compiled with
//! go to istiod too, so that every subset cluster the filter can name exists.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use meshroute_core::contract::{
    l4_root_id, BLACKHOLE_CLUSTER, CLUSTER_HEADER, ENDPOINT_HEADER, HTTP_ROOT_ID,
    LISTENER_PORT_HEADER,
};
use meshroute_core::ir::{self, ProxyKind, RulesDocument};

use crate::envoy_config::{network_wasm_filter, wasm_filter, ConfigError};

const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";

/// Which manifest to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ManifestKind {
    /// A WasmPlugin per filter (module fetched by the istio-agent), plus an EnvoyFilter for
    /// the routes.
    WasmPlugin,
    /// One EnvoyFilter: the filter inline (module from a file in the proxy), and the routes.
    EnvoyFilter,
}

/// When the rules travel packed (zlib + base64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Packing {
    /// Above 32 KiB of JSON.
    Auto,
    Always,
    Never,
}

/// Above this the rules are packed under `Packing::Auto`.
const PACK_ABOVE: usize = 32 << 10;

/// Where the rules go in Istio: which proxies and which module.
pub struct Target<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// Module location: a file path in the proxy (EnvoyFilter) or an `oci://`, `https://` or
    /// `file://` URL (WasmPlugin).
    pub module: &'a str,
    pub selector: &'a BTreeMap<String, String>,
    pub packing: Packing,
}

/// The rules as the filter's configuration: the document, or its packed form.
fn rules_config(doc: &RulesDocument, packing: Packing) -> Result<Value, ConfigError> {
    let plain = serde_json::to_value(doc)?;
    let pack = match packing {
        Packing::Always => true,
        Packing::Never => false,
        Packing::Auto => serde_json::to_vec(&plain)?.len() > PACK_ABOVE,
    };
    Ok(if pack { ir::packed::pack(doc)? } else { plain })
}

/// The EnvoyFilter patch context of the proxy.
fn context(doc: &RulesDocument) -> &'static str {
    match doc.proxy.kind {
        ProxyKind::Sidecar => "SIDECAR_OUTBOUND",
        ProxyKind::Gateway => "GATEWAY",
    }
}

/// The port the proxy listens on for `table_port` (a gateway Service's `targetPort`): istiod
/// matches listeners, EnvoyFilter `portNumber` and WasmPlugin ports by it.
fn listener_port(doc: &RulesDocument, table_port: u16) -> u16 {
    doc.port_aliases
        .iter()
        .find(|a| a.table == table_port)
        .map_or(table_port, |a| a.listener)
}

/// Client copies of meshroute's own headers go before any filter runs, so that nothing a
/// client sends can take the filter's route, even with the filter failed open.
fn strip_patch(doc: &RulesDocument) -> Value {
    let removals: Vec<Value> = [CLUSTER_HEADER, ENDPOINT_HEADER, LISTENER_PORT_HEADER]
        .iter()
        .map(|h| json!({"remove": h}))
        .collect();
    json!({
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": context(doc),
            "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}},
        },
        "patch": {
            "operation": "INSERT_FIRST",
            "value": {
                "name": "meshroute.strip",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": removals},
                },
            },
        },
    })
}

/// No retries but those the filter asks for (`x-envoy-max-retries`, `x-envoy-retry-on`),
/// to another endpoint as istiod's policies say (`route/retry/retry.go`): the previous-hosts
/// predicate, except on consistent-hash routes, where a retry stays on the hashed host.
fn retry_policy(hashed: bool) -> Value {
    let mut policy = json!({
        "num_retries": 0,
        "host_selection_retry_max_attempts": "5",
    });
    if !hashed {
        policy["retry_host_predicate"] = json!([{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }]);
    }
    policy
}

/// Istio's hash policy for a consistent-hash DestinationRule (as istiod writes it on routes).
fn hash_policy(h: &ir::ConsistentHash) -> Value {
    match &h.key {
        ir::HashKey::Header(name) => json!({"header": {"header_name": name}}),
        ir::HashKey::Cookie {
            name,
            path,
            ttl_ms,
            attributes,
        } => {
            let mut cookie = json!({"name": name});
            if let Some(p) = path {
                cookie["path"] = json!(p);
            }
            if !attributes.is_empty() {
                cookie["attributes"] = attributes
                    .iter()
                    .map(|a| json!({"name": a.name, "value": a.value}))
                    .collect();
            }
            if let Some(ms) = ttl_ms {
                cookie["ttl"] = json!(format!("{}s", *ms as f64 / 1000.0));
            }
            json!({"cookie": cookie})
        }
        ir::HashKey::SourceIp => json!({"connection_properties": {"source_ip": true}}),
        ir::HashKey::QueryParameter(name) => json!({"query_parameter": {"name": name}}),
    }
}

/// The route that takes the requests the filter named a cluster for (`cluster`: only those
/// for that cluster, with its hash policy).
fn filter_route(name: &str, cluster: Option<&ir::Cluster>) -> Value {
    let header = match cluster {
        None => json!({"name": CLUSTER_HEADER, "present_match": true}),
        Some(c) => json!({"name": CLUSTER_HEADER, "string_match": {"exact": c.name}}),
    };
    let hash = cluster.and_then(|c| c.lb.consistent_hash.as_ref());
    let mut route = json!({
        "cluster_header": CLUSTER_HEADER,
        // The filter sets x-envoy-upstream-rq-timeout-ms when a VirtualService asks.
        "timeout": "0s",
        "max_grpc_timeout": "0s",
        "retry_policy": retry_policy(hash.is_some()),
    });
    if let Some(h) = hash {
        route["hash_policy"] = json!([hash_policy(h)]);
    }
    json!({
        "name": name,
        "match": {"prefix": "/", "headers": [header]},
        "route": route,
        "request_headers_to_remove": [CLUSTER_HEADER],
    })
}

/// The filter's routes in the order Envoy must try them: one per consistent-hash cluster,
/// then the general one.
fn filter_routes(doc: &RulesDocument) -> Vec<Value> {
    let mut routes: Vec<Value> = doc
        .clusters
        .iter()
        .filter(|c| c.lb.consistent_hash.is_some())
        .map(|c| filter_route(&format!("{HTTP_ROOT_ID}.hash.{}", c.name), Some(c)))
        .collect();
    routes.push(filter_route(HTTP_ROOT_ID, None));
    routes
}

/// The last characters a host can end with: a suffix wildcard for each (`*a` … `*9`, `*.`
/// for a rooted name, `*]` for an IPv6 literal) matches every host without the catch-all
/// `*`, which a route configuration may hold only once and istiod may already use.
const HOST_ENDINGS: &str = "abcdefghijklmnopqrstuvwxyz0123456789.]";

/// The filter's routes first in every virtual host istiod generated (INSERT_FIRST
/// prepends, so they go in reverse). At a gateway also a virtual host of their own, for the
/// hosts istiod has no virtual host for (a VirtualService istiod was not given): Envoy picks
/// it only when no exact, longer suffix or `*` domain of istiod's matches.
fn route_patches(doc: &RulesDocument) -> Vec<Value> {
    let routes = filter_routes(doc);
    let mut patches: Vec<Value> = routes
        .iter()
        .rev()
        .map(|r| {
            json!({
                "applyTo": "HTTP_ROUTE",
                "match": {"context": context(doc)},
                "patch": {"operation": "INSERT_FIRST", "value": r},
            })
        })
        .collect();
    if doc.proxy.kind == ProxyKind::Gateway {
        let domains: Vec<String> = HOST_ENDINGS.chars().map(|c| format!("*{c}")).collect();
        patches.push(json!({
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": context(doc)},
            "patch": {
                "operation": "ADD",
                "value": {"name": HTTP_ROOT_ID, "domains": domains, "routes": routes},
            },
        }));
    }
    patches
}

/// The filter itself, before Envoy's fault and CORS filters: the filter injects the
/// VirtualService's faults and answers its CORS, so istiod's copies of them (read from the
/// route istiod matched) must not run as well. The route the filter's headers lead to carries
/// none, so they do not.
fn http_filter_patch(doc: &RulesDocument, rules: &str, module: &str) -> Value {
    json!({
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": context(doc),
            "listener": {"filterChain": {"filter": {
                "name": "envoy.filters.network.http_connection_manager",
                "subFilter": {"name": "envoy.filters.http.fault"},
            }}},
        },
        "patch": {
            "operation": "INSERT_BEFORE",
            "value": {"name": HTTP_ROOT_ID, "typed_config": wasm_filter(rules, module, "FAIL_CLOSED")},
        },
    })
}

/// The filter as a network filter in front of the TCP proxy of each connection table's port.
fn network_filter_patches(doc: &RulesDocument, rules: &str, module: &str) -> Vec<Value> {
    doc.l4_tables
        .iter()
        .map(|t| {
            json!({
                "applyTo": "NETWORK_FILTER",
                "match": {
                    "context": context(doc),
                    "listener": {
                        "portNumber": listener_port(doc, t.port),
                        "filterChain": {"filter": {"name": TCP_PROXY}},
                    },
                },
                "patch": {
                    "operation": "INSERT_BEFORE",
                    "value": {
                        "name": l4_root_id(t.port),
                        "typed_config": network_wasm_filter(rules, module, "FAIL_CLOSED", t.port),
                    },
                },
            })
        })
        .collect()
}

/// istiod's TCP proxies pick among weighted clusters without looking at the connection's
/// filter state, where the filter names its cluster; with one cluster (the black hole, for
/// connections the filter does not name a cluster for) the filter's choice applies. MERGE
/// replaces the `weighted_clusters` of the oneof with `cluster`.
fn tcp_proxy_patches(doc: &RulesDocument) -> Vec<Value> {
    doc.l4_tables
        .iter()
        .map(|t| {
            json!({
                "applyTo": "NETWORK_FILTER",
                "match": {
                    "context": context(doc),
                    "listener": {
                        "portNumber": listener_port(doc, t.port),
                        "filterChain": {"filter": {"name": TCP_PROXY}},
                    },
                },
                "patch": {
                    "operation": "MERGE",
                    "value": {
                        "name": TCP_PROXY,
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "cluster": BLACKHOLE_CLUSTER,
                        },
                    },
                },
            })
        })
        .collect()
}

fn envoy_filter(t: &Target<'_>, name: &str, patches: Vec<Value>) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": name, "namespace": t.namespace},
        "spec": {
            "workloadSelector": {"labels": t.selector},
            "configPatches": patches,
        },
    })
}

fn wasm_plugin(t: &Target<'_>, name: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["selector"] = json!({"matchLabels": t.selector});
    spec["url"] = json!(t.module);
    spec["failStrategy"] = json!("FAIL_CLOSE");
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": t.namespace},
        "spec": spec,
    })
}

/// Everything the proxies `t` selects need, as a `List`: the filter (an EnvoyFilter, or
/// WasmPlugins and an EnvoyFilter for the routes) and `destination_rules` for istiod.
pub fn manifest(
    doc: &RulesDocument,
    destination_rules: Vec<Value>,
    kind: ManifestKind,
    t: &Target<'_>,
) -> Result<Value, ConfigError> {
    let config = rules_config(doc, t.packing)?;
    let mut items = Vec::new();
    let mut patches = vec![strip_patch(doc)];
    match kind {
        ManifestKind::EnvoyFilter => {
            let rules = serde_json::to_string(&config)?;
            patches.push(http_filter_patch(doc, &rules, t.module));
            patches.extend(network_filter_patches(doc, &rules, t.module));
            patches.extend(tcp_proxy_patches(doc));
            patches.extend(route_patches(doc));
            items.push(envoy_filter(t, t.name, patches));
        }
        ManifestKind::WasmPlugin => {
            // UNSPECIFIED_PHASE: after Istio's authentication and authorization filters,
            // before its fault and CORS filters.
            items.push(wasm_plugin(
                t,
                t.name,
                json!({
                    "pluginName": HTTP_ROOT_ID,
                    "phase": "UNSPECIFIED_PHASE",
                    // Outbound and gateway listeners only: at a sidecar's inbound listeners
                    // the rules would run a second time, on the server's side.
                    "match": [{"mode": "CLIENT"}],
                    "pluginConfig": config,
                }),
            ));
            for table in &doc.l4_tables {
                items.push(wasm_plugin(
                    t,
                    &format!("{}-tcp-{}", t.name, table.port),
                    json!({
                        "pluginName": l4_root_id(table.port),
                        "type": "NETWORK",
                        "match": [{"mode": "CLIENT", "ports": [{"number": listener_port(doc, table.port)}]}],
                        "pluginConfig": config,
                    }),
                ));
            }
            patches.extend(tcp_proxy_patches(doc));
            patches.extend(route_patches(doc));
            items.push(envoy_filter(t, &format!("{}-routes", t.name), patches));
        }
    }
    items.extend(destination_rules);
    Ok(json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};

    /// `n` services, each with a DestinationRule of two subsets and a VirtualService with a
    /// header match and a weighted split: a mesh's worth of rules.
    fn mesh(n: usize) -> String {
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\n\
                 spec: {{selector: {{app: svc-{i}}}, ports: [{{name: http, port: 8080}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                 metadata: {{name: svc-{i}, namespace: default}}\n\
                 spec: {{host: svc-{i}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                 metadata: {{name: svc-{i}, namespace: default}}\n\
                 spec:\n  hosts: [svc-{i}]\n  http:\n\
                 \x20 - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n\
                 \x20   route: [{{destination: {{host: svc-{i}, subset: v2}}}}]\n\
                 \x20 - route:\n\
                 \x20   - {{destination: {{host: svc-{i}, subset: v1}}, weight: 90}}\n\
                 \x20   - {{destination: {{host: svc-{i}, subset: v2}}, weight: 10}}\n---\n"
            ));
        }
        yaml
    }

    fn manifest_bytes(n: usize, kind: ManifestKind, packing: Packing) -> usize {
        let mut config = Config::default();
        let diags = config.add_text("mesh.yaml", &mesh(n));
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        let proxy = ProxyOptions::sidecar("default").in_istio();
        let out = compile(&config, &proxy, &MeshOptions::default());
        assert!(!out.has_errors(), "{:?}", out.diagnostics);
        let doc = out.document.expect("document");
        let selector = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let target = Target {
            name: "meshroute",
            namespace: "default",
            module: "oci://registry.example/meshroute:1",
            selector: &selector,
            packing,
        };
        // Without the DestinationRule copies: they are objects of their own.
        let list = manifest(&doc, Vec::new(), kind, &target).expect("manifest");
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| serde_json::to_vec(item).expect("json").len())
            .max()
            .unwrap_or(0)
    }

    /// kubectl keeps the last applied object in an annotation of at most 256 KiB.
    const KUBECTL_ANNOTATION_LIMIT: usize = 256 << 10;

    #[test]
    fn a_thousand_service_mesh_fits_one_kubernetes_object() {
        for kind in [ManifestKind::WasmPlugin, ManifestKind::EnvoyFilter] {
            let plain = manifest_bytes(1000, kind, Packing::Never);
            let packed = manifest_bytes(1000, kind, Packing::Auto);
            println!("1000 services, {kind:?}: {plain} bytes plain, {packed} bytes packed");
            assert!(
                plain > KUBECTL_ANNOTATION_LIMIT,
                "the plain rules need packing"
            );
            assert!(packed < KUBECTL_ANNOTATION_LIMIT, "{packed} bytes");
        }
    }

    #[test]
    fn small_rules_stay_readable() {
        let plain = manifest_bytes(3, ManifestKind::WasmPlugin, Packing::Never);
        assert_eq!(
            manifest_bytes(3, ManifestKind::WasmPlugin, Packing::Auto),
            plain,
            "below 32 KiB the rules are not packed"
        );
    }
}
