//! Istio's own proxy configuration in a real Envoy: the listeners, routes and endpoints istiod
//! sends (`tests/istio/`), with manifests applied the way istiod applies EnvoyFilter patches
//! and WasmPlugins, served by a static bootstrap.
//!
//! What differs from a pod, and why: routes are inline instead of RDS and endpoints come from
//! files instead of EDS over gRPC (Envoy reads both the same way); listeners bind a loopback
//! address of their own at the port istiod gave them (the connection's destination port is
//! what Istio's would be); the filters only Istio's proxy build has (metadata exchange, ALPN
//! override, Istio stats) and the mesh's SDS certificates are left out; pod addresses become
//! loopback upstreams. Every patch or plugin field this file does not know stops the test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{free_port, get, repo_root, Envoy, Request, Response};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// Filters of Istio's proxy build that upstream Envoy does not have.
const ISTIO_ONLY_FILTERS: [&str; 3] = ["istio.metadata_exchange", "istio.alpn", "istio.stats"];
/// istiod's clusters with no EDS: `PassthroughCluster` forwards to the original destination,
/// which a listener without capture does not have, so both answer 503 here.
const STATIC_CLUSTERS: [&str; 2] = ["PassthroughCluster", "BlackHoleCluster"];

/// Which of the proxy's listeners istiod generated, as EnvoyFilter names the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    SidecarOutbound,
    Gateway,
}

impl Context {
    fn patch_context(self) -> &'static str {
        match self {
            Self::SidecarOutbound => "SIDECAR_OUTBOUND",
            Self::Gateway => "GATEWAY",
        }
    }
}

