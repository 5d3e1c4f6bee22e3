//! Istio configuration → meshroute rules document, in stages that each take the previous
//! one's result:
//!
//! `load` (positions kept) → `validate` (Istio's rules, all errors collected; only a
//! [`validate::Validated`] configuration goes on) → `resolve` (what one proxy sees: exportTo,
//! Sidecar scope, gateway binding, DestinationRule precedence, delegation) → `lower` (the
//! versioned rules document of `meshroute_core::ir`).

pub mod api;
pub mod diag;
pub mod duration;
pub mod hosts;
pub mod istio;
pub mod load;
pub mod lower;
pub mod matches;
#[cfg(feature = "yaml")]
pub mod mesh_config;
pub mod options;
pub mod registry;
pub mod resolve;
pub mod source;
pub mod validate;

use std::path::Path;

pub use diag::{Diagnostic, ResourceId, Severity};
pub use load::Config;
pub use options::{MeshOptions, ProxyOptions};

/// Result of compiling: the document (when there were no errors) and every diagnostic.
pub struct Compiled {
    pub document: Option<meshroute_core::ir::RulesDocument>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Compiled {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Validates `config` and, when it is valid, lowers it for one proxy.
pub fn compile(config: &Config, proxy: &ProxyOptions, mesh: &MeshOptions) -> Compiled {
    let defaulted;
    let config = if mesh.default_export_to == options::DefaultExportTo::default() {
        config
    } else {
        defaulted = mesh.default_export_to.apply(config);
        &defaulted
    };
    let validation = validate::validate(config);
    let valid = validation.validated();
    let mut diagnostics = validation.diagnostics;
    let document = valid.map(|valid| {
        let (document, more) = lower::lower(&valid, proxy, mesh);
        diagnostics.extend(more);
        document
    });
    diag::sort(&mut diagnostics);
    diagnostics.dedup();
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    Compiled {
        document: document.filter(|_| !has_errors),
        diagnostics,
    }
}

/// Reads files and directories (YAML or JSON, multi-document; `-` is standard input), with
/// the diagnostics of reading them. `Err` when a path does not exist.
pub fn load_files<P: AsRef<Path>>(files: &[P]) -> Result<(Config, Vec<Diagnostic>), String> {
    let mut config = Config::default();
    let mut diagnostics = Vec::new();
    for f in files {
        let f = f.as_ref();
        // `-f -`: standard input, read once (a reload reads the same text again).
        if f == Path::new("-") {
            diagnostics.extend(config.add_text("<stdin>", stdin_text()?));
            continue;
        }
        if !f.exists() {
            return Err(format!("{}: no such file or directory", f.display()));
        }
        diagnostics.extend(config.add_path(f));
    }
    Ok((config, diagnostics))
}

/// Standard input, read on first use and kept for the process.
fn stdin_text() -> Result<&'static str, String> {
    static TEXT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map(|_| text)
            .map_err(|e| format!("<stdin>: cannot read: {e}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(Clone::clone)
}

/// Reads, validates and lowers files for one proxy: every diagnostic, reading's included,
/// in file order.
pub fn compile_files<P: AsRef<Path>>(
    files: &[P],
    proxy: &ProxyOptions,
    mesh: &MeshOptions,
) -> Result<Compiled, String> {
    let (config, mut diagnostics) = load_files(files)?;
    let mut compiled = compile(&config, proxy, mesh);
    diagnostics.append(&mut compiled.diagnostics);
    diag::sort(&mut diagnostics);
    compiled.diagnostics = diagnostics;
    if compiled.has_errors() {
        compiled.document = None;
    }
    Ok(compiled)
}
