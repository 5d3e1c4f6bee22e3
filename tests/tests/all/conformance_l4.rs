//! Conformance scenarios for connection-level traffic (VirtualService `tcp` and `tls` routes,
//! Gateway TLS modes, DestinationRule TLS origination), each run on real Envoy with the
//! filter and on the harness with the filter. They live here rather than in the YAML suite
//! because they need certificates issued per test and raw TCP/TLS clients. Sources are rows
//! of istio-semantics.md and istio.io tasks.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::l4::{
    path_text, pins, presented_certificate, tcp_exchange, EchoServer, TestCa, TlsClient,
};
use meshroute_tests::{
    get, on_both_hosts, rules, start, start_with_credentials, Envoy, Harness, Host, Running,
    Upstream,
};

/// A Kubernetes Service with one WorkloadEntry per upstream (`version: <name>`).
fn service(name: &str, port_name: &str, port: u16, upstreams: &[(&str, u16)]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: {port_name}, port: {port}}}]\n---\n"
    );
    for (version, p) in upstreams {
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}-{version}, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{{port_name}: {p}}}\n  labels: {{app: {name}, version: {version}}}\n---\n"
        ));
    }
    out
}

/// A Gateway TCP server on 31400 whose `tcp` route sends every connection to `db:5432`.
const TCP_GATEWAY_TO_DB: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: ['*']
  gateways: [istio-system/gw]
  tcp:
  - route: [{destination: {host: db, port: {number: 5432}}}]
";

/// An external `host` (ServiceEntry, HTTP on port 80, endpoint 127.0.0.1:`port`) and a
/// DestinationRule originating TLS to it with the `tls` block given as a flow mapping.
fn external_with_tls(host: &str, port: u16, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    tls: {tls}
"
    )
}

/// A sidecar (ALLOW_ANY) proxying to [`external_with_tls`]'s service.
fn sidecar_to_external(host: Host, name: &str, port: u16, tls: &str) -> Box<dyn Running + Sync> {
    let yaml = external_with_tls(name, port, tls);
    start(
        host,
        &rules(
            &[("l4.yaml", yaml)],
            ProxyKind::Sidecar,
            OutboundPolicy::AllowAny,
        ),
    )
}

fn gateway(doc_yaml: String) -> meshroute_core::ir::RulesDocument {
    rules(
        &[("l4.yaml", doc_yaml)],
        ProxyKind::Gateway,
        OutboundPolicy::AllowAny,
    )
}

/// istio.io "TCP Traffic Shifting": a Gateway TCP server and a VirtualService `tcp` route
/// sending 80 % of connections to v1 and 20 % to v2 (istio-semantics P1, P2).
fn tcp_weighted_split(host: Host) {
    let (v1, v2) = (EchoServer::tcp("v1"), EchoServer::tcp("v2"));
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tcp-echo, namespace: default}}
spec:
  host: tcp-echo
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tcp-echo-gateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 31400, name: tcp, protocol: TCP}}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: default}}
spec:
  hosts: ['*']
  gateways: [istio-system/tcp-echo-gateway]
  tcp:
  - match: [{{port: 31400}}]
    route:
    - destination: {{host: tcp-echo.default.svc.cluster.local, port: {{number: 9000}}, subset: v1}}
      weight: 80
    - destination: {{host: tcp-echo.default.svc.cluster.local, port: {{number: 9000}}, subset: v2}}
      weight: 20
",
        service("tcp-echo", "tcp", 9000, &[("v1", v1.port), ("v2", v2.port)])
    );
    let proxy = start(host, &gateway(yaml));
    let mut counts = BTreeMap::new();
    for i in 0..100 {
        let answer = tcp_exchange(proxy.port(), &format!("hello {i}")).unwrap();
        let (who, echoed) = answer.split_once(':').unwrap_or(("", ""));
        assert_eq!(
            echoed,
            format!("hello {i}"),
            "the bytes pass unchanged: {answer:?}"
        );
        *counts.entry(who.to_owned()).or_insert(0) += 1;
    }
    let (n1, n2) = (
        counts.get("v1").copied().unwrap_or(0),
        counts.get("v2").copied().unwrap_or(0),
    );
    assert_eq!(n1 + n2, 100, "{counts:?}");
    assert!((65..=93).contains(&n1), "80/20 split, got {counts:?}");
}

/// Two TLS host names on one Gateway port, each routed on its SNI to its own upstream
/// without the proxy terminating TLS: the client sees the upstream's own certificate
/// (istio-semantics P3, P4, GW5 PASSTHROUGH). An SNI no route names is closed.
fn sni_routing_without_termination(host: Host) {
    let ca = TestCa::new("sni");
    let (a_cert, b_cert) = (
        ca.issue("a", &["a.example.com"]),
        ca.issue("b", &["b.example.com"]),
    );
    let (a, b) = (EchoServer::tls("a", &a_cert), EchoServer::tls("b", &b_cert));
    let yaml = format!(
        "{}{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tls-gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: tls, protocol: TLS}}
    hosts: [a.example.com, b.example.com, c.example.com]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: by-sni, namespace: default}}
spec:
  hosts: [a.example.com, b.example.com]
  gateways: [istio-system/tls-gw]
  tls:
  - match: [{{port: 443, sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: svc-a.default.svc.cluster.local, port: {{number: 8443}}}}}}]
  - match: [{{port: 443, sniHosts: [b.example.com]}}]
    route: [{{destination: {{host: svc-b.default.svc.cluster.local, port: {{number: 8443}}}}}}]
