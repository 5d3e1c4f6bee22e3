//! The glue against a fake host that records every host call: what the filter asks of a
//! proxy for forwarded requests, retries, delays, circuit breaking and connections.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::{Action, MetricType, Status};

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::contract::{
    filter_state_arguments, ResponseFlag, RouterReply, ATTEMPT_COUNT_HEADER, CLUSTER_HEADER,
    ENDPOINT_HEADER, MAX_RETRIES_HEADER, OVERLOADED_HEADER, RETRY_GRPC_ON_HEADER, RETRY_ON_HEADER,
    TCP_CLUSTER_STATE, TCP_ENDPOINT_STATE, TIMEOUT_HEADER,
};
use meshroute_core::ir::ProxyKind;

use crate::host::Host;
use crate::FilterRoot;

type Pairs = Vec<(String, String)>;

#[derive(Default)]
struct State {
    now_ms: u64,
    config: Vec<u8>,
    properties: HashMap<String, Vec<u8>>,
    request: Pairs,
    response: Pairs,
    replies: Vec<(u32, Pairs, Vec<u8>)>,
    dispatched: Vec<(String, Pairs, Duration)>,
    call_response: (Pairs, Vec<u8>),
    tick: Option<Duration>,
    effective: Vec<u32>,
    resumed_requests: usize,
    resumed_responses: usize,
    shared: HashMap<String, (Vec<u8>, u32)>,
    filter_state: Vec<Vec<u8>>,
    closed: bool,
    /// Defined metrics (kind, name) by id - 1, and what was counted or recorded into each.
    metrics: Vec<(MetricType, String)>,
    metric_values: HashMap<u32, Vec<u64>>,
}

/// A host that records what the filter asks of it; clones share the record.
#[derive(Clone, Default)]
struct Fake(Rc<RefCell<State>>);

fn owned(pairs: &[(&str, &str)]) -> Pairs {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn get<'a>(pairs: &'a Pairs, name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Fake {
    fn with_rules(yaml: &str, kind: ProxyKind) -> Self {
        let proxy = match kind {
            ProxyKind::Gateway => ProxyOptions::gateway("default"),
            ProxyKind::Sidecar => ProxyOptions::sidecar("default"),
        };
        Self::with_rules_for(yaml, &proxy)
    }

    fn with_rules_for(yaml: &str, proxy: &ProxyOptions) -> Self {
        let mut config = Config::default();
        let diags = config.add_text("t.yaml", yaml);
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        let out = compile(&config, proxy, &MeshOptions::default());
        assert!(!out.has_errors(), "{:?}", out.diagnostics);
        let fake = Self::default();
        fake.0.borrow_mut().config = serde_json::to_vec(&out.document.unwrap()).unwrap();
        fake.0.borrow_mut().now_ms = 1_000_000;
        fake
    }

    fn state(&self) -> std::cell::RefMut<'_, State> {
        self.0.borrow_mut()
    }

    fn root(&self) -> FilterRoot<Self> {
        let mut root = FilterRoot::new(1, self.clone());
        assert!(root.vm_start());
        assert!(root.configure());
        root
    }

    fn request(&self, authority: &str, path: &str, extra: &[(&str, &str)]) {
        let mut headers = owned(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
        ]);
        headers.extend(owned(extra));
        let mut s = self.state();
        s.request = headers;
        s.response.clear();
    }

    fn respond(&self, status: u16, flags: Option<ResponseFlag>) {
        let mut s = self.state();
        s.response = owned(&[(":status", &status.to_string())]);
        match flags {
            Some(f) => s
                .properties
                .insert("response.flags".into(), f.bit().to_le_bytes().to_vec()),
            None => s.properties.remove("response.flags"),
        };
    }

    fn advance(&self, ms: u64) {
        self.state().now_ms += ms;
    }
}

fn set(pairs: &mut Pairs, name: &str, value: Option<&str>) {
    pairs.retain(|(k, _)| k != name);
    if let Some(v) = value {
        pairs.push((name.to_owned(), v.to_owned()));
    }
}

