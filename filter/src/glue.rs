//! proxy-wasm contexts. Everything here is a host call or bookkeeping around one.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode};

use meshroute_core::engine::{
    split_host_port, AttemptResult, EditOp, EndpointState, Engine, Outcome, Reply, RequestView,
    SplitMix64, Ticket,
};
use meshroute_core::ir::{self, CLUSTER_HEADER, ENDPOINT_HEADER, LISTENER_PORT_HEADER};

/// Request bodies above this are not mirrored (Envoy's shadow has the same kind of bound).
pub const MIRROR_BODY_LIMIT: usize = 1 << 20;
/// Mirror calls that take longer are abandoned; the client never waits for them.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// What the root context shares with its HTTP contexts.
struct Shared {
    engine: RefCell<Option<Rc<Engine>>>,
    rng: Cell<u64>,
    delays: RefCell<Vec<Delayed>>,
}

/// A request paused by a fault delay, and what to do when the delay is over.
struct Delayed {
    context_id: u32,
    due_ms: u64,
    then: Option<Reply>,
}

pub struct FilterRoot {
    context_id: u32,
    shared: Rc<Shared>,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            shared: Rc::new(Shared {
                engine: RefCell::new(None),
                rng: Cell::new(u64::from(context_id).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                delays: RefCell::new(Vec::new()),
            }),
        }
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Context for FilterRoot {}

impl RootContext for FilterRoot {
    fn on_vm_start(&mut self, _: usize) -> bool {
        // Seed per VM from the clock so workers do not draw the same sequence.
        let seed = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        self.shared.rng.set(seed ^ self.shared.rng.get());
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match crate::load_rules(&bytes) {
            Ok(engine) => {
                info!(
                    "rules loaded ({} bytes) for root context {}",
                    bytes.len(),
                    self.context_id
                );
                *self.shared.engine.borrow_mut() = Some(Rc::new(engine));
                true
            }
            Err(reason) => {
                let kept = if self.shared.engine.borrow().is_some() {
                    " (the previous rules stay in effect)"
                } else {
                    ""
                };
                error!("configuration rejected{kept}: {reason}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        let due: Vec<Delayed> = {
            let mut delays = self.shared.delays.borrow_mut();
            let (due, waiting) = delays.drain(..).partition(|d| d.due_ms <= now);
            *delays = waiting;
            due
        };
        for d in due {
            // The stream may be gone (client hung up); then there is nothing to resume.
            if hostcalls::set_effective_context(d.context_id).is_err() {
                continue;
            }
            let result = match &d.then {
                None => hostcalls::resume_http_request(),
                Some(reply) => send_reply(reply),
            };
            if let Err(status) = result {
                warn!("resuming delayed request failed: {status:?}");
            }
        }
        schedule_tick(&self.shared, now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FilterHttp {
            context_id,
            shared: Rc::clone(&self.shared),
            engine: self.shared.engine.borrow().clone(),
            response_edits: Vec::new(),
            mirror: None,
            ticket: None,
            admitted: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Sets the tick to fire at the next due delay, or stops it.
fn schedule_tick(shared: &Shared, now: u64) {
    let next = shared.delays.borrow().iter().map(|d| d.due_ms).min();
    let period = next.map_or(Duration::ZERO, |due| {
        Duration::from_millis(due.saturating_sub(now).max(1))
    });
    if let Err(status) = hostcalls::set_tick_period(period) {
        warn!("set_tick_period failed: {status:?}");
    }
}

/// A mirror waiting for the request body.
struct PendingMirror {
    headers: Vec<(String, String)>,
    targets: Vec<(String, Option<String>)>,
    body: Vec<u8>,
    too_big: bool,
}

struct FilterHttp {
    context_id: u32,
    shared: Rc<Shared>,
    engine: Option<Rc<Engine>>,
    response_edits: Vec<(EditOp, String, String)>,
    mirror: Option<PendingMirror>,
    /// The endpoint this request holds, for LEAST_REQUEST and outlier detection.
    ticket: Option<Ticket>,
    /// Shared-data key of the circuit-breaker counter this request was admitted under.
    admitted: Option<String>,
}

/// Endpoint health as every worker sees it: outlier records in shared data.
struct SharedEndpointState {
    now_ms: u64,
}

impl EndpointState for SharedEndpointState {
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn outlier_record(&self, cluster: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&Engine::outlier_key(cluster))
            .ok()
            .and_then(|(bytes, _)| bytes)
    }
}

/// Envoy's legacy response-flag bits for failures the proxy saw itself (no upstream answer):
/// LR, UR, UF, UC, and UT for the timeout.
const LOCAL_ORIGIN_FLAGS: u64 = 0x8 | 0x10 | 0x20 | 0x40;
const TIMEOUT_FLAG: u64 = 0x4;
/// Compare-and-swap attempts on a shared counter before giving up on it.
const CAS_TRIES: usize = 16;

/// Adds `delta` to the shared counter `key` unless that would take it above `limit`.
/// Returns whether it changed.
fn shared_add(key: &str, delta: i64, limit: u32) -> bool {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let current = bytes
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map_or(0, u32::from_le_bytes);
        let Some(next) = current.checked_add_signed(delta as i32) else {
            return false;
        };
        if delta > 0 && next > limit {
            return false;
        }
        match hostcalls::set_shared_data(key, Some(&next.to_le_bytes()), cas) {
            Ok(()) => return true,
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(status) => {
                warn!("shared counter {key}: {status:?}");
                return false;
            }
        }
    }
    warn!("shared counter {key}: too much contention");
    false
}

impl Context for FilterHttp {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        // Mirror responses are discarded, as Istio's mirroring does.
    }
}

impl HttpContext for FilterHttp {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let Some(engine) = self.engine.clone() else {
            error!("no rules loaded; refusing request");
            let _ = send_reply(&Reply {
                status: 503,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: b"meshroute: no rules loaded".to_vec(),
                grpc_status: None,
                flag: "",
                details: "meshroute_not_configured",
            });
            return Action::Pause;
        };
        let mut headers = self.get_http_request_headers();
        // The host's trusted header stage names the server port; inside Istio (no such
        // stage) the connection's destination port is the listener's.
        let listener_port = take_listener_port(&headers).or_else(|| {
            self.get_property(vec!["destination", "port"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .and_then(|b| u16::try_from(u64::from_le_bytes(b)).ok())
        });
        // Client copies of control headers never steer anything.
        let mut i = 0;
        while i < headers.len() {
            if is_control_header(&headers[i].0) {
                let (name, _) = headers.swap_remove(i);
                self.set_http_request_header(&name, None);
            } else {
                i += 1;
            }
        }
        let pseudo = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let (method, scheme, authority, path) = (
            pseudo(":method"),
            pseudo(":scheme"),
            pseudo(":authority"),
            pseudo(":path"),
        );
        let scheme = if scheme.is_empty() { "http" } else { scheme };
        let port = engine.route_port(authority, scheme, listener_port.unwrap_or(80));
        // `ip:port` as Envoy encodes `source.address`; hashing uses the IP.
        let source = if engine.uses_source_ip() {
            self.get_property(vec!["source", "address"])
                .and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let source_ip = source.as_deref().map(|a| split_host_port(a).0);
        let view = RequestView {
            method,
            scheme,
            authority,
            path,
            port,
            headers: &headers,
            source_ip,
        };
        let mut rng = SplitMix64(self.shared.rng.get() ^ u64::from(self.context_id));
        let state = SharedEndpointState { now_ms: now_ms() };
        let decision = engine.decide_with(&view, &mut rng, &state);
        self.shared.rng.set(rng.0);

        let then = match decision.outcome {
            Outcome::Reply(reply) => Some(reply),
            Outcome::Forward(f) if !self.admit(&f.cluster, f.max_active) => {
                if let Some(t) = f.ticket {
                    engine.release(t);
                }
                Some(Reply::overflow())
            }
            Outcome::Forward(f) => {
                self.ticket = f.ticket;
                self.set_http_request_header(CLUSTER_HEADER, Some(&f.cluster));
                self.set_http_request_header(ENDPOINT_HEADER, f.endpoint.as_deref());
                if let Some(new_path) = &f.path {
                    self.set_http_request_header("x-envoy-original-path", Some(path));
                    self.set_http_request_header(":path", Some(new_path));
                }
                if let Some(a) = f.authority {
                    self.set_http_request_header(":authority", Some(a));
                }
                for e in &f.request_edits {
                    match e.op {
                        EditOp::Set => self.set_http_request_header(&e.name, Some(&e.value)),
                        EditOp::Add => self.add_http_request_header(&e.name, &e.value),
                        EditOp::Remove => self.set_http_request_header(&e.name, None),
                    }
                }
                if let Some(t) = f.timeout_ms {
                    self.set_http_request_header(
                        "x-envoy-upstream-rq-timeout-ms",
                        Some(&t.to_string()),
                    );
                }
                if let Some(r) = f.retry {
                    self.set_retry_headers(r);
                }
                self.response_edits = f
                    .response_edits
                    .iter()
                    .map(|e| (e.op, e.name.to_string(), e.value.to_string()))
                    .collect();
                if !f.mirrors.is_empty() {
                    let mut pending = PendingMirror {
                        headers: self
                            .get_http_request_headers()
                            .into_iter()
                            .filter(|(k, _)| !is_control_header(k))
                            .collect(),
                        targets: f
                            .mirrors
                            .into_iter()
                            .map(|m| (m.cluster.into_owned(), m.endpoint))
                            .collect(),
                        body: Vec::new(),
                        too_big: false,
                    };
                    if end_of_stream {
                        self.dispatch_mirrors(&mut pending);
                    } else {
                        self.mirror = Some(pending);
                    }
                }
                None
            }
        };
        match (decision.delay_ms, then) {
            (Some(ms), then) => {
                let now = now_ms();
                self.shared.delays.borrow_mut().push(Delayed {
                    context_id: self.context_id,
                    due_ms: now + ms,
                    then,
                });
                schedule_tick(&self.shared, now);
                Action::Pause
            }
            (None, Some(reply)) => {
                if let Err(status) = send_reply(&reply) {
                    error!("local reply failed: {status:?}");
                }
                Action::Pause
            }
            (None, None) => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(mut pending) = self.mirror.take() {
            if !pending.too_big {
                if pending.body.len() + body_size > MIRROR_BODY_LIMIT {
                    pending.too_big = true;
                    pending.body = Vec::new();
                } else if let Some(chunk) = self.get_http_request_body(0, body_size) {
                    pending.body.extend_from_slice(&chunk);
                }
            }
            if end_of_stream {
                if pending.too_big {
                    warn!("request body above {MIRROR_BODY_LIMIT} bytes, not mirrored");
                } else {
                    self.dispatch_mirrors(&mut pending);
                }
            } else {
                self.mirror = Some(pending);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.observe_attempt();
        for (op, name, value) in &self.response_edits {
            match op {
                EditOp::Set => self.set_http_response_header(name, Some(value)),
                EditOp::Add => self.add_http_response_header(name, value),
                EditOp::Remove => self.set_http_response_header(name, None),
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(t), Some(engine)) = (self.ticket.take(), &self.engine) {
            engine.release(t);
        }
        if let Some(key) = self.admitted.take() {
            shared_add(&key, -1, u32::MAX);
        }
        // A stream that ends while delayed must not be resumed later.
        self.shared
            .delays
            .borrow_mut()
            .retain(|d| d.context_id != self.context_id);
    }
}

impl FilterHttp {
    /// Circuit breaker: takes a place among the cluster's concurrent requests, if one is free.
    fn admit(&mut self, cluster: &str, max_active: Option<u32>) -> bool {
        let Some(limit) = max_active else {
            return true;
        };
        let key = format!("meshroute.active/{cluster}");
        if !shared_add(&key, 1, limit) {
            return false;
        }
        self.admitted = Some(key);
        true
    }

    /// Feeds the outcome of the attempt to outlier detection: the upstream's status, or a
    /// local-origin failure when the host's router answered for it (Envoy's response flags).
    fn observe_attempt(&self) {
        let (Some(ticket), Some(engine)) = (self.ticket, &self.engine) else {
            return;
        };
        if !engine.tracks_outliers(ticket) {
            return;
        }
        let status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let flags = self
            .get_property(vec!["response", "flags"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let result = if flags & (LOCAL_ORIGIN_FLAGS | TIMEOUT_FLAG) != 0 {
            AttemptResult::LocalOrigin {
                timeout: flags & TIMEOUT_FLAG != 0,
            }
        } else {
            AttemptResult::Status(status)
        };
        let now = now_ms();
        for _ in 0..CAS_TRIES {
            let key;
            let (stored, cas) = match engine.cluster_of(ticket) {
                Some(name) => {
                    key = Engine::outlier_key(name);
                    hostcalls::get_shared_data(&key).unwrap_or((None, None))
                }
                None => return,
            };
            let Some((cluster, record, ejected)) =
                engine.observe(ticket, result, stored.as_deref(), now)
            else {
                return;
            };
            match hostcalls::set_shared_data(&key, Some(&record), cas) {
                Ok(()) => {
                    if ejected {
                        info!("outlier detection ejected an endpoint of {cluster}");
                    }
                    return;
                }
                Err(proxy_wasm::types::Status::CasMismatch) => continue,
                Err(status) => {
                    warn!("outlier record of {cluster}: {status:?}");
                    return;
                }
            }
        }
    }

    fn set_retry_headers(&self, r: &ir::RetryPolicy) {
        if r.num_retries == 0 {
            return;
        }
        self.set_http_request_header("x-envoy-max-retries", Some(&r.num_retries.to_string()));
        self.set_http_request_header("x-envoy-retry-on", Some(&r.retry_on.join(",")));
        if !r.retriable_status_codes.is_empty() {
            let codes: Vec<String> = r
                .retriable_status_codes
                .iter()
                .map(u16::to_string)
                .collect();
            self.set_http_request_header("x-envoy-retriable-status-codes", Some(&codes.join(",")));
        }
        if let Some(t) = r.per_try_timeout_ms {
            self.set_http_request_header(
                "x-envoy-upstream-rq-per-try-timeout-ms",
                Some(&t.to_string()),
            );
        }
    }

    fn dispatch_mirrors(&self, pending: &mut PendingMirror) {
        let body = (!pending.body.is_empty()).then_some(pending.body.as_slice());
        for (cluster, endpoint) in &pending.targets {
            let mut headers: Vec<(&str, &str)> = pending
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(e) = endpoint {
                headers.push((ENDPOINT_HEADER, e.as_str()));
            }
            if let Err(status) =
                self.dispatch_http_call(cluster, headers, body, vec![], MIRROR_TIMEOUT)
            {
                warn!("mirror to {cluster} not sent: {status:?}");
            }
        }
    }
}

/// The gateway server port, from the trusted header the host's first stage sets.
fn take_listener_port(headers: &[(String, String)]) -> Option<u16> {
    headers
        .iter()
        .find(|(k, _)| k == LISTENER_PORT_HEADER)
        .and_then(|(_, v)| v.parse().ok())
}

fn is_control_header(name: &str) -> bool {
    ir::CONTROL_HEADERS.contains(&name)
}

fn send_reply(reply: &Reply) -> Result<(), proxy_wasm::types::Status> {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match reply.grpc_status {
        Some(code) => hostcalls::send_grpc_response(
            grpc_code(code),
            Some("fault filter abort"),
            headers
                .into_iter()
                .filter(|(k, _)| *k != "content-type")
                .map(|(k, v)| (k, v.as_bytes()))
                .collect(),
        ),
        None => hostcalls::send_http_response(
            u32::from(reply.status),
            headers,
            (!reply.body.is_empty()).then_some(reply.body.as_slice()),
        ),
    }
}

fn grpc_code(code: u32) -> GrpcStatusCode {
    use GrpcStatusCode as G;
    match code {
        0 => G::Ok,
        1 => G::Cancelled,
        2 => G::Unknown,
        3 => G::InvalidArgument,
        4 => G::DeadlineExceeded,
        5 => G::NotFound,
        6 => G::AlreadyExists,
        7 => G::PermissionDenied,
        8 => G::ResourceExhausted,
        9 => G::FailedPrecondition,
        10 => G::Aborted,
        11 => G::OutOfRange,
        12 => G::Unimplemented,
        13 => G::Internal,
        14 => G::Unavailable,
        15 => G::DataLoss,
        _ => G::Unauthenticated,
    }
}
