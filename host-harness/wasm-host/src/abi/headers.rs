//! Header and trailer maps (`proxy_*_header_map_*`), with Envoy's availability rules:
//! request headers only until the request continued, response headers only in the response
//! phase, side-call headers only during their callback.

use wasmtime::{Caller, Linker};

use super::memory::{code, read_string, return_bytes, write_u32};
use super::{map, parse_pairs, serialize_pairs, status, Headers, HostState, Phase};

static EMPTY: Headers = Vec::new();

fn map_ref(state: &HostState, kind: i32) -> Result<&Headers, i32> {
    match kind {
        map::REQUEST_HEADERS => match state.stream() {
            Some(s) if s.phase == Phase::Request => Ok(&s.request_headers),
            _ => Err(status::BAD_ARGUMENT),
        },
        map::RESPONSE_HEADERS => match state.stream() {
            Some(s) if s.phase == Phase::Response => Ok(&s.response_headers),
            _ => Err(status::BAD_ARGUMENT),
        },
        map::CALL_RESPONSE_HEADERS => state
            .call_response
            .as_ref()
            .map(|c| &c.headers)
            .ok_or(status::BAD_ARGUMENT),
        map::REQUEST_TRAILERS | map::RESPONSE_TRAILERS | map::CALL_RESPONSE_TRAILERS => Ok(&EMPTY),
        _ => Err(status::BAD_ARGUMENT),
    }
}

fn map_mut(state: &mut HostState, kind: i32) -> Result<&mut Headers, i32> {
    let stream = state.stream_mut().ok_or(status::BAD_ARGUMENT)?;
    match (kind, stream.phase) {
        (map::REQUEST_HEADERS, Phase::Request) => Ok(&mut stream.request_headers),
        (map::RESPONSE_HEADERS, Phase::Response) => Ok(&mut stream.response_headers),
        _ => Err(status::BAD_ARGUMENT),
    }
}

fn get_pairs(mut c: Caller<'_, HostState>, kind: i32, ptr_out: i32, size_out: i32) -> i32 {
    // Envoy answers OK with an empty map when the map is not available now.
    let bytes = match map_ref(c.data(), kind) {
        Ok(m) if !m.is_empty() => serialize_pairs(m),
        _ => Vec::new(),
    };
    code(return_bytes(&mut c, &bytes, ptr_out, size_out))
}

fn get_size(mut c: Caller<'_, HostState>, kind: i32, size_out: i32) -> i32 {
    let size = match map_ref(c.data(), kind) {
        Ok(m) => serialize_pairs(m).len() as u32,
        Err(s) => return s,
    };
    code(write_u32(&mut c, size_out, size))
}

fn set_pairs(mut c: Caller<'_, HostState>, kind: i32, ptr: i32, len: i32) -> i32 {
    let bytes = match super::memory::read(&mut c, ptr, len) {
        Ok(b) => b,
        Err(s) => return s,
    };
    let pairs = parse_pairs(&bytes).unwrap_or_default();
    match map_mut(c.data_mut(), kind) {
        Ok(m) => {
            *m = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            status::OK
        }
        Err(s) => s,
    }
}

fn get_value(
    mut c: Caller<'_, HostState>,
    kind: i32,
    kp: i32,
    kl: i32,
    ptr_out: i32,
    size_out: i32,
) -> i32 {
    let key = match read_string(&mut c, kp, kl) {
        Ok(k) => k.to_ascii_lowercase(),
        Err(s) => return s,
    };
    let value = match map_ref(c.data(), kind) {
        Ok(m) => m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()),
        Err(s) => return s,
    };
    match value {
        // Several values: Envoy returns the first.
        Some(v) => code(return_bytes(&mut c, v.as_bytes(), ptr_out, size_out)),
        None => status::NOT_FOUND,
    }
}

#[derive(Clone, Copy)]
enum Edit {
    Add,
    Replace,
}

fn edit(
    mut c: Caller<'_, HostState>,
    kind: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
    how: Edit,
) -> i32 {
    let (key, value) = match (read_string(&mut c, kp, kl), read_string(&mut c, vp, vl)) {
        (Ok(k), Ok(v)) => (k.to_ascii_lowercase(), v),
        (Err(s), _) | (_, Err(s)) => return s,
    };
    match map_mut(c.data_mut(), kind) {
        Ok(m) => {
            match how {
                Edit::Add => m.push((key, value)),
                Edit::Replace => match m.iter().position(|(k, _)| *k == key) {
                    Some(first) => {
                        m[first].1 = value;
                        let mut i = first + 1;
                        while i < m.len() {
                            if m[i].0 == key {
                                m.remove(i);
                            } else {
                                i += 1;
                            }
                        }
                    }
                    None => m.push((key, value)),
                },
            }
            status::OK
        }
        Err(s) => s,
    }
}

fn remove(mut c: Caller<'_, HostState>, kind: i32, kp: i32, kl: i32) -> i32 {
    let key = match read_string(&mut c, kp, kl) {
        Ok(k) => k.to_ascii_lowercase(),
        Err(s) => return s,
    };
    match map_mut(c.data_mut(), kind) {
        Ok(m) => {
            m.retain(|(k, _)| *k != key);
            status::OK
        }
        Err(s) => s,
    }
}

pub fn link(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap("env", "proxy_get_header_map_pairs", get_pairs)?;
    l.func_wrap("env", "proxy_get_header_map_size", get_size)?;
    l.func_wrap("env", "proxy_set_header_map_pairs", set_pairs)?;
    l.func_wrap("env", "proxy_get_header_map_value", get_value)?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |c: Caller<'_, HostState>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            edit(c, t, kp, kl, vp, vl, Edit::Add)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |c: Caller<'_, HostState>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            edit(c, t, kp, kl, vp, vl, Edit::Replace)
        },
    )?;
    l.func_wrap("env", "proxy_remove_header_map_value", remove)?;
    Ok(())
}
