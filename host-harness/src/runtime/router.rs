//! Envoy's router, as the filter's contract asks for it: the cluster and endpoint it named,
//! its timeouts and retries; and the side calls the filter makes (mirrors, its own retries).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;

use meshroute_core::contract::{
    self, RouterReply, ATTEMPT_COUNT_HEADER, CLUSTER_HEADER, DEFAULT_BACKOFF_BASE_MS,
    EXPECTED_TIMEOUT_HEADER, INTERNAL_HEADER, TIMEOUT_HEADER,
};
use meshroute_core::engine::{backoff_ms, RetryOn, SplitMix64};

use meshroute_wasm_host::abi::{self, Headers, LocalReply};

use meshroute_core::engine::AttemptEnd;
use tokio::time::Instant;

use super::generation::{ClusterInfo, Generation};
use super::http::header_pairs;
use super::http::random_seed;
use super::{body, local, upstream, Body, Proxy};

/// A side call (`proxy_http_call`) through the same cluster logic as requests.
pub(super) async fn side_call(
    proxy: &Proxy,
    generation: &Generation,
    call: &abi::PendingCall,
) -> abi::CallResponse {
    let mut headers = call.headers.clone();
    headers.push((CLUSTER_HEADER.to_owned(), call.cluster.clone()));
    headers.push((INTERNAL_HEADER.into(), "true".into()));
    let timeout = call.timeout.map(|t| t.as_millis().to_string());
    if let Some(t) = &timeout {
        headers.push((TIMEOUT_HEADER.into(), t.clone()));
    }
    let body = body::RequestBody::Buffered(Bytes::from(call.body.clone()));
    match forward(proxy, generation, headers, body, false).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let mut out: Headers = vec![(":status".into(), status.to_string())];
            out.extend(header_pairs(resp.headers()));
            let body = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(_) => Vec::new(),
            };
            abi::CallResponse { headers: out, body }
        }
        Err(reply) => abi::CallResponse {
            headers: vec![
                (":status".into(), reply.status().to_string()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: reply.body().as_bytes().to_vec(),
        },
    }
}

pub(super) fn router_local(r: RouterReply) -> LocalReply {
    local(r.status(), r.body())
}

/// Executes the host contract: cluster header, endpoint header, timeout and retry headers.
/// `count_attempts` sends `x-envoy-attempt-count` (requests; Envoy's side calls have none).
pub(super) async fn forward(
    proxy: &Proxy,
    generation: &Generation,
    mut headers: Headers,
    body: body::RequestBody,
    count_attempts: bool,
) -> Result<Response<Body>, RouterReply> {
    let directive = contract::decode(&mut headers)?;
    let cluster = generation
        .clusters
        .get(&directive.cluster)
        .ok_or(RouterReply::NoCluster)?;
    let endpoint = cluster
        .endpoint(directive.endpoint.clone())
        .ok_or(RouterReply::NoHealthyUpstream)?;
    let mut policy = Attempts::new(&directive, SplitMix64(random_seed()));
    if let Some(t) = policy.expected_timeout() {
        headers.push((EXPECTED_TIMEOUT_HEADER.into(), t.as_millis().to_string()));
    }
    let mut upstream = ToEndpoint {
        proxy,
        cluster,
        endpoint,
        headers,
        body,
        count_attempts,
    };
    match run(&mut policy, &mut upstream).await {
        upstream::Attempt::Response(mut r) => {
            r.extensions_mut().insert(UpstreamHost(upstream.endpoint));
            Ok(match policy.deadline {
                Some(deadline) => r.map(|b| body::until(b, deadline)),
                None => r,
            })
        }
        upstream::Attempt::Timeout => Err(RouterReply::Timeout),
        upstream::Attempt::ConnectFailure => Err(RouterReply::ConnectFailure),
        upstream::Attempt::ConnectRefused => Err(RouterReply::ConnectRefused),
        upstream::Attempt::ConnectTimeout => Err(RouterReply::ConnectTimeout),
        upstream::Attempt::TlsFailure(reason) if reason.contains("CERTIFICATE_VERIFY_FAILED") => {
            Err(RouterReply::TlsVerifyFailure)
        }
        // A plaintext endpoint: what rustls calls a corrupt record, BoringSSL a wrong version.
        upstream::Attempt::TlsFailure(reason)
            if reason.contains("InvalidContentType")
                || reason.contains("UnknownProtocolVersion") =>
        {
            Err(RouterReply::TlsWrongVersion)
        }
        upstream::Attempt::TlsFailure(_) => Err(RouterReply::TlsFailure),
        upstream::Attempt::Reset => Err(RouterReply::Reset),
    }
}

/// The endpoint that answered a response (Envoy's `%UPSTREAM_HOST%`), in its extensions.
#[derive(Clone)]
pub(super) struct UpstreamHost(pub String);

