//! One loaded configuration: its clusters and filter instances (one per worker), and running
//! guest callbacks on them with the fail policy applied.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use meshroute_core::contract::{self, PASSTHROUGH_CLUSTER};
use meshroute_core::ir::{Discovery, RulesDocument};

use meshroute_wasm_host::abi::{self, CallTarget, ClusterCheck, LocalReply, Phase};
use meshroute_wasm_host::vm::{Plugin, Vm, VmError};

use super::router::side_call;
use super::{local, tls, FailPolicy, Proxy};

/// One loaded configuration: rules, clusters and filter instances.
pub struct Generation {
    pub doc: Arc<RulesDocument>,
    pub rules_json: Arc<Vec<u8>>,
    pub sources: Vec<PathBuf>,
    pub(super) clusters: HashMap<String, ClusterInfo>,
    pub(super) slots: Vec<Slot>,
    /// Root context of each connection-level listener port's plugin, the same in every
    /// instance (they are started in the same order).
    pub(super) l4_roots: HashMap<u16, u32>,
    pub(super) next_slot: AtomicUsize,
}

pub(super) struct ClusterInfo {
    pub(super) discovery: Discovery,
    pub(super) endpoints: Vec<String>,
    pub(super) next: AtomicUsize,
    /// How its connections are made and kept.
    pub(super) pool: super::upstream::PoolSettings,
    /// Speak HTTP/2 (prior knowledge) to the endpoints: HTTP2/GRPC ports or `h2UpgradePolicy`.
    pub(super) h2: bool,
    /// `tcp.maxConnections` for HTTP/1.1: each connection carries one request at a time, so
    /// requests beyond it wait for one to free up (the pending queue the filter bounds).
    pub(super) connections: Option<Arc<tokio::sync::Semaphore>>,
    /// DestinationRule `tls`: originate TLS to the endpoints.
    pub(super) tls: Option<tls::Origination>,
    /// The service's host name (TLS name for TCP when `sni` is unset).
    pub(super) service: String,
}

impl ClusterInfo {
    /// Where to connect: the endpoint the filter named (only one of this cluster's, so a
    /// forged name never reaches elsewhere), the next resolved address when the host
    /// resolves (DNS), or the named original destination. `None`: nowhere to go.
    pub(super) fn endpoint(&self, named: Option<String>) -> Option<String> {
        match self.discovery {
            Discovery::Static => named.filter(|e| self.endpoints.contains(e)),
            Discovery::Dns => {
                let n = self.endpoints.len();
                (n > 0)
                    .then(|| self.endpoints[self.next.fetch_add(1, Ordering::Relaxed) % n].clone())
            }
            Discovery::OriginalDst => named,
        }
    }
}

/// One filter instance and its bookkeeping.
pub(super) struct Slot {
    pub(super) vm: Mutex<Option<Vm>>,
    pub(super) failed_at: Mutex<Option<Instant>>,
    pub(super) waiters: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    pub(super) tick: Notify,
    /// Whether the instance's ticker runs; changed only under `waiters`' lock, so that a
    /// request that starts waiting on a replaced generation always has a ticker to wake it.
    pub(super) ticking: AtomicBool,
}

/// Registers `tx` to be woken when stream `id` is resumed or answered, restarting the
/// instance's ticker if a reload had let it stop: a request of a replaced generation may
/// start waiting (a retry back-off, a fault delay) long after the reload.
pub(super) fn register_waiter(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    id: u32,
    tx: oneshot::Sender<()>,
) {
    let slot = &generation.slots[index];
    if let Ok(mut w) = slot.waiters.lock() {
        w.insert(id, tx);
        if !slot.ticking.load(Ordering::Relaxed) {
            spawn_ticker(Arc::clone(proxy), Arc::clone(generation), index);
        }
    }
}

