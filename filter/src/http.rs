//! The HTTP context: the request headers become a [`RequestView`], the engine decides, and the
//! [`Decision`](meshroute_core::engine::Decision) is applied through the host contract
//! (control headers, local replies, timers for fault delays, side calls for mirrors and for
//! the retries the filter runs itself).

use std::rc::Rc;
use std::time::Duration;

use log::{debug, error, warn};
use proxy_wasm::types::{Action, Status};

use meshroute_core::contract::{self, ENDPOINT_HEADER, LISTENER_PORT_HEADER, ORIGINAL_PATH_HEADER};
use meshroute_core::engine::{
    first_try_end, split_host_port, AttemptEnd, EditOp, Engine, Forward, Outcome, Reply,
    RequestView, RetryRun, Ticket,
};
use meshroute_core::ir::ProxyKind;
use meshroute_core::telemetry;

use crate::host::{u64_property, Host};
use crate::metrics::Noted;
use crate::root::{After, Retrying, Shared};
use crate::shared::{self, SharedEndpointState};

/// Request bodies above this are neither mirrored nor retried (Envoy's buffer limit for
/// shadows and retries is of the same order).
pub const BODY_COPY_LIMIT: usize = 1 << 20;
/// Mirror calls that take longer are abandoned; the client never waits for them.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

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

pub struct FilterHttp<H> {
    context_id: u32,
    shared: Rc<Shared<H>>,
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
    /// What the metrics need of the request, when the filter keeps them.
    noted: Option<Noted>,
}

/// Somewhere request headers can be edited: the host's map, or a copy of it.
trait HeaderEditor {
    fn set(&mut self, name: &str, value: Option<&str>);
    fn add(&mut self, name: &str, value: &str);
}

impl HeaderEditor for Vec<(String, String)> {
    fn set(&mut self, name: &str, value: Option<&str>) {
        self.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.push((name.to_owned(), v.to_owned()));
        }
    }
    fn add(&mut self, name: &str, value: &str) {
        self.push((name.to_owned(), value.to_owned()));
    }
}

/// The host's request headers.
struct RequestHeaders<'h, H>(&'h H);

impl<H: Host> HeaderEditor for RequestHeaders<'_, H> {
    fn set(&mut self, name: &str, value: Option<&str>) {
        self.0.set_request_header(name, value);
    }
    fn add(&mut self, name: &str, value: &str) {
        self.0.add_request_header(name, value);
    }
}

/// The request edits of a forward decision: path and authority rewrites, then the header
/// operations in order. Applied once to the host and, when the request is sent again
/// (retries, mirrors), once to the copy that is resent.
fn apply_request_edits(to: &mut impl HeaderEditor, f: &Forward<'_>, original_path: Option<&str>) {
    if let Some(new_path) = &f.path {
        to.set(ORIGINAL_PATH_HEADER, original_path);
        to.set(":path", Some(new_path));
    }
    if let Some(a) = f.authority {
        to.set(":authority", Some(a));
    }
    for e in &f.request_edits {
        match e.op {
            EditOp::Set => to.set(&e.name, Some(&e.value)),
            EditOp::Add => to.add(&e.name, &e.value),
            EditOp::Remove => to.set(&e.name, None),
        }
    }
}

/// Sends a local reply (as gRPC when the reply carries a gRPC status).
pub(crate) fn send_reply(host: &impl Host, reply: &Reply) -> Result<(), Status> {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match reply.grpc_status {
        Some(code) => {
            let headers: Vec<(&str, &str)> = headers
                .into_iter()
                .filter(|(k, _)| *k != "content-type")
                .collect();
            host.send_grpc_reply(code, "fault filter abort", &headers)
        }
        None => host.send_http_reply(
            u32::from(reply.status),
            &headers,
            (!reply.body.is_empty()).then_some(reply.body.as_slice()),
        ),
    }
}

/// The port whose route table serves the request, from the host's trusted header stage;
/// inside Istio (no such stage) the connection's destination port, which is the listener's.
fn listener_port(host: &impl Host, headers: &[(String, String)]) -> Option<u16> {
    headers
        .iter()
        .find(|(k, _)| k == LISTENER_PORT_HEADER)
        .and_then(|(_, v)| v.parse().ok())
        .or_else(|| {
            u64_property(host, &["destination", "port"]).and_then(|p| u16::try_from(p).ok())
        })
}

impl<H: Host> FilterHttp<H> {
    pub(crate) fn new(context_id: u32, shared: Rc<Shared<H>>, engine: Option<Rc<Engine>>) -> Self {
        Self {
            context_id,
            shared,
            engine,
            response_edits: Vec::new(),
            mirror: None,
            ticket: None,
            admitted: None,
            retry: None,
            body: None,
            noted: None,
        }
    }

