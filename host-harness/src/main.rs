//! `meshroute`: validate and compile Istio traffic-management configuration.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use meshroute_compiler::{Diagnostic, MeshOptions, ProxyOptions};
use meshroute_core::ir::{OutboundPolicy, ProxyKind, RulesDocument};

use meshroute_harness::envoy_config;
use meshroute_harness::istio::{self, ManifestKind, Packing};
use meshroute_harness::logging;

#[derive(Parser)]
#[command(
    name = "meshroute",
    version,
    about = "Istio traffic management in one proxy-wasm filter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Level of the process log and the filter's (Envoy's levels); `RUST_LOG`, when set,
    /// adds `tracing` directives (`filter=debug` for the filter alone).
    #[arg(long, global = true, value_enum, default_value_t = logging::Level::Info)]
    log_level: logging::Level,
    /// Process log lines as text or JSON (one object a line), on standard error.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
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
    /// Mesh outboundTrafficPolicy (a Sidecar resource overrides it); default: the mesh
    /// configuration's, else allow-any.
    #[arg(long, value_enum)]
    outbound: Option<Outbound>,
    /// Istio's MeshConfig: the `istio` ConfigMap (its `data.mesh`) or a bare MeshConfig
    /// YAML. outboundTrafficPolicy, rootNamespace, connectTimeout, defaultHttpRetryPolicy,
    /// localityLbSetting, h2UpgradePolicy, the default exportTo lists, accessLogFile and
    /// accessLogEncoding act; other fields are reported as not applied.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
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
    /// Where compiled modules are cached (default: next to this binary).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
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
    /// Access log: `off`, `stdout` (also `/dev/stdout`, `/dev/stderr`: the process's own
    /// streams) or a file to append to (default: the mesh configuration's accessLogFile,
    /// else stdout).
    #[arg(long)]
    access_log: Option<String>,
    /// Access-log encoding, as MeshConfig's `accessLogEncoding`: Istio's default TEXT
    /// format or its JSON encoding (default: the mesh configuration's, else text).
    #[arg(long, value_enum)]
    access_log_encoding: Option<meshroute_harness::runtime::access_log::Encoding>,
    /// Downstream connections per listener; more are closed at once.
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value_t = 60)]
    header_timeout_s: u64,
    /// Sidecar: serve the connections the pod's capture rules (`meshroute iptables`)
    /// redirect, outbound on `--listen` (default 0.0.0.0:15001) and inbound on
    /// `--inbound-listen`, instead of acting as an explicit HTTP proxy.
    #[arg(long)]
    capture: bool,
    /// With `--capture`: the inbound capture listener.
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_listen: std::net::SocketAddr,
    /// Readiness for kubelet probes (`/healthz/ready`), e.g. 0.0.0.0:15021 as Istio's agent.
    #[arg(long)]
    status: Option<std::net::SocketAddr>,
    /// Seconds in-flight requests and connections get to finish after SIGTERM (Istio's
    /// terminationDrainDuration).
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
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

/// Compiled modules are cached per user, as the XDG base directories say:
/// `$XDG_CACHE_HOME/meshroute/modules`, else `~/.cache/meshroute/modules`.
fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))?;
    Some(base.join("meshroute").join("modules"))
}

