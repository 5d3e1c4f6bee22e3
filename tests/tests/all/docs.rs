//! The documents hold: every repository path written in backticks in README.md,
//! ARCHITECTURE.md and BENCHMARKS.md names a file that exists (`dir/{a,b}.rs` stands for each
//! file), and every command of the README and of `meshroute --help` works as written.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::os::unix::process::CommandExt as _;

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

/// One command of a README code block, with the output lines the README shows for it.
#[derive(Debug)]
struct Command {
    line: usize,
    text: String,
    shown: Vec<String>,
}

/// Drops a trailing ` # comment` that is outside quotes.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}

/// The ```sh blocks of a Markdown document, each a list of commands. A block written as a
/// session (`$ command` followed by its output) shows output; in the others every line is a
/// command. Lines ending in `\\` continue; comment-only lines are skipped.
fn shell_blocks(text: &str) -> Vec<Vec<Command>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut n = 0;
    while n < lines.len() {
        if lines[n].trim() != "```sh" {
            n += 1;
            continue;
        }
        let start = n + 1;
        let end = (start..lines.len())
            .find(|&i| lines[i].trim() == "```")
            .expect("a closed code block");
        let session = lines[start..end].iter().any(|l| l.starts_with("$ "));
        let mut block: Vec<Command> = Vec::new();
        let mut continuing = false;
        for (i, line) in lines.iter().enumerate().take(end).skip(start) {
            if continuing {
                let part = strip_comment(line);
                continuing = part.ends_with('\\');
                let command = block.last_mut().expect("a continued command");
                command.text.push(' ');
                command.text.push_str(part.trim_end_matches('\\').trim());
                continue;
            }
            let text = if session {
                match line.strip_prefix("$ ") {
                    Some(text) => text,
                    None => {
                        let command = block.last_mut().expect("output follows a command");
                        command.shown.push(line.trim_end().to_owned());
                        continue;
                    }
                }
            } else {
                let trimmed = line.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                line
            };
            let part = strip_comment(text);
            continuing = part.ends_with('\\');
            block.push(Command {
                line: i + 1,
                text: part.trim_end_matches('\\').trim().to_owned(),
                shown: Vec::new(),
            });
        }
        blocks.push(block);
        n = end + 1;
    }
    blocks
}

/// Commands the README shows that this test does not run, and where each is exercised.
const NOT_RUN_HERE: &[(&str, &str)] = &[
    ("make run", "`meshroute demo`, which it starts: run::demo_answers_hello_v1_and_v2_per_the_example_rules"),
    ("make test", "the command running this test"),
    ("make wasm", "`make test` built the module used here"),
    ("make fuzz", "`make test` runs every fuzz target briefly (`make fuzz-smoke`)"),
    ("meshroute iptables", "needs a pod: pods::capture_rules_installed_twice_are_there_once_and_remove_takes_them_away"),
    ("setpriv ", "needs a pod: pods::an_application_without_proxy_settings_gets_the_walkthrough_through_its_sidecar"),
    ("curl http://reviews:9080/", "needs a pod: pods::an_application_without_proxy_settings_gets_the_walkthrough_through_its_sidecar"),
    ("nc 127.0.0.1 41400", "interactive, and needs tcp-echo upstreams: conformance_l4::tcp_weighted_split"),
    ("curl --resolve nginx.example.com:10443", "needs a my-nginx upstream: conformance_l4::passthrough_gateway"),
];

/// A pod of the test's own (a network namespace), so the README's fixed ports (15000, 15001,
/// 8080, …) never meet another test's.
struct Namespace {
    _node: meshroute_tests::pods::Node,
    pod: meshroute_tests::pods::Pod,
}

impl Namespace {
    fn new() -> Self {
        let mut node = meshroute_tests::pods::Node::new();
        let pod = node.pod("readme");
        Self { _node: node, pod }
    }

    /// `bash -c TEXT` inside the namespace, in `dir`, with the built tree on PATH.
    fn shell(&self, dir: &std::path::Path, seconds: u32, text: &str) -> std::process::Command {
        let bin = meshroute_tests::meshroute_binary();
        let envoy = meshroute_tests::envoy_binary();
        let path = format!(
            "{}:{}:{}",
            bin.parent().unwrap().display(),
            envoy.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = std::process::Command::new("timeout");
        c.args([
            "-s",
            "KILL",
            &seconds.to_string(),
            "ip",
            "netns",
            "exec",
            &self.pod.ns,
        ])
        .args(["bash", "-c", text])
        .current_dir(dir)
        .env("PATH", path)
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("meshroute-readme-cache"),
        )
        .stdin(std::process::Stdio::null());
        c
    }
}

