//! The decision engine: one request in, one [`Decision`] out.
//!
//! Everything that can be prepared ahead (host index, regexes, cluster lookups, decoded bodies,
//! header operation order) is built once in [`Engine::new`]; a decision does a hash lookup per
//! label of the host, walks the routes of one virtual host and samples the injected [`Rng`].

mod balance;
mod health;
mod l4;
mod locality;
mod matcher;
mod request;
mod respond;
mod retry;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine as _;
use regex::Regex;

use crate::contract::{
    ResponseFlag, RouterReply, ALLOW_ANY_ROUTE, BLOCK_ALL_ROUTE, EXPLICIT_PROXY_PORT,
    PASSTHROUGH_CLUSTER,
};
use crate::ir::{self, Action, HeaderOps, OutboundPolicy, ProxyKind, RetryPolicy, RulesDocument};

use balance::ClusterRt;
pub use health::{AttemptResult, OutlierRecord};
pub use l4::{Cidr, ConnectionOutcome, ConnectionView};
pub use matcher::Condition;
use matcher::{CompiledMatch, Matcher};
pub use request::{percent_decode, split_host_port, split_query, RequestView};
pub use retry::{backoff_ms, call_end, first_try_end, Answer, AttemptEnd, RetryOn, RetryRun};

/// Source of randomness; the guest seeds it, tests script it.
pub trait Rng {
    fn next_u64(&mut self) -> u64;

    /// Uniform in `0..n` (0 when `n == 0`).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // Multiply-shift keeps the result unbiased enough for traffic splits.
            ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
        }
    }
}

/// Small, fast, deterministic generator (SplitMix64) for hosts without `getrandom`.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What the host knows about endpoints beyond the rules: the clock and the outlier records
/// that every worker shares.
pub trait EndpointState {
    fn now_ms(&self) -> u64;
    /// The stored outlier record of a cluster (see [`Engine::outlier_key`]).
    fn outlier_record(&self, cluster: &str) -> Option<Vec<u8>>;
}

/// No shared state: every endpoint healthy (tools, tests, and hosts without shared data).
pub struct NoEndpointState;

impl EndpointState for NoEndpointState {
    fn now_ms(&self) -> u64 {
        0
    }
    fn outlier_record(&self, _: &str) -> Option<Vec<u8>> {
        None
    }
}

/// The endpoint a forwarded request holds; give it back with [`Engine::release`] and report
/// how the attempt went with [`Engine::observe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    cluster: usize,
    endpoint: usize,
}

/// Endpoints of a cluster with the time each ejected one returns (status pages), read from
/// the cluster's stored outlier record.
pub fn cluster_health(
    cluster: &ir::Cluster,
    stored: Option<&[u8]>,
    now_ms: u64,
) -> Vec<(String, Option<u64>)> {
    let c = ClusterRt::new(cluster.clone(), &ir::ProxyIdentity::default());
    let record = OutlierRecord::decode(stored, c.fingerprint, c.endpoint_count());
    (0..c.endpoint_count())
        .filter_map(|i| {
            let until = c
                .outlier
                .as_ref()
                .and_then(|cfg| record.ejected_until(i, cfg, now_ms));
            c.endpoint_address(i).map(|a| (a.to_owned(), until))
        })
        .collect()
}

/// Why a rules document could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    Version { found: u32 },
    Regex { pattern: String, reason: String },
    Body { route: String, reason: String },
    Invalid { what: String, reason: String },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Version { found } => write!(
                f,
                "rules document version {found} is not supported (this filter reads version {})",
                ir::VERSION
            ),
            Self::Regex { pattern, reason } => write!(f, "regex {pattern:?}: {reason}"),
            Self::Body { route, reason } => {
                write!(f, "route {route:?}: direct response body: {reason}")
            }
            Self::Invalid { what, reason } => write!(f, "{what}: {reason}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// The path a request took through the rules (see [`Engine::trace`]).
#[derive(Debug)]
pub struct Trace<'e> {
    pub vhost: Option<usize>,
    pub routes: Vec<Option<Vec<Condition<'e>>>>,
}

/// What the host must do with the request.
#[derive(Debug)]
pub struct Decision<'e> {
    /// Virtual host and route that decided, for logs and `explain`. The route is named as
    /// Istio names its Envoy route (see [`Decision::route_name`]).
    pub vhost: Option<&'e str>,
    pub route: Option<&'e str>,
    /// Fault delay to apply before the outcome.
    pub delay_ms: Option<u64>,
    pub outcome: Outcome<'e>,
}

#[derive(Debug)]
pub enum Outcome<'e> {
    Forward(Forward<'e>),
    Reply(Reply),
}

