//! The host contract: how the filter tells its host what to do with a request, and how the
//! host's router answers when it cannot. Envoy implements it natively; `meshroute run`
//! implements it by calling [`decode`] on what the filter left in the request headers.
//!
//! Every name the two sides must agree on is defined here and nowhere else.

/// Header through which the filter names the upstream cluster (`cluster_header` route).
pub const CLUSTER_HEADER: &str = "x-meshroute-cluster";
/// Header through which the filter names the exact endpoint (Envoy ORIGINAL_DST clusters).
pub const ENDPOINT_HEADER: &str = "x-envoy-original-dst-host";
/// Port a request arrived on, set by the host's first (trusted) header stage: the Gateway
/// server port, the service port a transparent sidecar captured, or [`EXPLICIT_PROXY_PORT`]
/// for a sidecar used as an explicit HTTP proxy. Without it (inside Istio) the filter takes
/// the connection's destination port.
pub const LISTENER_PORT_HEADER: &str = "x-meshroute-listener-port";
/// [`LISTENER_PORT_HEADER`] value of a sidecar used as an explicit HTTP proxy: the service
/// port is the authority's.
pub const EXPLICIT_PROXY_PORT: u16 = 0;

/// Node metadata key that turns on Istio's standard metrics in the filter (`"true"`). A
/// proxy with Istio's own stats filter (inside Istio) or with metrics of its own
/// (`meshroute run`) leaves it unset, so no request is counted twice.
pub const ISTIO_METRICS_NODE_KEY: &str = "MESHROUTE_ISTIO_METRICS";

/// Whole-request timeout (ms) the host's router enforces.
pub const TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";
/// Timeout (ms) of each try.
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
/// Retries after the first try.
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// Envoy retry conditions, comma separated.
pub const RETRY_ON_HEADER: &str = "x-envoy-retry-on";
pub const RETRY_GRPC_ON_HEADER: &str = "x-envoy-retry-grpc-on";
/// The retry conditions that go in [`RETRY_GRPC_ON_HEADER`] (Envoy's `x-envoy-retry-grpc-on`).
pub const GRPC_RETRY_ON: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];
/// Status codes `retriable-status-codes` retries, comma separated.
pub const RETRIABLE_STATUS_CODES_HEADER: &str = "x-envoy-retriable-status-codes";
/// What the upstream is told of the time it has (Envoy sets it on every forwarded request).
pub const EXPECTED_TIMEOUT_HEADER: &str = "x-envoy-expected-rq-timeout-ms";
/// Number of the try, 1-based (Istio turns on `include_request_attempt_count`).
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";
/// The path before a rewrite.
pub const ORIGINAL_PATH_HEADER: &str = "x-envoy-original-path";
/// Marks side calls and other requests the proxy makes itself.
pub const INTERNAL_HEADER: &str = "x-envoy-internal";
/// Set on circuit-breaker rejections.
pub const OVERLOADED_HEADER: &str = "x-envoy-overloaded";
/// Time (ms) the upstream took, on responses.
pub const UPSTREAM_SERVICE_TIME_HEADER: &str = "x-envoy-upstream-service-time";

/// Headers that only the filter may set. Hosts strip client copies before the filter runs.
pub const CONTROL_HEADERS: &[&str] = &[
    CLUSTER_HEADER,
    ENDPOINT_HEADER,
    LISTENER_PORT_HEADER,
    TIMEOUT_HEADER,
    PER_TRY_TIMEOUT_HEADER,
    MAX_RETRIES_HEADER,
    RETRY_ON_HEADER,
    RETRY_GRPC_ON_HEADER,
    RETRIABLE_STATUS_CODES_HEADER,
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-fault-abort-request",
    "x-envoy-fault-abort-grpc-request",
    "x-envoy-fault-abort-request-percentage",
    "x-envoy-fault-delay-request",
    "x-envoy-fault-delay-request-percentage",
    "x-envoy-fault-throughput-response",
    "x-envoy-fault-throughput-response-percentage",
    "x-envoy-upstream-alt-stat-name",
];

/// Whether `name` (lower case) is one of [`CONTROL_HEADERS`].
pub fn is_control_header(name: &str) -> bool {
    CONTROL_HEADERS.contains(&name)
}

