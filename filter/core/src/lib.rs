//! meshroute's pure core: the rules document ([`ir`]) and the decision engine.
//!
//! No I/O, no clocks, no randomness of its own: hosts pass time and an [`engine::Rng`] in.
//! Builds for native, wasm32-unknown-unknown and wasm32-wasip1.

pub mod client_hello;
pub mod contract;
pub mod engine;
pub mod ir;
pub mod pins;
pub mod telemetry;
