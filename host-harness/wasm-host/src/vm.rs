//! The filter as a wasmtime instance: one compiled module, one instance per worker, every
//! callback bounded in CPU (epoch deadline) and memory (store limits). A trap marks the
//! instance failed; the runtime then applies the fail policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store, TypedFunc};

use crate::abi::{self, ClusterCheck, GuestLog, HostState, SharedData};

/// Epoch ticks per second (one tick every 10 ms).
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// A single callback may run this many ticks (~1 s) before it is interrupted.
const CALLBACK_BUDGET_TICKS: u64 = 100;
/// Linear memory cap per instance.
pub const MEMORY_LIMIT: usize = 256 << 20;

/// The compiled module, ready to instantiate.
pub struct Plugin {
    engine: Engine,
    pre: InstancePre<HostState>,
    pub shared: Arc<SharedData>,
    /// The guest log level every instance passes on (proxy-wasm's 0 trace .. 5 critical).
    pub log_level: Arc<std::sync::atomic::AtomicI32>,
    /// What did not work out but did not stop loading (the compiled-module cache).
    pub warnings: Vec<String>,
}

/// Why loading or running the module failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: missing or unknown Proxy-Wasm ABI version (expected 0.2.0 or 0.2.1)")]
    Abi(String),
    /// A wasmtime step (engine, compiling, linking, instantiating) failed.
    #[error("{step}: {reason}")]
    Wasm { step: &'static str, reason: String },
    /// A callback trapped or ran past its CPU budget; the instance is failed.
    #[error("the filter trapped: {0}")]
    Trap(String),
    /// The host has no context of this id (the stream is gone).
    #[error("context {0} is gone")]
    NoContext(u32),
    /// The instance failed earlier; it runs nothing more.
    #[error("the filter failed earlier")]
    Failed,
    /// The module refused to start (`proxy_on_vm_start` or `proxy_on_configure` returned
    /// false), with the last lines it logged.
    #[error("{0}")]
    Refused(String),
}

fn err(step: &'static str) -> impl Fn(wasmtime::Error) -> VmError {
    move |e| VmError::Wasm {
        step,
        reason: format!("{e:#}"),
    }
}

/// One engine per compiled-module cache directory, shared by every plugin of the process
/// (and so one epoch ticker per engine).
fn engine(cache_dir: Option<&Path>) -> Result<(Engine, Option<String>), VmError> {
    type Engines = Mutex<HashMap<Option<PathBuf>, Engine>>;
    static ENGINES: OnceLock<Engines> = OnceLock::new();
    let engines = ENGINES.get_or_init(Engines::default);
    let mut engines = engines.lock().unwrap_or_else(PoisonError::into_inner);
    let key = cache_dir.map(Path::to_path_buf);
    if let Some(engine) = engines.get(&key) {
        return Ok((engine.clone(), None));
    }
    let mut config = Config::new();
    config.epoch_interruption(true);
    let mut warning = None;
    if let Some(dir) = cache_dir {
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(dir);
        match wasmtime::Cache::new(cache) {
            Ok(c) => {
                config.cache(Some(c));
            }
            Err(e) => warning = Some(format!("compiled-module cache disabled: {e}")),
        }
    }
    let engine = Engine::new(&config).map_err(err("wasm engine"))?;
    let ticker = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match ticker.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map_err(|e| VmError::Wasm {
            step: "epoch thread",
            reason: e.to_string(),
        })?;
    engines.insert(key, engine.clone());
    Ok((engine, warning))
}

