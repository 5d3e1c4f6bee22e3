//! `meshroute envoy-config`: a complete Envoy bootstrap that runs the filter with a rules
//! document, following the host contract (control headers stripped first, `cluster_header`
//! route, ORIGINAL_DST clusters where the filter picks endpoints, DNS clusters where Envoy
//! resolves).

use std::path::Path;

use serde_json::{json, Value};

use crate::credentials::CredentialError;
use crate::runtime::access_log::Encoding;

use meshroute_core::contract::{
    l4_root_id, BLACKHOLE_CLUSTER, CLUSTER_HEADER, CONTROL_HEADERS, ENDPOINT_HEADER,
    EXPLICIT_PROXY_PORT, HTTP_ROOT_ID, ISTIO_METRICS_NODE_KEY, LISTENER_PORT_HEADER,
    PASSTHROUGH_CLUSTER, ROUTE_NAME_PROPERTY,
};
use meshroute_core::ir::{
    ClientTls, Cluster, Discovery, Listener, ProxyKind, RulesDocument, ServerTls, ServerTlsMode,
    TlsVersion,
};
use meshroute_core::telemetry;

/// Why configuration for Envoy or Istio cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot serialize rules: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{path}: {source}")]
    Wasm {
        path: String,
        source: std::io::Error,
    },
    #[error("wasm path {0} is not UTF-8")]
    NotUtf8(String),
    #[error("--listen is required for a sidecar (the outbound proxy address)")]
    NoListen,
    /// No Gateway server could be written; the reasons of each.
    #[error("the gateway has no server to listen for{}", .0.iter().map(|w| format!("; {w}")).collect::<String>())]
    NoServer(Vec<String>),
    #[error("gateway port {port}: {source}")]
    GatewayTls { port: u16, source: CredentialError },
    #[error("cluster {cluster}: tls: {source}")]
    ClusterTls {
        cluster: String,
        source: CredentialError,
    },
}

/// Envoy's wasm failure policy (Istio WasmPlugin `failStrategy`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FailurePolicy {
    FailClosed,
    FailOpen,
    FailReload,
}

impl FailurePolicy {
    fn as_envoy(self) -> &'static str {
        match self {
            Self::FailClosed => "FAIL_CLOSED",
            Self::FailOpen => "FAIL_OPEN",
            Self::FailReload => "FAIL_RELOAD",
        }
    }
}

/// One address to listen on for one route-table port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Gateway server port this address serves; `None` for "the first/only one".
    pub server_port: Option<u16>,
    pub address: String,
    pub port: u16,
}

impl std::str::FromStr for Bind {
    type Err = String;

    /// `ADDR:PORT` or `SERVER_PORT=ADDR:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (server_port, addr) = match s.split_once('=') {
            Some((p, a)) => (
                Some(
                    p.parse()
                        .map_err(|_| format!("invalid server port in {s:?}"))?,
                ),
                a,
            ),
            None => (None, s),
        };
        let (address, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("invalid listen address {addr:?}: expected ADDR:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("invalid port in listen address {addr:?}"))?;
        Ok(Self {
            server_port,
            address: address.trim_matches(['[', ']']).to_owned(),
            port,
        })
    }
}

pub struct Options<'a> {
    pub wasm: &'a Path,
    pub binds: &'a [Bind],
    pub admin: Option<&'a Bind>,
    pub failure_policy: FailurePolicy,
    /// Directory of `credentialName` secrets (`<dir>/<name>/tls.crt|tls.key|ca.crt`).
    pub credentials: Option<&'a Path>,
    /// Istio's TEXT access-log format or its JSON encoding.
    pub access_log_encoding: Encoding,
}

/// Istio's default access-log format (`EnvoyTextLogFormat`, istio/istio
/// pilot/pkg/model/telemetry_logging.go), for HTTP and TCP alike.
const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's JSON encoding of the same fields (its `EnvoyJSONLogFormatIstio`).
const ISTIO_JSON_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// The stdout access log in Istio's format. Envoy's own route here is one that hands the
/// decision to the filter, so `ROUTE_NAME` is read from what the filter left: the name
/// Istio gives the route that decided (inside Istio, istiod's routes carry those names).
fn access_log(encoding: Encoding) -> Value {
    let route_name = format!("%FILTER_STATE(wasm.{ROUTE_NAME_PROPERTY}:PLAIN)%");
    let format = match encoding {
        Encoding::Text => json!({"text_format_source": {
            "inline_string": ISTIO_TEXT_FORMAT.replace("%ROUTE_NAME%", &route_name),
        }}),
        Encoding::Json => {
            let fields: serde_json::Map<String, Value> = ISTIO_JSON_FIELDS
                .iter()
                .map(|(k, v)| {
                    let v = if *v == "%ROUTE_NAME%" {
                        &route_name
                    } else {
                        *v
                    };
                    ((*k).to_owned(), Value::from(v))
                })
                .collect();
            json!({"json_format": fields})
        }
    };
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": format,
        },
    }])
}

