//! The conformance suite: every scenario in `tests/conformance/*.yaml` run on real Envoy with
//! the filter and on the harness with the filter, each against its own upstreams. A scenario
//! that fails on a host fails the suite unless `tests/conformance/deviations.yaml` lists it
//! for that host with a reason; a listed deviation that passes fails it too (the list must
//! stay true). Run alone with `make conformance`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde::Deserialize;

use meshroute_core::ir::{OutboundPolicy, ProxyKind};
use meshroute_tests::{get, refusing_port, rules, start, Host, Response, Unanswered, Upstream};

/// One scenario: Istio resources, the upstreams behind them, and requests with what each
/// must come to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    /// Where the expected behaviour is documented (istio-semantics.md row or istio.io page).
    source: String,
    #[serde(default)]
    proxy: ProxySpec,
    /// Kubernetes Services (namespace `default`) and their instances, each a WorkloadEntry
    /// labelled `app: <service>`, `version: <instance>` plus its own labels.
    #[serde(default)]
    services: BTreeMap<String, ServiceSpec>,
    /// Upstreams outside the registry (for ServiceEntry and passthrough scenarios).
    #[serde(default)]
    external: BTreeMap<String, InstanceSpec>,
    /// Istio YAML; `{{port:NAME}}` stands for the port of upstream instance NAME.
    #[serde(default)]
    config: String,
    steps: Vec<Step>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySpec {
    #[serde(default)]
    gateway: bool,
    #[serde(default)]
    registry_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    port: u16,
    /// Port name prefix (Istio protocol selection): `http` unless set.
    #[serde(default)]
    protocol: Option<String>,
    instances: BTreeMap<String, InstanceSpec>,
}

/// How an upstream instance behaves (an echo server unless told otherwise).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceSpec {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Answer every request with this status.
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    delay_ms: Option<u64>,
    /// Close the connection on every request without answering.
    #[serde(default)]
    reset: bool,
    /// Nothing listens on the port: connections are refused.
    #[serde(default)]
    refuse: bool,
    /// The port's accept queue is full: connection attempts go unanswered (no SYN-ACK),
    /// as to a host that is down or behind a dropping firewall.
    #[serde(default)]
    unanswered: bool,
    /// Statuses for the first requests, in order (0 resets the connection).
    #[serde(default)]
    script: Vec<u16>,
    /// WorkloadEntry weight.
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default = "default_method")]
    method: String,
    authority: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    /// Sent this many times.
    #[serde(default = "one")]
    count: usize,
    /// With this many at once.
    #[serde(default = "one")]
    concurrency: usize,
    /// Waits this long first (ejections expiring, mirrors arriving).
    #[serde(default)]
    wait_ms: u64,
    expect: Expect,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn one() -> usize {
    1
}

/// What every response of a step must show; ranges are inclusive `[min, max]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    status: Option<u16>,
    /// Instance that answered; `none` when no upstream did.
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_contains: Option<String>,
    /// Response headers (exact values).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    absent_headers: Vec<String>,
    /// Request as the upstream saw it: headers, path, method, body.
    #[serde(default)]
    upstream_headers: BTreeMap<String, String>,
    /// Upstream request headers that start with these values.
    #[serde(default)]
    upstream_header_prefixes: BTreeMap<String, String>,
    #[serde(default)]
    upstream_absent_headers: Vec<String>,
    #[serde(default)]
    upstream_path: Option<String>,
    #[serde(default)]
    upstream_method: Option<String>,
    #[serde(default)]
    upstream_body: Option<String>,
    /// Over all the step's requests: how many each instance answered.
    #[serde(default)]
    distribution: BTreeMap<String, [usize; 2]>,
    /// Over all the step's requests: how many got each status.
    #[serde(default)]
    statuses: BTreeMap<u16, [usize; 2]>,
    /// Requests each instance received during the step (retries, mirrors included).
    #[serde(default)]
    received: BTreeMap<String, [usize; 2]>,
    /// Bounds on each request's time, milliseconds.
    #[serde(default)]
    latency_ms: Option<[u64; 2]>,
    /// Every request of the step was answered by the same instance.
    #[serde(default)]
    same_upstream: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deviation {
    scenario: String,
    /// `envoy`, `harness` or `both`.
    host: String,
    reason: String,
}

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

fn load_scenarios() -> Vec<(String, Scenario)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(suite_dir())
        .expect("tests/conformance")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "deviations.yaml")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("scenario file");
        let list: Vec<Scenario> =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        out.extend(list.into_iter().map(|s| (file.clone(), s)));
    }
    out
}

/// The running upstreams of one scenario, by instance name.
struct Upstreams {
    running: BTreeMap<String, Upstream>,
    ports: BTreeMap<String, u16>,
    /// Listeners that never accept, kept open for the scenario.
    _unanswered: Vec<Unanswered>,
}

