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

/// The local stack is safe on a laptop: nothing listens beyond loopback, every service has
/// a healthcheck, Envoy's admin port and `meshroute run`'s ports do not collide, and the
/// files it mounts and builds from exist.
#[test]
fn the_compose_stack_binds_loopback_only_and_checks_its_health() {
    let root = meshroute_tests::repo_root();
    let compose_file = root.join("envoy-configs/docker-compose.yml");
    let text = std::fs::read_to_string(&compose_file).unwrap();
    let compose: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let services = compose["services"].as_object().unwrap();
    assert!(services.contains_key("envoy") && services.contains_key("meshroute"));
    let mut ports = Vec::new();
    for (name, s) in services {
        assert!(
            s["healthcheck"]["test"].is_array(),
            "{name} has no healthcheck"
        );
        let command: Vec<&str> = s["command"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for w in command.windows(2) {
            if ["--listen", "--admin", "--bind"].contains(&w[0]) {
                assert!(w[1].starts_with("127.0.0.1"), "{name}: {} {}", w[0], w[1]);
                if w[0] != "--bind" {
                    ports.push(w[1].rsplit(':').next().unwrap().to_owned());
                }
            }
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let host_path = v.as_str().unwrap().split(':').next().unwrap();
            let path = root.join("envoy-configs").join(host_path);
            // The module exists once `make wasm` has run, as the file's header says.
            if !host_path.ends_with(".wasm") {
                assert!(path.exists(), "{name} mounts {host_path}, which is missing");
            }
        }
        if let Some(dockerfile) = s["build"]["dockerfile"].as_str() {
            assert!(root.join(dockerfile).exists(), "{dockerfile}");
        }
    }
    // Envoy's listeners and admin come from its bootstrap.
    let bootstrap =
        std::fs::read_to_string(root.join("envoy-configs/hello-sidecar.envoy.yaml")).unwrap();
    let bootstrap: serde_json::Value = serde_saphyr::from_str(&bootstrap).unwrap();
    let mut addresses = vec![bootstrap["admin"]["address"]["socket_address"].clone()];
    for l in bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
    {
        addresses.push(l["address"]["socket_address"].clone());
    }
    for a in addresses {
        assert_eq!(a["address"], "127.0.0.1", "{a}");
        ports.push(a["port_value"].to_string());
    }
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "ports collide: {ports:?}");
    assert!(
        !ports.iter().any(|p| p == "15000"),
        "15000 is meshroute run's default admin port: {ports:?}"
    );
}
