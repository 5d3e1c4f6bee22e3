//! Conformance guest: answers every request with a JSON report of what the host returned
//! for each host call (raw status codes and bytes), or misbehaves when asked:
//! `x-guest: panic` (trap), `x-guest: panic-at-log` (trap in `on_log`), `x-guest: loop` (never returns), `x-guest: alloc` (allocates
//! without bound), `x-guest: pause` (pauses until a tick resumes it), `x-guest: call`
//! (side call to the cluster named in `x-guest-cluster`, reported when it answers).
//!
//! Started as a connection-level plugin (root id `meshroute_tcp_<port>`), it sends each
//! connection to the first endpoint of the first cluster of its configuration (a rules
//! document) and traps when the client closes a connection that carried data.
#![cfg(target_arch = "wasm32")]

use std::collections::BTreeMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, PeerType, Status};

use meshroute_core::contract::{
    filter_state_arguments, L4_ROOT_PREFIX, SET_FILTER_STATE_FUNCTION, TCP_CLUSTER_STATE,
    TCP_ENDPOINT_STATE,
};
use serde_json::{json, Value};

/// A host call's outcome: status code and, when it returned bytes, their length and text.
fn outcome(r: Result<Option<Vec<u8>>, Status>) -> Value {
    match r {
        Ok(Some(b)) => json!({"st": 0, "len": b.len(), "hex": hex(&b)}),
        Ok(None) => json!({"st": 1, "len": 0, "hex": ""}),
        Err(s) => json!({"st": s as u32, "len": 0, "hex": ""}),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn code(r: Result<(), Status>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(s) => s as u32,
    }
}

#[derive(Default)]
struct Root {
    /// A connection-level plugin: where its connections go (cluster, `ip:port`).
    connections: Option<(String, String)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let root_id = self
            .get_property(vec!["plugin_root_id"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if root_id.starts_with(L4_ROOT_PREFIX) {
            let rules: Value = serde_json::from_slice(&config).unwrap_or_default();
            let cluster = &rules["clusters"][0];
            let endpoint = &cluster["endpoints"][0];
            self.connections = Some((
                cluster["name"].as_str().unwrap_or_default().to_owned(),
                format!(
                    "{}:{}",
                    endpoint["address"].as_str().unwrap_or_default(),
                    endpoint["port"]
                ),
            ));
        }
        // A configuration of "reject" is refused, like an invalid rules document.
        config != b"reject"
    }

    fn create_stream_context(&self, _: u32) -> Option<Box<dyn StreamContext>> {
        let (cluster, endpoint) = self.connections.clone()?;
        Some(Box::new(Connection {
            cluster,
            endpoint,
            carried_data: false,
        }))
    }

    fn on_tick(&mut self) {
        for id in ROOT_PAUSED.with(|p| std::mem::take(&mut *p.borrow_mut())) {
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
        }
        let _ = hostcalls::set_tick_period(Duration::ZERO);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            panic_at_log: false,
            id: context_id,
            body_probe: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.connections.is_some() {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }
}

/// A connection sent where the configuration says, that traps when the client closes it
/// after sending data (a bare connect, as a readiness probe makes, does not).
struct Connection {
    cluster: String,
    endpoint: String,
    carried_data: bool,
}

impl Context for Connection {}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        for (key, value) in [
            (TCP_CLUSTER_STATE, &self.cluster),
            (TCP_ENDPOINT_STATE, &self.endpoint),
        ] {
            let args = filter_state_arguments(key, value);
            let _ = hostcalls::call_foreign_function(SET_FILTER_STATE_FUNCTION, Some(&args));
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _: bool) -> Action {
        self.carried_data |= size > 0;
        Action::Continue
    }

    fn on_downstream_close(&mut self, _: PeerType) {
        if self.carried_data {
            panic!("asked to panic when the connection closes");
        }
    }
}

struct Probe {
    id: u32,
    body_probe: bool,
    /// `x-guest: panic-at-log`: trap in `on_log`, after the answer went out.
    panic_at_log: bool,
}

impl Context for Probe {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        let status = self.get_http_call_response_header(":status");
        let grpc = hostcalls::get_grpc_status().map(|(code, msg)| json!([code, msg]));
        let body_bytes = self
            .get_http_call_response_body(0, body)
            .unwrap_or_default();
        let report = json!({
            "token": token,
            "headers": headers,
            "status": status,
            "body": String::from_utf8_lossy(&body_bytes),
            "get_status": grpc.unwrap_or_else(|s| json!({"st": s as u32})),
        });
        self.send_http_response(
            200,
            vec![("x-guest", "call")],
            Some(report.to_string().as_bytes()),
        );
    }
}

impl Probe {
    fn report(&self) -> Value {
        let mut r = BTreeMap::<String, Value>::new();
        let prop = |path: &str| outcome(hostcalls::get_property(path.split('.').collect()));
        for p in [
            "request.path",
            "request.url_path",
            "request.host",
            "request.method",
            "request.scheme",
            "request.query",
            "request.headers.x-guest",
            "source.address",
            "source.port",
            "destination.port",
            "plugin_name",
            "no.such.property",
        ] {
            r.insert(p.into(), prop(p));
        }
        r.insert("filter_state".into(), prop("filter_state"));
        r.insert(
            "set_property".into(),
            json!(code(hostcalls::set_property(
                vec!["guest", "prop"],
                Some(b"hello")
            ))),
        );
        r.insert("get_property([guest, prop])".into(), prop("guest.prop"));
        r.insert(
            "set_property([guest.one])".into(),
            json!(code(hostcalls::set_property(
                vec!["guest.one"],
                Some(b"hello")
            ))),
        );
        r.insert(
            "get_property([guest.one])".into(),
            outcome(hostcalls::get_property(vec!["guest.one"])),
        );
        // (Response headers during the request phase answer BAD_ARGUMENT on both hosts, which
        // the SDK turns into a panic; `x-guest: response-header-early` exercises that.)
        r.insert(
            "missing request header".into(),
            outcome(
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-missing")
                    .map(|v| v.map(|b| b.to_vec())),
            ),
        );
        r.insert(
            "empty request header".into(),
            outcome(
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-empty")
                    .map(|v| v.map(|b| b.to_vec())),
            ),
        );
        r.insert(
            "plugin configuration in http context".into(),
            outcome(hostcalls::get_buffer(
                BufferType::PluginConfiguration,
                0,
                usize::MAX,
            )),
        );
        r.insert(
            "call response body outside callback".into(),
            outcome(hostcalls::get_buffer(
                BufferType::HttpCallResponseBody,
                0,
                usize::MAX,
            )),
        );
        r.insert(
            "foreign function no_such_fn".into(),
            outcome(
                hostcalls::call_foreign_function("no_such_fn", Some(b""))
                    .map(|v| v.map(|b| b.to_vec())),
            ),
        );
        let mut shared = BTreeMap::<&str, Value>::new();
        shared.insert(
            "get_missing",
            outcome(hostcalls::get_shared_data("guest-missing").map(|(v, _)| v)),
        );
        shared.insert(
            "set_new_with_cas",
            json!(code(hostcalls::set_shared_data(
                "guest-k",
                Some(b"v1"),
                Some(12345)
            ))),
        );
        let cas = hostcalls::get_shared_data("guest-k")
            .ok()
            .and_then(|(_, c)| c)
            .unwrap_or(0);
        shared.insert(
            "set_stale_cas",
            json!(code(hostcalls::set_shared_data(
                "guest-k",
                Some(b"v2"),
                Some(cas.wrapping_add(1))
            ))),
        );
        shared.insert(
            "set_good_cas",
            json!(code(hostcalls::set_shared_data(
                "guest-k",
                Some(b"v2"),
                Some(cas)
            ))),
        );
        shared.insert(
            "value",
            outcome(hostcalls::get_shared_data("guest-k").map(|(v, _)| v)),
        );
        r.insert("shared".into(), json!(shared));
        let queue = hostcalls::register_shared_queue("guest-q").ok();
        r.insert(
            "queue".into(),
            json!({
                "enqueue": queue.map(|q| code(hostcalls::enqueue_shared_queue(q, Some(b"item")))),
                "dequeue": queue.map(|q| outcome(hostcalls::dequeue_shared_queue(q))),
                "dequeue_empty": queue.map(|q| outcome(hostcalls::dequeue_shared_queue(q))),
                "resolve_missing": code(hostcalls::resolve_shared_queue("vm", "guest-none").map(|_| ())),
            }),
        );
        // Header map edits, read back through the pairs call.
        self.add_http_request_header("x-guest-added", "a");
        self.add_http_request_header("x-guest-added", "b");
        self.set_http_request_header("x-guest-replaced", Some("one"));
        self.set_http_request_header("x-guest-replaced", Some("two"));
        self.set_http_request_header("x-empty", None);
        let after: Vec<(String, String)> = self
            .get_http_request_headers()
            .into_iter()
            .filter(|(k, _)| k.starts_with("x-guest-") || k == "x-empty")
            .collect();
        r.insert("header edits".into(), json!(after));
        let metric =
            hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, "guest_requests");
        let counted = metric.and_then(|id| {
            hostcalls::increment_metric(id, 3)?;
            hostcalls::get_metric(id)
        });
        let gauge = hostcalls::define_metric(proxy_wasm::types::MetricType::Gauge, "guest_gauge")
            .and_then(|id| {
                hostcalls::record_metric(id, 42)?;
                hostcalls::get_metric(id)
            });
        r.insert(
            "gauge".into(),
            json!(gauge.unwrap_or_else(|s| s as u64 + 1_000_000)),
        );
        // Replace the whole map with itself plus one header.
        let mut all = self.get_http_request_headers();
        all.push(("x-guest-set".into(), "1".into()));
        let as_refs: Vec<(&str, &str)> =
            all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        r.insert(
            "set header map".into(),
            json!({
                "st": code(hostcalls::set_map(MapType::HttpRequestHeaders, as_refs)),
                "present": self.get_http_request_header("x-guest-set"),
            }),
        );
        r.insert(
            "grpc".into(),
            json!({
                "call_unknown_cluster": code(hostcalls::dispatch_grpc_call("nope", "svc", "m", vec![], None, Duration::from_secs(1)).map(|_| ())),
                "stream_unknown_cluster": code(hostcalls::open_grpc_stream("nope", "svc", "m", vec![]).map(|_| ())),
                "send_unknown": code(hostcalls::send_grpc_stream_message(999, None, false)),
            }),
        );
        let counted = match counted {
            Ok(v) => json!({"value": v}),
            Err(s) => json!({"st": s as u32}),
        };
        r.insert("metric".into(), counted);
        r.insert(
            "log".into(),
            json!(code(hostcalls::log(
                proxy_wasm::types::LogLevel::Info,
                "guest log line"
            ))),
        );
        r.insert(
            "now_positive".into(),
            json!(hostcalls::get_current_time()
                .map(|t| t > std::time::UNIX_EPOCH)
                .unwrap_or(false)),
        );
        let pairs = self.get_http_request_headers();
        r.insert("request header count".into(), json!(pairs.len()));
        json!(r)
    }
}

