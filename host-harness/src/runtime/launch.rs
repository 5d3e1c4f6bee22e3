//! Starting a proxy from Istio YAML, and reloading it when the files change.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use meshroute_compiler::{MeshOptions, ProxyOptions};
use meshroute_core::ir::{L4Table, Listener, ListenerServer, ProxyKind, RulesDocument};

use super::http::{serve_shared, SharedSpec};
use super::{admin, FailPolicy, ListenerSpec, Proxy};
use meshroute_wasm_host::vm::Plugin;

/// Everything `meshroute run` needs.
pub struct RunOptions {
    pub files: Vec<PathBuf>,
    pub proxy: ProxyOptions,
    pub mesh: MeshOptions,
    /// Sidecar: the outbound listener. Gateway: the IP to bind server ports on.
    pub listen: SocketAddr,
    pub port_offset: u16,
    pub admin: Option<SocketAddr>,
    pub wasm: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub fail_policy: FailPolicy,
    pub workers: usize,
    pub reload_interval: Duration,
    /// `credentialName` → `<dir>/<name>/tls.crt` and `tls.key`.
    pub credentials: Option<PathBuf>,
    /// `off`, `stdout` or a file to append to.
    pub access_log: String,
    /// Istio's TEXT format or its JSON encoding.
    pub access_log_encoding: super::access_log::Encoding,
    pub limits: super::Limits,
    /// Sidecar: serve transparently on the capture listeners instead of as an explicit proxy.
    pub capture: Option<Capture>,
    /// Readiness only (`/healthz/ready`, Istio's status port 15021).
    pub status: Option<SocketAddr>,
    /// How long in-flight requests and connections get once the drain starts.
    pub drain: Duration,
}

/// The listeners a transparent sidecar's capture rules redirect to.
#[derive(Clone, Copy, Debug)]
pub struct Capture {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

/// Loads and compiles; diagnostics (errors and warnings) come back as text.
pub fn compile(
    files: &[PathBuf],
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> Result<(RulesDocument, Vec<String>), super::Error> {
    let compiled =
        meshroute_compiler::compile_files(files, proxy, mesh).map_err(super::Error::Compile)?;
    let text: Vec<String> = compiled
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect();
    match compiled.document {
        Some(doc) => Ok((doc, text)),
        None => Err(super::Error::Compile(text.join("\n"))),
    }
}

/// Listeners for the rules: the sidecar's outbound proxy, or one per plain-HTTP Gateway server
/// port (shifted by the offset).
pub fn listeners(
    doc: &RulesDocument,
    listen: SocketAddr,
    port_offset: u16,
    credentials: Option<&Path>,
    limits: super::Limits,
) -> Result<Vec<ListenerSpec>, super::Error> {
    match doc.proxy.kind {
        ProxyKind::Sidecar => {
            let mut out = vec![ListenerSpec {
                address: listen,
                server_port: 0,
                tls: None,
                connections: None,
                limits,
                original_destination: None,
            }];
            // TCP and TLS service ports: a listener each (shifted by the offset), as Istio's
            // per-port outbound listeners.
            for t in &doc.l4_tables {
                let port = t
                    .port
                    .checked_add(port_offset)
                    .ok_or(super::Error::PortRange {
                        port: t.port,
                        offset: port_offset,
                    })?;
                out.push(sidecar_connection_listener(
                    t,
                    SocketAddr::new(listen.ip(), port),
                    limits,
                ));
            }
            Ok(out)
        }
        ProxyKind::Gateway => {
            let ip: IpAddr = listen.ip();
            let mut out = Vec::new();
            for l in &doc.listeners {
                let port = l
                    .port
                    .checked_add(port_offset)
                    .ok_or(super::Error::PortRange {
                        port: l.port,
                        offset: port_offset,
                    })?;
                out.push(gateway_listener(
                    doc,
                    l,
                    SocketAddr::new(ip, port),
                    credentials,
                    limits,
                )?);
            }
            if out.is_empty() {
                return Err(super::Error::NoServer);
            }
            Ok(out)
        }
    }
}

/// The sidecar's listener for the TCP/TLS service port of `table`, at `address`.
pub fn sidecar_connection_listener(
    table: &L4Table,
    address: SocketAddr,
    limits: super::Limits,
) -> ListenerSpec {
    ListenerSpec {
        address,
        server_port: table.port,
        tls: None,
        connections: Some(super::l4::ConnectionRouting {
            peek_sni: table.routes_on_sni(),
            // Every name passes through: the filter's routes decide.
            pass: vec![Vec::new()],
            ..Default::default()
        }),
        limits,
        original_destination: None,
    }
}

/// The listener of one Gateway server port at `address`: HTTP (plain or TLS-terminated), or
/// connections routed by the filter's connection-level rules (TCP, TLS passthrough, or TLS
/// terminated into TCP).
pub fn gateway_listener(
    doc: &RulesDocument,
    l: &Listener,
    address: SocketAddr,
    credentials: Option<&Path>,
    limits: super::Limits,
) -> Result<ListenerSpec, super::Error> {
    let l4 = doc.l4_tables.iter().any(|t| t.port == l.port);
    let tls = super::tls::server_config(&l.servers, credentials, !l4).map_err(|source| {
        super::Error::GatewayTls {
            port: l.port,
            source,
        }
    })?;
    let connections = l4.then(|| super::l4::ConnectionRouting {
        // The SNI is read from the ClientHello when some server passes TLS through.
        peek_sni: l.servers.iter().any(ListenerServer::passes_tls_through),
        terminate: l
            .servers
            .iter()
            .filter(|s| s.terminates_tls())
            .map(|s| (s.sni_names(), s.serves_http()))
            .collect(),
        pass: l
            .servers
            .iter()
            .filter(|s| s.passes_tls_through())
            .map(ListenerServer::sni_names)
            .collect(),
    });
    Ok(ListenerSpec {
        address,
        server_port: l.port,
        tls,
        connections,
        limits,
        original_destination: None,
    })
}

/// What the configuration files are, to notice a change: each file's resolved path, time
/// and size. A ConfigMap update swaps the `..data` link to a new directory, which changes
/// every resolved path even when times and sizes do not. Only the files the loader reads
/// count: an access log or editor file beside them changes nothing.
fn fingerprint(files: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    use meshroute_compiler::load::{is_config_file, is_hidden};
    fn walk(p: &Path, named: bool, out: &mut Vec<(PathBuf, Option<SystemTime>, u64)>) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    if !is_hidden(&e.path()) {
                        walk(&e.path(), false, out);
                    }
                }
            }
        } else if named || is_config_file(p) {
            let resolved = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            out.push((resolved, meta.modified().ok(), meta.len()));
        }
    }
    let mut out = Vec::new();
    for f in files {
        walk(f, true, &mut out);
    }
    out.sort();
    out
}