",
        service("svc-a", "tls", 8443, &[("a", a.port)]),
        service("svc-b", "tls", 8443, &[("b", b.port)]),
    );
    let proxy = start(host, &gateway(yaml));
    let client = TlsClient::new(&ca.cert_pem, None);
    for _ in 0..3 {
        let r = client.get(proxy.port(), "a.example.com", "/").unwrap();
        assert!(r.ends_with("\r\n\r\na"), "a.example.com reaches a: {r}");
        let r = client.get(proxy.port(), "b.example.com", "/").unwrap();
        assert!(r.ends_with("\r\n\r\nb"), "b.example.com reaches b: {r}");
    }
    assert!(
        client.get(proxy.port(), "c.example.com", "/").is_err(),
        "no tls route names c.example.com: the connection is closed"
    );
    assert_eq!(
        a.connections() + b.connections(),
        6,
        "c reached no upstream"
    );
}

/// istio.io "Ingress Gateway without TLS Termination": a PASSTHROUGH server for
/// nginx.example.com and a `tls` route to the nginx service, which presents its own
/// certificate to the client (istio-semantics GW5).
fn passthrough_gateway(host: Host) {
    let ca = TestCa::new("passthrough");
    let cert = ca.issue("nginx", &["nginx.example.com"]);
    let nginx = EchoServer::tls("nginx", &cert);
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: [nginx.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: nginx, namespace: default}}
spec:
  hosts: [nginx.example.com]
  gateways: [istio-system/mygateway]
  tls:
  - match:
    - port: 443
      sniHosts: [nginx.example.com]
    route:
    - destination:
        host: my-nginx
        port: {{number: 443}}
",
        service("my-nginx", "https", 443, &[("v1", nginx.port)])
    );
    let proxy = start(host, &gateway(yaml));
    let r = TlsClient::new(&ca.cert_pem, None)
        .get(proxy.port(), "nginx.example.com", "/")
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("x-upstream: nginx"), "{r}");
    assert_eq!(nginx.connections(), 1);
}

/// istio.io "Secure Gateways", mutual TLS: a MUTUAL server accepts a client with a
/// certificate from the configured CA and rejects one without (istio-semantics GW5).
fn mutual_gateway_requires_a_client_certificate(host: Host) {
    let ca = TestCa::new("mutual");
    let server = ca.issue("httpbin", &["httpbin.example.com"]);
    let client_cert = ca.issue("client", &["client.example.com"]);
    let up = Upstream::start("httpbin");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls:
      mode: MUTUAL
      serverCertificate: {}
      privateKey: {}
      caCertificates: {}
    hosts: [httpbin.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: default}}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/mygateway]
  http:
  - route: [{{destination: {{host: httpbin, port: {{number: 8000}}}}}}]
",
        service("httpbin", "http", 8000, &[("v1", up.port)]),
        path_text(&server.cert_file),
        path_text(&server.key_file),
        path_text(&ca.ca_file()),
    );
    let proxy = start(host, &gateway(yaml));
    let with = TlsClient::new(&ca.cert_pem, Some(&client_cert))
        .get(proxy.port(), "httpbin.example.com", "/status")
        .unwrap();
    assert!(with.starts_with("HTTP/1.1 200"), "{with}");
    assert!(
        with.to_ascii_lowercase().contains("x-upstream: httpbin"),
        "{with}"
    );
    let without =
        TlsClient::new(&ca.cert_pem, None).get(proxy.port(), "httpbin.example.com", "/status");
    assert!(
        without.is_err(),
        "a client without a certificate is refused: {without:?}"
    );
    assert_eq!(
        up.count(),
        1,
        "only the authenticated request reached the upstream"
    );
}

/// istio.io "Egress TLS Origination": plain HTTP from the application, TLS to the external
/// service per the DestinationRule, with `sni` and `subjectAltNames` verified against the
/// CA; a SAN the certificate does not carry fails with 503 and the TLS reason
/// (istio-semantics TL1, TL2).
fn tls_origination_verifies_sni_and_san(host: Host) {
    let ca = TestCa::new("origination");
    let cert = ca.issue("external", &["secure.external.test"]);
    let external = EchoServer::tls("external", &cert);
    let config = |san: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: default}}
spec:
  hosts: [secure.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external, namespace: default}}
spec:
  host: secure.external.test
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls:
        mode: SIMPLE
        sni: secure.external.test
        subjectAltNames: [{san}]
        caCertificates: {ca}
