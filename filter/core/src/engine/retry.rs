//! Envoy's retry conditions (`retryOn`) and back-off, for retries the filter runs itself.

use super::health::AttemptResult;
use super::Rng;

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
/// wait below `base × 2^(retry-1)`, the ceiling capped at 10 × base.
pub fn backoff_ms(base_ms: u64, retry: u32, rng: &mut dyn Rng) -> u64 {
    let base = base_ms.max(1);
    let ceiling = base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(base.saturating_mul(10));
    rng.below(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SplitMix64;

    fn response(status: u16) -> AttemptEnd {
        AttemptEnd::Response {
            status,
            grpc_status: None,
        }
    }

    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
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

    #[cfg_attr(not(target_arch = "wasm32"), test)]
    #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
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
}
