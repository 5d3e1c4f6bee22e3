//! Clusters: one per service port and subset the proxy can reach, with the DestinationRule
//! policies in force for each.

use meshroute_core::ir;

use super::Lowering;
use crate::api;
use crate::registry::{Resolution, Service, ServicePort};
use std::collections::{BTreeMap, BTreeSet};

use crate::resolve::{self, port_policy, selects, subset_policy, Blocks, DrIndex};

impl Lowering<'_> {
    // === Clusters ===

    pub(super) fn clusters(&self) -> Vec<ir::Cluster> {
        let mut out = Vec::new();
        let services = &self.services;
        let dr_index = DrIndex::new(self.config, &self.proxy.namespace, &self.proxy.labels);
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for svc in services {
            if seen.contains(&svc.host) {
                continue;
            }
            seen.insert(svc.host.clone());
            let dr = resolve::destination_rule(&dr_index, svc, self.proxy, self.mesh);
            for port in &svc.ports {
                let base = dr.as_ref().and_then(|d| d.policy.clone());
                let policy = port_policy(base.as_ref(), port.number);
                out.push(self.cluster(svc, port, "", &BTreeMap::new(), &policy));
                if let Some(dr) = &dr {
                    for subset in &dr.subsets {
                        let merged = subset_policy(
                            base.as_ref(),
                            subset.traffic_policy.as_ref(),
                            port.number,
                        );
                        out.push(self.cluster(svc, port, &subset.name, &subset.labels, &merged));
                    }
                }
            }
        }
        out
    }

    fn cluster(
        &self,
        svc: &Service,
        port: &ServicePort,
        subset: &str,
        labels: &api::Labels,
        policy: &Blocks,
    ) -> ir::Cluster {
        if self.proxy.endpoint_selection == ir::EndpointSelection::Host {
            // The host's cluster of this name has the endpoints and the policies; the filter
            // only needs to know it exists, and its hash key (the route that takes the
            // filter's decision carries it, as istiod's routes do).
            let hashed = load_balancer(policy.load_balancer.as_ref(), None).consistent_hash;
            return ir::Cluster {
                lb: ir::LoadBalancer {
                    consistent_hash: hashed,
                    ..ir::LoadBalancer::default()
                },
                name: ir::cluster_name(port.number, subset, &svc.host),
                service: svc.host.clone(),
                port: port.number,
                subset: subset.to_string(),
                protocol: ir::Protocol::parse(&port.protocol).unwrap_or_default(),
                connect_timeout_ms: self.mesh.connect_timeout_ms,
                ..ir::Cluster::default()
            };
        }
        let endpoints: Vec<ir::Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| selects(labels, &e.labels))
            .map(|e| ir::Endpoint {
                address: e.address.clone(),
                port: Service::endpoint_port(e, port),
                weight: e.weight,
                labels: e.labels.clone(),
                locality: e.locality.clone(),
            })
            .collect();
        let discovery = match svc.resolution {
            Resolution::None => ir::Discovery::OriginalDst,
            Resolution::Dns => ir::Discovery::Dns,
            Resolution::Static => ir::Discovery::Static,
        };
        let cp = policy.connection_pool.as_ref();
        let tcp = cp.and_then(|c| c.tcp.as_ref());
        let http = cp.and_then(|c| c.http.as_ref());
        let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        let ms = |v: Option<&api::Duration>| v.and_then(api::Duration::ms);
        ir::Cluster {
            name: ir::cluster_name(port.number, subset, &svc.host),
            service: svc.host.clone(),
            port: port.number,
            subset: subset.to_string(),
            discovery,
            endpoints,
            protocol: ir::Protocol::parse(&port.protocol).unwrap_or_default(),
            connect_timeout_ms: ms(tcp.and_then(|t| t.connect_timeout.as_ref()))
                .unwrap_or(self.mesh.connect_timeout_ms),
            lb: load_balancer(
                policy.load_balancer.as_ref(),
                self.mesh.locality_lb_setting.as_ref(),
            ),
            connection_pool: ir::ConnectionPool {
                max_connections: n(tcp.and_then(|t| t.max_connections)),
                http1_max_pending_requests: n(http.and_then(|h| h.http1_max_pending_requests)),
                http2_max_requests: n(http.and_then(|h| h.http2_max_requests)),
                max_requests_per_connection: n(http.and_then(|h| h.max_requests_per_connection)),
                max_retries: n(http.and_then(|h| h.max_retries)),
                idle_timeout_ms: ms(http.and_then(|h| h.idle_timeout.as_ref()))
                    .or_else(|| ms(tcp.and_then(|t| t.idle_timeout.as_ref()))),
                tcp_idle_timeout_ms: ms(tcp.and_then(|t| t.idle_timeout.as_ref())),
                max_connection_duration_ms: ms(tcp.and_then(|t| t.max_connection_duration.as_ref())),
                max_concurrent_streams: http
                    .and_then(|h| h.max_concurrent_streams)
                    .and_then(|v| u32::try_from(v).ok()),
                h2_upgrade: match http.and_then(|h| h.h2_upgrade_policy.as_deref()) {
                    Some("UPGRADE") => true,
                    Some("DO_NOT_UPGRADE") => false,
                    // DEFAULT or unset: the mesh's policy, which Istio applies to HTTP ports.
                    _ => {
                        self.mesh.h2_upgrade
                            && ir::Protocol::parse(&port.protocol) == Some(ir::Protocol::Http)
                    }
                },
                tcp_keepalive: tcp.and_then(|t| t.tcp_keepalive.as_ref()).map(|k| {
                    let secs = |d: Option<&api::Duration>| {
                        ms(d).map(|ms| u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX))
                    };
                    ir::TcpKeepalive {
                        probes: k.probes.and_then(|p| u32::try_from(p).ok()),
                        time_s: secs(k.time.as_ref()),
                        interval_s: secs(k.interval.as_ref()),
                    }
                }),
            },
            outlier_detection: policy.outlier_detection.as_ref().map(|o| {
                // The deprecated `consecutiveErrors` is ignored, as istiod ignores it.
                let c5 = o.consecutive_5xx_errors.unwrap_or(5);
                ir::OutlierDetection {
                    consecutive_5xx: u32::try_from(c5).ok().filter(|v| *v > 0),
                    consecutive_gateway_errors: o
                        .consecutive_gateway_errors
                        .and_then(|v| u32::try_from(v).ok())
                        .filter(|v| *v > 0),
                    consecutive_local_origin_failures: if o.split_external_local_origin_errors
                        == Some(true)
                    {
                        Some(
                            o.consecutive_local_origin_failures
                                .and_then(|v| u32::try_from(v).ok())
                                .unwrap_or(5),
                        )
                    } else {
                        None
                    },
                    split_external_local_origin_errors: o.split_external_local_origin_errors
                        == Some(true),
                    interval_ms: ms(o.interval.as_ref()).unwrap_or(10_000),
                    base_ejection_time_ms: ms(o.base_ejection_time.as_ref()).unwrap_or(30_000),
                    max_ejection_percent: o
                        .max_ejection_percent
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(10),
                    min_health_percent: o
                        .min_health_percent
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(0),
                }
            }),
            tls: policy
                .tls
                .as_ref()
                .and_then(|t| {
                    let mode = match t.mode.as_deref()? {
                        "SIMPLE" => ir::ClientTlsMode::Simple,
                        "MUTUAL" => ir::ClientTlsMode::Mutual,
                        "ISTIO_MUTUAL" => ir::ClientTlsMode::IstioMutual,
                        _ => return None,
                    };
                    Some((t, mode))
                })
                .map(|(t, mode)| ir::ClientTls {
                    mode,
                    sni: t.sni.clone(),
                    subject_alt_names: t.subject_alt_names.clone(),
                    ca_certificates: t.ca_certificates.clone(),
                    client_certificate: t.client_certificate.clone(),
                    private_key: t.private_key.clone(),
                    insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
                    ca_crl: t.ca_crl.clone(),
                    credential_name: t.credential_name.clone(),
                }),
            source: Some(svc.source.clone()),
        }
    }
}

