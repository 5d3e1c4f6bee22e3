//! Endpoint choice inside a cluster (the filter's own load balancer).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ir::{Cluster, Discovery, HashKey, LbPolicy};

use super::{split_host_port, RequestView, Rng};

#[derive(Debug)]
pub(crate) struct ClusterRt {
    discovery: Discovery,
    policy: LbPolicy,
    hash_key: Option<HashKey>,
    endpoints: Vec<EndpointRt>,
    total_weight: u64,
    /// Round-robin position; per instance (per worker), as in Envoy.
    next: AtomicU64,
}

#[derive(Debug)]
struct EndpointRt {
    address: String,
    weight: u64,
    /// Precomputed for rendezvous hashing.
    id_hash: u64,
}

impl ClusterRt {
    pub(crate) fn new(c: Cluster) -> Self {
        let endpoints: Vec<EndpointRt> = c
            .endpoints
            .iter()
            .filter(|e| e.weight > 0)
            .map(|e| {
                let address = if e.address.contains(':') {
                    format!("[{}]:{}", e.address, e.port)
                } else {
                    format!("{}:{}", e.address, e.port)
                };
                EndpointRt {
                    id_hash: fnv1a(address.as_bytes()),
                    address,
                    weight: u64::from(e.weight),
                }
            })
            .collect();
        Self {
            discovery: c.discovery,
            policy: c.lb.policy,
            hash_key: c.lb.consistent_hash.map(|h| h.key),
            total_weight: endpoints.iter().map(|e| e.weight).sum(),
            endpoints,
            next: AtomicU64::new(0),
        }
    }

    /// `Ok(Some(ip:port))` for a chosen endpoint, `Ok(None)` when the host resolves the name
    /// itself (DNS discovery), `Err(())` when there is no endpoint at all (503 UH).
    pub(crate) fn pick(
        &self,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
    ) -> Result<Option<String>, ()> {
        if self.discovery == Discovery::Dns {
            return Ok(None);
        }
        if self.discovery == Discovery::OriginalDst || self.policy == LbPolicy::Passthrough {
            let (host, port) = split_host_port(req.authority);
            let port = port.unwrap_or(req.port);
            return Ok(Some(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }));
        }
        if self.endpoints.is_empty() {
            return Err(());
        }
        if let Some(key) = self.hash_key.as_ref().and_then(|k| hash_input(k, req)) {
            let key = fnv1a(key.as_bytes());
            let best = self
                .endpoints
                .iter()
                .max_by_key(|e| mix(key ^ e.id_hash))
                .unwrap_or(&self.endpoints[0]);
            return Ok(Some(best.address.clone()));
        }
        let point = match self.policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % self.total_weight,
            _ => rng.below(self.total_weight),
        };
        Ok(Some(self.by_weight(point).address.clone()))
    }

    fn by_weight(&self, mut point: u64) -> &EndpointRt {
        for e in &self.endpoints {
            if point < e.weight {
                return e;
            }
            point -= e.weight;
        }
        &self.endpoints[0]
    }
}

fn hash_input<'a>(key: &HashKey, req: &RequestView<'a>) -> Option<std::borrow::Cow<'a, str>> {
    match key {
        HashKey::Header(name) => req.header(name),
        HashKey::Cookie { name, .. } => req.cookie(name).map(std::borrow::Cow::Borrowed),
        HashKey::SourceIp => req.source_ip.map(std::borrow::Cow::Borrowed),
        HashKey::QueryParameter(name) => req.query_param(name),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}
