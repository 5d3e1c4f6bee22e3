//! Outlier detection: Envoy's consecutive-error ejection, as a pure state machine over a
//! compact record that the filter keeps in shared data (one record per cluster, so every
//! worker sees the same ejections and a pick reads one key).

use crate::ir::OutlierDetection;

/// Envoy's default cap on one ejection (`max_ejection_time`); a longer base time wins.
const MAX_EJECTION_MS: u64 = 300_000;

/// What one attempt to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// The upstream answered with this status.
    Status(u16),
    /// The proxy could not get an answer: connect failure, reset, timeout. Envoy maps these
    /// to 503 (failure, reset) and 504 (timeout) when errors are not split.
    LocalOrigin { timeout: bool },
}

/// Per-endpoint counters and ejection state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Times ejected, decayed by one per `interval` spent healthy (Envoy's multiplier).
    ejections: u32,
    /// When the current ejection began; 0 when not ejected.
    ejected_at: u64,
    /// When the endpoint last came back (for decaying `ejections`).
    returned_at: u64,
}

const ENDPOINT_BYTES: usize = 4 * 4 + 8 * 2;

/// Outlier state of one cluster's endpoints, in endpoint order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierRecord {
    fingerprint: u64,
    endpoints: Vec<EndpointHealth>,
}

impl OutlierRecord {
    /// Decodes a stored record; a missing, damaged or stale one (the endpoint list changed,
    /// so `fingerprint` differs) starts fresh, as Envoy forgets removed hosts.
    pub fn decode(bytes: Option<&[u8]>, fingerprint: u64, endpoints: usize) -> Self {
        let fresh = || Self {
            fingerprint,
            endpoints: vec![EndpointHealth::default(); endpoints],
        };
        let Some(bytes) = bytes else {
            return fresh();
        };
        if bytes.len() != 8 + endpoints * ENDPOINT_BYTES || le_u64(&bytes[..8]) != fingerprint {
            return fresh();
        }
        let endpoints = bytes[8..]
            .chunks_exact(ENDPOINT_BYTES)
            .map(|c| EndpointHealth {
                consecutive_5xx: le_u32(&c[0..4]),
                consecutive_gateway: le_u32(&c[4..8]),
                consecutive_local: le_u32(&c[8..12]),
                ejections: le_u32(&c[12..16]),
                ejected_at: le_u64(&c[16..24]),
                returned_at: le_u64(&c[24..32]),
            })
            .collect();
        Self {
            fingerprint,
            endpoints,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.endpoints.len() * ENDPOINT_BYTES);
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        for e in &self.endpoints {
            out.extend_from_slice(&e.consecutive_5xx.to_le_bytes());
            out.extend_from_slice(&e.consecutive_gateway.to_le_bytes());
            out.extend_from_slice(&e.consecutive_local.to_le_bytes());
            out.extend_from_slice(&e.ejections.to_le_bytes());
            out.extend_from_slice(&e.ejected_at.to_le_bytes());
            out.extend_from_slice(&e.returned_at.to_le_bytes());
        }
        out
    }

    /// Whether endpoint `i` is out of rotation at `now_ms`.
    pub fn is_ejected(&self, i: usize, cfg: &OutlierDetection, now_ms: u64) -> bool {
        self.endpoints
            .get(i)
            .is_some_and(|e| e.ejected_at != 0 && now_ms < e.ejected_at + ejection_ms(e, cfg))
    }

    /// When endpoint `i` comes back, if it is ejected.
    pub fn ejected_until(&self, i: usize, cfg: &OutlierDetection, now_ms: u64) -> Option<u64> {
        self.is_ejected(i, cfg, now_ms).then(|| {
            let e = &self.endpoints[i];
            e.ejected_at + ejection_ms(e, cfg)
        })
    }