impl Upstreams {
    fn start(s: &Scenario) -> Self {
        let mut running = BTreeMap::new();
        let mut ports = BTreeMap::new();
        let mut unanswered = Vec::new();
        let all = s
            .services
            .values()
            .flat_map(|svc| svc.instances.iter())
            .chain(s.external.iter());
        for (name, spec) in all {
            if spec.refuse {
                ports.insert(name.clone(), refusing_port());
                continue;
            }
            if spec.unanswered {
                let u = Unanswered::start();
                ports.insert(name.clone(), u.port);
                unanswered.push(u);
                continue;
            }
            let u = Upstream::start(name);
            u.fail_with(spec.status);
            if let Some(ms) = spec.delay_ms {
                u.delay_by(ms);
            }
            u.reset_always(spec.reset);
            u.script(&spec.script);
            ports.insert(name.clone(), u.port);
            running.insert(name.clone(), u);
        }
        Self {
            running,
            ports,
            _unanswered: unanswered,
        }
    }

    fn received(&self) -> BTreeMap<String, usize> {
        self.running
            .iter()
            .map(|(n, u)| (n.clone(), u.count()))
            .collect()
    }
}

/// The registry and config of a scenario, placeholders filled.
fn istio_yaml(s: &Scenario, ports: &BTreeMap<String, u16>) -> String {
    let mut yaml = String::new();
    for (svc, spec) in &s.services {
        let protocol = spec.protocol.as_deref().unwrap_or("http");
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: default}}\nspec:\n  selector: {{app: {svc}}}\n  ports: [{{name: {protocol}, port: {}}}]\n---\n",
            spec.port
        );
        for (name, inst) in &spec.instances {
            let mut labels = BTreeMap::from([
                ("app".to_string(), svc.clone()),
                ("version".to_string(), name.clone()),
            ]);
            labels.extend(inst.labels.clone());
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let weight = inst
                .weight
                .map(|w| format!("\n  weight: {w}"))
                .unwrap_or_default();
            let _ = write!(
                yaml,
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {svc}-{name}, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{{protocol}: {}}}\n  labels: {{{}}}{weight}\n---\n",
                ports[name],
                labels.join(", ")
            );
        }
    }
    yaml.push_str(&fill(&s.config, ports));
    yaml
}

/// Replaces `{{port:NAME}}` with the port of upstream instance NAME.
fn fill(text: &str, ports: &BTreeMap<String, u16>) -> String {
    let mut out = text.to_owned();
    for (name, port) in ports {
        out = out.replace(&format!("{{{{port:{name}}}}}"), &port.to_string());
    }
    out
}

/// Runs one scenario on one host; `Err` says what differed.
fn run(s: &Scenario, host: Host) -> Result<(), String> {
    let upstreams = Upstreams::start(s);
    let yaml = istio_yaml(s, &upstreams.ports);
    let kind = if s.proxy.gateway {
        ProxyKind::Gateway
    } else {
        ProxyKind::Sidecar
    };
    let outbound = if s.proxy.registry_only {
        OutboundPolicy::RegistryOnly
    } else {
        OutboundPolicy::AllowAny
    };
    let doc = rules(&[("scenario.yaml", yaml)], kind, outbound);
    let proxy = start(host, &doc);
    let port = proxy.port();
    for (i, step) in s.steps.iter().enumerate() {
        if step.wait_ms > 0 {
            thread::sleep(Duration::from_millis(step.wait_ms));
        }
        let before = upstreams.received();
        let responses = send_all(step, port, &upstreams);
        if step.wait_ms > 0 || !step.expect.received.is_empty() {
            // Mirrors and abandoned tries land after the client's answer.
            thread::sleep(Duration::from_millis(150));
        }
        let after = upstreams.received();
        check(&step.expect, &responses, &before, &after).map_err(|e| {
            format!(
                "step {} ({} {}{}): {e}",
                i + 1,
                step.method,
                step.authority,
                step.path
            )
        })?;
    }
    Ok(())
}

/// A response with the request the upstream saw for it, if any.
struct Seen {
    response: Response,
    upstream_saw: Option<meshroute_tests::Received>,
}

fn send_all(step: &Step, port: u16, upstreams: &Upstreams) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    thread::scope(|scope| {
        for _ in 0..step.concurrency.max(1) {
            let (seen, next) = (Arc::clone(&seen), Arc::clone(&next));
            scope.spawn(move || loop {
                if next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= step.count {
                    return;
                }
                let authority = fill(&step.authority, &upstreams.ports);
                let path = fill(&step.path, &upstreams.ports);
                let mut req = get(&authority, &path).method(&step.method);
                for (k, v) in &step.headers {
                    req = req.header(k, v);
                }
                if let Some(b) = &step.body {
                    req = req.body(b.as_bytes());
                }
                let response = req.send(port);
                let id = response.header("x-upstream").map(str::to_owned);
                let upstream_saw = id.and_then(|name| {
                    let report = response.report();
                    upstreams.running.get(&name).and_then(|u| {
                        let path = report["path"].as_str().unwrap_or("").to_owned();
                        u.received().into_iter().rev().find(|r| r.path == path)
                    })
                });
                if let Ok(mut s) = seen.lock() {
                    s.push(Seen {
                        response,
                        upstream_saw,
                    });
                }
            });
        }
    });
    Arc::try_unwrap(seen)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default()
}

