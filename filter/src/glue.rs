//! proxy-wasm contexts. Everything here is a host call or bookkeeping around one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode};

use meshroute_core::engine::{
    backoff_ms, split_host_port, EditOp, Engine, Outcome, Reply, RequestView, SplitMix64, Ticket,
};
use meshroute_core::ir::{self, CLUSTER_HEADER, ENDPOINT_HEADER, LISTENER_PORT_HEADER};

use crate::retry::{call_end, first_try_end, Answer, RetryRun};
use crate::shared::{self, SharedEndpointState};

/// Request bodies above this are neither mirrored nor retried (Envoy's buffer limit for
/// shadows and retries is of the same order).
pub const BODY_COPY_LIMIT: usize = 1 << 20;
/// Mirror calls that take longer are abandoned; the client never waits for them.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
/// A retry without any timeout still needs one for the side call (Envoy requires it).
const UNBOUNDED_TRY: Duration = Duration::from_secs(3600);

/// What the root context shares with its HTTP contexts.
struct Shared {
    engine: RefCell<Option<Rc<Engine>>>,
    rng: Cell<u64>,
    delays: RefCell<Vec<Delayed>>,
    /// Requests whose retries are under way, by HTTP context.
    retries: RefCell<HashMap<u32, RetryRun>>,
    /// Side calls of retries, by token, to their HTTP context.
    retry_calls: RefCell<HashMap<u32, u32>>,
}

impl Shared {
    fn draw(&self, salt: u32) -> SplitMix64 {
        SplitMix64(self.rng.get() ^ u64::from(salt))
    }
}

/// A request waiting on a timer, and what to do when it fires.
struct Delayed {
    context_id: u32,
    due_ms: u64,
    then: After,
}

enum After {
    /// The fault delay is over: let the request go on.
    Resume,
    /// The fault delay is over: answer with the fault abort.
    Reply(Reply),
    /// The back-off is over: send the next try.
    Retry,
}

pub struct FilterRoot {
    context_id: u32,
    shared: Rc<Shared>,
    /// The listener port of a connection-level plugin (root id `meshroute_tcp_<port>`);
    /// `None` for the HTTP filter.
    l4_port: Option<u16>,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            shared: Rc::new(Shared {
                engine: RefCell::new(None),
                rng: Cell::new(u64::from(context_id).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                delays: RefCell::new(Vec::new()),
                retries: RefCell::new(HashMap::new()),
                retry_calls: RefCell::new(HashMap::new()),
            }),
            l4_port: None,
        }
    }
}

thread_local! {
    /// The last rules document this VM loaded, with its engine while any root context uses it.
    static LOADED: RefCell<Option<(Vec<u8>, std::rc::Weak<Engine>)>> = const { RefCell::new(None) };
}

/// The engine already loaded from exactly these bytes, if a root context still holds it.
fn shared_engine(bytes: &[u8]) -> Option<Rc<Engine>> {
    LOADED.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(loaded, _)| loaded.as_slice() == bytes)
            .and_then(|(_, engine)| engine.upgrade())
    })
}

