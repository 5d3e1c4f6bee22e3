//! Everything the filter asks of its proxy-wasm host, behind one trait: [`ProxyWasm`] calls the
//! real ABI; tests use a fake that records what the filter did.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, GrpcStatusCode, MapType, MetricType, Status};

/// The host functions the filter uses, acting on the current (or effective) context.
pub trait Host {
    fn now_ms(&self) -> u64;
    /// Nanoseconds of the clock, to seed per-VM randomness.
    fn now_nanos(&self) -> u64;

    fn plugin_configuration(&self) -> Vec<u8>;
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets a per-request property (Envoy keeps it as filter state `wasm.<path>`).
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status>;

    fn request_headers(&self) -> Vec<(String, String)>;
    fn set_request_header(&self, name: &str, value: Option<&str>);
    fn add_request_header(&self, name: &str, value: &str);
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;

    fn response_header(&self, name: &str) -> Option<String>;
    fn set_response_header(&self, name: &str, value: Option<&str>);
    fn add_response_header(&self, name: &str, value: &str);

    fn send_http_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(), Status>;
    fn send_grpc_reply(
        &self,
        code: u32,
        message: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), Status>;

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status>;
    fn call_response_headers(&self) -> Vec<(String, String)>;
    fn call_response_body(&self, size: usize) -> Vec<u8>;

    fn set_tick_period(&self, period: Duration) -> Result<(), Status>;
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status>;
    fn resume_request(&self) -> Result<(), Status>;
    fn resume_response(&self) -> Result<(), Status>;

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status>;

    fn call_foreign(&self, name: &str, args: &[u8]) -> Result<(), Status>;
    fn close_downstream(&self) -> Result<(), Status>;

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;
}

/// A property holding a little-endian integer (Envoy's encoding of ports and flags).
pub fn u64_property(host: &impl Host, path: &[&str]) -> Option<u64> {
    host.property(path)
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes)
}

/// A property holding text; empty when absent.
pub fn text_property(host: &impl Host, path: &[&str]) -> String {
    host.property(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The proxy-wasm ABI of the process the module runs in.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyWasm;

impl Host for ProxyWasm {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn now_nanos(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        hostcalls::set_property(path.to_vec(), Some(value))
    }

    fn request_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn add_request_header(&self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn response_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn add_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn send_http_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(), Status> {
        hostcalls::send_http_response(status, headers.to_vec(), body)
    }

    fn send_grpc_reply(
        &self,
        code: u32,
        message: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), Status> {
        hostcalls::send_grpc_response(
            grpc_code(code),
            Some(message),
            headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect(),
        )
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout)
    }

    fn call_response_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        hostcalls::set_tick_period(period)
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        hostcalls::set_effective_context(context_id)
    }

    fn resume_request(&self) -> Result<(), Status> {
        hostcalls::resume_http_request()
    }

    fn resume_response(&self) -> Result<(), Status> {
        hostcalls::resume_http_response()
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        hostcalls::set_shared_data(key, Some(value), cas)
    }

    fn call_foreign(&self, name: &str, args: &[u8]) -> Result<(), Status> {
        hostcalls::call_foreign_function(name, Some(args)).map(|_| ())
    }

    fn close_downstream(&self) -> Result<(), Status> {
        hostcalls::close_downstream()
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        hostcalls::define_metric(kind, name)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), Status> {
        hostcalls::increment_metric(id, by)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        hostcalls::record_metric(id, value)
    }
}

fn grpc_code(code: u32) -> GrpcStatusCode {
    use GrpcStatusCode as G;
    match code {
        0 => G::Ok,
        1 => G::Cancelled,
        2 => G::Unknown,
        3 => G::InvalidArgument,
        4 => G::DeadlineExceeded,
        5 => G::NotFound,
        6 => G::AlreadyExists,
        7 => G::PermissionDenied,
        8 => G::ResourceExhausted,
        9 => G::FailedPrecondition,
        10 => G::Aborted,
        11 => G::OutOfRange,
        12 => G::Unimplemented,
        13 => G::Internal,
        14 => G::Unavailable,
        15 => G::DataLoss,
        _ => G::Unauthenticated,
    }
}