/// Where the router sends each attempt of a request.
pub(super) trait Upstream {
    /// Attempt number `number` (1-based), which must end within `timeout` when one is given.
    async fn attempt(&mut self, number: u64, timeout: Option<Duration>) -> upstream::Attempt;
    /// Whether the request can be sent again (a streamed body cannot).
    fn replayable(&self) -> bool;
}

/// The router's timing and retries for one request, as Envoy's router runs them: a route
/// timeout over every attempt, a per-try timeout within it, and retries with jittered
/// back-off while the conditions, the count and the time allow.
pub(super) struct Attempts {
    per_try: Option<Duration>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    max_retries: u64,
    on: RetryOn,
    retries: u64,
    rng: SplitMix64,
}

impl Attempts {
    pub(super) fn new(directive: &contract::Forward, rng: SplitMix64) -> Self {
        let timeout = directive.timeout_ms.map(Duration::from_millis);
        let (max_retries, on) = match &directive.retry {
            Some(r) => (
                u64::from(r.num_retries),
                RetryOn::parse(
                    r.retry_on.iter().map(String::as_str),
                    &r.retriable_status_codes,
                ),
            ),
            None => (0, RetryOn::default()),
        };
        Self {
            per_try: directive.per_try_timeout_ms.map(Duration::from_millis),
            timeout,
            deadline: timeout.map(|t| Instant::now() + t),
            max_retries,
            on,
            retries: 0,
            rng,
        }
    }

    /// What the upstream is told it has (`x-envoy-expected-rq-timeout-ms`).
    pub(super) fn expected_timeout(&self) -> Option<Duration> {
        self.per_try.or(self.timeout)
    }

    /// The time the next attempt has: the per-try timeout within what is left.
    fn attempt_timeout(&self) -> Option<Duration> {
        let remaining = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        match (self.per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        }
    }

    /// After an attempt ended so: the back-off before the next one, or `None` when it
    /// stands (not retriable, retries used up, out of time, body not replayable).
    fn retry_after(&mut self, end: AttemptEnd, replayable: bool) -> Option<Duration> {
        let out_of_time = self.deadline.is_some_and(|d| Instant::now() >= d);
        if !(self.on.retriable(end)
            && self.retries < self.max_retries
            && !out_of_time
            && replayable)
        {
            return None;
        }
        self.retries += 1;
        let wait = backoff_ms(
            DEFAULT_BACKOFF_BASE_MS,
            u32::try_from(self.retries).unwrap_or(u32::MAX),
            &mut self.rng,
        );
        Some(Duration::from_millis(wait))
    }
}

/// Runs the attempts of one request; the last attempt's outcome is the request's.
pub(super) async fn run(policy: &mut Attempts, upstream: &mut impl Upstream) -> upstream::Attempt {
    let mut number = 1;
    loop {
        let result = upstream.attempt(number, policy.attempt_timeout()).await;
        match policy.retry_after(result.end(), upstream.replayable()) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                number += 1;
            }
            None => return result,
        }
    }
}

/// A cluster's endpoint through the upstream connection pools.
struct ToEndpoint<'a> {
    proxy: &'a Proxy,
    cluster: &'a ClusterInfo,
    endpoint: String,
    headers: Headers,
    body: body::RequestBody,
    count_attempts: bool,
}

