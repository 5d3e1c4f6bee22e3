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
    // The seed variants of one VirtualService in one directory are duplicates, as in Istio.
    assert_eq!(meshroute(&["validate", "-f", "examples/bookinfo"]).0, 1);
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
    assert_eq!(doc["version"], 1);
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
        code, 1,
        "the directory holds conflicting VirtualServices named reviews: {out}"
    );
    let (code, _, err) = meshroute(&["compile", "-f", "examples/hello", "--labels", "oops"]);
    assert_eq!(code, 2, "{err}");
}
