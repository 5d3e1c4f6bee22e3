//! Invariants: loading and compiling never panic, whatever the input.
#![cfg(not(target_arch = "wasm32"))] // proptest needs an OS random source
#![allow(clippy::expect_used, reason = "test helpers outside #[test] functions")]

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};
use proptest::prelude::*;

fn run(text: &str) {
    let mut c = Config::default();
    let _ = c.add_text("p.yaml", text);
    let out = compile(&c, &ProxyOptions::default(), &MeshOptions::default());
    if let Some(doc) = out.document {
        let json = serde_json::to_string(&doc).expect("serialize");
        let back: meshroute_core::ir::RulesDocument =
            serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, doc);
    }
}

const FRAGMENTS: &[&str] = &[
    "apiVersion: networking.istio.io/v1\n",
    "kind: VirtualService\n",
    "kind: DestinationRule\n",
    "kind: Gateway\n",
    "kind: ServiceEntry\n",
    "metadata: {name: x}\n",
    "spec:\n",
    "  hosts: [a, '*']\n",
    "  http:\n",
    "  - route:\n",
    "    - destination: {host: a, subset: v1}\n",
    "      weight: 50\n",
    "  host: a\n",
    "  subsets: [{name: v1, labels: {v: '1'}}]\n",
    "---\n",
    "  - match: [{uri: {regex: '(x'}}]\n",
    "    fault: {delay: {fixedDelay: 1s}}\n",
    "  servers: [{port: {number: 80}}]\n",
    "kind: List\nitems:\n- {}\n",
    "  ports: [{number: 80, name: http}]\n",
    "  resolution: STATIC\n",
    "&a [*a]\n",
    "{",
    "]",
    ": :",
    "\t",
    "- - -",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
        run(&s);
    }

    #[test]
    fn shuffled_istio_fragments_never_panic(parts in proptest::collection::vec(0..FRAGMENTS.len(), 0..40)) {
        let text: String = parts.iter().map(|i| FRAGMENTS[*i]).collect();
        run(&text);
    }
}