/// Forward upstream with these changes.
#[derive(Debug)]
pub struct Forward<'e> {
    pub cluster: Cow<'e, str>,
    /// `ip:port` the host must connect to; `None` leaves the choice to the host (DNS clusters).
    pub endpoint: Option<String>,
    /// New `:path` (the original goes to `x-envoy-original-path`).
    pub path: Option<String>,
    /// New `:authority`.
    pub authority: Option<&'e str>,
    pub request_edits: Vec<HeaderEdit<'e>>,
    pub response_edits: Vec<HeaderEdit<'e>>,
    pub timeout_ms: Option<u64>,
    pub retry: Option<&'e RetryPolicy>,
    /// The retry policy's conditions, parsed when the rules loaded.
    pub retry_on: Option<&'e RetryOn>,
    pub mirrors: Vec<MirrorTarget<'e>>,
    /// The chosen endpoint of a listed cluster.
    pub ticket: Option<Ticket>,
    /// Circuit breaker: requests the cluster admits at once across all workers.
    pub max_active: Option<u32>,
    /// Circuit breaker: retries the cluster admits at once across all workers.
    pub max_retries: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditOp {
    Set,
    Add,
    Remove,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEdit<'e> {
    pub op: EditOp,
    pub name: Cow<'e, str>,
    pub value: Cow<'e, str>,
}

/// A copy of the request to send and forget.
#[derive(Debug, PartialEq, Eq)]
pub struct MirrorTarget<'e> {
    pub cluster: Cow<'e, str>,
    pub endpoint: Option<String>,
}

/// A response the proxy produces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Answer as gRPC (HTTP 200, `grpc-status`) instead of `status`.
    pub grpc_status: Option<u32>,
    /// Envoy response flag (`NR`, `NC`, `UH`, `FI`, ...), when one applies.
    pub flag: Option<ResponseFlag>,
    /// Envoy `response.code_details`.
    pub details: &'static str,
}

impl Reply {
    fn empty(status: u16, flag: Option<ResponseFlag>, details: &'static str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            grpc_status: None,
            flag,
            details,
        }
    }

    fn text(status: u16, body: &str, flag: Option<ResponseFlag>, details: &'static str) -> Self {
        Self {
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
            ..Self::empty(status, flag, details)
        }
    }

    /// The reply Envoy's router would make in the same situation.
    pub fn router(r: RouterReply) -> Self {
        let mut reply = if r.body().is_empty() {
            Self::empty(r.status(), Some(r.flag()), r.details())
        } else {
            Self::text(r.status(), r.body(), Some(r.flag()), r.details())
        };
        reply.headers.extend(
            r.headers()
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        reply
    }

    /// A circuit breaker's rejection, as Envoy's router answers it.
    pub fn overflow() -> Self {
        Self::router(RouterReply::Overflow)
    }
}

/// The loaded rules of one proxy.
#[derive(Debug)]
pub struct Engine {
    kind: ProxyKind,
    /// The proxy's namespace and workload labels.
    identity: (String, BTreeMap<String, String>),
    outbound: OutboundPolicy,
    tables: HashMap<u16, Table>,
    l4_tables: HashMap<u16, l4::L4TableRt>,
    clusters: Vec<ClusterRt>,
    cluster_index: HashMap<String, usize>,
    /// Some cluster hashes on the client's address (hosts then supply `source_ip`).
    uses_source_ip: bool,
    /// The host picks endpoints and applies cluster policies; the filter names clusters.
    host_selects: bool,
    /// Listener port → route-table port (a gateway Service's `targetPort`).
    aliases: HashMap<u16, u16>,
}

#[derive(Debug, Default)]
struct Table {
    exact: HashMap<String, usize>,
    /// `*.foo.com` stored as `.foo.com`.
    suffix: HashMap<String, usize>,
    any: Option<usize>,
    vhosts: Vec<VHost>,
}

#[derive(Debug)]
struct VHost {
    name: String,
    require_tls: bool,
    routes: Vec<RouteRt>,
}

#[derive(Debug)]
struct RouteRt {
    name: String,
    matches: Vec<CompiledMatch>,
    action: ActionRt,
    fault: Option<ir::Fault>,
    cors: Option<CorsRt>,
    mirrors: Vec<MirrorRt>,
    timeout_ms: Option<u64>,
    retry: Option<RetryPolicy>,
    retry_on: Option<RetryOn>,
    /// Header edits for local replies (direct response, redirect).
    reply_edits: Vec<HeaderEdit<'static>>,
}

#[derive(Debug)]
enum ActionRt {
    Route {
        destinations: Vec<DestRt>,
        total_weight: u64,
        rewrite: Option<RewriteRt>,
    },
    Redirect(ir::Redirect),
    Direct {
        status: u16,
        body: Vec<u8>,
    },
}

#[derive(Debug)]
struct DestRt {
    target: Target,
    weight: u64,
    /// Authority after the route/destination precedence rule.
    authority: Option<String>,
    request_edits: Vec<HeaderEdit<'static>>,
    response_edits: Vec<HeaderEdit<'static>>,
}

/// A cluster known at load time, or one whose port comes from the request.
#[derive(Debug)]
enum Target {
    Fixed(String),
    PerPort { host: String, subset: String },
}