impl Plugin {
    /// Compiles (or loads from the cache) and links the module.
    pub fn load(wasm: &Path, cache_dir: Option<&Path>) -> Result<Self, VmError> {
        let (engine, warning) = engine(cache_dir)?;
        let bytes = std::fs::read(wasm).map_err(|source| VmError::Read {
            path: wasm.display().to_string(),
            source,
        })?;
        let module = Module::new(&engine, &bytes).map_err(err("compiling the filter"))?;
        let abi_marker = module.exports().any(|e| {
            e.name() == "proxy_abi_version_0_2_1" || e.name() == "proxy_abi_version_0_2_0"
        });
        if !abi_marker {
            return Err(VmError::Abi(wasm.display().to_string()));
        }
        let mut linker = Linker::new(&engine);
        abi::link(&mut linker).map_err(err("linking host functions"))?;
        // Imports we do not provide trap only if called.
        linker
            .define_unknown_imports_as_traps(&module)
            .map_err(err("linking"))?;
        let pre = linker.instantiate_pre(&module).map_err(err("linking"))?;
        Ok(Self {
            engine,
            pre,
            shared: Arc::new(SharedData::default()),
            log_level: Arc::new(std::sync::atomic::AtomicI32::new(2)),
            warnings: warning.into_iter().collect(),
        })
    }

    /// The same compiled module with its own shared data: a separate proxy in the same
    /// process (Envoy shares data only between VMs of one `vm_id`).
    pub fn fresh_copy(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            shared: Arc::new(SharedData::default()),
            log_level: Arc::new(std::sync::atomic::AtomicI32::new(
                self.log_level.load(Ordering::Relaxed),
            )),
            warnings: Vec::new(),
        }
    }

    /// A started instance whose root context, named `root_id` (`plugin_root_id`), is
    /// configured with `configuration`.
    pub fn start(
        &self,
        root_id: &str,
        configuration: &[u8],
        known_clusters: Arc<ClusterCheck>,
    ) -> Result<Vm, VmError> {
        let state = HostState::new(
            root_id,
            configuration.to_vec(),
            Arc::clone(&self.shared),
            known_clusters,
            MEMORY_LIMIT,
        );
        let mut state = state;
        state.log_level = Arc::clone(&self.log_level);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(CALLBACK_BUDGET_TICKS);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(err("instantiating"))?;
        let exports = Arc::new(Exports::find(&instance, &mut store));
        let mut vm = Vm {
            store,
            exports,
            next_context: 2,
            failed: Arc::new(AtomicBool::new(false)),
        };
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut vm.store, "_initialize") {
            vm.store.set_epoch_deadline(CALLBACK_BUDGET_TICKS);
            init.call(&mut vm.store, ()).map_err(err("_initialize"))?;
        }
        let root = vm.store.data().root_id as i32;
        let size = configuration.len() as i32;
        let exports = Arc::clone(&vm.exports);
        if let Some(f) = exports.on_context_create.as_ref() {
            vm.call(0, |s| f.call(s, (root, 0)))?;
        }
        let exports = Arc::clone(&vm.exports);
        if let Some(f) = exports.on_vm_start.as_ref() {
            if vm.call(0, |s| f.call(s, (root, 0)))? == 0 {
                return Err(VmError::Refused(format!(
                    "proxy_on_vm_start returned false{}",
                    vm.log_tail()
                )));
            }
        }
        let configured = match Arc::clone(&vm.exports).on_configure.as_ref() {
            Some(f) => vm.call(0, |s| f.call(s, (root, size)))? != 0,
            None => true,
        };
        vm.store.data_mut().plugin_configuration = None;
        if !configured {
            return Err(VmError::Refused(format!(
                "the filter rejected its configuration{}",
                vm.log_tail()
            )));
        }
        Ok(vm)
    }
}

type F1 = TypedFunc<i32, ()>;
type F1R = TypedFunc<i32, i32>;
type F2 = TypedFunc<(i32, i32), ()>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The guest callbacks this host drives (each optional, as in the spec).
#[derive(Clone)]
struct Exports {
    on_context_create: Option<F2>,
    on_vm_start: Option<F2R>,
    on_configure: Option<F2R>,
    on_tick: Option<F1>,
    on_request_headers: Option<F3R>,
    on_request_body: Option<F3R>,
    on_response_headers: Option<F3R>,
    on_http_call_response: Option<F5>,
    on_new_connection: Option<F1R>,
    on_downstream_data: Option<F3R>,
    on_upstream_data: Option<F3R>,
    on_downstream_connection_close: Option<F2>,
    on_upstream_connection_close: Option<F2>,
    on_log: Option<F1>,
    on_done: Option<F1R>,
    on_delete: Option<F1>,
}

