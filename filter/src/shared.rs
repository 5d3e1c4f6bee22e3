//! State every worker's instance shares through proxy-wasm shared data: circuit-breaker
//! counters and outlier records.

use log::{info, warn};
use proxy_wasm::types::Status;

use meshroute_core::engine::{AttemptResult, EndpointState, Engine, Ticket};

use crate::host::Host;

/// Compare-and-swap attempts on a shared value before giving up on it.
const CAS_TRIES: usize = 16;

/// Endpoint health as every worker sees it: outlier records in shared data.
pub struct SharedEndpointState<'h, H> {
    pub host: &'h H,
    pub now_ms: u64,
}

impl<H: Host> EndpointState for SharedEndpointState<'_, H> {
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn outlier_record(&self, cluster: &str) -> Option<Vec<u8>> {
        self.host.shared_get(&Engine::outlier_key(cluster)).0
    }
}

/// Creates the counters the engine admits requests against, before the first request:
/// compare-and-swap cannot guard the creation of a key, so two workers admitting at once
/// could both win.
pub fn create_counters(host: &impl Host, engine: &Engine) {
    for key in engine.counter_keys() {
        if host.shared_get(&key).0.is_none() {
            if let Err(status) = host.shared_set(&key, &0u32.to_le_bytes(), None) {
                warn!("shared counter {key}: {status:?}");
            }
        }
    }
}

/// Adds `delta` to the shared counter `key` unless that would take it above `limit`.
/// Returns whether it changed.
pub fn add(host: &impl Host, key: &str, delta: i32, limit: u32) -> bool {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host.shared_get(key);
        let current = bytes
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map_or(0, u32::from_le_bytes);
        let Some(next) = current.checked_add_signed(delta) else {
            return false;
        };
        if delta > 0 && next > limit {
            return false;
        }
        match host.shared_set(key, &next.to_le_bytes(), cas) {
            Ok(()) => return true,
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                warn!("shared counter {key}: {status:?}");
                return false;
            }
        }
    }
    warn!("shared counter {key}: too much contention");
    false
}

/// Counts one attempt against its endpoint's outlier record (when the cluster has outlier
/// detection), with compare-and-swap so concurrent workers do not lose counts.
pub fn report_attempt(
    host: &impl Host,
    engine: &Engine,
    ticket: Ticket,
    result: AttemptResult,
    now_ms: u64,
) {
    let Some(cluster) = engine
        .tracks_outliers(ticket)
        .then(|| engine.cluster_of(ticket))
        .flatten()
    else {
        return;
    };
    let key = Engine::outlier_key(cluster);
    for _ in 0..CAS_TRIES {
        let (stored, cas) = host.shared_get(&key);
        let Some((_, record, ejected)) = engine.observe(ticket, result, stored.as_deref(), now_ms)
        else {
            return;
        };
        match host.shared_set(&key, &record, cas) {
            Ok(()) => {
                if ejected {
                    info!("outlier detection ejected an endpoint of {cluster}");
                }
                return;
            }
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                warn!("outlier record of {cluster}: {status:?}");
                return;
            }
        }
    }
    warn!("outlier record of {cluster}: too much contention");
}
