//! Istio YAML in, request decisions out: the engine run on documents the compiler made, each
//! case written from Istio's documented behaviour (reference: istio-semantics.md).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions"
)]

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::contract::EXPLICIT_PROXY_PORT;
use meshroute_core::engine::{EditOp, Engine, Outcome, RequestView, SplitMix64};
use meshroute_core::ir::OutboundPolicy;
use wasm_bindgen_test::wasm_bindgen_test;

const REGISTRY: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nothing-here}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: default}
spec: {address: 10.0.0.1, ports: {http: 9001}, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: default}
spec: {address: 10.0.0.2, ports: {http: 9002}, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: default}
spec: {address: 10.0.0.3, ports: {http: 9003}, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-v1, namespace: default}
spec: {address: 10.0.1.1, ports: {http: 9101}, labels: {app: ratings, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
  - {name: v9, labels: {version: v9}}
---
";

fn engine_with(yaml: &str, outbound: OutboundPolicy) -> Engine {
    let mut c = Config::default();
    let load = c.add_text("t.yaml", &format!("{REGISTRY}{yaml}"));
    assert!(load.iter().all(|d| !d.is_error()), "{load:?}");
    let proxy = ProxyOptions::sidecar("default");
    let mesh = MeshOptions {
        outbound_traffic_policy: outbound,
        ..MeshOptions::default()
    };
    let out = compile(&c, &proxy, &mesh);
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    Engine::new(out.document.expect("document")).expect("engine")
}

fn engine(yaml: &str) -> Engine {
    engine_with(yaml, OutboundPolicy::AllowAny)
}

/// What one decision looked like, flattened for assertions.
#[derive(Debug, Default)]
struct Seen {
    status: Option<u16>,
    flag: String,
    body: String,
    reply_headers: Vec<(String, String)>,
    cluster: String,
    endpoint: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    request_edits: Vec<(EditOp, String, String)>,
    response_edits: Vec<(EditOp, String, String)>,
    delay_ms: Option<u64>,
    timeout_ms: Option<u64>,
    mirrors: Vec<String>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.reply_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Req<'a> {
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

fn get<'a>(authority: &'a str, path: &'a str) -> Req<'a> {
    Req {
        method: "GET",
        authority,
        path,
        headers: Vec::new(),
    }
}

impl<'a> Req<'a> {
    fn header(mut self, k: &'a str, v: &'a str) -> Self {
        self.headers.push((k, v));
        self
    }

    fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }

    fn run(&self, engine: &Engine, seed: u64) -> Seen {
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), self.method.into()),
            (":authority".into(), self.authority.into()),
            (":path".into(), self.path.into()),
            (":scheme".into(), "http".into()),
        ];
        headers.extend(self.headers.iter().map(|(k, v)| ((*k).into(), (*v).into())));
        let view = RequestView {
            method: self.method,
            scheme: "http",
            authority: self.authority,
            path: self.path,
            port: engine.route_port(self.authority, "http", Some(EXPLICIT_PROXY_PORT)),
            headers: &headers,
            source_ip: Some("10.9.9.9"),
            transparent: false,
        };
        let d = engine.decide(&view, &mut SplitMix64(seed));
        let mut seen = Seen {
            delay_ms: d.delay_ms,
            ..Seen::default()
        };
        let edits = |e: &[meshroute_core::engine::HeaderEdit<'_>]| {
            e.iter()
                .map(|e| (e.op, e.name.to_string(), e.value.to_string()))
                .collect()
        };
        match d.outcome {
            Outcome::Reply(r) => {
                seen.status = Some(r.status);
                seen.flag = r.flag.map_or("", |f| f.code()).into();
                seen.body = String::from_utf8_lossy(&r.body).into();
                seen.reply_headers = r.headers;
            }
            Outcome::Forward(f) => {
                seen.cluster = f.cluster.to_string();
                seen.endpoint = f.endpoint;
                seen.path = f.path;
                seen.authority = f.authority.map(str::to_owned);
                seen.request_edits = edits(&f.request_edits);
                seen.response_edits = edits(&f.response_edits);
                seen.timeout_ms = f.timeout_ms;
                seen.mirrors = f.mirrors.iter().map(|m| m.cluster.to_string()).collect();
            }
        }
        seen
    }

    fn once(&self, engine: &Engine) -> Seen {
        self.run(engine, 7)
    }
}

const JASON: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v3}
";