",
            port = external.port,
            ca = path_text(&ca.ca_file()),
        )
    };
    let sidecar = |yaml: String| {
        rules(
            &[("l4.yaml", yaml)],
            ProxyKind::Sidecar,
            OutboundPolicy::AllowAny,
        )
    };
    let proxy = start(host, &sidecar(config("secure.external.test")));
    let r = proxy.send(&get("secure.external.test", "/"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "external");
    assert_eq!(r.header("x-upstream"), Some("external"));
    // The TLS connection is kept for the next requests, as Envoy's pool keeps it: no new
    // handshake per request.
    let opened = external.connections();
    for _ in 0..5 {
        assert_eq!(proxy.send(&get("secure.external.test", "/")).status, 200);
    }
    assert_eq!(
        external.connections(),
        opened,
        "five more requests opened TLS connections of their own"
    );
    drop(proxy);
    let before = external.connections();
    let doc = sidecar(config("other.external.test"));
    let refused = |r: &meshroute_tests::Response| {
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            r.text().starts_with("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"),
            "{}",
            r.text()
        );
    };
    match host {
        // Envoy's body stays generic; its access log names the transport failure.
        Host::Envoy => {
            let envoy = Envoy::start(&doc);
            refused(&envoy.send(&get("secure.external.test", "/")));
            // Envoy writes its access log asynchronously: wait for the line, bounded.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut log = envoy.log_text();
            while !log.contains("CERTIFICATE_VERIFY_FAILED") && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
                log = envoy.log_text();
            }
            assert!(log.contains("CERTIFICATE_VERIFY_FAILED"), "{log}");
        }
        Host::Harness => {
            let harness = Harness::start(&doc);
            let r = harness.send(&get("secure.external.test", "/"));
            refused(&r);
            assert!(
                r.text().contains("CERTIFICATE_VERIFY_FAILED"),
                "the reason is named: {}",
                r.text()
            );
        }
    }
    assert!(
        external.connections() > before,
        "the handshake reached the upstream and failed there"
    );
}

/// A sidecar's TCP service port: a listener of its own where a `tcp` route splits
/// connections by weight between subsets (istio-semantics V5, P2).
fn sidecar_tcp_port_split(host: Host) {
    let (v1, v2) = (EchoServer::tcp("v1"), EchoServer::tcp("v2"));
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db]
  tcp:
  - route:
    - {{destination: {{host: db, subset: v1}}, weight: 50}}
    - {{destination: {{host: db, subset: v2}}, weight: 50}}
",
        service("db", "tcp", 5432, &[("v1", v1.port), ("v2", v2.port)])
    );
    let doc = rules(
        &[("l4.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(host, &doc);
    let port = proxy.port_for(5432);
    assert_ne!(port, proxy.port(), "the TCP port has a listener of its own");
    let mut v1_count = 0;
    for i in 0..60 {
        let answer = tcp_exchange(port, &format!("q{i}")).unwrap();
        match answer.split_once(':') {
            Some(("v1", rest)) if rest == format!("q{i}") => v1_count += 1,
            Some(("v2", rest)) if rest == format!("q{i}") => {}
            _ => panic!("unexpected answer {answer:?}"),
        }
    }
    assert!(
        (15..=45).contains(&v1_count),
        "50/50 split, v1 got {v1_count} of 60"
    );
}

/// A sidecar's TLS port of a ServiceEntry: connections are routed on their SNI to the
/// entry's endpoints without terminating; with REGISTRY_ONLY an SNI the registry does not
/// know goes to the black hole, the connection closed (istio-semantics V4, SE1, SC4).
fn sidecar_tls_port_routes_on_sni(host: Host) {
    let ca = TestCa::new("sidecar-tls");
    let cert = ca.issue("api", &["api.external.test"]);
    let api = EchoServer::tls("api", &cert);
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {}}}}}]
",
        api.port
    );
    let doc = rules(
        &[("l4.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::RegistryOnly,
    );
    let proxy = start(host, &doc);
    let client = TlsClient::new(&ca.cert_pem, None);
    let r = client
        .get(proxy.port_for(443), "api.external.test", "/")
        .unwrap();
    assert!(r.ends_with("\r\n\r\napi"), "{r}");
    assert!(client
        .get(proxy.port_for(443), "unknown.external.test", "/")
        .is_err());
    assert_eq!(api.connections(), 1);
}

/// A Gateway TLS server that terminates (SIMPLE) and sends the decrypted bytes over its
/// `tcp` route (istio-semantics GW5; Istio's TLS-terminated TCP).
fn terminated_tls_server_uses_tcp_routes(host: Host) {
    let ca = TestCa::new("tls-tcp");
    let server = ca.issue("gw", &["db.example.com"]);
    let db = EchoServer::tcp("db");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 5443, name: tls, protocol: TLS}}
    hosts: [db.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example.com]
  gateways: [istio-system/gw]
  tcp:
  - route: [{{destination: {{host: db, port: {{number: 5432}}}}}}]
",
        service("db", "tcp", 5432, &[("v1", db.port)]),
        path_text(&server.cert_file),
        path_text(&server.key_file),
    );
    let proxy = start(host, &gateway(yaml));
    // The upstream speaks plain TCP: it echoes the request the client wrote inside TLS.
    let r = TlsClient::new(&ca.cert_pem, None)
        .get(proxy.port(), "db.example.com", "/q")
        .unwrap();
    assert!(r.starts_with("db:GET /q HTTP/1.1"), "{r:?}");
}

/// `connectionPool.tcp.maxConnections` on a TCP route: a connection beyond the limit is
/// closed without reaching the upstream (istio-semantics CP1; Envoy's TCP proxy overflow).
fn tcp_max_connections_closes_the_overflow(host: Host) {
    use std::io::{Read, Write};
    let db = EchoServer::tcp("db");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1}}
---
{TCP_GATEWAY_TO_DB}",
        service("db", "tcp", 5432, &[("v1", db.port)])
    );
    let proxy = start(host, &gateway(yaml));
    // The first connection stays open and proves it is through. (A readiness probe's
    // connection may still be closing upstream at first: try again shortly.)
    let open = || -> Option<std::net::TcpStream> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok()?;
        s.write_all(b"one").ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        (&buf[..n] == b"db:one").then_some(s)
    };
    let held = (0..50)
        .find_map(|_| {
            open().or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            })
        })
        .expect("a first connection goes through");
    let through = db.connections();
    let second = tcp_exchange(proxy.port(), "two");
    assert!(
        second.as_deref().map_or(true, str::is_empty),
        "the second connection is closed unanswered: {second:?}"
    );
    assert_eq!(db.connections(), through, "the second reached no upstream");
    drop(held);
    // Once the first is gone, a new one goes through.
    let mut third = String::new();
    for _ in 0..50 {
        third = tcp_exchange(proxy.port(), "three").unwrap_or_default();
        if !third.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(third, "db:three");
}

