//! The `meshroute` host: configuration generators for other hosts (Envoy) and, later, the
//! embedded proxy-wasm runtime.

pub mod envoy_config;