/// Cluster for ALLOW_ANY traffic to hosts outside the registry.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Cluster of traffic nothing routes (REGISTRY_ONLY, a TCP proxy's placeholder).
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's name of the catch-all route (and virtual host) of an `ALLOW_ANY` sidecar.
pub const ALLOW_ANY_ROUTE: &str = "allow_any";
/// Istio's name of the catch-all route (and virtual host) of a `REGISTRY_ONLY` sidecar.
pub const BLOCK_ALL_ROUTE: &str = "block_all";
/// Istio's name of a route no VirtualService made: a service's default outbound route and
/// the route of an inbound (server side) HTTP listener.
pub const DEFAULT_ROUTE: &str = "default";
/// Property (Envoy: filter state `wasm.meshroute_route_name`) in which the filter leaves the
/// name of the route that decided, as Istio names it, for the access log's `ROUTE_NAME`.
pub const ROUTE_NAME_PROPERTY: &str = "meshroute_route_name";

/// Root id of the HTTP filter.
pub const HTTP_ROOT_ID: &str = "meshroute";
/// Prefix of [`l4_root_id`].
pub const L4_ROOT_PREFIX: &str = "meshroute_tcp_";

/// Root id of the filter's connection-level (network filter) plugin for listener `port`:
/// the root id tells the module which kind of context to create, the port selects the
/// connection table, whatever port the host actually listens on.
pub fn l4_root_id(port: u16) -> String {
    format!("{L4_ROOT_PREFIX}{port}")
}

/// The listener port a root id names, when it is a connection-level plugin's.
pub fn l4_root_port(root_id: &str) -> Option<Result<u16, ()>> {
    root_id
        .strip_prefix(L4_ROOT_PREFIX)
        .map(|p| p.parse().map_err(|_| ()))
}

/// Envoy's well-known filter state a network filter names the TCP proxy's cluster with.
pub const TCP_CLUSTER_STATE: &str = "envoy.tcp_proxy.cluster";
/// Filter state an ORIGINAL_DST cluster connects to (`ip:port`).
pub const TCP_ENDPOINT_STATE: &str = "envoy.network.transport_socket.original_dst_address";
/// Filter state with the TCP proxy's idle timeout for this connection (ms).
pub const TCP_IDLE_TIMEOUT_STATE: &str = "envoy.tcp_proxy.per_connection_idle_timeout_ms";

/// The host function (Envoy's foreign function) a network filter sets filter state with.
pub const SET_FILTER_STATE_FUNCTION: &str = "set_envoy_filter_state";

/// `SetEnvoyFilterStateArguments { path = 1; value = 2; }` in protobuf wire form; the life
/// span (field 3) stays at its default, the filter chain, which is the connection here.
pub fn filter_state_arguments(path: &str, value: &str) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut n = bytes.len();
        loop {
            let low = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(low);
                break;
            }
            out.push(low | 0x80);
        }
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(path.len() + value.len() + 6);
    field(&mut out, 0x0a, path.as_bytes());
    field(&mut out, 0x12, value.as_bytes());
    out
}

/// Envoy's default retry back-off base (ms); the ceiling is [`BACKOFF_MAX_FACTOR`] × base.
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 25;
pub const BACKOFF_MAX_FACTOR: u64 = 10;

/// Envoy response flags, with their access-log code and the bit `response.flags` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    FailedLocalHealthCheck,
    NoHealthyUpstream,
    UpstreamRequestTimeout,
    LocalReset,
    UpstreamRemoteReset,
    UpstreamConnectionFailure,
    UpstreamConnectionTermination,
    UpstreamOverflow,
    NoRouteFound,
    DelayInjected,
    FaultInjected,
    RateLimited,
    NoClusterFound,
}

impl ResponseFlag {
    pub const ALL: [Self; 13] = [
        Self::FailedLocalHealthCheck,
        Self::NoHealthyUpstream,
        Self::UpstreamRequestTimeout,
        Self::LocalReset,
        Self::UpstreamRemoteReset,
        Self::UpstreamConnectionFailure,
        Self::UpstreamConnectionTermination,
        Self::UpstreamOverflow,
        Self::NoRouteFound,
        Self::DelayInjected,
        Self::FaultInjected,
        Self::RateLimited,
        Self::NoClusterFound,
    ];