impl Target {
    fn new(host: &str, subset: &str, port: Option<u16>) -> Self {
        match port {
            Some(p) => Self::Fixed(ir::cluster_name(p, subset, host)),
            None => Self::PerPort {
                host: host.to_owned(),
                subset: subset.to_owned(),
            },
        }
    }

    fn name(&self, port: u16) -> Cow<'_, str> {
        match self {
            Self::Fixed(n) => Cow::Borrowed(n),
            Self::PerPort { host, subset } => Cow::Owned(ir::cluster_name(port, subset, host)),
        }
    }
}

#[derive(Debug)]
struct RewriteRt {
    uri: Option<String>,
    regex: Option<(std::sync::Arc<Regex>, String)>,
}

#[derive(Debug)]
struct MirrorRt {
    target: Target,
    per_million: u32,
}

#[derive(Debug)]
struct CorsRt {
    origins: Vec<Matcher>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: Option<String>,
    credentials: bool,
    ignore_unmatched_preflights: bool,
}

const MILLION: u64 = 1_000_000;

impl Engine {
    /// Builds the engine; rejects documents of another version and unusable regexes or bodies.
    pub fn new(doc: RulesDocument) -> Result<Self, BuildError> {
        if doc.version != ir::VERSION {
            return Err(BuildError::Version { found: doc.version });
        }
        let uses_source_ip = doc.clusters.iter().any(|c| {
            c.lb.consistent_hash
                .as_ref()
                .is_some_and(|h| h.key == ir::HashKey::SourceIp)
        });
        let mut cluster_index = HashMap::with_capacity(doc.clusters.len());
        let clusters: Vec<ClusterRt> = doc
            .clusters
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                cluster_index.insert(c.name.clone(), i);
                ClusterRt::new(c, &doc.proxy)
            })
            .collect();
        let built: Result<Vec<(u16, Table)>, BuildError> = doc
            .route_tables
            .into_iter()
            .map(|table| {
                let port = table.port;
                build_table(table).map(|t| (port, t))
            })
            .collect();
        matcher::forget_compiled();
        let tables: HashMap<u16, Table> = built?.into_iter().collect();
        let mut l4_tables = HashMap::with_capacity(doc.l4_tables.len());
        for t in doc.l4_tables {
            l4_tables.insert(t.port, l4::build_l4_table(t)?);
        }
        Ok(Self {
            kind: doc.proxy.kind,
            identity: (doc.proxy.namespace, doc.proxy.labels),
            outbound: doc.outbound_traffic_policy,
            tables,
            l4_tables,
            clusters,
            cluster_index,
            uses_source_ip,
            host_selects: doc.proxy.endpoint_selection == ir::EndpointSelection::Host,
            aliases: doc
                .port_aliases
                .iter()
                .map(|a| (a.listener, a.table))
                .collect(),
        })
    }

    /// Whether decisions need the client's address in [`RequestView::source_ip`].
    pub fn uses_source_ip(&self) -> bool {
        self.uses_source_ip
    }

    pub fn kind(&self) -> ProxyKind {
        self.kind
    }

    /// The proxy's namespace and workload labels.
    pub fn identity(&self) -> (&str, &BTreeMap<String, String>) {
        (&self.identity.0, &self.identity.1)
    }

    /// The workload labels of an endpoint of `cluster` (`ip:port`), for metrics.
    pub fn endpoint_labels(
        &self,
        cluster: &str,
        address: &str,
    ) -> Option<&BTreeMap<String, String>> {
        let c = self.clusters.get(*self.cluster_index.get(cluster)?)?;
        c.endpoint_labels(address)
    }

    /// The port that selects the route table, from the port the request arrived on
    /// (`listener_port`, as the host's trusted stage or the connection tells it):
    ///
    /// - a gateway serves the table of that port, or of the server port it stands for (a
    ///   Service's `targetPort`: Istio's gateway takes port 80 on 8080);
    /// - a transparent sidecar serves the table of the captured service port, whatever port
    ///   the Host names (Istio's listener `0.0.0.0_9080` → route `9080`);
    /// - a sidecar used as an explicit proxy (listener port [`EXPLICIT_PROXY_PORT`], or no
    ///   port known) takes the service port from the authority (80, or 443 for https).
    pub fn route_port(&self, authority: &str, scheme: &str, listener_port: Option<u16>) -> u16 {
        let from_authority = || {
            split_host_port(authority)
                .1
                .unwrap_or(if scheme == "https" { 443 } else { 80 })
        };
        match (self.kind, listener_port) {
            (ProxyKind::Gateway, None) => 80,
            (ProxyKind::Gateway, Some(p)) => self.table_port(p),
            (ProxyKind::Sidecar, None | Some(EXPLICIT_PROXY_PORT)) => from_authority(),
            (ProxyKind::Sidecar, Some(p)) => self.table_port(p),
        }
    }

    /// The table a listener port serves: its own, or the one it is an alias of.
    fn table_port(&self, listener_port: u16) -> u16 {
        match self.aliases.get(&listener_port) {
            Some(&table) if !self.tables.contains_key(&listener_port) => table,
            _ => listener_port,
        }
    }

    /// Decides what happens to one request, with every endpoint healthy.
    pub fn decide<'e>(&'e self, req: &RequestView<'_>, rng: &mut dyn Rng) -> Decision<'e> {
        self.decide_with(req, rng, &NoEndpointState)
    }

    /// Decides what happens to one request; ejected endpoints are skipped.
    pub fn decide_with<'e>(
        &'e self,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
    ) -> Decision<'e> {
        let Some(vhost) = self.find_vhost(req) else {
            return self.unknown_host(req);
        };
        if vhost.require_tls && !is_https(req) {
            let location = format!("https://{}{}", req.authority, req.path);
            let mut reply = Reply::empty(301, None, "direct_response");
            reply.headers.push(("location".into(), location));
            return Decision {
                vhost: Some(&vhost.name),
                route: None,
                delay_ms: None,
                outcome: Outcome::Reply(reply),
            };
        }
        let Some((route, matched)) = vhost.routes.iter().find_map(|r| r.matching(req)) else {
            return Decision {
                vhost: Some(&vhost.name),
                route: None,
                delay_ms: None,
                outcome: Outcome::Reply(Reply::empty(
                    404,
                    Some(ResponseFlag::NoRouteFound),
                    "route_not_found",
                )),
            };
        };
        let mut decision = Decision {
            vhost: Some(&vhost.name),
            route: Some(matched.map_or(&route.name, |m| &m.route_name)),
            delay_ms: None,
            outcome: Outcome::Reply(Reply::empty(500, None, "")),
        };
        decision.outcome =
            self.route_outcome(route, matched, req, rng, state, &mut decision.delay_ms);
        decision
    }

    fn route_outcome<'e>(
        &'e self,
        route: &'e RouteRt,
        matched: Option<&CompiledMatch>,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
        delay_ms: &mut Option<u64>,
    ) -> Outcome<'e> {
        let origin = req.header("origin");
        if let (Some(cors), Some(origin)) = (&route.cors, origin.as_deref()) {
            if let Some(reply) = cors.preflight(req, origin) {
                return Outcome::Reply(reply);
            }
        }
        if let Some(fault) = &route.fault {
            if let Some(delay) = &fault.delay {
                if sampled(rng, delay.per_million) {
                    *delay_ms = Some(delay.delay_ms);
                }
            }
            if let Some(abort) = &fault.abort {
                if sampled(rng, abort.per_million) {
                    return Outcome::Reply(respond::fault_abort(abort));
                }
            }
        }
        match &route.action {
            ActionRt::Direct { status, body } => {
                let mut reply = Reply::empty(*status, None, "direct_response");
                if !body.is_empty() {
                    reply
                        .headers
                        .push(("content-type".into(), "text/plain".into()));
                    reply.body.clone_from(body);
                }
                respond::apply_edits(&mut reply.headers, &route.reply_edits);
                Outcome::Reply(reply)
            }
            ActionRt::Redirect(r) => {
                let mut reply = respond::redirect(r, matched, req);
                respond::apply_edits(&mut reply.headers, &route.reply_edits);
                Outcome::Reply(reply)
            }
            ActionRt::Route {
                destinations,
                total_weight,
                rewrite,
            } => {
                let dest = pick_destination(destinations, *total_weight, rng);
                let cluster = dest.target.name(req.port);
                let Some(&cluster_at) = self.cluster_index.get(cluster.as_ref()) else {
                    return Outcome::Reply(Reply::router(RouterReply::NoCluster));
                };
                let c = &self.clusters[cluster_at];
                let Ok(picked) = self.pick(c, req, rng, state) else {
                    return Outcome::Reply(Reply::router(RouterReply::NoHealthyUpstream));
                };
                let mut response_edits = dest.response_edits.clone();
                let (mut endpoint, mut ticket) = (None, None);
                if let Some(p) = picked {
                    if let Some(cookie) = p.set_cookie {
                        response_edits.push(HeaderEdit {
                            op: EditOp::Add,
                            name: Cow::Borrowed("set-cookie"),
                            value: Cow::Owned(cookie),
                        });
                    }
                    ticket = p.index.map(|endpoint| Ticket {
                        cluster: cluster_at,
                        endpoint,
                    });
                    endpoint = Some(p.address);
                }
                if let (Some(cors), Some(origin)) = (&route.cors, origin.as_deref()) {
                    cors.response_headers(origin, &mut response_edits);
                }
                let mut mirrors = Vec::new();
                for m in &route.mirrors {
                    if !sampled(rng, m.per_million) {
                        continue;
                    }
                    let name = m.target.name(req.port);
                    let Some(mc) = self.cluster(&name) else {
                        continue;
                    };
                    if let Ok(picked) = self.pick(mc, req, rng, state) {
                        // A mirror is sent and forgotten: it holds no endpoint.
                        if let Some(i) = picked.as_ref().and_then(|p| p.index) {
                            mc.release(i);
                        }
                        mirrors.push(MirrorTarget {
                            cluster: name,
                            endpoint: picked.map(|p| p.address),
                        });
                    }
                }
                Outcome::Forward(Forward {
                    cluster,
                    endpoint,
                    path: rewrite.as_ref().and_then(|rw| rw.apply(matched, req.path)),
                    authority: dest.authority.as_deref(),
                    request_edits: dest.request_edits.clone(),
                    response_edits,
                    timeout_ms: route.timeout_ms,
                    retry: route.retry.as_ref(),
                    retry_on: route.retry_on.as_ref(),
                    mirrors,
                    ticket,
                    // The host's circuit breakers apply when it owns the clusters.
                    max_active: c.max_active.filter(|_| !self.host_selects),
                    max_retries: c.max_retries.filter(|_| !self.host_selects),
                })
            }
        }
    }

    /// Which virtual host and routes a request meets, for `explain`: the route table port,
    /// the virtual host's index in that table, and for each route tried in order either
    /// `None` (it matched; the last one) or, per match block, the first failing condition.
    pub fn trace<'e>(&'e self, req: &RequestView<'_>) -> Trace<'e> {
        let table = self.tables.get(&req.port);
        let vhost = self
            .find_vhost(req)
            .and_then(|v| table.and_then(|t| t.vhosts.iter().position(|x| std::ptr::eq(x, v))));
        let mut routes = Vec::new();
        if let (Some(t), Some(i)) = (table, vhost) {
            for r in &t.vhosts[i].routes {
                if r.matches.is_empty() {
                    routes.push(None);
                    break;
                }
                let failures: Vec<Condition<'e>> = r
                    .matches
                    .iter()
                    .filter_map(|m| m.first_failure(req))
                    .collect();
                if failures.len() < r.matches.len() {
                    routes.push(None);
                    break;
                }
                routes.push(Some(failures));
            }
        }
        Trace { vhost, routes }
    }

    fn cluster(&self, name: &str) -> Option<&ClusterRt> {
        self.cluster_index.get(name).map(|&i| &self.clusters[i])
    }

    fn pick(
        &self,
        c: &ClusterRt,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
    ) -> Result<Option<balance::Picked>, ()> {
        if self.host_selects {
            // The host balances over the endpoints it discovers.
            return Ok(None);
        }
        self.pick_avoiding(c, req, rng, state, &[])
    }

    fn pick_avoiding(
        &self,
        c: &ClusterRt,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
        avoid: &[usize],
    ) -> Result<Option<balance::Picked>, ()> {
        if c.outlier.is_none() {
            return c.pick(req, rng, None, avoid);
        }
        let stored = state.outlier_record(&c.name);
        let record = OutlierRecord::decode(stored.as_deref(), c.fingerprint, c.endpoint_count());
        c.pick(req, rng, Some((&record, state.now_ms())), avoid)
    }

    /// The endpoint for a retry of a request whose tries so far hold `tried` (all of one
    /// cluster): another one than those while any is left, when `avoid_previous` (Istio's
    /// `previous_hosts` predicate); `None` when the cluster has no endpoint to offer.
    pub fn retry_pick(
        &self,
        tried: &[Ticket],
        avoid_previous: bool,
        req: &RequestView<'_>,
        rng: &mut dyn Rng,
        state: &dyn EndpointState,
    ) -> Option<(String, Ticket)> {
        let cluster = tried.first()?.cluster;
        let c = self.clusters.get(cluster)?;
        // With consistent hashing Istio leaves out the previous-hosts predicate: a retry
        // stays on the key's endpoint.
        let avoid: Vec<usize> = if avoid_previous && !c.hashes() {
            tried.iter().map(|t| t.endpoint).collect()
        } else {
            Vec::new()
        };
        let picked = self.pick_avoiding(c, req, rng, state, &avoid).ok()??;
        let endpoint = picked.index?;
        Some((picked.address, Ticket { cluster, endpoint }))
    }

    /// The request holding `ticket` is over (LEAST_REQUEST counts requests in flight).
    pub fn release(&self, ticket: Ticket) {
        if let Some(c) = self.clusters.get(ticket.cluster) {
            c.release(ticket.endpoint);
        }
    }

    /// Whether the ticket's cluster has outlier detection.
    pub fn tracks_outliers(&self, ticket: Ticket) -> bool {
        self.clusters
            .get(ticket.cluster)
            .is_some_and(|c| c.outlier.is_some())
    }

    /// Whether the ticket's cluster speaks HTTP/2 upstream (gRPC status may matter).
    pub fn upstream_h2(&self, ticket: Ticket) -> bool {
        self.clusters.get(ticket.cluster).is_some_and(|c| c.h2)
    }

    /// The name of the ticket's cluster.
    pub fn cluster_of(&self, ticket: Ticket) -> Option<&str> {
        self.clusters.get(ticket.cluster).map(|c| c.name.as_str())
    }

    /// Shared-data key of a cluster's count of requests in flight (circuit breaker).
    pub fn active_key(cluster: &str) -> String {
        format!("meshroute.active/{cluster}")
    }

    /// Shared-data key of a cluster's count of retries in flight (`maxRetries`).
    pub fn retries_key(cluster: &str) -> String {
        format!("meshroute.retries/{cluster}")
    }

    /// The shared counters the circuit breakers of these rules use.
    pub fn counter_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for c in &self.clusters {
            if c.max_active.is_some() {
                keys.push(Self::active_key(&c.name));
            }
            if c.max_retries.is_some() {
                keys.push(Self::retries_key(&c.name));
            }
        }
        keys
    }

    /// Shared-data key of a cluster's outlier record.
    pub fn outlier_key(cluster: &str) -> String {
        format!("meshroute.outlier/{cluster}")
    }

    /// Counts an attempt's result against the ticket's endpoint. Returns the cluster's name
    /// and its updated outlier record to store (with whether the endpoint was just ejected),
    /// or `None` when the cluster has no outlier detection.
    pub fn observe(
        &self,
        ticket: Ticket,
        result: AttemptResult,
        stored: Option<&[u8]>,
        now_ms: u64,
    ) -> Option<(&str, Vec<u8>, bool)> {
        let c = self.clusters.get(ticket.cluster)?;
        let cfg = c.outlier.as_ref()?;
        let mut record = OutlierRecord::decode(stored, c.fingerprint, c.endpoint_count());
        let ejected = record.observe(ticket.endpoint, result, cfg, now_ms);
        Some((&c.name, record.encode(), ejected))
    }

    /// Virtual host for the request's host; port in the authority is ignored (Istio G8).
    fn find_vhost(&self, req: &RequestView<'_>) -> Option<&VHost> {
        let table = self.tables.get(&req.port)?;
        let host = req.host();
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let index = table.exact.get(host).copied().or_else(|| {
            // Longest wildcard first: try each suffix starting at a dot, left to right.
            host.match_indices('.')
                .find_map(|(i, _)| table.suffix.get(&host[i..]).copied())
                .or(table.any)
        })?;
        table.vhosts.get(index)
    }

    /// No virtual host: Istio's catch-all (sidecar) or 404 (gateway).
    fn unknown_host<'e>(&'e self, req: &RequestView<'_>) -> Decision<'e> {
        let outcome = match (self.kind, self.outbound) {
            (ProxyKind::Gateway, _) => Outcome::Reply(Reply::empty(
                404,
                Some(ResponseFlag::NoRouteFound),
                "route_not_found",
            )),
            (ProxyKind::Sidecar, OutboundPolicy::RegistryOnly) => {
                Outcome::Reply(Reply::empty(502, None, "direct_response"))
            }
            (ProxyKind::Sidecar, OutboundPolicy::AllowAny) => {
                // A captured connection goes on to where the client sent it, which the host
                // knows (Envoy's ORIGINAL_DST); an explicit proxy's, to the authority.
                let endpoint = (!self.host_selects && !req.transparent).then(|| {
                    let (host, port) = split_host_port(req.authority);
                    let port = port.unwrap_or(req.port);
                    if host.contains(':') {
                        format!("[{host}]:{port}")
                    } else {
                        format!("{host}:{port}")
                    }
                });
                Outcome::Forward(Forward {
                    cluster: Cow::Borrowed(PASSTHROUGH_CLUSTER),
                    endpoint,
                    path: None,
                    authority: None,
                    request_edits: Vec::new(),
                    response_edits: Vec::new(),
                    timeout_ms: None,
                    retry: None,
                    retry_on: None,
                    mirrors: Vec::new(),
                    ticket: None,
                    max_active: None,
                    max_retries: None,
                })
            }
        };
        let catch_all = match (self.kind, self.outbound) {
            (ProxyKind::Gateway, _) => None,
            (ProxyKind::Sidecar, OutboundPolicy::RegistryOnly) => Some(BLOCK_ALL_ROUTE),
            (ProxyKind::Sidecar, OutboundPolicy::AllowAny) => Some(ALLOW_ANY_ROUTE),
        };
        Decision {
            vhost: None,
            route: catch_all,
            delay_ms: None,
            outcome,
        }
    }
}