fn within(n: usize, [lo, hi]: [usize; 2]) -> bool {
    (lo..=hi).contains(&n)
}

fn check(
    e: &Expect,
    seen: &[Seen],
    before: &BTreeMap<String, usize>,
    after: &BTreeMap<String, usize>,
) -> Result<(), String> {
    for s in seen {
        let r = &s.response;
        let brief = || {
            format!(
                "status {} headers {:?} body {:?}",
                r.status,
                r.headers,
                r.text()
            )
        };
        if let Some(status) = e.status {
            if r.status != status {
                return Err(format!("expected status {status}, got {}", brief()));
            }
        }
        if let Some(u) = &e.upstream {
            let got = r.header("x-upstream").unwrap_or("none");
            if got != u {
                return Err(format!("expected upstream {u}, got {got}: {}", brief()));
            }
        }
        if let Some(b) = &e.body {
            if r.text() != *b {
                return Err(format!("expected body {b:?}, got {}", brief()));
            }
        }
        if let Some(b) = &e.body_contains {
            if !r.text().contains(b.as_str()) {
                return Err(format!("expected body containing {b:?}, got {}", brief()));
            }
        }
        for (k, v) in &e.headers {
            if r.header(k) != Some(v.as_str()) {
                return Err(format!("expected header {k}: {v}, got {}", brief()));
            }
        }
        for k in &e.absent_headers {
            if r.header(k).is_some() {
                return Err(format!("expected no header {k}, got {}", brief()));
            }
        }
        if let Some([lo, hi]) = e.latency_ms {
            let ms = r.elapsed.as_millis() as u64;
            if !(lo..=hi).contains(&ms) {
                return Err(format!("expected {lo}..={hi} ms, took {ms} ms"));
            }
        }
        let wants_upstream_view = !e.upstream_headers.is_empty()
            || !e.upstream_header_prefixes.is_empty()
            || !e.upstream_absent_headers.is_empty()
            || e.upstream_path.is_some()
            || e.upstream_method.is_some()
            || e.upstream_body.is_some();
        if wants_upstream_view {
            let Some(q) = &s.upstream_saw else {
                return Err(format!("no upstream saw the request: {}", brief()));
            };
            for (k, v) in &e.upstream_headers {
                if q.header(k) != Some(v.as_str()) {
                    return Err(format!("upstream expected {k}: {v}, saw {:?}", q.headers));
                }
            }
            for (k, prefix) in &e.upstream_header_prefixes {
                if !q.header(k).is_some_and(|v| v.starts_with(prefix.as_str())) {
                    return Err(format!(
                        "upstream expected {k} starting with {prefix:?}, saw {:?}",
                        q.headers
                    ));
                }
            }
            for k in &e.upstream_absent_headers {
                if q.header(k).is_some() {
                    return Err(format!("upstream expected no {k}, saw {:?}", q.headers));
                }
            }
            if let Some(p) = &e.upstream_path {
                if q.path != *p {
                    return Err(format!("upstream expected path {p}, saw {}", q.path));
                }
            }
            if let Some(m) = &e.upstream_method {
                if q.method != *m {
                    return Err(format!("upstream expected method {m}, saw {}", q.method));
                }
            }
            if let Some(b) = &e.upstream_body {
                if q.body != b.as_bytes() {
                    return Err(format!(
                        "upstream expected body {b:?}, saw {:?}",
                        String::from_utf8_lossy(&q.body)
                    ));
                }
            }
        }
    }
    if !e.distribution.is_empty() {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for s in seen {
            let who = s.response.header("x-upstream").unwrap_or("none").to_owned();
            *counts.entry(who).or_default() += 1;
        }
        for (who, range) in &e.distribution {
            let n = counts.get(who).copied().unwrap_or(0);
            if !within(n, *range) {
                return Err(format!(
                    "expected {who} to answer {range:?} times: {counts:?}"
                ));
            }
        }
    }
    if e.same_upstream {
        let who: std::collections::BTreeSet<&str> = seen
            .iter()
            .map(|s| s.response.header("x-upstream").unwrap_or("none"))
            .collect();
        if who.len() != 1 {
            return Err(format!(
                "expected one upstream for every request, got {who:?}"
            ));
        }
    }
    if !e.statuses.is_empty() {
        let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
        for s in seen {
            *counts.entry(s.response.status).or_default() += 1;
        }
        for (status, range) in &e.statuses {
            let n = counts.get(status).copied().unwrap_or(0);
            if !within(n, *range) {
                return Err(format!(
                    "expected status {status} {range:?} times: {counts:?}"
                ));
            }
        }
    }
    for (who, range) in &e.received {
        let n = after.get(who).copied().unwrap_or(0) - before.get(who).copied().unwrap_or(0);
        if !within(n, *range) {
            return Err(format!(
                "expected {who} to receive {range:?} requests, it got {n}"
            ));
        }
    }
    Ok(())
}

