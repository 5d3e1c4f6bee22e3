//! The rules document's wire shape is fixed by its version.
//!
//! The fixture below sets every field of every type and uses every enum variant, written
//! without `..Default::default()` so that adding a field or a variant stops it compiling. Its
//! JSON must equal `golden/v{VERSION}.json`: any change to the shape fails here until
//! `ir::VERSION` is bumped and the new golden file written (run with `MESHROUTE_BLESS=1`).
//! Documents of earlier versions are refused with the version message.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::path::PathBuf;

use meshroute_core::ir::*;

fn golden_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}.json"))
}

fn source() -> Option<SourceRef> {
    Some(SourceRef {
        kind: "VirtualService".into(),
        namespace: "default".into(),
        name: "web".into(),
        file: "web.yaml".into(),
        line: 3,
    })
}

fn ops() -> HeaderOps {
    HeaderOps {
        set: vec![("x-set".into(), "1".into())],
        add: vec![("x-add".into(), "2".into())],
        remove: vec!["x-remove".into()],
    }
}

fn destination(subset: &str, port: Option<u16>) -> Destination {
    Destination {
        host: "web.default.svc.cluster.local".into(),
        subset: subset.into(),
        port,
        weight: 50,
        request_headers: ops(),
        response_headers: ops(),
    }
}

fn string_matches() -> Vec<StringMatch> {
    // Every variant, in declaration order.
    let all = |m: &StringMatch| match m {
        StringMatch::Exact(_)
        | StringMatch::Prefix(_)
        | StringMatch::Regex(_)
        | StringMatch::Present => (),
    };
    let v = vec![
        StringMatch::Exact("a".into()),
        StringMatch::Prefix("/b".into()),
        StringMatch::Regex("c+".into()),
        StringMatch::Present,
    ];
    v.iter().for_each(all);
    v
}

fn route(action: Action) -> Route {
    Route {
        name: "r".into(),
        matches: vec![RouteMatch {
            name: "m".into(),
            uri: Some(StringMatch::Prefix("/api".into())),
            ignore_uri_case: true,
            scheme: Some(StringMatch::Exact("https".into())),
            method: Some(StringMatch::Regex("GET|POST".into())),
            authority: Some(StringMatch::Exact("web".into())),
            headers: string_matches()
                .into_iter()
                .map(|matcher| HeaderMatch {
                    name: "end-user".into(),
                    matcher,
                    invert: true,
                })
                .collect(),
            query_params: string_matches()
                .into_iter()
                .map(|matcher| QueryMatch {
                    name: "q".into(),
                    matcher,
                })
                .collect(),
            port: Some(8000),
        }],
        action,
        request_headers: ops(),
        response_headers: ops(),
        cors: Some(CorsPolicy {
            allow_origins: string_matches(),
            allow_methods: vec!["GET".into()],
            allow_headers: vec!["x-h".into()],
            expose_headers: vec!["x-e".into()],
            max_age_s: Some(60),
            allow_credentials: Some(true),
            ignore_unmatched_preflights: true,
        }),
        fault: Some(Fault {
            delay: Some(FaultDelay {
                delay_ms: 5000,
                per_million: 100_000,
            }),
            abort: Some(FaultAbort {
                http_status: Some(418),
                grpc_status: Some(14),
                per_million: 1,
            }),
        }),
        mirrors: vec![Mirror {
            host: "mirror.default.svc.cluster.local".into(),
            subset: "v1".into(),
            port: Some(8000),
            per_million: 500_000,
        }],
        timeout_ms: Some(1500),
        retry: Some(RetryPolicy {
            num_retries: 3,
            per_try_timeout_ms: Some(200),
            retry_on: vec!["5xx".into()],
            retriable_status_codes: vec![503],
            backoff_base_ms: Some(25),
            avoid_previous_hosts: false,
            retry_remote_localities: true,
        }),
        source: source(),
    }
}