/// Both hosts report connections with Istio's TCP metrics and labels (inside Envoy, the
/// filter keeps them when the bootstrap's node metadata asks for them).
fn istio_tcp_metrics_count_connections_and_bytes(host: Host) {
    let db = EchoServer::tcp("db");
    let yaml = format!(
        "{}{TCP_GATEWAY_TO_DB}",
        service("db", "tcp", 5432, &[("v1", db.port)])
    );
    let proxy = start(host, &gateway(yaml));
    for _ in 0..3 {
        assert_eq!(tcp_exchange(proxy.port(), "12345").unwrap(), "db:12345");
    }
    let labels = [
        "{reporter=\"source\",",
        "destination_service=\"db.default.svc.cluster.local\",",
        "destination_service_name=\"db\",destination_service_namespace=\"default\",",
        "request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"unknown\"} ",
    ];
    let value = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|p| l.contains(p)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // A connection is counted once both sides are done: wait for the last one (the start-up
    // probe's included).
    let mut text = String::new();
    for _ in 0..100 {
        text = get("admin", "/stats/prometheus")
            .send(proxy.admin_port())
            .text();
        if value(&text, "istio_tcp_sent_bytes_total") == Some(24)
            && value(&text, "istio_tcp_connections_closed_total")
                == value(&text, "istio_tcp_connections_opened_total")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let value = |name: &str| {
        value(&text, name).unwrap_or_else(|| panic!("{name} {labels:?} missing in\n{text}"))
    };
    // A start-up probe's empty connection counts too.
    let opened = value("istio_tcp_connections_opened_total");
    assert!(opened >= 3, "{text}");
    assert_eq!(value("istio_tcp_connections_closed_total"), opened);
    assert_eq!(value("istio_tcp_received_bytes_total"), 15);
    assert_eq!(value("istio_tcp_sent_bytes_total"), 24);
    let series = text
        .lines()
        .find_map(|l| l.strip_prefix("istio_tcp_connections_opened_total{"))
        .and_then(|l| l.rsplit_once("} "))
        .unwrap()
        .0;
    let names: Vec<String> = meshroute_tests::prometheus_labels(series)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let expected: Vec<&str> = meshroute_tests::ISTIO_REQUEST_LABELS
        .iter()
        .copied()
        .filter(|l| !["response_code", "grpc_response_status"].contains(l))
        .collect();
    assert_eq!(names, expected, "Istio's TCP label set");
}

/// One port, two servers: HTTPS terminated at the gateway for one host, TLS passed through
/// for another; the SNI picks the server (istio-semantics GW2, GW5).
fn terminated_and_passthrough_servers_share_a_port(host: Host) {
    let ca = TestCa::new("mixed");
    let gw_cert = ca.issue("gw", &["secure.example.com"]);
    let nginx_cert = ca.issue("nginx", &["nginx.example.com"]);
    let nginx = EchoServer::tls("nginx", &nginx_cert);
    let web = Upstream::start("web");
    let yaml = format!(
        "{}{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [secure.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}
  - port: {{number: 443, name: tls-passthrough, protocol: TLS}}
    hosts: [nginx.example.com]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [secure.example.com]
  gateways: [istio-system/gw]
  http:
  - route: [{{destination: {{host: web, port: {{number: 8000}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: nginx, namespace: default}}
spec:
  hosts: [nginx.example.com]
  gateways: [istio-system/gw]
  tls:
  - match: [{{sniHosts: [nginx.example.com]}}]
    route: [{{destination: {{host: my-nginx, port: {{number: 443}}}}}}]
",
        service("web", "http", 8000, &[("v1", web.port)]),
        service("my-nginx", "https", 443, &[("v1", nginx.port)]),
        path_text(&gw_cert.cert_file),
        path_text(&gw_cert.key_file),
    );
    let proxy = start(host, &gateway(yaml));
    let client = TlsClient::new(&ca.cert_pem, None);
    let r = client
        .get(proxy.port(), "secure.example.com", "/pay")
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("x-upstream: web"),
        "terminated and routed as HTTP: {r}"
    );
    assert_eq!(web.received()[0].path, "/pay");
    let r = client.get(proxy.port(), "nginx.example.com", "/").unwrap();
    assert!(r.ends_with("\r\n\r\nnginx"), "passed through to nginx: {r}");
    assert!(client.get(proxy.port(), "other.example.com", "/").is_err());
}

/// Hostile clients on a passthrough port: a ClientHello that announces more than it sends
/// and stalls, plain bytes where TLS is expected, a truncated record. Each is closed or
/// waits alone; a real client is routed meanwhile.
fn passthrough_port_survives_broken_client_hellos(host: Host) {
    use std::io::Write;
    let ca = TestCa::new("hostile");
    let cert = ca.issue("a", &["a.example.com"]);
    let a = EchoServer::tls("a", &cert);
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: tls, protocol: TLS}}
    hosts: [a.example.com]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: a, namespace: default}}
spec:
  hosts: [a.example.com]
  gateways: [istio-system/gw]
  tls:
  - match: [{{sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: svc-a, port: {{number: 8443}}}}}}]
