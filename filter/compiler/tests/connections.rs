//! Connection-level routes: how `tcp` and `tls` routes, TCP/TLS service ports and Gateway
//! TLS modes lower, and where the engine sends a connection.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions"
)]

use meshroute_compiler::{compile, Compiled, Config, MeshOptions, ProxyOptions};
use meshroute_core::engine::{
    ConnectionOutcome, ConnectionView, Engine, NoEndpointState, SplitMix64,
};
use meshroute_core::ir::{self, ProxyKind};
use wasm_bindgen_test::wasm_bindgen_test;

fn compiled(yaml: &str, kind: ProxyKind) -> Compiled {
    let mut c = Config::default();
    let load = c.add_text("t.yaml", yaml);
    assert!(load.iter().all(|d| !d.is_error()), "{load:?}");
    let proxy = match kind {
        ProxyKind::Gateway => ProxyOptions::gateway("istio-system"),
        ProxyKind::Sidecar => ProxyOptions::sidecar("default"),
    };
    compile(&c, &proxy, &MeshOptions::default())
}

fn engine(yaml: &str, kind: ProxyKind) -> Engine {
    let out = compiled(yaml, kind);
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    Engine::new(out.document.unwrap()).unwrap()
}

/// Cluster the engine sends a connection to, or the close reason.
fn route(e: &Engine, port: u16, sni: &str, destination: &str, seed: u64) -> String {
    let view = ConnectionView {
        port,
        sni,
        destination,
        source_ip: None,
    };
    match e.decide_connection(&view, &mut SplitMix64(seed), &NoEndpointState) {
        ConnectionOutcome::Forward {
            cluster, endpoint, ..
        } => format!("{cluster} {}", endpoint.unwrap_or_default()),
        ConnectionOutcome::Close { reason } => format!("closed: {reason}"),
    }
}

const DB: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  addresses: [10.9.0.0/16]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.9.0.7}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: default}
spec:
  hosts: [cache.internal]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.8.0.1}]
---
";

#[wasm_bindgen_test(unsupported = test)]
fn sidecar_tcp_ports_route_by_destination_address_then_by_port() {
    let e = engine(DB, ProxyKind::Sidecar);
    assert_eq!(
        route(&e, 5432, "", "10.9.3.4:5432", 1),
        "outbound|5432||db.internal 10.9.0.7:5432",
        "the service whose addresses hold the destination"
    );
    assert_eq!(
        route(&e, 5432, "", "192.168.0.9:5432", 1),
        "outbound|5432||cache.internal 10.8.0.1:5432",
        "a service without addresses takes the rest of its port"
    );
    assert!(route(&e, 6000, "", "10.9.3.4:6000", 1).starts_with("closed"));
}

/// A Kubernetes Service's `clusterIPs` (dual-stack: one per family) all route to it on a
/// TCP port it shares with [`DB`]'s services, as istiod matches every cluster IP; a UDP
/// port is not proxied.
#[wasm_bindgen_test(unsupported = test)]
fn dual_stack_cluster_ips_route_to_their_service_and_udp_ports_are_left_alone() {
    let pg = "apiVersion: v1
kind: Service
metadata: {name: pg, namespace: default}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd00::20']
  selector: {app: pg}
  ports: [{name: tcp-pg, port: 5432}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: pg-1, namespace: default}
spec: {address: 10.1.0.5, labels: {app: pg}}
---
";
    let out = compiled(&format!("{pg}{DB}"), ProxyKind::Sidecar);
    assert!(out
        .diagnostics
        .iter()
        .any(|d| d.to_string().contains("spec.ports[1].protocol")
            && d.to_string().contains("only TCP ports are proxied")));
    let e = Engine::new(out.document.clone().unwrap()).unwrap();
    for vip in ["10.96.0.20:5432", "[fd00::20]:5432"] {
        assert_eq!(
            route(&e, 5432, "", vip, 1),
            "outbound|5432||pg.default.svc.cluster.local 10.1.0.5:5432",
            "{vip}"
        );
    }
    assert!(route(&e, 5432, "", "10.96.0.99:5432", 1).contains("cache.internal"));
    let doc = out.document.unwrap();
    assert!(
        doc.clusters.iter().all(|c| c.port != 53),
        "no cluster for the UDP port: {:?}",
        doc.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
}

/// `type: ExternalName`: istiod's DNS-resolved service whose one endpoint is the external
/// name, on the Service's own port.
#[wasm_bindgen_test(unsupported = test)]
fn external_name_services_resolve_their_external_name() {
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: billing, namespace: default}
spec:
  type: ExternalName
  externalName: Billing.Example.COM
  ports: [{name: http, port: 8080}]
";
    let out = compiled(yaml, ProxyKind::Sidecar);
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    let doc = out.document.unwrap();
    let c = doc
        .clusters
        .iter()
        .find(|c| c.name == "outbound|8080||billing.default.svc.cluster.local")
        .expect("the cluster");
    assert_eq!(c.discovery, ir::Discovery::Dns, "{c:?}");
    let endpoints: Vec<_> = c
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.port))
        .collect();
    assert_eq!(endpoints, [("billing.example.com", 8080)]);
}

