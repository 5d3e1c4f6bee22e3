//! meshroute's validation against istiod's own validation test table.
//!
//! The cases are istio/istio's `pkg/config/validation` tests (the Go table tests and the
//! `testdata/crds` YAML), written as YAML by `scripts/istiod-validation-cases.py` with their
//! source lines. Each case is valid or invalid for istiod; meshroute must agree, and its error
//! must carry istiod's words: the words the case names, or else one of istiod's messages.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions"
)]

use meshroute_compiler::{validate::validate, Config};
use serde::Deserialize;
use wasm_bindgen_test::wasm_bindgen_test;

const CASES: &str = include_str!("../../../tests/istio/validation/istiod-cases.yaml");
const MESSAGES: &str = include_str!("../../../tests/istio/validation/istiod-messages.txt");

/// Agreement with istiod on valid/invalid, in per cent of the cases.
const AGREEMENT_FLOOR: f64 = 98.0;
/// Errors carrying istiod's words, in per cent of the invalid cases meshroute refuses.
const WORDS_FLOOR: f64 = 90.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    source: String,
    test: String,
    valid: bool,
    words: Option<String>,
    yaml: String,
}

struct Verdict {
    errors: Vec<String>,
}

fn judge(case: &Case) -> Verdict {
    let mut config = Config::default();
    let mut diags = config.add_text("case.yaml", &case.yaml);
    diags.extend(validate(&config).diagnostics);
    Verdict {
        errors: diags
            .into_iter()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect(),
    }
}

fn has_istiod_words(case: &Case, errors: &[String], messages: &[&str]) -> bool {
    let lower: Vec<String> = errors.iter().map(|e| e.to_lowercase()).collect();
    match &case.words {
        Some(words) => {
            let words = words.to_lowercase();
            lower.iter().any(|e| e.contains(&words))
        }
        None => lower
            .iter()
            .any(|e| messages.iter().any(|m| e.contains(&m.to_lowercase()))),
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn validation_agrees_with_istiods_test_table() {
    let cases: Vec<Case> = serde_saphyr::from_str(CASES).expect("the case file parses");
    let messages: Vec<&str> = MESSAGES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(cases.len() > 400, "the table has {} cases", cases.len());

    let (mut agree, mut refused, mut worded) = (0usize, 0usize, 0usize);
    let mut report = Vec::new();
    for case in &cases {
        let verdict = judge(case);
        let valid = verdict.errors.is_empty();
        if valid == case.valid {
            agree += 1;
        } else {
            report.push(format!(
                "DISAGREE {} ({}): istiod says {}, meshroute {}: {:?}",
                case.test,
                case.source,
                if case.valid { "valid" } else { "invalid" },
                if valid { "valid" } else { "invalid" },
                verdict.errors
            ));
        }
        if !case.valid && !valid {
            refused += 1;
            if has_istiod_words(case, &verdict.errors, &messages) {
                worded += 1;
            } else {
                report.push(format!(
                    "WORDS {} ({}): want {:?}, got {:?}",
                    case.test,
                    case.source,
                    case.words.as_deref().unwrap_or("one of istiod's messages"),
                    verdict.errors
                ));
            }
        }
    }
    let agreement = 100.0 * agree as f64 / cases.len() as f64;
    let words = 100.0 * worded as f64 / refused.max(1) as f64;
    let summary = format!(
        "agree on {agree} of {} cases ({agreement:.1} %); istiod's words in {worded} of {refused} errors ({words:.1} %)",
        cases.len()
    );
    for line in &report {
        println!("{line}");
    }
    println!("{summary}");
    assert!(
        agreement >= AGREEMENT_FLOOR && words >= WORDS_FLOOR,
        "{summary}\n{}",
        report.join("\n")
    );
}
