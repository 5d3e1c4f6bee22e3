//! The process log: timestamped, levelled lines (text or JSON) through `tracing`, with
//! Envoy's levels, `RUST_LOG`-style filters, and a level that `/logging` changes at run
//! time. Two loggers, as operators know them from Envoy: `meshroute` (the process) and
//! `filter` (the module's own log, `wasm` in Envoy).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The target of the filter's own log lines.
pub const FILTER_TARGET: &str = "filter";

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// A level, in Envoy's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    Trace,
    Debug,
    Info,
    #[value(alias = "warn")]
    Warning,
    Error,
    Critical,
    Off,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(s, true).ok()
    }

    fn name(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
            Self::Off => "off",
        }
    }

    /// The `tracing` directive (critical maps to error, its highest level).
    fn directive(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error | Self::Critical => "error",
            Self::Off => "off",
        }
    }

    /// proxy-wasm's `log_level` (0 trace .. 5 critical; off passes nothing on).
    pub fn proxy_wasm(self) -> i32 {
        match self {
            Self::Trace => 0,
            Self::Debug => 1,
            Self::Info => 2,
            Self::Warning => 3,
            Self::Error => 4,
            Self::Critical => 5,
            Self::Off => 6,
        }
    }
}

struct State {
    process: Level,
    filter: Level,
    /// `RUST_LOG`, when set: directives for the process logger beyond its level.
    extra: Option<String>,
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    /// The module instances' level, once a plugin is loaded.
    guests: Vec<Arc<AtomicI32>>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn state() -> &'static Mutex<State> {
    STATE.get_or_init(|| {
        Mutex::new(State {
            process: Level::Info,
            filter: Level::Info,
            extra: None,
            handle: None,
            guests: Vec::new(),
        })
    })
}

fn directives(s: &State) -> String {
    let mut d = format!(
        "{},{FILTER_TARGET}={}",
        s.process.directive(),
        s.filter.directive()
    );
    if let Some(extra) = &s.extra {
        d.push(',');
        d.push_str(extra);
    }
    d
}

/// Installs the process log on stderr at `level` (the filter's too), or as `RUST_LOG` says
/// when it is set.
pub fn init(level: Level, format: Format) {
    let mut s = state().lock().unwrap_or_else(PoisonError::into_inner);
    s.process = level;
    s.filter = level;
    s.extra = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if let Some(filter_level) = s.extra.as_deref().and_then(filter_level_in) {
        s.filter = filter_level;
    }
    let filter = EnvFilter::try_new(directives(&s)).unwrap_or_else(|e| {
        eprintln!("meshroute: RUST_LOG ignored: {e}");
        s.extra = None;
        EnvFilter::new(directives(&s))
    });
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let installed = match format {
        Format::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
        Format::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .try_init(),
    };
    if installed.is_ok() {
        s.handle = Some(handle);
    }
}

/// `filter=LEVEL` in a `RUST_LOG` value.
fn filter_level_in(directives: &str) -> Option<Level> {
    directives
        .split(',')
        .filter_map(|d| d.trim().strip_prefix(FILTER_TARGET)?.strip_prefix('='))
        .find_map(Level::parse)
}

/// Makes the module instances sharing `level` follow the filter logger's level.
pub fn follow(level: &Arc<AtomicI32>) {
    let mut s = state().lock().unwrap_or_else(PoisonError::into_inner);
    level.store(s.filter.proxy_wasm(), Ordering::Relaxed);
    s.guests.push(Arc::clone(level));
}

/// Sets loggers' levels: `None` names both (Envoy's `/logging?level=`), else `meshroute`
/// or `filter` (also `wasm`, Envoy's name for it).
pub fn set(logger: Option<&str>, level: Level) -> Result<(), String> {
    let mut s = state().lock().unwrap_or_else(PoisonError::into_inner);
    match logger {
        None => {
            s.process = level;
            s.filter = level;
        }
        Some("meshroute") => s.process = level,
        Some("filter" | "wasm") => s.filter = level,
        Some(other) => return Err(format!("unknown logger {other:?}: meshroute, filter")),
    }
    let filter_level = s.filter.proxy_wasm();
    for g in &s.guests {
        g.store(filter_level, Ordering::Relaxed);
    }
    let directives = directives(&s);
    if let Some(handle) = &s.handle {
        handle
            .modify(|f| *f = EnvFilter::new(&directives))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Envoy's `/logging` listing: each logger and its level.
pub fn listing() -> String {
    let s = state().lock().unwrap_or_else(PoisonError::into_inner);
    format!(
        "active loggers:\n  {FILTER_TARGET}: {}\n  meshroute: {}\n",
        s.filter.name(),
        s.process.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_can_name_the_filters_level() {
        assert_eq!(
            filter_level_in("meshroute_harness=debug, filter=trace"),
            Some(Level::Trace)
        );
        assert_eq!(filter_level_in("debug"), None);
        assert_eq!(Level::parse("warn"), Some(Level::Warning));
        assert_eq!(Level::parse("WARNING").map(Level::proxy_wasm), Some(3));
    }
}
