//! proxy-wasm ABI 0.2.x host functions on wasmtime, one module per area.
//!
//! Host functions never call back into the guest except through its allocator; everything a
//! callback asks the host to do (continue, local reply, side calls, timers) is recorded in
//! [`HostState`] and applied by the runtime after the guest call returns.

mod buffers;
mod headers;
pub mod memory;
mod misc;
mod props;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime::{Linker, StoreLimits};

/// `proxy_status_t` values the Rust SDK understands.
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const SERIALIZATION_FAILURE: i32 = 3;
    pub const PARSE_FAILURE: i32 = 4;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
    pub const INTERNAL_FAILURE: i32 = 10;
}

/// Header map kinds (`proxy_map_type_t`).
pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const CALL_RESPONSE_HEADERS: i32 = 6;
    pub const CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// Buffer kinds (`proxy_buffer_type_t`).
pub mod buffer {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const DOWNSTREAM_DATA: i32 = 2;
    pub const UPSTREAM_DATA: i32 = 3;
    pub const CALL_RESPONSE_BODY: i32 = 4;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

pub type Headers = Vec<(String, String)>;

/// Whether a side call (`proxy_http_call`) can go where it asks, decided by the embedder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallTarget {
    /// The call is accepted.
    Ok,
    /// No such cluster: the call fails at once with BAD_ARGUMENT, as in Envoy.
    UnknownCluster,
    /// The cluster has no host to send this call to: INTERNAL_FAILURE, as Envoy answers for
    /// an ORIGINAL_DST cluster without its endpoint header.
    NoHost,
}

/// The embedder's verdict on a side call to a cluster with these headers.
pub type ClusterCheck = dyn Fn(&str, &[(String, String)]) -> CallTarget + Send + Sync;

/// Where a stream is; decides which maps the guest may touch (as Envoy does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Request,
    Upstream,
    Response,
    Done,
}

/// A synthetic response the guest asked for.
#[derive(Clone, Debug)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub grpc_status: Option<u32>,
    /// The response code details the guest gave (Envoy logs them, an empty string
    /// included); `None` for the host's own replies.
    pub details: Option<String>,
}

/// Per-stream state the host functions read and write.
#[derive(Debug)]
pub struct Stream {
    pub phase: Phase,
    pub request_headers: Headers,
    pub request_body: Vec<u8>,
    pub response_headers: Headers,
    pub response_body: Vec<u8>,
    pub local_reply: Option<LocalReply>,
    /// `continue_stream(HTTP_REQUEST)` was called while the stream was paused.
    pub resumed: bool,
    /// `continue_stream(HTTP_RESPONSE)` was called in the response phase.
    pub response_resumed: bool,
    pub source: String,
    pub destination: String,
    pub destination_port: u16,
    pub connection_id: u64,
    pub response_code: Option<u16>,
    /// Envoy's legacy response-flag bits (`response.flags`), e.g. 0x20 for UF.
    pub response_flags: u64,
    /// `response.code_details` when the proxy answered itself.
    pub response_details: &'static str,
    /// The request is gRPC (`content-type: application/grpc…`): local replies with a gRPC
    /// status take the gRPC form only then, as in Envoy.
    pub grpc_request: bool,
    /// Connections (network filter contexts): the ClientHello SNI, the filter state the guest
    /// set (`set_envoy_filter_state`), the data of the current callback in each direction,
    /// and whether the guest closed the connection.
    pub requested_server_name: String,
    pub filter_state: Vec<(String, String)>,
    pub downstream_data: Vec<u8>,
    pub upstream_data: Vec<u8>,
    pub close_connection: bool,
    /// The root context this stream belongs to (0: the HTTP filter's).
    pub root: u32,
    /// Values the guest set with `proxy_set_property`, by serialized path (Envoy keeps them
    /// as the stream's filter state, gone with it).
    pub properties: Vec<(String, Vec<u8>)>,
}

