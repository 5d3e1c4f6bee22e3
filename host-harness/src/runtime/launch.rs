//! Starting a proxy from Istio YAML, and reloading it when the files change.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshroute_compiler::{MeshOptions, ProxyOptions};
use meshroute_core::ir::{L4Table, Listener, ListenerServer, ProxyKind, RulesDocument};

use super::{admin, serve, FailPolicy, ListenerSpec, Proxy};
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
    pub limits: super::Limits,
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
    })
}

fn newest_change(files: &[PathBuf]) -> Option<SystemTime> {
    fn walk(p: &Path, newest: &mut Option<SystemTime>) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    walk(&e.path(), newest);
                }
            }
        } else if let Ok(m) = meta.modified() {
            *newest = Some(newest.map_or(m, |n| n.max(m)));
        }
    }
    let mut newest = None;
    for f in files {
        walk(f, &mut newest);
    }
    newest
}

/// Runs until the process is stopped. `ready` receives the bound listeners.
pub async fn run(
    opts: RunOptions,
    ready: impl FnOnce(&[ListenerSpec]),
) -> Result<(), super::Error> {
    let (doc, warnings) = compile(&opts.files, &opts.proxy, &opts.mesh)?;
    for w in warnings {
        eprintln!("{w}");
    }
    let plugin = Arc::new(Plugin::load(&opts.wasm, opts.cache_dir.as_deref())?);
    let specs = listeners(
        &doc,
        opts.listen,
        opts.port_offset,
        opts.credentials.as_deref(),
        opts.limits,
    )?;
    let proxy = Proxy::new(
        plugin,
        opts.fail_policy,
        opts.workers,
        doc,
        opts.files.clone(),
        opts.credentials.clone(),
    )?;
    proxy.start_tickers();
    let log = super::access_log::AccessLog::open(&opts.access_log).map_err(|source| {
        super::Error::AccessLog {
            path: opts.access_log.clone(),
            source,
        }
    })?;
    proxy.access_log.replace(log);
    // Every listener is bound, once, before readiness is announced.
    let mut tasks = Vec::new();
    for spec in &specs {
        let listener = super::bind(spec.address).await?;
        tasks.push(tokio::spawn(serve(
            Arc::clone(&proxy),
            spec.clone(),
            listener,
        )));
    }
    if let Some(admin_addr) = opts.admin {
        let listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|source| super::Error::Listen {
                what: "admin ",
                address: admin_addr,
                source,
            })?;
        tasks.push(tokio::spawn(admin::serve(Arc::clone(&proxy), listener)));
    }
    ready(&specs);
    // Hot reload: poll the files; a failed compile keeps the running rules.
    let mut seen = newest_change(&opts.files);
    loop {
        tokio::time::sleep(opts.reload_interval).await;
        if let Some(t) = tasks.iter().position(tokio::task::JoinHandle::is_finished) {
            let task = tasks.remove(t);
            drop(task);
            return Err(super::Error::ListenerStopped);
        }
        let now = newest_change(&opts.files);
        if now == seen {
            continue;
        }
        seen = now;
        let result = compile(&opts.files, &opts.proxy, &opts.mesh).and_then(|(doc, _)| {
            if doc.proxy.kind != proxy.kind {
                return Err(super::Error::KindChanged);
            }
            proxy.reload(doc, opts.files.clone())
        });
        match result {
            Ok(()) => {
                eprintln!("meshroute: configuration reloaded");
                proxy
                    .stats
                    .config_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut e) = proxy.reload_error.lock() {
                    *e = None;
                }
            }
            Err(e) => {
                eprintln!("meshroute: reload failed, still serving the previous rules:\n{e}");
                proxy
                    .stats
                    .config_reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut slot) = proxy.reload_error.lock() {
                    *slot = Some(e.to_string());
                }
            }
        }
    }
}