fn actions() -> Vec<Action> {
    let all = |a: &Action| match a {
        Action::Route(_) | Action::Redirect(_) | Action::DirectResponse(_) => (),
    };
    let redirect_ports = [RedirectPort::Number(8443), RedirectPort::FromRequestPort];
    let _ = |p: RedirectPort| match p {
        RedirectPort::Number(_) | RedirectPort::FromRequestPort => (),
    };
    let mut v = vec![Action::Route(RouteAction {
        destinations: vec![destination("v1", Some(8000)), destination("", None)],
        rewrite: Some(Rewrite {
            uri: Some("/v2".into()),
            uri_regex: Some(RegexRewrite {
                pattern: "^/(.*)".into(),
                substitution: "/x/\\1".into(),
            }),
            authority: Some("other".into()),
        }),
    })];
    v.extend(redirect_ports.into_iter().map(|port| {
        Action::Redirect(Redirect {
            uri: Some("/new".into()),
            prefix_rewrite: Some("/p".into()),
            authority: Some("example.com".into()),
            scheme: Some("https".into()),
            port: Some(port),
            status: 308,
        })
    }));
    v.push(Action::DirectResponse(DirectResponse {
        status: 200,
        body: Some("aGk=".into()),
    }));
    v.iter().for_each(all);
    v
}

fn cluster(discovery: Discovery, policy: LbPolicy, key: HashKey, tls: ClientTlsMode) -> Cluster {
    Cluster {
        name: "outbound|8000|v1|web.default.svc.cluster.local".into(),
        service: "web.default.svc.cluster.local".into(),
        port: 8000,
        subset: "v1".into(),
        discovery,
        endpoints: vec![Endpoint {
            address: "10.0.0.1".into(),
            port: 8000,
            weight: 2,
            labels: BTreeMap::from([("version".into(), "v1".into())]),
            locality: "r/z/s".into(),
        }],
        protocol: Protocol::Http,
        connect_timeout_ms: 250,
        lb: LoadBalancer {
            policy,
            consistent_hash: Some(ConsistentHash {
                key,
                maglev_table_size: Some(65537),
                minimum_ring_size: Some(1024),
            }),
            warmup_ms: Some(30_000),
            locality: LocalityLb {
                disabled: true,
                distribute: vec![("r/*".into(), BTreeMap::from([("r/z/*".into(), 100)]))],
                failover: vec![("r".into(), "r2".into())],
                failover_priority: vec!["topology.kubernetes.io/zone".into()],
            },
        },
        connection_pool: ConnectionPool {
            max_connections: 1,
            http1_max_pending_requests: 2,
            http2_max_requests: 3,
            max_requests_per_connection: 4,
            max_retries: 5,
            idle_timeout_ms: Some(6),
            tcp_idle_timeout_ms: Some(7),
            max_connection_duration_ms: Some(8),
            max_concurrent_streams: Some(9),
            h2_upgrade: true,
            tcp_keepalive: Some(TcpKeepalive {
                probes: Some(3),
                time_s: Some(60),
                interval_s: Some(10),
            }),
        },
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: Some(3),
            consecutive_local_origin_failures: Some(2),
            split_external_local_origin_errors: true,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
            min_health_percent: 50,
        }),
        tls: Some(ClientTls {
            mode: tls,
            sni: Some("web.example.com".into()),
            subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/web".into()],
            ca_certificates: Some("/etc/ca.pem".into()),
            client_certificate: Some("/etc/cert.pem".into()),
            private_key: Some("/etc/key.pem".into()),
            insecure_skip_verify: true,
            ca_crl: Some("/etc/ca.crl".into()),
            credential_name: Some("web-client".into()),
        }),
        source: source(),
    }
}

