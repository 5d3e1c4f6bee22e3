//! Envoy's router, as the filter's contract asks for it: the cluster and endpoint it named,
//! its timeouts and retries; and the side calls the filter makes (mirrors, its own retries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;

use meshroute_core::contract::{
    self, RouterReply, ATTEMPT_COUNT_HEADER, CLUSTER_HEADER, DEFAULT_BACKOFF_BASE_MS,
    EXPECTED_TIMEOUT_HEADER, INTERNAL_HEADER, TIMEOUT_HEADER,
};
use meshroute_core::engine::{backoff_ms, RetryOn, SplitMix64};

use meshroute_wasm_host::abi::{self, Headers, LocalReply};

use super::generation::Generation;
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
    mut body: body::RequestBody,
    count_attempts: bool,
) -> Result<Response<Body>, RouterReply> {
    let directive = contract::decode(&mut headers)?;
    let cluster = generation
        .clusters
        .get(&directive.cluster)
        .ok_or(RouterReply::NoCluster)?;
    let endpoint = cluster
        .endpoint(directive.endpoint)
        .ok_or(RouterReply::NoHealthyUpstream)?;
    let timeout = directive.timeout_ms.map(Duration::from_millis);
    let per_try = directive.per_try_timeout_ms.map(Duration::from_millis);
    let (max_retries, policy) = match &directive.retry {
        Some(r) => (
            u64::from(r.num_retries),
            RetryOn::parse(
                r.retry_on.iter().map(String::as_str),
                &r.retriable_status_codes,
            ),
        ),
        None => (0, RetryOn::default()),
    };
    if let Some(t) = per_try.or(timeout) {
        headers.push((EXPECTED_TIMEOUT_HEADER.into(), t.as_millis().to_string()));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut rng = SplitMix64(random_seed());
    let mut attempt = 0;
    loop {
        if count_attempts {
            // Istio turns on Envoy's include_request_attempt_count.
            headers.retain(|(k, _)| k != ATTEMPT_COUNT_HEADER);
            headers.push((ATTEMPT_COUNT_HEADER.into(), (attempt + 1).to_string()));
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let attempt_timeout = match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        let started = Instant::now();
        let permit = match &cluster.connections {
            None => None,
            Some(pool) => {
                let wait = Arc::clone(pool).acquire_owned();
                match attempt_timeout {
                    None => wait.await.ok(),
                    Some(t) => match tokio::time::timeout(t, wait).await {
                        Ok(p) => p.ok(),
                        // Still queued when the time is up: Envoy's 504.
                        Err(_) => return Err(RouterReply::Timeout),
                    },
                }
            }
        };
        let result = proxy
            .client
            .send(
                &endpoint,
                &headers,
                body.for_attempt(),
                cluster.connect_timeout,
                cluster.h2,
                cluster.tls.as_ref(),
                attempt_timeout.map(|t| t.saturating_sub(started.elapsed())),
            )
            .await;
        // The connection stays taken until the response body is read.
        let result = match (result, permit) {
            (upstream::Attempt::Response(r), Some(p)) => {
                upstream::Attempt::Response(r.map(|b| body::holding(b, p)))
            }
            (other, _) => other,
        };
        let retriable = policy.retriable(result.end());
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        // A streamed body was consumed by the first attempt and cannot be resent.
        if retriable && attempt < max_retries && !out_of_time && body.replayable() {
            attempt += 1;
            let wait = backoff_ms(
                DEFAULT_BACKOFF_BASE_MS,
                u32::try_from(attempt).unwrap_or(u32::MAX),
                &mut rng,
            );
            tokio::time::sleep(Duration::from_millis(wait)).await;
            continue;
        }
        return match result {
            upstream::Attempt::Response(r) => Ok(r),
            upstream::Attempt::Timeout => Err(RouterReply::Timeout),
            upstream::Attempt::ConnectFailure => Err(RouterReply::ConnectFailure),
            upstream::Attempt::TlsFailure(reason)
                if reason.contains("CERTIFICATE_VERIFY_FAILED") =>
            {
                Err(RouterReply::TlsVerifyFailure)
            }
            upstream::Attempt::TlsFailure(_) => Err(RouterReply::TlsFailure),
            upstream::Attempt::Reset => Err(RouterReply::Reset),
        };
    }
}
