//! Any bytes as the filter's plugin configuration: reading the rules document, building the
//! engine and deciding requests never panic; a document either loads or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshroute_core::engine::Engine;
use meshroute_core::ir::RulesDocument;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = RulesDocument::from_json(data) else {
        return;
    };
    let Ok(engine) = Engine::new(doc.clone()) else {
        return;
    };
    meshroute_fuzz::exercise(&engine, &doc, data);
});
