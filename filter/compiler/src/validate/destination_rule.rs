//! DestinationRule: host, subsets and traffic policies.

use std::collections::BTreeSet;

use super::V;
use crate::api;
use crate::diag::Diagnostic;
use crate::hosts;
use crate::load::Resource;
use crate::source::FieldPath;

pub(super) fn destination_rule(r: &Resource<api::DestinationRule>, out: &mut Vec<Diagnostic>) {
    let mut v = V::new(r, out);
    let dr = &r.spec;
    let spec = FieldPath::root().key("spec");
    if dr.host.is_empty() {
        v.err(
            &spec.key("host"),
            "host is required: empty domain name not allowed",
        );
    } else if let Err(e) = hosts::validate_wildcard_domain(&dr.host) {
        v.err(&spec.key("host"), e);
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(&mut v, &spec.key("trafficPolicy"), tp, true);
    }
    let mut names = BTreeSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let sp = spec.key("subsets").idx(i);
        if s.name.is_empty() {
            v.err(&sp.key("name"), "subset name cannot be empty");
        } else if !hosts::is_dns1123_label(&s.name) {
            v.err(
                &sp.key("name"),
                format!(
                    "subset name {:?} is invalid: must be a DNS-1123 label",
                    s.name
                ),
            );
        } else if !names.insert(s.name.as_str()) {
            v.err(
                &sp.key("name"),
                format!("duplicate subset names: {}", s.name),
            );
        }
        v.labels(&sp.key("labels"), &s.labels);
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(&mut v, &sp.key("trafficPolicy"), tp, true);
        }
    }
    v.export_to(&spec.key("exportTo"), &dr.export_to, false);
    if let Some(ws) = &dr.workload_selector {
        v.labels(
            &spec.key("workloadSelector").key("matchLabels"),
            &ws.match_labels,
        );
        if dr.export_to.iter().any(|e| e != ".") {
            v.err(&spec.key("exportTo"), "destination rule with workloadSelector can only be exported to its own namespace (\".\")");
        }
    }
}

pub(super) fn traffic_policy(
    v: &mut V<'_>,
    p: &FieldPath,
    tp: &api::TrafficPolicy,
    allow_ports: bool,
) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        v.err(p, "traffic policy must have at least one field");
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        v.err(p, "tunnel and proxyProtocol must not be set together");
    }
    if let Some(t) = &tp.tunnel {
        tunnel(v, &p.key("tunnel"), t);
    }
    if let Some(pp) = &tp.proxy_protocol {
        let pp_path = p.key("proxyProtocol");
        match pp.version.as_deref() {
            None | Some("V1" | "V2") => {}
            Some(other) => v.err(
                &pp_path.key("version"),
                format!("proxy protocol version is invalid: {other:?} (V1 or V2)"),
            ),
        }
        v.warn(&pp_path, "proxyProtocol has no effect in meshroute: upstream connections carry no PROXY protocol header, so an upstream that requires one will refuse them");
    }
    if let Some(b) = &tp.retry_budget {
        let b_path = p.key("retryBudget");
        if let Some(pc) = b.percent.filter(|pc| !(0.0..=100.0).contains(pc)) {
            v.err(
                &b_path.key("percent"),
                format!("percentage {pc} is not in range 0..100"),
            );
        }
        v.warn(&b_path, "retryBudget has no effect in meshroute: retries are limited by the route's retry policy and connectionPool.http.maxRetries only");
    }
    policy_blocks(
        v,
        p,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    if !allow_ports && !tp.port_level_settings.is_empty() {
        v.err(
            &p.key("portLevelSettings"),
            "portLevelSettings are not allowed here",
        );
    }
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = p.key("portLevelSettings").idx(i);
        match pl.port.as_ref().and_then(|p| p.number) {
            None => v.err(&pp.key("port"), "portTrafficPolicy must have valid port"),
            Some(n) => {
                v.port_number(&pp.key("port").key("number"), Some(n), true);
                if !ports.insert(n) {
                    v.err(
                        &pp.key("port"),
                        format!("port {n} is specified more than once in portLevelSettings"),
                    );
                }
            }
        }
        policy_blocks(
            v,
            &pp,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
}

pub(super) fn policy_blocks(
    v: &mut V<'_>,
    p: &FieldPath,
    lb: Option<&api::LoadBalancerSettings>,
    cp: Option<&api::ConnectionPoolSettings>,
    od: Option<&api::OutlierDetection>,
    tls: Option<&api::ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        load_balancer(v, &p.key("loadBalancer"), lb);
    }
    if let Some(cp) = cp {
        connection_pool(v, &p.key("connectionPool"), cp);
    }
    if let Some(od) = od {
        outlier(v, &p.key("outlierDetection"), od);
    }
    if let Some(t) = tls {
        client_tls(v, &p.key("tls"), t);
    }
    unapplied(v, p, lb, cp);
}

