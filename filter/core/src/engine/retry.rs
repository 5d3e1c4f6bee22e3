//! Envoy's retry conditions (`retryOn`), back-off, and the tries the filter runs itself.
//!
//! When the filter chose the endpoint, it runs the route's retries so that a retry reaches
//! another endpoint (Istio's `previous_hosts`) on every host: the first try goes through the
//! host's router; when it ends retriably the response is held, and each further try is a side
//! call to an endpoint the balancer picks among those not tried yet. The last try's answer is
//! what the client gets. [`RetryRun`] is that state machine; the filter drives it with host
//! calls.

use super::health::AttemptResult;
use super::{EditOp, Engine, RequestView, Rng, Ticket};
use crate::contract::{
    ResponseFlag, RouterReply, ATTEMPT_COUNT_HEADER, BACKOFF_MAX_FACTOR, DEFAULT_BACKOFF_BASE_MS,
};
use crate::ir::RetryPolicy;

/// How one attempt ended, as a proxy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The upstream answered (`grpc_status` from the response headers, if any).
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// No connection (refused, unreachable, connect timeout).
    ConnectFailure,
    /// The connection or stream broke before a response.
    Reset,
    /// The per-try (or route) timeout expired.
    Timeout,
}

impl AttemptEnd {
    /// What outlier detection counts for this attempt.
    pub fn outlier_result(self) -> AttemptResult {
        match self {
            Self::Response { status, .. } => AttemptResult::Status(status),
            Self::ConnectFailure | Self::Reset => AttemptResult::LocalOrigin { timeout: false },
            Self::Timeout => AttemptResult::LocalOrigin { timeout: true },
        }
    }
}

/// The parsed `retryOn` conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    five_xx: bool,
    gateway_error: bool,
    connect_failure: bool,
    reset: bool,
    retriable_4xx: bool,
    codes: Vec<u16>,
    /// gRPC status codes named by `cancelled`, `deadline-exceeded`, ... tokens, one bit each.
    grpc: u32,
}

impl RetryOn {
    /// Reads Envoy's condition names; unknown ones (and those that need information a
    /// filter does not have, such as `refused-stream`) are ignored.
    pub fn parse<'a>(conditions: impl IntoIterator<Item = &'a str>, codes: &[u16]) -> Self {
        let mut on = Self::default();
        for c in conditions {
            match c.trim() {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" | "reset-before-request" => on.reset = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "retriable-status-codes" => on.codes = codes.to_vec(),
                "cancelled" => on.grpc |= 1 << 1,
                "deadline-exceeded" => on.grpc |= 1 << 4,
                "resource-exhausted" => on.grpc |= 1 << 8,
                "internal" => on.grpc |= 1 << 13,
                "unavailable" => on.grpc |= 1 << 14,
                _ => {}
            }
        }
        on
    }

    /// Whether any gRPC status condition is set.
    pub fn watches_grpc(&self) -> bool {
        self.grpc != 0
    }

    /// Whether an attempt that ended so may be retried. Status codes count only for real
    /// upstream answers; a connect failure, reset or per-try timeout is covered by `5xx`,
    /// `gateway-error` and `reset` as in Envoy.
    pub fn retriable(&self, end: AttemptEnd) -> bool {
        match end {
            AttemptEnd::Response {
                status,
                grpc_status,
            } => {
                (self.five_xx && (500..600).contains(&status))
                    || (self.gateway_error && (502..=504).contains(&status))
                    || (self.retriable_4xx && status == 409)
                    || self.codes.contains(&status)
                    || grpc_status.is_some_and(|g| g < 32 && self.grpc & (1 << g) != 0)
            }
            AttemptEnd::Timeout => self.five_xx || self.gateway_error || self.reset,
            AttemptEnd::ConnectFailure => {
                self.connect_failure || self.five_xx || self.gateway_error || self.reset
            }
            AttemptEnd::Reset => self.reset || self.five_xx || self.gateway_error,
        }
    }
}

/// Envoy's jittered exponential back-off before retry number `retry` (1-based): a random
/// wait below `base × 2^(retry-1)`, the ceiling capped at [`BACKOFF_MAX_FACTOR`] × base.
pub fn backoff_ms(base_ms: u64, retry: u32, rng: &mut dyn Rng) -> u64 {
    let base = base_ms.max(1);
    let ceiling = base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(base.saturating_mul(BACKOFF_MAX_FACTOR));
    rng.below(ceiling)
}

