//! Istio's HTTP match conditions as the rules document's matches: one translation for
//! validation (which asks whether a match catches everything) and lowering.

use meshroute_core::ir;

use crate::api;

pub(crate) fn string_match(m: &api::StringMatch) -> Option<ir::StringMatch> {
    if let Some(e) = &m.exact {
        Some(ir::StringMatch::Exact(e.clone()))
    } else if let Some(p) = &m.prefix {
        Some(ir::StringMatch::Prefix(p.clone()))
    } else {
        m.regex.as_ref().map(|r| ir::StringMatch::Regex(r.clone()))
    }
}

/// Header/query matcher: `{}` and `regex: "*"` mean presence.
pub(crate) fn presence_or_match(m: &api::StringMatch) -> ir::StringMatch {
    if m.regex.as_deref() == Some("*") {
        return ir::StringMatch::Present;
    }
    string_match(m).unwrap_or(ir::StringMatch::Present)
}

pub(crate) fn translate_match(m: &api::HttpMatchRequest) -> ir::RouteMatch {
    // Keys that name the request line are matched through their own fields in Istio.
    const IGNORED: &[&str] = &["uri", "scheme", "method", "authority"];
    let mut headers: Vec<ir::HeaderMatch> = Vec::new();
    for (name, sm) in &m.headers {
        if IGNORED.contains(&name.as_str()) {
            continue;
        }
        headers.push(ir::HeaderMatch {
            name: name.to_ascii_lowercase(),
            matcher: presence_or_match(sm),
            invert: false,
        });
    }
    for (name, sm) in &m.without_headers {
        if IGNORED.contains(&name.as_str()) {
            continue;
        }
        headers.push(ir::HeaderMatch {
            name: name.to_ascii_lowercase(),
            matcher: presence_or_match(sm),
            invert: true,
        });
    }
    ir::RouteMatch {
        name: m.name.clone(),
        uri: m.uri.as_ref().and_then(string_match),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
        scheme: m.scheme.as_ref().and_then(string_match),
        method: m.method.as_ref().and_then(string_match),
        authority: m.authority.as_ref().and_then(string_match),
        headers,
        query_params: m
            .query_params
            .iter()
            .map(|(name, sm)| ir::QueryMatch {
                name: name.clone(),
                matcher: presence_or_match(sm),
            })
            .collect(),
        port: m.port.and_then(|p| u16::try_from(p).ok()),
    }
}

/// Whether a match block matches every request (a catch-all), as Istio decides it: no
/// condition beyond a `/` prefix, and no install-time selector.
pub fn is_catch_all(m: &api::HttpMatchRequest) -> bool {
    m.source_labels.is_empty()
        && m.gateways.is_empty()
        && m.source_namespace.is_none()
        && translate_match(m).is_catch_all()
}
