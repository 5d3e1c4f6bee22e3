//! The documents name files that exist: every repository path written in backticks in
//! README.md, ARCHITECTURE.md and BENCHMARKS.md (`dir/{a,b}.rs` stands for each file).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

/// `a/{b,c}.rs` → `a/b.rs`, `a/c.rs`.
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) if open < close => path[open + 1..close]
            .split(',')
            .flat_map(|alt| expand(&format!("{}{alt}{}", &path[..open], &path[close + 1..])))
            .collect(),
        _ => vec![path.to_owned()],
    }
}

/// Backticked words that look like paths into the repository.
fn paths(text: &str) -> Vec<String> {
    const ROOTS: &[&str] = &[
        "filter/",
        "host-harness/",
        "tests/",
        "examples/",
        "envoy-configs/",
        "scripts/",
    ];
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.contains(' ') && ROOTS.iter().any(|r| w.starts_with(r)))
        .flat_map(expand)
        .collect()
}

#[test]
fn documents_name_files_that_exist() {
    let root = meshroute_tests::repo_root();
    let mut missing = Vec::new();
    for doc in ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for p in paths(&text) {
            // A path may end in `:line` or carry a glob; the file part must exist.
            let file = p.split(':').next().unwrap_or_default();
            let file = file.split('*').next().unwrap_or_default();
            if !root.join(file).exists() {
                missing.push(format!("{doc}: {p}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n{}",
        missing.join("\n")
    );
}