/// Builds the bootstrap. Errors name what cannot be expressed.
/// Returns the bootstrap and warnings about what it leaves out.
pub fn bootstrap(
    doc: &RulesDocument,
    opts: &Options<'_>,
) -> Result<(Value, Vec<String>), ConfigError> {
    let rules = serde_json::to_string(doc)?;
    // Envoy resolves relative paths against its own working directory, not ours. Absolute
    // paths are kept as given: they may name the file inside a container or pod.
    let wasm_path = if opts.wasm.is_absolute() {
        opts.wasm.to_path_buf()
    } else {
        std::fs::canonicalize(opts.wasm).map_err(|source| ConfigError::Wasm {
            path: opts.wasm.display().to_string(),
            source,
        })?
    };
    let wasm = wasm_path
        .to_str()
        .ok_or_else(|| ConfigError::NotUtf8(wasm_path.display().to_string()))?;
    let mut listeners = Vec::new();
    let mut warnings = Vec::new();
    match doc.proxy.kind {
        ProxyKind::Sidecar => {
            let bind = opts.binds.first().ok_or(ConfigError::NoListen)?;
            listeners.push(listener(
                ProxyKind::Sidecar,
                "outbound",
                bind,
                EXPLICIT_PROXY_PORT,
                &rules,
                wasm,
                opts,
            ));
            // TCP and TLS service ports: a listener each, as Istio's per-port outbound
            // listeners, the filter deciding every connection.
            for t in &doc.l4_tables {
                let bind = server_bind(opts.binds, t.port);
                let name = format!("outbound_tcp_{}", t.port);
                let mut l = json!({
                    "name": name,
                    "address": socket(&bind),
                    "filter_chains": [{"filters": connection_filters(&name, t.port, &rules, wasm, opts)}],
                });
                if t.routes_on_sni() {
                    l["listener_filters"] = tls_inspector();
                }
                listeners.push(l);
            }
        }
        ProxyKind::Gateway => {
            for (i, l) in doc.listeners.iter().enumerate() {
                let bind = opts
                    .binds
                    .iter()
                    .find(|b| b.server_port == Some(l.port))
                    .or_else(|| {
                        (i == 0)
                            .then(|| opts.binds.iter().find(|b| b.server_port.is_none()))
                            .flatten()
                    })
                    .cloned()
                    .unwrap_or_else(|| server_bind(opts.binds, l.port));
                match gateway_listener(doc, l, &bind, &rules, wasm, opts) {
                    Ok(v) => listeners.push(v),
                    Err(w) => warnings.push(w.to_string()),
                }
            }
            if listeners.is_empty() {
                return Err(ConfigError::NoServer(warnings));
            }
        }
    }
    let mut clusters: Vec<Value> = doc
        .clusters
        .iter()
        .map(|c| cluster(c, opts.credentials))
        .collect::<Result<_, _>>()?;
    // TCP proxies need a configured cluster; the filter's filter state replaces it, and a
    // connection nothing routes is closed before it would be used.
    clusters.push(json!({
        "name": BLACKHOLE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "10s",
    }));
    // ALLOW_ANY traffic goes where the authority says, names included: a dynamic forward
    // proxy cluster resolves it (ORIGINAL_DST would only take IP literals).
    clusters.push(json!({
        "name": PASSTHROUGH_CLUSTER,
        "connect_timeout": "10s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache(),
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                // Envoy requires these of a dynamic forward proxy with protocol options; they
                // only matter for TLS upstreams.
                "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
                "http_filters": upstream_filters(),
            }
        },
    }));
    let mut out = json!({
        // The filter keeps Istio's standard metrics here: no Istio stats filter runs.
        "node": {
            "id": "meshroute",
            "cluster": "meshroute",
            "metadata": {ISTIO_METRICS_NODE_KEY: "true"},
        },
        "stats_config": istio_stats_config(),
        "static_resources": {"listeners": listeners, "clusters": clusters},
    });
    if let Some(admin) = opts.admin {
        out["admin"] = json!({"address": socket(admin)});
    }
    Ok((out, warnings))
}