fn clusters() -> Vec<Cluster> {
    let discoveries = [Discovery::Static, Discovery::Dns, Discovery::OriginalDst];
    let _ = |d: Discovery| match d {
        Discovery::Static | Discovery::Dns | Discovery::OriginalDst => (),
    };
    let policies = [
        LbPolicy::LeastRequest,
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::Passthrough,
    ];
    let _ = |p: LbPolicy| match p {
        LbPolicy::LeastRequest
        | LbPolicy::RoundRobin
        | LbPolicy::Random
        | LbPolicy::Passthrough => {}
    };
    let keys = [
        HashKey::Header("x-user".into()),
        HashKey::Cookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl_ms: Some(60_000),
            attributes: vec![CookieAttribute {
                name: "SameSite".into(),
                value: "Strict".into(),
            }],
        },
        HashKey::SourceIp,
        HashKey::QueryParameter("u".into()),
    ];
    let _ = |k: &HashKey| match k {
        HashKey::Header(_)
        | HashKey::Cookie { .. }
        | HashKey::SourceIp
        | HashKey::QueryParameter(_) => {}
    };
    let modes = [
        ClientTlsMode::Simple,
        ClientTlsMode::Mutual,
        ClientTlsMode::IstioMutual,
    ];
    let _ = |m: ClientTlsMode| match m {
        ClientTlsMode::Simple | ClientTlsMode::Mutual | ClientTlsMode::IstioMutual => (),
    };
    let mut out: Vec<Cluster> = (0..4)
        .map(|i| {
            cluster(
                discoveries[i % 3],
                policies[i],
                keys[i].clone(),
                modes[i % 3],
            )
        })
        .collect();
    let protocols = [
        Protocol::Unspecified,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Https,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Mongo,
        Protocol::Redis,
        Protocol::Mysql,
        Protocol::Udp,
    ];
    let _ = |p: Protocol| match p {
        Protocol::Unspecified
        | Protocol::Http
        | Protocol::Http2
        | Protocol::Https
        | Protocol::Grpc
        | Protocol::GrpcWeb
        | Protocol::Tcp
        | Protocol::Tls
        | Protocol::Mongo
        | Protocol::Redis
        | Protocol::Mysql
        | Protocol::Udp => (),
    };
    // Every protocol appears: one cluster per protocol, the policies cycling.
    let n = out.len();
    out = protocols
        .iter()
        .enumerate()
        .map(|(i, &p)| Cluster {
            protocol: p,
            ..out[i % n].clone()
        })
        .collect();
    out
}

fn listeners() -> Vec<Listener> {
    let routings = [
        ServerRouting::Http,
        ServerRouting::TerminatedHttp,
        ServerRouting::TerminatedTcp,
        ServerRouting::Passthrough,
        ServerRouting::AutoPassthrough,
        ServerRouting::Tcp,
    ];
    let _ = |r: ServerRouting| match r {
        ServerRouting::Http
        | ServerRouting::TerminatedHttp
        | ServerRouting::TerminatedTcp
        | ServerRouting::Passthrough
        | ServerRouting::AutoPassthrough
        | ServerRouting::Tcp => (),
    };
    let modes = [
        ServerTlsMode::Simple,
        ServerTlsMode::Mutual,
        ServerTlsMode::OptionalMutual,
    ];
    let _ = |m: ServerTlsMode| match m {
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => (),
    };
    vec![Listener {
        port: 443,
        servers: routings
            .iter()
            .enumerate()
            .map(|(i, &routing)| ListenerServer {
                hosts: vec!["istio-system/*.example.com".into()],
                routing,
                tls: Some(ServerTls {
                    mode: modes[i % 3],
                    server_certificate: Some("/etc/cert.pem".into()),
                    private_key: Some("/etc/key.pem".into()),
                    ca_certificates: Some("/etc/ca.pem".into()),
                    credential_name: Some("web-credential".into()),
                    credential_names: vec!["web-rsa".into(), "web-ecdsa".into()],
                    tls_certificates: vec![CertificateFiles {
                        server_certificate: "/etc/rsa.pem".into(),
                        private_key: "/etc/rsa-key.pem".into(),
                    }],
                    ca_cert_credential_name: Some("web-ca".into()),
                    subject_alt_names: vec!["spiffe://cluster.local/ns/web/sa/client".into()],
                    verify_certificate_spki: vec![
                        "NvqYIYSbgK2vCJpQhObf77vv+bQWtc5ek5RIOwPiC9A=".into()
                    ],
                    verify_certificate_hash: vec![
                        "df6ff72fe9116521268f6f2dd4966f51df47883fd012c7b4f39b62d6e50bb5ea".into(),
                    ],
                    ca_crl: Some("/etc/crl.pem".into()),
                    min_protocol_version: Some(TlsVersion::Tls12),
                    max_protocol_version: Some(TlsVersion::Tls13),
                    cipher_suites: vec!["ECDHE-RSA-AES128-GCM-SHA256".into()],
                }),
            })
            .collect(),
    }]
}

