//! The `meshroute` host: `meshroute run` (`runtime`, on the proxy-wasm host of
//! `meshroute-wasm-host`), `explain`, and configuration generators for other hosts
//! (`envoy_config`).

pub mod credentials;
pub mod envoy_config;
pub mod explain;
pub mod istio;
pub mod runtime;
