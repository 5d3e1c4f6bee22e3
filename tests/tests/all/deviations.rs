//! `tests/deviations.yaml` stays true: every deliberate deviation says why, and every test it
//! names exists.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Deviation {
    id: String,
    area: String,
    behaviour: String,
    reason: String,
    #[serde(default)]
    test: Option<String>,
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && !p.ends_with("target") && !p.ends_with(".build") {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn every_deviation_has_a_reason_and_its_test_exists() {
    let root = meshroute_tests::repo_root();
    let text = std::fs::read_to_string(root.join("tests/deviations.yaml")).unwrap();
    let list: Vec<Deviation> = serde_saphyr::from_str(&text).unwrap();
    assert!(!list.is_empty());
    let mut code = Vec::new();
    for dir in ["filter", "host-harness", "tests"] {
        sources(&root.join(dir), &mut code);
    }
    let mut ids = std::collections::BTreeSet::new();
    for d in &list {
        assert!(ids.insert(d.id.as_str()), "duplicate id {}", d.id);
        for (field, value) in [
            ("area", &d.area),
            ("behaviour", &d.behaviour),
            ("reason", &d.reason),
        ] {
            assert!(
                value.trim().len() > 10 || field == "area",
                "{}: {field} is empty",
                d.id
            );
        }
        if let Some(test) = &d.test {
            let needle = format!("fn {test}(");
            assert!(
                code.iter().any(|c| c.contains(&needle)),
                "{}: no test named {test}",
                d.id
            );
        }
    }
}
