//! `meshroute run` and `meshroute demo` as a user runs them: the binary, real files,
//! explicit-proxy clients, hot reload under load, metrics and the config dump.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use meshroute_tests::{free_port, get, registry, subsets, wasm_path, Upstream};

fn binary() -> PathBuf {
    meshroute_tests::meshroute_binary()
}

/// A `meshroute` process, stopped by PID on drop.
pub(crate) struct Meshroute {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Meshroute {
    pub(crate) fn start(args: &[&str], ready_port: u16) -> Self {
        Self::start_with_env(args, ready_port, &[])
    }

    fn start_with_env(args: &[&str], ready_port: u16, env: &[(&str, &Path)]) -> Self {
        let mut child = Command::new(binary())
            .args(args)
            .envs(env.iter().copied())
            .env("MESHROUTE_WASM", wasm_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshroute");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let mut m = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        while TcpStream::connect(("127.0.0.1", ready_port)).is_err() {
            if let Ok(Some(s)) = m.child.try_wait() {
                panic!("meshroute exited ({s}):\n{}", m.log());
            }
            assert!(Instant::now() < deadline, "not listening:\n{}", m.log());
            thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// `meshroute run -f CONFIG` listening on fresh loopback ports, with `extra` arguments:
    /// the process, its listener's port and its admin port.
    pub(crate) fn run_on_fresh_ports(config: &Path, extra: &[&str]) -> (Self, u16, u16) {
        let (port, admin) = (free_port(), free_port());
        let (listen, admin_addr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
        let config = config.to_str().expect("a UTF-8 path");
        let mut args = vec![
            "run",
            "-f",
            config,
            "--listen",
            &listen,
            "--admin",
            &admin_addr,
        ];
        args.extend_from_slice(extra);
        (Self::start(&args, port), port, admin)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Meshroute {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request in absolute form, as an HTTP client configured with `HTTP_PROXY` sends it.
fn via_proxy(proxy_port: u16, url: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    write!(
        conn,
        "GET {url} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub(crate) fn write_config(dir: &Path, name: &str, text: &str) {
    // Write then rename, as editors and config syncers do, so a reload never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn route_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web, subset: {subset}}}}}]\n"
    )
}

#[test]
fn sidecar_serves_explicit_proxy_clients_and_reloads_under_load_without_failures() {
    let v1 = Upstream::start("v1");
    let v2 = Upstream::start("v2");
    let dir = std::env::temp_dir().join(format!("meshroute-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(
        &dir,
        "registry.yaml",
        &format!(
            "{}{}",
            registry("web", 8000, &[&v1, &v2]),
            subsets("web", &["v1", "v2"])
        ),
    );
    write_config(&dir, "vs.yaml", &route_to("v1"));
    let (m, port, admin) = Meshroute::run_on_fresh_ports(&dir, &[]);
    let (status, body) = via_proxy(port, "http://web:8000/hello");
    assert_eq!(status, 200, "{body}\n{}", m.log());
    assert!(body.contains("\"upstream\":\"v1\""), "{body}");

    // A bounded stream of requests while the configuration changes twice, once invalidly.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failures, sent) = (Arc::clone(&stop), Arc::clone(&failures), Arc::clone(&sent));
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && sent.load(Ordering::Relaxed) < 20_000
            {
                let (status, body) = via_proxy(port, "http://web:8000/load");
                sent.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    failures.lock().unwrap().push((status, body));
                }
            }
        })
    };
    let wait_for = |upstream: &Upstream| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let before = upstream.count();
        while upstream.count() < before + 5 {
            assert!(
                Instant::now() < deadline,
                "traffic never moved to {}:\n{}",
                upstream.name,
                m.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    write_config(&dir, "vs.yaml", &route_to("v2"));
    wait_for(&v2);
    write_config(&dir, "vs.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web, subset: v2}, weight: -5}]\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dump = String::new();
    while Instant::now() < deadline {
        dump = get("admin", "/config_dump").send(admin).text();
        if dump.contains("weight -5") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dump.contains("weight -5"),
        "the failed reload is reported in /config_dump:\n{dump}"
    );
    let v2_before = v2.count();
    thread::sleep(Duration::from_millis(500));
    assert!(v2.count() > v2_before, "still serving the last good rules");
    write_config(&dir, "vs.yaml", &route_to("v1"));
    wait_for(&v1);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(3)]
    );
    assert!(sent.load(Ordering::Relaxed) > 20, "the load actually ran");

    let metrics = get("admin", "/stats/prometheus").send(admin).text();
    assert!(
        metrics.contains("meshroute_config_reloads_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshroute_config_reload_failures_total 1"),
        "{metrics}"
    );
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total")
                && l.contains("destination_version=\"v2\"")
                && l.contains("response_code=\"200\"")
        })
        .unwrap_or_else(|| panic!("no istio_requests_total for v2:\n{metrics}"));
    assert!(
        line.contains("destination_service=\"web.default.svc.cluster.local\""),
        "{line}"
    );
    let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 5, "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_answers_hello_v1_and_v2_per_the_example_rules() {
    let (port, admin) = (free_port(), free_port());
    let offset = (port - 80).to_string();
    let admin_addr = format!("127.0.0.1:{admin}");
    let m = Meshroute::start(
        &["demo", "--port-offset", &offset, "--admin", &admin_addr],
        port,
    );
    let v2 = get("demo", "/v2").send(port);
    assert_eq!(v2.text(), "Hello server - v2\n", "{}", m.log());
    assert_eq!(get("demo", "/v1").send(port).text(), "Hello server - v1\n");
    let mut seen_v1 = 0;
    for _ in 0..50 {
        if get("demo", "/").send(port).text() == "Hello server - v1\n" {
            seen_v1 += 1;
        }
    }
    assert!(seen_v1 >= 30, "90/10 split: {seen_v1} of 50 from v1");
    assert!(
        m.log().contains("curl http://"),
        "prints a curl line:\n{}",
        m.log()
    );
}

fn high_water_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_100_mb_body_streams_through_in_bounded_memory() {
    let up = Upstream::start("sink");
    let dir = std::env::temp_dir().join(format!("meshroute-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir, "registry.yaml", &registry("web", 8000, &[&up]));
    let (m, port, _) = Meshroute::run_on_fresh_ports(&dir, &[]);
    // Warm up (instances, pools) before measuring.
    assert_eq!(
        via_proxy(port, "http://web:8000/warm").0,
        200,
        "{}",
        m.log()
    );
    let before = high_water_kb(m.child.id());

    const SIZE: usize = 100 << 20;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(conn, "POST http://web:8000/upload HTTP/1.1\r\nhost: web:8000\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n").unwrap();
    let chunk = vec![b'x'; 1 << 16];
    for _ in 0..SIZE / chunk.len() {
        if let Err(e) = conn.write_all(&chunk) {
            let mut text = String::new();
            let _ = conn.read_to_string(&mut text);
            panic!("upload cut short ({e}): {text}\n{}", m.log());
        }
    }
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(
        text.contains(&format!("\"body_len\":{SIZE}")),
        "the upstream got every byte: {}",
        &text[..text.len().min(300)]
    );
    let grown_mb = high_water_kb(m.child.id()).saturating_sub(before) / 1024;
    assert!(
        grown_mb < 40,
        "peak memory grew by {grown_mb} MB for a 100 MB body"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTPS request to 127.0.0.1:`port` with SNI `name`, trusting only `root_pem`.
pub(crate) fn https_get(
    port: u16,
    name: &str,
    root_pem: &str,
    path: &str,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(name.to_owned()).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        // Servers may close without close_notify after `connection: close`.
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn gateway_terminates_tls_by_sni_and_redirects_plain_http() {
    let up = Upstream::start("web");
    let dir = std::env::temp_dir().join(format!("meshroute-tls-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("creds/wild-cert")).unwrap();
    let secure = rcgen::generate_simple_self_signed(vec!["secure.example.com".to_owned()]).unwrap();
    let wild = rcgen::generate_simple_self_signed(vec!["*.wild.example".to_owned()]).unwrap();
    std::fs::write(dir.join("secure.crt"), secure.cert.pem()).unwrap();
    std::fs::write(dir.join("secure.key"), secure.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("creds/wild-cert/tls.crt"), wild.cert.pem()).unwrap();
    std::fs::write(
        dir.join("creds/wild-cert/tls.key"),
        wild.signing_key.serialize_pem(),
    )
    .unwrap();
    let config = format!(
        "{}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-secure, protocol: HTTPS}}
    hosts: [secure.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {crt}, privateKey: {key}}}
  - port: {{number: 443, name: https-wild, protocol: HTTPS}}
    hosts: ['*.wild.example']
    tls: {{mode: SIMPLE, credentialName: wild-cert}}
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [secure.example.com]
    tls: {{httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [secure.example.com, '*.wild.example']
  gateways: [istio-system/gw]
  http:
  - route: [{{destination: {{host: web.default.svc.cluster.local}}}}]
",
        registry("web", 8000, &[&up]),
        crt = dir.join("secure.crt").display(),
        key = dir.join("secure.key").display(),
    );
    write_config(&dir, "config.yaml", &config);
    // Both server ports shift by one offset: find one where both are free.
    let (https_port, offset, http_port) = (0..50)
        .map(|_| {
            let https = free_port();
            (https, https - 443, https - 443 + 80)
        })
        .find(|(_, _, http)| std::net::TcpListener::bind(("127.0.0.1", *http)).is_ok())
        .expect("a free port pair");
    let admin = format!("127.0.0.1:{}", free_port());
    let creds = dir.join("creds");
    let m = Meshroute::start(
        &[
            "run",
            "-f",
            dir.join("config.yaml").to_str().unwrap(),
            "--for",
            "gateway",
            "--namespace",
            "istio-system",
            "--port-offset",
            &offset.to_string(),
            "--admin",
            &admin,
            "--credentials-dir",
            creds.to_str().unwrap(),
        ],
        https_port,
    );
    let r = https_get(https_port, "secure.example.com", &secure.cert.pem(), "/pay")
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains(r#""x-forwarded-proto","https""#),
        "the upstream learns the scheme: {r}"
    );
    // SNI picks the credentialName certificate for the wildcard host.
    let r = https_get(https_port, "api.wild.example", &wild.cert.pem(), "/")
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The wrong certificate for a name fails the handshake instead of serving.
    assert!(https_get(https_port, "api.wild.example", &secure.cert.pem(), "/").is_err());
    // Plain HTTP for the host is redirected to https.
    let redirect = get("secure.example.com", "/pay?x=1").send(http_port);
    assert_eq!(redirect.status, 301);
    assert_eq!(
        redirect.header("location"),
        Some("https://secure.example.com/pay?x=1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gateway_listeners_follow_the_ports_of_reloaded_rules_without_dropping_traffic() {
    let up = Upstream::start("web");
    let dir = std::env::temp_dir().join(format!("meshroute-ports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gateway = |ports: &[u16]| {
        let servers: String = ports
            .iter()
            .map(|p| {
                format!(
                    "  - port: {{number: {p}, name: http-{p}, protocol: HTTP}}\n    hosts: ['*']\n"
                )
            })
            .collect();
        format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}")
    };
    write_config(
        &dir,
        "registry.yaml",
        &format!(
            "{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: ['*']\n  gateways: [istio-system/gw]\n  http:\n  - route: [{{destination: {{host: web.default.svc.cluster.local}}}}]\n",
            registry("web", 8000, &[&up])
        ),
    );
    write_config(&dir, "gateway.yaml", &gateway(&[80]));
    let (first, offset, second) = (0..50)
        .map(|_| {
            let p = free_port();
            (p, p - 80, p - 80 + 81)
        })
        .find(|(_, _, s)| std::net::TcpListener::bind(("127.0.0.1", *s)).is_ok())
        .expect("a free port pair");
    let admin = format!("127.0.0.1:{}", free_port());
    let m = Meshroute::start(
        &[
            "run",
            "-f",
            dir.to_str().unwrap(),
            "--for",
            "gateway",
            "--namespace",
            "istio-system",
            "--port-offset",
            &offset.to_string(),
            "--admin",
            &admin,
        ],
        first,
    );
    assert!(TcpStream::connect(("127.0.0.1", second)).is_err());
    // Load on one port while the other opens or closes.
    let under_load = |port: u16, change: &dyn Fn()| {
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut failures = 0;
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if get("web", "/")
                        .try_send(port)
                        .map(|r| r.status)
                        .unwrap_or(0)
                        != 200
                    {
                        failures += 1;
                    }
                }
                failures
            })
        };
        change();
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}:\n{}", m.log());
            thread::sleep(Duration::from_millis(50));
        }
    };
    let serves = |port: u16| {
        get("web", "/")
            .try_send(port)
            .is_ok_and(|r| r.status == 200)
    };
    let failures = under_load(first, &|| {
        write_config(&dir, "gateway.yaml", &gateway(&[80, 81]));
        wait("port 81 never opened", &|| serves(second));
    });
    assert_eq!(failures, 0, "port 80 failed while 81 opened");
    let failures = under_load(second, &|| {
        write_config(&dir, "gateway.yaml", &gateway(&[81]));
        wait("port 80 never closed", &|| {
            TcpStream::connect(("127.0.0.1", first)).is_err()
        });
    });
    assert_eq!(failures, 0, "port 81 failed while 80 closed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A POST to the admin port.
fn admin_post(admin: u16, path: &str) -> u16 {
    let mut req = get("admin", path);
    req.method = "POST";
    req.send(admin).status
}

#[test]
fn the_admin_port_answers_what_operators_script_against() {
    let up = Upstream::start("web");
    let dir = std::env::temp_dir().join(format!("meshroute-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir, "registry.yaml", &registry("web", 8000, &[&up]));
    let (port, admin) = (free_port(), free_port());
    let mut m = Meshroute::start(
        &[
            "run",
            "-f",
            dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ],
        port,
    );
    let index = get("admin", "/").send(admin);
    assert_eq!(index.status, 200);
    for listed in [
        "/ready",
        "/server_info",
        "/stats/prometheus",
        "/config_dump",
        "/quitquitquit",
    ] {
        assert!(
            index.text().contains(listed),
            "{listed} missing from\n{}",
            index.text()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while get("admin", "/ready").send(admin).status != 200 {
        assert!(Instant::now() < deadline, "{}", m.log());
        thread::sleep(Duration::from_millis(20));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&get("admin", "/server_info").send(admin).body).unwrap();
    assert_eq!(info["state"], "LIVE", "{info}");
    assert!(info["version"].as_str().unwrap().starts_with("meshroute/"));
    // The config dump in Envoy's envelope; clusters in Envoy's line format.
    let dump: serde_json::Value =
        serde_json::from_slice(&get("admin", "/config_dump").send(admin).body).unwrap();
    let entry = &dump["configs"][0];
    assert!(
        entry["@type"]
            .as_str()
            .unwrap()
            .starts_with("type.googleapis.com/"),
        "{dump}"
    );
    assert_eq!(entry["rules"]["proxy"]["kind"], "sidecar");
    let clusters = get("admin", "/clusters").send(admin).text();
    let cluster = "outbound|8000||web.default.svc.cluster.local";
    for line in [
        format!("{cluster}::added_via_api::false"),
        format!("{cluster}::127.0.0.1:{}::health_flags::healthy", up.port),
    ] {
        assert!(
            clusters.lines().any(|l| l == line),
            "{line} missing from\n{clusters}"
        );
    }
    assert!(
        clusters.lines().all(|l| l.split("::").count() >= 3),
        "every line is CLUSTER::KEY::VALUE:\n{clusters}"
    );
    // Out of rotation and back, still serving.
    assert_eq!(admin_post(admin, "/healthcheck/fail"), 200);
    assert_eq!(get("admin", "/ready").send(admin).status, 503);
    assert_eq!(
        via_proxy(port, "http://web:8000/").0,
        200,
        "traffic still served"
    );
    assert_eq!(admin_post(admin, "/healthcheck/ok"), 200);
    assert_eq!(get("admin", "/ready").send(admin).status, 200);
    // /quitquitquit drains and exits 0, as Istio's agent.
    assert_eq!(admin_post(admin, "/quitquitquit"), 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", m.log());
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", m.log());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log lines in `text` that parse as Istio's format, waiting (bounded) for `n` of them:
/// both hosts write their access log asynchronously.
fn access_log_lines(
    read: impl Fn() -> String,
    n: usize,
) -> Vec<std::collections::BTreeMap<&'static str, String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = read();
        let lines: Vec<_> = text
            .lines()
            .filter_map(meshroute_tests::parse_istio_access_log)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            assert!(lines.len() >= n, "{n} access-log lines expected:\n{text}");
            return lines;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn both_hosts_write_istios_access_log_format_with_the_same_fields() {
    use meshroute_core::ir::{OutboundPolicy, ProxyKind};
    let v1 = Upstream::start("v1");
    let config = format!(
        "{}{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n  - name: nowhere\n    match: [{{name: v9, uri: {{prefix: /none}}}}]\n    route: [{{destination: {{host: web, subset: v9}}}}]\n  - name: primary\n    route: [{{destination: {{host: web, subset: v1}}}}]\n",
        registry("web", 8000, &[&v1]),
        subsets("web", &["v1", "v9"])
    );
    let dir = std::env::temp_dir().join(format!("meshroute-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir, "web.yaml", &config);
    let doc = meshroute_tests::rules(
        &[("web.yaml", config)],
        ProxyKind::Sidecar,
        OutboundPolicy::AllowAny,
    );
    let envoy = meshroute_tests::Envoy::start(&doc);
    let (text_log, json_log) = (dir.join("access.log"), dir.join("access.json"));
    let run = |log: &Path, encoding: &str| {
        let log = log.to_str().unwrap();
        let args = ["--access-log", log, "--access-log-encoding", encoding];
        Meshroute::run_on_fresh_ports(&dir.join("web.yaml"), &args)
    };
    let (harness, port, admin) = run(&text_log, "text");
    let (harness_json, json_port, _) = run(&json_log, "json");

    let send = |port: u16, path: &str| {
        get("web:8000", path)
            .method("POST")
            .body(b"hello")
            .header("user-agent", "telemetry-test/1")
            .header("x-request-id", "req-fixed-1")
            .header("x-forwarded-for", "10.1.2.3")
            .send(port)
    };
    let mut responses = Vec::new();
    for p in [envoy.port, port] {
        responses.push((send(p, "/echo?x=1"), send(p, "/none")));
    }
    // Trace context passes through both hosts unchanged; a request without an id gets a
    // version 4 UUID, as Envoy's.
    const TRACE: [(&str, &str); 5] = [
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
    ];
    for (host, p) in [("envoy", envoy.port), ("meshroute run", port)] {
        let mut req = get("web:8000", "/trace");
        for (k, v) in TRACE {
            req = req.header(k, v);
        }
        assert_eq!(req.send(p).status, 200, "{host}");
        let seen = v1
            .received()
            .into_iter()
            .rfind(|r| r.path == "/trace")
            .unwrap();
        for (k, v) in TRACE {
            assert_eq!(seen.header(k), Some(v), "{host}: {k}");
        }
        let id = seen.header("x-request-id").unwrap_or_default();
        let groups: Vec<_> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{host}: {id}");
        assert_eq!(&id[14..15], "4", "{host}: version 4: {id}");
        assert!(
            "89ab".contains(&id[19..20]),
            "{host}: RFC 4122 variant: {id}"
        );
    }
    let envoy_lines = access_log_lines(
        || std::fs::read_to_string(&envoy.log).unwrap_or_default(),
        2,
    );
    let run_lines = access_log_lines(|| std::fs::read_to_string(&text_log).unwrap_or_default(), 2);
    for (host, lines, (ok, none)) in [
        ("envoy", &envoy_lines, &responses[0]),
        ("meshroute run", &run_lines, &responses[1]),
    ] {
        let (served, failed) = (&lines[0], &lines[1]);
        let context = format!("{host}: {served:?}\n{failed:?}");
        assert_eq!(ok.status, 200, "{context}");
        for (field, want) in [
            ("method", "POST"),
            ("path", "/echo?x=1"),
            ("protocol", "HTTP/1.1"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("response_code_details", "via_upstream"),
            ("bytes_received", "5"),
            ("user_agent", "telemetry-test/1"),
            ("request_id", "req-fixed-1"),
            ("x_forwarded_for", "10.1.2.3"),
            ("authority", "web:8000"),
            (
                "upstream_cluster",
                "outbound|8000|v1|web.default.svc.cluster.local",
            ),
            // Istio's route name: the HTTP route's name.
            ("route_name", "primary"),
        ] {
            assert_eq!(served[field], want, "{field}: {context}");
        }
        assert_eq!(served["bytes_sent"], ok.body.len().to_string(), "{context}");
        assert_eq!(
            served["upstream_host"],
            format!("127.0.0.1:{}", v1.port),
            "{context}"
        );
        // A sidecar takes the remote address from the last x-forwarded-for entry.
        assert_eq!(
            served["downstream_remote_address"], "10.1.2.3:0",
            "{context}"
        );
        let local: std::net::SocketAddr = served["upstream_local_address"]
            .parse()
            .unwrap_or_else(|_| panic!("upstream_local_address: {context}"));
        assert!(local.ip().is_loopback() && local.port() != 0, "{context}");
        assert!(served["duration"].parse::<u64>().is_ok(), "{context}");
        assert!(
            served["upstream_service_time"].parse::<u64>().is_ok(),
            "{context}"
        );
        // A subset without endpoints: the filter answers 503 itself, no upstream.
        assert_eq!(none.status, 503, "{context}");
        for (field, want) in [
            ("path", "/none"),
            ("response_code", "503"),
            ("bytes_sent", &none.body.len().to_string()),
            ("upstream_host", "-"),
            ("response_flags", "-"),
            ("upstream_cluster", "-"),
            // The route's name, a dot, the match's name.
            ("route_name", "nowhere.v9"),
            // The filter's local reply gives no details (the SDK passes none): Envoy logs
            // the empty string it was given, not an absent value.
            ("response_code_details", ""),
            // Answered from the headers: the body was never read.
            ("bytes_received", "0"),
        ] {
            assert_eq!(failed[field], want, "{field}: {context}");
        }
    }

    // The JSON encoding: Istio's keys, numbers where Envoy gives numbers.
    send(json_port, "/echo?x=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&json_log).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no JSON access-log line");
        thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["response_code"], 200, "{line}");
    assert_eq!(v["bytes_received"], 5, "{line}");
    assert_eq!(v["method"], "POST", "{line}");
    assert_eq!(v["route_name"], "primary", "{line}");
    assert_eq!(
        v["requested_server_name"],
        serde_json::Value::Null,
        "{line}"
    );
    // Istio's request metrics: the same series, labels and counts on both hosts.
    let series = |admin: u16| {
        let text = get("admin", "/stats/prometheus").send(admin).text();
        let mut found: Vec<(Vec<(String, String)>, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("istio_requests_total{"))
            .filter_map(|l| l.rsplit_once("} "))
            .map(|(labels, value)| (meshroute_tests::prometheus_labels(labels), value.to_owned()))
            .collect();
        found.sort();
        (found, text)
    };
    let (from_envoy, envoy_text) = series(envoy.admin);
    let (from_run, run_text) = series(admin);
    assert_eq!(
        from_envoy.len(),
        2,
        "a served and a refused series:\n{envoy_text}"
    );
    assert_eq!(
        from_envoy, from_run,
        "envoy:\n{envoy_text}\nmeshroute run:\n{run_text}"
    );
    let served = &from_envoy
        .iter()
        .find(|(l, _)| l.contains(&("response_code".into(), "200".into())))
        .unwrap();
    let names: Vec<&str> = served.0.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, *meshroute_tests::ISTIO_REQUEST_LABELS);
    assert_eq!(served.1, "2", "/echo and /trace");
    for (k, v) in [
        ("destination_version", "v1"),
        ("destination_app", "web"),
        ("reporter", "source"),
    ] {
        assert!(served.0.contains(&(k.into(), v.into())), "{k}: {served:?}");
    }
    drop((harness, harness_json, envoy));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_process_log_is_levelled_json_and_logging_changes_the_filters_level_at_run_time() {
    let up = Upstream::start("web");
    let dir = std::env::temp_dir().join(format!("meshroute-logging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir, "registry.yaml", &registry("web", 8000, &[&up]));
    let (m, port, admin) =
        Meshroute::run_on_fresh_ports(&dir, &["--access-log", "off", "--log-format", "json"]);
    // Every process-log line is a JSON object with a timestamp, a level and a message.
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !m.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged:\n{}",
                m.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("listening on");
    let lines: Vec<serde_json::Value> = m
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["timestamp"].is_string() && l["level"].is_string()));
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "filter" && l["level"] == "INFO"),
        "the filter's own lines come through at info: {lines:?}"
    );
    let listing = get("admin", "/logging").send(admin).text();
    assert!(listing.contains("filter: info"), "{listing}");

    // At info the filter does not log each request; at debug it does, with no reload.
    assert_eq!(get("web:8000", "/before").send(port).status, 200);
    let mut set = get("admin", "/logging?paths=filter:debug");
    set.method = "POST";
    let answer = set.send(admin);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.text().contains("filter: debug"), "{}", answer.text());
    assert_eq!(get("web:8000", "/after").send(port).status, 200);
    wait_for("/after");
    let log = m.log();
    assert!(!log.contains("/before"), "{log}");
    let line = log.lines().find(|l| l.contains("/after")).unwrap();
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["target"], "filter", "{line}");

    let mut bad = get("admin", "/logging?paths=filter:loud");
    bad.method = "POST";
    assert_eq!(bad.send(admin).status, 400);
    let _ = std::fs::remove_dir_all(&dir);
}

/// DestinationRule `tls` SIMPLE without `caCertificates` verifies against the platform's
/// trust store, found as `rustls-native-certs` finds it (here through `SSL_CERT_FILE`).
#[test]
fn tls_origination_without_ca_certificates_trusts_the_system_store() {
    use meshroute_tests::l4::{path_text, EchoServer, TestCa};
    let ca = TestCa::new("system-store");
    let cert = ca.issue("external", &["secure.external.test"]);
    let external = EchoServer::tls("external", &cert);
    let dir = std::env::temp_dir().join(format!("meshroute-system-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_config(
        &dir,
        "external.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external, namespace: default}}\nspec:\n  hosts: [secure.external.test]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: external, namespace: default}}\nspec:\n  host: secure.external.test\n  trafficPolicy: {{tls: {{mode: SIMPLE, sni: secure.external.test}}}}\n",
            external.port
        ),
    );
    let ca_file = ca.ca_file();
    let other_ca = TestCa::new("other-store");
    let other = other_ca.ca_file();
    let empty = dir.join("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    for (trusted, store) in [(true, &ca_file), (false, &other)] {
        let (port, admin) = (free_port(), free_port());
        let m = Meshroute::start_with_env(
            &[
                "run",
                "-f",
                dir.join("external.yaml").to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
                "--access-log",
                "off",
            ],
            port,
            &[
                ("SSL_CERT_FILE", store.as_path()),
                ("SSL_CERT_DIR", empty.as_path()),
            ],
        );
        let r = get("secure.external.test", "/").send(port);
        if trusted {
            assert_eq!(r.status, 200, "{}\n{}", r.text(), m.log());
            assert_eq!(r.text(), "external");
        } else {
            assert_eq!(r.status, 503, "{}", path_text(store));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--mesh-config` with Istio's `istio` ConfigMap: its outbound policy and default retries
/// shape what `compile` writes and what `run` does; a field it does not apply is a warning
/// and a field MeshConfig lacks an error, each at its line in the ConfigMap.
#[test]
fn the_mesh_configuration_shapes_the_rules_of_every_command() {
    let dir = std::env::temp_dir().join(format!("meshroute-mesh-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let flaky = Upstream::start("v1");
    // Three 503s, then answers: only the mesh's retries on 5xx reach the answer (Istio's
    // default policy does not retry a 503).
    flaky.script(&[503, 503, 503]);
    write_config(&dir, "web.yaml", &registry("web", 8000, &[&flaky]));
    let log = dir.join("access.json");
    let configmap = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    enableTracing: true\n    accessLogFile: {}\n    accessLogEncoding: JSON\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n    defaultHttpRetryPolicy:\n      attempts: 4\n      retryOn: 5xx\n{extra}",
            log.display()
        )
    };
    let mesh_file = dir.join("mesh").join("istio.yaml");
    std::fs::create_dir_all(mesh_file.parent().unwrap()).unwrap();
    let web = dir.join("web.yaml");
    let compile = |extra: &str| {
        std::fs::write(&mesh_file, configmap(extra)).unwrap();
        Command::new(binary())
            .args(["compile", "-f", web.to_str().unwrap(), "--mesh-config"])
            .arg(&mesh_file)
            .output()
            .unwrap()
    };
    let typo = compile("    conectTimeout: 1s\n");
    let said = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(1), "{said}");
    let file = mesh_file.display();
    assert!(
        said.contains(&format!("{file}:14:5: error: data.mesh.conectTimeout: unknown field \"conectTimeout\" in v1alpha1.MeshConfig")),
        "{said}"
    );
    let ok = compile("");
    let said = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{said}");
    assert!(
        said.contains(&format!("{file}:6:5: warning: data.mesh.enableTracing")),
        "{said}"
    );
    let rules: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(rules["outbound_traffic_policy"], "REGISTRY_ONLY");
    let retries: Vec<_> = rules["route_tables"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["virtual_hosts"].as_array().into_iter().flatten())
        .flat_map(|v| v["routes"].as_array().into_iter().flatten())
        .map(|r| r["retry"]["num_retries"].clone())
        .collect();
    assert!(
        !retries.is_empty() && retries.iter().all(|n| n == 4),
        "{retries:?}"
    );
    // `run`: the fourth try answers (Istio's default two retries would give the 503), and
    // a host outside the registry is refused as REGISTRY_ONLY refuses it.
    let (m, port, _) =
        Meshroute::run_on_fresh_ports(&web, &["--mesh-config", mesh_file.to_str().unwrap()]);
    let r = get("web:8000", "/").send(port);
    assert_eq!((r.status, flaky.count()), (200, 4), "{}", m.log());
    let outside = get("elsewhere.example:8000", "/").send(port);
    assert_eq!(outside.status, 502, "{}", m.log());
    // The mesh's access log: its file, in its JSON encoding.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let codes: Vec<_> = lines.iter().map(|l| l["response_code"].clone()).collect();
    assert_eq!(codes, [200, 502], "{}", m.log());
    let _ = std::fs::remove_dir_all(&dir);
}
