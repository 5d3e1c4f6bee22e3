//! One HTTP route, a function per part: its action, destinations, rewrite, redirect,
//! direct response, retries, fault, mirrors and CORS policy.

use base64::Engine as _;

use super::virtual_service::{headers, http_match, weights_check};
use super::{GRPC_CODES, HTTP_METHODS, MAX_DIRECT_RESPONSE_BODY, RETRY_ON_POLICIES, V};
use crate::api;
use crate::hosts;
use crate::source::FieldPath;

/// One HTTP route: its action, matches, destinations and every policy it carries.
pub(super) fn http_route(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute, delegate_vs: bool) {
    actions(v, p, route, delegate_vs);
    for (i, m) in route.matches.iter().enumerate() {
        http_match(v, &p.key("match").idx(i), m);
    }
    destinations(v, p, route);
    rewrite(v, p, route);
    redirect(v, p, route);
    direct_response(v, p, route);
    v.duration(&p.key("timeout"), route.timeout.as_ref(), true);
    retries(v, p, route);
    fault(v, p, route);
    mirrors(v, p, route);
    cors(v, p, route);
}

/// One action per route: route, redirect, direct response or delegate.
fn actions(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute, delegate_vs: bool) {
    // Action exclusivity.
    let has_route = !route.route.is_empty();
    if let Some(_r) = &route.redirect {
        if has_route {
            v.err(
                &p.key("redirect"),
                "HTTP route cannot contain both route and redirect",
            );
        }
        if route.fault.is_some() {
            v.err(
                &p.key("fault"),
                "HTTP route cannot contain both fault and redirect",
            );
        }
        if route.rewrite.is_some() {
            v.err(
                &p.key("rewrite"),
                "HTTP route rule cannot contain both rewrite and redirect",
            );
        }
        if route.direct_response.is_some() {
            v.err(
                &p.key("directResponse"),
                "HTTP route cannot contain both redirect and directResponse",
            );
        }
    }
    if route.direct_response.is_some() {
        if has_route {
            v.err(
                &p.key("directResponse"),
                "HTTP route cannot contain both route and directResponse",
            );
        }
        if route.fault.is_some() {
            v.err(
                &p.key("fault"),
                "HTTP route cannot contain both fault and directResponse",
            );
        }
        if route.rewrite.is_some() {
            v.err(
                &p.key("rewrite"),
                "HTTP route rule cannot contain both rewrite and directResponse",
            );
        }
    }
    if let Some(d) = &route.delegate {
        if delegate_vs {
            v.err(&p.key("delegate"), "delegate is not allowed in a delegate virtual service (only one level of delegation)");
        }
        if has_route {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both route and delegate",
            );
        }
        if route.redirect.is_some() {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both redirect and delegate",
            );
        }
        if route.direct_response.is_some() {
            v.err(
                &p.key("delegate"),
                "HTTP route cannot contain both directResponse and delegate",
            );
        }
        if d.name.is_empty() {
            v.err(&p.key("delegate").key("name"), "delegate name is required");
        } else if hosts::validate_fqdn(&d.name).is_err() {
            v.err(
                &p.key("delegate").key("name"),
                format!("invalid delegate name {:?}", d.name),
            );
        }
        if !d.namespace.is_empty() && !hosts::is_dns1123_label(&d.namespace) {
            v.err(
                &p.key("delegate").key("namespace"),
                format!("invalid delegate namespace {:?}", d.namespace),
            );
        }
    }
    if !has_route
        && route.redirect.is_none()
        && route.delegate.is_none()
        && route.direct_response.is_none()
    {
        v.err(p, "HTTP route, redirect or direct_response is required");
    }
    if route.mirror.is_some() && !route.mirrors.is_empty() {
        v.err(
            &p.key("mirrors"),
            "HTTP route cannot contain both mirror and mirrors",
        );
    }
}

