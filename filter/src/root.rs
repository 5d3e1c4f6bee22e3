//! The root context: loads the rules, runs the timers (fault delays, retry back-offs) and the
//! retries' side calls, and creates the HTTP and connection contexts.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};

use meshroute_core::contract::{self, ENDPOINT_HEADER};
use meshroute_core::engine::{backoff_ms, call_end, Answer, Engine, Reply, RetryRun, SplitMix64};

use crate::host::{text_property, Host};
use crate::http::FilterHttp;
use crate::metrics::Metrics;
use crate::shared::{self, SharedEndpointState};
use crate::stream::FilterStream;

/// A retry without any timeout still needs one for the side call (Envoy requires it).
const UNBOUNDED_TRY: Duration = Duration::from_secs(3600);

/// What the root context shares with its HTTP contexts.
pub(crate) struct Shared<H> {
    pub host: H,
    pub engine: RefCell<Option<Rc<Engine>>>,
    pub rng: Cell<u64>,
    pub delays: RefCell<Vec<Delayed>>,
    /// Requests whose retries are under way, by HTTP context.
    pub retries: RefCell<HashMap<u32, Retrying>>,
    /// Side calls of retries, by token, to their HTTP context.
    pub retry_calls: RefCell<HashMap<u32, u32>>,
    /// Istio's standard metrics, when the node asks the filter to keep them.
    pub metrics: RefCell<Option<Rc<Metrics>>>,
}

/// A retry run with the rules it was decided under.
pub(crate) struct Retrying {
    pub run: RetryRun,
    pub engine: Rc<Engine>,
}

impl<H: Host> Shared<H> {
    pub fn draw(&self, salt: u32) -> SplitMix64 {
        SplitMix64(self.rng.get() ^ u64::from(salt))
    }

    /// Sets the tick to fire at the next due delay, or stops it.
    pub fn schedule_tick(&self, now: u64) {
        let next = self.delays.borrow().iter().map(|d| d.due_ms).min();
        let period = next.map_or(Duration::ZERO, |due| {
            Duration::from_millis(due.saturating_sub(now).max(1))
        });
        if let Err(status) = self.host.set_tick_period(period) {
            warn!("set_tick_period failed: {status:?}");
        }
    }

    /// Runs `then` for `context_id` at `due_ms`.
    pub fn delay(&self, context_id: u32, due_ms: u64, then: After, now: u64) {
        self.delays.borrow_mut().push(Delayed {
            context_id,
            due_ms,
            then,
        });
        self.schedule_tick(now);
    }

    /// Queues the next try of `context_id` after Envoy's jittered back-off.
    pub fn schedule_backoff(&self, context_id: u32, now: u64) {
        let wait = {
            let retries = self.retries.borrow();
            let Some(r) = retries.get(&context_id) else {
                return;
            };
            let mut rng = self.draw(context_id ^ r.run.retries_done);
            let wait = backoff_ms(r.run.backoff_base_ms, r.run.retries_done + 1, &mut rng);
            self.rng.set(rng.0);
            wait
        };
        self.delay(context_id, now + wait, After::Retry, now);
    }

    /// Frees the retry circuit-breaker place the try in flight held.
    pub fn give_back_budget(&self, run: &mut RetryRun) {
        if std::mem::take(&mut run.holds_budget) {
            if let Some((key, _)) = &run.retry_budget {
                shared::add(&self.host, key, -1, u32::MAX);
            }
        }
    }
}

/// A request waiting on a timer, and what to do when it fires.
pub(crate) struct Delayed {
    pub context_id: u32,
    pub due_ms: u64,
    pub then: After,
}

pub(crate) enum After {
    /// The fault delay is over: let the request go on.
    Resume,
    /// The fault delay is over: answer with the fault abort.
    Reply(Reply),
    /// The back-off is over: send the next try.
    Retry,
}

