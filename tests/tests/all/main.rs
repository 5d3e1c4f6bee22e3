//! Every integration test of the proxies, in one binary (as wasmtime's `tests/all`): real
//! Envoy and `meshroute run` with the filter, against real upstreams. One binary links
//! wasmtime, hyper and rustls once instead of once per file.
//!
//! - `abi`: the host ABI answers as Envoy does, and misbehaving modules are contained;
//! - `abi_fuzz`: generated guests calling every host function with arbitrary arguments;
//! - `bench`: `make bench`'s report, its JSON and chart;
//! - `conformance`, `conformance_l4`: the scenario suite on both hosts;
//! - `differential`: generated configurations and requests, both hosts' answers compared;
//! - `faults`: the README's fault table, logged alike by both hosts;
//! - `hostile`: clients that try to steer, flood or stall the proxy;
//! - `istio`: the filter inside the configuration istiod generates, loaded by the manifests;
//! - `pods`: transparent sidecars in pods made of network namespaces and iptables rules;
//! - `resilience`: retries, timeouts, circuit breaking and outlier detection;
//! - `run`: the `meshroute` binary as a user runs it;
//! - `soak`: a gateway under mixed load through reloads, upstream failures and hostile
//!   clients, its memory, files and tasks measured;
//! - `scenarios`, `seeds`: the traffic-management scenarios and the seed documents'
//!   examples.

mod abi;
mod abi_fuzz;
mod bench;
mod conformance;
mod conformance_l4;
mod deviations;
mod differential;
mod docs;
mod faults;
mod hostile;
mod istio;
mod pods;
mod resilience;
mod run;
mod scenarios;
mod seeds;
mod soak;