/// Tag extractors for the filter's tagged stat names, so that `/stats/prometheus` shows
/// Istio's metrics with Istio's labels, and Istio's size buckets.
fn istio_stats_config() -> Value {
    let tags: Vec<Value> = telemetry::envoy_stats_tags()
        .map(|(name, regex)| json!({"tag_name": name, "regex": regex}))
        .collect();
    let sizes: Vec<Value> = [telemetry::REQUEST_BYTES, telemetry::RESPONSE_BYTES]
        .into_iter()
        .map(|m| json!({"match": {"suffix": m}, "buckets": telemetry::BYTE_BUCKETS}))
        .collect();
    json!({"stats_tags": tags, "histogram_bucket_settings": sizes})
}

/// The wasm filter's typed config: the rules as a StringValue, as Istio's WasmPlugin
/// delivers them.
pub(crate) fn wasm_filter(rules: &str, module_file: &str, failure_policy: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": HTTP_ROOT_ID,
            "root_id": HTTP_ROOT_ID,
            "failure_policy": failure_policy,
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": rules,
            },
            "vm_config": {
                "vm_id": "meshroute",
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": module_file}},
            },
        },
    })
}

/// The filter as a network filter for listener `port`: the same module and rules, with the
/// root id that makes it create connection contexts for that port's routes.
pub(crate) fn network_wasm_filter(
    rules: &str,
    module_file: &str,
    failure_policy: &str,
    port: u16,
) -> Value {
    let mut v = wasm_filter(rules, module_file, failure_policy);
    v["@type"] = json!("type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm");
    v["config"]["root_id"] = json!(l4_root_id(port));
    v
}

fn dns_cache() -> Value {
    json!({"name": "passthrough", "dns_lookup_family": "V4_PREFERRED"})
}

fn socket(b: &Bind) -> Value {
    json!({"socket_address": {"address": b.address, "port_value": b.port}})
}

fn listener(
    doc_kind: ProxyKind,
    name: &str,
    bind: &Bind,
    server_port: u16,
    rules: &str,
    wasm: &str,
    opts: &Options<'_>,
) -> Value {
    json!({
        "name": name,
        "address": socket(bind),
        "filter_chains": [{
            "filters": [http_connection_manager(doc_kind, name, server_port, rules, wasm, opts)],
        }],
    })
}

