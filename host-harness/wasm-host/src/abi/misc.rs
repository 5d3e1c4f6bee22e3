//! Logging, time, timers, effective context, shared data and queues, metrics, gRPC (not
//! offered: the upstream, a serialized GrpcService, is never parsed, so calls answer
//! PARSE_FAILURE as Envoy does for one it cannot parse), foreign functions.

use std::collections::{HashMap, VecDeque};

use std::time::{Duration, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::memory::{code, read, read_string, return_bytes, write, write_u32};
use super::{status, GuestLog, HostState};

fn log(mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> i32 {
    if !(0..=5).contains(&level) {
        return status::BAD_ARGUMENT;
    }
    match read_string(&mut c, ptr, len) {
        Ok(message) => {
            let state = c.data_mut();
            if level >= state.log_level.load(std::sync::atomic::Ordering::Relaxed) {
                state.logs.push(GuestLog { level, message });
            }
            status::OK
        }
        Err(s) => s,
    }
}

fn get_log_level(mut c: Caller<'_, HostState>, out: i32) -> i32 {
    let level = c
        .data()
        .log_level
        .load(std::sync::atomic::Ordering::Relaxed) as u32;
    code(write_u32(&mut c, out, level))
}

fn current_time(mut c: Caller<'_, HostState>, out: i32) -> i32 {
    let ns = (c.data().now)()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    code(write(&mut c, out, &ns.to_le_bytes()))
}

/// Sets the timer of the calling context's root (one timer per root context).
fn set_tick_period(mut c: Caller<'_, HostState>, period_ms: i32) -> i32 {
    let state = c.data_mut();
    state.tick_period = u64::try_from(period_ms)
        .ok()
        .filter(|p| *p > 0)
        .map(Duration::from_millis);
    state.tick_changed = true;
    status::OK
}

fn set_effective_context(mut c: Caller<'_, HostState>, id: i32) -> i32 {
    let state = c.data_mut();
    let id = id as u32;
    if state.root_names.contains_key(&id) || state.streams.contains_key(&id) {
        state.effective = Some(id);
        status::OK
    } else {
        status::BAD_ARGUMENT
    }
}

fn done(_: Caller<'_, HostState>) -> i32 {
    status::NOT_FOUND
}

fn get_shared_data(
    mut c: Caller<'_, HostState>,
    kp: i32,
    kl: i32,
    ptr_out: i32,
    size_out: i32,
    cas_out: i32,
) -> i32 {
    let key = match read_string(&mut c, kp, kl) {
        Ok(k) => k,
        Err(s) => return s,
    };
    match c.data().shared.get(&key) {
        Some((value, cas)) => code(
            return_bytes(&mut c, &value, ptr_out, size_out)
                .and_then(|()| write_u32(&mut c, cas_out, cas)),
        ),
        None => status::NOT_FOUND,
    }
}

fn set_shared_data(
    mut c: Caller<'_, HostState>,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
    cas: i32,
) -> i32 {
    match (read_string(&mut c, kp, kl), read(&mut c, vp, vl)) {
        (Ok(k), Ok(v)) => c.data().shared.set(&k, v, cas as u32),
        (Err(s), _) | (_, Err(s)) => s,
    }
}

/// Shared queues of one plugin (shared by its instances, as Envoy's by VM id).
#[derive(Debug, Default)]
pub struct Queues {
    by_name: HashMap<String, u32>,
    items: HashMap<u32, VecDeque<Vec<u8>>>,
}

fn register_queue(mut c: Caller<'_, HostState>, np: i32, nl: i32, id_out: i32) -> i32 {
    let name = match read_string(&mut c, np, nl) {
        Ok(n) => format!("{}/{n}", c.data().plugin_name),
        Err(s) => return s,
    };
    let id = {
        let Ok(mut q) = c.data().shared.queues.lock() else {
            return status::INTERNAL_FAILURE;
        };
        let next = q.by_name.len() as u32 + 1;
        let id = *q.by_name.entry(name).or_insert(next);
        q.items.entry(id).or_default();
        id
    };
    code(write_u32(&mut c, id_out, id))
}

fn resolve_queue(
    mut c: Caller<'_, HostState>,
    _vp: i32,
    _vl: i32,
    np: i32,
    nl: i32,
    id_out: i32,
) -> i32 {
    let name = match read_string(&mut c, np, nl) {
        Ok(n) => format!("{}/{n}", c.data().plugin_name),
        Err(s) => return s,
    };
    let id = c
        .data()
        .shared
        .queues
        .lock()
        .ok()
        .and_then(|q| q.by_name.get(&name).copied());
    match id {
        Some(id) => code(write_u32(&mut c, id_out, id)),
        None => status::NOT_FOUND,
    }
}

fn enqueue(mut c: Caller<'_, HostState>, id: i32, vp: i32, vl: i32) -> i32 {
    let value = match read(&mut c, vp, vl) {
        Ok(v) => v,
        Err(s) => return s,
    };
    let Ok(mut q) = c.data().shared.queues.lock() else {
        return status::INTERNAL_FAILURE;
    };
    match q.items.get_mut(&(id as u32)) {
        Some(items) => {
            items.push_back(value);
            status::OK
        }
        None => status::NOT_FOUND,
    }
}

fn dequeue(mut c: Caller<'_, HostState>, id: i32, ptr_out: i32, size_out: i32) -> i32 {
    let item = {
        let Ok(mut q) = c.data().shared.queues.lock() else {
            return status::INTERNAL_FAILURE;
        };
        match q.items.get_mut(&(id as u32)) {
            None => return status::NOT_FOUND,
            Some(items) => items.pop_front(),
        }
    };
    match item {
        Some(v) => code(return_bytes(&mut c, &v, ptr_out, size_out)),
        None => status::EMPTY,
    }
}

/// Metric ids by name, and values by id - 1.
pub type Metrics = (HashMap<String, u32>, Vec<i64>);

fn define_metric(mut c: Caller<'_, HostState>, kind: i32, np: i32, nl: i32, id_out: i32) -> i32 {
    if !(0..=2).contains(&kind) {
        return status::BAD_ARGUMENT;
    }
    let name = match read_string(&mut c, np, nl) {
        Ok(n) => n,
        Err(s) => return s,
    };
    let id = {
        let Ok(mut m) = c.data().shared.metrics.lock() else {
            return status::INTERNAL_FAILURE;
        };
        let (names, values) = &mut *m;
        match names.get(&name) {
            Some(id) => *id,
            None => {
                values.push(0);
                let id = values.len() as u32;
                names.insert(name, id);
                id
            }
        }
    };
    code(write_u32(&mut c, id_out, id))
}

fn with_metric(c: &Caller<'_, HostState>, id: i32, f: impl FnOnce(&mut i64)) -> i32 {
    let Ok(mut m) = c.data().shared.metrics.lock() else {
        return status::INTERNAL_FAILURE;
    };
    match (id as u32)
        .checked_sub(1)
        .and_then(|i| m.1.get_mut(i as usize))
    {
        Some(v) => {
            f(v);
            status::OK
        }
        None => status::NOT_FOUND,
    }
}

fn get_metric(mut c: Caller<'_, HostState>, id: i32, out: i32) -> i32 {
    let mut value = 0;
    let s = with_metric(&c, id, |v| value = *v);
    if s != status::OK {
        return s;
    }
    code(write(&mut c, out, &(value as u64).to_le_bytes()))
}

#[allow(clippy::too_many_arguments, reason = "the ABI's signature")]
fn grpc_call(
    _: Caller<'_, HostState>,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
) -> i32 {
    status::PARSE_FAILURE
}

#[allow(clippy::too_many_arguments, reason = "the ABI's signature")]
fn grpc_stream(
    _: Caller<'_, HostState>,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
    _: i32,
) -> i32 {
    status::PARSE_FAILURE
}

fn get_status(mut c: Caller<'_, HostState>, code_out: i32, ptr_out: i32, size_out: i32) -> i32 {
    code(
        write_u32(&mut c, code_out, 0)
            .and_then(|()| write_u32(&mut c, ptr_out, 0))
            .and_then(|()| write_u32(&mut c, size_out, 0)),
    )
}

/// Envoy's `clear_route_cache` is accepted (routing here never caches), and
/// `set_envoy_filter_state` keeps the value on the stream (a connection's cluster and endpoint
/// for its TCP proxy); nothing else exists.
fn foreign_function(
    mut c: Caller<'_, HostState>,
    np: i32,
    nl: i32,
    ap: i32,
    al: i32,
    ptr_out: i32,
    size_out: i32,
) -> i32 {
    match read_string(&mut c, np, nl) {
        Ok(name) if name == "clear_route_cache" => {
            code(return_bytes(&mut c, &[], ptr_out, size_out))
        }
        Ok(name) if name == "set_envoy_filter_state" => {
            let args = match read(&mut c, ap, al) {
                Ok(a) => a,
                Err(s) => return s,
            };
            let Some((path, value)) = filter_state_arguments(&args) else {
                return status::BAD_ARGUMENT;
            };
            let Some(stream) = c.data_mut().stream_mut() else {
                return status::NOT_FOUND;
            };
            stream.filter_state.retain(|(k, _)| *k != path);
            stream.filter_state.push((path, value));
            code(return_bytes(&mut c, &[], ptr_out, size_out))
        }
        Ok(_) => status::NOT_FOUND,
        Err(s) => s,
    }
}

/// Decodes `SetEnvoyFilterStateArguments { string path = 1; string value = 2; ... }`.
fn filter_state_arguments(bytes: &[u8]) -> Option<(String, String)> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }
    let (mut path, mut value) = (None, None);
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        match key & 7 {
            0 => {
                varint(bytes, &mut at)?;
            }
            2 => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                let field = bytes.get(at..at.checked_add(len)?)?;
                at += len;
                let text = String::from_utf8(field.to_vec()).ok()?;
                match key >> 3 {
                    1 => path = Some(text),
                    2 => value = Some(text),
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    Some((path?, value.unwrap_or_default()))
}

pub fn link(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap("env", "proxy_log", log)?;
    l.func_wrap("env", "proxy_get_log_level", get_log_level)?;
    l.func_wrap("env", "proxy_get_current_time_nanoseconds", current_time)?;
    l.func_wrap("env", "proxy_set_tick_period_milliseconds", set_tick_period)?;
    l.func_wrap("env", "proxy_set_effective_context", set_effective_context)?;
    l.func_wrap("env", "proxy_done", done)?;
    l.func_wrap("env", "proxy_get_shared_data", get_shared_data)?;
    l.func_wrap("env", "proxy_set_shared_data", set_shared_data)?;
    l.func_wrap("env", "proxy_register_shared_queue", register_queue)?;
    l.func_wrap("env", "proxy_resolve_shared_queue", resolve_queue)?;
    l.func_wrap("env", "proxy_enqueue_shared_queue", enqueue)?;
    l.func_wrap("env", "proxy_dequeue_shared_queue", dequeue)?;
    l.func_wrap("env", "proxy_define_metric", define_metric)?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Caller<'_, HostState>, id: i32, d: i64| with_metric(&c, id, |v| *v = v.wrapping_add(d)),
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Caller<'_, HostState>, id: i32, x: i64| with_metric(&c, id, |v| *v = x),
    )?;
    l.func_wrap("env", "proxy_get_metric", get_metric)?;
    l.func_wrap("env", "proxy_grpc_call", grpc_call)?;
    l.func_wrap("env", "proxy_grpc_stream", grpc_stream)?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32| status::BAD_ARGUMENT,
    )?;
    l.func_wrap(
        "env",
        // Envoy answers BAD_ARGUMENT for a call token it does not know.
        "proxy_grpc_cancel",
        |_: Caller<'_, HostState>, _: i32| status::BAD_ARGUMENT,
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_close",
        |_: Caller<'_, HostState>, _: i32| status::BAD_ARGUMENT,
    )?;
    l.func_wrap("env", "proxy_get_status", get_status)?;
    l.func_wrap("env", "proxy_call_foreign_function", foreign_function)?;
    Ok(())
}