/// A DestinationRule's load balancer; its locality settings default to the mesh's
/// (MeshConfig `localityLbSetting`).
fn load_balancer(
    lb: Option<&api::LoadBalancerSettings>,
    mesh_locality: Option<&api::LocalityLbSetting>,
) -> ir::LoadBalancer {
    let Some(lb) = lb else {
        return ir::LoadBalancer {
            locality: mesh_locality.map_or_else(ir::LocalityLb::default, locality),
            ..ir::LoadBalancer::default()
        };
    };
    let policy = match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => ir::LbPolicy::RoundRobin,
        Some("RANDOM") => ir::LbPolicy::Random,
        Some("PASSTHROUGH") => ir::LbPolicy::Passthrough,
        _ => ir::LbPolicy::LeastRequest,
    };
    let consistent_hash = lb.consistent_hash.as_ref().and_then(|ch| {
        let key = if let Some(h) = &ch.http_header_name {
            ir::HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            ir::HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl_ms: c.ttl.as_ref().and_then(api::Duration::ms),
                attributes: c
                    .attributes
                    .iter()
                    .map(|a| ir::CookieAttribute {
                        name: a.name.clone(),
                        value: a.value.clone(),
                    })
                    .collect(),
            }
        } else if ch.use_source_ip == Some(true) {
            ir::HashKey::SourceIp
        } else if let Some(q) = &ch.http_query_parameter_name {
            ir::HashKey::QueryParameter(q.clone())
        } else {
            return None;
        };
        Some(ir::ConsistentHash {
            key,
            maglev_table_size: ch.maglev.as_ref().map(|m| m.table_size.unwrap_or(65537)),
            minimum_ring_size: if ch.maglev.is_some() {
                None
            } else {
                Some(
                    ch.ring_hash
                        .as_ref()
                        .and_then(|r| r.minimum_ring_size)
                        .or(ch.minimum_ring_size)
                        .unwrap_or(1024),
                )
            },
        })
    });
    let warmup_ms = lb
        .warmup
        .as_ref()
        .and_then(|w| w.duration.as_ref())
        .or(lb.warmup_duration_secs.as_ref())
        .and_then(api::Duration::ms);
    let locality = lb
        .locality_lb_setting
        .as_ref()
        .or(mesh_locality)
        .map_or_else(ir::LocalityLb::default, locality);
    ir::LoadBalancer {
        policy,
        consistent_hash,
        warmup_ms,
        locality,
    }
}

fn locality(l: &api::LocalityLbSetting) -> ir::LocalityLb {
    ir::LocalityLb {
        disabled: l.enabled == Some(false),
        distribute: l
            .distribute
            .iter()
            .map(|d| {
                let to =
                    d.to.iter()
                        .filter_map(|(k, v)| Some((k.clone(), u32::try_from(*v).ok()?)))
                        .collect();
                (d.from.clone(), to)
            })
            .collect(),
        failover: l
            .failover
            .iter()
            .map(|f| (f.from.clone(), f.to.clone()))
            .collect(),
        failover_priority: l.failover_priority.clone(),
    }
}
