//! The `meshroute` command line: exit codes and outputs users script against.
#![allow(clippy::expect_used, reason = "test helpers outside #[test] functions")]

use std::path::PathBuf;
use std::process::Command;

fn meshroute(args: &[&str]) -> (i32, String, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_meshroute"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("run meshroute");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshroute-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn validate_exit_codes() {
    assert_eq!(
        meshroute(&[
            "validate",
            "-f",
            "examples/bookinfo/registry.yaml",
            "-f",
            "examples/bookinfo/gateway.yaml"
        ])
        .0,
        0
    );
    // The example directory is one consistent configuration; its alternatives live apart.
    assert_eq!(meshroute(&["validate", "-f", "examples/bookinfo"]).0, 0);
    // Two variants of one VirtualService together are duplicates, as in Istio.
    assert_eq!(
        meshroute(&[
            "validate",
            "-f",
            "examples/bookinfo",
            "-f",
            "examples/bookinfo-variants"
        ])
        .0,
        1
    );
    let bad = temp_file("bad.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: ['*']\n  http:\n  - route:\n    - destination: {host: a}\n      weight: -5\n");
    let (code, _, err) = meshroute(&["validate", "-f", bad.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.yaml:5:") && err.contains("spec.hosts[0]"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "all errors are reported: {err}");
    assert_eq!(meshroute(&["validate", "-f", "does/not/exist.yaml"]).0, 2);
    assert_eq!(meshroute(&["validate"]).0, 2, "missing -f is a usage error");
}

#[test]
fn compile_writes_the_rules_document_for_the_identity() {
    let (code, out, err) = meshroute(&[
        "compile",
        "-f",
        "examples/bookinfo/registry.yaml",
        "-f",
        "examples/bookinfo/destination-rules.yaml",
        "-f",
        "examples/bookinfo/reviews-jason.yaml",
        "--namespace",
        "default",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("json on stdout");
    assert_eq!(doc["version"], meshroute_core::ir::VERSION);
    assert_eq!(doc["proxy"]["kind"], "sidecar");
    let text = out.as_str();
    assert!(text.contains("outbound|9080|v2|reviews.default.svc.cluster.local"));

    let (code, out, _) = meshroute(&[
        "compile",
        "-f",
        "examples/bookinfo",
        "--for",
        "gateway",
        "--outbound",
        "registry-only",
    ]);
    assert_eq!(
        code, 0,
        "the example directory compiles for the gateway: {out}"
    );
    let (code, _, err) = meshroute(&["compile", "-f", "examples/hello", "--labels", "oops"]);
    assert_eq!(code, 2, "{err}");
}

const BOOKINFO_JASON: [&str; 6] = [
    "-f",
    "examples/bookinfo/registry.yaml",
    "-f",
    "examples/bookinfo/destination-rules.yaml",
    "-f",
    "examples/bookinfo/reviews-jason.yaml",
];

#[test]
fn explain_names_the_rule_subset_and_source_lines() {
    let mut args = vec!["explain"];
    args.extend(BOOKINFO_JASON);
    args.extend([
        "-H",
        "end-user: jason",
        "GET",
        "http://reviews:9080/reviews/1",
    ]);
    let (code, out, err) = meshroute(&args);
    assert_eq!(code, 0, "{err}");
    // The whole output is stable: a snapshot.
    assert_eq!(
        out.trim_end(),
        "proxy: Sidecar in namespace default (outbound policy AllowAny)
request: GET http://reviews:9080/reviews/1 (route table port 9080)
virtual host: reviews.default.svc.cluster.local:9080 (VirtualService default/reviews at examples/bookinfo/reviews-jason.yaml:2)
  route 0 (VirtualService default/reviews at examples/bookinfo/reviews-jason.yaml:10): matched
    -> reviews.default.svc.cluster.local subset v2 100.0%: cluster outbound|9080|v2|reviews.default.svc.cluster.local, endpoints [127.0.0.1:19082]
       lb RoundRobin (Service default/reviews at examples/bookinfo/registry.yaml:3)
  policies: timeout none, retries 2 on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
outcome: forward to outbound|9080|v2|reviews.default.svc.cluster.local endpoint 127.0.0.1:19082"
    );
    let mut args = vec!["explain"];
    args.extend(BOOKINFO_JASON);
    args.extend(["-H", "end-user: bob", "GET", "http://reviews:9080/"]);
    let (_, out, _) = meshroute(&args);
    assert!(out.contains("route 0 (VirtualService default/reviews at examples/bookinfo/reviews-jason.yaml:10): no match: header end-user is not exact \"jason\""), "{out}");
    assert!(out.contains("subset v3"), "{out}");
}

#[test]
fn explain_registry_only_502_and_missing_subset_503_nc() {
    let (_, out, _) = meshroute(&[
        "explain",
        "-f",
        "examples/bookinfo/registry.yaml",
        "--outbound",
        "registry-only",
        "GET",
        "http://example.com/",
    ]);
    assert!(
        out.contains("virtual host: none matches \"example.com\""),
        "{out}"
    );
    assert!(out.ends_with("outcome: reply 502\n"), "{out}");

    let vs = temp_file(
        "missing-subset.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n",
    );
    let (_, out, _) = meshroute(&[
        "explain",
        "-f",
        "examples/bookinfo/registry.yaml",
        "-f",
        vs.to_str().expect("utf-8"),
        "GET",
        "http://reviews:9080/",
    ]);
    assert!(
        out.contains("missing-subset.yaml:7): matched"),
        "points at the route's line: {out}"
    );
    assert!(
        out.contains("cluster not defined (no DestinationRule declares the subset)"),
        "{out}"
    );
    assert!(out.contains("outcome: reply 503 NC"), "{out}");
}

#[test]
fn simulate_reports_the_split() {
    let (code, out, err) = meshroute(&[
        "simulate",
        "-f",
        "examples/hello/registry.yaml",
        "-f",
        "examples/hello/case4-weights.yaml",
        "-n",
        "10000",
        "GET",
        "http://svc-hello:8080/",
    ]);
    assert_eq!(code, 0, "{err}");
    let v1 = out
        .lines()
        .find(|l| l.contains("svc-hello-v1"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.trim_end_matches('%').parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((88.5..=91.5).contains(&v1), "{out}");
}

#[test]
fn explain_and_simulate_connections() {
    let files = [
        "-f",
        "examples/tcp/registry.yaml",
        "-f",
        "examples/tcp/gateway.yaml",
        "--for",
        "gateway",
    ];
    let mut args = vec!["explain"];
    args.extend(files);
    args.extend(["TLS", "tls://nginx.example.com:443"]);
    let (code, out, err) = meshroute(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("SNI in [nginx.example.com]): matched")
            && out.contains("examples/tcp/gateway.yaml:36")
            && out.contains("outcome: forward to outbound|443||my-nginx.default.svc.cluster.local"),
        "{out}"
    );
    let mut args = vec!["explain"];
    args.extend(files);
    args.extend(["TLS", "tls://other.example.com:443"]);
    let (_, out, _) = meshroute(&args);
    assert!(out.contains("outcome: close (no route matches"), "{out}");
    let mut args = vec!["simulate", "-n", "4000"];
    args.extend(files);
    args.extend(["TCP", "tcp://127.0.0.1:31400"]);
    let (code, out, err) = meshroute(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("4000 connections"), "{out}");
    let v1 = out
        .lines()
        .find(|l| l.contains("|v1|"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.trim_end_matches('%').parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((77.0..=83.0).contains(&v1), "{out}");
}

/// `meshroute ARGS` with `input` on standard input.
fn meshroute_stdin(args: &[&str], input: &str) -> (i32, String, String) {
    use std::io::Write as _;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshroute"))
        .args(args)
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run meshroute");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dash_reads_the_configuration_from_standard_input() {
    let registry = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/registry.yaml"),
    )
    .expect("example");
    let (code, _, err) = meshroute_stdin(&["validate", "-f", "-"], &registry);
    assert_eq!(code, 0, "{err}");
    // Mixed with files, and errors name <stdin> with the line.
    let bad = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: ['*']\n  http:\n  - route:\n    - destination: {host: a}\n";
    let (code, _, err) = meshroute_stdin(
        &["validate", "-f", "examples/hello/registry.yaml", "-f", "-"],
        bad,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("<stdin>:5:") && err.contains("spec.hosts[0]"),
        "{err}"
    );
    let (code, out, err) =
        meshroute_stdin(&["compile", "-f", "-", "--namespace", "default"], &registry);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("svc-hello"), "{out}");
}

#[test]
fn an_output_format_that_does_not_exist_is_a_usage_error() {
    let (code, _, err) = meshroute(&[
        "explain",
        "-f",
        "examples/hello/registry.yaml",
        "-o",
        "toml",
        "GET",
        "http://svc-hello:8080/",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("toml")
            && err.contains("text")
            && err.contains("json")
            && err.contains("yaml"),
        "{err}"
    );
}

#[test]
fn capture_is_refused_for_a_gateway() {
    let (code, _, err) = meshroute(&[
        "run",
        "-f",
        "examples/bookinfo",
        "--for",
        "gateway",
        "--capture",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--capture is for sidecars"), "{err}");
}

#[test]
fn completions_are_a_script_the_shell_accepts() {
    let (code, script, err) = meshroute(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    for sub in [
        "validate",
        "compile",
        "explain",
        "simulate",
        "run",
        "envoy-config",
    ] {
        assert!(script.contains(sub), "{sub} missing from the completions");
    }
    let path = temp_file("meshroute.bash", &script);
    let checked = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("bash");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let (code, _, _) = meshroute(&["completions", "tcsh-like"]);
    assert_eq!(code, 2);
}

/// `meshroute run` caches the compiled module under `$XDG_CACHE_HOME/meshroute`, not next
/// to the executable (which may be read-only, e.g. `/usr/local/bin`).
#[test]
fn compiled_modules_are_cached_in_the_users_cache_directory() {
    let cache = std::env::temp_dir().join(format!("meshroute-xdg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshroute"))
        .args([
            "run",
            "-f",
            "examples/bookinfo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            "127.0.0.1:0",
            "--access-log",
            "off",
        ])
        .env("XDG_CACHE_HOME", &cache)
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn meshroute");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let cached = || {
        walk(&cache.join("meshroute").join("modules"))
            .iter()
            .any(|p| p.is_file())
    };
    while !cached() && std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("meshroute exited: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(cached(), "nothing cached under {}", cache.display());
    let _ = std::fs::remove_dir_all(&cache);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `validate -o json|yaml` lists the diagnostics as `istioctl analyze -o` lists its
/// messages, with stable codes and where each one is; the YAML is the same list.
#[test]
fn validate_lists_messages_with_codes_as_json_and_yaml() {
    let bad = temp_file("coded.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: ['*']\n  http:\n  - route:\n    - destination: {host: a}\n      weight: -5\n");
    let path = bad.to_str().expect("utf8");
    let (code, json_out, err) = meshroute(&["validate", "-f", path, "-o", "json"]);
    assert_eq!(code, 1, "{err}");
    let messages: serde_json::Value = serde_json::from_str(&json_out).expect("json");
    let list = messages.as_array().expect("a list");
    assert_eq!(list.len(), 2, "{json_out}");
    for m in list {
        assert_eq!(m["code"], "IST0106", "{m}");
        assert_eq!(m["level"], "Error", "{m}");
        assert_eq!(m["origin"], "VirtualService default/r", "{m}");
        assert!(m["file"].as_str().expect("file").ends_with("coded.yaml"));
        assert!(m["line"].as_u64().expect("line") >= 5, "{m}");
    }
    assert!(
        list.iter().any(|m| m["field"] == "spec.hosts[0]"),
        "{json_out}"
    );
    let (code, yaml_out, _) = meshroute(&["validate", "-f", path, "-o", "yaml"]);
    assert_eq!(code, 1);
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&yaml_out).expect("yaml");
    assert_eq!(from_yaml, messages, "{yaml_out}");
    let broken = temp_file("broken.yaml", "kind: [unclosed\n");
    let (_, out, _) = meshroute(&[
        "validate",
        "-f",
        broken.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(parsed[0]["code"], "MR0001", "{out}");
}

/// `-o yaml` is real YAML: it reads back as the same value as `-o json`, for explain and
/// for a manifest written to a `.yaml` file.
#[test]
fn yaml_output_reads_back_as_the_json_output() {
    let mut args = vec!["explain"];
    args.extend(BOOKINFO_JASON);
    args.extend([
        "-H",
        "end-user: jason",
        "GET",
        "http://reviews:9080/reviews/1",
    ]);
    let with = |format: &str| {
        let mut a = args.clone();
        a.extend(["-o", format]);
        let (code, out, err) = meshroute(&a);
        assert_eq!(code, 0, "{err}");
        out
    };
    let json: serde_json::Value = serde_json::from_str(&with("json")).expect("json");
    let yaml = with("yaml");
    assert!(!yaml.trim_start().starts_with('{'), "{yaml}");
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
    assert_eq!(from_yaml, json);

    let dir = temp_file("unused", "").with_file_name("");
    let (yaml_file, json_file) = (dir.join("plugin.yaml"), dir.join("plugin.json"));
    for out in [&yaml_file, &json_file] {
        let (code, _, err) = meshroute(&[
            "istio-manifest",
            "--kind",
            "wasm-plugin",
            "-f",
            "examples/bookinfo",
            "--for",
            "gateway",
            "--namespace",
            "istio-system",
            "--module",
            "oci://registry.example/meshroute-filter:0.1",
            "-o",
            out.to_str().expect("utf8"),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let yaml = std::fs::read_to_string(&yaml_file).expect("yaml file");
    assert!(yaml.starts_with("apiVersion: "), "{yaml}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).expect("json file"))
            .expect("json");
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
    assert_eq!(from_yaml, json);
}