    /// The short code of Envoy's access log (`%RESPONSE_FLAGS%`).
    pub fn code(self) -> &'static str {
        match self {
            Self::FailedLocalHealthCheck => "LH",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamRequestTimeout => "UT",
            Self::LocalReset => "LR",
            Self::UpstreamRemoteReset => "UR",
            Self::UpstreamConnectionFailure => "UF",
            Self::UpstreamConnectionTermination => "UC",
            Self::UpstreamOverflow => "UO",
            Self::NoRouteFound => "NR",
            Self::DelayInjected => "DI",
            Self::FaultInjected => "FI",
            Self::RateLimited => "RL",
            Self::NoClusterFound => "NC",
        }
    }

    /// Envoy's legacy bit for the flag, as the `response.flags` property encodes it.
    pub fn bit(self) -> u64 {
        match self {
            Self::FailedLocalHealthCheck => 0x1,
            Self::NoHealthyUpstream => 0x2,
            Self::UpstreamRequestTimeout => 0x4,
            Self::LocalReset => 0x8,
            Self::UpstreamRemoteReset => 0x10,
            Self::UpstreamConnectionFailure => 0x20,
            Self::UpstreamConnectionTermination => 0x40,
            Self::UpstreamOverflow => 0x80,
            Self::NoRouteFound => 0x100,
            Self::DelayInjected => 0x200,
            Self::FaultInjected => 0x400,
            Self::RateLimited => 0x800,
            Self::NoClusterFound => 0x100_0000,
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.code() == code)
    }

    /// The flags set in a `response.flags` value.
    pub fn from_bits(bits: u64) -> impl Iterator<Item = Self> {
        Self::ALL.into_iter().filter(move |f| bits & f.bit() != 0)
    }
}

/// A reply Envoy's router makes itself while executing the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterReply {
    /// The named cluster does not exist (or none was named).
    NoCluster,
    /// The cluster has no endpoint to connect to.
    NoHealthyUpstream,
    /// The route (or per-try) timeout expired.
    Timeout,
    /// The connection to the endpoint failed.
    ConnectFailure,
    /// The endpoint refused the connection (nothing listens on its port).
    ConnectRefused,
    /// The connection to the endpoint was not made within the cluster's connect timeout
    /// (a connect failure to Envoy's retry conditions and response flags).
    ConnectTimeout,
    /// TLS origination failed because the endpoint's certificate did not verify.
    TlsVerifyFailure,
    /// TLS origination failed because the endpoint answered with something other than TLS
    /// (a plaintext server).
    TlsWrongVersion,
    /// TLS origination failed otherwise.
    TlsFailure,
    /// The connection or stream broke before the response started.
    Reset,
    /// A circuit breaker refused the request.
    Overflow,
}

impl RouterReply {
    const RESET_PREFIX: &'static str =
        "upstream connect error or disconnect/reset before headers. reset reason: ";

    pub fn status(self) -> u16 {
        match self {
            Self::Timeout => 504,
            _ => 503,
        }
    }

