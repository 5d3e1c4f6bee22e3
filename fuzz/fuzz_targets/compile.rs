//! Any bytes as Istio configuration: loading, validation and lowering for a sidecar and a
//! gateway never panic, and a document the compiler writes is one every host loads and
//! decides on (the JSON the filter receives reads back as the same document).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use meshroute_core::engine::Engine;
use meshroute_core::ir::{ProxyKind, RulesDocument};

fuzz_target!(|data: &[u8]| {
    let mut config = Config::default();
    let _ = config.add_text("fuzz.yaml", &String::from_utf8_lossy(data));
    for kind in [ProxyKind::Sidecar, ProxyKind::Gateway] {
        let proxy = ProxyOptions {
            kind,
            ..ProxyOptions::default()
        };
        let Some(doc) = compile(&config, &proxy, &MeshOptions::default()).document else {
            continue;
        };
        let json = serde_json::to_vec(&doc).expect("a compiled document serializes");
        let read = RulesDocument::from_json(&json)
            .unwrap_or_else(|e| panic!("a compiled document reads back: {e}"));
        assert!(read == doc, "the document reads back unchanged");
        let engine = Engine::new(read)
            .unwrap_or_else(|e| panic!("a compiled document loads into the engine: {e}"));
        meshroute_fuzz::exercise(&engine, &doc, data);
    }
});
