//! Stream control, local replies and side calls. Each only records what the guest asked
//! for; the runtime acts on it once the callback has returned (as Envoy defers them).

use std::time::Duration;

use wasmtime::{Caller, Linker};

use super::memory::{read, read_string, write_u32};
use super::{parse_pairs, status, CallTarget, HostState, LocalReply, PendingCall, Phase};

fn continue_stream(mut c: Caller<'_, HostState>, kind: i32) -> i32 {
    match kind {
        0 => {
            if let Some(s) = c.data_mut().stream_mut() {
                s.resumed = true;
            }
            status::OK
        }
        1 => {
            // Continuing a response that does not exist yet is a no-op here (Envoy crashes).
            if let Some(s) = c.data_mut().stream_mut() {
                if s.phase == Phase::Response {
                    s.response_resumed = true;
                }
            }
            status::OK
        }
        2 | 3 => status::OK,
        _ => status::BAD_ARGUMENT,
    }
}

fn close_stream(mut c: Caller<'_, HostState>, kind: i32) -> i32 {
    if !(0..=3).contains(&kind) {
        return status::BAD_ARGUMENT;
    }
    if kind >= 2 {
        if let Some(s) = c.data_mut().stream_mut() {
            s.close_connection = true;
        }
        return status::OK;
    }
    if let Some(s) = c.data_mut().stream_mut() {
        // As in Envoy: a stream closed from the request phase ends in 503, details
        // wasm_fail_stream, no body.
        s.local_reply.get_or_insert(LocalReply {
            status: 503,
            headers: Vec::new(),
            body: Vec::new(),
            grpc_status: None,
            details: None,
        });
    }
    status::OK
}

#[allow(clippy::too_many_arguments, reason = "the ABI's signature")]
fn send_local_response(
    mut c: Caller<'_, HostState>,
    code: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    grpc_status: i32,
) -> i32 {
    let (details, body, headers) = match (
        read(&mut c, details_ptr, details_len),
        read(&mut c, body_ptr, body_len),
        read(&mut c, headers_ptr, headers_len),
    ) {
        (Ok(d), Ok(b), Ok(h)) => (d, b, parse_pairs(&h).unwrap_or_default()),
        (Err(s), _, _) | (_, Err(s), _) | (_, _, Err(s)) => return s,
    };
    let Some(stream) = c.data_mut().stream_mut() else {
        return status::BAD_ARGUMENT;
    };
    if stream.phase == Phase::Done {
        return status::BAD_ARGUMENT;
    }
    stream.local_reply = Some(LocalReply {
        status: u16::try_from(code).unwrap_or(500),
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        body,
        grpc_status: u32::try_from(grpc_status)
            .ok()
            .filter(|g| *g <= 16 && stream.grpc_request),
        details: Some(String::from_utf8_lossy(&details).into_owned()),
    });
    status::OK
}

#[allow(clippy::too_many_arguments, reason = "the ABI's signature")]
fn http_call(
    mut c: Caller<'_, HostState>,
    up_ptr: i32,
    up_len: i32,
    h_ptr: i32,
    h_len: i32,
    b_ptr: i32,
    b_len: i32,
    _t_ptr: i32,
    _t_len: i32,
    timeout_ms: i32,
    token_out: i32,
) -> i32 {
    let cluster = match read_string(&mut c, up_ptr, up_len) {
        Ok(s) => s,
        Err(s) => return s,
    };
    let (headers, body) = match (read(&mut c, h_ptr, h_len), read(&mut c, b_ptr, b_len)) {
        (Ok(h), Ok(b)) => (parse_pairs(&h).unwrap_or_default(), b),
        (Err(s), _) | (_, Err(s)) => return s,
    };
    let has = |name: &str| headers.iter().any(|(k, _)| k == name);
    if !(has(":authority") && has(":path") && has(":method")) {
        return status::BAD_ARGUMENT;
    }
    match (c.data().known_clusters)(&cluster, &headers) {
        CallTarget::UnknownCluster => return status::BAD_ARGUMENT,
        CallTarget::NoHost => return status::INTERNAL_FAILURE,
        CallTarget::Ok => {}
    }
    let state = c.data_mut();
    // Tokens are unique per instance and never 0.
    state.next_token = state.next_token.wrapping_add(4).max(4);
    let token = state.next_token;
    state.calls.push(PendingCall {
        token,
        cluster,
        headers,
        body,
        timeout: u64::try_from(timeout_ms)
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_millis),
    });
    match write_u32(&mut c, token_out, token) {
        Ok(()) => status::OK,
        Err(s) => {
            c.data_mut().calls.pop();
            s
        }
    }
}

pub fn link(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap("env", "proxy_continue_stream", continue_stream)?;
    l.func_wrap("env", "proxy_close_stream", close_stream)?;
    l.func_wrap("env", "proxy_send_local_response", send_local_response)?;
    l.func_wrap("env", "proxy_http_call", http_call)?;
    Ok(())
}