pub struct FilterRoot<H> {
    context_id: u32,
    shared: Rc<Shared<H>>,
    /// The listener port of a connection-level plugin (root id `meshroute_tcp_<port>`);
    /// `None` for the HTTP filter.
    l4_port: Option<u16>,
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

impl<H: Host + Clone> FilterRoot<H> {
    pub fn new(context_id: u32, host: H) -> Self {
        Self {
            context_id,
            shared: Rc::new(Shared {
                host,
                engine: RefCell::new(None),
                rng: Cell::new(u64::from(context_id).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                delays: RefCell::new(Vec::new()),
                retries: RefCell::new(HashMap::new()),
                retry_calls: RefCell::new(HashMap::new()),
                metrics: RefCell::new(None),
            }),
            l4_port: None,
        }
    }

    pub fn is_connection_plugin(&self) -> bool {
        self.l4_port.is_some()
    }

    /// Seeds per VM from the clock so workers do not draw the same sequence.
    pub fn vm_start(&mut self) -> bool {
        let seed = self.shared.host.now_nanos();
        self.shared.rng.set(seed ^ self.shared.rng.get());
        true
    }

    /// Loads the rules; a document that does not load leaves the previous rules in force.
    pub fn configure(&mut self) -> bool {
        let host = &self.shared.host;
        let root_id = text_property(host, &["plugin_root_id"]);
        match contract::l4_root_port(&root_id) {
            Some(Ok(port)) => self.l4_port = Some(port),
            Some(Err(())) => {
                error!(
                    "root id {root_id:?}: expected {}<listener port>",
                    contract::L4_ROOT_PREFIX
                );
                return false;
            }
            None => {}
        }
        let bytes = host.plugin_configuration();
        if let Some(engine) = shared_engine(&bytes) {
            // Another root context of this VM (the HTTP filter, another TCP listener) loaded
            // the same rules: one engine, one set of per-endpoint counts, less memory.
            self.use_engine(engine);
            return true;
        }
        match crate::load_rules(&bytes) {
            Ok(engine) => {
                info!(
                    "rules loaded ({} bytes) for root context {}",
                    bytes.len(),
                    self.context_id
                );
                shared::create_counters(host, &engine);
                let engine = Rc::new(engine);
                LOADED.with(|l| *l.borrow_mut() = Some((bytes, Rc::downgrade(&engine))));
                self.use_engine(engine);
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

    fn use_engine(&self, engine: Rc<Engine>) {
        let metrics = Metrics::from_node(&self.shared.host, &engine).map(Rc::new);
        *self.shared.metrics.borrow_mut() = metrics;
        *self.shared.engine.borrow_mut() = Some(engine);
    }

    /// Runs every timer that is due.
    pub fn tick(&mut self) {
        let host = &self.shared.host;
        let now = host.now_ms();
        let due: Vec<Delayed> = {
            let mut delays = self.shared.delays.borrow_mut();
            let (due, waiting) = delays.drain(..).partition(|d| d.due_ms <= now);
            *delays = waiting;
            due
        };
        for d in due {
            // The stream may be gone (client hung up); then there is nothing to resume.
            if host.set_effective_context(d.context_id).is_err() {
                continue;
            }
            let result = match &d.then {
                After::Resume => host.resume_request(),
                After::Reply(reply) => crate::http::send_reply(host, reply),
                After::Retry => {
                    self.send_retry(d.context_id, now);
                    Ok(())
                }
            };
            if let Err(status) = result {
                warn!("resuming delayed request failed: {status:?}");
            }
        }
        self.shared.schedule_tick(now);
    }

    pub fn http_context(&self, context_id: u32) -> FilterHttp<H> {
        FilterHttp::new(
            context_id,
            Rc::clone(&self.shared),
            self.shared.engine.borrow().clone(),
        )
    }

    pub fn stream_context(&self, context_id: u32) -> Option<FilterStream<H>> {
        let port = self.l4_port?;
        Some(FilterStream {
            context_id,
            port,
            host: self.shared.host.clone(),
            engine: self.shared.engine.borrow().clone(),
            seed: self.shared.draw(context_id).0,
            ticket: None,
            metrics: self.shared.metrics.borrow().clone(),
            cluster: None,
            received: 0,
            sent: 0,
        })
    }

    /// A retry's side call answered (`headers == 0`: it failed without a response).
    pub fn call_response(&mut self, token: u32, headers: usize, body_size: usize) {
        let Some(context_id) = self.shared.retry_calls.borrow_mut().remove(&token) else {
            return;
        };
        let host = &self.shared.host;
        let answer = (headers > 0).then(|| {
            let headers = host.call_response_headers();
            let status = headers
                .iter()
                .find(|(k, _)| k == ":status")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(502);
            Answer {
                status,
                headers,
                body: host.call_response_body(body_size),
            }
        });
        let end = call_end(answer.as_ref());
        let now = host.now_ms();
        let again = {
            let mut retries = self.shared.retries.borrow_mut();
            let Some(r) = retries.get_mut(&context_id) else {
                return;
            };
            if let Some(t) = r.run.active.take() {
                r.engine.release(t);
                shared::report_attempt(host, &r.engine, t, end.outlier_result(), now);
            }
            self.shared.give_back_budget(&mut r.run);
            if answer.is_some() {
                r.run.last = answer;
            }
            r.run.should_retry(end, now)
        };
        if again {
            self.shared.schedule_backoff(context_id, now);
        } else {
            self.finish_retries(context_id);
        }
    }

    /// Sends the next try of a request to an endpoint not tried yet (when one is left).
    fn send_retry(&self, context_id: u32, now: u64) {
        let host = &self.shared.host;
        let sent = {
            let mut retries = self.shared.retries.borrow_mut();
            let Some(Retrying { run, engine }) = retries.get_mut(&context_id) else {
                return;
            };
            let picked = if run.remaining_ms(now) == Some(0) {
                None
            } else {
                let mut rng = self.shared.draw(context_id);
                let state = SharedEndpointState { host, now_ms: now };
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
                    .is_none_or(|(key, limit)| shared::add(host, key, 1, *limit));
            run.holds_budget = budget_ok && run.retry_budget.is_some();
            match picked {
                None => None,
                Some((_, ticket)) if !budget_ok => {
                    engine.release(ticket);
                    None
                }
                Some((endpoint, ticket)) => {
                    let timeout = run
                        .next_try_timeout_ms(now)
                        .map_or(UNBOUNDED_TRY, Duration::from_millis);
                    let attempt = (run.retries_done + 2).to_string();
                    let headers = run.next_try_headers((ENDPOINT_HEADER, &endpoint), &attempt);
                    let body = run.body.as_deref().filter(|b| !b.is_empty());
                    match host.dispatch(&run.cluster, &headers, body, timeout) {
                        Ok(token) => {
                            run.sent(ticket);
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
        let host = &self.shared.host;
        let Some(Retrying { mut run, engine }) =
            self.shared.retries.borrow_mut().remove(&context_id)
        else {
            return;
        };
        if let Some(t) = run.active.take() {
            engine.release(t);
        }
        self.shared.give_back_budget(&mut run);
        if host.set_effective_context(context_id).is_err() {
            return;
        }
        let result = match &run.last {
            None => host.resume_response(),
            Some(answer) => {
                let headers = run.answer_headers(answer);
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                host.send_http_reply(
                    answer.status,
                    &headers,
                    (!answer.body.is_empty()).then_some(answer.body.as_slice()),
                )
            }
        };
        if let Err(status) = result {
            warn!("answering after retries failed: {status:?}");
        }
    }
}
