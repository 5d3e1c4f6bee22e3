//! Local replies built from route actions: redirects, fault aborts, header edits on replies.

use crate::contract::ResponseFlag;
use crate::ir::{FaultAbort, Redirect, RedirectPort};

use super::matcher::CompiledMatch;
use super::{replace_matched, split_query, EditOp, HeaderEdit, Reply, RequestView};

/// Envoy's redirect: scheme, host (verbatim unless replaced), port rules and path with the
/// query kept unless the new path carries its own.
pub(crate) fn redirect(
    r: &Redirect,
    matched: Option<&CompiledMatch>,
    req: &RequestView<'_>,
) -> Reply {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let port = match r.port {
        Some(RedirectPort::Number(p)) => Some(p),
        Some(RedirectPort::FromRequestPort) => Some(req.port),
        None => None,
    }
    // Istio leaves the scheme's default port out of the redirect (no port redirect at all,
    // so Envoy keeps the Host as it came: `Host: b:80` stays `b:80`).
    .filter(|&p| !(scheme == "http" && p == 80 || scheme == "https" && p == 443));
    // A port that is redirected replaces the Host's port.
    let host = match &r.authority {
        Some(a) => a.clone(),
        None => request_host(req, scheme, port.is_some()),
    };
    let (path, query) = split_query(req.path);
    let new_path = match (&r.uri, &r.prefix_rewrite) {
        (Some(uri), _) if uri.contains('?') => uri.clone(),
        (Some(uri), _) => with_query(uri.clone(), query),
        (None, Some(prefix)) => with_query(replace_matched(path, matched, prefix), query),
        (None, None) => req.path.to_owned(),
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let status = match r.status {
        s @ (301 | 302 | 303 | 307 | 308) => s,
        _ => 301,
    };
    let mut reply = Reply::empty(status, None, "direct_response");
    reply.headers.push((
        "location".into(),
        format!("{scheme}://{host}{port}{new_path}"),
    ));
    reply
}

fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// The request's Host for a Location: its port goes when a new port is set, or when the scheme
/// changes away from the one whose default port it is.
fn request_host(req: &RequestView<'_>, new_scheme: &str, new_port: bool) -> String {
    let authority = req.authority;
    let end = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    let Some(end) = end else {
        return authority.to_owned();
    };
    let port = &authority[end..];
    let current = req.scheme;
    let mut remove = new_port;
    if new_scheme != current {
        remove |= current == "https" && port == ":443";
        remove |= current == "http" && port == ":80";
    }
    if remove {
        authority[..end].to_owned()
    } else {
        authority.to_owned()
    }
}

/// Envoy's fault filter abort: `fault filter abort`, or a gRPC status for gRPC aborts.
pub(crate) fn fault_abort(abort: &FaultAbort) -> Reply {
    match (abort.grpc_status, abort.http_status) {
        (Some(code), _) => Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/grpc".into())],
            body: Vec::new(),
            grpc_status: Some(code),
            flag: Some(ResponseFlag::FaultInjected),
            details: "fault_filter_abort",
        },
        (None, status) => Reply::text(
            status.unwrap_or(503),
            "fault filter abort",
            Some(ResponseFlag::FaultInjected),
            "fault_filter_abort",
        ),
    }
}

/// Applies header edits to a local reply's headers.
pub(crate) fn apply_edits(headers: &mut Vec<(String, String)>, edits: &[HeaderEdit<'_>]) {
    for e in edits {
        match e.op {
            EditOp::Remove => headers.retain(|(k, _)| *k != e.name),
            EditOp::Set => {
                headers.retain(|(k, _)| *k != e.name);
                headers.push((e.name.to_string(), e.value.to_string()));
            }
            EditOp::Add => headers.push((e.name.to_string(), e.value.to_string())),
        }
    }
}