fn is_https(req: &RequestView<'_>) -> bool {
    req.scheme.eq_ignore_ascii_case("https")
        || req
            .header("x-forwarded-proto")
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn sampled(rng: &mut dyn Rng, per_million: u32) -> bool {
    match u64::from(per_million) {
        0 => false,
        p if p >= MILLION => true,
        p => rng.below(MILLION) < p,
    }
}

fn pick_destination<'d>(dests: &'d [DestRt], total: u64, rng: &mut dyn Rng) -> &'d DestRt {
    if dests.len() > 1 {
        let mut point = rng.below(total);
        for d in dests {
            if point < d.weight {
                return d;
            }
            point -= d.weight;
        }
    }
    &dests[0]
}

impl RouteRt {
    /// The route if it matches, with the match block that did (`None` for match-all routes).
    fn matching(&self, req: &RequestView<'_>) -> Option<(&Self, Option<&CompiledMatch>)> {
        if self.matches.is_empty() {
            return Some((self, None));
        }
        self.matches
            .iter()
            .find(|m| m.matches(req))
            .map(|m| (self, Some(m)))
    }
}

impl RewriteRt {
    fn apply(&self, matched: Option<&CompiledMatch>, path: &str) -> Option<String> {
        let (p, query) = split_query(path);
        let new_path = if let Some((re, substitution)) = &self.regex {
            re.replace_all(p, substitution.as_str()).into_owned()
        } else {
            replace_matched(p, matched, self.uri.as_deref()?)
        };
        Some(match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        })
    }
}