#[wasm_bindgen_test(unsupported = test)]
fn tcp_routes_split_by_weight_and_match_destination_subnets() {
    let yaml = format!(
        "{DB}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db.internal
  subsets: [{{name: a, labels: {{}}}}, {{name: b, labels: {{}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.internal]
  tcp:
  - match: [{{destinationSubnets: [10.9.1.0/24]}}]
    route: [{{destination: {{host: db.internal, subset: b}}}}]
  - route:
    - {{destination: {{host: db.internal, subset: a}}, weight: 75}}
    - {{destination: {{host: db.internal, subset: b}}, weight: 25}}
"
    );
    let e = engine(&yaml, ProxyKind::Sidecar);
    assert!(route(&e, 5432, "", "10.9.1.20:5432", 7).starts_with("outbound|5432|b|db.internal"));
    let a = (0..1000)
        .filter(|s| route(&e, 5432, "", "10.9.2.2:5432", *s).starts_with("outbound|5432|a|"))
        .count();
    assert!((690..=810).contains(&a), "75 % to a, got {a} of 1000");
}

#[wasm_bindgen_test(unsupported = test)]
fn tls_ports_route_on_sni_and_tls_routes_replace_the_default() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com, '*.cdn.example.com']
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: default}
spec:
  hosts: [other.example.com]
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other, namespace: default}
spec:
  hosts: [other.example.com]
  tls:
  - match: [{sniHosts: [other.example.com]}]
    route: [{destination: {host: api.example.com}}]
";
    let e = engine(yaml, ProxyKind::Sidecar);
    assert!(route(&e, 443, "api.example.com", "1.2.3.4:443", 1)
        .starts_with("outbound|443||api.example.com 1.2.3.4:443"));
    assert!(route(&e, 443, "x.cdn.example.com", "1.2.3.5:443", 1)
        .starts_with("outbound|443||*.cdn.example.com"));
    assert!(
        route(&e, 443, "other.example.com", "1.2.3.6:443", 1)
            .starts_with("outbound|443||api.example.com"),
        "the tls route wins over other.example.com's default"
    );
    // A name no route takes goes on to where the client sent it under ALLOW_ANY (Istio's
    // PassthroughCluster), and is closed under REGISTRY_ONLY.
    assert_eq!(
        route(&e, 443, "unknown.example.org", "1.2.3.7:443", 1),
        "PassthroughCluster 1.2.3.7:443"
    );
    let mut doc = compiled(yaml, ProxyKind::Sidecar).document.unwrap();
    doc.outbound_traffic_policy = ir::OutboundPolicy::RegistryOnly;
    let strict = Engine::new(doc).unwrap();
    assert!(route(&strict, 443, "unknown.example.org", "1.2.3.7:443", 1).starts_with("closed"));
}

const GW: &str = "apiVersion: v1
kind: Service
metadata: {name: backend, namespace: default}
spec:
  selector: {app: backend}
  ports: [{name: tls, port: 8443}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: backend-1, namespace: default}
spec: {address: 10.0.0.5, labels: {app: backend}}
---
";

#[wasm_bindgen_test(unsupported = test)]
fn passthrough_servers_narrow_sni_hosts_to_the_server_hosts() {
    let yaml = format!(
        "{GW}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: tls, protocol: TLS}}
    hosts: ['a.example.com']
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v, namespace: default}}
spec:
  hosts: ['*.example.com']
  gateways: [istio-system/gw]
  tls:
  - match: [{{sniHosts: ['*.example.com']}}]
    route: [{{destination: {{host: backend}}}}]