pub(super) fn cluster_table(
    doc: &RulesDocument,
    credentials: Option<&std::path::Path>,
) -> Result<HashMap<String, ClusterInfo>, super::Error> {
    let mut clusters: HashMap<String, ClusterInfo> = doc
        .clusters
        .iter()
        .map(|c| {
            let tls = c
                .tls
                .as_ref()
                .map(|t| tls::origination(t, credentials))
                .transpose()
                .map_err(|source| super::Error::ClusterTls {
                    cluster: c.name.clone(),
                    source,
                })?;
            let endpoints = c
                .endpoints
                .iter()
                .filter(|e| e.weight > 0)
                .map(|e| {
                    if e.address.contains(':') {
                        format!("[{}]:{}", e.address, e.port)
                    } else {
                        format!("{}:{}", e.address, e.port)
                    }
                })
                .collect();
            Ok((
                c.name.clone(),
                ClusterInfo {
                    tls,
                    service: c.service.clone(),
                    discovery: c.discovery,
                    endpoints,
                    next: AtomicUsize::new(0),
                    pool: super::upstream::PoolSettings {
                        connect_timeout: Duration::from_millis(c.connect_timeout_ms.max(1)),
                        idle_timeout: Duration::from_millis(
                            c.connection_pool
                                .idle_timeout_ms
                                .unwrap_or(3_600_000)
                                .max(1),
                        ),
                        keepalive: c.connection_pool.tcp_keepalive,
                        max_requests_per_connection: c.connection_pool.max_requests_per_connection,
                        max_connection_duration: c
                            .connection_pool
                            .max_connection_duration_ms
                            .filter(|&ms| ms > 0)
                            .map(Duration::from_millis),
                        max_concurrent_streams: c
                            .connection_pool
                            .max_concurrent_streams
                            .unwrap_or(0),
                    },
                    h2: c.upstream_h2(),
                    connections: (c.connection_pool.max_connections > 0 && !c.upstream_h2()).then(
                        || {
                            Arc::new(tokio::sync::Semaphore::new(
                                c.connection_pool.max_connections as usize,
                            ))
                        },
                    ),
                },
            ))
        })
        .collect::<Result<_, super::Error>>()?;
    clusters.insert(
        PASSTHROUGH_CLUSTER.to_owned(),
        ClusterInfo {
            discovery: Discovery::OriginalDst,
            endpoints: Vec::new(),
            next: AtomicUsize::new(0),
            pool: super::upstream::PoolSettings::default(),
            h2: false,
            connections: None,
            tls: None,
            service: String::new(),
        },
    );
    Ok(clusters)
}

/// Side calls reach known clusters; those where the filter picks endpoints need the endpoint
/// header (Envoy answers INTERNAL_FAILURE without it).
pub(super) fn cluster_check(clusters: &HashMap<String, ClusterInfo>) -> Arc<ClusterCheck> {
    let needs_endpoint: HashMap<String, bool> = clusters
        .iter()
        .map(|(k, c)| (k.clone(), c.discovery != Discovery::Dns))
        .collect();
    Arc::new(
        move |c: &str, headers: &[(String, String)]| match needs_endpoint.get(c) {
            None => CallTarget::UnknownCluster,
            Some(true) if !headers.iter().any(|(k, _)| k == contract::ENDPOINT_HEADER) => {
                CallTarget::NoHost
            }
            Some(_) => CallTarget::Ok,
        },
    )
}

/// One filter instance: the HTTP filter's plugin, then one plugin per connection-level
/// listener port (root id `meshroute_tcp_<port>`) in the same VM, as Envoy runs a worker's
/// plugins in one VM. Returns it with the root context of each port's plugin.
pub(super) fn start_instance(
    plugin: &Plugin,
    rules_json: &[u8],
    known: &Arc<ClusterCheck>,
    l4_ports: &[u16],
) -> Result<(Vm, HashMap<u16, u32>), super::Error> {
    let mut vm = plugin.start(contract::HTTP_ROOT_ID, rules_json, Arc::clone(known))?;
    let mut roots = HashMap::with_capacity(l4_ports.len());
    for &port in l4_ports {
        let root = vm
            .add_root(&contract::l4_root_id(port), rules_json)
            .map_err(|source| super::Error::ConnectionFilter { port, source })?;
        roots.insert(port, root);
    }
    print_logs(&mut vm);
    Ok((vm, roots))
}

/// The module's log lines, under the `filter` logger at their own levels.
pub(super) fn print_logs(vm: &mut Vm) {
    for l in vm.take_logs() {
        let message = &l.message;
        match l.level {
            0 => tracing::trace!(target: crate::logging::FILTER_TARGET, "{message}"),
            1 => tracing::debug!(target: crate::logging::FILTER_TARGET, "{message}"),
            2 => tracing::info!(target: crate::logging::FILTER_TARGET, "{message}"),
            3 => tracing::warn!(target: crate::logging::FILTER_TARGET, "{message}"),
            _ => tracing::error!(target: crate::logging::FILTER_TARGET, "{message}"),
        }
    }
}

/// Drives `proxy_on_tick` for one instance while its generation is current.
pub(super) fn spawn_ticker(proxy: Arc<Proxy>, generation: Arc<Generation>, index: usize) {
    generation.slots[index]
        .ticking
        .store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        loop {
            if !Arc::ptr_eq(&proxy.current(), &generation) {
                // Replaced by a reload; let paused requests of this generation finish.
                let slot = &generation.slots[index];
                let Ok(waiters) = slot.waiters.lock() else {
                    return;
                };
                if waiters.is_empty() {
                    slot.ticking.store(false, Ordering::Relaxed);
                    return;
                }
            }
            let slot = &generation.slots[index];
            let period = slot
                .vm
                .lock()
                .ok()
                .and_then(|vm| vm.as_ref().and_then(|v| v.store.data().tick_period));
            match period {
                None => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), slot.tick.notified()).await;
                }
                Some(p) => {
                    tokio::select! {
                        () = tokio::time::sleep(p) => {
                            with_vm(&proxy, &generation, index, |vm| vm.on_tick());
                        }
                        () = slot.tick.notified() => {}
                    }
                }
            }
        }
    });
}