impl Host for Fake {
    fn now_ms(&self) -> u64 {
        self.0.borrow().now_ms
    }
    fn now_nanos(&self) -> u64 {
        self.now_ms() * 1_000_000
    }
    fn plugin_configuration(&self) -> Vec<u8> {
        self.0.borrow().config.clone()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.0.borrow().properties.get(&path.join(".")).cloned()
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        self.state()
            .properties
            .insert(path.join("."), value.to_vec());
        Ok(())
    }
    fn request_headers(&self) -> Pairs {
        self.0.borrow().request.clone()
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        set(&mut self.state().request, name, value);
    }
    fn add_request_header(&self, name: &str, value: &str) {
        self.state().request.push((name.into(), value.into()));
    }
    fn request_body(&self, _: usize) -> Option<Vec<u8>> {
        None
    }
    fn response_header(&self, name: &str) -> Option<String> {
        get(&self.0.borrow().response, name).map(str::to_owned)
    }
    fn set_response_header(&self, name: &str, value: Option<&str>) {
        set(&mut self.state().response, name, value);
    }
    fn add_response_header(&self, name: &str, value: &str) {
        self.state().response.push((name.into(), value.into()));
    }
    fn send_http_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(), Status> {
        let body = body.unwrap_or_default().to_vec();
        self.state().replies.push((status, owned(headers), body));
        Ok(())
    }
    fn send_grpc_reply(&self, code: u32, _: &str, headers: &[(&str, &str)]) -> Result<(), Status> {
        let mut headers = owned(headers);
        headers.push(("grpc-status".into(), code.to_string()));
        self.state().replies.push((200, headers, Vec::new()));
        Ok(())
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        _: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        let mut s = self.state();
        s.dispatched
            .push((cluster.to_owned(), owned(headers), timeout));
        Ok(u32::try_from(s.dispatched.len()).unwrap() * 4)
    }
    fn call_response_headers(&self) -> Pairs {
        self.0.borrow().call_response.0.clone()
    }
    fn call_response_body(&self, _: usize) -> Vec<u8> {
        self.0.borrow().call_response.1.clone()
    }
    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        self.state().tick = (!period.is_zero()).then_some(period);
        Ok(())
    }
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        self.state().effective.push(context_id);
        Ok(())
    }
    fn resume_request(&self) -> Result<(), Status> {
        self.state().resumed_requests += 1;
        Ok(())
    }
    fn resume_response(&self) -> Result<(), Status> {
        self.state().resumed_responses += 1;
        Ok(())
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.0.borrow().shared.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        let mut s = self.state();
        let current = s.shared.get(key).map(|(_, c)| *c);
        if cas.is_some() && current.is_some() && cas != current {
            return Err(Status::CasMismatch);
        }
        let next = current.unwrap_or(0) + 1;
        s.shared.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }
    fn call_foreign(&self, name: &str, args: &[u8]) -> Result<(), Status> {
        assert_eq!(name, "set_envoy_filter_state");
        self.state().filter_state.push(args.to_vec());
        Ok(())
    }
    fn close_downstream(&self) -> Result<(), Status> {
        self.state().closed = true;
        Ok(())
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut s = self.state();
        s.metrics.push((kind, name.to_owned()));
        Ok(u32::try_from(s.metrics.len()).unwrap())
    }
    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        let mut s = self.state();
        let v = s.metric_values.entry(id).or_default();
        match v.first_mut() {
            Some(total) => *total += u64::try_from(by).unwrap(),
            None => v.push(u64::try_from(by).unwrap()),
        }
        Ok(())
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.state()
            .metric_values
            .entry(id)
            .or_default()
            .push(value);
        Ok(())
    }
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8000}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: default}
spec: {address: 10.0.0.1, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-2, namespace: default}
spec: {address: 10.0.0.2, labels: {app: web}}
"#;

fn web_with(extra: &str) -> Fake {
    Fake::with_rules(&format!("{WEB}---\n{extra}"), ProxyKind::Sidecar)
}

