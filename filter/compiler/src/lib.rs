//! Istio configuration → meshroute rules document.
//!
//! `load` (positions kept) → `validate` (Istio's rules, all errors collected) → `resolve` (per
//! proxy identity) → `lower` (the versioned rules document of `meshroute_core::ir`).

pub mod api;
pub mod diag;
pub mod duration;
pub mod hosts;
pub mod load;
pub mod source;
pub mod validate;

pub use diag::{Diagnostic, ResourceId, Severity};
pub use load::Config;

pub mod lower;
pub mod registry;

pub use lower::{MeshOptions, ProxyOptions};

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
    let mut diagnostics = validate::validate(config);
    if diagnostics.iter().any(Diagnostic::is_error) {
        diag::sort(&mut diagnostics);
        return Compiled {
            document: None,
            diagnostics,
        };
    }
    let (document, more) = lower::lower(config, proxy, mesh);
    diagnostics.extend(more);
    diag::sort(&mut diagnostics);
    diagnostics.dedup();
    Compiled {
        document: Some(document),
        diagnostics,
    }
}
