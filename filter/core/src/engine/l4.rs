//! Connection-level decisions: where a TCP connection, or a TLS connection routed on its SNI
//! without being terminated, goes. Decided once, when the connection opens.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::ir;

use super::{BuildError, EndpointState, Engine, RequestView, Rng, Ticket};

/// What the host knows of a new connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionView<'a> {
    /// The listener port that selects the [`ir::L4Table`].
    pub port: u16,
    /// ClientHello SNI, lower case; empty when the client sent none or spoke plain TCP.
    pub sni: &'a str,
    /// The connection's (original) destination, `IP:PORT`.
    pub destination: &'a str,
    /// Downstream address (IP only), for `useSourceIp` hashing.
    pub source_ip: Option<&'a str>,
}

/// Where the connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionOutcome<'e> {
    Forward {
        route: &'e str,
        cluster: Cow<'e, str>,
        /// `IP:PORT` the filter chose; `None` when the host resolves the cluster (DNS).
        endpoint: Option<String>,
        /// Give back with [`Engine::release`] when the connection closes.
        ticket: Option<Ticket>,
        /// `tcp.idleTimeout` of the cluster (`Some(0)`: none); `None` leaves the host's.
        idle_timeout_ms: Option<u64>,
    },
    /// Nothing takes the connection: the host closes it. `reason` is for logs.
    Close { reason: &'static str },
}

#[derive(Debug)]
pub(super) struct L4TableRt {
    auto_passthrough: bool,
    routes: Vec<L4RouteRt>,
}

#[derive(Debug)]
struct L4RouteRt {
    name: String,
    matches: Vec<L4MatchRt>,
    /// Cluster names with their weights.
    destinations: Vec<(String, u64)>,
    total_weight: u64,
}

#[derive(Debug)]
struct L4MatchRt {
    sni: Vec<SniPattern>,
    subnets: Vec<Cidr>,
}

#[derive(Debug)]
enum SniPattern {
    Any,
    Exact(String),
    /// `*.foo.com` kept as `.foo.com`.
    Suffix(String),
}

impl SniPattern {
    fn new(p: &str) -> Self {
        let p = p.to_ascii_lowercase();
        if p == "*" {
            Self::Any
        } else if let Some(suffix) = p.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(p)
        }
    }

    fn matches(&self, sni: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => e == sni,
            Self::Suffix(s) => sni.len() > s.len() && sni.ends_with(s.as_str()),
        }
    }
}

/// An address block; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self {
            network: addr,
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
            let keep = u32::from(prefix);
            if keep == 0 {
                0
            } else {
                bits >> (width - keep)
            }
        }
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u128::from(u32::from(n)), 32, self.prefix)
                    == masked(u128::from(u32::from(a)), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), 128, self.prefix) == masked(u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

impl L4MatchRt {
    fn matches(&self, sni: &str, destination_ip: Option<IpAddr>) -> bool {
        (self.sni.is_empty() || self.sni.iter().any(|p| p.matches(sni)))
            && (self.subnets.is_empty()
                || destination_ip.is_some_and(|ip| self.subnets.iter().any(|c| c.contains(ip))))
    }
}

pub(super) fn build_l4_table(t: ir::L4Table) -> Result<L4TableRt, BuildError> {
    let mut routes = Vec::with_capacity(t.routes.len());
    for r in t.routes {
        let mut matches = Vec::with_capacity(r.matches.len());
        for m in &r.matches {
            let mut subnets = Vec::with_capacity(m.destination_subnets.len());
            for s in &m.destination_subnets {
                subnets.push(Cidr::parse(s).ok_or_else(|| BuildError::Invalid {
                    what: format!("route {:?}", r.name),
                    reason: format!("destination subnet {s:?} is not an address or CIDR"),
                })?);
            }
            matches.push(L4MatchRt {
                sni: m.sni_hosts.iter().map(|h| SniPattern::new(h)).collect(),
                subnets,
            });
        }
        let destinations: Vec<(String, u64)> = r
            .destinations
            .iter()
            .map(|d| {
                (
                    ir::cluster_name(d.port.unwrap_or(t.port), &d.subset, &d.host),
                    u64::from(d.weight),
                )
            })
            .collect();
        if destinations.is_empty() {
            return Err(BuildError::Invalid {
                what: format!("route {:?}", r.name),
                reason: "a connection route needs at least one destination".into(),
            });
        }
        let total_weight = destinations.iter().map(|d| d.1).sum::<u64>();
        routes.push(L4RouteRt {
            name: r.name,
            matches,
            destinations,
            total_weight,
        });
    }
    Ok(L4TableRt {
        auto_passthrough: t.auto_passthrough,
        routes,
    })
}

/// The cluster an `AUTO_PASSTHROUGH` SNI names: `outbound_.PORT_.SUBSET_.HOST`.
fn cluster_from_sni(sni: &str) -> Option<String> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    let (subset, host) = rest.split_once("_.")?;
    let port: u16 = port.parse().ok()?;
    Some(ir::cluster_name(port, subset, host))
}

impl Engine {
    /// Whether the rules route connections on `port` (a TCP/TLS listener).
    pub fn has_l4_table(&self, port: u16) -> bool {
        self.l4_tables.contains_key(&port)
    }