",
        service("svc-a", "tls", 8443, &[("a", a.port)])
    );
    let proxy = start(host, &gateway(yaml));
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        // A handshake record claiming 16 KiB, of which 3 bytes arrive.
        s.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f])
            .unwrap();
        stalled.push(s);
    }
    let plain = tcp_exchange(proxy.port(), "GET / HTTP/1.1\r\n\r\n");
    assert!(
        plain.as_deref().map_or(true, str::is_empty),
        "plain bytes on a TLS passthrough port reach nobody: {plain:?}"
    );
    let r = TlsClient::new(&ca.cert_pem, None)
        .get(proxy.port(), "a.example.com", "/")
        .unwrap();
    assert!(r.ends_with("\r\n\r\na"), "{r}");
    assert_eq!(
        a.connections(),
        1,
        "only the real client reached the upstream"
    );
    drop(stalled);
}

/// DestinationRule TLS origination on a TCP route: the gateway accepts plain TCP and
/// speaks TLS to the upstream with the configured SNI, verified against the CA
/// (istio-semantics TL1, TL2).
fn tcp_route_originates_tls(host: Host) {
    let ca = TestCa::new("tcp-origination");
    let cert = ca.issue("db", &["db.internal.test"]);
    let db = EchoServer::tls("db", &cert);
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db
  trafficPolicy:
    tls: {{mode: SIMPLE, sni: db.internal.test, caCertificates: {}}}
---
{TCP_GATEWAY_TO_DB}",
        service("db", "tcp", 5432, &[("v1", db.port)]),
        path_text(&ca.ca_file()),
    );
    let proxy = start(host, &gateway(yaml));
    let answer = tcp_exchange(proxy.port(), "GET / HTTP/1.1\r\nhost: db\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\ndb"), "{answer:?}");
}

/// `connectionPool.tcp.idleTimeout`: a proxied connection with no bytes either way for
/// that long is closed (istio-semantics CP4).
fn tcp_idle_timeout_closes_quiet_connections(host: Host) {
    use std::io::{Read, Write};
    let db = EchoServer::tcp("db");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db
  trafficPolicy:
    connectionPool:
      tcp: {{idleTimeout: 500ms}}
---
{TCP_GATEWAY_TO_DB}",
        service("db", "tcp", 5432, &[("v1", db.port)])
    );
    let proxy = start(host, &gateway(yaml));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"db:ping");
    let quiet = std::time::Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = quiet.elapsed();
    assert_eq!(n, 0, "the proxy closed the quiet connection");
    assert!(
        waited >= std::time::Duration::from_millis(300)
            && waited < std::time::Duration::from_secs(5),
        "closed after {waited:?}, the idle timeout is 500 ms"
    );
}

/// istio.io "Secure Gateways" with `credentialName`: the secret (here a directory laid out
/// as one) holds the server certificate, key and the client CA (`ca.crt`) for MUTUAL.
fn mutual_gateway_from_credential_name(host: Host) {
    let ca = TestCa::new("credential-gw");
    let server = ca.issue("httpbin", &["httpbin.example.com"]);
    let client_cert = ca.issue("client", &["client.example.com"]);
    let creds = ca.credential("httpbin-credential", &server);
    let up = Upstream::start("httpbin");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: MUTUAL, credentialName: httpbin-credential}}
    hosts: [httpbin.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: default}}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/mygateway]
  http:
  - route: [{{destination: {{host: httpbin, port: {{number: 8000}}}}}}]
",
        service("httpbin", "http", 8000, &[("v1", up.port)]),
    );
    let doc = gateway(yaml);
    let proxy = start_with_credentials(host, &doc, &creds);
    let port = proxy.port();
    let with = TlsClient::new(&ca.cert_pem, Some(&client_cert))
        .get(port, "httpbin.example.com", "/headers")
        .unwrap();
    assert!(with.starts_with("HTTP/1.1 200"), "{with}");
    assert!(TlsClient::new(&ca.cert_pem, None)
        .get(port, "httpbin.example.com", "/headers")
        .is_err());
    assert_eq!(up.count(), 1);
}

/// A MUTUAL server's constraints beyond its CA, as Envoy applies Istio's settings: the
/// client's SPIFFE URI must be one of `subjectAltNames` and its serial not on `caCrl`'s list;
/// on the second port a certificate gets in by either pin (`verifyCertificateHash`,
/// `verifyCertificateSpki`) and by no other way.
fn mutual_gateway_checks_names_pins_and_revocation(host: Host) {
    let ca = TestCa::new("client-constraints");
    let server = ca.issue("app", &["app.example.com"]);
    let sa = |name: &str| format!("spiffe://cluster.local/ns/default/sa/{name}");
    let good = ca.issue_uri("good", &sa("good"), 11);
    let revoked = ca.issue_uri("revoked", &sa("revoked"), 12);
    let stranger = ca.issue_uri("stranger", &sa("stranger"), 13);
    let crl = ca.revocation_list("crl", &[12]);
    let (_, good_hash) = pins(&good);
    let (stranger_spki, _) = pins(&stranger);
    let up = Upstream::start("app");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-names, protocol: HTTPS}}
    hosts: [app.example.com]
    tls:
      mode: MUTUAL
      serverCertificate: {cert}
      privateKey: {key}
      caCertificates: {ca}
      subjectAltNames: ['{good_sa}', '{revoked_sa}']
      caCrl: {crl}
  - port: {{number: 8443, name: https-pins, protocol: HTTPS}}
    hosts: [app.example.com]
    tls:
      mode: MUTUAL
      serverCertificate: {cert}
      privateKey: {key}
      caCertificates: {ca}
      verifyCertificateHash: ['{good_hash}']
      verifyCertificateSpki: ['{stranger_spki}']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: default}}