#[test]
fn a_forwarded_request_carries_the_contract_and_no_client_copies() {
    let fake = web_with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - name: primary
    timeout: 2s
    headers:
      request: {set: {x-added: "1"}}
      response: {set: {x-served-by: meshroute}}
    route: [{destination: {host: web}}]
"#,
    );
    let root = fake.root();
    let mut http = root.http_context(2);
    fake.request(
        "web:8000",
        "/a",
        &[
            (CLUSTER_HEADER, "outbound|1||evil"),
            (ENDPOINT_HEADER, "6.6.6.6:1"),
        ],
    );
    assert_eq!(http.on_request_headers(true), Action::Continue);
    let request = fake.state().request.clone();
    assert_eq!(
        get(&request, CLUSTER_HEADER),
        Some("outbound|8000||web.default.svc.cluster.local")
    );
    let endpoint = get(&request, ENDPOINT_HEADER).unwrap();
    assert!(
        ["10.0.0.1:8000", "10.0.0.2:8000"].contains(&endpoint),
        "{endpoint}"
    );
    assert_eq!(get(&request, TIMEOUT_HEADER), Some("2000"));
    assert_eq!(get(&request, "x-added"), Some("1"));
    // The route's name is left for the host's access log, as Istio names it.
    assert_eq!(
        fake.state()
            .properties
            .get(meshroute_core::contract::ROUTE_NAME_PROPERTY)
            .map(Vec::as_slice),
        Some(&b"primary"[..])
    );
    assert_eq!(
        request.iter().filter(|(k, _)| k == CLUSTER_HEADER).count(),
        1,
        "the client's copy is gone"
    );
    fake.respond(200, None);
    assert_eq!(http.on_response_headers(), Action::Continue);
    assert_eq!(
        get(&fake.state().response, "x-served-by"),
        Some("meshroute")
    );
    http.on_log();
}

#[test]
fn inside_istio_the_filter_names_the_cluster_and_the_router_retries() {
    let fake = Fake::with_rules_for(
        &format!(
            "{WEB}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web]
  http:
  - route: [{{destination: {{host: web}}}}]
    retries: {{attempts: 3, retryOn: 'gateway-error,cancelled'}}
"
        ),
        &ProxyOptions::sidecar("default").in_istio(),
    );
    // Istio's listener 0.0.0.0_8000: the route table is the connection's port, whatever
    // port the Host names.
    fake.state()
        .properties
        .insert("destination.port".into(), 8000u64.to_le_bytes().to_vec());
    let root = fake.root();
    let mut http = root.http_context(2);
    fake.request("web:1234", "/", &[(MAX_RETRIES_HEADER, "9")]);
    assert_eq!(http.on_request_headers(true), Action::Continue);
    let request = fake.state().request.clone();
    assert_eq!(
        get(&request, CLUSTER_HEADER),
        Some("outbound|8000||web.default.svc.cluster.local")
    );
    assert_eq!(
        get(&request, ENDPOINT_HEADER),
        None,
        "Envoy picks the endpoint"
    );
    assert_eq!(get(&request, MAX_RETRIES_HEADER), Some("3"));
    assert_eq!(get(&request, RETRY_ON_HEADER), Some("gateway-error"));
    assert_eq!(get(&request, RETRY_GRPC_ON_HEADER), Some("cancelled"));
    // A failed try is the router's to retry, not the filter's.
    fake.respond(502, None);
    assert_eq!(http.on_response_headers(), Action::Continue);
    assert!(
        fake.state().dispatched.is_empty(),
        "no retry of the filter's own"
    );
    assert_eq!(fake.state().replies.len(), 0);
}

