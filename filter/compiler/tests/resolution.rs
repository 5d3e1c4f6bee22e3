//! Resolution rules for one proxy identity, each from Istio's documented behaviour.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions"
)]

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::ir::{self, Action, RulesDocument};
use wasm_bindgen_test::wasm_bindgen_test;

fn build(yaml: &str, proxy: ProxyOptions) -> (RulesDocument, Vec<String>) {
    let out = compile(&loaded(yaml), &proxy, &MeshOptions::default());
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    (
        out.document.expect("document"),
        out.diagnostics.iter().map(ToString::to_string).collect(),
    )
}

fn sidecar(ns: &str) -> ProxyOptions {
    ProxyOptions::sidecar(ns)
}

fn gateway() -> ProxyOptions {
    ProxyOptions::gateway("istio-system")
}

fn svc(name: &str, ns: &str, port: u16) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: {port}}}]\n---\n")
}

fn we(name: &str, ns: &str, app: &str, version: &str, port: u16) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {port}}}\n  labels: {{app: {app}, version: {version}}}\n---\n")
}

fn vhost<'a>(doc: &'a RulesDocument, port: u16, domain: &str) -> Option<&'a ir::VirtualHost> {
    doc.route_tables
        .iter()
        .find(|t| t.port == port)?
        .virtual_hosts
        .iter()
        .find(|v| v.domains.iter().any(|d| d == domain))
}

/// The objects of `yaml`, which must load without errors.
fn loaded(yaml: &str) -> Config {
    let mut config = Config::default();
    let load = config.add_text("t.yaml", yaml);
    assert!(load.iter().all(|d| !d.is_error()), "{load:?}");
    config
}

/// The mesh options of a MeshConfig text, which must read without a word.
fn mesh_of(text: &str) -> MeshOptions {
    let (mesh, said) = meshroute_compiler::mesh_config::read("mesh.yaml", text);
    assert!(said.is_empty(), "{said:?}");
    mesh
}

/// The cluster of the service whose host starts with `service`.
fn cluster_of<'a>(doc: &'a RulesDocument, service: &str) -> &'a ir::Cluster {
    doc.clusters
        .iter()
        .find(|c| c.service.starts_with(service))
        .expect(service)
}

fn first_dest(vh: &ir::VirtualHost, route: usize) -> &ir::Destination {
    match &vh.routes[route].action {
        Action::Route(r) => &r.destinations[0],
        other => panic!("not a route: {other:?}"),
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn short_names_expand_in_the_rules_namespace_and_aliases_follow_the_client() {
    let y = format!("{}{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: a}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: ratings}}\n", svc("reviews", "a", 9080), svc("ratings", "a", 9080));
    let (doc, _) = build(&y, sidecar("a"));
    let vh = vhost(&doc, 9080, "reviews").expect("same-namespace client may use the bare name");
    assert_eq!(first_dest(vh, 0).host, "ratings.a.svc.cluster.local");
    assert_eq!(
        first_dest(vh, 0).port,
        Some(9080),
        "single-port service fills the port"
    );
    let (doc, _) = build(&y, sidecar("b"));
    assert!(
        vhost(&doc, 9080, "reviews").is_none(),
        "bare name only from the same namespace"
    );
    assert!(vhost(&doc, 9080, "reviews.a").is_some());
    assert!(vhost(&doc, 9080, "reviews.a.svc.cluster.local").is_some());
}

#[wasm_bindgen_test(unsupported = test)]
fn export_to_dot_hides_rules_from_other_namespaces() {
    let y = format!("{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: a}}\nspec:\n  hosts: [reviews]\n  exportTo: ['.']\n  http:\n  - route:\n    - destination: {{host: reviews}}\n    timeout: 3s\n", svc("reviews", "a", 9080));
    let (doc, _) = build(&y, sidecar("a"));
    assert_eq!(
        vhost(&doc, 9080, "reviews.a").expect("vhost").routes[0].timeout_ms,
        Some(3000)
    );
    let (doc, _) = build(&y, sidecar("b"));
    let vh = vhost(&doc, 9080, "reviews.a").expect("service still visible");
    assert_eq!(
        vh.routes[0].timeout_ms, None,
        "the VirtualService is not visible: default route"
    );
}

/// A Kubernetes Service's `networking.istio.io/exportTo` annotation is its `exportTo`, as
/// istiod reads it: `.` keeps it at home, a list names the namespaces that see it.
#[wasm_bindgen_test(unsupported = test)]
fn a_services_export_to_annotation_sets_where_it_is_seen() {
    let annotated = |name: &str, export: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: a\n  annotations: {{networking.istio.io/exportTo: '{export}'}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 9080}}]\n---\n")
    };
    let y = format!(
        "{}{}{}",
        annotated("private", "."),
        annotated("shared", "b, c"),
        svc("open", "a", 9080)
    );
    let seen = |ns: &str, host: &str| vhost(&build(&y, sidecar(ns)).0, 9080, host).is_some();
    assert!(seen("a", "private"), "visible at home");
    assert!(!seen("b", "private.a"), "'.' hides it elsewhere");
    assert!(seen("b", "shared.a") && seen("c", "shared.a"));
    assert!(!seen("d", "shared.a"), "not among the listed namespaces");
    assert!(seen("d", "open.a"), "no annotation: everywhere");
}