spec:
  hosts: [app.example.com]
  gateways: [istio-system/gw]
  http:
  - route: [{{destination: {{host: app, port: {{number: 8000}}}}}}]
",
        service("app", "http", 8000, &[("v1", up.port)]),
        cert = path_text(&server.cert_file),
        key = path_text(&server.key_file),
        ca = path_text(&ca.ca_file()),
        crl = path_text(&crl),
        good_sa = sa("good"),
        revoked_sa = sa("revoked"),
    );
    let proxy = start(host, &gateway(yaml));
    let get = |port: u16, client| {
        TlsClient::new(&ca.cert_pem, Some(client))
            .get(proxy.port_for(port), "app.example.com", "/")
            .map(|r| r.starts_with("HTTP/1.1 200"))
    };
    assert_eq!(get(443, &good), Ok(true), "a listed name, not revoked");
    assert!(
        !get(443, &revoked).unwrap_or(false),
        "a listed name, revoked"
    );
    assert!(!get(443, &stranger).unwrap_or(false), "a name not listed");
    assert_eq!(get(8443, &good), Ok(true), "pinned by its hash");
    assert_eq!(get(8443, &stranger), Ok(true), "pinned by its public key");
    assert!(!get(8443, &revoked).unwrap_or(false), "pinned by neither");
    assert_eq!(up.count(), 3);
}

/// Istio's `tlsCertificates` and `credentialNames` (an RSA and an ECDSA certificate for one
/// server): as Envoy documents `tls_certificates`, a client that can verify ECDSA gets the
/// ECDSA certificate, one that verifies RSA only gets the RSA one, whatever the order.
fn gateway_serves_the_certificate_each_client_can_verify(host: Host) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::SignatureScheme as S;
    let ca = TestCa::new("two-certs");
    let names = ["a.example.com", "b.example.com"];
    let rsa = ca.issue_rsa("rsa", &names);
    let ecdsa = ca.issue("ecdsa", &names);
    ca.credential("b-rsa", &rsa);
    let creds = ca.credential("b-ecdsa", &ecdsa);
    let up = Upstream::start("app");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-files, protocol: HTTPS}}
    hosts: [a.example.com]
    tls:
      mode: SIMPLE
      tlsCertificates:
      - {{serverCertificate: {rsa_cert}, privateKey: {rsa_key}}}
      - {{serverCertificate: {ecdsa_cert}, privateKey: {ecdsa_key}}}
  - port: {{number: 8443, name: https-secrets, protocol: HTTPS}}
    hosts: [b.example.com]
    tls: {{mode: SIMPLE, credentialNames: [b-rsa, b-ecdsa]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: default}}
spec:
  hosts: [a.example.com, b.example.com]
  gateways: [istio-system/gw]
  http:
  - route: [{{destination: {{host: app, port: {{number: 8000}}}}}}]
",
        service("app", "http", 8000, &[("v1", up.port)]),
        rsa_cert = path_text(&rsa.cert_file),
        rsa_key = path_text(&rsa.key_file),
        ecdsa_cert = path_text(&ecdsa.cert_file),
        ecdsa_key = path_text(&ecdsa.key_file),
    );
    let proxy = start_with_credentials(host, &gateway(yaml), &creds);
    let der =
        |pem: &str| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let rsa_only: &[S] = &[
        S::RSA_PSS_SHA256,
        S::RSA_PSS_SHA384,
        S::RSA_PSS_SHA512,
        S::RSA_PKCS1_SHA256,
        S::RSA_PKCS1_SHA384,
        S::RSA_PKCS1_SHA512,
    ];
    let ecdsa_only: &[S] = &[S::ECDSA_NISTP256_SHA256, S::ECDSA_NISTP384_SHA384];
    for (port, sni) in [(443, "a.example.com"), (8443, "b.example.com")] {
        let port = proxy.port_for(port);
        let presented = |schemes| presented_certificate(port, &ca.cert_pem, sni, schemes);
        assert_eq!(
            presented(Some(rsa_only)),
            Ok(der(&rsa.cert_pem)),
            "{sni}: RSA-only client"
        );
        assert_eq!(
            presented(Some(ecdsa_only)),
            Ok(der(&ecdsa.cert_pem)),
            "{sni}: ECDSA-only client"
        );
        assert_eq!(
            presented(None),
            Ok(der(&ecdsa.cert_pem)),
            "{sni}: a client of both"
        );
        let r = TlsClient::new(&ca.cert_pem, None)
            .get(port, sni, "/")
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{sni}: {r}");
    }
    assert_eq!(up.count(), 2);
}

