//! `meshroute`: validate and compile Istio traffic-management configuration.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use meshroute_compiler::{Config, Diagnostic, MeshOptions, ProxyOptions};
use meshroute_core::ir::{OutboundPolicy, ProxyKind, RulesDocument};

use meshroute_harness::envoy_config;

#[derive(Parser)]
#[command(
    name = "meshroute",
    version,
    about = "Istio traffic management in one proxy-wasm filter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum For {
    Sidecar,
    Gateway,
}

#[derive(clap::Args)]
struct Identity {
    /// Kind of proxy the rules are for.
    #[arg(long = "for", value_enum, default_value = "sidecar")]
    kind: For,
    /// Namespace of the proxy.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Labels of the proxy workload, `k=v,k2=v2` (gateway default: istio=ingressgateway).
    #[arg(long)]
    labels: Option<String>,
    /// Mesh outboundTrafficPolicy (a Sidecar resource overrides it).
    #[arg(long, value_enum, default_value = "allow-any")]
    outbound: Outbound,
    /// Locality of the proxy, `region/zone/subzone`, for locality-aware balancing.
    #[arg(long, default_value = "")]
    locality: String,
}

#[derive(clap::Args)]
struct HostArgs {
    /// Sidecar: the outbound proxy address. Gateway: the IP server ports bind on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Added to every Gateway server port (bind unprivileged ports).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Admin interface (metrics, config dump, readiness).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// The filter module (default: the one built next to this binary).
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// What happens once the filter traps.
    #[arg(long, value_enum, default_value = "fail-closed")]
    fail_policy: meshroute_harness::runtime::FailPolicy,
    /// Filter instances (one per worker, as Envoy).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Directory of TLS secrets for `credentialName` (Gateway servers and DestinationRule
    /// `tls`): `<dir>/<name>/tls.crt|tls.key|ca.crt`.
    #[arg(long)]
    credentials_dir: Option<PathBuf>,
    /// Access log: `off`, `stdout` or a file to append to.
    #[arg(long, default_value = "stdout")]
    access_log: String,
    /// Downstream connections per listener; more are closed at once.
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value_t = 60)]
    header_timeout_s: u64,
}

/// The filter built by this workspace: `target/wasm32-unknown-unknown/wasm-release/`.
fn default_wasm() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHROUTE_WASM") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let built = dir.join("../wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm");
    if built.exists() {
        built
    } else {
        dir.join("meshroute_filter.wasm")
    }
}

fn cache_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("../wasmtime-cache"))
}