/// The listener of one Gateway server port: HTTP (plain or TLS-terminated) through the HTTP
/// filter, or TCP/TLS connections through the filter as a network filter in front of
/// `tcp_proxy`. Servers that terminate TLS get a filter chain each, chosen by SNI.
fn gateway_listener(
    doc: &RulesDocument,
    l: &Listener,
    bind: &Bind,
    rules: &str,
    wasm: &str,
    opts: &Options<'_>,
) -> Result<Value, ConfigError> {
    let name = format!("gateway_{}", l.port);
    let l4 = doc.l4_tables.iter().find(|t| t.port == l.port);
    let connection = || connection_filters(&name, l.port, rules, wasm, opts);
    let http = || {
        vec![http_connection_manager(
            ProxyKind::Gateway,
            &name,
            l.port,
            rules,
            wasm,
            opts,
        )]
    };
    // One filter chain per server, as Istio builds them: TLS servers chosen by SNI
    // (terminated, or passed through to the connection filter), plain servers in the chain
    // without server names.
    let mut chains = Vec::new();
    let mut any_tls = false;
    let mut seen: Vec<(Vec<String>, bool)> = Vec::new();
    for server in &l.servers {
        let names = server.sni_names();
        let filters = if server.serves_http() {
            http()
        } else {
            connection()
        };
        let terminate = server.terminates_tls();
        any_tls |= terminate || server.passes_tls_through();
        // Chains differ by their match: TLS chains by server names, while every plain server
        // shares the one chain without a match (the first one stands).
        let tls = terminate || server.passes_tls_through();
        let key = (if tls { names.clone() } else { Vec::new() }, tls);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let mut chain = json!({"filters": filters});
        if terminate {
            let Some(tls) = &server.tls else { continue };
            let files =
                crate::credentials::server_files(tls, opts.credentials).map_err(|source| {
                    ConfigError::GatewayTls {
                        port: l.port,
                        source,
                    }
                })?;
            let certificates: Vec<_> = files
                .keys
                .iter()
                .map(|k| {
                    json!({
                        "certificate_chain": {"filename": k.cert},
                        "private_key": {"filename": k.key},
                    })
                })
                .collect();
            let mut common = json!({
                "tls_certificates": certificates,
                "alpn_protocols": if server.serves_http() { json!(["h2", "http/1.1"]) } else { json!([]) },
            });
            if tls.mode.verifies_clients() {
                if let Some(ca) = &files.client_ca {
                    common["validation_context"] = client_validation(ca, tls);
                }
            }
            let mut params = json!({});
            let envoy_version = |v: TlsVersion| match v {
                TlsVersion::Tls12 => "TLSv1_2",
                TlsVersion::Tls13 => "TLSv1_3",
            };
            if let Some(v) = tls.min_protocol_version {
                params["tls_minimum_protocol_version"] = json!(envoy_version(v));
            }
            if let Some(v) = tls.max_protocol_version {
                params["tls_maximum_protocol_version"] = json!(envoy_version(v));
            }
            if !tls.cipher_suites.is_empty() {
                params["cipher_suites"] = json!(tls.cipher_suites);
            }
            if params != json!({}) {
                common["tls_params"] = params;
            }
            chain["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": tls.mode == ServerTlsMode::Mutual,
                    "common_tls_context": common,
                },
            });
        }
        if !names.is_empty() && (terminate || server.passes_tls_through()) {
            chain["filter_chain_match"] = json!({"server_names": names});
        } else if terminate || server.passes_tls_through() {
            chain["filter_chain_match"] = json!({"transport_protocol": "tls"});
        }
        chains.push(chain);
    }
    if chains.is_empty() {
        chains.push(json!({"filters": if l4.is_some() { connection() } else { http() }}));
    }
    let mut out = json!({
        "name": name,
        "address": socket(bind),
        "filter_chains": chains,
    });
    if any_tls || l4.is_some_and(|t| t.routes_on_sni()) {
        out["listener_filters"] = tls_inspector();
    }
    Ok(out)
}

/// The address for server (or service) port `port`: the `--listen PORT=ADDR:PORT` given for
/// it, else 127.0.0.1 on the port itself.
fn server_bind(binds: &[Bind], port: u16) -> Bind {
    binds
        .iter()
        .find(|b| b.server_port == Some(port))
        .cloned()
        .unwrap_or_else(|| Bind {
            server_port: Some(port),
            address: "127.0.0.1".into(),
            port,
        })
}

/// Reads the ClientHello's SNI (and ALPN) before the filter chain runs.
fn tls_inspector() -> Value {
    json!([{
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
    }])
}

/// The filter deciding each connection of listener port `port`, then `tcp_proxy` carrying it
/// where the filter's filter state says.
fn connection_filters(
    name: &str,
    port: u16,
    rules: &str,
    wasm: &str,
    opts: &Options<'_>,
) -> Vec<Value> {
    vec![
        json!({
            "name": "envoy.filters.network.wasm",
            "typed_config": network_wasm_filter(rules, wasm, opts.failure_policy.as_envoy(), port),
        }),
        json!({
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name,
                "cluster": BLACKHOLE_CLUSTER,
                "access_log": access_log(opts.access_log_encoding),
            },
        }),
    ]
}