fn run_proxy(
    opts: meshroute_harness::runtime::launch::RunOptions,
    demo: bool,
) -> Result<ExitCode, CliError> {
    let workers = opts.workers.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("async runtime: {e}")))?;
    let result = runtime.block_on(async move {
        if demo {
            for (port, version) in [(18081, "v1"), (18082, "v2")] {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                meshroute_harness::runtime::demo::hello_upstream(addr, version)
                    .await
                    .map_err(CliError::Failed)?;
            }
        }
        let admin = opts.admin;
        meshroute_harness::runtime::launch::run(opts, |listeners| {
            for l in listeners {
                let what = if l.connections.is_some() { "connection routes" } else { "route table" };
                tracing::info!("listening on {} ({what} port {})", l.address, l.server_port);
            }
            if let Some(a) = admin {
                tracing::info!("admin on http://{a}/ (stats/prometheus, config_dump, clusters, ready, logging)");
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
        .map_err(|e| CliError::Failed(e.to_string()))
    });
    result?;
    Ok(ExitCode::SUCCESS)
}

impl Identity {
    /// Who the rules are for, and the mesh settings given on the command line.
    fn options(&self) -> Result<(ProxyOptions, MeshOptions), CliError> {
        let mut proxy = match self.kind {
            For::Sidecar => ProxyOptions::sidecar(&self.namespace),
            For::Gateway => ProxyOptions::gateway(&self.namespace),
        };
        if let Some(labels) = &self.labels {
            proxy.labels = parse_labels(labels)?;
        }
        proxy.locality.clone_from(&self.locality);
        let mut mesh = match &self.mesh_config {
            None => MeshOptions::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
                let (mesh, diags) =
                    meshroute_compiler::mesh_config::read(&path.display().to_string(), &text);
                print_diags(&diags);
                if diags.iter().any(Diagnostic::is_error) {
                    return Err(CliError::Invalid(String::new()));
                }
                mesh
            }
        };
        match self.outbound {
            Some(Outbound::AllowAny) => mesh.outbound_traffic_policy = OutboundPolicy::AllowAny,
            Some(Outbound::RegistryOnly) => {
                mesh.outbound_traffic_policy = OutboundPolicy::RegistryOnly;
            }
            None => {}
        }
        Ok((proxy, mesh))
    }
}

fn run_options(
    files: Vec<PathBuf>,
    proxy: ProxyOptions,
    mesh: MeshOptions,
    host: HostArgs,
) -> meshroute_harness::runtime::launch::RunOptions {
    let default_listen = match proxy.kind {
        ProxyKind::Sidecar if host.capture => std::net::SocketAddr::from((
            [0, 0, 0, 0],
            meshroute_harness::runtime::capture::OUTBOUND_PORT,
        )),
        ProxyKind::Sidecar => std::net::SocketAddr::from(([127, 0, 0, 1], 15001)),
        ProxyKind::Gateway => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let listen = host.listen.unwrap_or(default_listen);
    let capture = host
        .capture
        .then_some(meshroute_harness::runtime::launch::Capture {
            outbound: listen,
            inbound: host.inbound_listen,
        });
    // An explicit flag, else the mesh's accessLogFile (empty: off), else stdout.
    let access_log = host
        .access_log
        .unwrap_or_else(|| match mesh.access_log_file.as_deref() {
            None => "stdout".into(),
            Some("") => "off".into(),
            Some(file) => file.into(),
        });
    let access_log_encoding = encoding(host.access_log_encoding, &mesh);
    meshroute_harness::runtime::launch::RunOptions {
        files,
        proxy,
        mesh,
        listen,
        port_offset: host.port_offset,
        admin: Some(host.admin),
        wasm: host.wasm.unwrap_or_else(default_wasm),
        cache_dir: host.cache_dir.or_else(cache_dir),
        fail_policy: host.fail_policy,
        workers: host.workers,
        reload_interval: std::time::Duration::from_secs(1),
        credentials: host.credentials_dir,
        access_log,
        access_log_encoding,
        limits: meshroute_harness::runtime::Limits {
            max_connections: host.max_connections.max(1),
            header_timeout: std::time::Duration::from_secs(host.header_timeout_s.max(1)),
        },
        capture,
        status: host.status,
        drain: std::time::Duration::from_secs(host.drain_seconds),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Outbound {
    AllowAny,
    RegistryOnly,
}

#[derive(Subcommand)]
enum Command {
    /// Print a shell completion script.
    ///
    /// Example: `source <(meshroute completions bash)`
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Check configuration as istiod would; exit 0 valid, 1 invalid, 2 usage or I/O error.
    ///
    /// Example: `meshroute validate -f examples/hello/registry.yaml -f examples/hello/case5-subsets.yaml -o yaml`
    Validate {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Diagnostics as text (on standard error) or, as `istioctl analyze -o`, a list of
        /// messages with stable codes on standard output.
        #[arg(short = 'o', long, value_parser = ["text", "json", "yaml"], default_value = "text")]
        output: String,
        /// Istio's MeshConfig (the `istio` ConfigMap or a bare MeshConfig YAML), validated
        /// with the files.
        #[arg(long, value_name = "FILE")]
        mesh_config: Option<PathBuf>,
    },
    /// Validate and lower to the rules document for one proxy.
    ///
    /// Example: `meshroute compile -f examples/bookinfo --for gateway -o rules.json`
    Compile {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
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
    ///
    /// Example: `meshroute envoy-config -f examples/hello/registry.yaml -f examples/hello/case5-subsets.yaml --wasm target/wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm --listen 127.0.0.1:15001 --admin 127.0.0.1:19000 -o envoy.yaml`
    EnvoyConfig {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
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
        /// Access-log encoding, as MeshConfig's `accessLogEncoding`: Istio's default TEXT
        /// format or its JSON encoding (default: the mesh configuration's, else text).
        #[arg(long, value_enum)]
        access_log_encoding: Option<meshroute_harness::runtime::access_log::Encoding>,
        /// Write the bootstrap to this file instead of standard output.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Run a gateway or sidecar: the filter with the compiled rules, on this host.
    ///
    /// Example: `meshroute run -f examples/bookinfo --for gateway --port-offset 8000`
    Run {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show the decision path of one request: virtual host, each route tried, destinations,
    /// policies and the outcome, each with the file:line that decided it.
    ///
    /// Example: `meshroute explain -f examples/bookinfo -H 'end-user: jason' GET http://reviews:9080/reviews/1`
    Explain {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Output format.
        #[arg(short = 'o', long, value_parser = ["text", "json", "yaml"], default_value = "text")]
        output: String,
        /// The request's method, e.g. GET.
        method: String,
        /// The request's URL: scheme, authority (the Host) and path with query.
        url: String,
    },
    /// Decide one request N times (seeded) and print how often each outcome occurs.
    ///
    /// Example: `meshroute simulate -f examples/hello/registry.yaml -f examples/hello/case5-subsets.yaml -n 1000 GET http://svc-hello:8080/`
    Simulate {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// How many times to decide the request.
        #[arg(short = 'n', default_value_t = 10_000)]
        n: u64,
        /// Seed of the random draws (the same seed gives the same counts).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The request's method, e.g. GET.
        method: String,
        /// The request's URL: scheme, authority (the Host) and path with query.
        url: String,
    },
    /// Serve `Hello server - NAME` on an address: a test upstream (benchmarks, trials).
    ///
    /// Example: `meshroute hello --listen 127.0.0.1:18081 --name v1`
    Hello {
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// The name in the answer (`Hello server - NAME`).
        #[arg(long, default_value = "v1")]
        name: String,
    },
    /// Install (or print, or remove) the capture rules of a transparent sidecar in the
    /// current network namespace, after istio-iptables: inbound TCP to the inbound capture
    /// port, outbound TCP to the outbound one, the proxy's own UID/GID let through.
    ///
    /// Example: `meshroute iptables --print --exclude-ports 15000,15020,15021,15090`
    Iptables {
        /// Print the `iptables-restore` input instead of installing it.
        #[arg(long)]
        print: bool,
        /// Remove the rules an earlier run installed.
        #[arg(long, conflicts_with = "print")]
        remove: bool,
        /// Port outbound connections are redirected to (`meshroute run --capture --listen`).
        #[arg(long, default_value_t = meshroute_harness::runtime::capture::OUTBOUND_PORT)]
        outbound_port: u16,
        /// Port inbound connections are redirected to (`--inbound-listen`).
        #[arg(long, default_value_t = meshroute_harness::runtime::capture::INBOUND_PORT)]
        inbound_port: u16,
        /// The proxy's user, whose connections are never captured.
        #[arg(long, default_value_t = meshroute_harness::iptables::PROXY_ID)]
        proxy_uid: u32,
        /// The proxy's group, whose connections are never captured.
        #[arg(long, default_value_t = meshroute_harness::iptables::PROXY_ID)]
        proxy_gid: u32,
        /// Inbound ports captured: `*` or a comma-separated list.
        #[arg(long, default_value = "*")]
        include_ports: String,
        /// Inbound ports let through (with `--include-ports '*'`).
        #[arg(long, default_value = "15000,15020,15021,15090")]
        exclude_ports: String,
        /// Outbound destination ranges captured: `*` or comma-separated CIDRs.
        #[arg(long, default_value = "*")]
        include_cidrs: String,
        /// Outbound destination ranges let through.
        #[arg(long, default_value = "")]
        exclude_cidrs: String,
        /// Outbound destination ports let through.
        #[arg(long, default_value = "")]
        exclude_outbound_ports: String,
        /// Outbound destination ports captured whatever their range.
        #[arg(long, default_value = "")]
        include_outbound_ports: String,
    },
    /// Start demo upstreams (hello v1/v2) and a gateway in front of them.
    ///
    /// Example: `meshroute demo --port-offset 8000`
    Demo {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Write the Istio manifests that load the filter with the compiled rules into the
    /// selected sidecars or gateways and make its decisions take effect there: the filter,
    /// routes that follow it, and the DestinationRules for istiod (a `List`).
    ///
    /// Example: `meshroute istio-manifest --kind wasm-plugin -f examples/bookinfo --for gateway --namespace istio-system --module oci://registry/meshroute-filter:0.1 -o plugin.yaml`
    IstioManifest {
        /// Files or directories of Istio YAML or JSON (multi-document, `List` kinds; `-`: standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        identity: Identity,
        /// Which manifest to write.
        #[arg(long = "kind", value_enum, default_value = "wasm-plugin")]
        manifest: ManifestKind,
        /// When the rules travel zlib-compressed (`auto`: above 32 KiB).
        #[arg(long, value_enum, default_value = "auto")]
        packing: Packing,
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
        /// Write the manifest to this file (YAML for `.yaml`/`.yml`, else JSON) instead of
        /// standard output (JSON).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

/// Why a command failed, and the exit status that says so: 1 for configuration that does
/// not validate or a proxy that stopped, 2 for usage and I/O errors.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
    /// The diagnostics are already printed.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) | Self::Io(_) => ExitCode::from(2),
            Self::Invalid(_) | Self::Failed(_) => ExitCode::from(1),
        }
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, CliError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(CliError::Usage(format!(
                "invalid label {p:?}: expected key=value"
            ))),
        })
        .collect()
}

fn print_diags(diags: &[Diagnostic]) {
    let mut err = std::io::stderr().lock();
    for d in diags {
        let _ = writeln!(err, "{d}");
    }
}

/// Loads, validates and lowers; diagnostics go to stderr.
fn compile_rules(files: &[PathBuf], identity: &Identity) -> Result<RulesDocument, CliError> {
    compile_rules_and_mesh(files, identity).map(|(doc, _)| doc)
}

/// As [`compile_rules`], with the mesh settings the rules were compiled with.
fn compile_rules_and_mesh(
    files: &[PathBuf],
    identity: &Identity,
) -> Result<(RulesDocument, MeshOptions), CliError> {
    let (proxy, mesh) = identity.options()?;
    let compiled = meshroute_compiler::compile_files(files, &proxy, &mesh).map_err(CliError::Io)?;
    print_diags(&compiled.diagnostics);
    // The diagnostics say it all; nothing is added to them.
    compiled
        .document
        .map(|doc| (doc, mesh))
        .ok_or_else(|| CliError::Invalid(String::new()))
}

/// Rules and the request to decide, for `explain` and `simulate`.
fn compile_probe(
    files: &[PathBuf],
    identity: &Identity,
    method: &str,
    url: &str,
    headers: &[String],
) -> Result<(RulesDocument, meshroute_harness::explain::Probe), CliError> {
    let probe =
        meshroute_harness::explain::Probe::parse(method, url, headers).map_err(CliError::Usage)?;
    Ok((compile_rules(files, identity)?, probe))
}

fn write_output(output: Option<&Path>, text: &str) -> Result<ExitCode, CliError> {
    match output {
        Some(path) => std::fs::write(path, format!("{text}\n"))
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display()))),
        None => {
            writeln!(std::io::stdout().lock(), "{text}").map_err(|e| CliError::Io(e.to_string()))
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

fn to_json(value: &impl serde::Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(value).map_err(|e| CliError::Io(format!("cannot serialize: {e}")))
}

fn validate(
    files: &[PathBuf],
    output: &str,
    mesh_config: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let (config, loaded) = meshroute_compiler::load_files(files).map_err(CliError::Io)?;
    let mut diags: Vec<(Diagnostic, &str)> = loaded.into_iter().map(|d| (d, PARSE_ERROR)).collect();
    if let Some(path) = mesh_config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
        let (_, said) = meshroute_compiler::mesh_config::read(&path.display().to_string(), &text);
        diags.extend(said.into_iter().map(|d| (d, SCHEMA_VALIDATION)));
    }
    diags.extend(
        meshroute_compiler::validate::validate(&config)
            .diagnostics
            .into_iter()
            .map(|d| (d, SCHEMA_VALIDATION)),
    );
    diags.sort_by(|(a, _), (b, _)| {
        (&a.file, a.pos, a.severity, &a.path).cmp(&(&b.file, b.pos, b.severity, &b.path))
    });
    let messages =
        || serde_json::Value::Array(diags.iter().map(|(d, c)| analysis_message(d, c)).collect());
    match output {
        "json" => write_output(None, &to_json(&messages())?)?,
        "yaml" => write_output(
            None,
            meshroute_harness::yaml::to_string(&messages()).trim_end(),
        )?,
        _ => {
            let plain: Vec<Diagnostic> = diags.iter().map(|(d, _)| d.clone()).collect();
            print_diags(&plain);
            ExitCode::SUCCESS
        }
    };
    let diags: Vec<&Diagnostic> = diags.iter().map(|(d, _)| d).collect();
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    if errors > 0 {
        return Err(CliError::Invalid(format!(
            "{errors} error(s), {warnings} warning(s)"
        )));
    }
    eprintln!("valid ({warnings} warning(s))");
    Ok(ExitCode::SUCCESS)
}

fn compile(
    files: &[PathBuf],
    identity: &Identity,
    output: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let doc = compile_rules(files, identity)?;
    write_output(output, &to_json(&doc)?)
}

fn explain(
    files: &[PathBuf],
    identity: &Identity,
    headers: &[String],
    output: &str,
    method: &str,
    url: &str,
) -> Result<ExitCode, CliError> {
    let (doc, probe) = compile_probe(files, identity, method, url, headers)?;
    let (text, json) =
        meshroute_harness::explain::explain(&doc, &probe).map_err(CliError::Usage)?;
    match output {
        "json" => write_output(None, &to_json(&json)?),
        "yaml" => write_output(None, meshroute_harness::yaml::to_string(&json).trim_end()),
        _ => write_output(None, text.trim_end()),
    }
}

/// A diagnostic as `istioctl analyze -o json|yaml` lists a message, with where it is.
/// Codes: Istio's where the meaning is Istio's (IST0106 SchemaValidationError for what
/// istiod's validation rejects or warns about), meshroute's own (MR…) otherwise.
fn analysis_message(d: &Diagnostic, code: &str) -> serde_json::Value {
    serde_json::json!({
        "code": code,
        "level": if d.is_error() { "Error" } else { "Warning" },
        "origin": d.resource.as_ref().map(ToString::to_string),
        "file": d.file,
        "line": d.pos.line,
        "column": d.pos.col,
        "field": (!d.path.is_empty()).then_some(&d.path),
        "message": d.message,
    })
}

/// Stable codes by where a diagnostic arises.
const PARSE_ERROR: &str = "MR0001";
const SCHEMA_VALIDATION: &str = "IST0106";

fn simulate(
    files: &[PathBuf],
    identity: &Identity,
    headers: &[String],
    (n, seed): (u64, u64),
    method: &str,
    url: &str,
) -> Result<ExitCode, CliError> {
    let (doc, probe) = compile_probe(files, identity, method, url, headers)?;
    let counts =
        meshroute_harness::explain::simulate(&doc, &probe, n, seed).map_err(CliError::Usage)?;
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

fn hello(listen: std::net::SocketAddr, name: String) -> Result<ExitCode, CliError> {
    let name: &'static str = Box::leak(name.into_boxed_str());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("async runtime: {e}")))?;
    rt.block_on(async {
        meshroute_harness::runtime::demo::hello_upstream(listen, name).await?;
        tracing::info!("hello upstream {name} on {listen}");
        std::future::pending::<()>().await;
        Ok::<(), String>(())
    })
    .map_err(CliError::Failed)?;
    Ok(ExitCode::SUCCESS)
}

fn demo(mut host: HostArgs) -> Result<ExitCode, CliError> {
    let dir = std::env::temp_dir().join(format!("meshroute-demo-{}", std::process::id()));
    let files = meshroute_harness::runtime::demo::demo_files(&dir).map_err(CliError::Io)?;
    tracing::info!(
        "demo configuration in {} (edit it: changes reload)",
        dir.display()
    );
    if host.port_offset == 0 {
        host.port_offset = 8000;
    }
    run_proxy(
        run_options(
            files,
            ProxyOptions::gateway("istio-system"),
            MeshOptions::default(),
            host,
        ),
        true,
    )
}

fn istio_manifest(
    files: &[PathBuf],
    identity: &Identity,
    (manifest, packing): (ManifestKind, Packing),
    target: (&str, &str, Option<&str>),
    output: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let (name, module, selector) = target;
    let selector = selector.map(parse_labels).transpose()?;
    let (proxy, mesh) = identity.options()?;
    // Inside Istio the filter names istiod's clusters; istiod's EDS has the endpoints.
    let proxy = proxy.in_istio();
    let (config, mut diags) = meshroute_compiler::load_files(files).map_err(CliError::Io)?;
    let compiled = meshroute_compiler::compile(&config, &proxy, &mesh);
    diags.extend(compiled.diagnostics);
    meshroute_compiler::diag::sort(&mut diags);
    print_diags(&diags);
    let doc = match compiled.document {
        Some(doc) if !diags.iter().any(Diagnostic::is_error) => doc,
        _ => return Err(CliError::Invalid(String::new())),
    };
    let selector = selector.unwrap_or_else(|| doc.proxy.labels.clone());
    let target = istio::Target {
        name,
        namespace: &doc.proxy.namespace,
        module,
        selector: &selector,
        packing,
    };
    let rules = meshroute_compiler::istio::destination_rules(&config, &proxy);
    let manifest =
        istio::manifest(&doc, rules, manifest, &target).map_err(|e| CliError::Io(e.to_string()))?;
    // A file named `.yaml`/`.yml` gets YAML; standard output and other names get JSON
    // (which kubectl reads too).
    let yaml = output.is_some_and(|p| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
    });
    if yaml {
        write_output(
            output,
            meshroute_harness::yaml::to_string(&manifest).trim_end(),
        )
    } else {
        write_output(output, &to_json(&manifest)?)
    }
}

/// The access-log encoding: the flag's, else the mesh configuration's, else text.
fn encoding(
    flag: Option<meshroute_harness::runtime::access_log::Encoding>,
    mesh: &MeshOptions,
) -> meshroute_harness::runtime::access_log::Encoding {
    use meshroute_harness::runtime::access_log::Encoding;
    flag.unwrap_or(match mesh.access_log_json {
        Some(true) => Encoding::Json,
        _ => Encoding::Text,
    })
}

/// The bootstrap for the rules of `files`; `opts`' access-log encoding is `encoding_flag`,
/// else the mesh configuration's.
fn envoy_bootstrap(
    files: &[PathBuf],
    identity: &Identity,
    opts: &envoy_config::Options<'_>,
    encoding_flag: Option<meshroute_harness::runtime::access_log::Encoding>,
    output: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let (doc, mesh) = compile_rules_and_mesh(files, identity)?;
    let opts = envoy_config::Options {
        access_log_encoding: encoding(encoding_flag, &mesh),
        ..*opts
    };
    let (bootstrap, warnings) =
        envoy_config::bootstrap(&doc, &opts).map_err(|e| CliError::Failed(e.to_string()))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    write_output(output, &to_json(&bootstrap)?)
}

fn dispatch(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            // Into memory first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshroute", &mut script);
            std::io::stdout()
                .lock()
                .write_all(&script)
                .map_err(|e| CliError::Io(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate {
            files,
            output,
            mesh_config,
        } => validate(&files, &output, mesh_config.as_deref()),
        Command::Compile {
            files,
            identity,
            output,
        } => compile(&files, &identity, output.as_deref()),
        Command::Run {
            files,
            identity,
            host,
        } => {
            let (proxy, mesh) = identity.options()?;
            if host.capture && proxy.kind == ProxyKind::Gateway {
                return Err(CliError::Usage(
                    "--capture is for sidecars: a gateway serves its Gateway server ports".into(),
                ));
            }
            run_proxy(run_options(files, proxy, mesh, host), false)
        }
        Command::Explain {
            files,
            identity,
            headers,
            output,
            method,
            url,
        } => explain(&files, &identity, &headers, &output, &method, &url),
        Command::Simulate {
            files,
            identity,
            headers,
            n,
            seed,
            method,
            url,
        } => simulate(&files, &identity, &headers, (n, seed), &method, &url),
        Command::Hello { listen, name } => hello(listen, name),
        Command::Demo { host } => demo(host),
        Command::Iptables {
            print,
            remove,
            outbound_port,
            inbound_port,
            proxy_uid,
            proxy_gid,
            include_ports,
            exclude_ports,
            include_cidrs,
            exclude_cidrs,
            exclude_outbound_ports,
            include_outbound_ports,
        } => {
            use meshroute_harness::iptables::{self, parse_cidrs, parse_ports};
            let usage = |e: iptables::IptablesError| CliError::Usage(e.to_string());
            let list = |what, v: &str| -> Result<Vec<u16>, CliError> {
                Ok(parse_ports(what, v).map_err(usage)?.unwrap_or_default())
            };
            let rules = iptables::CaptureRules {
                outbound_port,
                inbound_port,
                proxy_uid,
                proxy_gid,
                include_ports: parse_ports("--include-ports", &include_ports).map_err(usage)?,
                exclude_ports: list("--exclude-ports", &exclude_ports)?,
                include_cidrs: parse_cidrs("--include-cidrs", &include_cidrs).map_err(usage)?,
                exclude_cidrs: parse_cidrs("--exclude-cidrs", &exclude_cidrs)
                    .map_err(usage)?
                    .unwrap_or_default(),
                exclude_outbound_ports: list("--exclude-outbound-ports", &exclude_outbound_ports)?,
                include_outbound_ports: list("--include-outbound-ports", &include_outbound_ports)?,
            };
            if print {
                print!("{}", rules.restore_script());
                return Ok(ExitCode::SUCCESS);
            }
            let done = if remove {
                iptables::remove()
            } else {
                rules.apply()
            };
            done.map_err(|e| CliError::Failed(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::IstioManifest {
            files,
            identity,
            manifest,
            packing,
            module,
            name,
            selector,
            output,
        } => istio_manifest(
            &files,
            &identity,
            (manifest, packing),
            (&name, &module, selector.as_deref()),
            output.as_deref(),
        ),
        Command::EnvoyConfig {
            files,
            identity,
            wasm,
            listen,
            admin,
            failure_policy,
            credentials_dir,
            access_log_encoding,
            output,
        } => envoy_bootstrap(
            &files,
            &identity,
            &envoy_config::Options {
                wasm: &wasm,
                binds: &listen,
                admin: admin.as_ref(),
                failure_policy,
                credentials: credentials_dir.as_deref(),
                access_log_encoding: Default::default(),
            },
            access_log_encoding,
            output.as_deref(),
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        // Invalid configuration was reported diagnostic by diagnostic; the count closes it.
        Err(e @ CliError::Invalid(_)) => {
            if !e.to_string().is_empty() {
                eprintln!("{e}");
            }
            e.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
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

#[cfg(test)]
mod help_tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every argument says what it is, and every subcommand shows an example.
    #[test]
    fn every_argument_has_help_and_every_subcommand_an_example() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{name} {id}: no help"));
                }
            }
            let long = sub
                .get_long_about()
                .map(ToString::to_string)
                .unwrap_or_default();
            if !long.contains("Example") {
                missing.push(format!("{name}: no example"));
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