/// Envoy's `prefix_rewrite`: a prefix match swaps the matched prefix, exact and regex matches
/// swap the whole path, and a route without a uri match (Envoy prefix `/`) swaps the leading `/`.
pub(crate) fn replace_matched(path: &str, matched: Option<&CompiledMatch>, with: &str) -> String {
    let prefix_len = match matched.and_then(|m| m.uri.as_ref()) {
        Some(Matcher::Prefix(p)) => p.len(),
        Some(_) => path.len(),
        None => usize::from(path.starts_with('/')),
    };
    let rest = path.get(prefix_len..).unwrap_or("");
    format!("{with}{rest}")
}

fn build_table(table: ir::RouteTable) -> Result<Table, BuildError> {
    let mut out = Table::default();
    for (i, vh) in table.virtual_hosts.into_iter().enumerate() {
        for domain in &vh.domains {
            let domain = domain.to_ascii_lowercase();
            if domain == "*" {
                out.any.get_or_insert(i);
            } else if let Some(suffix) = domain.strip_prefix('*') {
                out.suffix.entry(suffix.to_owned()).or_insert(i);
            } else {
                out.exact.entry(domain).or_insert(i);
            }
        }
        let routes = vh
            .routes
            .into_iter()
            .map(build_route)
            .collect::<Result<_, _>>()?;
        out.vhosts.push(VHost {
            name: vh.name,
            require_tls: vh.require_tls,
            routes,
        });
    }
    Ok(out)
}