impl Exports {
    fn find(instance: &wasmtime::Instance, store: &mut Store<HostState>) -> Self {
        macro_rules! f {
            ($name:literal) => {
                instance.get_typed_func(&mut *store, $name).ok()
            };
        }
        Self {
            on_context_create: f!("proxy_on_context_create"),
            on_vm_start: f!("proxy_on_vm_start"),
            on_configure: f!("proxy_on_configure"),
            on_tick: f!("proxy_on_tick"),
            on_request_headers: f!("proxy_on_request_headers"),
            on_request_body: f!("proxy_on_request_body"),
            on_response_headers: f!("proxy_on_response_headers"),
            on_http_call_response: f!("proxy_on_http_call_response"),
            on_new_connection: f!("proxy_on_new_connection"),
            on_downstream_data: f!("proxy_on_downstream_data"),
            on_upstream_data: f!("proxy_on_upstream_data"),
            on_downstream_connection_close: f!("proxy_on_downstream_connection_close"),
            on_upstream_connection_close: f!("proxy_on_upstream_connection_close"),
            on_log: f!("proxy_on_log"),
            on_done: f!("proxy_on_done"),
            on_delete: f!("proxy_on_delete"),
        }
    }
}

/// Filter action after a stream callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// One instance of the filter.
pub struct Vm {
    pub store: Store<HostState>,
    /// Shared so a callback borrows its handle instead of cloning it (a typed function's
    /// clone takes wasmtime's type registry).
    exports: Arc<Exports>,
    next_context: u32,
    pub failed: Arc<AtomicBool>,
}