#[test]
fn a_connect_failure_is_retried_on_the_other_endpoint_after_a_back_off() {
    let fake = web_with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - retries: {attempts: 2, retryOn: connect-failure}
    route: [{destination: {host: web}}]
"#,
    );
    let mut root = fake.root();
    let mut http = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    assert_eq!(http.on_request_headers(true), Action::Continue);
    let first = get(&fake.state().request, ENDPOINT_HEADER)
        .unwrap()
        .to_owned();
    // The host's router could not connect: the filter holds the answer and backs off.
    fake.respond(503, Some(RouterReply::ConnectFailure.flag()));
    assert_eq!(http.on_response_headers(), Action::Pause);
    assert_eq!(http.on_response_body(), Action::Pause);
    let backoff = fake.state().tick.expect("a timer for the back-off");
    assert!(backoff <= Duration::from_millis(25), "{backoff:?}");
    assert!(fake.state().dispatched.is_empty());
    fake.advance(25);
    root.tick();
    let (cluster, headers, _) = fake.state().dispatched[0].clone();
    assert_eq!(cluster, "outbound|8000||web.default.svc.cluster.local");
    let second = get(&headers, ENDPOINT_HEADER).unwrap();
    assert_ne!(second, first, "previous hosts are avoided");
    assert_eq!(get(&headers, ATTEMPT_COUNT_HEADER), Some("2"));
    // The retry succeeds: its answer replaces the held one.
    fake.state().call_response = (
        owned(&[(":status", "200"), ("x-from", "retry")]),
        b"ok".to_vec(),
    );
    root.call_response(4, 2, 2);
    let (status, headers, body) = fake.state().replies[0].clone();
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(get(&headers, "x-from"), Some("retry"));
    assert_eq!(fake.state().effective.last(), Some(&2));
    assert_eq!(http.on_response_body(), Action::Continue);
}

#[test]
fn a_fault_delay_pauses_until_the_timer_fires() {
    let fake = web_with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
"#,
    );
    let mut root = fake.root();
    let mut http = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    assert_eq!(http.on_request_headers(true), Action::Pause);
    assert_eq!(fake.state().tick, Some(Duration::from_secs(2)));
    fake.advance(1999);
    root.tick();
    assert_eq!(fake.state().resumed_requests, 0);
    fake.advance(1);
    root.tick();
    assert_eq!(fake.state().resumed_requests, 1);
    assert_eq!(fake.state().tick, None, "no timer left");
}

#[test]
fn the_circuit_breaker_admits_up_to_its_limit() {
    let fake = web_with(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}
"#,
    );
    let root = fake.root();
    let mut first = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    assert_eq!(first.on_request_headers(true), Action::Continue);
    let mut second = root.http_context(3);
    fake.request("web:8000", "/", &[]);
    assert_eq!(second.on_request_headers(true), Action::Pause);
    let (status, headers, body) = fake.state().replies[0].clone();
    assert_eq!(status, 503);
    assert_eq!(get(&headers, OVERLOADED_HEADER), Some("true"));
    assert_eq!(body, RouterReply::Overflow.body().as_bytes());
    first.on_log();
    let mut third = root.http_context(4);
    fake.request("web:8000", "/", &[]);
    assert_eq!(third.on_request_headers(true), Action::Continue);
}

#[test]
fn without_rules_every_request_gets_503_and_a_bad_reload_keeps_the_rules() {
    let fake = Fake::default();
    let mut root = FilterRoot::new(1, fake.clone());
    assert!(!root.configure(), "an empty configuration is refused");
    let mut http = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    assert_eq!(http.on_request_headers(true), Action::Pause);
    assert_eq!(fake.state().replies[0].0, 503);

    let fake = web_with("");
    let mut root = fake.root();
    fake.state().config = b"{\"version\": 1".to_vec();
    assert!(!root.configure());
    let mut http = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    assert_eq!(http.on_request_headers(true), Action::Continue);
    assert!(get(&fake.state().request, CLUSTER_HEADER).is_some());
}

#[test]
fn a_connection_names_its_cluster_and_endpoint_as_filter_state() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-1, namespace: default}
spec: {address: 10.0.0.9, labels: {app: db}}
"#;
    let fake = Fake::with_rules(yaml, ProxyKind::Sidecar);
    fake.state().properties.insert(
        "plugin_root_id".into(),
        meshroute_core::contract::l4_root_id(5432).into_bytes(),
    );
    let root = fake.root();
    assert!(root.is_connection_plugin());
    let mut conn = root.stream_context(7).expect("a connection context");
    assert_eq!(conn.on_new_connection(), Action::Continue);
    let state = fake.state().filter_state.clone();
    assert_eq!(
        state,
        [
            filter_state_arguments(
                TCP_CLUSTER_STATE,
                "outbound|5432||db.default.svc.cluster.local"
            ),
            filter_state_arguments(TCP_ENDPOINT_STATE, "10.0.0.9:5432"),
        ]
    );
    assert!(!fake.state().closed);
    conn.on_close();
}