fn build_route(route: ir::Route) -> Result<RouteRt, BuildError> {
    let matches = route
        .matches
        .iter()
        .map(|m| CompiledMatch::build(&route.name, m))
        .collect::<Result<_, _>>()?;
    let (route_authority, route_req) = split_authority(&route.request_headers);
    let mut reply_edits = Vec::new();
    push_level(&mut reply_edits, &[&route.response_headers]);
    let action = match route.action {
        Action::DirectResponse(d) => ActionRt::Direct {
            status: d.status,
            body: match d.body {
                None => Vec::new(),
                Some(b) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| BuildError::Body {
                        route: route.name.clone(),
                        reason: e.to_string(),
                    })?,
            },
        },
        Action::Redirect(r) => ActionRt::Redirect(r),
        Action::Route(ra) => {
            let rewrite = ra
                .rewrite
                .as_ref()
                .map(|rw| {
                    Ok::<_, BuildError>(RewriteRt {
                        uri: rw.uri.clone(),
                        regex: rw
                            .uri_regex
                            .as_ref()
                            .map(|r| {
                                let re = matcher::regex(&r.pattern)?;
                                Ok::<_, BuildError>((re, re2_substitution(&r.substitution)))
                            })
                            .transpose()?,
                    })
                })
                .transpose()?
                .filter(|rw| rw.uri.is_some() || rw.regex.is_some());
            let rewrite_authority = ra.rewrite.as_ref().and_then(|rw| rw.authority.clone());
            let single = ra.destinations.len() == 1;
            let destinations: Vec<DestRt> = ra
                .destinations
                .iter()
                .filter(|d| d.weight > 0 || single)
                .map(|d| {
                    let (dest_authority, dest_req) = split_authority(&d.request_headers);
                    let mut request_edits = Vec::new();
                    let mut response_edits = Vec::new();
                    if single {
                        // One destination: one merged list, destination `set` last (wins).
                        push_level(&mut request_edits, &[&route_req, &dest_req]);
                        push_level(
                            &mut response_edits,
                            &[&route.response_headers, &d.response_headers],
                        );
                    } else {
                        // Weighted: the destination level runs first, the route level wins.
                        push_level(&mut request_edits, &[&dest_req]);
                        push_level(&mut request_edits, &[&route_req]);
                        push_level(&mut response_edits, &[&d.response_headers]);
                        push_level(&mut response_edits, &[&route.response_headers]);
                    }
                    DestRt {
                        target: Target::new(&d.host, &d.subset, d.port),
                        weight: u64::from(d.weight.max(u32::from(single))),
                        authority: rewrite_authority
                            .clone()
                            .or_else(|| route_authority.clone())
                            .or(dest_authority),
                        request_edits,
                        response_edits,
                    }
                })
                .collect();
            let total_weight = destinations.iter().map(|d| d.weight).sum();
            if destinations.is_empty() {
                ActionRt::Direct {
                    status: 503,
                    body: Vec::new(),
                }
            } else {
                ActionRt::Route {
                    destinations,
                    total_weight,
                    rewrite,
                }
            }
        }
    };
    Ok(RouteRt {
        name: route.name,
        matches,
        action,
        fault: route.fault,
        cors: route.cors.as_ref().map(CorsRt::build).transpose()?,
        mirrors: route
            .mirrors
            .iter()
            .map(|m| MirrorRt {
                target: Target::new(&m.host, &m.subset, m.port),
                per_million: m.per_million,
            })
            .collect(),
        timeout_ms: route.timeout_ms.filter(|&t| t > 0),
        retry_on: route.retry.as_ref().map(|r| {
            RetryOn::parse(
                r.retry_on.iter().map(String::as_str),
                &r.retriable_status_codes,
            )
        }),
        retry: route.retry,
        reply_edits,
    })
}

