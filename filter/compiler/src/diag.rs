//! Diagnostics: every error and warning says where (file:line:col), what (resource and field
//! path) and why.

use std::fmt;

use crate::source::Pos;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// The resource a diagnostic is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub pos: Pos,
    pub resource: Option<ResourceId>,
    /// Field path such as `spec.http[0].route[1].weight`; empty for whole-document problems.
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: ",
            self.file, self.pos.line, self.pos.col
        )?;
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Sorts diagnostics by file and position, errors before warnings at the same place.
pub fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        (&a.file, a.pos, a.severity, &a.path).cmp(&(&b.file, b.pos, b.severity, &b.path))
    });
}
