//! Properties (`proxy_get_property`), encoded as Envoy encodes them: strings raw, integers
//! 8-byte little-endian, maps as serialized pairs.

use wasmtime::{Caller, Linker};

use super::memory::{code, read, return_bytes};
use super::{serialize_pairs, split_query_value, status, HostState, Stream};

enum Value {
    Bytes(Vec<u8>),
    Int(i64),
}

fn header(s: &Stream, name: &str) -> Option<String> {
    let values: Vec<&str> = s
        .request_headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn lookup(state: &HostState, path: &[&str]) -> Result<Value, i32> {
    let text = |s: String| Ok(Value::Bytes(s.into_bytes()));
    // Envoy keeps set values as filter state named by the whole path, and reads filter state
    // only through a single-segment path (`["a.b"]`, not `["a", "b"]`).
    if let ([name], Some(s)) = (path, state.stream()) {
        if let Some((_, v)) = s.properties.iter().find(|(k, _)| k == name) {
            return Ok(Value::Bytes(v.clone()));
        }
    }
    match path {
        ["plugin_name"] | ["plugin_vm_id"] => text(state.plugin_name.clone()),
        ["plugin_root_id"] => text(state.current_root_name().to_owned()),
        ["request" | "response" | "connection" | "source" | "destination" | "filter_state"] => {
            Err(status::SERIALIZATION_FAILURE)
        }
        _ => {
            let s = state.stream().ok_or(status::NOT_FOUND)?;
            let pseudo = |n: &str| header(s, n).unwrap_or_default();
            match path {
                ["request", "path"] => text(pseudo(":path")),
                ["request", "url_path"] => text(split_query_value(&pseudo(":path")).0.to_owned()),
                ["request", "query"] => text(split_query_value(&pseudo(":path")).1.to_owned()),
                ["request", "host"] => text(pseudo(":authority")),
                ["request", "scheme"] => text(pseudo(":scheme")),
                ["request", "method"] => text(pseudo(":method")),
                ["request", "protocol"] => text("HTTP/1.1".into()),
                ["request", "id"] => text(pseudo("x-request-id")),
                ["request", "useragent"] => text(pseudo("user-agent")),
                ["request", "referer"] => text(pseudo("referer")),
                ["request", "headers"] => Ok(Value::Bytes(serialize_pairs(&s.request_headers))),
                ["request", "headers", name] => header(s, name)
                    .map(|v| Value::Bytes(v.into_bytes()))
                    .ok_or(status::NOT_FOUND),
                ["source", "address"] => text(s.source.clone()),
                ["source", "port"] => s
                    .source
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                    .map(Value::Int)
                    .ok_or(status::NOT_FOUND),
                ["destination", "address"] => text(s.destination.clone()),
                ["destination", "port"] => Ok(Value::Int(i64::from(s.destination_port))),
                ["connection", "id"] | ["connection_id"] => Ok(Value::Int(s.connection_id as i64)),
                ["connection", "mtls"] => Ok(Value::Bytes(vec![0])),
                ["connection", "requested_server_name"] => text(s.requested_server_name.clone()),
                ["response", "flags"] => Ok(Value::Int(s.response_flags as i64)),
                ["response", "code_details"] if !s.response_details.is_empty() => {
                    text(s.response_details.to_owned())
                }
                ["response", "code"] => s
                    .response_code
                    .map(|c| Value::Int(i64::from(c)))
                    .ok_or(status::NOT_FOUND),
                _ => Err(status::NOT_FOUND),
            }
        }
    }
}

fn get(mut c: Caller<'_, HostState>, ptr: i32, len: i32, ptr_out: i32, size_out: i32) -> i32 {
    let raw = match read(&mut c, ptr, len) {
        Ok(r) => r,
        Err(s) => return s,
    };
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let path: Vec<&str> = raw.split('\0').collect();
    let bytes = match lookup(c.data(), &path) {
        Ok(Value::Bytes(b)) => b,
        Ok(Value::Int(i)) => i.to_le_bytes().to_vec(),
        Err(s) => return s,
    };
    code(return_bytes(&mut c, &bytes, ptr_out, size_out))
}

fn set(mut c: Caller<'_, HostState>, pp: i32, pl: i32, vp: i32, vl: i32) -> i32 {
    let (path, value) = match (read(&mut c, pp, pl), read(&mut c, vp, vl)) {
        (Ok(p), Ok(v)) => (String::from_utf8_lossy(&p).into_owned(), v),
        (Err(s), _) | (_, Err(s)) => return s,
    };
    // Envoy has no stream info in root contexts and answers NOT_FOUND there.
    let Some(stream) = c.data_mut().stream_mut() else {
        return status::NOT_FOUND;
    };
    match stream.properties.iter_mut().find(|(k, _)| *k == path) {
        Some((_, v)) => *v = value,
        None => stream.properties.push((path, value)),
    }
    status::OK
}

pub fn link(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap("env", "proxy_get_property", get)?;
    l.func_wrap("env", "proxy_set_property", set)?;
    Ok(())
}