/// Upstream settings istiod would apply that meshroute does not (or only in the Envoy
/// bootstrap it generates): each is said, not dropped in silence.
fn unapplied(
    v: &mut V<'_>,
    p: &FieldPath,
    lb: Option<&api::LoadBalancerSettings>,
    cp: Option<&api::ConnectionPoolSettings>,
) {
    if let Some(lb) = lb {
        for (set, field) in [
            (lb.warmup.is_some(), "warmup"),
            (lb.warmup_duration_secs.is_some(), "warmupDurationSecs"),
        ] {
            if set {
                v.warn(
                    &p.key("loadBalancer").key(field),
                    format!("{field} has no effect in meshroute: a new endpoint gets its full share of requests at once (no slow start)"),
                );
            }
        }
    }
    let Some(cp) = cp else { return };
    if let Some(h) = &cp.http {
        let hp = p.key("connectionPool").key("http");
        if h.use_client_protocol == Some(true) {
            v.warn(
                &hp.key("useClientProtocol"),
                "useClientProtocol has no effect in meshroute: the upstream protocol follows the port's protocol and h2UpgradePolicy",
            );
        }
    }
}

pub(super) fn load_balancer(v: &mut V<'_>, p: &FieldPath, lb: &api::LoadBalancerSettings) {
    if let Some(s) = &lb.simple {
        if !matches!(
            s.as_str(),
            "UNSPECIFIED"
                | "LEAST_CONN"
                | "RANDOM"
                | "PASSTHROUGH"
                | "ROUND_ROBIN"
                | "LEAST_REQUEST"
        ) {
            v.err(&p.key("simple"), format!("unknown load balancer {s:?}: expected LEAST_REQUEST, ROUND_ROBIN, RANDOM or PASSTHROUGH"));
        } else if s == "LEAST_CONN" {
            v.warn(
                &p.key("simple"),
                "LEAST_CONN is deprecated; use LEAST_REQUEST",
            );
        }
        if lb.consistent_hash.is_some() {
            v.err(p, "only one of simple or consistentHash may be set");
        }
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = p.key("consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip == Some(true),
            ch.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if keys != 1 {
            v.err(&cp, "consistentHash must set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName");
        }
        if let Some(h) = &ch.http_header_name {
            v.header_name(&cp.key("httpHeaderName"), h);
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                v.err(
                    &cp.key("httpCookie").key("name"),
                    "name required for HttpCookie",
                );
            }
            v.duration(&cp.key("httpCookie").key("ttl"), c.ttl.as_ref(), true);
            // Envoy's CookieAttribute: a non-empty token for the name; neither may carry the
            // `;` that would start another attribute of the generated Set-Cookie.
            for (i, a) in c.attributes.iter().enumerate() {
                let ap = cp.key("httpCookie").key("attributes").idx(i);
                let token = |s: &str| {
                    s.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
                };
                if a.name.is_empty() || !token(&a.name) {
                    v.err(
                        &ap.key("name"),
                        format!(
                            "cookie attribute name {:?} must be a non-empty token",
                            a.name
                        ),
                    );
                }
                if a.value.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                    v.err(
                        &ap.key("value"),
                        format!("cookie attribute value {:?} must not contain ';' or control characters", a.value),
                    );
                }
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            v.err(&cp, "only one of ringHash or maglev may be set");
        }
        if let Some(m) = &ch.maglev {
            if let Some(ts) = m.table_size {
                if !is_prime(ts) || ts >= 5_000_011 {
                    v.err(
                        &cp.key("maglev").key("tableSize"),
                        format!("table size {ts} must be a prime number less than 5000011"),
                    );
                }
            }
        }
        if ch.minimum_ring_size.is_some() {
            v.warn(
                &cp.key("minimumRingSize"),
                "minimumRingSize is deprecated; use ringHash.minimumRingSize",
            );
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let lp = p.key("localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            v.err(
                &lp,
                "can not simultaneously set 'distribute' and 'failover'",
            );
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let total: i64 = d.to.values().sum();
            if total != 100 {
                v.err(
                    &lp.key("distribute").idx(i).key("to"),
                    format!("total weight across localities must be 100, got {total}"),
                );
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from == f.to {
                v.err(
                    &lp.key("failover").idx(i),
                    "locality lb failover settings must specify different regions",
                );
            }
            if f.from.contains('/') || f.to.contains('/') {
                v.err(
                    &lp.key("failover").idx(i),
                    "locality lb failover only specify region",
                );
            }
        }
    }
    if let Some(w) = &lb.warmup_duration_secs {
        v.duration(&p.key("warmupDurationSecs"), Some(w), false);
    }
    if let Some(w) = &lb.warmup {
        // The CRD schema's rules, in its words: duration required, 0 <= minimumPercent <= 100,
        // aggression >= 1.
        let wp = p.key("warmup");
        match &w.duration {
            None => v.err(
                &wp.key("duration"),
                "Required value: warmup duration is required",
            ),
            Some(d) => {
                v.duration(&wp.key("duration"), Some(d), false);
            }
        }
        if let Some(m) = w.minimum_percent.filter(|m| !(0.0..=100.0).contains(m)) {
            v.err(
                &wp.key("minimumPercent"),
                format!("Invalid value: {m}: minimumPercent must be between 0 and 100"),
            );
        }
        if let Some(a) = w.aggression.filter(|&a| a < 1.0) {
            v.err(
                &wp.key("aggression"),
                format!("Invalid value: {a}: aggression must be at least 1.0"),
            );
        }
    }
}

pub(super) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

pub(super) fn connection_pool(v: &mut V<'_>, p: &FieldPath, cp: &api::ConnectionPoolSettings) {
    if cp.tcp.is_none() && cp.http.is_none() {
        v.err(p, "connection pool must have at least one field");
    }
    let non_neg = |v: &mut V<'_>, path: FieldPath, n: Option<i64>, what: &str| {
        if let Some(n) = n {
            if n < 0 {
                v.err(&path, format!("{what} must be non-negative"));
            } else if n > i64::from(u32::MAX) {
                v.err(&path, format!("{what} is too large"));
            }
        }
    };
    if let Some(t) = &cp.tcp {
        let tp = p.key("tcp");
        non_neg(
            v,
            tp.key("maxConnections"),
            t.max_connections,
            "max connections",
        );
        v.duration(&tp.key("connectTimeout"), t.connect_timeout.as_ref(), false);
        v.duration(
            &tp.key("maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
            false,
        );
        v.duration(&tp.key("idleTimeout"), t.idle_timeout.as_ref(), true);
        if let Some(k) = &t.tcp_keepalive {
            v.duration(&tp.key("tcpKeepalive").key("time"), k.time.as_ref(), false);
            v.duration(
                &tp.key("tcpKeepalive").key("interval"),
                k.interval.as_ref(),
                false,
            );
        }
    }
    if let Some(h) = &cp.http {
        let hp = p.key("http");
        non_neg(
            v,
            hp.key("http1MaxPendingRequests"),
            h.http1_max_pending_requests,
            "http1 max pending requests",
        );
        non_neg(
            v,
            hp.key("http2MaxRequests"),
            h.http2_max_requests,
            "http2 max requests",
        );
        non_neg(
            v,
            hp.key("maxRequestsPerConnection"),
            h.max_requests_per_connection,
            "max requests per connection",
        );
        non_neg(v, hp.key("maxRetries"), h.max_retries, "max retries");
        non_neg(
            v,
            hp.key("maxConcurrentStreams"),
            h.max_concurrent_streams,
            "max concurrent streams",
        );
        v.duration(&hp.key("idleTimeout"), h.idle_timeout.as_ref(), true);
        if let Some(u) = &h.h2_upgrade_policy {
            if !matches!(u.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") {
                v.err(
                    &hp.key("h2UpgradePolicy"),
                    format!("unknown h2UpgradePolicy {u:?}"),
                );
            }
            if u == "UPGRADE" && h.use_client_protocol == Some(true) {
                v.err(
                    &hp.key("useClientProtocol"),
                    "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
                );
            }
        }
    }
}

pub(super) fn outlier(v: &mut V<'_>, p: &FieldPath, od: &api::OutlierDetection) {
    for (field, val, what) in [
        (
            "consecutiveErrors",
            od.consecutive_errors,
            "outlier detection consecutive errors",
        ),
        (
            "consecutiveGatewayErrors",
            od.consecutive_gateway_errors,
            "outlier detection consecutive gateway errors",
        ),
        (
            "consecutive5xxErrors",
            od.consecutive_5xx_errors,
            "outlier detection consecutive 5xx errors",
        ),
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures,
            "outlier detection consecutive local origin failures",
        ),
    ] {
        if val.is_some_and(|n| n < 0) {
            v.err(&p.key(field), format!("{what} cannot be negative"));
        }
    }
    if od.consecutive_errors.is_some() {
        v.warn(&p.key("consecutiveErrors"), "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead (it has no effect, as in istiod)");
    }
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        v.err(
            &p.key("consecutiveLocalOriginFailures"),
            "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
        );
    }
    v.duration(&p.key("interval"), od.interval.as_ref(), false);
    v.duration(
        &p.key("baseEjectionTime"),
        od.base_ejection_time.as_ref(),
        false,
    );
    if let Some(m) = od.max_ejection_percent {
        if !(0..=100).contains(&m) {
            v.err(
                &p.key("maxEjectionPercent"),
                format!("max ejection percent: percentage {m} is not in range 0..100"),
            );
        }
    }
    if let Some(m) = od.min_health_percent {
        if !(0..=100).contains(&m) {
            v.err(
                &p.key("minHealthPercent"),
                format!("minimum health percent: percentage {m} is not in range 0..100"),
            );
        }
    }
}