impl HttpContext for Probe {
    fn on_log(&mut self) {
        if self.panic_at_log {
            panic!("asked to panic in on_log");
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream || !self.body_probe {
            return Action::Continue;
        }
        self.set_http_request_body(0, size, b"replaced");
        let now = self.get_http_request_body(0, 1 << 20).unwrap_or_default();
        let body = json!({"size": size, "after": String::from_utf8_lossy(&now)}).to_string();
        self.send_http_response(200, vec![], Some(body.as_bytes()));
        Action::Pause
    }

    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        match self.get_http_request_header("x-guest").as_deref() {
            Some("panic") => panic!("asked to panic"),
            // Envoy answers BAD_ARGUMENT, which the SDK does not expect: a trap on both hosts.
            Some("grpc-cancel-unknown") => {
                let _ = hostcalls::cancel_grpc_call(999);
                Action::Continue
            }
            Some("grpc-close-unknown") => {
                let _ = hostcalls::close_grpc_stream(999);
                Action::Continue
            }
            // The body callback rewrites the body and answers with what it reads back (a host
            // that buffers small bodies before routing, like `meshroute run`, shows it).
            Some("body") => {
                // Request headers cannot be read once continued; remember the mode.
                self.body_probe = true;
                Action::Continue
            }
            Some("reset") => {
                self.reset_http_request();
                Action::Pause
            }
            Some("panic-at-log") => {
                self.panic_at_log = true;
                self.send_http_response(200, vec![], Some(b"answered"));
                Action::Pause
            }
            Some("done") => {
                let _ = hostcalls::done();
                let body = json!({"done": "returned"}).to_string();
                self.send_http_response(200, vec![], Some(body.as_bytes()));
                Action::Pause
            }
            Some("response-header-early") => {
                let _ = self.get_http_response_header(":status");
                Action::Continue
            }
            Some("loop") => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("pause") => {
                let _ = hostcalls::set_tick_period(Duration::from_millis(50));
                ROOT_PAUSED.with(|p| p.borrow_mut().push(self.id));
                Action::Pause
            }
            Some("call") => {
                let cluster = self
                    .get_http_request_header("x-guest-cluster")
                    .unwrap_or_default();
                let endpoint = self.get_http_request_header("x-guest-endpoint");
                let mut headers = vec![
                    (":method", "GET"),
                    (":path", "/side"),
                    (":authority", "side.example"),
                ];
                if let Some(e) = endpoint.as_deref() {
                    headers.push((meshroute_core::contract::ENDPOINT_HEADER, e));
                }
                match self.dispatch_http_call(
                    &cluster,
                    headers,
                    None,
                    vec![],
                    Duration::from_secs(5),
                ) {
                    Ok(_) => Action::Pause,
                    Err(s) => {
                        let body = json!({"dispatch_error": s as u32}).to_string();
                        self.send_http_response(200, vec![], Some(body.as_bytes()));
                        Action::Pause
                    }
                }
            }
            _ => {
                let body = self.report().to_string();
                self.send_http_response(
                    200,
                    vec![("content-type", "application/json")],
                    Some(body.as_bytes()),
                );
                Action::Pause
            }
        }
    }
}

thread_local! {
    /// Streams paused by `x-guest: pause`, resumed by the next tick.
    static ROOT_PAUSED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}
