//! meshroute's proxy-wasm module.
//!
//! Thin glue: the root context loads the rules document (plugin configuration) into an
//! [`Engine`]; each HTTP context turns the request headers into a request view, asks the
//! engine, and applies the decision through the host contract (control headers, local
//! replies, a tick queue for fault delays, side calls for mirrors and retries). Every host
//! call goes through [`host::Host`], so the glue is tested natively with a fake host.

pub mod host;
mod http;
mod metrics;
mod root;
mod shared;
mod stream;

#[cfg(test)]
mod tests;

pub use http::{FilterHttp, BODY_COPY_LIMIT};
pub use root::FilterRoot;
pub use stream::FilterStream;

use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, PeerType};

use meshroute_core::engine::Engine;
use meshroute_core::ir::RulesDocument;

use host::Host;

/// Parses and loads a rules document; the message says what is wrong and where.
pub fn load_rules(bytes: &[u8]) -> Result<Engine, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "plugin configuration is empty: expected a meshroute rules document (JSON)".into(),
        );
    }
    let doc = RulesDocument::from_json(bytes).map_err(|e| e.to_string())?;
    Engine::new(doc).map_err(|e| format!("rules document rejected: {e}"))
}

impl<H: Host + Clone + 'static> Context for FilterRoot<H> {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        self.call_response(token, headers, body_size);
    }
}

impl<H: Host + Clone + 'static> RootContext for FilterRoot<H> {
    fn on_vm_start(&mut self, _: usize) -> bool {
        self.vm_start()
    }

    fn on_configure(&mut self, _: usize) -> bool {
        follow_host_log_level();
        self.configure()
    }

    fn on_tick(&mut self) {
        follow_host_log_level();
        self.tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(self.http_context(context_id)))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        self.stream_context(context_id)
            .map(|s| Box::new(s) as Box<dyn StreamContext>)
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.is_connection_plugin() {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }
}

impl<H: Host + 'static> Context for FilterHttp<H> {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        // Mirror responses are discarded, as Istio's mirroring does.
    }
}

impl<H: Host + 'static> HttpContext for FilterHttp<H> {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.on_request_headers(end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.on_request_body(body_size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.on_response_headers()
    }

    fn on_http_response_body(&mut self, _: usize, _: bool) -> Action {
        self.on_response_body()
    }

    fn on_log(&mut self) {
        FilterHttp::on_log(self);
    }
}

impl<H: Host + 'static> Context for FilterStream<H> {}

impl<H: Host + 'static> StreamContext for FilterStream<H> {
    fn on_new_connection(&mut self) -> Action {
        FilterStream::on_new_connection(self)
    }

    fn on_downstream_close(&mut self, _: PeerType) {
        self.on_close();
    }

    fn on_upstream_close(&mut self, _: PeerType) {
        self.on_close();
    }

    fn on_downstream_data(&mut self, size: usize, _: bool) -> Action {
        self.received += size as u64;
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _: bool) -> Action {
        self.sent += size as u64;
        Action::Continue
    }

    fn on_log(&mut self) {
        FilterStream::on_log(self);
    }
}

/// The filter logs at the host's level (Envoy's `wasm` logger, `meshroute run`'s
/// `--log-level` and `/logging`): asked when configured and on each tick, so a change at
/// run time reaches it without a reload.
fn follow_host_log_level() {
    #[cfg(target_arch = "wasm32")]
    if let Ok(level) = proxy_wasm::hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(FilterRoot::new(context_id, host::ProxyWasm))
    });
}}