/// Istio 1.28's `caCertCredentialName`: the client CA comes from a secret of its own, so
/// a server secret without `ca.crt` still verifies clients.
fn mutual_gateway_with_a_separate_ca_secret(host: Host) {
    let ca = TestCa::new("ca-credential-gw");
    let server = ca.issue("httpbin", &["httpbin.example.com"]);
    let client_cert = ca.issue("client", &["client.example.com"]);
    let creds = ca.credential("httpbin-credential", &server);
    std::fs::remove_file(creds.join("httpbin-credential/ca.crt")).unwrap();
    std::fs::create_dir_all(creds.join("httpbin-ca")).unwrap();
    std::fs::write(creds.join("httpbin-ca/ca.crt"), &ca.cert_pem).unwrap();
    let up = Upstream::start("httpbin");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mygateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: MUTUAL, credentialName: httpbin-credential, caCertCredentialName: httpbin-ca}}
    hosts: [httpbin.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: default}}
spec:
  hosts: [httpbin.example.com]
  gateways: [istio-system/mygateway]
  http:
  - route: [{{destination: {{host: httpbin, port: {{number: 8000}}}}}}]
",
        service("httpbin", "http", 8000, &[("v1", up.port)]),
    );
    let proxy = start_with_credentials(host, &gateway(yaml), &creds);
    let port = proxy.port();
    let with = TlsClient::new(&ca.cert_pem, Some(&client_cert))
        .get(port, "httpbin.example.com", "/headers")
        .unwrap();
    assert!(with.starts_with("HTTP/1.1 200"), "{with}");
    assert!(TlsClient::new(&ca.cert_pem, None)
        .get(port, "httpbin.example.com", "/headers")
        .is_err());
}