impl Upstream for ToEndpoint<'_> {
    async fn attempt(&mut self, number: u64, timeout: Option<Duration>) -> upstream::Attempt {
        if self.count_attempts {
            // Istio turns on Envoy's include_request_attempt_count.
            self.headers.retain(|(k, _)| k != ATTEMPT_COUNT_HEADER);
            self.headers
                .push((ATTEMPT_COUNT_HEADER.into(), number.to_string()));
        }
        let started = Instant::now();
        let permit = match &self.cluster.connections {
            None => None,
            Some(pool) => {
                let wait = Arc::clone(pool).acquire_owned();
                match timeout {
                    None => wait.await.ok(),
                    Some(t) => match tokio::time::timeout(t, wait).await {
                        Ok(p) => p.ok(),
                        // Still queued when the time is up: Envoy's 504.
                        Err(_) => return upstream::Attempt::Timeout,
                    },
                }
            }
        };
        let result = self
            .proxy
            .client
            .send(
                &self.endpoint,
                &self.headers,
                self.body.for_attempt(),
                &self.cluster.pool,
                self.cluster.h2,
                self.cluster.tls.as_ref(),
                timeout.map(|t| t.saturating_sub(started.elapsed())),
            )
            .await;
        // The connection stays taken until the response body is read.
        match (result, permit) {
            (upstream::Attempt::Response(r), Some(p)) => {
                upstream::Attempt::Response(r.map(|b| body::holding(b, p)))
            }
            (other, _) => other,
        }
    }

    fn replayable(&self) -> bool {
        self.body.replayable()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::collections::VecDeque;

    use super::*;
    use crate::runtime::full;

    /// An upstream that answers each attempt with the next scripted status, or never
    /// (`None`): then the attempt ends when its timeout does.
    struct Scripted {
        answers: VecDeque<Option<u16>>,
        attempts: Vec<(u64, Option<Duration>, Duration)>,
        replayable: bool,
        start: Instant,
    }

    impl Scripted {
        fn new(answers: &[Option<u16>]) -> Self {
            Self {
                answers: answers.iter().copied().collect(),
                attempts: Vec::new(),
                replayable: true,
                start: Instant::now(),
            }
        }
    }

    impl Upstream for Scripted {
        async fn attempt(&mut self, number: u64, timeout: Option<Duration>) -> upstream::Attempt {
            self.attempts.push((number, timeout, self.start.elapsed()));
            match self.answers.pop_front().flatten() {
                Some(status) => upstream::Attempt::Response(
                    Response::builder()
                        .status(status)
                        .body(full(Vec::new()))
                        .unwrap(),
                ),
                None => match timeout {
                    Some(t) => {
                        tokio::time::sleep(t).await;
                        upstream::Attempt::Timeout
                    }
                    None => std::future::pending().await,
                },
            }
        }

        fn replayable(&self) -> bool {
            self.replayable
        }
    }

    fn directive(timeout: Option<u64>, per_try: Option<u64>, retries: u32, on: &str) -> Attempts {
        Attempts::new(
            &contract::Forward {
                cluster: "c".into(),
                endpoint: None,
                timeout_ms: timeout,
                per_try_timeout_ms: per_try,
                retry: (retries > 0).then(|| contract::RouterRetry {
                    num_retries: retries,
                    retry_on: on.split(',').map(str::to_owned).collect(),
                    retriable_status_codes: vec![],
                }),
            },
            SplitMix64(7),
        )
    }

    fn status(a: &upstream::Attempt) -> Option<u16> {
        match a {
            upstream::Attempt::Response(r) => Some(r.status().as_u16()),
            _ => None,
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn per_try_timeouts_are_retried_until_the_retries_are_used_up() {
        let mut up = Scripted::new(&[None, None, None]);
        let mut policy = directive(None, Some(200), 2, "5xx");
        let start = Instant::now();
        let result = run(&mut policy, &mut up).await;
        assert!(matches!(result, upstream::Attempt::Timeout));
        let numbers: Vec<u64> = up.attempts.iter().map(|a| a.0).collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(up
            .attempts
            .iter()
            .all(|a| a.1 == Some(Duration::from_millis(200))));
        // Three tries of 200 ms, and back-offs below 25 and 50 ms between them.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(600) && elapsed < Duration::from_millis(675),
            "{elapsed:?}"
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_route_timeout_bounds_every_try_together() {
        let mut up = Scripted::new(&[None, None, None, None, None, None]);
        let mut policy = directive(Some(500), Some(200), 5, "5xx");
        let start = Instant::now();
        let result = run(&mut policy, &mut up).await;
        assert!(matches!(result, upstream::Attempt::Timeout));
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(575),
            "{elapsed:?}"
        );
        // The last try gets only what is left of the route timeout.
        let (_, last_timeout, began) = *up.attempts.last().unwrap();
        assert_eq!(
            last_timeout.unwrap(),
            Duration::from_millis(500).saturating_sub(began)
        );
        assert!(up.attempts.len() <= 3, "{:?}", up.attempts);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn retries_follow_the_conditions_and_the_body() {
        // A 503 under `5xx`: retried, and the second answer stands.
        let mut up = Scripted::new(&[Some(503), Some(200)]);
        let result = run(&mut directive(None, None, 2, "5xx"), &mut up).await;
        assert_eq!(status(&result), Some(200));
        assert_eq!(up.attempts.len(), 2);
        // Not a condition: the first answer stands.
        let mut up = Scripted::new(&[Some(503), Some(200)]);
        let result = run(&mut directive(None, None, 2, "connect-failure"), &mut up).await;
        assert_eq!(status(&result), Some(503));
        assert_eq!(up.attempts.len(), 1);
        // A body that streamed through cannot be sent again.
        let mut up = Scripted::new(&[Some(503), Some(200)]);
        up.replayable = false;
        let result = run(&mut directive(None, None, 2, "5xx"), &mut up).await;
        assert_eq!(status(&result), Some(503));
        // No policy: one try.
        let mut up = Scripted::new(&[Some(503), Some(200)]);
        let result = run(&mut directive(None, None, 0, ""), &mut up).await;
        assert_eq!(status(&result), Some(503));
        assert_eq!(up.attempts.len(), 1);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_upstream_is_told_the_time_it_has() {
        assert_eq!(
            directive(Some(1000), Some(300), 1, "5xx").expected_timeout(),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            directive(Some(1000), None, 0, "").expected_timeout(),
            Some(Duration::from_millis(1000))
        );
        assert_eq!(directive(None, None, 0, "").expected_timeout(), None);
    }
}