/// Destinations, their weights and header operations.
fn destinations(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    let weights: Vec<Option<i64>> = route.route.iter().map(|d| d.weight).collect();
    for (i, d) in route.route.iter().enumerate() {
        let dp = p.key("route").idx(i);
        v.destination(&dp.key("destination"), d.destination.as_ref());
        if let Some(h) = &d.headers {
            headers(v, &dp.key("headers"), h);
        }
    }
    weights_check(v, &p.key("route"), &weights);
    if let Some(h) = &route.headers {
        headers(v, &p.key("headers"), h);
    }
}

/// `rewrite`: what it must name, and the authority set twice.
fn rewrite(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    // rewrite.authority together with an authority header set is ambiguous.
    let sets_authority = |h: &Option<api::Headers>| {
        h.as_ref()
            .and_then(|h| h.request.as_ref())
            .is_some_and(|r| {
                r.set
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host"))
            })
    };
    if let Some(rw) = &route.rewrite {
        let rp = p.key("rewrite");
        if rw.uri.is_none() && rw.authority.is_none() && rw.uri_regex_rewrite.is_none() {
            v.err(
                &rp,
                "rewrite must specify at least one of URI, UriRegexRewrite, or authority. Only one of URI or UriRegexRewrite may be specified",
            );
        }
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            v.err(
                &rp,
                "rewrite may only contain one of URI or UriRegexRewrite",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            let rrp = rp.key("uriRegexRewrite");
            if rr.pattern.is_empty() {
                v.err(
                    &rrp.key("match"),
                    "UriRegexRewrite requires Match to be set",
                );
            } else {
                v.regex(&rrp.key("match"), &rr.pattern);
            }
            if rr.rewrite.is_empty() {
                v.err(
                    &rrp.key("rewrite"),
                    "UriRegexRewrite requires Rewrite to be set",
                );
            }
        }
        if rw.authority.is_some()
            && (sets_authority(&route.headers)
                || route.route.iter().any(|d| sets_authority(&d.headers)))
        {
            v.err(
                &rp.key("authority"),
                "authority header cannot be set in both rewrite and headers",
            );
        }
    }
}

/// `redirect`: uri or prefix rewrite, authority, port, scheme and status.
fn redirect(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(r) = &route.redirect {
        let rp = p.key("redirect");
        if r.uri.is_some() && r.prefix_rewrite.is_some() {
            v.err(
                &rp.key("prefixRewrite"),
                "redirect may only specify one of uri or prefix_rewrite",
            );
        }
        // A match without a uri is Envoy's prefix `/`, so only exact and regex uris conflict.
        let uri_not_prefix = route
            .matches
            .iter()
            .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_none()));
        if r.prefix_rewrite.is_some() && uri_not_prefix {
            v.err(
                &rp.key("prefixRewrite"),
                "redirect prefix_rewrite requires all URI matches to use prefix match type",
            );
        }
        if r.uri.is_none()
            && r.prefix_rewrite.is_none()
            && r.authority.is_none()
            && r.port.is_none()
            && r.derive_port.is_none()
            && r.scheme.is_none()
        {
            v.err(&rp, "redirect must specify URI, authority, scheme, or port");
        }
        if let Some(code) = r.redirect_code {
            if !(300..=399).contains(&code) {
                v.err(
                    &rp.key("redirectCode"),
                    format!("{code} is not a valid redirect code, must be 3xx"),
                );
            } else if ![301, 302, 303, 307, 308].contains(&code) {
                v.warn(&rp.key("redirectCode"), format!("redirect code {code} is not supported by the proxy; the route will be dropped"));
            }
        }
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                v.err(
                    &rp.key("scheme"),
                    r#"invalid redirect scheme, must be "http" or "https""#,
                );
            }
        }
        if r.port.is_some() && r.derive_port.is_some() {
            v.err(
                &rp.key("derivePort"),
                "only one of port or derivePort may be set",
            );
        }
        v.port_number(&rp.key("port"), r.port, false);
        if let Some(d) = &r.derive_port {
            if d != "FROM_PROTOCOL_DEFAULT" && d != "FROM_REQUEST_PORT" {
                v.err(&rp.key("derivePort"), format!("unknown derivePort {d:?}: expected FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"));
            }
        }
        if let Some(a) = &r.authority {
            if a.is_empty() {
                v.err(&rp.key("authority"), "redirect authority must not be empty");
            }
        }
    }
}