    /// Envoy's body for the reply (empty for NC).
    pub fn body(self) -> &'static str {
        match self {
            Self::NoCluster => "",
            Self::NoHealthyUpstream => "no healthy upstream",
            Self::Timeout => "upstream request timeout",
            Self::ConnectFailure | Self::ConnectRefused | Self::TlsWrongVersion => "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            Self::ConnectTimeout => "upstream connect error or disconnect/reset before headers. reset reason: connection timeout",
            Self::TlsVerifyFailure => "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: TLS_error: CERTIFICATE_VERIFY_FAILED",
            Self::TlsFailure => "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: TLS_error: handshake failure",
            Self::Reset => "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            Self::Overflow => "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        }
    }

    pub fn flag(self) -> ResponseFlag {
        match self {
            Self::NoCluster => ResponseFlag::NoClusterFound,
            Self::NoHealthyUpstream => ResponseFlag::NoHealthyUpstream,
            Self::Timeout => ResponseFlag::UpstreamRequestTimeout,
            Self::ConnectFailure
            | Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::TlsVerifyFailure
            | Self::TlsWrongVersion
            | Self::TlsFailure => ResponseFlag::UpstreamConnectionFailure,
            Self::Reset => ResponseFlag::UpstreamConnectionTermination,
            Self::Overflow => ResponseFlag::UpstreamOverflow,
        }
    }

    /// Envoy's `response.code_details` for the reply.
    pub fn details(self) -> &'static str {
        match self {
            Self::NoCluster => "cluster_not_found",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::Timeout => "response_timeout",
            Self::ConnectFailure => {
                "upstream_reset_before_response_started{remote_connection_failure}"
            }
            Self::ConnectRefused => "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
            Self::ConnectTimeout => "upstream_reset_before_response_started{connection_timeout}",
            Self::TlsWrongVersion => "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|268435703:SSL_routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end}",
            Self::TlsVerifyFailure => "upstream_reset_before_response_started{remote_connection_failure|TLS_error:CERTIFICATE_VERIFY_FAILED}",
            Self::TlsFailure => {
                "upstream_reset_before_response_started{remote_connection_failure|TLS_error}"
            }
            Self::Reset => "upstream_reset_before_response_started{connection_termination}",
            Self::Overflow => "upstream_reset_before_response_started{overflow}",
        }
    }

    /// Extra response headers of the reply.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Overflow => &[(OVERLOADED_HEADER, "true")],
            _ => &[],
        }
    }

    /// Which router reply a response is, from its status and body: side calls carry no
    /// response flags, so this is how their failures are told apart. Envoy's reset bodies
    /// name the reason after a fixed prefix; any connect failure counts as one.
    pub fn recognise(status: u16, body: &[u8]) -> Option<Self> {
        let body = std::str::from_utf8(body).ok()?;
        if status == 504 && body == Self::Timeout.body() {
            return Some(Self::Timeout);
        }
        if status != 503 {
            return None;
        }
        if body == Self::NoHealthyUpstream.body() {
            return Some(Self::NoHealthyUpstream);
        }
        let reason = body.strip_prefix(Self::RESET_PREFIX)?;
        Some(if reason.contains("CERTIFICATE_VERIFY_FAILED") {
            Self::TlsVerifyFailure
        } else if reason.contains("TLS_error") {
            Self::TlsFailure
        } else if reason.starts_with("connection timeout") {
            Self::ConnectTimeout
        } else if reason.contains("connection failure")
            || reason.contains("remote_connection_failure")
            || reason.contains("connect_error")
        {
            Self::ConnectFailure
        } else if reason == "overflow" {
            Self::Overflow
        } else {
            Self::Reset
        })
    }
}

/// What the filter asks of the host's router for one forwarded request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forward {
    pub cluster: String,
    /// `ip:port` to connect to; `None` leaves the choice to the host's balancer.
    pub endpoint: Option<String>,
    pub timeout_ms: Option<u64>,
    pub per_try_timeout_ms: Option<u64>,
    /// Retries the host's router runs (none when the filter runs them itself).
    pub retry: Option<RouterRetry>,
}

/// A retry policy handed to the host's router.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterRetry {
    pub num_retries: u32,
    pub retry_on: Vec<String>,
    pub retriable_status_codes: Vec<u16>,
}

/// The request headers that express `f`, for the filter to set.
pub fn encode(f: &Forward) -> Vec<(&'static str, String)> {
    let mut out = vec![(CLUSTER_HEADER, f.cluster.clone())];
    if let Some(e) = &f.endpoint {
        out.push((ENDPOINT_HEADER, e.clone()));
    }
    if let Some(t) = f.timeout_ms {
        out.push((TIMEOUT_HEADER, t.to_string()));
    }
    if let Some(t) = f.per_try_timeout_ms {
        out.push((PER_TRY_TIMEOUT_HEADER, t.to_string()));
    }
    if let Some(r) = &f.retry {
        out.push((MAX_RETRIES_HEADER, r.num_retries.to_string()));
        // Envoy's router reads gRPC conditions from their own header only.
        let (grpc, http): (Vec<&str>, Vec<&str>) = r
            .retry_on
            .iter()
            .map(String::as_str)
            .partition(|c| GRPC_RETRY_ON.contains(c));
        if !http.is_empty() || grpc.is_empty() {
            out.push((RETRY_ON_HEADER, http.join(",")));
        }
        if !grpc.is_empty() {
            out.push((RETRY_GRPC_ON_HEADER, grpc.join(",")));
        }
        if !r.retriable_status_codes.is_empty() {
            let codes: Vec<String> = r
                .retriable_status_codes
                .iter()
                .map(u16::to_string)
                .collect();
            out.push((RETRIABLE_STATUS_CODES_HEADER, codes.join(",")));
        }
    }
    out
}

