//! Retries the filter runs itself, so that a retry reaches another endpoint (Istio's
//! `previous_hosts`) on every host: the first try goes through the host's router; when it
//! ends retriably the response is held, and each further try is a side call to an endpoint
//! the balancer picks among those not tried yet. The last try's answer is what the client
//! gets.

use std::rc::Rc;

use meshroute_core::engine::{AttemptEnd, EditOp, Engine, RequestView, RetryOn, Ticket};
use meshroute_core::ir::RetryPolicy;

/// Envoy's default back-off base.
const DEFAULT_BACKOFF_MS: u64 = 25;
/// Envoy's legacy response-flag bits: UT, LR | UR | UC, UF.
const FLAG_TIMEOUT: u64 = 0x4;
const FLAGS_RESET: u64 = 0x8 | 0x10 | 0x40;
const FLAG_CONNECT_FAILURE: u64 = 0x20;

/// A request whose tries the filter runs.
pub struct RetryRun {
    pub engine: Rc<Engine>,
    pub on: RetryOn,
    pub retries_left: u32,
    pub per_try_ms: Option<u64>,
    pub backoff_base_ms: u64,
    pub avoid_previous: bool,
    pub cluster: String,
    /// The request as the first try sent it, without control headers.
    pub headers: Vec<(String, String)>,
    /// The request body, once complete; `None` while streaming or when above the bound
    /// (such a request is not retried, as in Envoy).
    pub body: Option<Vec<u8>>,
    /// Endpoints tried so far, oldest first.
    pub tried: Vec<Ticket>,
    /// The try in flight (a side call), which holds its endpoint.
    pub active: Option<Ticket>,
    /// When the route timeout ends every try.
    pub deadline_ms: Option<u64>,
    pub retries_done: u32,
    /// The latest side call's answer; `None` while the first try's response is the answer.
    pub last: Option<Answer>,
    pub response_edits: Vec<(EditOp, String, String)>,
    /// Shared counter of the cluster's retries in flight and its limit (`http.maxRetries`).
    pub retry_budget: Option<(String, u32)>,
    /// Whether the try in flight holds a place in that counter.
    pub holds_budget: bool,
}

/// A try's response as the client would get it.
pub struct Answer {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RetryRun {
    pub fn new(
        engine: Rc<Engine>,
        policy: &RetryPolicy,
        on: &RetryOn,
        cluster: String,
        timeout_ms: Option<u64>,
        max_retries: Option<u32>,
        start_ms: u64,
    ) -> Self {
        let retry_budget = max_retries.map(|n| (Engine::retries_key(&cluster), n));
        Self {
            engine,
            on: on.clone(),
            retries_left: policy.num_retries,
            per_try_ms: policy.per_try_timeout_ms,
            backoff_base_ms: policy.backoff_base_ms.unwrap_or(DEFAULT_BACKOFF_MS),
            avoid_previous: policy.avoid_previous_hosts,
            cluster,
            headers: Vec::new(),
            body: None,
            tried: Vec::new(),
            active: None,
            deadline_ms: timeout_ms.map(|t| start_ms + t),
            retries_done: 0,
            last: None,
            response_edits: Vec::new(),
            retry_budget,
            holds_budget: false,
        }
    }

    /// The timeout of the first try: the per-try timeout within the route timeout.
    pub fn first_try_timeout_ms(&self, timeout_ms: Option<u64>) -> Option<u64> {
        match (self.per_try_ms, timeout_ms) {
            (Some(p), Some(t)) => Some(p.min(t)),
            (p, t) => p.or(t),
        }
    }

    /// Whether a try that ended so is followed by another.
    pub fn should_retry(&self, end: AttemptEnd, now_ms: u64) -> bool {
        self.retries_left > 0
            && self.body.is_some()
            && self.deadline_ms.is_none_or(|d| now_ms < d)
            && self.on.retriable(end)
    }

    /// The request as a view for the balancer (hash keys read headers and the query).
    pub fn view(&self) -> RequestView<'_> {
        let get = |name: &str| {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        RequestView {
            method: get(":method"),
            scheme: get(":scheme"),
            authority: get(":authority"),
            path: get(":path"),
            port: 0,
            headers: &self.headers,
            source_ip: None,
        }
    }
}

/// How the host's router ended the first try, from the response status, its flags and the
/// gRPC status header.
pub fn first_try_end(status: u16, flags: u64, grpc_status: Option<u32>) -> AttemptEnd {
    if flags & FLAG_CONNECT_FAILURE != 0 {
        AttemptEnd::ConnectFailure
    } else if flags & FLAG_TIMEOUT != 0 {
        AttemptEnd::Timeout
    } else if flags & FLAGS_RESET != 0 {
        AttemptEnd::Reset
    } else {
        AttemptEnd::Response {
            status,
            grpc_status,
        }
    }
}

/// How a side call ended. A side call carries no response flags, so the router's own
/// answers are recognised by their fixed bodies (Envoy's texts, which the harness uses too).
pub fn call_end(answer: Option<&Answer>) -> AttemptEnd {
    let Some(a) = answer else {
        return AttemptEnd::Reset;
    };
    let body = String::from_utf8_lossy(&a.body);
    if a.status == 504 && body == "upstream request timeout" {
        return AttemptEnd::Timeout;
    }
    if a.status == 503 {
        if let Some(reason) =
            body.strip_prefix("upstream connect error or disconnect/reset before headers.")
        {
            return if reason.contains("connection failure")
                || reason.contains("remote_connection_failure")
                || reason.contains("connect_error")
            {
                AttemptEnd::ConnectFailure
            } else {
                AttemptEnd::Reset
            };
        }
    }
    let grpc_status = a
        .headers
        .iter()
        .find(|(k, _)| k == "grpc-status")
        .and_then(|(_, v)| v.parse().ok());
    AttemptEnd::Response {
        status: u16::try_from(a.status).unwrap_or(0),
        grpc_status,
    }
}
