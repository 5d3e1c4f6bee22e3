//! The rules document packed for places with a size limit (a Kubernetes object must stay under
//! kubectl's 256 KiB annotation and etcd's 1.5 MiB): zlib-compressed JSON, base64 in a
//! one-key JSON object, which a WasmPlugin's `pluginConfig` can carry as well as a string.

use base64::Engine as _;
use serde_json::{json, Value};

use super::{ReadError, RulesDocument};

/// The one key of a packed document.
pub const PACKED_KEY: &str = "meshroute_rules_zlib";
/// A packed document that inflates beyond this is refused (a deflate bomb stays harmless).
pub const UNPACKED_LIMIT: usize = 64 << 20;

/// `{"meshroute_rules_zlib": "<base64 of zlib of the JSON document>"}`.
pub fn pack(doc: &RulesDocument) -> Result<Value, serde_json::Error> {
    let json = serde_json::to_vec(doc)?;
    let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&json, 9);
    Ok(json!({ PACKED_KEY: base64::engine::general_purpose::STANDARD.encode(zlib) }))
}

/// The JSON document inside a packed one; `None` when `bytes` are not packed.
pub fn unpack(bytes: &[u8]) -> Option<Result<Vec<u8>, ReadError>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Packed {
        meshroute_rules_zlib: String,
    }
    let packed: Packed = serde_json::from_slice(bytes).ok()?;
    let unpacked = base64::engine::general_purpose::STANDARD
        .decode(packed.meshroute_rules_zlib.trim())
        .map_err(|e| ReadError::Packed(format!("not base64: {e}")))
        .and_then(|zlib| {
            miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&zlib, UNPACKED_LIMIT)
                .map_err(|e| ReadError::Packed(format!("not zlib, or above 64 MiB: {e:?}")))
        });
    Some(unpacked)
}

#[cfg(test)]
mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;
    use crate::ir::VERSION;

    #[wasm_bindgen_test(unsupported = test)]
    fn a_packed_document_reads_back_as_the_same_document() {
        let doc = RulesDocument {
            version: VERSION,
            warnings: vec!["w".repeat(10_000)],
            ..RulesDocument::default()
        };
        let packed = serde_json::to_vec(&pack(&doc).unwrap()).unwrap();
        assert!(packed.len() < 1_000, "{} bytes", packed.len());
        assert_eq!(RulesDocument::from_json(&packed).unwrap(), doc);
        assert!(
            unpack(b"{\"version\": 3}").is_none(),
            "a plain document is not packed"
        );
        let bad = br#"{"meshroute_rules_zlib": "not base64!"}"#;
        assert!(RulesDocument::from_json(bad)
            .unwrap_err()
            .to_string()
            .contains("packed rules document"));
    }
}