/// A file of `tests/istio/`.
pub fn fixture(path: &str) -> Value {
    let file = repo_root().join("tests/istio").join(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// What istiod holds for one proxy, and what it made of it.
#[derive(Clone)]
pub struct Istiod {
    context: Context,
    labels: BTreeMap<String, String>,
    listeners: Vec<Value>,
    routes: Vec<Value>,
    /// Service cluster (`outbound|port||host`) → its `lb_endpoints`, as EDS lists them.
    services: BTreeMap<String, Vec<Value>>,
    destination_rules: Vec<Value>,
    envoy_filters: Vec<Value>,
    wasm_plugins: Vec<Value>,
}

impl Istiod {
    /// A bookinfo sidecar (`productpage`): the outbound listener of port 9080 and the route
    /// `9080` istiod built from `routes` (`services-only`, `all-v1`, `same-virtual-services`).
    pub fn sidecar(routes: &str) -> Self {
        Self::new(
            Context::SidecarOutbound,
            &[("app", "productpage"), ("version", "v1")],
            vec![fixture("sidecar/listener-0.0.0.0_9080.json")],
            vec![fixture(&format!("sidecar/routes-9080-{routes}.json"))],
        )
    }

    /// The ingress gateway (`istio=ingressgateway`) with these listener and route files of
    /// `tests/istio/gateway/`.
    pub fn gateway(listeners: &[&str], routes: &[&str]) -> Self {
        Self::new(
            Context::Gateway,
            &[("istio", "ingressgateway")],
            listeners
                .iter()
                .map(|l| fixture(&format!("gateway/{l}")))
                .collect(),
            routes
                .iter()
                .map(|r| fixture(&format!("gateway/{r}")))
                .collect(),
        )
    }

    fn new(
        context: Context,
        labels: &[(&str, &str)],
        listeners: Vec<Value>,
        routes: Vec<Value>,
    ) -> Self {
        let mut services = BTreeMap::new();
        for assignment in fixture("endpoints.json").as_array().expect("EDS list") {
            let name = assignment["cluster_name"].as_str().expect("cluster_name");
            let endpoints: Vec<Value> = assignment["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| l["lb_endpoints"].as_array().cloned().unwrap_or_default())
                .collect();
            services.insert(name.to_owned(), endpoints);
        }
        Self {
            context,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            listeners,
            routes,
            services,
            destination_rules: Vec::new(),
            envoy_filters: Vec::new(),
            wasm_plugins: Vec::new(),
        }
    }

    /// Adds a pod (`ip`, `port`, `version` label) to the service cluster `cluster`, creating
    /// the service when istiod had none of that name.
    pub fn pod(mut self, cluster: &str, ip: &str, port: u16, version: &str) -> Self {
        self.services
            .entry(cluster.to_owned())
            .or_default()
            .push(pod_endpoint(cluster, ip, port, version));
        self
    }

    /// A DestinationRule applied to istiod (`metadata.namespace` and `spec` as in YAML).
    pub fn destination_rule(mut self, dr: Value) -> Self {
        self.destination_rules.push(dr);
        self
    }

    /// Applies a manifest (a `List`, as `meshroute istio-manifest` writes) to istiod.
    pub fn apply(mut self, manifest: &Value) -> Self {
        let items = match manifest["kind"].as_str() {
            Some("List") => manifest["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![manifest.clone()],
        };
        for item in items {
            match item["kind"].as_str() {
                Some("EnvoyFilter") => self.envoy_filters.push(item),
                Some("WasmPlugin") => self.wasm_plugins.push(item),
                Some("DestinationRule") => self.destination_rules.push(item),
                other => panic!("istiod emulation does not know kind {other:?}"),
            }
        }
        self
    }

    /// The configuration istiod would push: listeners (WasmPlugins in, then EnvoyFilter
    /// patches applied) and route configurations (patched).
    fn generate(&self) -> (Vec<Value>, Vec<Value>) {
        let mut listeners = self.listeners.clone();
        let mut routes = self.routes.clone();
        for plugin in &self.wasm_plugins {
            if selects(&plugin["spec"]["selector"]["matchLabels"], &self.labels) {
                for l in &mut listeners {
                    self.add_wasm_plugin(l, plugin);
                }
            }
        }
        // istiod merges the patches of every EnvoyFilter that selects the proxy, and adds
        // virtual hosts after patching the existing ones (`patchVirtualHosts`).
        let patches: Vec<&Value> = self
            .envoy_filters
            .iter()
            .filter(|ef| selects(&ef["spec"]["workloadSelector"]["labels"], &self.labels))
            .flat_map(|ef| ef["spec"]["configPatches"].as_array().into_iter().flatten())
            .collect();
        let adds_virtual_host =
            |p: &Value| p["applyTo"] == "VIRTUAL_HOST" && p["patch"]["operation"] == "ADD";
        let (adds, others): (Vec<&Value>, Vec<&Value>) =
            patches.into_iter().partition(|p| adds_virtual_host(p));
        for patch in others.into_iter().chain(adds) {
            self.apply_patch(patch, &mut listeners, &mut routes);
        }
        (listeners, routes)
    }

    /// istiod's placement of a WasmPlugin (`extensionfilter.go`, `listener_builder.go`,
    /// `networkfilter.go`): HTTP plugins of the unspecified phase after the authn/authz
    /// filters, before `grpc_stats`; network plugins before Istio's stats and the terminal
    /// filter of each chain of a matching port.
    fn add_wasm_plugin(&self, listener: &mut Value, plugin: &Value) {
        let spec = &plugin["spec"];
        known_keys(
            spec,
            &[
                "selector",
                "url",
                "pluginName",
                "phase",
                "pluginConfig",
                "failStrategy",
                "type",
                "match",
            ],
            "WasmPlugin spec",
        );
        assert!(
            matches!(spec["phase"].as_str(), None | Some("UNSPECIFIED_PHASE")),
            "phase {} not emulated",
            spec["phase"]
        );
        let port = listener_port(listener);
        if !self.plugin_matches(&spec["match"], port) {
            return;
        }
        let network = spec["type"].as_str() == Some("NETWORK");
        let url = spec["url"].as_str().expect("url");
        let file = url.strip_prefix("file://").unwrap_or_else(|| {
            panic!("the istio-agent emulation reads file:// modules, not {url}")
        });
        let name = format!(
            "{}.{}",
            plugin["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default"),
            plugin["metadata"]["name"].as_str().expect("name")
        );
        let failure_policy = match spec["failStrategy"].as_str() {
            None | Some("FAIL_CLOSE") => "FAIL_CLOSED",
            Some("FAIL_OPEN") => "FAIL_OPEN",
            Some(other) => panic!("failStrategy {other} not emulated"),
        };
        let kind = if network { "network" } else { "http" };
        let filter = json!({
            "name": name,
            "typed_config": {
                "@type": format!("type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm"),
                "config": {
                    "name": name,
                    "root_id": spec["pluginName"],
                    "failure_policy": failure_policy,
                    // istiod hands the plugin configuration over as JSON text.
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": serde_json::to_string(&spec["pluginConfig"]).expect("json"),
                    },
                    "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": file}}},
                },
            },
        });
        for chain in chains_mut(listener) {
            let filters = chain["filters"].as_array_mut().expect("filters");
            if network {
                let at = filters
                    .iter()
                    .position(|f| {
                        matches!(f["name"].as_str(), Some("istio.stats" | TCP_PROXY | HCM))
                    })
                    .unwrap_or(filters.len());
                filters.insert(at, filter.clone());
            } else {
                for hcm in filters.iter_mut().filter(|f| f["name"] == HCM) {
                    let http = hcm["typed_config"]["http_filters"]
                        .as_array_mut()
                        .expect("http_filters");
                    let at = http
                        .iter()
                        .position(|f| f["name"] == "envoy.filters.http.grpc_stats")
                        .expect("istiod always adds grpc_stats");
                    http.insert(at, filter.clone());
                }
            }
        }
    }

    /// WasmPlugin `match`: a traffic selector with this proxy's mode and the listener port.
    fn plugin_matches(&self, selectors: &Value, port: u16) -> bool {
        let Some(selectors) = selectors.as_array().filter(|s| !s.is_empty()) else {
            return true;
        };
        selectors.iter().any(|s| {
            known_keys(s, &["mode", "ports"], "WasmPlugin match");
            // Only outbound listeners are emulated: they are CLIENT listeners.
            let mode = matches!(
                s["mode"].as_str(),
                None | Some("CLIENT") | Some("CLIENT_AND_SERVER") | Some("UNDEFINED")
            );
            let ports = s["ports"].as_array().filter(|p| !p.is_empty());
            mode && ports.is_none_or(|p| p.iter().any(|p| p["number"] == json!(port)))
        })
    }

    /// One EnvoyFilter patch, with istiod's semantics (`envoyfilter/listener_patch.go`,
    /// `rc_patch.go`) for the operations and matches it uses.
    fn apply_patch(&self, patch: &Value, listeners: &mut [Value], routes: &mut [Value]) {
        let m = &patch["match"];
        known_keys(m, &["context", "listener", "routeConfiguration"], "match");
        let context = m["context"].as_str().unwrap_or("ANY");
        if context != "ANY" && context != self.context.patch_context() {
            return;
        }
        let op = patch["patch"]["operation"].as_str().expect("operation");
        let value = &patch["patch"]["value"];
        match patch["applyTo"].as_str() {
            Some("HTTP_FILTER") => {
                for l in listeners.iter_mut().filter(|l| listener_matches(l, m)) {
                    for chain in chains_mut(l) {
                        for hcm in chain_filters(chain, m).filter(|f| f["name"] == HCM) {
                            let list = hcm["typed_config"]["http_filters"]
                                .as_array_mut()
                                .expect("http_filters");
                            let sub = m["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                                .as_str();
                            insert(list, op, sub, value);
                        }
                    }
                }
            }
            Some("NETWORK_FILTER") => {
                for l in listeners.iter_mut().filter(|l| listener_matches(l, m)) {
                    for chain in chains_mut(l) {
                        if !chain_matches(chain, m) {
                            continue;
                        }
                        let name = m["listener"]["filterChain"]["filter"]["name"].as_str();
                        let list = chain["filters"].as_array_mut().expect("filters");
                        if op == "MERGE" {
                            for f in list
                                .iter_mut()
                                .filter(|f| name.is_none_or(|n| f["name"] == n))
                            {
                                merge_filter(f, value);
                            }
                        } else {
                            insert(list, op, name, value);
                        }
                    }
                }
            }
            Some("VIRTUAL_HOST") => {
                assert!(
                    m["routeConfiguration"].is_null(),
                    "routeConfiguration matches are not emulated"
                );
                assert_eq!(op, "ADD", "VIRTUAL_HOST {op} not emulated");
                // Added after the other patches of the route configuration (rc_patch.go).
                for rc in routes.iter_mut() {
                    rc["virtual_hosts"]
                        .as_array_mut()
                        .expect("virtual hosts")
                        .push(value.clone());
                }
            }
            Some("HTTP_ROUTE") => {
                assert!(
                    m["routeConfiguration"].is_null(),
                    "routeConfiguration matches are not emulated"
                );
                for rc in routes.iter_mut() {
                    for vh in rc["virtual_hosts"].as_array_mut().into_iter().flatten() {
                        let list = vh["routes"].as_array_mut().expect("routes");
                        match op {
                            // Without a route match, INSERT_FIRST prepends (rc_patch.go).
                            "INSERT_FIRST" | "INSERT_BEFORE" => list.insert(0, value.clone()),
                            "ADD" | "INSERT_AFTER" => list.push(value.clone()),
                            other => panic!("HTTP_ROUTE {other} not emulated"),
                        }
                    }
                }
            }
            other => panic!("applyTo {other:?} not emulated"),
        }
    }

    /// The clusters istiod would build: one per service port, one per DestinationRule subset,
    /// and every cluster a route or TCP proxy names. Each carries its DestinationRule policy
    /// where the emulation knows the field (`cluster_traffic_policy.go`).
    fn clusters(&self, listeners: &[Value], routes: &[Value]) -> BTreeMap<String, ClusterPlan> {
        let mut out: BTreeMap<String, ClusterPlan> = BTreeMap::new();
        for service in self.services.keys() {
            out.insert(
                service.clone(),
                ClusterPlan {
                    service: service.clone(),
                    version: None,
                    policy: Value::Null,
                },
            );
        }
        // istiod merges DestinationRules of one host: subsets by name, the first policy wins.
        let mut subsets: BTreeMap<String, Vec<(String, Option<String>, Value)>> = BTreeMap::new();
        let mut policies: BTreeMap<String, Value> = BTreeMap::new();
        for dr in &self.destination_rules {
            let ns = dr["metadata"]["namespace"].as_str().unwrap_or("default");
            let host = fqdn(dr["spec"]["host"].as_str().expect("host"), ns);
            known_keys(
                &dr["spec"],
                &[
                    "host",
                    "subsets",
                    "trafficPolicy",
                    "exportTo",
                    "workloadSelector",
                ],
                "DestinationRule spec",
            );
            if !dr["spec"]["trafficPolicy"].is_null() {
                policies
                    .entry(host.clone())
                    .or_insert_with(|| dr["spec"]["trafficPolicy"].clone());
            }
            let list = subsets.entry(host).or_default();
            for s in dr["spec"]["subsets"].as_array().into_iter().flatten() {
                let name = s["name"].as_str().expect("subset name").to_owned();
                if list.iter().any(|(n, _, _)| *n == name) {
                    continue;
                }
                known_keys(s, &["name", "labels", "trafficPolicy"], "subset");
                let labels = s["labels"].as_object().cloned().unwrap_or_default();
                assert!(
                    labels.keys().all(|k| k == "version"),
                    "subsets select by the version label only here"
                );
                let version = labels
                    .get("version")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                list.push((name, version, s["trafficPolicy"].clone()));
            }
        }
        for service in self.services.keys() {
            let (port, _, _, host) = parse_cluster(service);
            let policy = policies.get(host).cloned().unwrap_or(Value::Null);
            if let Some(plan) = out.get_mut(service) {
                plan.policy = policy.clone();
            }
            for (name, version, subset_policy) in subsets.get(host).into_iter().flatten() {
                out.insert(
                    format!("outbound|{port}|{name}|{host}"),
                    ClusterPlan {
                        service: service.clone(),
                        version: version.clone(),
                        policy: if subset_policy.is_null() {
                            policy.clone()
                        } else {
                            subset_policy.clone()
                        },
                    },
                );
            }
        }
        let mut named = BTreeSet::new();
        for rc in routes {
            collect_clusters(rc, &mut named);
        }
        for l in listeners {
            collect_clusters(l, &mut named);
        }
        for name in named {
            if STATIC_CLUSTERS.contains(&name.as_str()) || out.contains_key(&name) {
                continue;
            }
            // A cluster a route names that istiod has no endpoints for: empty, as istiod's.
            out.insert(
                name.clone(),
                ClusterPlan {
                    service: name,
                    version: None,
                    policy: Value::Null,
                },
            );
        }
        out
    }

    /// Starts the proxy. `pods` maps pod IPs to the loopback ports of the upstreams that
    /// stand for them; a pod not listed refuses connections.
    pub fn start(&self, pods: &[(&str, u16)]) -> IstioProxy {
        let (listeners, routes) = self.generate();
        let plans = self.clusters(&listeners, &routes);
        let ip = unique_loopback();
        let dir = Envoy::new_workdir();
        std::fs::create_dir_all(dir.join("eds")).expect("eds dir");
        let template = fixture("cluster-outbound-9080-v1-productpage.json");
        let mut clusters: Vec<Value> = STATIC_CLUSTERS
            .iter()
            .map(|name| {
                json!({
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": name},
                })
            })
            .collect();
        let mut eds = BTreeMap::new();
        for (i, (name, plan)) in plans.iter().enumerate() {
            let file = dir.join("eds").join(format!("{i}.json"));
            clusters.push(eds_cluster(&template, name, plan, &file));
            eds.insert(name.clone(), (file, plan.clone()));
        }
        let route_by_name: BTreeMap<&str, &Value> = routes
            .iter()
            .map(|r| (r["name"].as_str().expect("route name"), r))
            .collect();
        let listeners: Vec<Value> = listeners
            .into_iter()
            .map(|l| localize(l, ip, &route_by_name))
            .collect();
        let first = SocketAddr::from((ip, listener_port(&listeners[0])));
        let admin = free_port();
        let bootstrap = json!({
            "node": {"id": "sidecar~10.244.0.194~meshroute-test.default~default.svc.cluster.local", "cluster": "meshroute-test.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        let proxy = IstioProxy {
            envoy: None,
            ip,
            eds,
            services: Mutex::new(self.services.clone()),
            addresses: Mutex::new(
                pods.iter()
                    .map(|(ip, port)| ((*ip).to_owned(), *port))
                    .collect(),
            ),
            version: AtomicU64::new(0),
            dir: dir.clone(),
        };
        proxy.write_endpoints();
        let config = dir.join("envoy.json");
        std::fs::write(
            &config,
            serde_json::to_string_pretty(&bootstrap).expect("json"),
        )
        .expect("write bootstrap");
        IstioProxy {
            envoy: Some(Envoy::spawn_at(&config, dir, first, admin)),
            ..proxy
        }
    }
}

/// A cluster to build: which service's pods, of which version, with which policy.
#[derive(Clone, Debug)]
struct ClusterPlan {
    service: String,
    version: Option<String>,
    policy: Value,
}

/// Envoy running what istiod generated.
pub struct IstioProxy {
    envoy: Option<Envoy>,
    /// The loopback address every listener binds (at istiod's port).
    pub ip: Ipv4Addr,
    eds: BTreeMap<String, (PathBuf, ClusterPlan)>,
    services: Mutex<BTreeMap<String, Vec<Value>>>,
    addresses: Mutex<BTreeMap<String, u16>>,
    version: AtomicU64,
    dir: PathBuf,
}

impl IstioProxy {
    fn envoy(&self) -> &Envoy {
        self.envoy.as_ref().expect("started")
    }

    /// The address of istiod's listener on `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn send(&self, port: u16, req: &Request<'_>) -> Response {
        req.send_to(self.addr(port))
    }

    /// A TCP exchange with the listener on `port` (see [`crate::l4::tcp_exchange`]).
    pub fn tcp(&self, port: u16, payload: &str) -> Result<String, String> {
        crate::l4::tcp_exchange_at(self.addr(port), payload)
    }

    /// A counter or gauge of Envoy's admin `/stats` (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let text = get("admin", "/stats").send(self.envoy().admin).text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// The endpoints Envoy has for `cluster`, as `ip:port`.
    pub fn endpoints(&self, cluster: &str) -> BTreeSet<String> {
        let text = get("admin", "/clusters").send(self.envoy().admin).text();
        let prefix = format!("{cluster}::");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_once("::"))
            .filter(|(addr, field)| addr.contains(':') && field.starts_with("cx_active"))
            .map(|(addr, _)| addr.to_owned())
            .collect()
    }

    /// Replaces the pods of a service, as EDS does when pods come and go, and waits until
    /// Envoy has them.
    pub fn replace_pods(
        &self,
        service: &str,
        pods: &[(&str, u16, &str)],
        upstreams: &[(&str, u16)],
    ) {
        {
            let mut addresses = self.addresses.lock().expect("lock");
            for (ip, port) in upstreams {
                addresses.insert((*ip).to_owned(), *port);
            }
        }
        let new_pods: Vec<Value> = pods
            .iter()
            .map(|(ip, port, version)| pod_endpoint(service, ip, *port, version))
            .collect();
        self.services
            .lock()
            .expect("lock")
            .insert(service.to_owned(), new_pods);
        self.write_endpoints();
        let want: BTreeSet<String> = {
            let addresses = self.addresses.lock().expect("lock");
            pods.iter()
                .map(|(ip, _, _)| format!("127.0.0.1:{}", addresses.get(*ip).copied().unwrap_or(1)))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.endpoints(service) != want {
            assert!(
                Instant::now() < deadline,
                "Envoy did not take the new endpoints of {service}: has {:?}, want {want:?}",
                self.endpoints(service)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes every cluster's endpoints (atomically: Envoy reloads a watched file when one
    /// is moved over it).
    fn write_endpoints(&self) {
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let services = self.services.lock().expect("lock");
        let addresses = self.addresses.lock().expect("lock");
        for (name, (file, plan)) in &self.eds {
            let lb_endpoints: Vec<Value> = services
                .get(&plan.service)
                .into_iter()
                .flatten()
                .filter(|e| {
                    plan.version
                        .as_deref()
                        .is_none_or(|v| workload_version(e) == Some(v))
                })
                .map(|e| {
                    let mut e = e.clone();
                    let ip = e["endpoint"]["address"]["socket_address"]["address"]
                        .as_str()
                        .expect("pod address")
                        .to_owned();
                    // A pod nobody stands for: port 1 on loopback refuses connections.
                    let port = addresses.get(&ip).copied().unwrap_or(1);
                    e["endpoint"]["address"]["socket_address"] =
                        json!({"address": "127.0.0.1", "port_value": port});
                    e
                })
                .collect();
            let response = json!({
                "version_info": version.to_string(),
                "resources": [{
                    "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                    "cluster_name": name,
                    "endpoints": [{"locality": {}, "lb_endpoints": lb_endpoints}],
                }],
            });
            let tmp = self.dir.join(format!("eds-{version}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(&response).expect("json")).expect("write eds");
            std::fs::rename(&tmp, file).expect("move eds");
        }
    }

    pub fn log_text(&self) -> String {
        self.envoy().log_text()
    }
}

/// A pod of the service cluster `cluster` as EDS lists it, with the `istio.workload`
/// metadata istiod writes (`name;namespace;app;version;Kubernetes`).
fn pod_endpoint(cluster: &str, ip: &str, port: u16, version: &str) -> Value {
    let (_, _, _, host) = parse_cluster(cluster);
    let app = host.split('.').next().unwrap_or(host);
    let namespace = host.split('.').nth(1).unwrap_or("default");
    json!({
        "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
        "health_status": "HEALTHY",
        "metadata": {"filter_metadata": {
            "istio": {"workload": format!("{app}-{version};{namespace};{app};{version};Kubernetes")},
        }},
        "load_balancing_weight": 1,
    })
}

/// The version a pod's `istio.workload` metadata names (`name;namespace;app;version;...`).
fn workload_version(endpoint: &Value) -> Option<&str> {
    endpoint["metadata"]["filter_metadata"]["istio"]["workload"]
        .as_str()?
        .split(';')
        .nth(3)
}

/// `outbound|port|subset|host` → its parts.
fn parse_cluster(name: &str) -> (u16, &str, &str, &str) {
    let parts: Vec<&str> = name.split('|').collect();
    assert!(parts.len() == 4, "not an outbound cluster name: {name}");
    (
        parts[1].parse().expect("port"),
        parts[0],
        parts[2],
        parts[3],
    )
}

fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// Fails the test on fields the emulation would otherwise ignore.
fn known_keys(v: &Value, known: &[&str], what: &str) {
    for k in v.as_object().into_iter().flat_map(|o| o.keys()) {
        assert!(known.contains(&k.as_str()), "{what}: {k} not emulated");
    }
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector.as_object().into_iter().flatten().all(|(k, v)| {
        labels
            .get(k)
            .is_some_and(|l| Some(l.as_str()) == v.as_str())
    })
}

fn listener_port(listener: &Value) -> u16 {
    listener["address"]["socket_address"]["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("listener port")
}

/// `match.listener`: name and port number (`listenerMatch`).
fn listener_matches(listener: &Value, m: &Value) -> bool {
    let lm = &m["listener"];
    known_keys(lm, &["name", "portNumber", "filterChain"], "match.listener");
    (lm["name"].is_null() || lm["name"] == listener["name"])
        && lm["portNumber"]
            .as_u64()
            .is_none_or(|p| p == u64::from(listener_port(listener)))
}

/// `match.listener.filterChain`: only the network filter name is emulated.
fn chain_matches(chain: &Value, m: &Value) -> bool {
    let fc = &m["listener"]["filterChain"];
    known_keys(fc, &["filter"], "match.listener.filterChain");
    known_keys(
        &fc["filter"],
        &["name", "subFilter"],
        "match.listener.filterChain.filter",
    );
    let _ = chain;
    true
}

/// The network filters of `chain` the patch's filter match names (all without one).
fn chain_filters<'a>(chain: &'a mut Value, m: &Value) -> impl Iterator<Item = &'a mut Value> {
    let ok = chain_matches(chain, m);
    let name = m["listener"]["filterChain"]["filter"]["name"]
        .as_str()
        .map(str::to_owned);
    chain["filters"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .filter(move |f| ok && name.as_deref().is_none_or(|n| f["name"] == n))
}

/// The filter chains of a listener, the default one included (`patchFilterChains`).
fn chains_mut(listener: &mut Value) -> Vec<&mut Value> {
    let mut out = Vec::new();
    for (k, v) in listener.as_object_mut().expect("listener").iter_mut() {
        match k.as_str() {
            "filter_chains" => out.extend(v.as_array_mut().expect("chains").iter_mut()),
            "default_filter_chain" => out.push(v),
            _ => {}
        }
    }
    out
}

/// An insert operation on a filter list, relative to the first filter named `anchor`
/// (istiod: INSERT_BEFORE/AFTER without a match act at the start/end; with a match that
/// finds nothing, nothing is inserted).
fn insert(list: &mut Vec<Value>, op: &str, anchor: Option<&str>, value: &Value) {
    let at = |list: &Vec<Value>| anchor.and_then(|a| list.iter().position(|f| f["name"] == a));
    match (op, anchor) {
        ("INSERT_FIRST", _) | ("INSERT_BEFORE", None) => list.insert(0, value.clone()),
        ("ADD", _) | ("INSERT_AFTER", None) => list.push(value.clone()),
        ("INSERT_BEFORE", Some(_)) => {
            if let Some(i) = at(list) {
                list.insert(i, value.clone());
            }
        }
        ("INSERT_AFTER", Some(_)) => {
            if let Some(i) = at(list) {
                list.insert(i + 1, value.clone());
            }
        }
        (other, _) => panic!("filter operation {other} not emulated"),
    }
}

/// MERGE of a filter: protobuf merge of the typed config (messages merge, scalars and
/// repeated fields as `proto.Merge` does them, a oneof member replacing its siblings) for
/// the messages the manifests merge into.
fn merge_filter(filter: &mut Value, patch: &Value) {
    known_keys(patch, &["name", "typed_config"], "MERGE value");
    let src = &patch["typed_config"];
    let dst = &mut filter["typed_config"];
    assert_eq!(src["@type"], dst["@type"], "MERGE across types");
    let oneofs: &[&[&str]] = match src["@type"].as_str() {
        Some("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy") => {
            &[&["cluster", "weighted_clusters", "on_demand"]]
        }
        other => panic!("MERGE into {other:?} not emulated"),
    };
    for (k, v) in src.as_object().expect("typed_config") {
        if let Some(group) = oneofs.iter().find(|g| g.contains(&k.as_str())) {
            for sibling in group.iter().filter(|s| **s != k) {
                dst.as_object_mut().expect("typed_config").remove(*sibling);
            }
        }
        assert!(
            !v.is_object() && !v.is_array(),
            "MERGE of message field {k} not emulated"
        );
        dst[k] = v.clone();
    }
}

/// Every cluster name a route configuration or listener refers to.
fn collect_clusters(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                match (k.as_str(), child) {
                    ("cluster", Value::String(name)) => {
                        out.insert(name.clone());
                    }
                    ("weighted_clusters", w) => {
                        for c in w["clusters"].as_array().into_iter().flatten() {
                            if let Some(n) = c["name"].as_str() {
                                out.insert(n.to_owned());
                            }
                        }
                    }
                    _ => collect_clusters(child, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_clusters(c, out)),
        _ => {}
    }
}

/// istiod's EDS cluster for `name` (the shape of the template), its endpoints from a file.
fn eds_cluster(template: &Value, name: &str, plan: &ClusterPlan, file: &std::path::Path) -> Value {
    let mut c = template.clone();
    let obj = c.as_object_mut().expect("cluster");
    obj.remove("@type");
    // Istio's upstream metadata exchange and the mesh's mTLS (SDS) are Istio-proxy only.
    obj.remove("filters");
    obj.remove("transport_socket_matches");
    c["name"] = json!(name);
    c["eds_cluster_config"] = json!({
        "service_name": name,
        "eds_config": {"path_config_source": {"path": file}, "resource_api_version": "V3"},
    });
    let (port, _, subset, host) = parse_cluster(name);
    c["metadata"]["filter_metadata"]["istio"] = json!({
        "default_original_port": port,
        "services": [{"host": host}],
        "subset": subset,
    });
    apply_policy(&mut c, &plan.policy);
    c
}

/// The DestinationRule fields the scenarios use, as `cluster_traffic_policy.go` applies them.
fn apply_policy(c: &mut Value, policy: &Value) {
    if policy.is_null() {
        return;
    }
    known_keys(
        policy,
        &["loadBalancer", "connectionPool", "outlierDetection"],
        "trafficPolicy",
    );
    let outlier = &policy["outlierDetection"];
    if !outlier.is_null() {
        known_keys(
            outlier,
            &[
                "consecutive5xxErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
            ],
            "outlierDetection",
        );
        // applyOutlierDetection: success-rate ejection off, a set error count enforced
        // always, and no panic threshold.
        let mut od = json!({"enforcing_success_rate": 0});
        if let Some(n) = outlier["consecutive5xxErrors"].as_u64() {
            od["consecutive_5xx"] = json!(n);
            od["enforcing_consecutive_5xx"] = json!(if n > 0 { 100 } else { 0 });
        }
        for (field, envoy) in [
            ("interval", "interval"),
            ("baseEjectionTime", "base_ejection_time"),
        ] {
            if !outlier[field].is_null() {
                od[envoy] = outlier[field].clone();
            }
        }
        if let Some(n) = outlier["maxEjectionPercent"].as_u64() {
            od["max_ejection_percent"] = json!(n);
        }
        c["outlier_detection"] = od;
        c["common_lb_config"]["healthy_panic_threshold"] = json!({"value": 0});
    }
    let lb = &policy["loadBalancer"];
    known_keys(lb, &["simple", "consistentHash"], "loadBalancer");
    match lb["simple"].as_str() {
        None => {}
        Some("ROUND_ROBIN") => c["lb_policy"] = json!("ROUND_ROBIN"),
        Some("LEAST_REQUEST" | "LEAST_CONN") => c["lb_policy"] = json!("LEAST_REQUEST"),
        Some("RANDOM") => c["lb_policy"] = json!("RANDOM"),
        Some(other) => panic!("loadBalancer {other} not emulated"),
    }
    if !lb["consistentHash"].is_null() {
        c["lb_policy"] = json!("RING_HASH");
        c["ring_hash_lb_config"] = json!({"minimum_ring_size": 1024});
    }
    let pool = &policy["connectionPool"];
    known_keys(pool, &["tcp", "http"], "connectionPool");
    known_keys(&pool["tcp"], &["maxConnections"], "connectionPool.tcp");
    known_keys(
        &pool["http"],
        &["http1MaxPendingRequests", "http2MaxRequests", "maxRetries"],
        "connectionPool.http",
    );
    let thresholds = &mut c["circuit_breakers"]["thresholds"][0];
    for (field, envoy) in [
        (&pool["tcp"]["maxConnections"], "max_connections"),
        (
            &pool["http"]["http1MaxPendingRequests"],
            "max_pending_requests",
        ),
        (&pool["http"]["http2MaxRequests"], "max_requests"),
        (&pool["http"]["maxRetries"], "max_retries"),
    ] {
        if let Some(n) = field.as_u64() {
            thresholds[envoy] = json!(n);
        }
    }
}

/// A listener as served here: bound at `ip` (istiod's port kept), routes inline, without the
/// filters only Istio's proxy has.
fn localize(mut l: Value, ip: Ipv4Addr, routes: &BTreeMap<&str, &Value>) -> Value {
    let port = listener_port(&l);
    let obj = l.as_object_mut().expect("listener");
    obj.remove("@type");
    // istiod's outbound listeners take connections from the virtual listener; here they
    // take them themselves.
    obj.remove("bind_to_port");
    l["address"] = json!({"socket_address": {"address": ip.to_string(), "port_value": port}});
    for chain in chains_mut(&mut l) {
        let filters = chain["filters"].as_array_mut().expect("filters");
        filters.retain(|f| !ISTIO_ONLY_FILTERS.contains(&f["name"].as_str().unwrap_or("")));
        for hcm in filters.iter_mut().filter(|f| f["name"] == HCM) {
            let cfg = &mut hcm["typed_config"];
            if let Some(list) = cfg["http_filters"].as_array_mut() {
                list.retain(|f| !ISTIO_ONLY_FILTERS.contains(&f["name"].as_str().unwrap_or("")));
            }
            if let Some(name) = cfg["rds"]["route_config_name"].as_str() {
                let rc = (*routes
                    .get(name)
                    .unwrap_or_else(|| panic!("no route configuration {name}")))
                .clone();
                let mut rc = rc;
                rc.as_object_mut().expect("route").remove("@type");
                let cfg_obj = cfg.as_object_mut().expect("hcm");
                cfg_obj.remove("rds");
                cfg_obj.insert("route_config".into(), rc);
            }
        }
    }
    l
}

/// A loopback address no other proxy of this machine's tests uses.
fn unique_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        100 + u8::try_from(pid % 100).expect("small"),
        u8::try_from((pid / 100) % 250).expect("small"),
        1 + u8::try_from(n % 250).expect("small"),
    )
}