/// DestinationRule MUTUAL origination with `credentialName`: the client certificate from
/// the secret is presented to an upstream that requires one (istio-semantics TL1, TL2).
fn mutual_origination_from_credential_name(host: Host) {
    let ca = TestCa::new("credential-origination");
    let server = ca.issue("external", &["mtls.external.test"]);
    let client_cert = ca.issue("client", &["client.mesh.test"]);
    let creds = ca.credential("client-credential", &client_cert);
    let external = EchoServer::tls_verifying("external", &server, Some(&ca.cert_pem));
    let yaml = external_with_tls(
        "mtls.external.test",
        external.port,
        "{mode: MUTUAL, credentialName: client-credential, sni: mtls.external.test}",
    );
    let doc = rules(
        &[("l4.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let r = start_with_credentials(host, &doc, &creds).send(&get("mtls.external.test", "/"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "external");
}

/// DestinationRule MUTUAL origination with `clientCertificate`, `privateKey` and
/// `caCertificates` files: an upstream that requires a client certificate answers, and one
/// without the client certificate configured is refused (istio-semantics TL1, TL2).
fn mutual_origination_from_certificate_files(host: Host) {
    let ca = TestCa::new("file-origination");
    let server = ca.issue("external", &["mtls.external.test"]);
    let client = ca.issue("client", &["client.mesh.test"]);
    let external = EchoServer::tls_verifying("external", &server, Some(&ca.cert_pem));
    let sidecar =
        |tls: String| sidecar_to_external(host, "mtls.external.test", external.port, &tls);
    let with = sidecar(format!(
        "{{mode: MUTUAL, clientCertificate: {}, privateKey: {}, caCertificates: {}, sni: mtls.external.test}}",
        path_text(&client.cert_file),
        path_text(&client.key_file),
        path_text(&ca.ca_file()),
    ));
    let r = with.send(&get("mtls.external.test", "/"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "external");
    drop(with);
    let without = sidecar(format!(
        "{{mode: SIMPLE, caCertificates: {}, sni: mtls.external.test}}",
        path_text(&ca.ca_file()),
    ));
    assert_eq!(without.send(&get("mtls.external.test", "/")).status, 503);
}

/// `insecureSkipVerify: true`: TLS is originated to an upstream whose certificate no
/// configured CA vouches for (istio-semantics TL2).
fn tls_origination_can_skip_verification(host: Host) {
    let unknown_ca = TestCa::new("unknown");
    let cert = unknown_ca.issue("legacy", &["legacy.external.test"]);
    let legacy = EchoServer::tls("legacy", &cert);
    let yaml = external_with_tls(
        "legacy.external.test",
        legacy.port,
        "{mode: SIMPLE, insecureSkipVerify: true}",
    );
    let doc = rules(
        &[("l4.yaml", yaml)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let proxy = start(host, &doc);
    let r = proxy.send(&get("legacy.external.test", "/"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "legacy");
}

/// DestinationRule `subjectAltNames` holding an Istio identity (`spiffe://…`, a URI name)
/// match a certificate that carries only that URI, whatever SNI was sent; a `caCrl` turns
/// away a certificate the CA revoked; another identity is refused (Envoy's typed SAN
/// matchers and `crl`, istio-semantics TL2).
fn origination_matches_spiffe_names_and_checks_revocation(host: Host) {
    const IDENTITY: &str = "spiffe://cluster.local/ns/payments/sa/api";
    let ca = TestCa::new("identities");
    let good = EchoServer::tls("good", &ca.issue_uri("good", IDENTITY, 7));
    let revoked = EchoServer::tls("revoked", &ca.issue_uri("revoked", IDENTITY, 9));
    let crl = ca.revocation_list("crl", &[9]);
    let proxy_for = |port: u16, san: &str| {
        let tls = format!(
            "{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [{san}], caCrl: {}}}",
            path_text(&ca.ca_file()),
            path_text(&crl),
        );
        sidecar_to_external(host, "payments.external.test", port, &tls)
    };
    let proxy = proxy_for(good.port, IDENTITY);
    let r = proxy.send(&get("payments.external.test", "/"));
    assert_eq!(r.status, 200, "the URI name matches: {}", r.text());
    assert_eq!(r.text(), "good");
    drop(proxy);
    let proxy = proxy_for(good.port, "spiffe://cluster.local/ns/payments/sa/other");
    let r = proxy.send(&get("payments.external.test", "/"));
    assert_eq!(r.status, 503, "another identity is refused: {}", r.text());
    drop(proxy);
    let before = revoked.connections();
    let proxy = proxy_for(revoked.port, IDENTITY);
    let r = proxy.send(&get("payments.external.test", "/"));
    assert_eq!(
        r.status,
        503,
        "the revoked certificate is refused: {}",
        r.text()
    );
    assert!(
        revoked.connections() > before,
        "the handshake reached the upstream and failed there"
    );
}

/// Without `sni` and `subjectAltNames` the upstream's certificate must be for the request's
/// host (Envoy's `auto_san_validation`, which istiod sets then); with `sni` alone only the
/// CA's signature is checked, as istiod leaves name validation off.
fn origination_checks_the_host_name_only_without_sni_and_sans(host: Host) {
    let ca = TestCa::new("auto-san");
    let other = EchoServer::tls("other", &ca.issue("other", &["other.external.test"]));
    let ca_file = path_text(&ca.ca_file());
    let proxy = sidecar_to_external(
        host,
        "wanted.external.test",
        other.port,
        &format!("{{mode: SIMPLE, caCertificates: {ca_file}}}"),
    );
    let r = proxy.send(&get("wanted.external.test", "/"));
    assert_eq!(
        r.status,
        503,
        "a certificate for another name: {}",
        r.text()
    );
    drop(proxy);
    let proxy = sidecar_to_external(
        host,
        "wanted.external.test",
        other.port,
        &format!("{{mode: SIMPLE, caCertificates: {ca_file}, sni: other.external.test}}"),
    );
    let r = proxy.send(&get("wanted.external.test", "/"));
    assert_eq!(r.status, 200, "sni alone: the CA decides: {}", r.text());
    assert_eq!(r.text(), "other");
}

/// The TLS version and TLS 1.2 cipher suite a client gets from 127.0.0.1:`port`, offering
/// only `versions`; `Err` when the handshake fails.
fn negotiated(
    port: u16,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(rustls::ProtocolVersion, rustls::CipherSuite), String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        "db.example.com".try_into().unwrap(),
    )
    .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok((
        conn.protocol_version().unwrap(),
        conn.negotiated_cipher_suite().unwrap().suite(),
    ))
}

/// Gateway `tls.minProtocolVersion`, `maxProtocolVersion` and `cipherSuites` (Envoy's
/// `tls_params`): a server pinned to TLS 1.3 refuses TLS 1.2, one capped at TLS 1.2 with
/// one suite negotiates exactly that.
fn tls_versions_and_cipher_suites_are_enforced(host: Host) {
    let ca = TestCa::new("tls-params");
    let server = ca.issue("gw", &["db.example.com"]);
    let db = EchoServer::tcp("db");
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 5443, name: tls-13, protocol: TLS}}
    hosts: [db.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}, minProtocolVersion: TLSV1_3}}
  - port: {{number: 5444, name: tls-12, protocol: TLS}}
    hosts: [db.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}, maxProtocolVersion: TLSV1_2, cipherSuites: [ECDHE-ECDSA-AES256-GCM-SHA384]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example.com]
  gateways: [istio-system/gw]
  tcp:
  - route: [{{destination: {{host: db, port: {{number: 5432}}}}}}]
",
        service("db", "tcp", 5432, &[("v1", db.port)]),
        cert = path_text(&server.cert_file),
        key = path_text(&server.key_file),
    );
    let proxy = start(host, &gateway(yaml));
    let (tls13, tls12) = (proxy.port_for(5443), proxy.port_for(5444));
    let both = [&rustls::version::TLS13, &rustls::version::TLS12];
    assert!(negotiated(tls13, &ca.cert_pem, &[&rustls::version::TLS12]).is_err());
    assert_eq!(
        negotiated(tls13, &ca.cert_pem, &both).map(|n| n.0),
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        negotiated(tls12, &ca.cert_pem, &both),
        Ok((
            rustls::ProtocolVersion::TLSv1_2,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        ))
    );
    assert!(negotiated(tls12, &ca.cert_pem, &[&rustls::version::TLS13]).is_err());
}

on_both_hosts!(
    origination_checks_the_host_name_only_without_sni_and_sans,
    origination_matches_spiffe_names_and_checks_revocation,
    mutual_gateway_checks_names_pins_and_revocation,
    gateway_serves_the_certificate_each_client_can_verify,
    istio_tcp_metrics_count_connections_and_bytes,
    tls_versions_and_cipher_suites_are_enforced,
    mutual_gateway_with_a_separate_ca_secret,
    tls_origination_can_skip_verification,
    mutual_gateway_from_credential_name,
    mutual_origination_from_credential_name,
    mutual_origination_from_certificate_files,
    tcp_idle_timeout_closes_quiet_connections,
    tcp_route_originates_tls,
    passthrough_port_survives_broken_client_hellos,
    terminated_and_passthrough_servers_share_a_port,
    terminated_tls_server_uses_tcp_routes,
    tcp_max_connections_closes_the_overflow,
    sidecar_tcp_port_split,
    sidecar_tls_port_routes_on_sni,
    tcp_weighted_split,
    sni_routing_without_termination,
    passthrough_gateway,
    mutual_gateway_requires_a_client_certificate,
    tls_origination_verifies_sni_and_san,
);
