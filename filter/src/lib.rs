//! meshroute's proxy-wasm module.
//!
//! Thin glue: the root context loads the rules document (plugin configuration) into an
//! [`Engine`]; each HTTP context turns the request headers into a [`RequestView`], asks the
//! engine, and applies the [`Decision`] through the host contract (control headers, local
//! replies, a tick queue for fault delays, side calls for mirrors).

mod glue;
mod retry;
mod shared;
mod stream;

pub use glue::{FilterRoot, BODY_COPY_LIMIT};

use meshroute_core::engine::Engine;
use meshroute_core::ir::RulesDocument;

/// Parses and loads a rules document; the message says what is wrong and where.
pub fn load_rules(bytes: &[u8]) -> Result<Engine, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "plugin configuration is empty: expected a meshroute rules document (JSON)".into(),
        );
    }
    let doc: RulesDocument =
        serde_json::from_slice(bytes).map_err(|e| format!("rules document is not valid: {e}"))?;
    Engine::new(doc).map_err(|e| format!("rules document rejected: {e}"))
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(FilterRoot::new(context_id))
    });
}}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_invalid_and_future_documents_with_reasons() {
        assert!(load_rules(b"  ").unwrap_err().contains("empty"));
        let e = load_rules(b"{\"version\": 1, \"proxy\": 3}").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = load_rules(br#"{"version": 2, "proxy": {"kind": "sidecar", "namespace": "a"}}"#)
            .unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        assert!(
            load_rules(br#"{"version": 1, "proxy": {"kind": "sidecar", "namespace": "a"}}"#)
                .is_ok()
        );
    }
}
