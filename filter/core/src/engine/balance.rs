//! Endpoint choice inside a cluster (the filter's own load balancer), with outlier ejections
//! and per-instance in-flight counts for LEAST_REQUEST.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::ir::{
    Cluster, ConnectionPool, Discovery, HashKey, LbPolicy, OutlierDetection, ProxyIdentity,
};

use super::health::OutlierRecord;
use super::locality::{self, Plan};
use super::{split_host_port, RequestView, Rng};

#[derive(Debug)]
pub(crate) struct ClusterRt {
    pub(crate) name: String,
    discovery: Discovery,
    policy: LbPolicy,
    hash_key: Option<HashKey>,
    endpoints: Vec<EndpointRt>,
    total_weight: u64,
    /// Whether every endpoint has the same weight (LEAST_REQUEST then uses two choices).
    equal_weights: bool,
    /// Round-robin position; per instance (per worker), as in Envoy.
    next: AtomicU64,
    pub(crate) outlier: Option<OutlierDetection>,
    /// Identifies the endpoint list, so a stored outlier record of another list is ignored.
    pub(crate) fingerprint: u64,
    /// Concurrent requests admitted to the cluster (`None`: unlimited).
    pub(crate) max_active: Option<u32>,
    /// Concurrent retries to the cluster (`http.maxRetries`; `None`: unlimited).
    pub(crate) max_retries: Option<u32>,
    /// Locality failover levels or distribution groups, when locality plays a part.
    locality: Option<Plan>,
    /// The host speaks HTTP/2 to the endpoints.
    pub(crate) h2: bool,
    /// How long a proxied TCP connection may sit idle (`tcp.idleTimeout`).
    pub(crate) tcp_idle_timeout_ms: Option<u64>,
}

#[derive(Debug)]
struct EndpointRt {
    address: String,
    weight: u64,
    /// Precomputed for rendezvous hashing.
    id_hash: u64,
    /// Requests this instance has in flight to the endpoint.
    active: AtomicU32,
    /// The workload labels of the endpoint, for metrics.
    labels: BTreeMap<String, String>,
}

/// An endpoint the balancer chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Picked {
    pub address: String,
    /// Position in the cluster's endpoint list; `None` for original-destination picks.
    pub index: Option<usize>,
    /// A cookie the client must keep for consistent hashing (`Set-Cookie` value).
    pub set_cookie: Option<String>,
}

impl ClusterRt {
    /// The workload labels of the endpoint at `address` (`ip:port`, `[ip6]:port`).
    pub(crate) fn endpoint_labels(&self, address: &str) -> Option<&BTreeMap<String, String>> {
        self.endpoints
            .iter()
            .find(|e| e.address == address)
            .map(|e| &e.labels)
    }

