//! Buffers (`proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`, `proxy_get_buffer_status`).

use wasmtime::{Caller, Linker};

use super::memory::{code, read, return_bytes, write_u32};
use super::{buffer, status, HostState, Phase};

fn current(state: &HostState, kind: i32) -> Result<&[u8], i32> {
    match kind {
        buffer::REQUEST_BODY => state
            .stream()
            .map(|s| s.request_body.as_slice())
            .ok_or(status::NOT_FOUND),
        buffer::RESPONSE_BODY => state
            .stream()
            .filter(|s| s.phase == Phase::Response)
            .map(|s| s.response_body.as_slice())
            .ok_or(status::NOT_FOUND),
        buffer::CALL_RESPONSE_BODY => state
            .call_response
            .as_ref()
            .map(|c| c.body.as_slice())
            .ok_or(status::NOT_FOUND),
        buffer::VM_CONFIGURATION => Ok(&state.vm_configuration),
        buffer::PLUGIN_CONFIGURATION => state
            .plugin_configuration
            .as_deref()
            .ok_or(status::NOT_FOUND),
        buffer::DOWNSTREAM_DATA => state
            .stream()
            .map(|s| s.downstream_data.as_slice())
            .ok_or(status::NOT_FOUND),
        buffer::UPSTREAM_DATA => state
            .stream()
            .map(|s| s.upstream_data.as_slice())
            .ok_or(status::NOT_FOUND),
        5 | 8 => Err(status::NOT_FOUND),
        _ => Err(status::BAD_ARGUMENT),
    }
}

fn get_bytes(
    mut c: Caller<'_, HostState>,
    kind: i32,
    start: i32,
    max: i32,
    ptr_out: i32,
    size_out: i32,
) -> i32 {
    let (start, max) = (start as u32 as usize, max as u32 as usize);
    if start.checked_add(max).is_none() {
        return status::BAD_ARGUMENT;
    }
    let bytes = match current(c.data(), kind) {
        Ok(b) => b
            .get(start..)
            .unwrap_or(&[])
            .iter()
            .take(max)
            .copied()
            .collect::<Vec<u8>>(),
        Err(s) => return s,
    };
    code(return_bytes(&mut c, &bytes, ptr_out, size_out))
}

fn status_of(mut c: Caller<'_, HostState>, kind: i32, size_out: i32, flags_out: i32) -> i32 {
    let len = match current(c.data(), kind) {
        Ok(b) => b.len() as u32,
        Err(s) => return s,
    };
    code(write_u32(&mut c, size_out, len).and_then(|()| write_u32(&mut c, flags_out, 0)))
}

/// Envoy's rules: start 0 replaces the first `size` bytes, start ≥ len appends.
fn set_bytes(
    mut c: Caller<'_, HostState>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let data = match read(&mut c, ptr, len) {
        Ok(d) => d,
        Err(s) => return s,
    };
    let Some(stream) = c.data_mut().stream_mut() else {
        return status::NOT_FOUND;
    };
    let target = match kind {
        buffer::REQUEST_BODY => &mut stream.request_body,
        buffer::RESPONSE_BODY => &mut stream.response_body,
        buffer::DOWNSTREAM_DATA => &mut stream.downstream_data,
        buffer::UPSTREAM_DATA => &mut stream.upstream_data,
        _ => return status::BAD_ARGUMENT,
    };
    let (start, size) = (start as u32 as usize, size as u32 as usize);
    if start == 0 {
        let cut = size.min(target.len());
        target.splice(..cut, data);
    } else if start >= target.len() {
        target.extend_from_slice(&data);
    } else {
        return status::BAD_ARGUMENT;
    }
    status::OK
}

pub fn link(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap("env", "proxy_get_buffer_bytes", get_bytes)?;
    l.func_wrap("env", "proxy_get_buffer_status", status_of)?;
    l.func_wrap("env", "proxy_set_buffer_bytes", set_bytes)?;
    Ok(())
}