pub(crate) fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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
        let root_id = match hostcalls::get_property(vec!["plugin_root_id"]) {
            Ok(Some(id)) => String::from_utf8_lossy(&id).into_owned(),
            _ => String::new(),
        };
        if let Some(port) = root_id.strip_prefix(ir::L4_ROOT_PREFIX) {
            let Ok(port) = port.parse::<u16>() else {
                error!(
                    "root id {root_id:?}: expected {}<listener port>",
                    ir::L4_ROOT_PREFIX
                );
                return false;
            };
            self.l4_port = Some(port);
        }
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if let Some(engine) = shared_engine(&bytes) {
            // Another root context of this VM (the HTTP filter, another TCP listener) loaded
            // the same rules: one engine, one set of per-endpoint counts, less memory.
            *self.shared.engine.borrow_mut() = Some(engine);
            return true;
        }
        match crate::load_rules(&bytes) {
            Ok(engine) => {
                info!(
                    "rules loaded ({} bytes) for root context {}",
                    bytes.len(),
                    self.context_id
                );
                // Counters must exist before the first request: compare-and-swap cannot guard
                // the creation of a key, so two workers admitting at once could both win.
                for key in engine.counter_keys() {
                    if matches!(hostcalls::get_shared_data(&key), Ok((None, _)) | Err(_)) {
                        if let Err(status) =
                            hostcalls::set_shared_data(&key, Some(&0u32.to_le_bytes()), None)
                        {
                            warn!("shared counter {key}: {status:?}");
                        }
                    }
                }
                let engine = Rc::new(engine);
                LOADED.with(|l| *l.borrow_mut() = Some((bytes, Rc::downgrade(&engine))));
                *self.shared.engine.borrow_mut() = Some(engine);
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
                After::Resume => hostcalls::resume_http_request(),
                After::Reply(reply) => send_reply(reply),
                After::Retry => {
                    self.send_retry(d.context_id, now);
                    Ok(())
                }
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
            retry: None,
            body: None,
        }))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        let port = self.l4_port?;
        Some(Box::new(crate::stream::FilterStream {
            context_id,
            port,
            engine: self.shared.engine.borrow().clone(),
            seed: self.shared.draw(context_id).0,
            ticket: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.l4_port.is_some() {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }
}

impl Context for FilterRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        let Some(context_id) = self.shared.retry_calls.borrow_mut().remove(&token) else {
            return;
        };
        let answer = (headers > 0).then(|| {
            let headers = self.get_http_call_response_headers();
            let status = headers
                .iter()
                .find(|(k, _)| k == ":status")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(502);
            Answer {
                status,
                headers,
                body: self
                    .get_http_call_response_body(0, body_size)
                    .unwrap_or_default(),
            }
        });
        let end = call_end(answer.as_ref());
        let now = now_ms();
        let again = {
            let mut retries = self.shared.retries.borrow_mut();
            let Some(run) = retries.get_mut(&context_id) else {
                return;
            };
            if let Some(t) = run.active.take() {
                run.engine.release(t);
                shared::report_attempt(&run.engine, t, end.outlier_result(), now);
            }
            give_back_budget(run);
            if answer.is_some() {
                run.last = answer;
            }
            run.should_retry(end, now)
        };
        if again {
            schedule_backoff(&self.shared, context_id, now);
        } else {
            self.finish_retries(context_id);
        }
    }
}

impl FilterRoot {
    /// Sends the next try of a request to an endpoint not tried yet (when one is left).
    fn send_retry(&self, context_id: u32, now: u64) {
        let sent = {
            let mut retries = self.shared.retries.borrow_mut();
            let Some(run) = retries.get_mut(&context_id) else {
                return;
            };
            let remaining = run.deadline_ms.map(|d| d.saturating_sub(now));
            let engine = Rc::clone(&run.engine);
            let picked = if remaining == Some(0) {
                None
            } else {
                let mut rng = self.shared.draw(context_id);
                let state = SharedEndpointState { now_ms: now };
                let picked = engine.retry_pick(
                    &run.tried,
                    run.avoid_previous,
                    &run.view(),
                    &mut rng,
                    &state,
                );
                self.shared.rng.set(rng.0);
                picked
            };
            // The retry circuit breaker: no place free, no retry (Envoy's retry overflow).
            let budget_ok = picked.is_some()
                && run
                    .retry_budget
                    .as_ref()
                    .is_none_or(|(key, limit)| shared::add(key, 1, *limit));
            run.holds_budget = budget_ok && run.retry_budget.is_some();
            match picked {
                None => None,
                Some((_, ticket)) if !budget_ok => {
                    engine.release(ticket);
                    None
                }
                Some((endpoint, ticket)) => {
                    let timeout = match (run.per_try_ms, remaining) {
                        (Some(p), Some(r)) => Duration::from_millis(p.min(r)),
                        (p, r) => p.or(r).map_or(UNBOUNDED_TRY, Duration::from_millis),
                    };
                    let attempt = (run.retries_done + 2).to_string();
                    let mut headers: Vec<(&str, &str)> = run
                        .headers
                        .iter()
                        .filter(|(k, _)| k != "x-envoy-attempt-count")
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    headers.push((ENDPOINT_HEADER, &endpoint));
                    headers.push(("x-envoy-attempt-count", &attempt));
                    let body = run.body.as_deref().filter(|b| !b.is_empty());
                    match self.dispatch_http_call(&run.cluster, headers, body, vec![], timeout) {
                        Ok(token) => {
                            run.retries_left -= 1;
                            run.retries_done += 1;
                            run.tried.push(ticket);
                            run.active = Some(ticket);
                            Some(token)
                        }
                        Err(status) => {
                            warn!("retry to {} not sent: {status:?}", run.cluster);
                            engine.release(ticket);
                            None
                        }
                    }
                }
            }
        };
        match sent {
            Some(token) => {
                self.shared
                    .retry_calls
                    .borrow_mut()
                    .insert(token, context_id);
            }
            None => self.finish_retries(context_id),
        }
    }