#[wasm_bindgen_test(unsupported = test)]
fn header_match_routes_jason_to_v2_and_everyone_else_to_v3() {
    let e = engine(JASON);
    let jason = get("reviews:9080", "/reviews/1")
        .header("end-user", "jason")
        .once(&e);
    assert_eq!(
        jason.cluster,
        "outbound|9080|v2|reviews.default.svc.cluster.local"
    );
    assert_eq!(jason.endpoint.as_deref(), Some("10.0.0.2:9002"));
    let other = get("reviews:9080", "/reviews/1")
        .header("end-user", "mallory")
        .once(&e);
    assert_eq!(
        other.cluster,
        "outbound|9080|v3|reviews.default.svc.cluster.local"
    );
    assert_eq!(other.endpoint.as_deref(), Some("10.0.0.3:9003"));
    // Header values are case-sensitive.
    let upper = get("reviews:9080", "/")
        .header("end-user", "Jason")
        .once(&e);
    assert!(upper.cluster.contains("|v3|"));
}

#[wasm_bindgen_test(unsupported = test)]
fn host_lookup_uses_aliases_ignores_case_and_port() {
    let e = engine(JASON);
    for authority in [
        "reviews:9080",
        "REVIEWS.default:9080",
        "reviews.default.svc:9080",
        "reviews.default.svc.cluster.local:9080",
        "Reviews.Default.Svc.Cluster.Local.:9080",
    ] {
        let seen = get(authority, "/").once(&e);
        assert!(
            seen.cluster.contains("|v3|reviews"),
            "{authority}: {seen:?}"
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn unknown_hosts_pass_through_or_get_502_by_outbound_policy() {
    let allow = engine(JASON);
    let seen = get("10.1.2.3:8080", "/x").once(&allow);
    assert_eq!(seen.cluster, "PassthroughCluster");
    assert_eq!(seen.endpoint.as_deref(), Some("10.1.2.3:8080"));

    let registry_only = engine_with(JASON, OutboundPolicy::RegistryOnly);
    let seen = get("example.com", "/x").once(&registry_only);
    assert_eq!(seen.status, Some(502));
    // A known service still routes.
    let seen = get("reviews:9080", "/").once(&registry_only);
    assert!(seen.cluster.contains("|v3|"));
}

#[wasm_bindgen_test(unsupported = test)]
fn no_matching_route_is_404_nr() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: reviews, subset: v2}}]
",
    );
    let seen = get("reviews:9080", "/other").once(&e);
    assert_eq!(
        (seen.status, seen.flag.as_str(), seen.body.as_str()),
        (Some(404), "NR", "")
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn missing_subset_is_503_nc_and_empty_subset_is_503_uh() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /undeclared}}]
    route: [{destination: {host: reviews, subset: nope}}]
  - match: [{uri: {prefix: /empty}}]
    route: [{destination: {host: reviews, subset: v9}}]
  - route: [{destination: {host: empty}}]
",
    );
    let nc = get("reviews:9080", "/undeclared").once(&e);
    assert_eq!((nc.status, nc.flag.as_str()), (Some(503), "NC"));
    let uh = get("reviews:9080", "/empty").once(&e);
    assert_eq!(
        (uh.status, uh.flag.as_str(), uh.body.as_str()),
        (Some(503), "UH", "no healthy upstream")
    );
    let no_endpoints = get("reviews:9080", "/").once(&e);
    assert_eq!(no_endpoints.status, Some(503));
    assert_eq!(no_endpoints.body, "no healthy upstream");
}

#[wasm_bindgen_test(unsupported = test)]
fn uri_matches_follow_istio() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /Pre}, ignoreUriCase: true}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {regex: '/id/[0-9]+'}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: ratings}}]
",
    );
    let to = |path: &str| get("reviews:9080", path).once(&e).cluster;
    assert!(to("/exact").contains("|v1|"));
    assert!(
        to("/exact?x=1").contains("|v1|"),
        "query is not part of the path"
    );
    assert!(!to("/exact/more").contains("|v1|"));
    assert!(to("/prefix").contains("|v2|"), "ignoreUriCase");
    assert!(to("/PREFIXED/x").contains("|v2|"), "plain string prefix");
    assert!(to("/id/42").contains("|v3|"));
    assert!(
        !to("/id/42/x").contains("|v3|"),
        "regex matches the whole path"
    );
    assert!(!to("/x/id/42").contains("|v3|"));
    assert!(to("/other").contains("ratings"));
}