    pub(crate) fn new(c: Cluster, proxy: &ProxyIdentity) -> Self {
        let weighted: Vec<&crate::ir::Endpoint> =
            c.endpoints.iter().filter(|e| e.weight > 0).collect();
        let locality = locality::plan(
            &c.lb.locality,
            &weighted,
            &proxy.locality,
            &proxy.labels,
            c.outlier_detection.is_some(),
        );
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
                    active: AtomicU32::new(0),
                    labels: e.labels.clone(),
                }
            })
            .collect();
        let fingerprint = endpoints
            .iter()
            .fold(fnv1a(c.name.as_bytes()), |h, e| mix(h ^ e.id_hash));
        let h2 = c.upstream_h2();
        Self {
            tcp_idle_timeout_ms: c.connection_pool.tcp_idle_timeout_ms,
            max_active: admission_limit(&c.connection_pool, h2),
            max_retries: (c.connection_pool.max_retries > 0)
                .then_some(c.connection_pool.max_retries),
            name: c.name,
            discovery: c.discovery,
            policy: c.lb.policy,
            hash_key: c.lb.consistent_hash.map(|h| h.key),
            total_weight: endpoints.iter().map(|e| e.weight).sum(),
            equal_weights: endpoints.windows(2).all(|w| w[0].weight == w[1].weight),
            endpoints,
            next: AtomicU64::new(0),
            outlier: c.outlier_detection,
            fingerprint,
            locality,
            h2,
        }
    }

    pub(crate) fn hashes(&self) -> bool {
        self.hash_key.is_some()
    }

    pub(crate) fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    pub(crate) fn endpoint_address(&self, i: usize) -> Option<&str> {
        self.endpoints.get(i).map(|e| e.address.as_str())
    }

    /// `Ok(Some(..))` for a chosen endpoint, `Ok(None)` when the host resolves the name
    /// itself (DNS discovery), `Err(())` when no endpoint may take the request (503 UH).
    /// `health` is the cluster's outlier record when it has outlier detection; endpoints in
    /// `avoid` (tried before) are skipped while any other may take the request.
    pub(crate) fn pick(
        &self,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        health: Option<(&OutlierRecord, u64)>,
        avoid: &[usize],
    ) -> Result<Option<Picked>, ()> {
        if self.discovery == Discovery::Dns {
            return Ok(None);
        }
        if self.discovery == Discovery::OriginalDst || self.policy == LbPolicy::Passthrough {
            let (host, port) = split_host_port(req.authority);
            let port = port.unwrap_or(req.port);
            let address = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            return Ok(Some(Picked {
                address,
                index: None,
                set_cookie: None,
            }));
        }
        if self.endpoints.is_empty() {
            return Err(());
        }
        let mut eligible = self.eligible(health, avoid);
        if let Some(plan) = &self.locality {
            let healthy: Vec<usize> = match eligible {
                Eligible::All => (0..self.endpoints.len()).collect(),
                Eligible::Some(list) => list,
                Eligible::None => return Err(()),
            };
            let narrowed = locality::narrow(plan, &healthy, rng);
            eligible = if narrowed.is_empty() {
                Eligible::None
            } else {
                Eligible::Some(narrowed)
            };
        }
        let candidates: &[usize] = match &eligible {
            Eligible::All => &[],
            Eligible::Some(list) => list,
            Eligible::None => return Err(()),
        };
        let all = matches!(eligible, Eligible::All);
        let (key, set_cookie) = self.hash_input(req, rng);
        let index = if let Some(key) = key {
            let key = fnv1a(key.as_bytes());
            // Weighted rendezvous hashing: the endpoint with the best weight / -ln(u) score
            // wins, so shares follow weights and a key moves only when its endpoint goes.
            self.best_by(all, candidates, |i| {
                let e = &self.endpoints[i];
                let u = ((mix(key ^ e.id_hash) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                e.weight as f64 / -u.ln()
            })
        } else {
            match self.policy {
                LbPolicy::RoundRobin => {
                    let turn = self.next.fetch_add(1, Ordering::Relaxed);
                    self.by_weight(all, candidates, |total| turn % total)
                }
                LbPolicy::LeastRequest if self.equal_weights => {
                    // Power of two choices over in-flight requests.
                    let n = if all {
                        self.endpoints.len()
                    } else {
                        candidates.len()
                    } as u64;
                    let at = |k: u64| {
                        if all {
                            k as usize
                        } else {
                            candidates[k as usize]
                        }
                    };
                    let (a, b) = (at(rng.below(n)), at(rng.below(n)));
                    let load = |i: usize| self.endpoints[i].active.load(Ordering::Relaxed);
                    if load(b) < load(a) {
                        b
                    } else {
                        a
                    }
                }
                LbPolicy::LeastRequest => {
                    // Weighted: weight scaled down by the requests in flight (Envoy's
                    // active-request bias of 1).
                    let scaled = |i: usize| {
                        let e = &self.endpoints[i];
                        (e.weight * 1024 / (u64::from(e.active.load(Ordering::Relaxed)) + 1)).max(1)
                    };
                    self.by_scaled_weight(all, candidates, scaled, rng)
                }
                _ => self.by_weight(all, candidates, |total| rng.below(total)),
            }
        };
        self.endpoints[index].active.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Picked {
            address: self.endpoints[index].address.clone(),
            index: Some(index),
            set_cookie,
        }))
    }

    /// The request chosen with `pick` to endpoint `i` is over.
    pub(crate) fn release(&self, i: usize) {
        if let Some(e) = self.endpoints.get(i) {
            let _ = e
                .active
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Which endpoints may be chosen: all, a subset (some ejected), or none (503 UH).
    /// When fewer than `minHealthPercent` are healthy the cluster is in panic and ignores
    /// ejections, as Envoy's panic threshold; 0 disables panic.
    fn eligible(&self, health: Option<(&OutlierRecord, u64)>, avoid: &[usize]) -> Eligible {
        let healthy = match (&self.outlier, health) {
            (Some(cfg), Some((record, now))) => {
                let healthy: Vec<usize> = (0..self.endpoints.len())
                    .filter(|&i| !record.is_ejected(i, cfg, now))
                    .collect();
                let panic = cfg.min_health_percent > 0
                    && (healthy.len() * 100)
                        < cfg.min_health_percent as usize * self.endpoints.len();
                if panic || healthy.len() == self.endpoints.len() {
                    None
                } else if healthy.is_empty() {
                    return Eligible::None;
                } else {
                    Some(healthy)
                }
            }
            _ => None,
        };
        if avoid.is_empty() {
            return healthy.map_or(Eligible::All, Eligible::Some);
        }
        let fresh: Vec<usize> = match &healthy {
            Some(list) => list
                .iter()
                .copied()
                .filter(|i| !avoid.contains(i))
                .collect(),
            None => (0..self.endpoints.len())
                .filter(|i| !avoid.contains(i))
                .collect(),
        };
        // Every endpoint was tried: any may take the retry (Envoy gives up re-selecting).
        match (fresh.is_empty(), healthy) {
            (false, _) => Eligible::Some(fresh),
            (true, Some(list)) => Eligible::Some(list),
            (true, None) => Eligible::All,
        }
    }

    fn hash_input<'a>(
        &self,
        req: &RequestView<'a>,
        rng: &mut dyn Rng,
    ) -> (Option<Cow<'a, str>>, Option<String>) {
        let Some(key) = &self.hash_key else {
            return (None, None);
        };
        let value = match key {
            HashKey::Header(name) => req.header(name),
            HashKey::Cookie {
                name,
                path,
                ttl_ms,
                attributes,
            } => match req.cookie(name) {
                Some(v) => Some(Cow::Borrowed(v)),
                // Envoy generates the cookie when a ttl is set, so the next request of this
                // client lands on the same endpoint.
                None if ttl_ms.is_some() => {
                    let value = format!("{:016x}", rng.next_u64());
                    let mut cookie = format!("{name}=\"{value}\"");
                    if let Some(ttl) = ttl_ms.filter(|t| *t > 0) {
                        cookie.push_str(&format!("; Max-Age={}", ttl / 1000));
                    }
                    if let Some(p) = path {
                        cookie.push_str(&format!("; Path={p}"));
                    }
                    for a in attributes {
                        cookie.push_str("; ");
                        cookie.push_str(&a.name);
                        if !a.value.is_empty() {
                            cookie.push('=');
                            cookie.push_str(&a.value);
                        }
                    }
                    cookie.push_str("; HttpOnly");
                    return (Some(Cow::Owned(value)), Some(cookie));
                }
                None => None,
            },
            HashKey::SourceIp => req.source_ip.map(Cow::Borrowed),
            HashKey::QueryParameter(name) => req.query_param(name),
        };
        (value, None)
    }

    fn best_by(&self, all: bool, candidates: &[usize], score: impl Fn(usize) -> f64) -> usize {
        let by_score = |a: &usize, b: &usize| score(*a).total_cmp(&score(*b));
        let best = if all {
            (0..self.endpoints.len()).max_by(by_score)
        } else {
            candidates.iter().copied().max_by(by_score)
        };
        best.unwrap_or(0)
    }

    /// Walks the cumulative weights to the point `at(total)` chooses.
    fn by_weight(&self, all: bool, candidates: &[usize], at: impl FnOnce(u64) -> u64) -> usize {
        if all {
            let mut point = at(self.total_weight);
            for (i, e) in self.endpoints.iter().enumerate() {
                if point < e.weight {
                    return i;
                }
                point -= e.weight;
            }
            return 0;
        }
        let total: u64 = candidates.iter().map(|&i| self.endpoints[i].weight).sum();
        let mut point = at(total);
        for &i in candidates {
            let w = self.endpoints[i].weight;
            if point < w {
                return i;
            }
            point -= w;
        }
        candidates.first().copied().unwrap_or(0)
    }

    fn by_scaled_weight(
        &self,
        all: bool,
        candidates: &[usize],
        weight: impl Fn(usize) -> u64,
        rng: &mut dyn Rng,
    ) -> usize {
        let list: Vec<usize> = if all {
            (0..self.endpoints.len()).collect()
        } else {
            candidates.to_vec()
        };
        let total: u64 = list.iter().map(|&i| weight(i)).sum();
        let mut point = rng.below(total);
        for &i in &list {
            let w = weight(i);
            if point < w {
                return i;
            }
            point -= w;
        }
        list.first().copied().unwrap_or(0)
    }
}

enum Eligible {
    All,
    Some(Vec<usize>),
    None,
}

/// Concurrent requests a cluster admits (Envoy's circuit breakers as Istio configures them):
/// `http2MaxRequests` active requests; for HTTP/1.1 upstreams also `maxConnections`
/// connections each carrying one request plus `http1MaxPendingRequests` waiting for one.
fn admission_limit(pool: &ConnectionPool, h2: bool) -> Option<u32> {
    let limit = |n: u32| (n > 0).then_some(n);
    let requests = limit(pool.http2_max_requests);
    // HTTP/2 multiplexes on one connection, so only HTTP/1.1 queues behind connections.
    let queued = match (
        limit(pool.max_connections),
        limit(pool.http1_max_pending_requests),
    ) {
        (Some(connections), Some(pending)) if !h2 => Some(connections.saturating_add(pending)),
        _ => None,
    };
    match (requests, queued) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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