/// `directResponse`: status and body.
fn direct_response(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(d) = &route.direct_response {
        let dp = p.key("directResponse");
        match d.status {
            Some(s) if (200..=599).contains(&s) => {}
            Some(s) => v.err(
                &dp.key("status"),
                format!("HTTP status {s} is not in range 200-599"),
            ),
            None => v.err(&dp.key("status"), "HTTP status 0 is not in range 200-599"),
        }
        if let Some(b) = &d.body {
            let bp = dp.key("body");
            let len = match (&b.string, &b.bytes) {
                (Some(_), Some(_)) => {
                    v.err(&bp, "only one of string or bytes may be set");
                    0
                }
                (Some(s), None) => s.len(),
                (None, Some(bytes)) => {
                    match base64::engine::general_purpose::STANDARD.decode(bytes) {
                        Ok(b) => b.len(),
                        Err(e) => {
                            v.err(&bp.key("bytes"), format!("bytes must be base64: {e}"));
                            0
                        }
                    }
                }
                (None, None) => 0,
            };
            if len > MAX_DIRECT_RESPONSE_BODY {
                v.err(&bp, format!("large direct_responses may impact control plane performance, must be less than {MAX_DIRECT_RESPONSE_BODY} bytes"));
            } else if len > 100 * 1024 {
                v.warn(
                    &bp,
                    "large direct_responses may impact control plane performance",
                );
            }
        }
    }
}

/// `retries`: attempts, per-try timeout and the conditions.
fn retries(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(r) = &route.retries {
        let rp = p.key("retries");
        let attempts = r.attempts.unwrap_or(0);
        if attempts < 0 {
            v.err(&rp.key("attempts"), "attempts cannot be negative");
        }
        if attempts == 0
            && (r.per_try_timeout.is_some()
                || r.retry_on.is_some()
                || r.retry_remote_localities.is_some())
        {
            v.err(
                &rp,
                "http retry policy configured when attempts are set to 0 (disabled)",
            );
        }
        v.duration(&rp.key("perTryTimeout"), r.per_try_timeout.as_ref(), false);
        v.duration(&rp.key("backoff"), r.backoff.as_ref(), false);
        if let Some(on) = &r.retry_on {
            for tok in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let status_ok = tok.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status_ok && !RETRY_ON_POLICIES.contains(&tok) {
                    v.err(
                        &rp.key("retryOn"),
                        format!("{tok:?} is not a valid retryOn policy"),
                    );
                }
            }
        }
    }
}

/// `fault`: delay and abort.
fn fault(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(f) = &route.fault {
        let fp = p.key("fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(
                &fp,
                "HTTP fault injection must have an abort and/or a delay",
            );
        }
        if let Some(d) = &f.delay {
            let dp = fp.key("delay");
            if let Some(pc) = d.percent {
                if !(0..=100).contains(&pc) {
                    v.err(
                        &dp.key("percent"),
                        format!("percentage {pc} is not in range 0..100"),
                    );
                }
            }
            v.percentage(&dp.key("percentage"), d.percentage.as_ref());
            if d.exponential_delay.is_some() {
                v.err(
                    &dp.key("exponentialDelay"),
                    "exponentialDelay not supported yet",
                );
            } else if d.fixed_delay.is_none() {
                v.err(&dp.key("fixedDelay"), "duration required");
            } else {
                v.duration(&dp.key("fixedDelay"), d.fixed_delay.as_ref(), false);
            }
        }
        if let Some(a) = &f.abort {
            let ap = fp.key("abort");
            v.percentage(&ap.key("percentage"), a.percentage.as_ref());
            if a.http2_error.is_some() {
                v.err(
                    &ap.key("http2Error"),
                    "HTTP/2 abort fault injection not supported yet",
                );
            }
            match (a.http_status, &a.grpc_status) {
                (Some(_), Some(_)) => v.err(&ap, "only one of httpStatus or grpcStatus may be set"),
                (Some(s), None) if !(200..=599).contains(&s) => v.err(
                    &ap.key("httpStatus"),
                    format!("invalid abort http status {s}"),
                ),
                (None, Some(g)) if !GRPC_CODES.contains(&g.as_str()) => v.err(
                    &ap.key("grpcStatus"),
                    format!("invalid abort grpc status {g:?}"),
                ),
                (None, None) if a.http2_error.is_none() => {
                    v.err(&ap, "abort must specify either httpStatus or grpcStatus")
                }
                _ => {}
            }
        }
    }
}