fn fixture(
    kind: ProxyKind,
    outbound: OutboundPolicy,
    endpoint_selection: EndpointSelection,
) -> RulesDocument {
    RulesDocument {
        version: VERSION,
        proxy: ProxyIdentity {
            kind,
            namespace: "default".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            locality: "r/z/s".into(),
            endpoint_selection,
        },
        outbound_traffic_policy: outbound,
        route_tables: vec![RouteTable {
            port: 8000,
            virtual_hosts: vec![VirtualHost {
                name: "web.default.svc.cluster.local:8000".into(),
                domains: vec!["web".into(), "*.example.com".into()],
                require_tls: true,
                routes: actions().into_iter().map(route).collect(),
                source: source(),
            }],
        }],
        clusters: clusters(),
        listeners: listeners(),
        l4_tables: vec![L4Table {
            port: 31400,
            auto_passthrough: true,
            routes: vec![L4Route {
                name: "tcp".into(),
                matches: vec![L4Match {
                    sni_hosts: vec!["*.example.com".into()],
                    destination_subnets: vec!["10.0.0.0/8".into()],
                }],
                destinations: vec![destination("v1", Some(9000))],
                source: source(),
            }],
        }],
        port_aliases: vec![PortAlias {
            listener: 8080,
            table: 80,
        }],
        inbound: vec![InboundPort {
            port: 9080,
            protocol: Protocol::Http,
            endpoint: Some("127.0.0.1:9080".into()),
            service: "reviews.default.svc.cluster.local".into(),
            max_connections: 10,
            max_requests: 20,
        }],
        warnings: vec!["t.yaml:1:1: warning: something".into()],
    }
}

fn documents() -> Vec<RulesDocument> {
    let _ = |k: ProxyKind, o: OutboundPolicy, e: EndpointSelection| {
        match k {
            ProxyKind::Sidecar | ProxyKind::Gateway => (),
        }
        match o {
            OutboundPolicy::AllowAny | OutboundPolicy::RegistryOnly => (),
        }
        match e {
            EndpointSelection::Filter | EndpointSelection::Host => (),
        }
    };
    vec![
        fixture(
            ProxyKind::Sidecar,
            OutboundPolicy::AllowAny,
            EndpointSelection::Filter,
        ),
        fixture(
            ProxyKind::Gateway,
            OutboundPolicy::RegistryOnly,
            EndpointSelection::Host,
        ),
    ]
}

#[test]
fn the_wire_shape_is_the_golden_document_of_this_version() {
    let json = serde_json::to_string_pretty(&documents()).unwrap() + "\n";
    let path = golden_path(VERSION);
    if std::env::var_os("MESHROUTE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &json).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        golden == json,
        "the rules document's wire shape changed: bump ir::VERSION (now {VERSION}) and write {} with MESHROUTE_BLESS=1",
        golden_path(VERSION + 1).display()
    );
    for doc in documents() {
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(RulesDocument::from_json(&bytes).unwrap(), doc);
    }
}

#[test]
fn documents_of_earlier_versions_are_refused_by_version() {
    for version in 1..VERSION {
        let text = std::fs::read_to_string(golden_path(version)).unwrap();
        let docs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        for doc in docs {
            let err = RulesDocument::from_json(doc.to_string().as_bytes()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "rules document version {version} is not supported (this filter reads version {VERSION})"
                )
            );
        }
    }
}
