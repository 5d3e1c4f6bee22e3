//! The connection-level (network filter) context: one decision when a connection opens,
//! handed to the host as filter state that its TCP proxy reads.

use std::rc::Rc;

use log::{debug, info, warn};
use proxy_wasm::types::Action;

use meshroute_core::contract::{
    filter_state_arguments, SET_FILTER_STATE_FUNCTION, TCP_CLUSTER_STATE, TCP_ENDPOINT_STATE,
    TCP_IDLE_TIMEOUT_STATE,
};
use meshroute_core::engine::{ConnectionOutcome, ConnectionView, Engine, SplitMix64, Ticket};

use crate::host::{text_property, Host};
use crate::metrics::Metrics;
use crate::shared::SharedEndpointState;

pub struct FilterStream<H> {
    pub(crate) context_id: u32,
    pub(crate) port: u16,
    pub(crate) host: H,
    pub(crate) engine: Option<Rc<Engine>>,
    pub(crate) seed: u64,
    pub(crate) ticket: Option<Ticket>,
    /// Istio's TCP metrics, when the node asks the filter to keep them.
    pub(crate) metrics: Option<Rc<Metrics>>,
    /// The cluster the connection went to, once the filter chose one.
    pub(crate) cluster: Option<String>,
    /// Bytes from the client and to it so far.
    pub(crate) received: u64,
    pub(crate) sent: u64,
}

fn set_filter_state(host: &impl Host, path: &str, value: &str) -> bool {
    let args = filter_state_arguments(path, value);
    match host.call_foreign(SET_FILTER_STATE_FUNCTION, &args) {
        Ok(()) => true,
        Err(status) => {
            warn!("{SET_FILTER_STATE_FUNCTION}({path}) failed: {status:?}");
            false
        }
    }
}

impl<H: Host> FilterStream<H> {
    fn release(&mut self) {
        if let (Some(t), Some(engine)) = (self.ticket.take(), &self.engine) {
            engine.release(t);
        }
    }

    /// Decides the connection and names its cluster (and endpoint) as filter state; a
    /// connection nothing routes is closed.
    pub fn on_new_connection(&mut self) -> Action {
        let Some(engine) = self.engine.clone() else {
            warn!("connection {}: no rules loaded; closing", self.context_id);
            let _ = self.host.close_downstream();
            return Action::Pause;
        };
        let host = &self.host;
        let sni =
            text_property(host, &["connection", "requested_server_name"]).to_ascii_lowercase();
        let destination = text_property(host, &["destination", "address"]);
        let source = engine
            .uses_source_ip()
            .then(|| text_property(host, &["source", "address"]));
        let source_ip = source
            .as_deref()
            .map(|s| meshroute_core::engine::split_host_port(s).0);
        let view = ConnectionView {
            port: self.port,
            sni: &sni,
            destination: &destination,
            source_ip,
        };
        let state = SharedEndpointState {
            host,
            now_ms: host.now_ms(),
        };
        let mut rng = SplitMix64(self.seed);
        match engine.decide_connection(&view, &mut rng, &state) {
            ConnectionOutcome::Forward {
                route,
                cluster,
                endpoint,
                ticket,
                idle_timeout_ms,
            } => {
                debug!(
                    "connection {} (sni {sni:?}) → {route} → {cluster} {}",
                    self.context_id,
                    endpoint.as_deref().unwrap_or("")
                );
                self.ticket = ticket;
                let named = set_filter_state(host, TCP_CLUSTER_STATE, &cluster)
                    && endpoint
                        .as_deref()
                        .is_none_or(|e| set_filter_state(host, TCP_ENDPOINT_STATE, e))
                    && idle_timeout_ms.is_none_or(|ms| {
                        set_filter_state(host, TCP_IDLE_TIMEOUT_STATE, &ms.to_string())
                    });
                if named {
                    if let Some(m) = &self.metrics {
                        m.tcp_opened(host, &engine, &cluster);
                        self.cluster = Some(cluster.into_owned());
                    }
                    return Action::Continue;
                }
                self.release();
                let _ = self.host.close_downstream();
                Action::Pause
            }
            ConnectionOutcome::Close { reason } => {
                info!(
                    "connection {} on port {} (sni {sni:?}) closed: {reason}",
                    self.context_id, self.port
                );
                let _ = self.host.close_downstream();
                Action::Pause
            }
        }
    }

    /// Either side closed, or the connection is logged: the endpoint is free again.
    pub fn on_close(&mut self) {
        self.release();
    }

    /// The connection is over (Envoy logs each connection once, after it closed).
    pub fn on_log(&mut self) {
        self.release();
        if let (Some(m), Some(cluster), Some(engine)) =
            (&self.metrics, self.cluster.take(), &self.engine)
        {
            m.tcp_closed(&self.host, engine, &cluster, self.received, self.sent);
        }
    }
}