#[wasm_bindgen_test(unsupported = test)]
fn method_authority_headers_query_and_port_matches() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: post
    match: [{method: {exact: POST}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: authority
    match: [{authority: {prefix: 'reviews.default'}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: presence-and-pseudo
    match: [{headers: {x-debug: {}, ':path': {prefix: /dbg}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - name: regex-header
    match: [{headers: {x-ver: {regex: 'v[0-9]'}}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: query
    match: [{queryParams: {q: {exact: ''}}}, {queryParams: {num: {regex: '\\d+'}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: port
    match: [{port: 9999}]
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: ratings}}]
",
    );
    let to = |r: Req<'_>| r.once(&e).cluster;
    assert!(to(get("reviews:9080", "/").method("POST")).contains("|v1|"));
    assert!(to(get("reviews.default:9080", "/")).contains("|v2|"));
    assert!(
        to(get("reviews:9080", "/dbg/x").header("x-debug", "")).contains("|v3|"),
        "presence matches an empty value"
    );
    assert!(
        to(get("reviews:9080", "/other").header("x-debug", "1")).contains("ratings"),
        "AND inside a block"
    );
    assert!(to(get("reviews:9080", "/").header("x-ver", "v7")).contains("|v1|"));
    assert!(
        to(get("reviews:9080", "/").header("x-ver", "v7x")).contains("ratings"),
        "regex is full-value"
    );
    assert!(
        to(get("reviews:9080", "/?q")).contains("|v2|"),
        "?q matches exact ''"
    );
    assert!(
        to(get("reviews:9080", "/?num=123")).contains("|v2|"),
        "OR across blocks"
    );
    assert!(to(get("reviews:9080", "/?num=a123")).contains("ratings"));
    assert!(
        to(get("reviews:9080", "/")).contains("ratings"),
        "port 9999 never equals 9080"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn without_headers_treats_missing_as_empty() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{withoutHeaders: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v2}}]
",
    );
    assert!(get("reviews:9080", "/").once(&e).cluster.contains("|v1|"));
    assert!(get("reviews:9080", "/")
        .header("end-user", "bob")
        .once(&e)
        .cluster
        .contains("|v1|"));
    assert!(get("reviews:9080", "/")
        .header("end-user", "jason")
        .once(&e)
        .cluster
        .contains("|v2|"));
}

#[wasm_bindgen_test(unsupported = test)]
fn weighted_split_follows_relative_weights() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 9}
    - {destination: {host: reviews, subset: v2}, weight: 1}
    - {destination: {host: reviews, subset: v3}, weight: 0}
",
    );
    let mut counts = [0u32; 3];
    for seed in 0..10_000 {
        let c = get("reviews:9080", "/").run(&e, seed).cluster;
        let i = ["|v1|", "|v2|", "|v3|"]
            .iter()
            .position(|s| c.contains(s))
            .expect("subset");
        counts[i] += 1;
    }
    assert_eq!(counts[2], 0, "weight 0 is dropped");
    assert!((8_800..=9_200).contains(&counts[0]), "{counts:?}");
}

#[wasm_bindgen_test(unsupported = test)]
fn redirects_keep_query_and_follow_port_rules() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new/path}
  - match: [{uri: {prefix: /foo/}}]
    redirect: {uri: /bar, authority: other.example, redirectCode: 308}
  - match: [{uri: {prefix: /pre/}}]
    redirect: {prefixRewrite: /post/}
  - match: [{uri: {prefix: /tls}}]
    redirect: {scheme: https}
  - match: [{uri: {prefix: /port}}]
    redirect: {port: 8443, scheme: https}
  - match: [{uri: {prefix: /derive}}]
    redirect: {derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {prefix: /q}}]
    redirect: {uri: '/new?own=1'}
    headers: {response: {set: {x-why: moved}}}