/// A request whose tries the filter runs.
#[derive(Debug)]
pub struct RetryRun {
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RetryRun {
    pub fn new(
        policy: &RetryPolicy,
        on: &RetryOn,
        cluster: String,
        timeout_ms: Option<u64>,
        max_retries: Option<u32>,
        start_ms: u64,
    ) -> Self {
        let retry_budget = max_retries.map(|n| (Engine::retries_key(&cluster), n));
        Self {
            on: on.clone(),
            retries_left: policy.num_retries,
            per_try_ms: policy.per_try_timeout_ms,
            backoff_base_ms: policy.backoff_base_ms.unwrap_or(DEFAULT_BACKOFF_BASE_MS),
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

    /// Time left before the route timeout (`None`: no route timeout).
    pub fn remaining_ms(&self, now_ms: u64) -> Option<u64> {
        self.deadline_ms.map(|d| d.saturating_sub(now_ms))
    }

    /// The timeout of the next try (`None`: unbounded): the per-try timeout within what is
    /// left of the route timeout.
    pub fn next_try_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        match (self.per_try_ms, self.remaining_ms(now_ms)) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        }
    }

    /// The headers of the next try, to endpoint `endpoint` (the attempt count is Envoy's,
    /// 1-based, the first try being 1).
    pub fn next_try_headers<'a>(
        &'a self,
        endpoint_header: (&'a str, &'a str),
        attempt: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter(|(k, _)| k != ATTEMPT_COUNT_HEADER)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        headers.push(endpoint_header);
        headers.push((ATTEMPT_COUNT_HEADER, attempt));
        headers
    }

    /// Books a try sent to `ticket`'s endpoint.
    pub fn sent(&mut self, ticket: Ticket) {
        self.retries_left -= 1;
        self.retries_done += 1;
        self.tried.push(ticket);
        self.active = Some(ticket);
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
            transparent: false,
        }
    }

    /// The final answer's headers: the side call's, without pseudo-headers and framing,
    /// with the route's response edits applied.
    pub fn answer_headers(&self, answer: &Answer) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = answer
            .headers
            .iter()
            .filter(|(k, _)| {
                !k.starts_with(':')
                    && !matches!(
                        k.as_str(),
                        "content-length" | "transfer-encoding" | "connection"
                    )
            })
            .cloned()
            .collect();
        for (op, name, value) in &self.response_edits {
            match op {
                EditOp::Set => {
                    headers.retain(|(k, _)| k != name);
                    headers.push((name.clone(), value.clone()));
                }
                EditOp::Add => headers.push((name.clone(), value.clone())),
                EditOp::Remove => headers.retain(|(k, _)| k != name),
            }
        }
        headers
    }
}

/// How the host's router ended the first try, from the response status, its flags and the
/// gRPC status header.
pub fn first_try_end(status: u16, flags: u64, grpc_status: Option<u32>) -> AttemptEnd {
    let has = |f: ResponseFlag| flags & f.bit() != 0;
    if has(ResponseFlag::UpstreamConnectionFailure) {
        AttemptEnd::ConnectFailure
    } else if has(ResponseFlag::UpstreamRequestTimeout) {
        AttemptEnd::Timeout
    } else if has(ResponseFlag::LocalReset)
        || has(ResponseFlag::UpstreamRemoteReset)
        || has(ResponseFlag::UpstreamConnectionTermination)
    {
        AttemptEnd::Reset
    } else {
        AttemptEnd::Response {
            status,
            grpc_status,
        }
    }
}