pub(super) fn client_tls(v: &mut V<'_>, p: &FieldPath, t: &api::ClientTlsSettings) {
    let mode = t.mode.as_deref().unwrap_or("DISABLE");
    let has_files =
        t.client_certificate.is_some() || t.private_key.is_some() || t.ca_certificates.is_some();
    match mode {
        "DISABLE" | "SIMPLE" => {}
        "MUTUAL" => {
            if t.credential_name.is_none() {
                if t.client_certificate.is_none() {
                    v.err(
                        &p.key("clientCertificate"),
                        "client certificate required for mutual tls",
                    );
                }
                if t.private_key.is_none() {
                    v.err(&p.key("privateKey"), "private key required for mutual tls");
                }
            }
        }
        "ISTIO_MUTUAL" => {
            if has_files
                || t.credential_name.is_some()
                || !t.subject_alt_names.is_empty()
                || t.sni.is_some()
            {
                v.err(p, "cannot specify client certificates, CA certificate, credentialName, SNI or SANs if use ISTIO_MUTUAL");
            }
        }
        other => v.err(
            &p.key("mode"),
            format!("unknown TLS mode {other:?}: expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
        ),
    }
    if t.credential_name.is_some() && (has_files || t.ca_crl.is_some()) {
        v.err(
            &p.key("credentialName"),
            "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
        );
    }
    if t.insecure_skip_verify == Some(true) {
        let ca_or_sans = t.ca_certificates.is_some() || !t.subject_alt_names.is_empty();
        // In SIMPLE mode a credentialName can only name a CA, so it conflicts as well.
        if mode == "SIMPLE" && (ca_or_sans || t.credential_name.is_some()) {
            v.err(
                &p.key("insecureSkipVerify"),
                "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
            );
        } else if mode != "SIMPLE" && ca_or_sans {
            v.err(
                &p.key("insecureSkipVerify"),
                "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true",
            );
        }
    }
    let verifies = matches!(mode, "SIMPLE" | "MUTUAL") && t.insecure_skip_verify != Some(true);
    if t.ca_crl.is_some() && !verifies {
        v.warn(
            &p.key("caCrl"),
            format!(
                "caCrl has no effect in {mode} mode: the upstream's certificate is not verified"
            ),
        );
    }
}

/// `trafficPolicy.tunnel`, in istiod's words (`validateTunnelSettings`); meshroute does not
/// tunnel, which it says.
fn tunnel(v: &mut V<'_>, p: &FieldPath, t: &api::TunnelSettings) {
    if !matches!(t.protocol.as_str(), "" | "CONNECT" | "POST") {
        v.err(
            &p.key("protocol"),
            "tunnel protocol must be \"CONNECT\" or \"POST\"",
        );
    }
    if t.target_host.parse::<std::net::IpAddr>().is_err() {
        if let Err(e) = hosts::validate_fqdn(&t.target_host) {
            v.err(
                &p.key("targetHost"),
                format!(
                    "tunnel target host must be valid FQDN or IP address: {e}; {:?} is not a valid IP",
                    t.target_host
                ),
            );
        }
    }
    if !(1..=65535).contains(&t.target_port) {
        v.err(
            &p.key("targetPort"),
            format!(
                "tunnel target port is invalid: port number {} must be in the range 1..65535",
                t.target_port
            ),
        );
    }
    v.warn(p, "tunnel has no effect in meshroute: connections go to the endpoints directly, not through the tunnel's proxy");
}
