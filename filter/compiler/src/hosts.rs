//! Host names as Istio treats them: FQDN and wildcard validation, matching, specificity,
//! short-name expansion.

use std::cmp::Ordering;
use std::net::IpAddr;

pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// DNS-1123 label (case-insensitive, as Istio lower-cases hosts).
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Validates an FQDN (one or more labels, at most 255 characters).
pub fn validate_fqdn(host: &str) -> Result<(), String> {
    let h = host.strip_suffix('.').unwrap_or(host);
    if h.is_empty() {
        return Err("domain name is empty".into());
    }
    if h.len() > 255 {
        return Err(format!("domain name {host:?} too long (max 255)"));
    }
    for label in h.split('.') {
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {host:?} invalid (label {label:?} must consist of alphanumeric characters or '-', start and end with an alphanumeric character, at most 63 characters)"
            ));
        }
    }
    Ok(())
}

/// Validates `*`, `*.example.com` or an FQDN; partial wildcards (`*bar.com`, `foo.*.com`) fail.
/// The words are istiod's (`ValidateWildcardDomain`, `ValidatePartialWildCard`).
pub fn validate_wildcard_domain(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let (first, rest) = host.split_once('.').unwrap_or((host, ""));
    if let Some(label) = rest.split('.').find(|l| l.contains('*')) {
        return Err(format!(
            "domain name {host:?} invalid (label {label:?} invalid): a wildcard is only allowed as the whole first label"
        ));
    }
    if first == "*" {
        return validate_fqdn(rest).map_err(|e| format!("invalid host {host:?}: {e}"));
    }
    if first.contains('*') {
        return Err(format!(
            "partial wildcard {host:?} not allowed; use `*` as the whole first label (`*.example.com`)"
        ));
    }
    validate_fqdn(host)
}

/// An SNI name Envoy generates for AUTO_PASSTHROUGH, `outbound_.PORT_._.HOST`, which istiod
/// allows as a host of a VirtualService bound to a gateway with SNI matches.
pub fn validate_auto_sni_domain(host: &str) -> Result<(), String> {
    let format = "outbound_.<port>_._.<hostname>";
    let invalid = |label: &str| {
        format!(
            "domain name {host:?} invalid (label {label:?} invalid). should follow {format} format"
        )
    };
    let rest = host
        .strip_prefix("outbound_.")
        .ok_or_else(|| invalid("outbound_"))?;
    let (port, hostname) = rest.split_once("_._.").ok_or_else(|| invalid(rest))?;
    if !port.contains(|c: char| c.is_ascii_digit()) {
        return Err(invalid(port));
    }
    if !hostname.contains(|c: char| c.is_ascii_alphabetic()) {
        return Err(invalid(hostname));
    }
    Ok(())
}

pub fn is_ip(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

pub fn is_wildcard(host: &str) -> bool {
    host.starts_with('*')
}

/// Expands a short name (no dot) with the rule's namespace: `reviews` → `reviews.ns.svc.cluster.local`.
/// Names with a dot, wildcards and IPs are taken as they are (Istio does the same).
pub fn resolve_short_name(host: &str, namespace: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains('.') || host.starts_with('*') || is_ip(&host) || host.is_empty() {
        return host;
    }
    format!("{host}.{namespace}.{DOMAIN_SUFFIX}")
}

/// `pattern` (exact or `*.suffix` or `*`) matches a concrete host.
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        // `*.foo.com` matches `a.foo.com` but not `foo.com`.
        return host.len() > suffix.len() && host.ends_with(suffix);
    }
    pattern.eq_ignore_ascii_case(host)
}

/// `a` ⊆ `b`: every host `a` names is also named by `b`.
pub fn subset_of(a: &str, b: &str) -> bool {
    if b == "*" {
        return true;
    }
    if a == "*" {
        return false;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb),
        (None, Some(_)) => matches(b, a),
        (Some(_), None) => false,
        (None, None) => a.eq_ignore_ascii_case(b),
    }
}

/// `a` and `b` name at least one host in common.
pub fn intersects(a: &str, b: &str) -> bool {
    subset_of(a, b) || subset_of(b, a)
}

/// The more specific of two intersecting host patterns (what a gateway vhost is named after).
pub fn more_specific<'a>(a: &'a str, b: &'a str) -> &'a str {
    if subset_of(a, b) {
        a
    } else {
        b
    }
}

/// Istio's ordering: exact names first, then longer wildcards, then lexical.
pub fn specificity_cmp(a: &str, b: &str) -> Ordering {
    match (is_wildcard(a), is_wildcard(b)) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        _ => b.len().cmp(&a.len()).then_with(|| a.cmp(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn wildcard_rules() {
        assert!(validate_wildcard_domain("*").is_ok());
        assert!(validate_wildcard_domain("*.foo.com").is_ok());
        assert!(validate_wildcard_domain("*bar.com").is_err());
        assert!(validate_wildcard_domain("foo.*.com").is_err());
        assert!(validate_wildcard_domain("reviews").is_ok());
        assert!(validate_wildcard_domain("-bad.com").is_err());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn wildcard_matching() {
        assert!(matches("*.foo.com", "a.foo.com"));
        assert!(matches("*.foo.com", "a.b.foo.com"));
        assert!(!matches("*.foo.com", "foo.com"));
        assert!(matches("*", "anything"));
        assert!(matches("Foo.COM", "foo.com"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn subsets_and_specificity() {
        assert!(subset_of("*.bar.foo.com", "*.foo.com"));
        assert!(!subset_of("*.foo.com", "*.bar.foo.com"));
        assert!(subset_of("a.foo.com", "*.foo.com"));
        assert_eq!(
            more_specific("*.example.com", "a.example.com"),
            "a.example.com"
        );
        assert_eq!(more_specific("*", "foo.bar"), "foo.bar");
        let mut v = vec!["*", "*.com", "a.b.com", "*.b.com"];
        v.sort_by(|a, b| specificity_cmp(a, b));
        assert_eq!(v, vec!["a.b.com", "*.b.com", "*.com", "*"]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn short_names() {
        assert_eq!(
            resolve_short_name("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            resolve_short_name("reviews.other", "default"),
            "reviews.other"
        );
        assert_eq!(resolve_short_name("*", "default"), "*");
        assert_eq!(resolve_short_name("10.0.0.1", "default"), "10.0.0.1");
    }
}