/// How a side call ended (`None`: no response at all). A side call carries no response
/// flags, so the router's own answers are recognised by their fixed bodies.
pub fn call_end(answer: Option<&Answer>) -> AttemptEnd {
    let Some(a) = answer else {
        return AttemptEnd::Reset;
    };
    let status = u16::try_from(a.status).unwrap_or(0);
    match RouterReply::recognise(status, &a.body) {
        Some(RouterReply::Timeout) => AttemptEnd::Timeout,
        Some(
            RouterReply::ConnectFailure
            | RouterReply::ConnectRefused
            | RouterReply::ConnectTimeout
            | RouterReply::TlsWrongVersion
            | RouterReply::TlsFailure
            | RouterReply::TlsVerifyFailure,
        ) => AttemptEnd::ConnectFailure,
        Some(RouterReply::Reset | RouterReply::Overflow) => AttemptEnd::Reset,
        _ => AttemptEnd::Response {
            status,
            grpc_status: a
                .headers
                .iter()
                .find(|(k, _)| k == "grpc-status")
                .and_then(|(_, v)| v.parse().ok()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SplitMix64;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn response(status: u16) -> AttemptEnd {
        AttemptEnd::Response {
            status,
            grpc_status: None,
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn conditions_follow_envoy() {
        let default = RetryOn::parse(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                .split(','),
            &[],
        );
        assert!(default.retriable(AttemptEnd::ConnectFailure));
        assert!(!default.retriable(response(503)));
        assert!(!default.retriable(AttemptEnd::Timeout));
        assert!(default.retriable(AttemptEnd::Response {
            status: 200,
            grpc_status: Some(14)
        }));
        let gw = RetryOn::parse(["gateway-error"], &[]);
        assert!(gw.retriable(response(502)) && !gw.retriable(response(500)));
        assert!(gw.retriable(AttemptEnd::Timeout) && gw.retriable(AttemptEnd::Reset));
        let codes = RetryOn::parse(["retriable-status-codes"], &[418]);
        assert!(codes.retriable(response(418)) && !codes.retriable(response(500)));
        let c4 = RetryOn::parse(["retriable-4xx"], &[]);
        assert!(c4.retriable(response(409)) && !c4.retriable(response(404)));
        assert!(!RetryOn::parse(["5xx"], &[]).retriable(response(404)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn backoff_is_jittered_doubling_and_capped() {
        let mut rng = SplitMix64(3);
        for retry in 1..12 {
            let ceiling = (25u64 << (retry - 1)).min(250);
            let waits: Vec<u64> = (0..200).map(|_| backoff_ms(25, retry, &mut rng)).collect();
            assert!(waits.iter().all(|&w| w < ceiling), "{retry}: {waits:?}");
            assert!(
                waits.iter().any(|&w| w >= ceiling / 2),
                "{retry}: {waits:?}"
            );
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn router_failures_are_told_apart_by_flags_and_bodies() {
        let bit = |r: RouterReply| r.flag().bit();
        assert_eq!(
            first_try_end(503, bit(RouterReply::ConnectFailure), None),
            AttemptEnd::ConnectFailure
        );
        assert_eq!(
            first_try_end(504, bit(RouterReply::Timeout), None),
            AttemptEnd::Timeout
        );
        assert_eq!(
            first_try_end(503, bit(RouterReply::Reset), None),
            AttemptEnd::Reset
        );
        assert_eq!(first_try_end(503, 0, None), response(503));
        let answer = |r: RouterReply| Answer {
            status: u32::from(r.status()),
            headers: vec![],
            body: r.body().as_bytes().to_vec(),
        };
        for (reply, end) in [
            (RouterReply::ConnectFailure, AttemptEnd::ConnectFailure),
            (RouterReply::ConnectTimeout, AttemptEnd::ConnectFailure),
            (RouterReply::TlsVerifyFailure, AttemptEnd::ConnectFailure),
            (RouterReply::Timeout, AttemptEnd::Timeout),
            (RouterReply::Reset, AttemptEnd::Reset),
            (RouterReply::Overflow, AttemptEnd::Reset),
            (RouterReply::NoHealthyUpstream, response(503)),
        ] {
            assert_eq!(call_end(Some(&answer(reply))), end, "{reply:?}");
        }
        assert_eq!(call_end(None), AttemptEnd::Reset);
        let grpc = Answer {
            status: 200,
            headers: vec![("grpc-status".into(), "14".into())],
            body: vec![],
        };
        assert_eq!(
            call_end(Some(&grpc)),
            AttemptEnd::Response {
                status: 200,
                grpc_status: Some(14)
            }
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_run_retries_within_its_budget_and_deadline() {
        let policy = RetryPolicy {
            num_retries: 2,
            per_try_timeout_ms: Some(300),
            retry_on: vec!["5xx".into()],
            retriable_status_codes: vec![],
            backoff_base_ms: None,
            avoid_previous_hosts: true,
            retry_remote_localities: false,
        };
        let on = RetryOn::parse(policy.retry_on.iter().map(String::as_str), &[]);
        let mut run = RetryRun::new(&policy, &on, "c".into(), Some(1000), None, 10_000);
        assert_eq!(run.backoff_base_ms, DEFAULT_BACKOFF_BASE_MS);
        assert_eq!(run.first_try_timeout_ms(Some(1000)), Some(300));
        assert!(
            !run.should_retry(response(503), 10_100),
            "no retry before the body is complete"
        );
        run.body = Some(Vec::new());
        assert!(run.should_retry(response(503), 10_100));
        assert!(!run.should_retry(response(404), 10_100));
        assert!(
            !run.should_retry(response(503), 11_000),
            "past the route timeout"
        );
        assert_eq!(run.next_try_timeout_ms(10_900), Some(100));
        let ticket = Ticket {
            cluster: 0,
            endpoint: 1,
        };
        run.sent(ticket);
        run.sent(ticket);
        assert!(!run.should_retry(response(503), 10_100), "attempts used up");
        assert_eq!(run.retries_done, 2);
        run.headers = vec![
            (ATTEMPT_COUNT_HEADER.into(), "1".into()),
            ("a".into(), "b".into()),
        ];
        assert_eq!(
            run.next_try_headers(("e", "1.2.3.4:80"), "3"),
            [("a", "b"), ("e", "1.2.3.4:80"), (ATTEMPT_COUNT_HEADER, "3")]
        );
        run.response_edits = vec![(EditOp::Set, "x".into(), "1".into())];
        let answer = Answer {
            status: 200,
            headers: vec![
                (":status".into(), "200".into()),
                ("content-length".into(), "2".into()),
                ("x".into(), "0".into()),
                ("y".into(), "2".into()),
            ],
            body: b"ok".to_vec(),
        };
        assert_eq!(
            run.answer_headers(&answer),
            [("y".to_string(), "2".to_string()), ("x".into(), "1".into())]
        );
    }
}