    fn host(&self) -> &H {
        &self.shared.host
    }

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(engine) = self.engine.clone() else {
            error!("no rules loaded; refusing request");
            let _ = send_reply(
                self.host(),
                &Reply {
                    status: 503,
                    headers: vec![("content-type".into(), "text/plain".into())],
                    body: b"meshroute: no rules loaded".to_vec(),
                    grpc_status: None,
                    flag: None,
                    details: "meshroute_not_configured",
                },
            );
            return Action::Pause;
        };
        let mut headers = self.host().request_headers();
        let listener_port = listener_port(self.host(), &headers);
        // Client copies of control headers never steer anything.
        let mut i = 0;
        while i < headers.len() {
            if contract::is_control_header(&headers[i].0) {
                let (name, _) = headers.swap_remove(i);
                self.host().set_request_header(&name, None);
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
        let port = engine.route_port(authority, scheme, listener_port);
        // `ip:port` as Envoy encodes `source.address`; hashing uses the IP.
        let source = if engine.uses_source_ip() {
            self.host()
                .property(&["source", "address"])
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
            transparent: engine.kind() == ProxyKind::Sidecar
                && listener_port.is_some_and(|p| p != contract::EXPLICIT_PROXY_PORT),
        };
        let now = self.host().now_ms();
        let mut rng = self.shared.draw(self.context_id);
        let state = SharedEndpointState {
            host: self.host(),
            now_ms: now,
        };
        let decision = engine.decide_with(&view, &mut rng, &state);
        self.shared.rng.set(rng.0);
        if let Some(name) = decision.route.filter(|n| !n.is_empty()) {
            let path = [contract::ROUTE_NAME_PROPERTY];
            if let Err(status) = self.host().set_property(&path, name.as_bytes()) {
                debug!("route name not kept: {status:?}");
            }
        }
        if log::log_enabled!(log::Level::Debug) {
            match &decision.outcome {
                Outcome::Forward(f) => debug!(
                    "request {}: {method} {authority}{path} → {}",
                    self.context_id, f.cluster
                ),
                Outcome::Reply(r) => debug!(
                    "request {}: {method} {authority}{path} → reply {}",
                    self.context_id, r.status
                ),
            }
        }

        if self.shared.metrics.borrow().is_some() {
            let content_type = headers
                .iter()
                .find(|(k, _)| k == "content-type")
                .map(|(_, v)| v.as_bytes());
            self.noted = Some(Noted {
                cluster: String::new(),
                protocol: telemetry::request_protocol(content_type),
            });
        }
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
                let start = now + delay_ms.unwrap_or(0);
                // Only a rewrite needs the original path (`x-envoy-original-path`).
                let original_path = f.path.as_ref().map(|_| path.to_owned());
                self.forward(f, headers, original_path.as_deref(), end_of_stream, start);
                None
            }
        };
        match (delay_ms, then) {
            (Some(ms), then) => {
                self.shared.delay(
                    self.context_id,
                    now + ms,
                    then.map_or(After::Resume, After::Reply),
                    now,
                );
                Action::Pause
            }
            (None, Some(reply)) => {
                if let Err(status) = send_reply(self.host(), &reply) {
                    error!("local reply failed: {status:?}");
                }
                Action::Pause
            }
            (None, None) => Action::Continue,
        }
    }

    /// Applies a forward decision: the contract headers, the request edits, and what the
    /// retries and mirrors of the request need. `start_ms` is when the request goes on
    /// (after a fault delay, which is not part of the route timeout).
    fn forward(
        &mut self,
        f: Forward<'_>,
        headers: Vec<(String, String)>,
        original_path: Option<&str>,
        end_of_stream: bool,
        start_ms: u64,
    ) {
        self.ticket = f.ticket;
        if let Some(noted) = self.noted.as_mut() {
            noted.cluster = f.cluster.to_string();
        }
        // The filter runs the retries when it chose the endpoint, so that they go to other
        // endpoints; otherwise the host's router retries.
        let owned_retry = match (f.retry, f.retry_on, f.ticket) {
            (Some(policy), Some(on), Some(_)) if policy.num_retries > 0 => Some(RetryRun::new(
                policy,
                on,
                f.cluster.to_string(),
                f.timeout_ms,
                f.max_retries,
                start_ms,
            )),
            _ => None,
        };
        let directive = contract::Forward {
            cluster: f.cluster.to_string(),
            endpoint: f.endpoint.clone(),
            timeout_ms: match &owned_retry {
                Some(run) => run.first_try_timeout_ms(f.timeout_ms),
                None => f.timeout_ms,
            },
            per_try_timeout_ms: f
                .retry
                .filter(|r| owned_retry.is_none() && r.num_retries > 0)
                .and_then(|r| r.per_try_timeout_ms),
            retry: f
                .retry
                .filter(|r| owned_retry.is_none() && r.num_retries > 0)
                .map(|r| contract::RouterRetry {
                    num_retries: r.num_retries,
                    retry_on: r.retry_on.clone(),
                    retriable_status_codes: r.retriable_status_codes.clone(),
                }),
        };
        for (name, value) in contract::encode(&directive) {
            self.host().set_request_header(name, Some(&value));
        }
        apply_request_edits(&mut RequestHeaders(self.host()), &f, original_path);
        self.response_edits = f
            .response_edits
            .iter()
            .map(|e| (e.op, e.name.to_string(), e.value.to_string()))
            .collect();
        let needs_copy = owned_retry.is_some() || !f.mirrors.is_empty();
        if !needs_copy {
            return;
        }
        self.body = Some(BodyCopy {
            bytes: Vec::new(),
            too_big: false,
        });
        // The request as sent upstream, for the tries and mirrors that resend it: the
        // headers read before with the same edits, without asking the host again.
        let mut sent = headers;
        apply_request_edits(&mut sent, &f, original_path);
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
    }

    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(copy) = self.body.as_mut() else {
            return Action::Continue;
        };
        if !copy.too_big {
            if copy.bytes.len() + body_size > BODY_COPY_LIMIT {
                copy.too_big = true;
                copy.bytes = Vec::new();
            } else if let Some(chunk) = self.shared.host.request_body(body_size) {
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

    pub fn on_response_headers(&mut self) -> Action {
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
        let now = self.host().now_ms();
        if let (true, Some(t), Some(engine)) = (tracked, self.ticket, &self.engine) {
            shared::report_attempt(self.host(), engine, t, end.outlier_result(), now);
        }
        if let (Some(mut run), Some(engine)) = (self.retry.take(), self.engine.clone()) {
            if run.should_retry(end, now) {
                // Hold this response; the next try goes out after the back-off. The edits go
                // with it: they apply to whichever answer the client finally gets.
                if let Some(t) = self.ticket.take() {
                    engine.release(t);
                    run.tried.push(t);
                }
                run.response_edits = std::mem::take(&mut self.response_edits);
                self.shared
                    .retries
                    .borrow_mut()
                    .insert(self.context_id, Retrying { run, engine });
                self.shared.schedule_backoff(self.context_id, now);
                return Action::Pause;
            }
        }
        self.apply_response_edits();
        Action::Continue
    }

    pub fn on_response_body(&mut self) -> Action {
        // A held response stays held (and buffered) until the retries decide.
        if self.shared.retries.borrow().contains_key(&self.context_id) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    pub fn on_log(&mut self) {
        let metrics = self.shared.metrics.borrow().clone();
        if let (Some(m), Some(noted), Some(engine)) = (metrics, self.noted.take(), &self.engine) {
            m.record(self.host(), engine, &noted);
        }
        if let (Some(t), Some(engine)) = (self.ticket.take(), &self.engine) {
            engine.release(t);
        }
        if let Some(Retrying { mut run, engine }) =
            self.shared.retries.borrow_mut().remove(&self.context_id)
        {
            if let Some(t) = run.active.take() {
                engine.release(t);
            }
            self.shared.give_back_budget(&mut run);
        }
        if let Some(key) = self.admitted.take() {
            shared::add(self.host(), &key, -1, u32::MAX);
        }
        // A stream that ends while delayed must not be resumed later.
        self.shared
            .delays
            .borrow_mut()
            .retain(|d| d.context_id != self.context_id);
    }

    fn apply_response_edits(&self) {
        for (op, name, value) in &self.response_edits {
            match op {
                EditOp::Set => self.host().set_response_header(name, Some(value)),
                EditOp::Add => self.host().add_response_header(name, value),
                EditOp::Remove => self.host().set_response_header(name, None),
            }
        }
    }

    /// Circuit breaker: takes a place among the cluster's concurrent requests, if one is free.
    fn admit(&mut self, cluster: &str, max_active: Option<u32>) -> bool {
        let Some(limit) = max_active else {
            return true;
        };
        let key = Engine::active_key(cluster);
        if !shared::add(self.host(), &key, 1, limit) {
            return false;
        }
        self.admitted = Some(key);
        true
    }

    /// How the first try ended: the upstream's status, or a failure the host's router
    /// answered for (Envoy's response flags).
    fn first_try_end(&self) -> AttemptEnd {
        let host = self.host();
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // Each look-up is a host call: only those that can change the verdict. The router's
        // own failures answer 503 or 504; gRPC statuses come from HTTP/2 upstreams.
        let flags = if matches!(status, 503 | 504) {
            u64_property(host, &["response", "flags"]).unwrap_or(0)
        } else {
            0
        };
        let grpc_matters = match (&self.retry, self.ticket, &self.engine) {
            (Some(run), Some(t), Some(engine)) => run.on.watches_grpc() && engine.upstream_h2(t),
            _ => false,
        };
        let grpc = if grpc_matters {
            host.response_header("grpc-status")
                .and_then(|s| s.parse().ok())
        } else {
            None
        };
        first_try_end(status, flags, grpc)
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
            if let Err(status) = self
                .host()
                .dispatch(cluster, &headers, body, MIRROR_TIMEOUT)
            {
                warn!("mirror to {cluster} not sent: {status:?}");
            }
        }
    }
}
