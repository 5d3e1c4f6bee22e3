//! A proxy-wasm host on wasmtime.
//!
//! [`abi`] implements the host functions of proxy-wasm ABI 0.2.0/0.2.1; [`vm`] compiles a
//! module and runs instances of it with a CPU budget per callback and a memory cap. The
//! crate knows nothing of the module it runs: what a side call may target is the embedder's
//! [`abi::ClusterCheck`], and everything a callback asks for is recorded in
//! [`abi::HostState`] for the embedder to carry out.

pub mod abi;
pub mod vm;