impl Stream {
    pub fn new(request_headers: Headers) -> Self {
        let grpc_request = request_headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/grpc"));
        Self {
            grpc_request,
            phase: Phase::Request,
            request_headers,
            request_body: Vec::new(),
            response_headers: Vec::new(),
            response_body: Vec::new(),
            local_reply: None,
            resumed: false,
            response_resumed: false,
            source: String::new(),
            destination: String::new(),
            destination_port: 0,
            connection_id: 0,
            response_code: None,
            response_flags: 0,
            response_details: "",
            requested_server_name: String::new(),
            filter_state: Vec::new(),
            downstream_data: Vec::new(),
            upstream_data: Vec::new(),
            close_connection: false,
            root: 0,
            properties: Vec::new(),
        }
    }
}

/// A side call the guest started with `proxy_http_call`.
#[derive(Debug)]
pub struct PendingCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout: Option<Duration>,
}

/// The response of a side call, readable only during `proxy_on_http_call_response`.
#[derive(Debug, Default)]
pub struct CallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
}

type Entry = (Vec<u8>, u32);

/// Process-wide key/value store scoped by VM id (shared by every worker's instance).
#[derive(Debug, Default)]
pub struct SharedData {
    pub queues: Mutex<misc::Queues>,
    pub metrics: Mutex<misc::Metrics>,
    /// Values with their cas, and the last cas handed out.
    entries: Mutex<(HashMap<String, Entry>, u32)>,
}

impl SharedData {
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let guard = self.entries.lock().ok()?;
        guard.0.get(key).cloned()
    }

    /// `cas == 0` sets unconditionally; otherwise the stored cas must match (a missing key
    /// is created, as Envoy does).
    pub fn set(&self, key: &str, value: Vec<u8>, cas: u32) -> i32 {
        let Ok(mut guard) = self.entries.lock() else {
            return status::INTERNAL_FAILURE;
        };
        let (map, counter) = &mut *guard;
        if cas != 0 {
            if let Some((_, current)) = map.get(key) {
                if *current != cas {
                    return status::CAS_MISMATCH;
                }
            }
        }
        *counter = counter.wrapping_add(1).max(1);
        map.insert(key.to_owned(), (value, *counter));
        status::OK
    }
}

/// A log line from the guest.
#[derive(Clone, Debug)]
pub struct GuestLog {
    pub level: i32,
    pub message: String,
}

/// Everything the host functions of one instance see.
pub struct HostState {
    pub limits: StoreLimits,
    pub plugin_name: String,
    /// Root ids (`plugin_root_id`) of the plugins started in this VM, by root context: the
    /// HTTP filter's and one per connection-level listener, as Envoy shares one VM among
    /// the plugins of a worker.
    pub root_names: HashMap<u32, String>,
    /// The HTTP filter's root context (ticks and side-call responses go there).
    pub root_id: u32,
    /// Context of the callback being run.
    pub current: u32,
    /// Set by `proxy_set_effective_context` for the rest of the callback.
    pub effective: Option<u32>,
    pub streams: HashMap<u32, Stream>,
    pub vm_configuration: Vec<u8>,
    /// Readable only during `proxy_on_configure`.
    pub plugin_configuration: Option<Vec<u8>>,
    pub tick_period: Option<Duration>,
    pub tick_changed: bool,
    pub calls: Vec<PendingCall>,
    pub next_token: u32,
    /// Cluster names a side call may target.
    pub known_clusters: Arc<ClusterCheck>,
    pub call_response: Option<CallResponse>,
    pub shared: Arc<SharedData>,
    pub logs: Vec<GuestLog>,
    /// The lowest level passed on (proxy-wasm's 0 trace .. 5 critical), shared by every
    /// instance of a plugin so that it can change at run time.
    pub log_level: Arc<std::sync::atomic::AtomicI32>,
    pub now: fn() -> SystemTime,
}

