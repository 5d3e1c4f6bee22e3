//! Compiled request matchers: every regex is built once, when the rules are loaded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

use crate::ir::{HeaderMatch, QueryMatch, RouteMatch, StringMatch};

use super::{BuildError, RequestView};

/// A [`StringMatch`] ready to run.
#[derive(Debug)]
pub(crate) enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Arc<Regex>),
    Present,
}

impl Matcher {
    pub(crate) fn build(m: &StringMatch, case_insensitive: bool) -> Result<Self, BuildError> {
        Ok(match m {
            StringMatch::Exact(s) if case_insensitive => Self::Exact(s.to_ascii_lowercase()),
            StringMatch::Exact(s) => Self::Exact(s.clone()),
            StringMatch::Prefix(s) if case_insensitive => Self::Prefix(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => Self::Prefix(s.clone()),
            StringMatch::Regex(r) => Self::Regex(full_match_regex(r)?),
            StringMatch::Present => Self::Present,
        })
    }

    /// Case-sensitive match of a present value.
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(value),
            Self::Present => true,
        }
    }

    /// Exact and prefix compare ASCII case-insensitively (`ignoreUriCase`); regexes do not.
    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value.eq_ignore_ascii_case(s),
            Self::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            other => other.matches(value),
        }
    }
}

thread_local! {
    /// Patterns compiled during one [`super::Engine::new`]: large configurations repeat the
    /// same regex across many hosts. Shared behind an `Arc`: cloning a `Regex` itself gives
    /// each copy its own cache pool (about a kilobyte before first use).
    static COMPILED: RefCell<HashMap<String, Arc<Regex>>> = RefCell::new(HashMap::new());
}

/// Drops the compile cache (end of a load).
pub(crate) fn forget_compiled() {
    COMPILED.with(|c| c.borrow_mut().clear());
}

/// Compiles `pattern` once per load.
pub(crate) fn regex(pattern: &str) -> Result<Arc<Regex>, BuildError> {
    if let Some(re) = COMPILED.with(|c| c.borrow().get(pattern).cloned()) {
        return Ok(re);
    }
    let re = Arc::new(Regex::new(pattern).map_err(|e| BuildError::Regex {
        pattern: pattern.to_owned(),
        reason: e.to_string(),
    })?);
    COMPILED.with(|c| c.borrow_mut().insert(pattern.to_owned(), Arc::clone(&re)));
    Ok(re)
}

/// RE2 matchers in Istio match the whole value; anchor the pattern once here.
pub(crate) fn full_match_regex(pattern: &str) -> Result<Arc<Regex>, BuildError> {
    regex(&format!("^(?:{pattern})$")).map_err(|e| match e {
        BuildError::Regex { reason, .. } => BuildError::Regex {
            pattern: pattern.to_owned(),
            reason,
        },
        other => other,
    })
}

#[derive(Debug)]
struct CompiledHeader {
    name: String,
    matcher: Matcher,
    invert: bool,
}

#[derive(Debug)]
struct CompiledQuery {
    name: String,
    matcher: Matcher,
}

/// One `match` block: every condition present must hold.
#[derive(Debug)]
pub(crate) struct CompiledMatch {
    /// Istio's name of the Envoy route this block becomes: the HTTP route's name, then
    /// `.` and the match's name when it has one (what `%ROUTE_NAME%` logs).
    pub(crate) route_name: String,
    pub(crate) uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<CompiledHeader>,
    query: Vec<CompiledQuery>,
    port: Option<u16>,
}

impl CompiledMatch {
    pub(crate) fn build(route_name: &str, m: &RouteMatch) -> Result<Self, BuildError> {
        let plain =
            |m: &Option<StringMatch>| m.as_ref().map(|m| Matcher::build(m, false)).transpose();
        Ok(Self {
            route_name: if m.name.is_empty() {
                route_name.to_owned()
            } else {
                format!("{route_name}.{}", m.name)
            },
            uri: m
                .uri
                .as_ref()
                .map(|u| Matcher::build(u, m.ignore_uri_case))
                .transpose()?,
            ignore_uri_case: m.ignore_uri_case,
            scheme: plain(&m.scheme)?,
            method: plain(&m.method)?,
            authority: plain(&m.authority)?,
            headers: m
                .headers
                .iter()
                .map(|h: &HeaderMatch| {
                    Ok(CompiledHeader {
                        name: h.name.to_ascii_lowercase(),
                        matcher: Matcher::build(&h.matcher, false)?,
                        invert: h.invert,
                    })
                })
                .collect::<Result<_, BuildError>>()?,
            query: m
                .query_params
                .iter()
                .map(|q: &QueryMatch| {
                    Ok(CompiledQuery {
                        name: q.name.clone(),
                        matcher: Matcher::build(&q.matcher, false)?,
                    })
                })
                .collect::<Result<_, BuildError>>()?,
            port: m.port,
        })
    }

    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        self.first_failure(req).is_none()
    }

    /// The first condition that does not hold, in evaluation order.
    pub(crate) fn first_failure(&self, req: &RequestView<'_>) -> Option<Condition<'_>> {
        if self.port.is_some_and(|p| p != req.port) {
            return Some(Condition::Port);
        }
        if let Some(uri) = &self.uri {
            let path = req.path_without_query();
            let ok = if self.ignore_uri_case {
                uri.matches_ignore_case(path)
            } else {
                uri.matches(path)
            };
            if !ok {
                return Some(Condition::Uri);
            }
        }
        let pseudo = [
            (&self.scheme, req.scheme, Condition::Scheme),
            (&self.method, req.method, Condition::Method),
            (&self.authority, req.authority, Condition::Authority),
        ];
        for (m, v, c) in pseudo {
            if m.as_ref().is_some_and(|m| !m.matches(v)) {
                return Some(c);
            }
        }
        if let Some(h) = self.headers.iter().find(|h| !header_matches(h, req)) {
            return Some(Condition::Header(&h.name));
        }
        self.query
            .iter()
            .find(|q| !query_matches(q, req))
            .map(|q| Condition::Query(&q.name))
    }
}

/// A condition of a match block (for explaining why a route did not match).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition<'a> {
    Port,
    Uri,
    Scheme,
    Method,
    Authority,
    Header(&'a str),
    Query(&'a str),
}

impl std::fmt::Display for Condition<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Port => f.write_str("port"),
            Self::Uri => f.write_str("uri"),
            Self::Scheme => f.write_str("scheme"),
            Self::Method => f.write_str("method"),
            Self::Authority => f.write_str("authority"),
            Self::Header(h) => write!(f, "header {h}"),
            Self::Query(q) => write!(f, "query parameter {q}"),
        }
    }
}

fn header_matches(h: &CompiledHeader, req: &RequestView<'_>) -> bool {
    let value = req.header(&h.name);
    if let Matcher::Present = h.matcher {
        return value.is_some() != h.invert;
    }
    match (value, h.invert) {
        (Some(v), invert) => h.matcher.matches(&v) != invert,
        // withoutHeaders treats a missing header as the empty string.
        (None, true) => !h.matcher.matches(""),
        (None, false) => false,
    }
}

fn query_matches(q: &CompiledQuery, req: &RequestView<'_>) -> bool {
    match req.query_param(&q.name) {
        Some(v) => q.matcher.matches(&v),
        None => false,
    }
}
