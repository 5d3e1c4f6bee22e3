//! The README's commands work as written: every `meshroute` command in its shell blocks that
//! runs to an end (not the servers started with `&`, not the capture rules, which need a
//! pod of their own) exits 0 from the repository root, and where the README shows the
//! output (`$ meshroute …` followed by lines), those lines are what it prints.
#![allow(clippy::expect_used, reason = "test helpers outside test functions")]

use std::path::PathBuf;
use std::process::Command;

/// A command of the README and the output shown under it (empty when none is shown).
struct Documented {
    line: usize,
    args: Vec<String>,
    shown: Vec<String>,
}

/// Splits a shell command line into words (single quotes, `\` continuations joined already).
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in command.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

fn documented(readme: &str) -> Vec<Documented> {
    let mut out: Vec<Documented> = Vec::new();
    let mut in_block = false;
    // The prompted command whose output the following lines show.
    let mut showing: Option<usize> = None;
    let mut lines = readme.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        if line.starts_with("```") {
            in_block = !in_block;
            showing = None;
            continue;
        }
        if !in_block {
            continue;
        }
        let (prompted, text) = match line.strip_prefix("$ ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        if !text.starts_with("meshroute ") {
            if let Some(i) = showing {
                out[i].shown.push(line.to_owned());
            }
            continue;
        }
        showing = None;
        let mut command = text.to_owned();
        while command.trim_end().ends_with('\\') {
            command = command.trim_end().trim_end_matches('\\').to_owned();
            match lines.next() {
                Some((_, next)) => command.push_str(next),
                None => break,
            }
        }
        // A comment after the command.
        if let Some(at) = command.find(" #") {
            command.truncate(at);
        }
        let command = command.trim();
        let background = command.ends_with('&');
        let args = words(command.trim_end_matches('&'));
        let sub = args.get(1).map(String::as_str).unwrap_or_default();
        if background || matches!(sub, "run" | "iptables" | "demo" | "hello") {
            continue;
        }
        out.push(Documented {
            line: n + 1,
            args: args.into_iter().skip(1).collect(),
            shown: Vec::new(),
        });
        if prompted {
            showing = Some(out.len() - 1);
        }
    }
    out
}

#[test]
fn every_command_in_the_readme_works_as_written() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let commands = documented(&readme);
    assert!(commands.len() >= 6, "found {} commands", commands.len());
    let scratch = std::env::temp_dir().join(format!("meshroute-readme-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let wasm = root.join("target/wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm");
    let mut checked_output = 0;
    for d in &commands {
        // Files the README writes go to a scratch directory; module paths are the built one.
        let args: Vec<String> = d
            .args
            .iter()
            .map(|a| {
                if a.ends_with("meshroute_filter.wasm") {
                    std::env::var("MESHROUTE_WASM").unwrap_or_else(|_| wasm.display().to_string())
                } else {
                    a.clone()
                }
            })
            .collect();
        let mut args_out = Vec::new();
        let mut iter = args.iter().peekable();
        while let Some(a) = iter.next() {
            args_out.push(a.clone());
            if a == "-o" {
                if let Some(file) = iter.next() {
                    let target = if matches!(file.as_str(), "json" | "text" | "yaml") {
                        file.clone()
                    } else {
                        scratch.join(file).display().to_string()
                    };
                    args_out.push(target);
                }
            }
        }
        if d.args.iter().any(|a| a.ends_with("meshroute_filter.wasm")) && !wasm.exists() {
            assert!(
                std::env::var_os("MESHROUTE_WASM").is_some(),
                "README.md:{}: needs the built filter (make wasm)",
                d.line
            );
        }
        let out = Command::new(env!("CARGO_BIN_EXE_meshroute"))
            .args(&args_out)
            .current_dir(&root)
            .output()
            .expect("run meshroute");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README.md:{}: meshroute {} exited {:?}:\n{}{}",
            d.line,
            d.args.join(" "),
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        if !d.shown.is_empty() {
            checked_output += 1;
            let printed: Vec<&str> = stdout.lines().map(str::trim_end).collect();
            for shown in &d.shown {
                // Sampled figures (simulate's counts) vary with nothing here: the same seed.
                assert!(
                    printed.contains(&shown.trim_end()),
                    "README.md:{}: `meshroute {}` does not print\n{shown}\nit prints:\n{stdout}",
                    d.line,
                    d.args.join(" ")
                );
            }
        }
    }
    assert!(
        checked_output >= 2,
        "outputs shown in the README were compared"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
