//! Locality-aware balancing as Istio configures Envoy: failover by priority (endpoints
//! nearer the proxy first, the next level taking over as the nearer ones become unhealthy)
//! and `distribute` weights per locality.

use crate::ir::{Endpoint, LocalityLb};

use super::Rng;

/// Envoy's overprovisioning factor (×1.4, in percent): a level keeps all its traffic while
/// at least ~72 % of its endpoints are healthy.
const OVERPROVISIONING_PERCENT: u64 = 140;

/// How a cluster's endpoints are grouped; `None` when locality plays no part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Priority level per endpoint (0 = nearest).
    Failover(Vec<u8>),
    /// Group per endpoint (`None`: no weight, no traffic) and each group's weight.
    Distribute {
        group: Vec<Option<usize>>,
        weights: Vec<u64>,
    },
}

/// Istio's rules: `distribute` applies whenever set; failover only with outlier detection
/// (without it traffic would never fail over), by `failoverPriority` labels or by proximity.
pub(crate) fn plan(
    setting: &LocalityLb,
    endpoints: &[&Endpoint],
    proxy_locality: &str,
    proxy_labels: &std::collections::BTreeMap<String, String>,
    outlier_detection: bool,
) -> Option<Plan> {
    if setting.disabled || proxy_locality.is_empty() && setting.failover_priority.is_empty() {
        return None;
    }
    if let Some((_, to)) = setting
        .distribute
        .iter()
        .find(|(from, _)| locality_matches(from, proxy_locality))
    {
        // Each `to` weight is shared by the localities it matches.
        let patterns: Vec<(&String, u32)> = to.iter().map(|(k, v)| (k, *v)).collect();
        let mut localities: Vec<&str> = Vec::new();
        let mut group = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let matched = patterns
                .iter()
                .any(|(p, w)| *w > 0 && locality_matches(p, &e.locality));
            group.push(matched.then(|| {
                localities
                    .iter()
                    .position(|l| *l == e.locality)
                    .unwrap_or_else(|| {
                        localities.push(&e.locality);
                        localities.len() - 1
                    })
            }));
        }
        let weights = localities
            .iter()
            .map(|l| {
                patterns
                    .iter()
                    .find(|(p, _)| locality_matches(p, l))
                    .map_or(0, |(p, w)| {
                        let sharing = localities
                            .iter()
                            .filter(|x| locality_matches(p, x))
                            .count()
                            .max(1) as u64;
                        // Scaled so that shares of one pattern keep their ratio.
                        u64::from(*w) * 1_000_000 / sharing
                    })
            })
            .collect();
        return Some(Plan::Distribute { group, weights });
    }
    if !outlier_detection {
        return None;
    }
    let priorities: Vec<u8> = if setting.failover_priority.is_empty() {
        let failover_region = setting
            .failover
            .iter()
            .find(|(from, _)| from == region(proxy_locality))
            .map(|(_, to)| to.as_str());
        endpoints
            .iter()
            .map(|e| proximity(proxy_locality, &e.locality, failover_region))
            .collect()
    } else {
        endpoints
            .iter()
            .map(|e| {
                let matching = setting
                    .failover_priority
                    .iter()
                    .take_while(|label| {
                        let mine = label_value(label, proxy_labels, proxy_locality);
                        mine.is_some() && mine == label_value(label, &e.labels, &e.locality)
                    })
                    .count();
                u8::try_from(setting.failover_priority.len() - matching).unwrap_or(u8::MAX)
            })
            .collect()
    };
    let distinct = priorities.iter().any(|p| *p != priorities[0]);
    distinct.then_some(Plan::Failover(priorities))
}

/// Same subzone 0, zone 1, region 2, the failover region 3, elsewhere 3 (or 4 when a
/// failover region is named).
fn proximity(proxy: &str, endpoint: &str, failover_region: Option<&str>) -> u8 {
    let (p, e): (Vec<&str>, Vec<&str>) =
        (proxy.split('/').collect(), endpoint.split('/').collect());
    let same = |n: usize| (0..n).all(|i| p.get(i).is_some() && p.get(i) == e.get(i));
    if same(3) {
        0
    } else if same(2) {
        1
    } else if same(1) {
        2
    } else if let Some(region) = failover_region {
        if e.first() == Some(&region) {
            3
        } else {
            4
        }
    } else {
        3
    }
}