/// The HTTP connection manager with the filter, for one listener.
fn http_connection_manager(
    doc_kind: ProxyKind,
    name: &str,
    server_port: u16,
    rules: &str,
    wasm: &str,
    opts: &Options<'_>,
) -> Value {
    let mut request_mutations: Vec<Value> = CONTROL_HEADERS
        .iter()
        .map(|h| json!({"remove": h}))
        .collect();
    request_mutations.push(json!({
        "append": {
            "header": {"key": LISTENER_PORT_HEADER, "value": server_port.to_string()},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    }));
    json!({
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    // Istio names gateways `istio-envoy` in the server header (sidecars keep
                    // Envoy's default, `envoy`).
                    "server_name": if doc_kind == ProxyKind::Gateway { "istio-envoy" } else { "envoy" },
                    "codec_type": "AUTO",
                    // Gateways are the mesh's edge: Istio has Envoy take the client from
                    // the connection and append it to x-forwarded-for; sidecars trust it.
                    "use_remote_address": doc_kind == ProxyKind::Gateway,
                    "normalize_path": true,
                    "access_log": access_log(opts.access_log_encoding),
                    "route_config": {
                        "name": "meshroute",
                        "virtual_hosts": [{
                            "name": "meshroute",
                            "domains": ["*"],
                            // As Istio's virtual hosts: upstreams see x-envoy-attempt-count.
                            "include_request_attempt_count": true,
                            "routes": [{
                                "match": {"prefix": "/"},
                                // Istio disables the route timeout by default; the filter sets
                                // x-envoy-upstream-rq-timeout-ms when a VirtualService asks.
                                "route": {"cluster_header": CLUSTER_HEADER, "timeout": "0s"},
                                "request_headers_to_remove": [CLUSTER_HEADER],
                            }],
                        }],
                    },
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.header_mutation",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                                "mutations": {"request_mutations": request_mutations},
                            },
                        },
                        {
                            "name": "envoy.filters.http.wasm",
                            "typed_config": wasm_filter(rules, wasm, opts.failure_policy.as_envoy()),
                        },
                        {
                            "name": "envoy.filters.http.dynamic_forward_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                                "dns_cache_config": dns_cache(),
                            },
                        },
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        },
                    ],
                },
    })
}

/// Istio's circuit-breaker defaults are "unlimited" (2^32-1), not Envoy's 1024.
fn limit(n: u32) -> u64 {
    if n == 0 {
        u64::from(u32::MAX)
    } else {
        u64::from(n)
    }
}

fn cluster(c: &Cluster, credentials: Option<&Path>) -> Result<Value, ConfigError> {
    let pool = &c.connection_pool;
    let mut out = json!({
        "name": c.name,
        "connect_timeout": format!("{}s", c.connect_timeout_ms as f64 / 1000.0),
        "circuit_breakers": {"thresholds": [{
            "max_connections": limit(pool.max_connections),
            "max_pending_requests": limit(pool.http1_max_pending_requests),
            "max_requests": limit(pool.http2_max_requests),
            "max_retries": limit(pool.max_retries),
        }]},
    });
    match c.discovery {
        Discovery::Dns => {
            out["type"] = json!("STRICT_DNS");
            out["dns_lookup_family"] = json!("V4_PREFERRED");
            out["lb_policy"] = json!("ROUND_ROBIN");
            out["load_assignment"] = json!({
                "cluster_name": c.name,
                "endpoints": [{"lb_endpoints": c.endpoints.iter().map(|e| json!({
                    "endpoint": {"address": {"socket_address": {"address": e.address, "port_value": e.port}}},
                    "load_balancing_weight": e.weight.max(1),
                })).collect::<Vec<_>>()}],
            });
        }
        Discovery::Static | Discovery::OriginalDst => {
            out["type"] = json!("ORIGINAL_DST");
            out["lb_policy"] = json!("CLUSTER_PROVIDED");
            out["original_dst_lb_config"] = json!({"use_http_header": true});
        }
    }
    if let Some(k) = &pool.tcp_keepalive {
        let mut keepalive = json!({});
        if let Some(p) = k.probes {
            keepalive["keepalive_probes"] = json!(p);
        }
        if let Some(t) = k.time_s {
            keepalive["keepalive_time"] = json!(t);
        }
        if let Some(i) = k.interval_s {
            keepalive["keepalive_interval"] = json!(i);
        }
        out["upstream_connection_options"] = json!({"tcp_keepalive": keepalive});
    }
    let mut common = json!({"idle_timeout": format!("{}s", pool.idle_timeout_ms.unwrap_or(3_600_000) as f64 / 1000.0)});
    if pool.max_requests_per_connection > 0 {
        common["max_requests_per_connection"] = json!(pool.max_requests_per_connection);
    }
    if let Some(d) = pool.max_connection_duration_ms {
        common["max_connection_duration"] = json!(format!("{}s", d as f64 / 1000.0));
    }
    let h2 = c.upstream_h2();
    let explicit = if h2 {
        json!({"http2_protocol_options": pool.max_concurrent_streams.map_or(json!({}), |n| json!({"max_concurrent_streams": n}))})
    } else {
        json!({"http_protocol_options": {}})
    };
    out["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": common,
            "explicit_http_config": explicit,
            "http_filters": upstream_filters(),
        }
    });
    if let Some(tls) = &c.tls {
        out["transport_socket"] =
            upstream_tls(tls, credentials).map_err(|source| ConfigError::ClusterTls {
                cluster: c.name.clone(),
                source,
            })?;
        if tls.sni.is_none() {
            // Istio: without `sni`, the SNI is the request's Host, and without
            // `subjectAltNames` either, the certificate must be for that name.
            let verifies = !tls.insecure_skip_verify && tls.subject_alt_names.is_empty();
            out["typed_extension_protocol_options"]
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                ["upstream_http_protocol_options"] =
                json!({"auto_sni": true, "auto_san_validation": verifies});
        }
    }
    Ok(out)
}

