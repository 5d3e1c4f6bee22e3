//! The `meshroute` host: `meshroute run` (`runtime`, on the proxy-wasm host of
//! `meshroute-wasm-host`), `explain`, and configuration generators for other hosts
//! (`envoy_config`), and the capture rules of a transparent sidecar (`iptables`).

pub mod credentials;
pub mod envoy_config;
pub mod explain;
pub mod iptables;
pub mod istio;
pub mod logging;
pub mod runtime;
pub mod yaml;