impl Vm {
    /// Runs one callback for `context` with a fresh CPU budget; a trap fails the instance.
    fn call<R>(
        &mut self,
        context: u32,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, VmError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(VmError::Failed);
        }
        {
            let s = self.store.data_mut();
            s.current = context;
            s.effective = None;
        }
        self.store.set_epoch_deadline(CALLBACK_BUDGET_TICKS);
        let result = f(&mut self.store);
        self.store.data_mut().effective = None;
        result.map_err(|e| {
            self.failed.store(true, Ordering::Relaxed);
            let trap = match e.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => {
                    "exceeded its CPU budget per callback".to_string()
                }
                Some(t) => t.to_string(),
                None => format!("{e:#}"),
            };
            VmError::Trap(format!("{trap}{}", self.log_tail()))
        })
    }

    /// The last guest log lines (a panic message comes this way), for error messages.
    fn log_tail(&self) -> String {
        let logs = &self.store.data().logs;
        let tail: Vec<&str> = logs
            .iter()
            .rev()
            .take(3)
            .map(|l| l.message.as_str())
            .collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                " (filter log: {})",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
    }

    pub fn take_logs(&mut self) -> Vec<GuestLog> {
        std::mem::take(&mut self.store.data_mut().logs)
    }

    pub fn root(&self) -> u32 {
        self.store.data().root_id
    }

    /// Starts another plugin of the same module in this instance, with root id `root_id`
    /// (a connection-level listener's `meshroute_tcp_<port>`) and `configuration`, as Envoy
    /// starts several plugins in one VM. Returns its root context.
    pub fn add_root(&mut self, root_id: &str, configuration: &[u8]) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        {
            let state = self.store.data_mut();
            state.root_names.insert(id, root_id.to_owned());
            state.plugin_configuration = Some(configuration.to_vec());
        }
        let size = configuration.len() as i32;
        let exports = Arc::clone(&self.exports);
        if let Some(f) = exports.on_context_create.as_ref() {
            self.call(id, |s| f.call(s, (id as i32, 0)))?;
        }
        if let Some(f) = exports.on_vm_start.as_ref() {
            if self.call(id, |s| f.call(s, (id as i32, 0)))? == 0 {
                return Err(VmError::Refused(format!(
                    "proxy_on_vm_start returned false for {root_id}"
                )));
            }
        }
        let configured = match exports.on_configure.as_ref() {
            Some(f) => self.call(id, |s| f.call(s, (id as i32, size)))? != 0,
            None => true,
        };
        self.store.data_mut().plugin_configuration = None;
        if !configured {
            return Err(VmError::Refused(format!(
                "the filter rejected its configuration as {root_id}{}",
                self.log_tail()
            )));
        }
        Ok(id)
    }

    /// Creates a stream context under root context `root` (a connection of that plugin).
    pub fn open_stream_in(&mut self, root: u32, mut stream: abi::Stream) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        stream.root = root;
        self.store.data_mut().streams.insert(id, stream);
        let exports = Arc::clone(&self.exports);
        if let Some(f) = exports.on_context_create.as_ref() {
            self.call(id, |s| f.call(s, (id as i32, root as i32)))?;
        }
        Ok(id)
    }

    /// Creates a stream context (ids are per instance, as in Envoy).
    pub fn open_stream(&mut self, stream: abi::Stream) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        self.store.data_mut().streams.insert(id, stream);
        let root = self.root() as i32;
        let exports = Arc::clone(&self.exports);
        if let Some(f) = exports.on_context_create.as_ref() {
            self.call(id, |s| f.call(s, (id as i32, root)))?;
        }
        Ok(id)
    }

    fn action(code: i32) -> Action {
        if code == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    pub fn on_request_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.stream_len(id, |s| s.request_headers.len());
        let exports = Arc::clone(&self.exports);
        match exports.on_request_headers.as_ref() {
            Some(f) => self
                .call(id, |s| f.call(s, (id as i32, n, i32::from(end_of_stream))))
                .map(Self::action),
            None => Ok(Action::Continue),
        }
    }

    pub fn on_request_body(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.stream_len(id, |s| s.request_body.len());
        let exports = Arc::clone(&self.exports);
        match exports.on_request_body.as_ref() {
            Some(f) => self
                .call(id, |s| f.call(s, (id as i32, n, i32::from(end_of_stream))))
                .map(Self::action),
            None => Ok(Action::Continue),
        }
    }

    pub fn on_response_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action, VmError> {
        let n = self.stream_len(id, |s| s.response_headers.len());
        let exports = Arc::clone(&self.exports);
        match exports.on_response_headers.as_ref() {
            Some(f) => self
                .call(id, |s| f.call(s, (id as i32, n, i32::from(end_of_stream))))
                .map(Self::action),
            None => Ok(Action::Continue),
        }
    }

    /// A new connection (network filter context `id`).
    pub fn on_new_connection(&mut self, id: u32) -> Result<Action, VmError> {
        let exports = Arc::clone(&self.exports);
        match exports.on_new_connection.as_ref() {
            Some(f) => self.call(id, |s| f.call(s, id as i32)).map(Self::action),
            None => Ok(Action::Continue),
        }
    }

    /// Data of a connection in one direction, in the stream's `downstream_data` or
    /// `upstream_data` buffer; the guest may rewrite it.
    pub fn on_data(
        &mut self,
        id: u32,
        downstream: bool,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let n = self.stream_len(id, |s| {
            if downstream {
                s.downstream_data.len()
            } else {
                s.upstream_data.len()
            }
        });
        let exports = Arc::clone(&self.exports);
        let f = if downstream {
            exports.on_downstream_data.as_ref()
        } else {
            exports.on_upstream_data.as_ref()
        };
        match f {
            Some(f) => self
                .call(id, |s| f.call(s, (id as i32, n, i32::from(end_of_stream))))
                .map(Self::action),
            None => Ok(Action::Continue),
        }
    }

    /// One side of a connection closed; `remote` when the peer closed it (`PeerType`).
    pub fn on_connection_close(
        &mut self,
        id: u32,
        downstream: bool,
        remote: bool,
    ) -> Result<(), VmError> {
        let exports = Arc::clone(&self.exports);
        let f = if downstream {
            exports.on_downstream_connection_close.as_ref()
        } else {
            exports.on_upstream_connection_close.as_ref()
        };
        let peer = if remote { 2 } else { 1 };
        match f {
            Some(f) => self.call(id, |s| f.call(s, (id as i32, peer))),
            None => Ok(()),
        }
    }

    pub fn on_tick(&mut self) -> Result<(), VmError> {
        let root = self.root();
        let exports = Arc::clone(&self.exports);
        match exports.on_tick.as_ref() {
            Some(f) => self.call(root, |s| f.call(s, root as i32)),
            None => Ok(()),
        }
    }

    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: abi::CallResponse,
    ) -> Result<(), VmError> {
        let root = self.root();
        let (nh, nb) = (response.headers.len() as i32, response.body.len() as i32);
        self.store.data_mut().call_response = Some(response);
        let exports = Arc::clone(&self.exports);
        let result = match exports.on_http_call_response.as_ref() {
            Some(f) => self.call(root, |s| f.call(s, (root as i32, token as i32, nh, nb, 0))),
            None => Ok(()),
        };
        self.store.data_mut().call_response = None;
        result
    }

    /// End of stream: `on_log`, `on_done`, `on_delete` (Envoy's order), then forget it. A
    /// trap in one of them fails the instance like any other and is returned; the stream is
    /// forgotten either way.
    pub fn close_stream(&mut self, id: u32) -> Result<(), VmError> {
        if let Some(s) = self.store.data_mut().streams.get_mut(&id) {
            s.phase = abi::Phase::Done;
        }
        let mut result = Ok(());
        if !self.failed.load(Ordering::Relaxed) {
            let exports = Arc::clone(&self.exports);
            if let Some(f) = exports.on_log.as_ref() {
                result = self.call(id, |s| f.call(s, id as i32));
            }
            if let (Ok(()), Some(f)) = (&result, exports.on_done.as_ref()) {
                result = self.call(id, |s| f.call(s, id as i32)).map(drop);
            }
            if let (Ok(()), Some(f)) = (&result, exports.on_delete.as_ref()) {
                result = self.call(id, |s| f.call(s, id as i32));
            }
        }
        self.store.data_mut().streams.remove(&id);
        result
    }

    fn stream_len(&self, id: u32, f: impl Fn(&abi::Stream) -> usize) -> i32 {
        self.store
            .data()
            .streams
            .get(&id)
            .map_or(0, |s| f(s) as i32)
    }

    pub fn stream_mut(&mut self, id: u32) -> Option<&mut abi::Stream> {
        self.store.data_mut().streams.get_mut(&id)
    }

    /// A value stream `id` set with `proxy_set_property` (a single-segment path).
    pub fn stream_property(&self, id: u32, name: &str) -> Option<&[u8]> {
        let stream = self.store.data().streams.get(&id)?;
        stream
            .properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// The smallest module a proxy-wasm host accepts: one export, the ABI marker.
    const MINIMAL: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
        0x03, 0x02, 0x01, 0x00, // one function of that type
        0x07, 0x1b, 0x01, 0x17, b'p', b'r', b'o', b'x', b'y', b'_', b'a', b'b', b'i', b'_', b'v',
        b'e', b'r', b's', b'i', b'o', b'n', b'_', b'0', b'_', b'2', b'_', b'1', 0x00, 0x00, 0x0a,
        0x04, 0x01, 0x02, 0x00, 0x0b, // its body: end
    ];

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasm-host-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn files_under(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        files_under(&p)
                    } else {
                        1
                    }
                })
                .sum()
        })
    }

    #[test]
    fn every_caller_gets_its_own_compiled_module_cache() {
        let dir = scratch("cache");
        let wasm = dir.join("m.wasm");
        std::fs::write(&wasm, MINIMAL).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let first = Plugin::load(&wasm, Some(&a)).unwrap();
        let second = Plugin::load(&wasm, Some(&b)).unwrap();
        assert!(first.warnings.is_empty() && second.warnings.is_empty());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while files_under(&a) == 0 || files_under(&b) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "cache a: {} files, cache b: {} files",
                files_under(&a),
                files_under(&b)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_module_without_the_abi_marker_is_refused() {
        let dir = scratch("abi");
        let wasm = dir.join("m.wasm");
        let mut bytes = MINIMAL.to_vec();
        // Rename the export: `proxy_abi_version_0_2_1` → `proxy_abi_version_0_2_9`.
        let at = bytes.len() - 9;
        bytes[at] = b'9';
        std::fs::write(&wasm, &bytes).unwrap();
        assert!(matches!(Plugin::load(&wasm, None), Err(VmError::Abi(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
