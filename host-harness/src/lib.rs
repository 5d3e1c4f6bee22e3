//! The `meshroute` host: the embedded proxy-wasm runtime (`abi`, `vm`, `runtime`) and
//! configuration generators for other hosts (`envoy_config`).

pub mod abi;
pub mod credentials;
pub mod envoy_config;
pub mod explain;
pub mod runtime;
pub mod vm;