impl HostState {
    pub fn new(
        plugin_name: &str,
        configuration: Vec<u8>,
        shared: Arc<SharedData>,
        known_clusters: Arc<ClusterCheck>,
        memory_limit: usize,
    ) -> Self {
        Self {
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .trap_on_grow_failure(false)
                .build(),
            plugin_name: plugin_name.to_owned(),
            root_names: HashMap::from([(1, plugin_name.to_owned())]),
            root_id: 1,
            current: 0,
            effective: None,
            streams: HashMap::new(),
            vm_configuration: Vec::new(),
            plugin_configuration: Some(configuration),
            tick_period: None,
            tick_changed: false,
            calls: Vec::new(),
            next_token: 0,
            known_clusters,
            call_response: None,
            shared,
            logs: Vec::new(),
            log_level: Arc::new(std::sync::atomic::AtomicI32::new(2)),
            now: SystemTime::now,
        }
    }

    /// The context host calls act on.
    pub fn context(&self) -> u32 {
        self.effective.unwrap_or(self.current)
    }

    /// The root id (`plugin_root_id`) of the plugin the current context belongs to.
    pub fn current_root_name(&self) -> &str {
        let ctx = self.context();
        let root = match self.streams.get(&ctx) {
            Some(s) if s.root != 0 => s.root,
            Some(_) => self.root_id,
            None => ctx,
        };
        self.root_names
            .get(&root)
            .or_else(|| self.root_names.get(&self.root_id))
            .map_or("", String::as_str)
    }

    pub fn stream(&self) -> Option<&Stream> {
        self.streams.get(&self.context())
    }

    pub fn stream_mut(&mut self) -> Option<&mut Stream> {
        let id = self.context();
        self.streams.get_mut(&id)
    }
}

/// Registers every `env.proxy_*` import of ABI 0.2.0/0.2.1.
pub fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    headers::link(linker)?;
    buffers::link(linker)?;
    props::link(linker)?;
    stream::link(linker)?;
    misc::link(linker)?;
    Ok(())
}

/// Serializes a header map: count, (key_len, value_len)*, (key\0value\0)*.
pub fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Parses a guest-supplied map; `None` when malformed (Envoy then treats it as empty).
pub fn parse_pairs(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = word(0)?;
    if n > 1024 {
        return None;
    }
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for (kl, vl) in sizes {
        let k = bytes.get(at..at + kl)?;
        if bytes.get(at + kl) != Some(&0) {
            return None;
        }
        at += kl + 1;
        let v = bytes.get(at..at + vl)?;
        if bytes.get(at + vl) != Some(&0) {
            return None;
        }
        at += vl + 1;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    (at == bytes.len()).then_some(out)
}

/// `(path, query)` of a request path, as Envoy's `request.url_path` and `request.query`
/// properties give them: a fragment is not part of either (Envoy strips it).
pub fn split_query_value(path: &str) -> (&str, &str) {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    path.split_once('?').unwrap_or((path, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_reject_malformed() {
        let pairs = vec![
            (":path".to_string(), "/".to_string()),
            ("a".into(), String::new()),
        ];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(parse_pairs(&bytes), Some(pairs));
        assert_eq!(parse_pairs(&bytes[..bytes.len() - 1]), None);
        assert_eq!(parse_pairs(&[]), Some(vec![]));
    }

    #[test]
    fn query_and_path_leave_the_fragment_out() {
        assert_eq!(split_query_value("/a?b=1#f"), ("/a", "b=1"));
        assert_eq!(split_query_value("/a#f?x"), ("/a", ""));
        assert_eq!(split_query_value("/a"), ("/a", ""));
    }

    #[test]
    fn shared_data_compare_and_swap() {
        let s = SharedData::default();
        assert_eq!(s.set("k", b"1".to_vec(), 0), status::OK);
        let (_, cas) = s.get("k").unwrap();
        assert_eq!(s.set("k", b"2".to_vec(), cas + 7), status::CAS_MISMATCH);
        assert_eq!(s.set("k", b"2".to_vec(), cas), status::OK);
        assert_eq!(s.get("k").unwrap().0, b"2");
        assert_eq!(
            s.set("new", b"x".to_vec(), 99),
            status::OK,
            "cas on a missing key creates it"
        );
    }
}
