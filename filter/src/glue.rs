//! proxy-wasm contexts. Everything here is a host call or bookkeeping around one.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode};

use meshroute_core::engine::{EditOp, Engine, Outcome, Reply, RequestView, SplitMix64};
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
        let view = RequestView {
            method,
            scheme,
            authority,
            path,
            port,
            headers: &headers,
            source_ip: None,
        };
        let mut rng = SplitMix64(self.shared.rng.get() ^ u64::from(self.context_id));
        let decision = engine.decide(&view, &mut rng);
        self.shared.rng.set(rng.0);

        let then = match decision.outcome {
            Outcome::Reply(reply) => Some(reply),
            Outcome::Forward(f) => {
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
        // A stream that ends while delayed must not be resumed later.
        self.shared
            .delays
            .borrow_mut()
            .retain(|d| d.context_id != self.context_id);
    }
}

impl FilterHttp {
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