/// MeshConfig's default `exportTo` lists stand in for objects that set none; one that sets
/// its own keeps it.
#[wasm_bindgen_test(unsupported = test)]
fn the_meshs_default_export_to_applies_to_what_sets_none() {
    let vs = |name: &str, export: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  hosts: [{name}]\n{export}  http:\n  - route:\n    - destination: {{host: {name}}}\n    timeout: 3s\n---\n")
    };
    let y = format!(
        "{}{}{}{}{}",
        svc("reviews", "a", 9080),
        svc("ratings", "a", 9080),
        vs("reviews", ""),
        vs("ratings", "  exportTo: ['*']\n"),
        svc("private", "c", 9080)
    );
    let config = loaded(&y);
    let mesh = mesh_of("defaultVirtualServiceExportTo: ['.']\ndefaultServiceExportTo: ['.', b]\n");
    let doc = |ns: &str, mesh: &MeshOptions| {
        compile(&config, &sidecar(ns), mesh)
            .document
            .expect("document")
    };
    let timeout =
        |d: &RulesDocument, host: &str| vhost(d, 9080, host).expect(host).routes[0].timeout_ms;
    let elsewhere = doc("b", &mesh);
    assert_eq!(
        timeout(&elsewhere, "reviews.a"),
        None,
        "defaulted to '.': not visible in b"
    );
    assert_eq!(
        timeout(&elsewhere, "ratings.a"),
        Some(3000),
        "its own exportTo stands"
    );
    assert!(
        vhost(&elsewhere, 9080, "private.c").is_some(),
        "exported to b by the default"
    );
    assert!(
        vhost(&doc("d", &mesh), 9080, "private.c").is_none(),
        "not exported to d"
    );
    assert_eq!(
        timeout(&doc("a", &mesh), "reviews"),
        Some(3000),
        "visible at home"
    );
    // Without the mesh's defaults everything is exported everywhere.
    let open = doc("d", &MeshOptions::default());
    assert_eq!(timeout(&open, "reviews.a"), Some(3000));
    assert!(vhost(&open, 9080, "private.c").is_some());
}

/// MeshConfig's `localityLbSetting` is every cluster's unless its DestinationRule sets one.
#[wasm_bindgen_test(unsupported = test)]
fn the_meshs_locality_settings_apply_where_a_destination_rule_sets_none() {
    let y = format!(
        "{}{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: own, namespace: a}}\nspec:\n  host: own\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting: {{failover: [{{from: us-east, to: ap-south}}]}}\n",
        svc("plain", "a", 80),
        svc("own", "a", 80)
    );
    let config = loaded(&y);
    let mesh = mesh_of("localityLbSetting: {failover: [{from: us-east, to: eu-west}]}\n");
    let failover = |mesh: &MeshOptions, service: &str| {
        let doc = compile(&config, &sidecar("a"), mesh)
            .document
            .expect("document");
        cluster_of(&doc, service).lb.locality.failover.clone()
    };
    let pair = |to: &str| vec![("us-east".to_string(), to.to_string())];
    assert_eq!(failover(&mesh, "plain."), pair("eu-west"));
    assert_eq!(failover(&mesh, "own."), pair("ap-south"));
    assert!(failover(&MeshOptions::default(), "plain.").is_empty());
}

