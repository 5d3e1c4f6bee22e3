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
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
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
            diags.extend(meshroute_compiler::validate::validate(&config));
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