"
    );
    let out = compiled(&yaml, ProxyKind::Gateway);
    let doc = out.document.unwrap();
    assert_eq!(doc.l4_tables.len(), 1);
    assert_eq!(
        doc.l4_tables[0].routes[0].matches[0].sni_hosts,
        ["a.example.com"]
    );
    let e = Engine::new(doc).unwrap();
    assert_eq!(
        route(&e, 443, "a.example.com", "", 1),
        "outbound|8443||backend.default.svc.cluster.local 10.0.0.5:8443"
    );
    assert!(route(&e, 443, "b.example.com", "", 1).starts_with("closed"));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_tls_server_without_a_mode_passes_through_as_istio_defaults() {
    // ServerTLSSettings.mode defaults to PASSTHROUGH.
    for protocol in ["TLS", "HTTPS"] {
        let yaml = format!(
            "{GW}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: tls, protocol: {protocol}}}
    hosts: ['a.example.com']
    tls: {{}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v, namespace: default}}
spec:
  hosts: ['a.example.com']
  gateways: [istio-system/gw]
  tls:
  - match: [{{sniHosts: ['a.example.com']}}]
    route: [{{destination: {{host: backend}}}}]
"
        );
        let out = compiled(&yaml, ProxyKind::Gateway);
        assert!(!out.has_errors(), "{:?}", out.diagnostics);
        let doc = out.document.unwrap();
        let server = &doc.listeners[0].servers[0];
        assert_eq!(server.routing, ir::ServerRouting::Passthrough);
        assert!(server.tls.is_none(), "nothing to terminate");
        let e = Engine::new(doc).unwrap();
        assert_eq!(
            route(&e, 443, "a.example.com", "", 1),
            "outbound|8443||backend.default.svc.cluster.local 10.0.0.5:8443",
            "{protocol}"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn auto_passthrough_takes_the_cluster_from_the_sni() {
    let yaml = format!(
        "{GW}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: cross, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 15443, name: tls, protocol: TLS}}
    hosts: ['*.local']
    tls: {{mode: AUTO_PASSTHROUGH}}
"
    );
    let e = engine(&yaml, ProxyKind::Gateway);
    assert!(route(
        &e,
        15443,
        "outbound_.8443_._.backend.default.svc.cluster.local",
        "",
        1
    )
    .starts_with("outbound|8443||backend.default.svc.cluster.local"));
    assert!(route(&e, 15443, "backend.default.svc.cluster.local", "", 1).starts_with("closed"));
}

#[wasm_bindgen_test(unsupported = test)]
fn istio_mutual_is_reported_as_unsupported_where_it_is_written() {
    let yaml = format!(
        "{GW}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend, namespace: default}}
spec:
  host: backend
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
"
    );
    let out = compiled(&yaml, ProxyKind::Sidecar);
    assert!(out.has_errors());
    let text: Vec<String> = out.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|d| d.contains("spec.trafficPolicy.tls.mode")
                && d.contains("ISTIO_MUTUAL is not supported")
                && d.contains("t.yaml:")),
        "{text:?}"
    );
    let gw = format!(
        "{GW}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ['*']
    tls: {{mode: ISTIO_MUTUAL}}
"
    );
    let out = compiled(&gw, ProxyKind::Gateway);
    let text: Vec<String> = out.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|d| d.contains("spec.servers[0].tls.mode") && d.contains("not supported")),
        "{text:?}"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn inside_istio_the_mesh_mtls_is_istiods() {
    let yaml = format!(
        "{GW}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend, namespace: default}}
spec:
  host: backend
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
    outlierDetection: {{consecutive5xxErrors: 1}}
    connectionPool: {{tcp: {{maxConnections: 1}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ['*']
    tls: {{mode: ISTIO_MUTUAL}}
"
    );
    let mut c = Config::default();
    assert!(c.add_text("t.yaml", &yaml).iter().all(|d| !d.is_error()));
    for proxy in [
        ProxyOptions::sidecar("default").in_istio(),
        ProxyOptions::gateway("istio-system").in_istio(),
    ] {
        let out = compile(&c, &proxy, &MeshOptions::default());
        assert!(!out.has_errors(), "{:?}", out.diagnostics);
        let doc = out.document.unwrap();
        assert_eq!(doc.proxy.endpoint_selection, ir::EndpointSelection::Host);
        // istiod's clusters carry the endpoints, the certificates and the policies.
        for cluster in &doc.clusters {
            assert!(cluster.endpoints.is_empty(), "{}", cluster.name);
            assert!(cluster.tls.is_none(), "{}", cluster.name);
            assert!(cluster.outlier_detection.is_none(), "{}", cluster.name);
            assert_eq!(cluster.connection_pool, ir::ConnectionPool::default());
        }
    }
}