/// The listeners serving the current rules, by address: opened and closed as reloaded rules
/// add and remove ports, re-described in place when a port stays.
struct Listeners {
    running: HashMap<SocketAddr, (SharedSpec, tokio::task::JoinHandle<()>)>,
}

impl Listeners {
    async fn open(proxy: &Arc<Proxy>, specs: &[ListenerSpec]) -> Result<Self, super::Error> {
        let mut running = HashMap::new();
        // Every listener is bound, once, before readiness is announced.
        for spec in specs {
            let listener = super::bind(spec.address).await?;
            running.insert(spec.address, Self::serve(proxy, spec.clone(), listener));
        }
        Ok(Self { running })
    }

    /// Serves a bound listener with a description a reload can replace.
    fn serve(
        proxy: &Arc<Proxy>,
        spec: ListenerSpec,
        listener: tokio::net::TcpListener,
    ) -> (SharedSpec, tokio::task::JoinHandle<()>) {
        let shared: SharedSpec = Arc::new(RwLock::new(spec));
        let task = tokio::spawn(serve_shared(
            Arc::clone(proxy),
            Arc::clone(&shared),
            listener,
        ));
        (shared, task)
    }

    /// Brings the listeners to `specs`. A port that cannot be bound is reported and the rest
    /// go on; the ports that stay are never closed.
    async fn update(&mut self, proxy: &Arc<Proxy>, specs: Vec<ListenerSpec>) -> Vec<String> {
        let mut errors = Vec::new();
        let wanted: std::collections::HashSet<SocketAddr> =
            specs.iter().map(|s| s.address).collect();
        self.running.retain(|address, (_, task)| {
            let keep = wanted.contains(address);
            if !keep {
                // Connections already accepted run in their own tasks and finish.
                task.abort();
                tracing::info!("closed listener {address}");
            }
            keep
        });
        for spec in specs {
            if let Some((shared, _)) = self.running.get(&spec.address) {
                match shared.write() {
                    Ok(mut s) => *s = spec,
                    Err(poisoned) => *poisoned.into_inner() = spec,
                }
                continue;
            }
            match super::bind(spec.address).await {
                Ok(listener) => {
                    tracing::info!("listening on {} (port {})", spec.address, spec.server_port);
                    let address = spec.address;
                    self.running
                        .insert(address, Self::serve(proxy, spec, listener));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    }

    fn stopped(&self) -> bool {
        self.running.values().any(|(_, t)| t.is_finished())
    }
}

/// The listeners of a non-transparent proxy (a transparent sidecar serves every port on
/// its capture listeners).
fn listener_specs(
    doc: &RulesDocument,
    opts: &RunOptions,
) -> Result<Vec<ListenerSpec>, super::Error> {
    if opts.capture.is_some() {
        return Ok(Vec::new());
    }
    listeners(
        doc,
        opts.listen,
        opts.port_offset,
        opts.credentials.as_deref(),
        opts.limits,
    )
}

/// Runs until the process is stopped: SIGTERM, SIGINT or `/quitquitquit` drain it (readiness
/// fails at once; in-flight requests and connections get `opts.drain` to finish) and it then
/// returns `Ok`. `ready` receives the bound listeners.
pub async fn run(
    opts: RunOptions,
    ready: impl FnOnce(&[ListenerSpec]),
) -> Result<(), super::Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let signal_error = |source| super::Error::Signal { source };
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    // The admin and status ports answer from the start: 503 until everything is live.
    let mut starting = Vec::new();
    for (address, status_only) in [(opts.admin, false), (opts.status, true)] {
        let Some(address) = address else { continue };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| super::Error::Listen {
                what: "admin ",
                address,
                source,
            })?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(admin::serve_starting(listener, stopped));
        starting.push((stop, task, status_only));
    }
    let (doc, warnings) = compile(&opts.files, &opts.proxy, &opts.mesh)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let plugin = Arc::new(Plugin::load(&opts.wasm, opts.cache_dir.as_deref())?);
    crate::logging::follow(&plugin.log_level);
    let capture = opts.capture;
    if capture.is_some() && doc.proxy.kind != ProxyKind::Sidecar {
        return Err(super::Error::CaptureNeedsSidecar);
    }
    let specs = listener_specs(&doc, &opts)?;
    let proxy = Proxy::new(
        plugin,
        opts.fail_policy,
        opts.workers,
        doc,
        opts.files.clone(),
        opts.credentials.clone(),
    )?;
    proxy.start_tickers();
    let log = super::access_log::AccessLog::open(&opts.access_log, opts.access_log_encoding)
        .map_err(|source| super::Error::AccessLog {
            path: opts.access_log.clone(),
            source,
        })?;
    proxy.access_log.replace(log);
    let mut listeners_running = Listeners::open(&proxy, &specs).await?;
    let mut tasks = Vec::new();
    if let Some(c) = &capture {
        let outbound = super::bind(c.outbound).await?;
        let inbound = super::bind(c.inbound).await?;
        tasks.push(tokio::spawn(super::capture::serve_outbound(
            Arc::clone(&proxy),
            outbound,
            opts.limits,
        )));
        tasks.push(tokio::spawn(super::capture::serve_inbound(
            Arc::clone(&proxy),
            inbound,
            opts.limits,
        )));
        tracing::info!(
            "capturing outbound connections on {}, inbound on {}",
            c.outbound,
            c.inbound
        );
    }
    for (stop, task, status_only) in starting {
        let _ = stop.send(());
        if let Ok(listener) = task.await {
            tasks.push(tokio::spawn(admin::serve_on(
                Arc::clone(&proxy),
                listener,
                status_only,
            )));
        }
    }
    proxy.set_ready();
    ready(&specs);
    // Hot reload: poll the files; a failed compile keeps the running rules.
    let mut seen = fingerprint(&opts.files);
    loop {
        tokio::select! {
            () = tokio::time::sleep(opts.reload_interval) => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            () = proxy.draining() => break,
        }
        if listeners_running.stopped() || tasks.iter().any(tokio::task::JoinHandle::is_finished) {
            return Err(super::Error::ListenerStopped);
        }
        let now = fingerprint(&opts.files);
        if now == seen {
            continue;
        }
        seen = now;
        let result = compile(&opts.files, &opts.proxy, &opts.mesh).and_then(|(doc, _)| {
            if doc.proxy.kind != proxy.kind {
                return Err(super::Error::KindChanged);
            }
            let specs = listener_specs(&doc, &opts)?;
            proxy.reload(doc, opts.files.clone())?;
            Ok(specs)
        });
        let result = match result {
            Ok(specs) => {
                let errors = listeners_running.update(&proxy, specs).await;
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("\n"))
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                tracing::info!("configuration reloaded");
                proxy
                    .stats
                    .config_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut e) = proxy.reload_error.lock() {
                    *e = None;
                }
            }
            Err(e) => {
                tracing::error!("reload failed, still serving the previous rules:\n{e}");
                proxy
                    .stats
                    .config_reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut slot) = proxy.reload_error.lock() {
                    *slot = Some(e);
                }
            }
        }
    }
    proxy.start_drain();
    tracing::info!(
        "draining (up to {} ms for requests and connections in flight)",
        opts.drain.as_millis()
    );
    let finished = tokio::select! {
        f = proxy.drained(opts.drain) => f,
        // A second signal: stop now.
        _ = terminate.recv() => false,
        _ = interrupt.recv() => false,
    };
    if finished {
        tracing::info!("drained");
    } else {
        tracing::info!("drain period over; closing what is still open");
    }
    proxy.access_log.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "meshroute-fingerprint-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Changes the newest modification time alone would miss.
    #[test]
    fn a_deleted_file_or_an_older_one_moved_in_is_a_change() {
        let dir = scratch("files");
        std::fs::write(dir.join("a.yaml"), "a").unwrap();
        std::fs::write(dir.join("b.yaml"), "b").unwrap();
        let files = [dir.clone()];
        let before = fingerprint(&files);
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        let deleted = fingerprint(&files);
        assert_ne!(before, deleted, "a deleted file");
        // A file written long ago, moved in: its time is older than everything present.
        let old = scratch("old").join("c.yaml");
        std::fs::write(&old, "c").unwrap();
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        std::fs::rename(&old, dir.join("c.yaml")).unwrap();
        assert_ne!(deleted, fingerprint(&files), "an older file moved in");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Files the loader does not read (an access log beside the configuration, an editor's
    /// swap file) change nothing; a file named on its own counts whatever its name.
    #[test]
    fn only_the_files_the_loader_reads_are_watched() {
        let dir = scratch("others");
        std::fs::write(dir.join("vs.yaml"), "a").unwrap();
        std::fs::write(dir.join("access.log"), "").unwrap();
        let files = [dir.clone()];
        let before = fingerprint(&files);
        std::fs::write(dir.join("access.log"), "a line\n").unwrap();
        std::fs::write(dir.join(".vs.yaml.swp"), "x").unwrap();
        assert_eq!(before, fingerprint(&files), "not configuration");
        std::fs::write(dir.join("vs.yaml"), "ab").unwrap();
        assert_ne!(before, fingerprint(&files), "configuration");
        let named = [dir.join("access.log")];
        let once = fingerprint(&named);
        std::fs::write(dir.join("access.log"), "two lines\n").unwrap();
        assert_ne!(once, fingerprint(&named), "a file named on its own");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A ConfigMap update moves `..data` to a new directory: every resolved path changes,
    /// and the `..` entries themselves are not read twice.
    #[test]
    fn a_configmap_swap_is_a_change_and_its_hidden_copies_are_not_files() {
        let dir = scratch("configmap");
        let first = dir.join("..2026_01");
        std::fs::create_dir_all(&first).unwrap();
        std::fs::write(first.join("vs.yaml"), "same").unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/vs.yaml", dir.join("vs.yaml")).unwrap();
        let files = [dir.clone()];
        let before = fingerprint(&files);
        assert_eq!(before.len(), 1, "one file: {before:?}");
        let second = dir.join("..2026_02");
        std::fs::create_dir_all(&second).unwrap();
        std::fs::write(second.join("vs.yaml"), "same").unwrap();
        let modified = std::fs::metadata(first.join("vs.yaml"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(second.join("vs.yaml"))
            .unwrap()
            .set_modified(modified)
            .unwrap();
        std::os::unix::fs::symlink("..2026_02", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert_ne!(
            before,
            fingerprint(&files),
            "same time and size, new directory"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
