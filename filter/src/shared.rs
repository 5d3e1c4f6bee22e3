//! State every worker's instance shares through proxy-wasm shared data: circuit-breaker
//! counters and outlier records.

use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use meshroute_core::engine::{AttemptResult, EndpointState, Engine, Ticket};

/// Compare-and-swap attempts on a shared value before giving up on it.
const CAS_TRIES: usize = 16;

/// Endpoint health as every worker sees it: outlier records in shared data.
pub struct SharedEndpointState {
    pub now_ms: u64,
}

impl EndpointState for SharedEndpointState {
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn outlier_record(&self, cluster: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&Engine::outlier_key(cluster))
            .ok()
            .and_then(|(bytes, _)| bytes)
    }
}

/// Adds `delta` to the shared counter `key` unless that would take it above `limit`.
/// Returns whether it changed.
pub fn add(key: &str, delta: i32, limit: u32) -> bool {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let current = bytes
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map_or(0, u32::from_le_bytes);
        let Some(next) = current.checked_add_signed(delta) else {
            return false;
        };
        if delta > 0 && next > limit {
            return false;
        }
        match hostcalls::set_shared_data(key, Some(&next.to_le_bytes()), cas) {
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
pub fn report_attempt(engine: &Engine, ticket: Ticket, result: AttemptResult, now_ms: u64) {
    let Some(cluster) = engine
        .tracks_outliers(ticket)
        .then(|| engine.cluster_of(ticket))
        .flatten()
    else {
        return;
    };
    let key = Engine::outlier_key(cluster);
    for _ in 0..CAS_TRIES {
        let (stored, cas) = hostcalls::get_shared_data(&key).unwrap_or((None, None));
        let Some((_, record, ejected)) = engine.observe(ticket, result, stored.as_deref(), now_ms)
        else {
            return;
        };
        match hostcalls::set_shared_data(&key, Some(&record), cas) {
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