    /// Gives the client the last try's answer: the held first response, or a side call's.
    fn finish_retries(&self, context_id: u32) {
        let Some(mut run) = self.shared.retries.borrow_mut().remove(&context_id) else {
            return;
        };
        if let Some(t) = run.active.take() {
            run.engine.release(t);
        }
        give_back_budget(&mut run);
        if hostcalls::set_effective_context(context_id).is_err() {
            return;
        }
        let result = match run.last {
            None => hostcalls::resume_http_response(),
            Some(answer) => {
                let mut headers: Vec<(String, String)> = answer
                    .headers
                    .into_iter()
                    .filter(|(k, _)| {
                        !k.starts_with(':')
                            && !matches!(
                                k.as_str(),
                                "content-length" | "transfer-encoding" | "connection"
                            )
                    })
                    .collect();
                for (op, name, value) in &run.response_edits {
                    match op {
                        EditOp::Set => {
                            headers.retain(|(k, _)| k != name);
                            headers.push((name.clone(), value.clone()));
                        }
                        EditOp::Add => headers.push((name.clone(), value.clone())),
                        EditOp::Remove => headers.retain(|(k, _)| k != name),
                    }
                }
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                hostcalls::send_http_response(
                    answer.status,
                    headers,
                    (!answer.body.is_empty()).then_some(answer.body.as_slice()),
                )
            }
        };
        if let Err(status) = result {
            warn!("answering after retries failed: {status:?}");
        }
    }
}

/// Frees the retry circuit-breaker place the try in flight held.
fn give_back_budget(run: &mut RetryRun) {
    if std::mem::take(&mut run.holds_budget) {
        if let Some((key, _)) = &run.retry_budget {
            shared::add(key, -1, u32::MAX);
        }
    }
}

/// Queues the next try of `context_id` after Envoy's jittered back-off.
fn schedule_backoff(shared: &Shared, context_id: u32, now: u64) {
    let wait = {
        let retries = shared.retries.borrow();
        let Some(run) = retries.get(&context_id) else {
            return;
        };
        let mut rng = shared.draw(context_id ^ run.retries_done);
        let wait = backoff_ms(run.backoff_base_ms, run.retries_done + 1, &mut rng);
        shared.rng.set(rng.0);
        wait
    };
    shared.delays.borrow_mut().push(Delayed {
        context_id,
        due_ms: now + wait,
        then: After::Retry,
    });
    schedule_tick(shared, now);
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
}

/// The request body as it streams by, kept for mirrors and retries up to a bound.
struct BodyCopy {
    bytes: Vec<u8>,
    too_big: bool,
}

struct FilterHttp {
    context_id: u32,
    shared: Rc<Shared>,
    engine: Option<Rc<Engine>>,
    response_edits: Vec<(EditOp, String, String)>,
    mirror: Option<PendingMirror>,
    /// The endpoint the first try holds, for LEAST_REQUEST and outlier detection.
    ticket: Option<Ticket>,
    /// Shared-data key of the circuit-breaker counter this request was admitted under.
    admitted: Option<String>,
    /// Retries the filter runs for this request, until the first try's response.
    retry: Option<RetryRun>,
    /// The request body copied for mirrors and retries (`None`: nobody needs it).
    body: Option<BodyCopy>,
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
        let now = now_ms();
        let mut rng = self.shared.draw(self.context_id);
        let state = SharedEndpointState { now_ms: now };
        let decision = engine.decide_with(&view, &mut rng, &state);
        self.shared.rng.set(rng.0);