/// MeshConfig `h2UpgradePolicy: UPGRADE` upgrades HTTP/1.1 ports, not TCP ones, and a
/// DestinationRule's DO_NOT_UPGRADE keeps its service on HTTP/1.1.
#[wasm_bindgen_test(unsupported = test)]
fn the_meshs_h2_upgrade_policy_upgrades_http_ports_a_destination_rule_does_not_refuse() {
    let tcp = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec:\n  ports: [{name: tcp, port: 5432}]\n---\n";
    let y = format!(
        "{}{}{tcp}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: legacy, namespace: a}}\nspec:\n  host: legacy\n  trafficPolicy: {{connectionPool: {{http: {{h2UpgradePolicy: DO_NOT_UPGRADE}}}}}}\n",
        svc("web", "a", 80),
        svc("legacy", "a", 80)
    );
    let config = loaded(&y);
    let mesh = mesh_of("h2UpgradePolicy: UPGRADE\n");
    let upgraded = |mesh: &MeshOptions, service: &str| {
        let doc = compile(&config, &sidecar("a"), mesh)
            .document
            .expect("document");
        cluster_of(&doc, service).connection_pool.h2_upgrade
    };
    assert!(upgraded(&mesh, "web."));
    assert!(!upgraded(&mesh, "legacy."), "the DestinationRule refuses");
    assert!(!upgraded(&mesh, "db."), "not an HTTP port");
    assert!(
        !upgraded(&MeshOptions::default(), "web."),
        "Istio's default: no upgrade"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn sidecar_egress_scopes_services_and_sets_outbound_policy() {
    let y = format!("{}{}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: a}}\nspec:\n  egress:\n  - hosts: ['./*']\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n", svc("mine", "a", 80), svc("other", "b", 80));
    let (doc, _) = build(&y, sidecar("a"));
    assert!(vhost(&doc, 80, "mine").is_some());
    assert!(vhost(&doc, 80, "other.b").is_none(), "not imported by ./*");
    assert!(!doc.clusters.iter().any(|c| c.service.starts_with("other.")));
    assert_eq!(
        doc.outbound_traffic_policy,
        ir::OutboundPolicy::RegistryOnly
    );
    let (doc, _) = build(&y, sidecar("b"));
    assert!(
        vhost(&doc, 80, "other").is_some(),
        "the Sidecar of namespace a does not apply to b"
    );
    assert_eq!(doc.outbound_traffic_policy, ir::OutboundPolicy::AllowAny);
}

#[wasm_bindgen_test(unsupported = test)]
fn sidecar_exclusions_and_the_unset_outbound_mode_are_istiods() {
    // `~/*` leaves every namespace out (import nothing), `~/host` one host everywhere; an
    // outboundTrafficPolicy without a mode is the enum's zero value, REGISTRY_ONLY.
    let y = |hosts: &str, policy: &str| {
        format!("{}{}{}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: a}}\nspec:\n  egress:\n  - hosts: {hosts}\n{policy}", svc("mine", "a", 80), svc("other", "b", 80), svc("third", "b", 80))
    };
    let (doc, _) = build(&y("['~/*']", ""), sidecar("a"));
    assert!(vhost(&doc, 80, "mine").is_none(), "~/* imports nothing");
    assert!(vhost(&doc, 80, "other.b").is_none());
    let (doc, _) = build(
        &y(
            "['*/*', '~/other.b.svc.cluster.local']",
            "  outboundTrafficPolicy: {}\n",
        ),
        sidecar("a"),
    );
    assert!(vhost(&doc, 80, "mine").is_some());
    assert!(vhost(&doc, 80, "third.b").is_some());
    assert!(
        vhost(&doc, 80, "other.b").is_none(),
        "left out in every namespace"
    );
    assert_eq!(
        doc.outbound_traffic_policy,
        ir::OutboundPolicy::RegistryOnly
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn sidecar_uses_the_oldest_virtual_service_for_a_host() {
    let vs = |name: &str, ts: &str, subset: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: a, creationTimestamp: '{ts}'}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n---\n")
    };
    let y = format!(
        "{}{}{}",
        svc("reviews", "a", 9080),
        vs("newer", "2024-02-01T00:00:00Z", "new"),
        vs("older", "2024-01-01T00:00:00Z", "old")
    );
    let (doc, _) = build(&y, sidecar("a"));
    assert_eq!(
        first_dest(vhost(&doc, 9080, "reviews").expect("vhost"), 0).subset,
        "old"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn exact_virtual_service_beats_wildcard_for_a_service() {
    let y = format!("{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: wild, namespace: a, creationTimestamp: '2020-01-01T00:00:00Z'}}\nspec:\n  hosts: ['*.a.svc.cluster.local']\n  http:\n  - route:\n    - destination: {{host: reviews, subset: wild}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: exact, namespace: a}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: exact}}\n", svc("reviews", "a", 9080));
    let (doc, _) = build(&y, sidecar("a"));
    assert_eq!(
        first_dest(vhost(&doc, 9080, "reviews").expect("vhost"), 0).subset,
        "exact"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn gateway_merges_virtual_services_and_moves_catch_alls_last() {
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*/*.example.com']\n---\n";
    let vs = |name: &str, ts: &str, routes: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default, creationTimestamp: '{ts}'}}\nspec:\n  hosts: [a.example.com]\n  gateways: [istio-system/gw]\n  http:\n{routes}---\n")
    };
    let y = format!(
        "{gw}{}{}{}",
        vs("first", "2024-01-01T00:00:00Z", "  - route:\n    - destination: {host: catchall.default.svc.cluster.local}\n"),
        vs("second", "2024-01-02T00:00:00Z", "  - match: [{uri: {prefix: /api}}]\n    route:\n    - destination: {host: api.default.svc.cluster.local}\n"),
        vs("mesh-only", "2024-01-03T00:00:00Z", "  - match: [{uri: {prefix: /mesh}}]\n    route:\n    - destination: {host: x}\n").replace("gateways: [istio-system/gw]", "gateways: [mesh]"),
    );
    let (doc, _) = build(&y, gateway());
    let vh = vhost(&doc, 80, "a.example.com").expect("vhost named after the more specific host");
    assert_eq!(
        vh.routes.len(),
        2,
        "mesh-only VirtualService is not bound to the gateway"
    );
    assert_eq!(first_dest(vh, 0).host, "api.default.svc.cluster.local");
    assert_eq!(first_dest(vh, 1).host, "catchall.default.svc.cluster.local");
    assert_eq!(doc.listeners.len(), 1);
    // The same configuration gives a sidecar only the mesh-bound VirtualService.
    let (doc, _) = build(&y, sidecar("default"));
    assert!(vhost(&doc, 80, "a.example.com").is_some_and(|v| v.routes.len() == 1));
}

#[wasm_bindgen_test(unsupported = test)]
fn gateway_server_namespace_filter_and_https_redirect() {
    let y = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['team-a/*']\n    tls: {httpsRedirect: true}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: team-a}\nspec:\n  hosts: [a.example.com]\n  gateways: [istio-system/gw]\n  http:\n  - route:\n    - destination: {host: a.example.com}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: team-b}\nspec:\n  hosts: [b.example.com]\n  gateways: [istio-system/gw]\n  http:\n  - route:\n    - destination: {host: b.example.com}\n";
    let (doc, _) = build(y, gateway());
    let vh = vhost(&doc, 80, "a.example.com").expect("team-a binds");
    assert!(vh.require_tls);
    assert!(
        vhost(&doc, 80, "b.example.com").is_none(),
        "team-b is filtered out by the server host namespace"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn destination_rule_lookup_prefers_the_client_namespace() {
    let dr = |ns: &str, lb: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: {ns}}}\nspec:\n  host: reviews.svc-ns.svc.cluster.local\n  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}\n---\n")
    };
    let y = format!(
        "{}{}{}",
        svc("reviews", "svc-ns", 9080),
        dr("svc-ns", "RANDOM"),
        dr("client", "ROUND_ROBIN")
    );
    let lb = |ns: &str| {
        let (doc, _) = build(&y, sidecar(ns));
        doc.clusters
            .iter()
            .find(|c| c.name == "outbound|9080||reviews.svc-ns.svc.cluster.local")
            .expect("cluster")
            .lb
            .policy
    };
    assert_eq!(lb("client"), ir::LbPolicy::RoundRobin);
    assert_eq!(lb("elsewhere"), ir::LbPolicy::Random);
}

#[wasm_bindgen_test(unsupported = test)]
fn port_level_settings_replace_without_inheriting_and_subsets_select_endpoints() {
    let y = format!(
        "{}{}{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: a}}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: 7, connectTimeout: 2s}}}}\n    loadBalancer: {{simple: RANDOM}}\n    portLevelSettings:\n    - port: {{number: 9080}}\n      loadBalancer: {{simple: ROUND_ROBIN}}\n  subsets:\n  - name: v2\n    labels: {{version: v2}}\n    trafficPolicy: {{connectionPool: {{http: {{http2MaxRequests: 3}}}}}}\n",
        svc("reviews", "a", 9080),
        we("r1", "a", "reviews", "v1", 1001),
        we("r2", "a", "reviews", "v2", 1002)
    );
    let (doc, _) = build(&y, sidecar("a"));
    let base = doc
        .clusters
        .iter()
        .find(|c| c.name == "outbound|9080||reviews.a.svc.cluster.local")
        .expect("base");
    assert_eq!(base.lb.policy, ir::LbPolicy::RoundRobin);
    assert_eq!(
        base.connection_pool.max_connections, 0,
        "port level does not inherit the top-level pool"
    );
    assert_eq!(
        base.connect_timeout_ms, 10_000,
        "mesh default connect timeout"
    );
    assert_eq!(base.endpoints.len(), 2);
    let v2 = doc
        .clusters
        .iter()
        .find(|c| c.name == "outbound|9080|v2|reviews.a.svc.cluster.local")
        .expect("subset");
    assert_eq!(
        v2.endpoints.iter().map(|e| e.port).collect::<Vec<_>>(),
        vec![1002]
    );
    assert_eq!(v2.connection_pool.http2_max_requests, 3);
}

#[wasm_bindgen_test(unsupported = test)]
fn missing_subset_is_a_warning_and_no_cluster() {
    let y = format!("{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: a}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v9}}\n", svc("reviews", "a", 9080));
    let (doc, warnings) = build(&y, sidecar("a"));
    assert!(!doc.clusters.iter().any(|c| c.subset == "v9"));
    assert!(
        warnings.iter().any(|w| w.contains("subset \"v9\"")
            && w.contains("503 (NC)")
            && w.starts_with("t.yaml:")),
        "{warnings:?}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn weights_and_retry_defaults() {
    let y = format!("{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: a}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{uri: {{prefix: /z}}}}]\n    route:\n    - destination: {{host: reviews, subset: a}}\n      weight: 0\n    - destination: {{host: reviews, subset: b}}\n      weight: 30\n    retries: {{attempts: 0}}\n  - route:\n    - destination: {{host: reviews}}\n      weight: 5\n    retries: {{attempts: 3, perTryTimeout: 2s, retryOn: '5xx,503'}}\n", svc("reviews", "a", 9080));
    let (doc, _) = build(&y, sidecar("a"));
    let vh = vhost(&doc, 9080, "reviews").expect("vhost");
    let Action::Route(r0) = &vh.routes[0].action else {
        panic!()
    };
    assert_eq!(r0.destinations.len(), 1, "zero weight dropped");
    assert!(vh.routes[0].retry.is_none(), "attempts 0 disables retries");
    assert_eq!(
        first_dest(vh, 1).weight,
        100,
        "a single destination gets everything"
    );
    let retry = vh.routes[1].retry.as_ref().expect("retry");
    assert_eq!(
        (retry.num_retries, retry.per_try_timeout_ms),
        (3, Some(2000))
    );
    assert_eq!(retry.retriable_status_codes, vec![503]);
    assert!(retry
        .retry_on
        .contains(&"retriable-status-codes".to_string()));
}

#[wasm_bindgen_test(unsupported = test)]
fn delegate_routes_replace_the_root_route_and_inherit() {
    let y = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: root, namespace: a}\nspec:\n  hosts: [shop.example.com]\n  http:\n  - match: [{uri: {prefix: /api}}]\n    timeout: 4s\n    delegate: {name: api, namespace: b}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: b}\nspec:\n  http:\n  - match: [{uri: {prefix: /api/v1}}]\n    route:\n    - destination: {host: v1}\n  - match: [{uri: {prefix: /other}}]\n    route:\n    - destination: {host: other}\n";
    let (doc, warnings) = build(y, sidecar("a"));
    let vh = vhost(&doc, 80, "shop.example.com").expect("vhost");
    assert_eq!(
        vh.routes.len(),
        1,
        "the conflicting delegate route is dropped"
    );
    assert_eq!(
        vh.routes[0].timeout_ms,
        Some(4000),
        "inherited from the root"
    );
    assert_eq!(
        first_dest(vh, 0).host,
        "v1.b.svc.cluster.local",
        "short names resolve in the delegate's namespace"
    );
    assert!(warnings
        .iter()
        .any(|w| w.contains("conflicts with the root")));
}

#[wasm_bindgen_test(unsupported = test)]
fn registry_from_service_entries_and_unknown_vs_hosts() {
    let y = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: a}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: http-tls, protocol: HTTP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, namespace: a}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.1.1.1, labels: {v: a}, weight: 3}, {address: 10.1.1.2, ports: {http: 8080}}]\n";
    let (doc, _) = build(y, sidecar("a"));
    let api = doc
        .clusters
        .iter()
        .find(|c| c.service == "api.example.com")
        .expect("dns cluster");
    assert_eq!(api.discovery, ir::Discovery::Dns);
    assert_eq!(
        (api.endpoints[0].address.as_str(), api.endpoints[0].port),
        ("api.example.com", 443)
    );
    let db = doc
        .clusters
        .iter()
        .find(|c| c.service == "db.internal")
        .expect("static");
    assert_eq!(
        db.endpoints
            .iter()
            .map(|e| (e.port, e.weight))
            .collect::<Vec<_>>(),
        vec![(80, 3), (8080, 1)]
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn every_document_round_trips_through_json() {
    let y = include_str!("../../../examples/bookinfo/registry.yaml");
    let (doc, _) = build(y, sidecar("default"));
    let json = serde_json::to_string(&doc).expect("json");
    let back: RulesDocument = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, doc);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_sidecars_inbound_ports_come_from_the_services_that_select_it_or_its_ingress_listeners() {
    let services = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: 8080}, {name: tcp-db, port: 5432}, {name: web, port: 80, appProtocol: http2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\nspec:\n  selector: {app: ratings}\n  ports: [{name: http, port: 9081}]\n---\n";
    let proxy = ProxyOptions {
        labels: [("app".to_owned(), "reviews".to_owned())]
            .into_iter()
            .collect(),
        ..sidecar("default")
    };
    let (doc, _) = build(services, proxy.clone());
    let ports: Vec<(u16, ir::Protocol, &str)> = doc
        .inbound
        .iter()
        .map(|p| (p.port, p.protocol, p.service.as_str()))
        .collect();
    let reviews = "reviews.default.svc.cluster.local";
    assert_eq!(
        ports,
        vec![
            (80, ir::Protocol::Http2, reviews),
            (5432, ir::Protocol::Tcp, reviews),
            (8080, ir::Protocol::Http, reviews),
        ],
        "the container ports (targetPort) of the selecting service only"
    );
    assert!(doc.inbound.iter().all(|p| p.endpoint.is_none()));

    // A Sidecar's ingress listeners replace them, with the pod-wide pool under each port's.
    let sidecar_yaml = format!("{services}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  workloadSelector: {{labels: {{app: reviews}}}}\n  inboundConnectionPool: {{tcp: {{maxConnections: 7}}, http: {{http2MaxRequests: 9}}}}\n  ingress:\n  - port: {{number: 9080, protocol: HTTP, name: http}}\n    defaultEndpoint: 127.0.0.1:8080\n  - port: {{number: 5432, protocol: TCP, name: db}}\n    connectionPool: {{tcp: {{maxConnections: 3}}}}\n");
    let (doc, _) = build(&sidecar_yaml, proxy.clone());
    assert_eq!(doc.inbound.len(), 2);
    assert_eq!(doc.inbound[0].port, 9080);
    assert_eq!(doc.inbound[0].endpoint.as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(
        (doc.inbound[0].max_connections, doc.inbound[0].max_requests),
        (7, 9)
    );
    assert_eq!(
        (doc.inbound[1].max_connections, doc.inbound[1].max_requests),
        (3, 0)
    );

    // Settings the inbound side does not apply are said, not dropped.
    let ignored = sidecar_yaml.replace("maxConnections: 7}", "maxConnections: 7, idleTimeout: 5s}");
    let (_, diags) = build(&ignored, proxy);
    assert!(
        diags
            .iter()
            .any(|d| d.contains("spec.inboundConnectionPool") && d.contains("tcp.idleTimeout")),
        "{diags:?}"
    );
    // Gateways have no inbound side.
    let (doc, _) = build(services, gateway());
    assert!(doc.inbound.is_empty());
}

#[wasm_bindgen_test(unsupported = test)]
fn an_egress_listener_with_a_port_narrows_what_that_port_serves() {
    let mut yaml = String::new();
    for (name, port) in [("reviews", 9080), ("ratings", 9080), ("details", 9090)] {
        yaml.push_str(&svc(name, "default", port));
    }
    let with_egress = |egress: &str| {
        format!("{yaml}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: default}}\nspec:\n  egress:\n{egress}")
    };
    let reviews = "reviews.default.svc.cluster.local";
    let ratings = "ratings.default.svc.cluster.local";
    let details = "details.default.svc.cluster.local";
    // Port 9080 serves reviews only; the catch-all listener serves every other port.
    let (doc, _) = build(
        &with_egress(&format!("  - port: {{number: 9080, protocol: HTTP, name: http}}\n    hosts: [./{reviews}]\n  - hosts: ['./*']\n")),
        sidecar("default"),
    );
    assert!(vhost(&doc, 9080, reviews).is_some());
    assert!(
        vhost(&doc, 9080, ratings).is_none(),
        "ratings is not on the 9080 listener"
    );
    assert!(vhost(&doc, 9090, details).is_some());
    // Without a catch-all, ports no listener covers serve nothing.
    let (doc, _) = build(
        &with_egress("  - port: {number: 9080, protocol: HTTP, name: http}\n    hosts: ['./*']\n"),
        sidecar("default"),
    );
    assert!(vhost(&doc, 9080, ratings).is_some());
    assert!(vhost(&doc, 9090, details).is_none());
}

#[wasm_bindgen_test(unsupported = test)]
fn listener_binding_fields_are_said_to_have_no_effect() {
    let yaml = format!("{}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: default}}\nspec:\n  ingress:\n  - port: {{number: 9080, protocol: HTTP, name: http}}\n    bind: 0.0.0.0\n  egress:\n  - port: {{number: 9080, protocol: HTTP, name: http}}\n    captureMode: NONE\n    hosts: ['./*']\n", svc("reviews", "default", 9080));
    let (_, diags) = build(&yaml, sidecar("default"));
    for path in ["spec.ingress[0].bind", "spec.egress[0].captureMode"] {
        assert!(
            diags
                .iter()
                .any(|d| d.contains(path) && d.contains("has no effect")),
            "{path}: {diags:?}"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn the_deprecated_consecutive_errors_is_ignored_as_istiod_ignores_it() {
    let yaml = format!("{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {{consecutiveErrors: 1, interval: 1s}}\n", svc("reviews", "default", 9080));
    let (doc, diags) = build(&yaml, sidecar("default"));
    let cluster = doc
        .clusters
        .iter()
        .find(|c| c.name == "outbound|9080||reviews.default.svc.cluster.local")
        .unwrap();
    let od = cluster.outlier_detection.as_ref().unwrap();
    assert_eq!(
        od.consecutive_5xx,
        Some(5),
        "Envoy's default, not consecutiveErrors"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("consecutiveErrors") && d.contains("deprecated")),
        "{diags:?}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn the_deprecated_allow_origin_counts_only_without_allow_origins() {
    let cors = |policy: &str| {
        format!("{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - corsPolicy: {policy}\n    route: [{{destination: {{host: reviews}}}}]\n", svc("reviews", "default", 9080))
    };
    let origins = |yaml: &str| {
        let (doc, _) = build(yaml, sidecar("default"));
        let vh = vhost(&doc, 9080, "reviews.default.svc.cluster.local").unwrap();
        vh.routes[0].cors.as_ref().unwrap().allow_origins.clone()
    };
    assert_eq!(
        origins(&cors(
            "{allowOrigin: [old.com], allowOrigins: [{exact: new.com}]}"
        )),
        vec![ir::StringMatch::Exact("new.com".into())]
    );
    assert_eq!(
        origins(&cors("{allowOrigin: [old.com]}")),
        vec![ir::StringMatch::Exact("old.com".into())]
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_service_entry_host_under_the_mesh_domain_gets_the_short_names_too() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: b, namespace: echo}\nspec:\n  hosts: [b.echo.svc.cluster.local]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.0.0.9}]\n";
    let (doc, _) = build(yaml, sidecar("echo"));
    let vh = vhost(&doc, 80, "b.echo.svc.cluster.local").unwrap();
    for name in ["b", "b.echo", "b.echo.svc"] {
        assert!(
            vh.domains.iter().any(|d| d == name),
            "{name}: {:?}",
            vh.domains
        );
    }
    // From another namespace, not the bare name.
    let (doc, _) = build(yaml, sidecar("default"));
    let vh = vhost(&doc, 80, "b.echo.svc.cluster.local").unwrap();
    assert!(vh.domains.iter().any(|d| d == "b.echo"));
    assert!(!vh.domains.iter().any(|d| d == "b"), "{:?}", vh.domains);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_named_target_port_is_said_to_be_taken_as_the_service_port() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: web}]\n";
    let proxy = ProxyOptions {
        labels: [("app".to_owned(), "reviews".to_owned())]
            .into_iter()
            .collect(),
        ..sidecar("default")
    };
    let (doc, diags) = build(yaml, proxy);
    assert_eq!(doc.inbound[0].port, 9080);
    assert!(
        diags
            .iter()
            .any(|d| d.contains("spec.ports[0].targetPort") && d.contains("\"web\"")),
        "{diags:?}"
    );
}

/// `sourceLabels` and `sourceNamespace` of HTTP, TCP and TLS matches: a proxy gets the
/// routes whose source it is, as istiod builds each proxy's routes for its own labels.
#[wasm_bindgen_test(unsupported = test)]
fn source_labels_and_namespace_keep_a_route_for_the_proxies_they_name() {
    let yaml = format!(
        "{}{}{}{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{sourceLabels: {{app: productpage}}}}]\n    route: [{{destination: {{host: reviews, subset: v2}}}}]\n  - match: [{{sourceNamespace: other}}]\n    route: [{{destination: {{host: reviews, subset: v3}}}}]\n  - route: [{{destination: {{host: reviews, subset: v1}}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: default}}\nspec:\n  selector: {{app: db}}\n  ports: [{{name: tcp, port: 5432}}, {{name: tls, port: 8443}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: default}}\nspec:\n  hosts: [db]\n  tcp:\n  - match: [{{port: 5432, sourceLabels: {{app: productpage}}}}, {{port: 5432, sourceNamespace: other}}]\n    route: [{{destination: {{host: db}}}}]\n  tls:\n  - match: [{{port: 8443, sniHosts: [db], sourceLabels: {{app: productpage}}}}, {{port: 8443, sniHosts: [db], sourceNamespace: other}}]\n    route: [{{destination: {{host: db}}}}]\n---\n",
        svc("reviews", "default", 9080),
        we("r1", "default", "reviews", "v1", 9001),
        we("db1", "default", "db", "v1", 5432),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, {name: v3, labels: {version: v3}}]\n---\n",
    );
    let proxy = |ns: &str, app: &str| ProxyOptions {
        labels: [("app".to_owned(), app.to_owned())].into(),
        ..sidecar(ns)
    };
    let subsets = |doc: &RulesDocument| -> Vec<String> {
        let vh = vhost(doc, 9080, "reviews.default.svc.cluster.local").expect("reviews");
        (0..vh.routes.len())
            .map(|i| first_dest(vh, i).subset.clone())
            .collect()
    };
    let l4_routes = |doc: &RulesDocument, port: u16| {
        doc.l4_tables
            .iter()
            .find(|t| t.port == port)
            .map_or(0, |t| {
                // The VirtualService's routes; the Service's own default route is always there.
                t.routes
                    .iter()
                    .filter(|r| {
                        r.source
                            .as_ref()
                            .is_some_and(|s| s.kind == "VirtualService")
                    })
                    .count()
            })
    };
    let (named, _) = build(&yaml, proxy("default", "productpage"));
    assert_eq!(subsets(&named), ["v2", "v1"]);
    let (elsewhere, _) = build(&yaml, proxy("other", "ratings"));
    assert_eq!(subsets(&elsewhere), ["v3", "v1"]);
    let (neither, _) = build(&yaml, proxy("default", "ratings"));
    assert_eq!(subsets(&neither), ["v1"]);
    for port in [5432, 8443] {
        assert_eq!(l4_routes(&named, port), 1, "{port}");
        assert_eq!(l4_routes(&elsewhere, port), 1, "{port}");
        assert_eq!(l4_routes(&neither, port), 0, "{port}");
    }
}

/// Fields lowered into the rules as the engine reads them: retry host and locality
/// choices, ring sizes, local-origin outlier errors, CORS preflights that match no origin.
#[wasm_bindgen_test(unsupported = test)]
fn retry_ring_outlier_and_cors_fields_reach_the_rules() {
    let yaml = |vs: &str, dr: &str| {
        format!(
            "{}{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - {vs}\n    route: [{{destination: {{host: reviews}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy: {dr}\n",
            svc("reviews", "default", 9080),
            we("r1", "default", "reviews", "v1", 9001),
        )
    };
    let route =
        |doc: &RulesDocument| vhost(doc, 9080, "reviews").expect("reviews").routes[0].clone();
    let (set, _) = build(
        &yaml(
            "retries: {attempts: 2, retryIgnorePreviousHosts: false, retryRemoteLocalities: true}\n    corsPolicy: {allowOrigins: [{exact: a.com}], unmatchedPreflights: IGNORE}",
            "{loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 4096}}}, outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}}",
        ),
        sidecar("default"),
    );
    let (unset, _) = build(
        &yaml(
            "retries: {attempts: 2}\n    corsPolicy: {allowOrigins: [{exact: a.com}]}",
            "{loadBalancer: {consistentHash: {httpHeaderName: x-user, minimumRingSize: 2048}}, outlierDetection: {consecutive5xxErrors: 2}}",
        ),
        sidecar("default"),
    );
    let retry = |doc: &RulesDocument| route(doc).retry.expect("retry policy");
    assert!(!retry(&set).avoid_previous_hosts && retry(&set).retry_remote_localities);
    assert!(retry(&unset).avoid_previous_hosts && !retry(&unset).retry_remote_localities);
    let cors = |doc: &RulesDocument| route(doc).cors.expect("cors");
    assert!(cors(&set).ignore_unmatched_preflights);
    assert!(!cors(&unset).ignore_unmatched_preflights);
    let ring = |doc: &RulesDocument| {
        cluster_of(doc, "reviews")
            .lb
            .consistent_hash
            .as_ref()
            .and_then(|c| c.minimum_ring_size)
    };
    assert_eq!(ring(&set), Some(4096), "ringHash.minimumRingSize");
    assert_eq!(ring(&unset), Some(2048), "the deprecated minimumRingSize");
    let split = |doc: &RulesDocument| {
        cluster_of(doc, "reviews")
            .outlier_detection
            .as_ref()
            .is_some_and(|o| o.split_external_local_origin_errors)
    };
    assert!(split(&set) && !split(&unset));
}