/// `mirror` with its percentages, and `mirrors`.
fn mirrors(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(m) = &route.mirror {
        v.destination(&p.key("mirror"), Some(m));
    }
    if let Some(pc) = route.mirror_percent {
        if pc < 0 {
            v.err(
                &p.key("mirrorPercent"),
                format!("mirror_percent must be an unsigned integer (it has {pc})"),
            );
        } else if pc > 100 {
            v.err(
                &p.key("mirrorPercent"),
                format!("mirror_percent must have a max value of 100 (it has {pc})"),
            );
        }
        v.warn(
            &p.key("mirrorPercent"),
            r#"using deprecated setting "mirrorPercent", use "mirrorPercentage" instead"#,
        );
    }
    if let Some(pc) = &route.mirror_percentage {
        let path = p.key("mirrorPercentage").key("value");
        if pc.value > 100.0 {
            v.err(
                &path,
                format!(
                    "mirror_percentage must have a max value of 100 (it has {:.6})",
                    pc.value
                ),
            );
        } else if pc.value < 0.0 || pc.value.is_nan() {
            v.err(
                &path,
                format!(
                    "mirror_percentage must have a min value of 0 (it has {:.6})",
                    pc.value
                ),
            );
        }
    }
    for (i, m) in route.mirrors.iter().enumerate() {
        let mp = p.key("mirrors").idx(i);
        v.destination(&mp.key("destination"), m.destination.as_ref());
        v.percentage(&mp.key("percentage"), m.percentage.as_ref());
    }
}

/// `corsPolicy`.
fn cors(v: &mut V<'_>, p: &FieldPath, route: &api::HttpRoute) {
    if let Some(c) = &route.cors_policy {
        let cp = p.key("corsPolicy");
        for (i, o) in c.allow_origins.iter().enumerate() {
            v.string_match(&cp.key("allowOrigins").idx(i), o, "origin");
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) {
                v.err(
                    &cp.key("allowMethods").idx(i),
                    format!("{m:?} is not a supported HTTP method"),
                );
            }
        }
        for (i, h) in c.allow_headers.iter().enumerate() {
            v.header_name(&cp.key("allowHeaders").idx(i), h);
        }
        for (i, h) in c.expose_headers.iter().enumerate() {
            v.header_name(&cp.key("exposeHeaders").idx(i), h);
        }
        if let Some(ma) = &c.max_age {
            if let Ok(ns) = ma.nanos() {
                if ns % 1_000_000_000 != 0 {
                    v.err(
                        &cp.key("maxAge"),
                        "max_age duration is accurate only to seconds precision",
                    );
                }
            } else {
                v.duration(&cp.key("maxAge"), Some(ma), true);
            }
        }
        if let Some(u) = &c.unmatched_preflights {
            if !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE") {
                v.err(
                    &cp.key("unmatchedPreflights"),
                    format!("unknown unmatchedPreflights {u:?}: expected FORWARD or IGNORE"),
                );
            }
        }
    }
}