fn region(locality: &str) -> &str {
    locality.split('/').next().unwrap_or("")
}

/// The value of a failover-priority label; topology labels are read from the locality.
fn label_value<'a>(
    label: &str,
    labels: &'a std::collections::BTreeMap<String, String>,
    locality: &'a str,
) -> Option<&'a str> {
    let part = |i: usize| locality.split('/').nth(i).filter(|s| !s.is_empty());
    match label {
        "topology.kubernetes.io/region" => part(0),
        "topology.kubernetes.io/zone" => part(1),
        "topology.istio.io/subzone" => part(2),
        _ => labels.get(label).map(String::as_str),
    }
}

/// `region/zone/subzone` patterns where `*` matches any rest.
fn locality_matches(pattern: &str, locality: &str) -> bool {
    let mut l = locality.split('/');
    for p in pattern.split('/') {
        if p == "*" {
            return true;
        }
        if l.next() != Some(p) {
            return false;
        }
    }
    true
}

/// Narrows `candidates` (healthy endpoints) to the level or group the request goes to.
pub(crate) fn narrow(plan: &Plan, candidates: &[usize], rng: &mut dyn Rng) -> Vec<usize> {
    match plan {
        Plan::Failover(priority) => {
            let levels = usize::from(priority.iter().copied().max().unwrap_or(0)) + 1;
            let mut total = vec![0u64; levels];
            let mut healthy = vec![0u64; levels];
            for &p in priority {
                total[usize::from(p)] += 1;
            }
            for &i in candidates {
                healthy[usize::from(priority[i])] += 1;
            }
            // Envoy's priority load: each level takes min(100, 1.4 × healthy %) of what is
            // left, nearest first; what no level can take is spread by their health.
            let health: Vec<u64> = (0..levels)
                .map(|l| overprovisioned(healthy[l], total[l]))
                .collect();
            let mut left = 100u64;
            let loads: Vec<u64> = health
                .iter()
                .map(|h| {
                    let load = (*h).min(left);
                    left -= load;
                    load
                })
                .collect();
            // When the levels together cannot take everything, Envoy normalizes their loads.
            let sum: u64 = loads.iter().sum();
            if sum == 0 {
                return candidates.to_vec();
            }
            let chosen = draw(&loads, rng);
            candidates
                .iter()
                .copied()
                .filter(|&i| usize::from(priority[i]) == chosen)
                .collect()
        }
        Plan::Distribute { group, weights } => {
            // A group's weight counts as far as its endpoints are healthy.
            let mut total = vec![0u64; weights.len()];
            let mut healthy = vec![0u64; weights.len()];
            for g in group.iter().flatten() {
                total[*g] += 1;
            }
            for &i in candidates {
                if let Some(g) = group[i] {
                    healthy[g] += 1;
                }
            }
            let effective: Vec<u64> = (0..weights.len())
                .map(|g| weights[g] / 100 * overprovisioned(healthy[g], total[g]))
                .collect();
            if effective.iter().all(|w| *w == 0) {
                return Vec::new();
            }
            let chosen = draw(&effective, rng);
            candidates
                .iter()
                .copied()
                .filter(|&i| group[i] == Some(chosen))
                .collect()
        }
    }
}

/// Envoy's health of a level or locality: healthy share × 1.4, at most 100 (percent).
fn overprovisioned(healthy: u64, total: u64) -> u64 {
    (OVERPROVISIONING_PERCENT * healthy)
        .checked_div(total)
        .unwrap_or(0)
        .min(100)
}

/// An index drawn with probability proportional to its weight (weights not all zero).
fn draw(weights: &[u64], rng: &mut dyn Rng) -> usize {
    let mut point = rng.below(weights.iter().sum());
    for (i, w) in weights.iter().enumerate() {
        if point < *w {
            return i;
        }
        point -= w;
    }
    weights.len().saturating_sub(1)
}