fn run_proxy(opts: meshroute_harness::runtime::launch::RunOptions, demo: bool) -> ExitCode {
    let workers = opts.workers.max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        if demo {
            for (port, version) in [(18081, "v1"), (18082, "v2")] {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                meshroute_harness::runtime::demo::hello_upstream(addr, version).await?;
            }
        }
        let admin = opts.admin;
        meshroute_harness::runtime::launch::run(opts, |listeners| {
            for l in listeners {
                let what = if l.connections.is_some() { "connection routes" } else { "route table" };
                eprintln!("meshroute: listening on {} ({what} port {})", l.address, l.server_port);
            }
            if let Some(a) = admin {
                eprintln!("meshroute: admin on http://{a}/ (stats/prometheus, config_dump, clusters, ready)");
            }
            if demo {
                if let Some(l) = listeners.first() {
                    println!("demo gateway ready; try:");
                    println!("  curl http://{}/        # 90% v1, 10% v2", l.address);
                    println!("  curl http://{}/v2      # always v2", l.address);
                }
            }
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn proxy_options(identity: &Identity) -> Result<(ProxyOptions, MeshOptions), String> {
    let labels = match identity.labels.as_deref().map(parse_labels) {
        Some(l) => l?,
        None => match identity.kind {
            For::Gateway => BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            For::Sidecar => BTreeMap::new(),
        },
    };
    Ok((
        ProxyOptions {
            kind: match identity.kind {
                For::Sidecar => ProxyKind::Sidecar,
                For::Gateway => ProxyKind::Gateway,
            },
            namespace: identity.namespace.clone(),
            labels,
            locality: identity.locality.clone(),
        },
        MeshOptions {
            outbound_traffic_policy: match identity.outbound {
                Outbound::AllowAny => OutboundPolicy::AllowAny,
                Outbound::RegistryOnly => OutboundPolicy::RegistryOnly,
            },
            ..MeshOptions::default()
        },
    ))
}

fn run_options(
    files: Vec<PathBuf>,
    proxy: ProxyOptions,
    mesh: MeshOptions,
    host: HostArgs,
) -> meshroute_harness::runtime::launch::RunOptions {
    let default_listen = match proxy.kind {
        ProxyKind::Sidecar => std::net::SocketAddr::from(([127, 0, 0, 1], 15001)),
        ProxyKind::Gateway => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    meshroute_harness::runtime::launch::RunOptions {
        files,
        proxy,
        mesh,
        listen: host.listen.unwrap_or(default_listen),
        port_offset: host.port_offset,
        admin: Some(host.admin),
        wasm: host.wasm.unwrap_or_else(default_wasm),
        cache_dir: cache_dir(),
        fail_policy: host.fail_policy,
        workers: host.workers,
        reload_interval: std::time::Duration::from_secs(1),
        credentials: host.credentials_dir,
        access_log: host.access_log,
        limits: meshroute_harness::runtime::Limits {
            max_connections: host.max_connections.max(1),
            header_timeout: std::time::Duration::from_secs(host.header_timeout_s.max(1)),
        },
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ManifestKind {
    WasmPlugin,
    EnvoyFilter,
}

#[derive(Clone, Copy, ValueEnum)]
enum Outbound {
    AllowAny,
    RegistryOnly,
}

#[derive(Subcommand)]
enum Command {
    /// Check configuration as istiod would; exit 0 valid, 1 invalid, 2 usage or I/O error.
    Validate {
        /// Files or directories (YAML or JSON, multi-document, `List` kinds).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate and lower to the rules document for one proxy.
    Compile {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Output file (stdout by default).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Write an Envoy bootstrap (JSON, which Envoy also reads as YAML) running the filter with
    /// the compiled rules.
    EnvoyConfig {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// The filter module (`meshroute_filter.wasm`).
        #[arg(long)]
        wasm: PathBuf,
        /// `ADDR:PORT` to listen on; for gateways also `SERVER_PORT=ADDR:PORT`, repeatable.
        #[arg(long, required = true)]
        listen: Vec<envoy_config::Bind>,
        /// Admin interface address, `ADDR:PORT`.
        #[arg(long)]
        admin: Option<envoy_config::Bind>,
        /// What Envoy does when the filter fails (Istio WasmPlugin failStrategy).
        #[arg(long, value_enum, default_value = "fail-closed")]
        failure_policy: envoy_config::FailurePolicy,
        /// Directory of TLS secrets for `credentialName`:
        /// `<dir>/<name>/tls.crt|tls.key|ca.crt` (paths as Envoy will see them).
        #[arg(long)]
        credentials_dir: Option<PathBuf>,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Run a gateway or sidecar: the filter with the compiled rules, on this host.
    Run {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show the decision path of one request: virtual host, each route tried, destinations,
    /// policies and the outcome, each with the file:line that decided it.
    Explain {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// `text` or `json`.
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
        method: String,
        url: String,
    },
    /// Decide one request N times (seeded) and print how often each outcome occurs.
    Simulate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(short = 'n', default_value_t = 10_000)]
        n: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        method: String,
        url: String,
    },
    /// Serve `Hello server - NAME` on an address: a test upstream (benchmarks, trials).
    Hello {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "v1")]
        name: String,
    },
    /// Start demo upstreams (hello v1/v2) and a gateway in front of them.
    Demo {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Write an Istio manifest that loads the filter with the compiled rules into the
    /// selected sidecars or gateways.
    IstioManifest {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Which manifest to write.
        #[arg(long = "kind", value_enum, default_value = "wasm-plugin")]
        manifest: ManifestKind,
        /// Module location: `oci://`/`https://`/`file://` URL (WasmPlugin) or a file path
        /// inside the proxy container (EnvoyFilter).
        #[arg(long)]
        module: String,
        /// Name of the manifest.
        #[arg(long, default_value = "meshroute")]
        name: String,
        /// Workload selector, `k=v,k2=v2` (default: the proxy labels).
        #[arg(long)]
        selector: Option<String>,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("invalid label {p:?}: expected key=value")),
        })
        .collect()
}

fn load(files: &[PathBuf]) -> Result<(Config, Vec<Diagnostic>), String> {
    let mut config = Config::default();
    let mut diags = Vec::new();
    for f in files {
        if !f.exists() {
            return Err(format!("{}: no such file or directory", f.display()));
        }
        diags.extend(config.add_path(f));
    }
    Ok((config, diags))
}

fn print_diags(diags: &[Diagnostic]) {
    let mut err = std::io::stderr().lock();
    for d in diags {
        let _ = writeln!(err, "{d}");
    }
}

/// Loads, validates and lowers; diagnostics go to stderr.
fn compile_rules(files: &[PathBuf], identity: Identity) -> Result<RulesDocument, ExitCode> {
    let labels = match identity.labels.as_deref().map(parse_labels) {
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
        None => match identity.kind {
            For::Gateway => BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            For::Sidecar => BTreeMap::new(),
        },
    };
    let proxy = ProxyOptions {
        kind: match identity.kind {
            For::Sidecar => ProxyKind::Sidecar,
            For::Gateway => ProxyKind::Gateway,
        },
        namespace: identity.namespace,
        labels,
        locality: identity.locality,
    };
    let mesh = MeshOptions {
        outbound_traffic_policy: match identity.outbound {
            Outbound::AllowAny => OutboundPolicy::AllowAny,
            Outbound::RegistryOnly => OutboundPolicy::RegistryOnly,
        },
        ..MeshOptions::default()
    };
    let (config, mut diags) = load(files).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    let compiled = meshroute_compiler::compile(&config, &proxy, &mesh);
    diags.extend(compiled.diagnostics);
    meshroute_compiler::diag::sort(&mut diags);
    print_diags(&diags);
    match compiled.document {
        Some(d) if !diags.iter().any(Diagnostic::is_error) => Ok(d),
        _ => Err(ExitCode::from(1)),
    }
}

/// Rules and the request to decide, for `explain` and `simulate`.
fn compile_probe(
    files: &[PathBuf],
    identity: Identity,
    method: &str,
    url: &str,
    headers: &[String],
) -> Result<(RulesDocument, meshroute_harness::explain::Probe), ExitCode> {
    let probe = meshroute_harness::explain::Probe::parse(method, url, headers).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    Ok((compile_rules(files, identity)?, probe))
}

fn write_output(output: Option<&Path>, text: &str) -> ExitCode {
    let written = match output {
        Some(path) => std::fs::write(path, format!("{text}\n"))
            .map_err(|e| format!("{}: {e}", path.display())),
        None => writeln!(std::io::stdout().lock(), "{text}").map_err(|e| e.to_string()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => {
            let (config, mut diags) = match load(&files) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            diags.extend(meshroute_compiler::validate::validate(&config).diagnostics);
            meshroute_compiler::diag::sort(&mut diags);
            print_diags(&diags);
            let errors = diags.iter().filter(|d| d.is_error()).count();
            let warnings = diags.len() - errors;
            if errors > 0 {
                eprintln!("{errors} error(s), {warnings} warning(s)");
                ExitCode::from(1)
            } else {
                eprintln!("valid ({warnings} warning(s))");
                ExitCode::SUCCESS
            }
        }
        Command::Compile {
            files,
            identity,
            output,
        } => {
            let doc = match compile_rules(&files, identity) {
                Ok(doc) => doc,
                Err(code) => return code,
            };
            match serde_json::to_string_pretty(&doc) {
                Ok(json) => write_output(output.as_deref(), &json),
                Err(e) => {
                    eprintln!("error: cannot serialize rules: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run {
            files,
            identity,
            host,
        } => match proxy_options(&identity) {
            Ok((proxy, mesh)) => run_proxy(run_options(files, proxy, mesh, host), false),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Explain {
            files,
            identity,
            headers,
            output,
            method,
            url,
        } => {
            let (doc, probe) = match compile_probe(&files, identity, &method, &url, &headers) {
                Ok(v) => v,
                Err(code) => return code,
            };
            let result = meshroute_harness::explain::explain(&doc, &probe);
            match result {
                Ok((_, json)) if output == "json" => write_output(
                    None,
                    &serde_json::to_string_pretty(&json).unwrap_or_default(),
                ),
                Ok((text, _)) => write_output(None, text.trim_end()),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Simulate {
            files,
            identity,
            headers,
            n,
            seed,
            method,
            url,
        } => {
            let (doc, probe) = match compile_probe(&files, identity, &method, &url, &headers) {
                Ok(v) => v,
                Err(code) => return code,
            };
            let result = meshroute_harness::explain::simulate(&doc, &probe, n, seed);
            match result {
                Ok(counts) => {
                    let mut rows: Vec<_> = counts.into_iter().collect();
                    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                    let what = if meshroute_harness::explain::is_connection(&probe) {
                        "connections"
                    } else {
                        "requests"
                    };
                    let mut text = format!("{n} {what}\n");
                    for (outcome, count) in rows {
                        let pct = count as f64 * 100.0 / n.max(1) as f64;
                        text.push_str(&format!("{count:>8} {pct:6.2}%  {outcome}\n"));
                    }
                    write_output(None, text.trim_end())
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Hello { listen, name } => {
            let name: &'static str = Box::leak(name.into_boxed_str());
            let served = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(async {
                        meshroute_harness::runtime::demo::hello_upstream(listen, name).await?;
                        eprintln!("meshroute: hello upstream {name} on {listen}");
                        std::future::pending::<()>().await;
                        Ok::<(), String>(())
                    })
                });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { mut host } => {
            let dir = std::env::temp_dir().join(format!("meshroute-demo-{}", std::process::id()));
            let files = match meshroute_harness::runtime::demo::demo_files(&dir) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            eprintln!(
                "meshroute: demo configuration in {} (edit it: changes reload)",
                dir.display()
            );
            let proxy = ProxyOptions {
                kind: ProxyKind::Gateway,
                namespace: "istio-system".into(),
                labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
                locality: String::new(),
            };
            if host.port_offset == 0 {
                host.port_offset = 8000;
            }
            run_proxy(
                run_options(files, proxy, MeshOptions::default(), host),
                true,
            )
        }
        Command::IstioManifest {
            files,
            identity,
            manifest,
            module,
            name,
            selector,
            output,
        } => {
            let selector = match selector.as_deref().map(parse_labels) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                None => None,
            };
            let doc = match compile_rules(&files, identity) {
                Ok(doc) => doc,
                Err(code) => return code,
            };
            let selector = selector.unwrap_or_else(|| doc.proxy.labels.clone());
            let target = envoy_config::IstioTarget {
                name: &name,
                namespace: &doc.proxy.namespace,
                module: &module,
                selector: &selector,
            };
            let manifest = match manifest {
                ManifestKind::WasmPlugin => envoy_config::wasm_plugin(&doc, &target),
                ManifestKind::EnvoyFilter => envoy_config::envoy_filter(&doc, &target),
            };
            match manifest.and_then(|m| serde_json::to_string_pretty(&m).map_err(|e| e.to_string()))
            {
                Ok(text) => write_output(output.as_deref(), &text),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::EnvoyConfig {
            files,
            identity,
            wasm,
            listen,
            admin,
            failure_policy,
            credentials_dir,
            output,
        } => {
            let doc = match compile_rules(&files, identity) {
                Ok(doc) => doc,
                Err(code) => return code,
            };
            let opts = envoy_config::Options {
                wasm: &wasm,
                binds: &listen,
                admin: admin.as_ref(),
                failure_policy,
                credentials: credentials_dir.as_deref(),
            };
            match envoy_config::bootstrap(&doc, &opts) {
                Ok((bootstrap, warnings)) => {
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    match serde_json::to_string_pretty(&bootstrap) {
                        Ok(text) => write_output(output.as_deref(), &text),
                        Err(e) => {
                            eprintln!("error: {e}");
                            ExitCode::from(2)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