",
    );
    let loc = |authority: &str, path: &str| {
        let s = get(authority, path).once(&e);
        (
            s.status.unwrap_or(0),
            s.header("location").unwrap_or("").to_owned(),
        )
    };
    assert_eq!(
        loc("reviews:9080", "/old?key=value"),
        (301, "http://reviews:9080/new/path?key=value".into())
    );
    assert_eq!(
        loc("reviews:9080", "/foo/x"),
        (308, "http://other.example/bar".into())
    );
    assert_eq!(
        loc("reviews:9080", "/pre/a/b?z"),
        (301, "http://reviews:9080/post/a/b?z".into())
    );
    assert_eq!(
        loc("reviews:9080", "/tls"),
        (301, "https://reviews:9080/tls".into())
    );
    assert_eq!(
        loc("reviews:9080", "/port"),
        (301, "https://reviews:8443/port".into())
    );
    assert_eq!(
        loc("reviews:9080", "/derive"),
        (301, "http://reviews:9080/derive".into())
    );
    assert_eq!(
        loc("reviews:9080", "/q?x=1"),
        (301, "http://reviews:9080/new?own=1".into())
    );
    assert_eq!(
        get("reviews:9080", "/q").once(&e).header("x-why"),
        Some("moved")
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn direct_response_status_body_and_headers() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /s}}]
    directResponse: {status: 418, body: {string: teapot}}
    headers: {response: {set: {content-type: application/json}}}
  - match: [{uri: {exact: /b}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - directResponse: {status: 204}
",
    );
    let s = get("reviews:9080", "/s").once(&e);
    assert_eq!((s.status, s.body.as_str()), (Some(418), "teapot"));
    assert_eq!(s.header("content-type"), Some("application/json"));
    let b = get("reviews:9080", "/b").once(&e);
    assert_eq!((b.status, b.body.as_str()), (Some(200), "hello"));
    assert_eq!(b.header("content-type"), Some("text/plain"));
    let n = get("reviews:9080", "/").once(&e);
    assert_eq!((n.status, n.body.as_str()), (Some(204), ""));
}

#[wasm_bindgen_test(unsupported = test)]
fn rewrites_replace_prefix_whole_path_or_regex() {
    let e = engine(
        r"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /wpcatalog}}]
    rewrite: {uri: /newcatalog}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /foo}}]
    rewrite: {uri: /new/path, authority: backend.internal}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /common}}]
    rewrite: {uri: /}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /service}}]
    rewrite:
      uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '/customprefix/\2/\1'}
    route: [{destination: {host: reviews, subset: v1}}]
",
    );
    let path = |p: &str| get("reviews:9080", p).once(&e).path;
    assert_eq!(
        path("/wpcatalog/x?y=1").as_deref(),
        Some("/newcatalog/x?y=1")
    );
    assert_eq!(
        path("/foo?key=value").as_deref(),
        Some("/new/path?key=value")
    );
    assert_eq!(
        path("/common/api").as_deref(),
        Some("//api"),
        "Envoy's prefix pitfall"
    );
    assert_eq!(
        path("/service/update/v1/api").as_deref(),
        Some("/customprefix//v1/api/update")
    );
    assert_eq!(
        get("reviews:9080", "/foo").once(&e).authority.as_deref(),
        Some("backend.internal")
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn header_operations_keep_istio_order_and_authority_precedence() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /single}}]
    headers:
      request: {set: {x-a: route, ':authority': route.host}, add: {x-b: r}, remove: [x-c]}
      response: {set: {x-r: route}}
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request: {set: {x-a: dest, host: dest.host}}
        response: {set: {x-r: dest}}
  - match: [{uri: {prefix: /dest-authority}}]
    route:
    - destination: {host: reviews, subset: v1}
      headers: {request: {set: {host: dest.host}}}
",
    );
    let s = get("reviews:9080", "/single").once(&e);
    let sets: Vec<_> = s
        .request_edits
        .iter()
        .filter(|(op, n, _)| *op == EditOp::Set && n == "x-a")
        .map(|(_, _, v)| v.as_str())
        .collect();
    assert_eq!(
        sets,
        ["route", "dest"],
        "single destination: destination set applies last"
    );
    assert_eq!(
        s.request_edits[0],
        (EditOp::Remove, "x-c".into(), String::new())
    );
    assert!(s
        .request_edits
        .contains(&(EditOp::Add, "x-b".into(), "r".into())));
    assert_eq!(
        s.authority.as_deref(),
        Some("route.host"),
        "route authority wins"
    );
    let last_r = s
        .response_edits
        .iter()
        .rev()
        .find(|(_, n, _)| n == "x-r")
        .map(|(_, _, v)| v.as_str());
    assert_eq!(last_r, Some("dest"));
    let d = get("reviews:9080", "/dest-authority").once(&e);
    assert_eq!(d.authority.as_deref(), Some("dest.host"));
}

#[wasm_bindgen_test(unsupported = test)]
fn cors_preflight_is_answered_and_actual_responses_get_headers() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - corsPolicy:
      allowOrigins: [{exact: 'https://ok.example'}, {regex: 'https://.*\\.trusted\\.example'}]
      allowMethods: [POST, GET]
      allowHeaders: [x-custom]
      exposeHeaders: [x-exposed]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: reviews, subset: v1}}]