#[test]
fn conformance_suite_on_envoy_and_harness() {
    let scenarios = load_scenarios();
    let deviations: Vec<Deviation> = std::fs::read_to_string(suite_dir().join("deviations.yaml"))
        .ok()
        .and_then(|t| {
            serde_saphyr::from_str::<Option<Vec<Deviation>>>(&t).expect("deviations.yaml")
        })
        .unwrap_or_default();
    let mut names = std::collections::BTreeSet::new();
    for (file, s) in &scenarios {
        assert!(
            names.insert(&s.name),
            "{file}: scenario {} appears twice",
            s.name
        );
        assert!(
            !s.source.is_empty(),
            "{file}: scenario {} names no source",
            s.name
        );
    }
    for d in &deviations {
        assert!(
            names.contains(&d.scenario),
            "deviation for unknown scenario {}",
            d.scenario
        );
        assert!(
            !d.reason.trim().is_empty(),
            "deviation {} gives no reason",
            d.scenario
        );
    }
    let expected_to_fail = |name: &str, host: Host| {
        deviations.iter().any(|d| {
            d.scenario == name
                && match host {
                    Host::Envoy => d.host == "envoy" || d.host == "both",
                    Host::Harness => d.host == "harness" || d.host == "both",
                }
        })
    };
    // Scenarios run a few at a time: each has its own upstreams and proxy.
    // `MESHROUTE_CONFORMANCE=part-of-a-name` runs only the scenarios whose name holds it.
    let only = std::env::var("MESHROUTE_CONFORMANCE").unwrap_or_default();
    let jobs: Vec<(usize, Host)> = (0..scenarios.len())
        .filter(|&i| scenarios[i].1.name.contains(only.as_str()))
        .flat_map(|i| [(i, Host::Envoy), (i, Host::Harness)])
        .collect();
    let results = Mutex::new(BTreeMap::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let finished = std::sync::atomic::AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(i, host)) = jobs.get(j) else {
                    return;
                };
                let s = &scenarios[i].1;
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(s, host)))
                        .unwrap_or_else(|p| {
                            Err(p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_else(|| "panicked".into()))
                        });
                // Progress straight to the terminal (libtest captures only the print
                // macros): a line per job as it ends.
                let done = finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let line = format!(
                    "conformance: [{done}/{}] {} on {host:?}: {}\n",
                    jobs.len(),
                    s.name,
                    if outcome.is_ok() { "ok" } else { "failed" }
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                results.lock().unwrap().insert((i, host as u8), outcome);
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut report = String::new();
    let mut failures = Vec::new();
    let (mut passed, mut deviating) = (0, 0);
    for (i, (file, s)) in scenarios.iter().enumerate() {
        if !results.contains_key(&(i, Host::Envoy as u8)) {
            continue;
        }
        let mut cells = Vec::new();
        for host in [Host::Envoy, Host::Harness] {
            let outcome = &results[&(i, host as u8)];
            let listed = expected_to_fail(&s.name, host);
            let cell = match (outcome, listed) {
                (Ok(()), false) => {
                    passed += 1;
                    "pass".to_string()
                }
                (Err(_), true) => {
                    deviating += 1;
                    "deviation (listed)".to_string()
                }
                (Err(e), false) => {
                    failures.push(format!("{file}: {} on {host:?}: {e}", s.name));
                    "FAIL".to_string()
                }
                (Ok(()), true) => {
                    failures.push(format!(
                        "{file}: {} on {host:?} passes: remove it from deviations.yaml",
                        s.name
                    ));
                    "PASS (listed as deviation)".to_string()
                }
            };
            cells.push(cell);
        }
        let _ = writeln!(
            report,
            "{:<64} envoy: {:<10} harness: {}",
            s.name, cells[0], cells[1]
        );
    }
    let summary = format!(
        "{} scenarios, {passed} passes, {deviating} listed deviations, {} failures",
        jobs.len() / 2,
        failures.len(),
    );
    println!("{report}\n{summary}\n{}", failures.join("\n"));
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("conformance: {summary}\n").as_bytes(),
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    assert!(scenarios.len() >= 80, "only {} scenarios", scenarios.len());
}