/// Runs `f` on instance `index` and then applies what the guest asked for.
pub(super) fn with_vm<R>(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    f: impl FnOnce(&mut Vm) -> Result<R, VmError>,
) -> Option<R> {
    let slot = &generation.slots[index];
    let mut guard = slot.vm.lock().ok()?;
    let vm = guard.as_mut()?;
    let result = f(vm);
    print_logs(vm);
    // A trap fails the instance: it is logged and counted once, when it happens (later
    // calls on the failed instance only say so).
    if let Err(e @ VmError::Trap(_)) = &result {
        tracing::error!("{e}");
        if let Ok(mut at) = slot.failed_at.lock() {
            at.get_or_insert_with(Instant::now);
        }
        proxy.stats.vm_failure();
    }
    let state = vm.store.data_mut();
    if std::mem::take(&mut state.tick_changed) {
        slot.tick.notify_one();
    }
    let calls = std::mem::take(&mut state.calls);
    // Wake requests that a tick or a side-call response resumed or answered.
    if let Ok(mut waiters) = slot.waiters.lock() {
        let ready: Vec<u32> = waiters
            .keys()
            .copied()
            .filter(|id| {
                state.streams.get(id).is_none_or(|s| {
                    s.local_reply.is_some()
                        || if s.phase == Phase::Response {
                            s.response_resumed
                        } else {
                            s.resumed
                        }
                })
            })
            .collect();
        for id in ready {
            if let Some(tx) = waiters.remove(&id) {
                let _ = tx.send(());
            }
        }
    }
    drop(guard);
    spawn_calls(proxy, generation, index, calls);
    result.ok()
}

/// Performs side calls and delivers each response to the instance that made it.
pub(super) fn spawn_calls(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    calls: Vec<abi::PendingCall>,
) {
    for call in calls {
        let (proxy, generation) = (Arc::clone(proxy), Arc::clone(generation));
        tokio::spawn(async move {
            let response = side_call(&proxy, &generation, &call).await;
            deliver_call_response(&proxy, &generation, index, call.token, response);
        });
    }
}

pub(super) fn deliver_call_response(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
    token: u32,
    response: abi::CallResponse,
) {
    with_vm(proxy, generation, index, |vm| {
        vm.on_http_call_response(token, response)
    });
}

/// Reads one fact about a stream; `missing` when the stream or the instance is gone.
pub(super) fn stream_fact(
    generation: &Generation,
    index: usize,
    id: u32,
    missing: bool,
    f: impl Fn(&abi::Stream) -> bool,
) -> bool {
    generation.slots[index]
        .vm
        .lock()
        .ok()
        .and_then(|mut g| g.as_mut().and_then(|vm| vm.stream_mut(id).map(|s| f(s))))
        .unwrap_or(missing)
}

pub(super) fn is_resumed(generation: &Generation, index: usize, id: u32) -> bool {
    stream_fact(generation, index, id, true, |s| s.resumed)
}

pub(super) fn has_reply(generation: &Generation, index: usize, id: u32) -> bool {
    stream_fact(generation, index, id, false, |s| s.local_reply.is_some())
}

pub(super) fn take_reply(generation: &Generation, index: usize, id: u32) -> Option<LocalReply> {
    let mut guard = generation.slots[index].vm.lock().ok()?;
    let vm = guard.as_mut()?;
    if vm.failed.load(Ordering::Relaxed) {
        // The request whose callback trapped gets a 503, as in Envoy.
        return Some(local(503, ""));
    }
    vm.stream_mut(id)?.local_reply.take()
}

/// Fail policy: a failed instance answers 503, or is replaced after a back-off.
pub(super) fn instance_failed(generation: &Generation, index: usize) -> bool {
    generation.slots[index].vm.lock().ok().is_none_or(|g| {
        g.as_ref()
            .is_none_or(|vm| vm.failed.load(Ordering::Relaxed))
    })
}

pub(super) fn check_failed(
    proxy: &Arc<Proxy>,
    generation: &Arc<Generation>,
    index: usize,
) -> Option<LocalReply> {
    let slot = &generation.slots[index];
    if !instance_failed(generation, index) {
        return None;
    }
    if proxy.fail_policy == FailPolicy::Reload {
        let since = slot.failed_at.lock().ok().and_then(|g| *g);
        if since.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let known = cluster_check(&generation.clusters);
            let mut ports: Vec<u16> = generation.l4_roots.keys().copied().collect();
            // Roots are started in table order, as at first, so their ids stay the same.
            ports.sort_by_key(|p| generation.l4_roots[p]);
            match start_instance(&proxy.plugin, &generation.rules_json, &known, &ports) {
                Ok((vm, _)) => {
                    if let Ok(mut g) = slot.vm.lock() {
                        *g = Some(vm);
                    }
                    if let Ok(mut at) = slot.failed_at.lock() {
                        *at = None;
                    }
                    proxy.stats.vm_reload();
                    return None;
                }
                Err(e) => tracing::error!("reloading the filter failed: {e}"),
            }
            if let Ok(mut at) = slot.failed_at.lock() {
                *at = Some(Instant::now());
            }
        }
    }
    Some(local(503, ""))
}