    /// Which route of the connection table takes the connection (`explain`): its index, or
    /// `None` when none does (or the table routes on the SNI alone, AUTO_PASSTHROUGH).
    pub fn connection_route(&self, conn: &ConnectionView<'_>) -> Option<usize> {
        let table = self.l4_tables.get(&conn.port)?;
        let destination_ip = super::split_host_port(conn.destination)
            .0
            .parse::<IpAddr>()
            .ok();
        table.routes.iter().position(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| m.matches(conn.sni, destination_ip))
        })
    }

    /// Decides where a new connection goes; ejected endpoints are skipped.
    pub fn decide_connection<'e>(
        &'e self,
        conn: &ConnectionView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
    ) -> ConnectionOutcome<'e> {
        let Some(table) = self.l4_tables.get(&conn.port) else {
            return ConnectionOutcome::Close {
                reason: "no connection routes for this listener port",
            };
        };
        let destination_ip = super::split_host_port(conn.destination)
            .0
            .parse::<IpAddr>()
            .ok();
        let (route, cluster): (&'e str, Cow<'e, str>) = if table.auto_passthrough {
            match cluster_from_sni(conn.sni) {
                Some(name) => ("auto_passthrough", Cow::Owned(name)),
                None => {
                    return ConnectionOutcome::Close {
                        reason: "SNI does not name a cluster (outbound_.PORT_.SUBSET_.HOST)",
                    }
                }
            }
        } else {
            let Some(route) = table.routes.iter().find(|r| {
                r.matches.is_empty()
                    || r.matches
                        .iter()
                        .any(|m| m.matches(conn.sni, destination_ip))
            }) else {
                return self.unrouted_connection(destination_ip, conn.destination);
            };
            let mut chosen = &route.destinations[0].0;
            if route.destinations.len() > 1 && route.total_weight > 0 {
                let mut point = rng.below(route.total_weight);
                for (name, weight) in &route.destinations {
                    if point < *weight {
                        chosen = name;
                        break;
                    }
                    point -= weight;
                }
            }
            (route.name.as_str(), Cow::Borrowed(chosen.as_str()))
        };
        let Some(&cluster_at) = self.cluster_index.get(cluster.as_ref()) else {
            return ConnectionOutcome::Close {
                reason: "the route's cluster does not exist",
            };
        };
        let c = &self.clusters[cluster_at];
        let view = RequestView {
            method: "",
            scheme: "",
            authority: conn.destination,
            path: "",
            port: conn.port,
            headers: &[],
            source_ip: conn.source_ip,
            transparent: false,
        };
        match self.pick(c, &view, rng, state) {
            Err(()) => ConnectionOutcome::Close {
                reason: "no healthy upstream",
            },
            Ok(picked) => {
                let ticket = picked
                    .as_ref()
                    .and_then(|p| p.index)
                    .map(|endpoint| Ticket {
                        cluster: cluster_at,
                        endpoint,
                    });
                ConnectionOutcome::Forward {
                    route,
                    cluster,
                    endpoint: picked.map(|p| p.address),
                    ticket,
                    idle_timeout_ms: c.tcp_idle_timeout_ms,
                }
            }
        }
    }
}

impl Engine {
    /// A connection no route takes: a sidecar under ALLOW_ANY passes it on to its original
    /// destination (Istio's PassthroughCluster); otherwise it is closed (BlackHoleCluster).
    /// A loopback destination is the proxy's own listener (an explicit one, or the capture
    /// port itself), never an original destination: passing it on would loop.
    fn unrouted_connection<'e>(
        &self,
        destination_ip: Option<IpAddr>,
        destination: &str,
    ) -> ConnectionOutcome<'e> {
        let passes = self.kind == ir::ProxyKind::Sidecar
            && self.outbound == ir::OutboundPolicy::AllowAny
            && destination_ip.is_some_and(|ip| !ip.is_loopback());
        if !passes {
            return ConnectionOutcome::Close {
                reason: "no route matches the connection",
            };
        }
        ConnectionOutcome::Forward {
            route: "allow_any",
            cluster: Cow::Borrowed(crate::contract::PASSTHROUGH_CLUSTER),
            // Inside Istio the PassthroughCluster reads the connection's own destination.
            endpoint: (!self.host_selects).then(|| destination.to_owned()),
            ticket: None,
            idle_timeout_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn cidr_blocks_contain_their_addresses_only() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.168.1.7").unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("ten").is_none());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn sni_wildcards_need_a_label_before_the_suffix() {
        let p = SniPattern::new("*.Example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("aexample.com"));
        assert!(SniPattern::new("*").matches(""));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn auto_passthrough_sni_names_the_cluster() {
        assert_eq!(
            cluster_from_sni("outbound_.443_.v1_.db.prod.svc.cluster.local").as_deref(),
            Some("outbound|443|v1|db.prod.svc.cluster.local")
        );
        assert_eq!(
            cluster_from_sni("outbound_.9000_._.a.com").as_deref(),
            Some("outbound|9000||a.com")
        );
        assert_eq!(cluster_from_sni("a.com"), None);
        assert_eq!(cluster_from_sni("outbound_.x_._.a.com"), None);
    }
}