    /// Counts one attempt's result against endpoint `i`; ejects it when a consecutive-error
    /// threshold is reached and `maxEjectionPercent` allows. Returns whether it was ejected.
    pub fn observe(
        &mut self,
        i: usize,
        result: AttemptResult,
        cfg: &OutlierDetection,
        now_ms: u64,
    ) -> bool {
        self.return_expired(cfg, now_ms);
        let Some(e) = self.endpoints.get_mut(i) else {
            return false;
        };
        // With split errors, local-origin failures have their own counter and do not touch
        // the 5xx ones; otherwise they count as the 503/504 Envoy would answer for them.
        let status = match result {
            AttemptResult::Status(s) => {
                if cfg.split_external_local_origin_errors {
                    // An answer means the connection worked.
                    e.consecutive_local = 0;
                }
                s
            }
            AttemptResult::LocalOrigin { timeout } => {
                if cfg.split_external_local_origin_errors {
                    e.consecutive_local += 1;
                    // The compiler writes Istio's defaults; absent means disabled.
                    let threshold = cfg.consecutive_local_origin_failures.unwrap_or(0);
                    return threshold > 0
                        && e.consecutive_local >= threshold
                        && self.eject(i, cfg, now_ms);
                }
                if timeout {
                    504
                } else {
                    503
                }
            }
        };
        if !(500..600).contains(&status) {
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            return false;
        }
        e.consecutive_5xx += 1;
        if matches!(status, 502..=504) {
            e.consecutive_gateway += 1;
        } else {
            e.consecutive_gateway = 0;
        }
        let five = cfg.consecutive_5xx.unwrap_or(0);
        let gateway = cfg.consecutive_gateway_errors.unwrap_or(0);
        let reached = (five > 0 && e.consecutive_5xx >= five)
            || (gateway > 0 && e.consecutive_gateway >= gateway);
        reached && self.eject(i, cfg, now_ms)
    }

    /// Brings back endpoints whose ejection is over.
    fn return_expired(&mut self, cfg: &OutlierDetection, now_ms: u64) {
        for e in &mut self.endpoints {
            let until = e.ejected_at + ejection_ms(e, cfg);
            if e.ejected_at != 0 && now_ms >= until {
                e.ejected_at = 0;
                e.returned_at = until;
            }
        }
    }

    fn eject(&mut self, i: usize, cfg: &OutlierDetection, now_ms: u64) -> bool {
        let active = self.endpoints.iter().filter(|e| e.ejected_at != 0).count();
        let total = self.endpoints.len();
        // At least one endpoint may always be ejected; beyond that, the percentage holds.
        let allowed =
            active == 0 || (active + 1) * 100 <= cfg.max_ejection_percent as usize * total;
        let e = &mut self.endpoints[i];
        if e.ejected_at != 0 || !allowed {
            return false;
        }
        // The multiplier decays by one for every interval spent back in rotation.
        let healthy_intervals = if e.returned_at == 0 || cfg.interval_ms == 0 {
            0
        } else {
            now_ms.saturating_sub(e.returned_at) / cfg.interval_ms
        };
        let decayed = u64::from(e.ejections).saturating_sub(healthy_intervals);
        e.ejections = u32::try_from(decayed + 1).unwrap_or(u32::MAX);
        e.ejected_at = now_ms.max(1);
        e.consecutive_5xx = 0;
        e.consecutive_gateway = 0;
        e.consecutive_local = 0;
        true
    }

    /// How many endpoints are ejected at `now_ms`.
    pub fn ejected_count(&self, cfg: &OutlierDetection, now_ms: u64) -> usize {
        (0..self.endpoints.len())
            .filter(|&i| self.is_ejected(i, cfg, now_ms))
            .count()
    }
}