/// Commands a block started with `&`, stopped (their whole process group) when it ends.
struct Background(Vec<(std::process::Child, std::path::PathBuf, String)>);

impl Background {
    fn log(&self) -> String {
        self.0
            .iter()
            .map(|(_, log, text)| {
                format!(
                    "--- {text}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = child.wait();
        }
    }
}

/// A directory of the test's own, removed afterwards.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(index: usize) -> Self {
        let dir =
            std::env::temp_dir().join(format!("meshroute-readme-{}-{index}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A directory laid out as a checkout after `make wasm`: `examples/` and the built module
    /// at the path the Makefile gives.
    fn checkout(index: usize) -> Self {
        let dir = Self::new(index);
        let root = meshroute_tests::repo_root();
        std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples")).unwrap();
        let module_dir = dir
            .path()
            .join("target/wasm32-unknown-unknown/wasm-release");
        std::fs::create_dir_all(&module_dir).unwrap();
        std::os::unix::fs::symlink(
            meshroute_tests::wasm_path(),
            module_dir.join("meshroute_filter.wasm"),
        )
        .unwrap();
        dir
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every command in README.md's shell blocks works as written on the built tree: it exits
/// 0 and prints the lines the README shows for it. Each block runs in a fresh directory
/// holding `examples/` and the built module at the path `make wasm` gives, inside a network
/// namespace of its own; a command after one started with `&` is retried until the
/// background proxy is up.
#[test]
fn every_readme_command_works_as_written() {
    let root = meshroute_tests::repo_root();
    let text = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = shell_blocks(&text);
    let mut ran = 0;
    let mut skipped = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        let dir = Scratch::checkout(index);
        let ns = Namespace::new();
        let mut background = Background(Vec::new());
        for command in block {
            let at = format!("README.md:{}: {}", command.line, command.text);
            if let Some((_, why)) = NOT_RUN_HERE
                .iter()
                .find(|(p, _)| command.text.starts_with(p))
            {
                skipped.push(format!("{at} ({why})"));
                continue;
            }
            if let Some(text) = command.text.strip_suffix('&') {
                let log = dir
                    .path()
                    .join(format!("background-{}.log", background.0.len()));
                let file = std::fs::File::create(&log).unwrap();
                let child = ns
                    .shell(dir.path(), 600, &format!("exec {text}"))
                    .stdout(file.try_clone().unwrap())
                    .stderr(file)
                    .process_group(0)
                    .spawn()
                    .unwrap();
                background.0.push((child, log, text.trim().to_owned()));
                ran += 1;
                continue;
            }
            // Behind a proxy that is starting: try again until it answers.
            let deadline = std::time::Instant::now()
                + std::time::Duration::from_secs(if background.0.is_empty() { 0 } else { 120 });
            let out = loop {
                let out = ns.shell(dir.path(), 60, &command.text).output().unwrap();
                if out.status.success() || std::time::Instant::now() >= deadline {
                    break out;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            };
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{at}\nexit {:?}\nstdout:\n{stdout}\nstderr:\n{}\nbackground:\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr),
                background.log()
            );
            let printed: Vec<&str> = stdout.lines().map(str::trim_end).collect();
            for line in &command.shown {
                assert!(
                    printed.contains(&line.as_str()),
                    "{at}\nthe README shows\n  {line}\nbut it printed:\n{stdout}"
                );
            }
            ran += 1;
        }
        let stopped: Vec<String> = background
            .0
            .iter_mut()
            .filter_map(|(child, _, text)| child.try_wait().unwrap().map(|_| text.clone()))
            .collect();
        assert!(
            stopped.is_empty(),
            "{stopped:?} stopped while their block ran:\n{}",
            background.log()
        );
    }
    eprintln!(
        "ran {ran} README commands; not run here:\n  {}",
        skipped.join("\n  ")
    );
    assert_eq!(
        skipped.len(),
        NOT_RUN_HERE.len(),
        "each exception is used once: {skipped:#?}"
    );
    assert!(
        ran >= 15,
        "only {ran} commands found in {} blocks",
        blocks.len()
    );
}

/// The subcommands `meshroute --help` lists, and each one's `Example:` line.
fn help_examples() -> Vec<(String, String)> {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(meshroute_tests::meshroute_binary())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "meshroute {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    let names: Vec<String> = top
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command's line starts two spaces in; a wrapped description is indented further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    names
        .into_iter()
        .map(|name| {
            let text = help(&[&name, "--help"]);
            // Help may be wrapped to the terminal's width: the example runs to its closing
            // backtick, whatever lines it spans.
            let example = text
                .split_once("Example: `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(example, _)| example.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| panic!("meshroute {name} --help shows no example:\n{text}"));
            (name, example)
        })
        .collect()
}

/// Every subcommand's `--help` example works as written on the built tree, in a directory
/// like a checkout's (`examples/`, the built module) inside a pod of its own: a command
/// exits 0, a server is still up after its start-up and listens.
#[test]
fn every_help_example_works_as_written() {
    let examples = help_examples();
    assert!(examples.len() >= 10, "{examples:?}");
    for (index, (name, example)) in examples.iter().enumerate() {
        let dir = Scratch::checkout(1000 + index);
        let ns = Namespace::new();
        let log = dir.path().join("example.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = ns
            .shell(dir.path(), 120, example)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut running = Background(vec![(child, log, example.clone())]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let listening = || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns.pod.ns, "ss", "-Hltn"])
                .output()
                .unwrap();
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        };
        loop {
            if let Some(status) = running.0[0].0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "meshroute {name} --help: {example}\n{status}\n{}",
                    running.log()
                );
                break;
            }
            // A server: up and listening is what its example promises.
            if listening() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "meshroute {name} --help: {example}: still running, listening nowhere\n{}",
                running.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        drop(running);
    }
}

/// `docs/istio-api.md` has one row per spec field of Istio's networking API
/// (`docs/istio-api-fields.tsv`), each `acts` or `reported`, each naming a test that
/// exists; a reported field quotes words the compiler says.
#[test]
fn the_istio_api_coverage_table_has_a_row_per_field() {
    let root = meshroute_tests::repo_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let fields: Vec<String> = read("docs/istio-api-fields.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').nth(1).unwrap().to_owned())
        .collect();
    assert!(fields.len() > 250, "{} fields", fields.len());
    let compiler: String = walk(&root.join("filter/compiler/src"))
        .into_iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let table = read("docs/istio-api.md");
    let mut rows = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let [field, class, shown, reason] = cells[..] else {
            problems.push(format!("not four cells: {line}"));
            continue;
        };
        let field = field.trim_matches('`').to_owned();
        if rows.insert(field.clone(), class.to_owned()).is_some() {
            problems.push(format!("{field}: two rows"));
        }
        match class {
            "acts" => {}
            "reported" => {
                let words = reason
                    .split('“')
                    .nth(1)
                    .and_then(|r| r.split('”').next())
                    .unwrap_or_default();
                if words.is_empty() || !compiler.contains(words) {
                    problems.push(format!("{field}: the compiler never says {words:?}"));
                }
            }
            other => problems.push(format!("{field}: class {other:?}")),
        }
        let names: Vec<&str> = shown.split('`').skip(1).step_by(2).collect();
        let exists = match names[..] {
            [scenario] if shown.starts_with("conformance ") => {
                let file = shown
                    .rsplit('(')
                    .next()
                    .and_then(|f| f.strip_suffix(')'))
                    .unwrap_or_default();
                std::fs::read_to_string(root.join("tests/conformance").join(file))
                    .is_ok_and(|t| t.contains(&format!("- name: {scenario}\n")))
            }
            [path, function] => std::fs::read_to_string(root.join(path))
                .is_ok_and(|t| t.contains(&format!("fn {function}("))),
            _ => false,
        };
        if !exists {
            problems.push(format!("{field}: no test {shown}"));
        }
    }
    for f in &fields {
        if !rows.contains_key(f) {
            problems.push(format!("{f}: no row"));
        }
    }
    for f in rows.keys() {
        if !fields.contains(f) {
            problems.push(format!("{f}: not a field of the API"));
        }
    }
    let reported = rows.values().filter(|c| *c == "reported").count();
    let summary = format!(
        "{} fields: {} act, {reported} are reported, 0 accepted in silence.",
        rows.len(),
        rows.len() - reported
    );
    if !table.contains(&summary) {
        problems.push(format!("the summary line should read {summary:?}"));
    }
    assert!(
        problems.is_empty(),
        "docs/istio-api.md (regenerate with python3 scripts/istio-api-coverage.py):\n{}",
        problems.join("\n")
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
