//! What the engine sees of a request: borrowed from the host's header map, never copied.

use std::borrow::Cow;

/// The request as the host hands it to the engine.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// `http` or `https`, as the client spoke it (or as a trusted proxy reported it).
    pub scheme: &'a str,
    /// `:authority` exactly as sent (may carry a port).
    pub authority: &'a str,
    /// `:path` including any query string.
    pub path: &'a str,
    /// The port that selects the route table: the service port (sidecar, from the authority)
    /// or the Gateway server port the request arrived on.
    pub port: u16,
    /// Every request header with a lower-case name, pseudo-headers included.
    pub headers: &'a [(String, String)],
    /// Downstream address (IP only), for `useSourceIp` hashing.
    pub source_ip: Option<&'a str>,
    /// The connection was addressed to the destination itself (transparent capture, Istio's
    /// per-port listeners) rather than to the proxy: traffic for unknown hosts goes on to
    /// that original destination, which the host knows, instead of to the authority.
    pub transparent: bool,
}

impl<'a> RequestView<'a> {
    pub fn path_without_query(&self) -> &'a str {
        split_query(self.path).0
    }

    /// The header's value; repeated headers are joined with `,` as Envoy's matchers see them.
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut values = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{second}");
                for v in values {
                    joined.push(',');
                    joined.push_str(v);
                }
                Some(Cow::Owned(joined))
            }
        }
    }

    /// First value of a query parameter, percent-decoded; `?key` yields `""`.
    pub fn query_param(&self, name: &str) -> Option<Cow<'a, str>> {
        let query = split_query(self.path).1?;
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key) == name).then(|| percent_decode(value))
            })
    }

    /// The cookie's value from the `cookie` header(s).
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                // A quoted value means the text inside the quotes (RFC 6265 cookie-value).
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (k == name).then_some(v)
            })
    }

    /// Host part of the authority, without port or IPv6 brackets.
    pub fn host(&self) -> &'a str {
        split_host_port(self.authority).0
    }
}

/// `(path, query)`; a fragment, if a client sent one, is dropped.
pub fn split_query(path: &str) -> (&str, Option<&str>) {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

/// Splits `host:port`, `[v6]:port`, `host` and `[v6]`.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return (authority, None);
        };
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        // More than one colon without brackets is a bare IPv6 address.
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// A query component with `%XX` escapes and `+` decoded.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn host_port_forms() {
        assert_eq!(split_host_port("a.b:8080"), ("a.b", Some(8080)));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn query_decoding() {
        let req = RequestView {
            method: "GET",
            scheme: "http",
            authority: "x",
            path: "/p?a=1&b&c=hello%20world&d=x+y&a=2",
            port: 80,
            headers: &[],
            source_ip: None,
            transparent: false,
        };
        assert_eq!(req.query_param("a").as_deref(), Some("1"));
        assert_eq!(req.query_param("b").as_deref(), Some(""));
        assert_eq!(req.query_param("c").as_deref(), Some("hello world"));
        assert_eq!(req.query_param("d").as_deref(), Some("x y"));
        assert_eq!(req.query_param("z"), None);
        assert_eq!(req.path_without_query(), "/p");
    }
}