/// Base time × times ejected, capped as Envoy caps it.
fn ejection_ms(e: &EndpointHealth, cfg: &OutlierDetection) -> u64 {
    let cap = MAX_EJECTION_MS.max(cfg.base_ejection_time_ms);
    cfg.base_ejection_time_ms
        .saturating_mul(u64::from(e.ejections.max(1)))
        .min(cap)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(3),
            interval_ms: 1_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ejects_after_consecutive_5xx_and_returns_after_the_base_time() {
        let cfg = cfg();
        let mut r = OutlierRecord::decode(None, 7, 2);
        assert!(!r.observe(0, AttemptResult::Status(500), &cfg, 100));
        assert!(!r.observe(0, AttemptResult::Status(503), &cfg, 200));
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 300));
        assert!(r.is_ejected(0, &cfg, 300));
        assert!(r.is_ejected(0, &cfg, 30_299));
        assert!(!r.is_ejected(0, &cfg, 30_300));
        assert!(!r.is_ejected(1, &cfg, 300));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_success_resets_the_count() {
        let cfg = cfg();
        let mut r = OutlierRecord::decode(None, 7, 1);
        for status in [500, 500, 200, 500, 500] {
            assert!(!r.observe(0, AttemptResult::Status(status), &cfg, 1));
        }
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 1));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn gateway_errors_count_separately_and_500_is_not_one() {
        let cfg = OutlierDetection {
            consecutive_5xx: Some(0),
            consecutive_gateway_errors: Some(2),
            ..cfg()
        };
        let mut r = OutlierRecord::decode(None, 7, 1);
        assert!(!r.observe(0, AttemptResult::Status(502), &cfg, 1));
        assert!(!r.observe(0, AttemptResult::Status(500), &cfg, 1));
        assert!(!r.observe(0, AttemptResult::Status(504), &cfg, 1));
        // A connect failure is a gateway error when errors are not split.
        assert!(r.observe(0, AttemptResult::LocalOrigin { timeout: false }, &cfg, 1));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn split_local_origin_errors_use_their_own_threshold() {
        let cfg = OutlierDetection {
            consecutive_local_origin_failures: Some(2),
            split_external_local_origin_errors: true,
            ..cfg()
        };
        let mut r = OutlierRecord::decode(None, 7, 1);
        let fail = AttemptResult::LocalOrigin { timeout: false };
        assert!(!r.observe(0, fail, &cfg, 1));
        // An upstream answer, even a 500, means the connection worked: the local-origin
        // count starts over, and the 500 counts only towards consecutive 5xx (3 here).
        assert!(!r.observe(0, AttemptResult::Status(500), &cfg, 1));
        assert!(!r.observe(0, fail, &cfg, 1));
        assert!(r.observe(0, fail, &cfg, 1));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn max_ejection_percent_caps_ejections_but_one_is_always_allowed() {
        let cfg = OutlierDetection {
            consecutive_5xx: Some(1),
            max_ejection_percent: 10,
            ..cfg()
        };
        let mut r = OutlierRecord::decode(None, 7, 4);
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 1));
        assert!(!r.observe(1, AttemptResult::Status(500), &cfg, 1));
        assert_eq!(r.ejected_count(&cfg, 1), 1);
        let half = OutlierDetection {
            max_ejection_percent: 50,
            ..cfg
        };
        assert!(r.observe(2, AttemptResult::Status(500), &half, 1));
        assert!(!r.observe(3, AttemptResult::Status(500), &half, 1));
        assert_eq!(r.ejected_count(&half, 1), 2);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn repeated_ejections_last_longer_and_decay_while_healthy() {
        let cfg = OutlierDetection {
            consecutive_5xx: Some(1),
            ..cfg()
        };
        let mut r = OutlierRecord::decode(None, 7, 2);
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 1));
        // Back at 30_001; ejected again at once: twice the base time.
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 30_001));
        assert_eq!(r.ejected_until(0, &cfg, 30_001), Some(90_001));
        // Back at 90_001, healthy for 5 intervals of 1 s: the multiplier is spent.
        assert!(r.observe(0, AttemptResult::Status(500), &cfg, 95_001));
        assert_eq!(r.ejected_until(0, &cfg, 95_001), Some(125_001));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ejection_time_is_capped_at_five_minutes() {
        let cfg = OutlierDetection {
            consecutive_5xx: Some(1),
            interval_ms: 0,
            base_ejection_time_ms: 200_000,
            ..cfg()
        };
        let mut r = OutlierRecord::decode(None, 7, 2);
        let mut now = 1;
        for _ in 0..3 {
            assert!(r.observe(0, AttemptResult::Status(500), &cfg, now));
            now = r.ejected_until(0, &cfg, now).unwrap_or(0);
        }
        // Third ejection: 3 × 200 s capped at 300 s.
        assert_eq!(now, 1 + 200_000 + 300_000 + 300_000);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn records_round_trip_and_stale_ones_start_fresh() {
        let cfg = cfg();
        let mut r = OutlierRecord::decode(None, 7, 3);
        for _ in 0..3 {
            r.observe(1, AttemptResult::Status(500), &cfg, 5);
        }
        let bytes = r.encode();
        assert_eq!(OutlierRecord::decode(Some(&bytes), 7, 3), r);
        assert!(!OutlierRecord::decode(Some(&bytes), 8, 3).is_ejected(1, &cfg, 5));
        assert!(!OutlierRecord::decode(Some(&bytes[1..]), 7, 3).is_ejected(1, &cfg, 5));
    }
}