#[test]
fn rules_documents_are_refused_with_reasons() {
    use crate::load_rules;
    assert!(load_rules(b"  ").unwrap_err().contains("empty"));
    let version = meshroute_core::ir::VERSION;
    let e = load_rules(format!("{{\"version\": {version}, \"proxy\": 3}}").as_bytes()).unwrap_err();
    assert!(e.contains("line 1"), "{e}");
    // An older document is refused for its version, not for a field this one lacks.
    let e = load_rules(br#"{"version": 1, "proxy": {"kind": "sidecar", "namespace": "a"}, "listeners": [{"port": 80, "protocol": "HTTP"}]}"#)
        .unwrap_err();
    assert!(e.contains("version 1 is not supported"), "{e}");
    let current =
        format!(r#"{{"version": {version}, "proxy": {{"kind": "sidecar", "namespace": "a"}}}}"#);
    assert!(load_rules(current.as_bytes()).is_ok());
}

#[test]
fn with_the_node_key_requests_are_counted_under_istios_tagged_names() {
    let fake = web_with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n",
    );
    let node = |k: &str, v: &str| {
        fake.state()
            .properties
            .insert(format!("xds.node.metadata.{k}"), v.as_bytes().to_vec());
    };
    let int = |k: &str, v: u64| {
        fake.state()
            .properties
            .insert(k.to_owned(), v.to_le_bytes().to_vec());
    };
    // Without the key the filter keeps no metrics (Istio's stats filter or the host does).
    let root = fake.root();
    let mut http = root.http_context(2);
    fake.request("web:8000", "/", &[]);
    http.on_request_headers(true);
    fake.respond(200, None);
    http.on_log();
    assert!(fake.state().metrics.is_empty());

    node(meshroute_core::contract::ISTIO_METRICS_NODE_KEY, "true");
    node("WORKLOAD_NAME", "client-v1");
    let root = fake.root();
    for (context, flags) in [
        (3, None),
        (4, None),
        (5, Some(ResponseFlag::UpstreamConnectionFailure)),
    ] {
        let mut http = root.http_context(context);
        fake.request("web:8000", "/", &[("content-type", "application/grpc")]);
        assert_eq!(http.on_request_headers(true), Action::Continue);
        let endpoint = get(&fake.state().request, ENDPOINT_HEADER)
            .unwrap()
            .to_owned();
        fake.state()
            .properties
            .insert("upstream.address".into(), endpoint.into_bytes());
        fake.respond(200, flags);
        int("response.code", 200);
        int("request.duration", 7_000_000);
        int("request.total_size", 120);
        int("response.total_size", 4000);
        http.on_log();
    }
    let s = fake.state();
    let counters: Vec<&String> = s
        .metrics
        .iter()
        .filter(|(k, _)| *k == MetricType::Counter)
        .map(|(_, n)| n)
        .collect();
    assert_eq!(counters.len(), 2, "one series per outcome: {counters:?}");
    let ok = counters
        .iter()
        .find(|n| n.contains("response_flags=.=-;"))
        .unwrap();
    for tag in [
        "reporter=.=source;.;",
        "source_workload=.=client-v1;.;",
        "source_workload_namespace=.=default;.;",
        "destination_app=.=web;.;",
        "destination_service=.=web.default.svc.cluster.local;.;",
        "request_protocol=.=grpc;.;",
        "response_code=.=200;.;",
    ] {
        assert!(ok.contains(tag), "{tag} in {ok}");
    }
    assert!(ok.ends_with(";.;istio_requests_total"), "{ok}");
    let id = |name: &str| {
        u32::try_from(s.metrics.iter().position(|(_, n)| n == name).unwrap() + 1).unwrap()
    };
    assert_eq!(s.metric_values[&id(ok)], [2]);
    let duration = ok.replace(
        "istio_requests_total",
        "istio_request_duration_milliseconds",
    );
    assert_eq!(s.metric_values[&id(&duration)], [7, 7]);
    let sizes = ok.replace("istio_requests_total", "istio_response_bytes");
    assert_eq!(s.metric_values[&id(&sizes)], [4000, 4000]);
}
