//! A sidecar's inbound side: the ports its workload serves, from the Sidecar's `ingress`
//! listeners or else from the Kubernetes Services that select the workload (Istio's
//! `inbound|PORT||` clusters).

use meshroute_core::ir;

use super::Lowering;
use crate::api;
use crate::resolve::{selects, sidecar_for};
use crate::source::FieldPath;

impl Lowering<'_> {
    pub(super) fn sidecar_inbound(&mut self) -> Vec<ir::InboundPort> {
        let sidecar = sidecar_for(self.config, self.proxy, self.mesh);
        if let Some(s) = sidecar {
            self.warn_listener_binding(s);
        }
        let pool = sidecar.and_then(|s| s.spec.inbound_connection_pool.as_ref());
        if let Some(s) = sidecar {
            if let Some(p) = pool {
                self.warn_unapplied_pool(
                    s,
                    &FieldPath::root().key("spec").key("inboundConnectionPool"),
                    p,
                );
            }
        }
        let mut ports: Vec<ir::InboundPort> = Vec::new();
        if let Some(s) = sidecar.filter(|s| !s.spec.ingress.is_empty()) {
            for (i, l) in s.spec.ingress.iter().enumerate() {
                let Some(port) = l.port.as_ref() else {
                    continue;
                };
                let Some(number) = port.number.and_then(|n| u16::try_from(n).ok()) else {
                    continue;
                };
                let own = l.connection_pool.as_ref();
                if let Some(p) = own {
                    let path = FieldPath::root()
                        .key("spec")
                        .key("ingress")
                        .idx(i)
                        .key("connectionPool");
                    self.warn_unapplied_pool(s, &path, p);
                }
                let mut inbound = ir::InboundPort {
                    port: number,
                    protocol: ir::Protocol::parse(&port.protocol).unwrap_or_default(),
                    endpoint: l.default_endpoint.clone(),
                    service: String::new(),
                    ..Default::default()
                };
                // The port's own pool replaces the Sidecar-wide one, as in Istio.
                limits(&mut inbound, own.or(pool));
                ports.push(inbound);
            }
            return ports;
        }
        for r in &self.config.services {
            let svc = &r.spec;
            if r.namespace != self.proxy.namespace
                || svc.selector.is_empty()
                || !selects(&svc.selector, &self.proxy.labels)
            {
                continue;
            }
            for (i, p) in svc.ports.iter().enumerate() {
                let Some(number) = p.port.and_then(|n| u16::try_from(n).ok()) else {
                    continue;
                };
                // The container port: a numeric targetPort, else the service port (a named
                // targetPort names a container port this configuration cannot see).
                let target = match &p.target_port {
                    Some(serde_json::Value::Number(n)) => {
                        n.as_u64().and_then(|n| u16::try_from(n).ok())
                    }
                    Some(serde_json::Value::String(name)) => {
                        self.diags.push(r.diag(
                            crate::diag::Severity::Warning,
                            &FieldPath::root().key("spec").key("ports").idx(i).key("targetPort"),
                            format!("targetPort {name:?} names a container port this configuration cannot see: the sidecar takes inbound traffic on port {number}; give the number, or a Sidecar ingress listener"),
                        ));
                        None
                    }
                    _ => None,
                }
                .unwrap_or(number);
                if ports.iter().any(|q| q.port == target) {
                    continue;
                }
                let declared = p
                    .app_protocol
                    .clone()
                    .unwrap_or_else(|| crate::registry::protocol_of(&p.name, ""));
                let mut inbound = ir::InboundPort {
                    port: target,
                    protocol: ir::Protocol::parse(&declared).unwrap_or_default(),
                    endpoint: None,
                    service: format!("{}.{}.{}", r.name, r.namespace, crate::hosts::DOMAIN_SUFFIX),
                    ..Default::default()
                };
                limits(&mut inbound, pool);
                ports.push(inbound);
            }
        }
        ports.sort_by_key(|p| p.port);
        ports
    }

    /// `bind` and `captureMode` ask istiod for a listener of their own on an address; every
    /// port of a meshroute sidecar is served by its capture (or explicit proxy) listener, so
    /// they are said to have no effect.
    fn warn_listener_binding(&mut self, r: &crate::load::Resource<api::Sidecar>) {
        let spec = FieldPath::root().key("spec");
        let mut unapplied = Vec::new();
        for (i, l) in r.spec.ingress.iter().enumerate() {
            let p = spec.key("ingress").idx(i);
            if l.bind.is_some() {
                unapplied.push(p.key("bind"));
            }
            if l.capture_mode.as_deref().is_some_and(|m| m != "DEFAULT") {
                unapplied.push(p.key("captureMode"));
            }
        }
        for (i, l) in r.spec.egress.iter().enumerate() {
            let p = spec.key("egress").idx(i);
            if l.bind.is_some() {
                unapplied.push(p.key("bind"));
            }
            if l.capture_mode.as_deref().is_some_and(|m| m != "DEFAULT") {
                unapplied.push(p.key("captureMode"));
            }
        }
        for path in unapplied {
            self.diags.push(r.diag(
                crate::diag::Severity::Warning,
                &path,
                "has no effect in meshroute: every port is served on the sidecar's capture (or explicit proxy) listener",
            ));
        }
    }

    /// The inbound side applies a pool's `tcp.maxConnections` and `http.http2MaxRequests`;
    /// anything else set in it is said to have no effect rather than dropped in silence.
    fn warn_unapplied_pool(
        &mut self,
        r: &crate::load::Resource<api::Sidecar>,
        path: &FieldPath,
        p: &api::ConnectionPoolSettings,
    ) {
        let mut ignored = Vec::new();
        if let Some(t) = &p.tcp {
            for (set, name) in [
                (t.connect_timeout.is_some(), "tcp.connectTimeout"),
                (t.tcp_keepalive.is_some(), "tcp.tcpKeepalive"),
                (
                    t.max_connection_duration.is_some(),
                    "tcp.maxConnectionDuration",
                ),
                (t.idle_timeout.is_some(), "tcp.idleTimeout"),
            ] {
                if set {
                    ignored.push(name);
                }
            }
        }
        if let Some(h) = &p.http {
            for (set, name) in [
                (
                    h.http1_max_pending_requests.is_some(),
                    "http.http1MaxPendingRequests",
                ),
                (
                    h.max_requests_per_connection.is_some(),
                    "http.maxRequestsPerConnection",
                ),
                (h.max_retries.is_some(), "http.maxRetries"),
                (h.idle_timeout.is_some(), "http.idleTimeout"),
                (h.h2_upgrade_policy.is_some(), "http.h2UpgradePolicy"),
                (h.use_client_protocol.is_some(), "http.useClientProtocol"),
                (
                    h.max_concurrent_streams.is_some(),
                    "http.maxConcurrentStreams",
                ),
            ] {
                if set {
                    ignored.push(name);
                }
            }
        }
        if !ignored.is_empty() {
            self.diags.push(r.diag(
                crate::diag::Severity::Warning,
                path,
                format!(
                    "{} of an inbound connection pool have no effect in meshroute (tcp.maxConnections and http.http2MaxRequests apply)",
                    ignored.join(", ")
                ),
            ));
        }
    }
}

fn limits(port: &mut ir::InboundPort, pool: Option<&api::ConnectionPoolSettings>) {
    let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    if let Some(p) = pool {
        port.max_connections = n(p.tcp.as_ref().and_then(|t| t.max_connections));
        port.max_requests = n(p.http.as_ref().and_then(|h| h.http2_max_requests));
    }
}