/// Reads (and removes) what the filter asked for from the request headers, as Envoy's
/// router does: `x-envoy-retry-on` without `x-envoy-max-retries` means one retry, a zero
/// timeout means none. Every other control header is removed too, so upstreams never see
/// how the proxy was steered. Without a cluster header the router has nowhere to go.
pub fn decode(headers: &mut Vec<(String, String)>) -> Result<Forward, RouterReply> {
    let mut take = |name: &str| -> Option<String> {
        let i = headers.iter().position(|(k, _)| k == name)?;
        let value = headers.remove(i).1;
        headers.retain(|(k, _)| k != name);
        Some(value)
    };
    let cluster = take(CLUSTER_HEADER);
    let endpoint = take(ENDPOINT_HEADER);
    let mut millis = |name: &str| {
        take(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| *t > 0)
    };
    let timeout_ms = millis(TIMEOUT_HEADER);
    let per_try_timeout_ms = millis(PER_TRY_TIMEOUT_HEADER);
    let retry_on = match (take(RETRY_ON_HEADER), take(RETRY_GRPC_ON_HEADER)) {
        (None, None) => None,
        (http, grpc) => Some(format!(
            "{},{}",
            http.unwrap_or_default(),
            grpc.unwrap_or_default()
        )),
    };
    let max_retries = take(MAX_RETRIES_HEADER).and_then(|v| v.trim().parse::<u32>().ok());
    let codes = take(RETRIABLE_STATUS_CODES_HEADER);
    headers.retain(|(k, _)| !is_control_header(k));
    let retry = retry_on.map(|on| RouterRetry {
        num_retries: max_retries.unwrap_or(1),
        retry_on: on
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
        retriable_status_codes: codes
            .unwrap_or_default()
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect(),
    });
    Ok(Forward {
        cluster: cluster.ok_or(RouterReply::NoCluster)?,
        endpoint,
        timeout_ms,
        per_try_timeout_ms,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    fn owned(pairs: Vec<(&'static str, String)>) -> Vec<(String, String)> {
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn decode_reads_back_what_encode_wrote() {
        let cases = [
            Forward {
                cluster: "outbound|80||a.default.svc.cluster.local".into(),
                ..Forward::default()
            },
            Forward {
                cluster: "outbound|9080|v2|reviews.default.svc.cluster.local".into(),
                endpoint: Some("10.0.0.7:9080".into()),
                timeout_ms: Some(1500),
                per_try_timeout_ms: Some(200),
                retry: Some(RouterRetry {
                    num_retries: 3,
                    retry_on: vec!["5xx".into(), "retriable-status-codes".into()],
                    retriable_status_codes: vec![418, 503],
                }),
            },
            Forward {
                cluster: PASSTHROUGH_CLUSTER.into(),
                endpoint: Some("[::1]:8080".into()),
                retry: Some(RouterRetry {
                    num_retries: 0,
                    retry_on: vec!["connect-failure".into()],
                    retriable_status_codes: vec![],
                }),
                ..Forward::default()
            },
        ];
        for f in cases {
            let mut headers = owned(encode(&f));
            headers.push(("x-other".into(), "kept".into()));
            assert_eq!(decode(&mut headers), Ok(f.clone()), "{f:?}");
            assert_eq!(headers, vec![("x-other".to_string(), "kept".to_string())]);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn grpc_conditions_travel_in_their_own_header() {
        let f = Forward {
            cluster: "c".into(),
            retry: Some(RouterRetry {
                num_retries: 2,
                retry_on: [
                    "connect-failure",
                    "unavailable",
                    "cancelled",
                    "retriable-status-codes",
                ]
                .map(String::from)
                .to_vec(),
                retriable_status_codes: vec![],
            }),
            ..Forward::default()
        };
        let mut headers = owned(encode(&f));
        let value = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            value(RETRY_ON_HEADER).as_deref(),
            Some("connect-failure,retriable-status-codes")
        );
        assert_eq!(
            value(RETRY_GRPC_ON_HEADER).as_deref(),
            Some("unavailable,cancelled")
        );
        let back = decode(&mut headers).unwrap_or_default();
        let mut on = back.retry.map(|r| r.retry_on).unwrap_or_default();
        on.sort();
        assert_eq!(
            on,
            [
                "cancelled",
                "connect-failure",
                "retriable-status-codes",
                "unavailable"
            ]
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn decode_follows_envoys_router_defaults() {
        let mut headers = owned(vec![
            (CLUSTER_HEADER, "c".into()),
            (RETRY_ON_HEADER, "5xx".into()),
            (TIMEOUT_HEADER, "0".into()),
            ("x-envoy-hedge-on-per-try-timeout", "true".into()),
        ]);
        let f = decode(&mut headers).unwrap_or_default();
        assert_eq!(f.retry.map(|r| r.num_retries), Some(1));
        assert_eq!(f.timeout_ms, None, "0 disables the timeout");
        assert!(headers.is_empty(), "router headers never go upstream");
        assert_eq!(decode(&mut Vec::new()), Err(RouterReply::NoCluster));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn router_replies_are_recognised_by_their_bodies() {
        // A refused connection and a plaintext endpoint read as any connect failure (Envoy's
        // body does not tell them apart; its access log does).
        for r in [RouterReply::ConnectRefused, RouterReply::TlsWrongVersion] {
            assert_eq!(
                RouterReply::recognise(r.status(), r.body().as_bytes()),
                Some(RouterReply::ConnectFailure)
            );
        }
        for r in [
            RouterReply::NoHealthyUpstream,
            RouterReply::Timeout,
            RouterReply::ConnectFailure,
            RouterReply::ConnectTimeout,
            RouterReply::TlsVerifyFailure,
            RouterReply::TlsFailure,
            RouterReply::Reset,
            RouterReply::Overflow,
        ] {
            assert_eq!(
                RouterReply::recognise(r.status(), r.body().as_bytes()),
                Some(r)
            );
        }
        // Envoy's own wording of a refused connection.
        let envoy = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";
        assert_eq!(
            RouterReply::recognise(503, envoy),
            Some(RouterReply::ConnectFailure)
        );
        assert_eq!(RouterReply::recognise(503, b"from the app"), None);
        assert_eq!(
            RouterReply::recognise(200, b"upstream request timeout"),
            None
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn filter_state_arguments_are_protobuf_strings() {
        assert_eq!(
            filter_state_arguments("a", "bc"),
            [0x0a, 1, b'a', 0x12, 2, b'b', b'c']
        );
        let long = "x".repeat(200);
        let out = filter_state_arguments(&long, "");
        // 200 = 0xc8 → varint c8 01
        assert_eq!(&out[..3], &[0x0a, 0xc8, 0x01]);
        assert_eq!(out.len(), 3 + 200 + 2);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn response_flags_have_distinct_codes_and_bits() {
        for a in ResponseFlag::ALL {
            assert_eq!(ResponseFlag::from_code(a.code()), Some(a));
            assert_eq!(ResponseFlag::from_bits(a.bit()).collect::<Vec<_>>(), [a]);
        }
        let both = ResponseFlag::UpstreamConnectionFailure.bit() | ResponseFlag::NoRouteFound.bit();
        assert_eq!(ResponseFlag::from_bits(both).count(), 2);
        assert_eq!(l4_root_port(&l4_root_id(31400)), Some(Ok(31400)));
        assert_eq!(l4_root_port("meshroute_tcp_x"), Some(Err(())));
        assert_eq!(l4_root_port(HTTP_ROOT_ID), None);
    }
}