/// Takes `:authority`/`host` out of `set` (it is an authority rewrite) and drops other
/// pseudo-headers, which Istio ignores.
fn split_authority(ops: &HeaderOps) -> (Option<String>, HeaderOps) {
    let mut authority = None;
    let mut rest = HeaderOps::default();
    for (k, v) in &ops.set {
        let k = k.to_ascii_lowercase();
        if k == ":authority" || k == "host" {
            authority = Some(v.clone());
        } else if !k.starts_with(':') {
            rest.set.push((k, v.clone()));
        }
    }
    for (k, v) in &ops.add {
        let k = k.to_ascii_lowercase();
        if !k.starts_with(':') && k != "host" {
            rest.add.push((k, v.clone()));
        }
    }
    rest.remove = ops
        .remove
        .iter()
        .map(|k| k.to_ascii_lowercase())
        .filter(|k| !k.starts_with(':') && k != "host")
        .collect();
    (authority, rest)
}

/// One Envoy header-mutation level: removes, then sets, then adds.
fn push_level(out: &mut Vec<HeaderEdit<'static>>, levels: &[&HeaderOps]) {
    let edit = |op, name: &str, value: &str| HeaderEdit {
        op,
        name: Cow::Owned(name.to_ascii_lowercase()),
        value: Cow::Owned(value.to_owned()),
    };
    for ops in levels {
        out.extend(ops.remove.iter().map(|n| edit(EditOp::Remove, n, "")));
    }
    for ops in levels {
        out.extend(ops.set.iter().map(|(n, v)| edit(EditOp::Set, n, v)));
    }
    for ops in levels {
        out.extend(ops.add.iter().map(|(n, v)| edit(EditOp::Add, n, v)));
    }
}