        let delay_ms = decision.delay_ms;
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
                self.response_edits = f
                    .response_edits
                    .iter()
                    .map(|e| (e.op, e.name.to_string(), e.value.to_string()))
                    .collect();
                // The filter runs the retries when it chose the endpoint, so that they go
                // to other endpoints; otherwise the host's router retries.
                let owned_retry = match (f.retry, f.retry_on, f.ticket) {
                    (Some(policy), Some(on), Some(_)) if policy.num_retries > 0 => {
                        Some(RetryRun::new(
                            Rc::clone(&engine),
                            policy,
                            on,
                            f.cluster.to_string(),
                            f.timeout_ms,
                            f.max_retries,
                            // A fault delay is not part of the route timeout.
                            now + delay_ms.unwrap_or(0),
                        ))
                    }
                    _ => None,
                };
                let timeout = match &owned_retry {
                    Some(run) => run.first_try_timeout_ms(f.timeout_ms),
                    None => f.timeout_ms,
                };
                if let Some(t) = timeout {
                    self.set_http_request_header(
                        "x-envoy-upstream-rq-timeout-ms",
                        Some(&t.to_string()),
                    );
                }
                if let (None, Some(r)) = (&owned_retry, f.retry) {
                    self.set_retry_headers(r);
                }
                let needs_copy = owned_retry.is_some() || !f.mirrors.is_empty();
                if needs_copy {
                    self.body = Some(BodyCopy {
                        bytes: Vec::new(),
                        too_big: false,
                    });
                }
                // The request as sent upstream, for the tries and mirrors that resend it:
                // the headers read above with the same edits, without asking the host again.
                let original_path = f.path.as_ref().map(|_| path.to_owned());
                let mut sent = if needs_copy { headers } else { Vec::new() };
                if needs_copy {
                    if let (Some(new_path), Some(old)) = (&f.path, original_path) {
                        set_header(&mut sent, "x-envoy-original-path", &old);
                        set_header(&mut sent, ":path", new_path);
                    }
                    if let Some(a) = f.authority {
                        set_header(&mut sent, ":authority", a);
                    }
                    for e in &f.request_edits {
                        match e.op {
                            EditOp::Set => set_header(&mut sent, &e.name, &e.value),
                            EditOp::Add => sent.push((e.name.to_string(), e.value.to_string())),
                            EditOp::Remove => sent.retain(|(k, _)| k != &e.name),
                        }
                    }
                }
                if let Some(mut run) = owned_retry {
                    if f.mirrors.is_empty() {
                        run.headers = std::mem::take(&mut sent);
                    } else {
                        run.headers.clone_from(&sent);
                    }
                    if end_of_stream {
                        run.body = Some(Vec::new());
                    }
                    self.retry = Some(run);
                }
                if !f.mirrors.is_empty() {
                    let pending = PendingMirror {
                        headers: sent,
                        targets: f
                            .mirrors
                            .into_iter()
                            .map(|m| (m.cluster.into_owned(), m.endpoint))
                            .collect(),
                    };
                    if end_of_stream {
                        self.dispatch_mirrors(&pending, &[]);
                    } else {
                        self.mirror = Some(pending);
                    }
                }
                None
            }
        };
        match (decision.delay_ms, then) {
            (Some(ms), then) => {
                self.shared.delays.borrow_mut().push(Delayed {
                    context_id: self.context_id,
                    due_ms: now + ms,
                    then: then.map_or(After::Resume, After::Reply),
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
        let Some(copy) = self.body.as_mut() else {
            return Action::Continue;
        };
        if !copy.too_big {
            if copy.bytes.len() + body_size > BODY_COPY_LIMIT {
                copy.too_big = true;
                copy.bytes = Vec::new();
            } else if let Some(chunk) =
                hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
            {
                copy.bytes.extend_from_slice(&chunk);
            }
        }
        if !end_of_stream {
            return Action::Continue;
        }
        let Some(copy) = self.body.take() else {
            return Action::Continue;
        };
        if copy.too_big {
            warn!("request body above {BODY_COPY_LIMIT} bytes: not mirrored, not retried");
            self.mirror = None;
            return Action::Continue;
        }
        if let Some(pending) = self.mirror.take() {
            self.dispatch_mirrors(&pending, &copy.bytes);
        }
        if let Some(run) = self.retry.as_mut() {
            run.body = Some(copy.bytes);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        // How the try ended matters only to retries and outlier detection: reading it costs
        // host calls, so requests with neither skip it.
        let tracked = match (self.ticket, &self.engine) {
            (Some(t), Some(engine)) => engine.tracks_outliers(t),
            _ => false,
        };
        if !tracked && self.retry.is_none() {
            self.apply_response_edits();
            return Action::Continue;
        }
        let end = self.first_try_end();
        let now = now_ms();
        if let (true, Some(t), Some(engine)) = (tracked, self.ticket, &self.engine) {
            shared::report_attempt(engine, t, end.outlier_result(), now);
        }
        if let Some(mut run) = self.retry.take() {
            if run.should_retry(end, now) {
                // Hold this response; the next try goes out after the back-off. The edits go
                // with it: they apply to whichever answer the client finally gets.
                if let (Some(t), Some(engine)) = (self.ticket.take(), &self.engine) {
                    engine.release(t);
                    run.tried.push(t);
                }
                run.response_edits = std::mem::take(&mut self.response_edits);
                self.shared
                    .retries
                    .borrow_mut()
                    .insert(self.context_id, run);
                schedule_backoff(&self.shared, self.context_id, now);
                return Action::Pause;
            }
        }
        self.apply_response_edits();
        Action::Continue
    }

    fn on_http_response_body(&mut self, _: usize, _: bool) -> Action {
        // A held response stays held (and buffered) until the retries decide.
        if self.shared.retries.borrow().contains_key(&self.context_id) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_log(&mut self) {
        if let (Some(t), Some(engine)) = (self.ticket.take(), &self.engine) {
            engine.release(t);
        }
        if let Some(mut run) = self.shared.retries.borrow_mut().remove(&self.context_id) {
            if let Some(t) = run.active.take() {
                run.engine.release(t);
            }
            give_back_budget(&mut run);
        }
        if let Some(key) = self.admitted.take() {
            shared::add(&key, -1, u32::MAX);
        }
        // A stream that ends while delayed must not be resumed later.
        self.shared
            .delays
            .borrow_mut()
            .retain(|d| d.context_id != self.context_id);
    }
}

impl FilterHttp {
    fn apply_response_edits(&self) {
        for (op, name, value) in &self.response_edits {
            match op {
                EditOp::Set => self.set_http_response_header(name, Some(value)),
                EditOp::Add => self.add_http_response_header(name, value),
                EditOp::Remove => self.set_http_response_header(name, None),
            }
        }
    }

    /// Circuit breaker: takes a place among the cluster's concurrent requests, if one is free.
    fn admit(&mut self, cluster: &str, max_active: Option<u32>) -> bool {
        let Some(limit) = max_active else {
            return true;
        };
        let key = Engine::active_key(cluster);
        if !shared::add(&key, 1, limit) {
            return false;
        }
        self.admitted = Some(key);
        true
    }

    /// How the first try ended: the upstream's status, or a failure the host's router
    /// answered for (Envoy's response flags).
    fn first_try_end(&self) -> meshroute_core::engine::AttemptEnd {
        let status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // Each look-up is a host call: only those that can change the verdict. The router's
        // own failures answer 503 or 504; gRPC statuses come from HTTP/2 upstreams.
        let flags = if matches!(status, 503 | 504) {
            self.get_property(vec!["response", "flags"])
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_le_bytes)
        } else {
            0
        };
        let grpc_matters = match (&self.retry, self.ticket, &self.engine) {
            (Some(run), Some(t), Some(engine)) => run.on.watches_grpc() && engine.upstream_h2(t),
            _ => false,
        };
        let grpc = if grpc_matters {
            self.get_http_response_header("grpc-status")
                .and_then(|s| s.parse().ok())
        } else {
            None
        };
        first_try_end(status, flags, grpc)
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

    fn dispatch_mirrors(&self, pending: &PendingMirror, body: &[u8]) {
        let body = (!body.is_empty()).then_some(body);
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

/// Replaces every value of `name` with `value`.
fn set_header(headers: &mut Vec<(String, String)>, name: &str, value: &str) {
    headers.retain(|(k, _)| k != name);
    headers.push((name.to_owned(), value.to_owned()));
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