/// DestinationRule `tls` (SIMPLE, MUTUAL): originate TLS, verify the server against the CA
/// (the system's when none is given) and the `subjectAltNames`, present a client certificate
/// for MUTUAL.
fn upstream_tls(tls: &ClientTls, credentials: Option<&Path>) -> Result<Value, CredentialError> {
    let files = crate::credentials::client_files(tls, credentials)?;
    let mut common = json!({});
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        common["tls_certificates"] =
            json!([{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]);
    }
    if !tls.insecure_skip_verify {
        let ca = files
            .ca
            .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CA_BUNDLE));
        let mut validation = json!({"trusted_ca": {"filename": ca}});
        if !tls.subject_alt_names.is_empty() {
            validation["match_typed_subject_alt_names"] = san_matchers(&tls.subject_alt_names);
        }
        if let Some(crl) = &tls.ca_crl {
            validation["crl"] = json!({"filename": crl});
        }
        common["validation_context"] = validation;
    }
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    });
    if let Some(sni) = &tls.sni {
        ctx["sni"] = json!(sni);
    }
    Ok(json!({"name": "envoy.transport_sockets.tls", "typed_config": ctx}))
}

/// Where Debian-family systems keep the trusted roots (Istio's default for SIMPLE without
/// `caCertificates`).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Upstream HTTP filters: once the load balancer has read the endpoint header, it goes, so
/// upstreams never see how the proxy was steered.
fn upstream_filters() -> Value {
    json!([
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"remove": ENDPOINT_HEADER}]},
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
            },
        },
    ])
}

/// A MUTUAL server's `CertificateValidationContext`, as istiod writes it: the CA, then the
/// `subjectAltNames` (exact, for each name type Envoy matches), pins and CRL.
/// Istio's `subjectAltNames` as Envoy matchers: each name matches exactly as a DNS, URI
/// (`spiffe://…`) or email name, and as an IP address where it is one.
fn san_matchers(names: &[String]) -> Value {
    names
        .iter()
        .flat_map(|san| {
            let ip = san.parse::<std::net::IpAddr>().is_ok();
            ["DNS", "URI", "EMAIL", "IP_ADDRESS"]
                .into_iter()
                .filter(move |t| *t != "IP_ADDRESS" || ip)
                .map(move |t| json!({"san_type": t, "matcher": {"exact": san}}))
        })
        .collect()
}

fn client_validation(ca: &Path, tls: &ServerTls) -> Value {
    let mut context = json!({"trusted_ca": {"filename": ca}});
    if !tls.subject_alt_names.is_empty() {
        context["match_typed_subject_alt_names"] = san_matchers(&tls.subject_alt_names);
    }
    if !tls.verify_certificate_spki.is_empty() {
        context["verify_certificate_spki"] = json!(tls.verify_certificate_spki);
    }
    if !tls.verify_certificate_hash.is_empty() {
        context["verify_certificate_hash"] = json!(tls.verify_certificate_hash);
    }
    if let Some(crl) = &tls.ca_crl {
        context["crl"] = json!({"filename": crl});
    }
    context
}

#[cfg(test)]
mod access_log_tests {
    use super::*;

    #[test]
    fn envoys_json_access_log_has_the_keys_meshroute_run_writes() {
        let ours: serde_json::Map<String, Value> =
            serde_json::from_str(&crate::runtime::access_log::Entry::new().json())
                .unwrap_or_default();
        let mut ours: Vec<&str> = ours.keys().map(String::as_str).collect();
        let mut envoys: Vec<&str> = ISTIO_JSON_FIELDS.iter().map(|(k, _)| *k).collect();
        ours.sort_unstable();
        envoys.sort_unstable();
        assert_eq!(ours, envoys);
        let log = access_log(Encoding::Json);
        assert!(
            log[0]["typed_config"]["log_format"]["json_format"]["bytes_sent"] == "%BYTES_SENT%"
        );
    }
}