/// RE2/Envoy substitutions use `\1`; the regex crate uses `${1}` and treats `$` specially.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str("${");
                    out.push(*d);
                    out.push('}');
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

impl CorsRt {
    fn build(c: &ir::CorsPolicy) -> Result<Self, BuildError> {
        Ok(Self {
            origins: c
                .allow_origins
                .iter()
                .map(|m| Matcher::build(m, false))
                .collect::<Result<_, _>>()?,
            allow_methods: c.allow_methods.join(","),
            allow_headers: c.allow_headers.join(","),
            expose_headers: c.expose_headers.join(","),
            max_age: c.max_age_s.map(|s| s.to_string()),
            credentials: c.allow_credentials == Some(true),
            ignore_unmatched_preflights: c.ignore_unmatched_preflights,
        })
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| matches!(m, Matcher::Exact(s) if s == "*") || m.matches(origin))
    }

    /// A CORS preflight is answered here when the origin is allowed (or when unmatched
    /// preflights are not forwarded).
    fn preflight(&self, req: &RequestView<'_>, origin: &str) -> Option<Reply> {
        if req.method != "OPTIONS" || req.header("access-control-request-method").is_none() {
            return None;
        }
        let mut reply = Reply::empty(200, None, "cors_response");
        if !self.allows(origin) {
            return self.ignore_unmatched_preflights.then_some(reply);
        }
        let h = &mut reply.headers;
        h.push(("access-control-allow-origin".into(), origin.to_owned()));
        if self.credentials {
            h.push(("access-control-allow-credentials".into(), "true".into()));
        }
        for (name, value) in [
            ("access-control-allow-methods", &self.allow_methods),
            ("access-control-allow-headers", &self.allow_headers),
        ] {
            if !value.is_empty() {
                h.push((name.into(), value.clone()));
            }
        }
        if let Some(age) = &self.max_age {
            h.push(("access-control-max-age".into(), age.clone()));
        }
        Some(reply)
    }

    fn response_headers(&self, origin: &str, edits: &mut Vec<HeaderEdit<'_>>) {
        if !self.allows(origin) {
            return;
        }
        let mut set = |name: &'static str, value: String| {
            edits.push(HeaderEdit {
                op: EditOp::Set,
                name: Cow::Borrowed(name),
                value: Cow::Owned(value),
            });
        };
        set("access-control-allow-origin", origin.to_owned());
        if self.credentials {
            set("access-control-allow-credentials", "true".into());
        }
        if !self.expose_headers.is_empty() {
            set("access-control-expose-headers", self.expose_headers.clone());
        }
    }
}