",
    );
    let pre = get("reviews:9080", "/")
        .method("OPTIONS")
        .header("origin", "https://ok.example")
        .header("access-control-request-method", "DELETE")
        .once(&e);
    assert_eq!(pre.status, Some(200));
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(pre.header("access-control-allow-methods"), Some("POST,GET"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("x-custom"));
    assert_eq!(pre.header("access-control-max-age"), Some("86400"));
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));

    let unmatched = get("reviews:9080", "/")
        .method("OPTIONS")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .once(&e);
    assert_eq!(
        unmatched.status, None,
        "unmatched preflights are forwarded by default"
    );

    let actual = get("reviews:9080", "/")
        .header("origin", "https://a.trusted.example")
        .once(&e);
    assert!(actual.response_edits.contains(&(
        EditOp::Set,
        "access-control-allow-origin".into(),
        "https://a.trusted.example".into()
    )));
    assert!(actual.response_edits.contains(&(
        EditOp::Set,
        "access-control-expose-headers".into(),
        "x-exposed".into()
    )));
    let foreign = get("reviews:9080", "/")
        .header("origin", "https://evil.example")
        .once(&e);
    assert!(foreign
        .response_edits
        .iter()
        .all(|(_, n, _)| !n.starts_with("access-control")));
}

#[wasm_bindgen_test(unsupported = test)]
fn faults_fire_at_their_percentage() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 100}}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /grpc}}]
    fault:
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}
    route: [{destination: {host: ratings}}]
  - match: [{uri: {prefix: /never}}]
    fault:
      abort: {httpStatus: 500}
    route: [{destination: {host: ratings}}]
  - fault:
      abort: {httpStatus: 418, percentage: {value: 25}}
    route: [{destination: {host: ratings}}]
",
    );
    let jason = get("ratings:9080", "/")
        .header("end-user", "jason")
        .once(&e);
    assert_eq!(jason.delay_ms, Some(7000));
    assert!(jason.cluster.contains("ratings"));
    let grpc = get("ratings:9080", "/grpc").once(&e);
    assert_eq!(grpc.status, Some(200));
    assert_eq!(grpc.flag, "FI");
    for seed in 0..200 {
        assert!(
            get("ratings:9080", "/never").run(&e, seed).status.is_none(),
            "no percentage never aborts"
        );
    }
    let aborted = (0..4000)
        .filter(|&seed| {
            let s = get("ratings:9080", "/").run(&e, seed);
            s.status == Some(418) && s.body == "fault filter abort"
        })
        .count();
    assert!((850..=1150).contains(&aborted), "{aborted} of 4000 aborted");
}

/// The deprecated integer `delay.percent` still samples, as istiod lowers it when
/// `percentage` is not given.
#[wasm_bindgen_test(unsupported = test)]
fn the_deprecated_integer_delay_percent_samples() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /half}}]
    fault:
      delay: {fixedDelay: 2s, percent: 50}
    route: [{destination: {host: ratings}}]
  - fault:
      delay: {fixedDelay: 2s, percent: 0}
    route: [{destination: {host: ratings}}]
",
    );
    let delayed = (0..2000)
        .filter(|&seed| get("ratings:9080", "/half").run(&e, seed).delay_ms == Some(2000))
        .count();
    assert!((850..=1150).contains(&delayed), "{delayed} of 2000 delayed");
    assert!((0..200).all(|seed| get("ratings:9080", "/").run(&e, seed).delay_ms.is_none()));
}

#[wasm_bindgen_test(unsupported = test)]
fn mirrors_sample_per_target_and_timeouts_carry_over() {
    let e = engine(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - timeout: 1500ms
    mirrors:
    - destination: {host: reviews, subset: v2}
    - destination: {host: reviews, subset: v3}
      percentage: {value: 50}
    route: [{destination: {host: reviews, subset: v1}}]
",
    );
    let mut v2 = 0;
    let mut v3 = 0;
    for seed in 0..2000 {
        let s = get("reviews:9080", "/").run(&e, seed);
        assert_eq!(s.timeout_ms, Some(1500));
        v2 += s.mirrors.iter().filter(|m| m.contains("|v2|")).count();
        v3 += s.mirrors.iter().filter(|m| m.contains("|v3|")).count();
    }
    assert_eq!(v2, 2000, "absent percentage mirrors everything");
    assert!((850..=1150).contains(&v3), "{v3}");
}

#[wasm_bindgen_test(unsupported = test)]
fn rejects_unknown_document_version() {
    let mut doc = meshroute_core::ir::RulesDocument {
        version: 99,
        ..Default::default()
    };
    let err = Engine::new(doc.clone()).expect_err("version 99");
    assert!(err.to_string().contains("version 99"), "{err}");
    doc.version = meshroute_core::ir::VERSION;
    assert!(Engine::new(doc).is_ok());
}
