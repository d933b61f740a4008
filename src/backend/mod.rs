//! What infergate forwards to. Today one implementation: a pool of Triton gRPC endpoints.

pub mod affinity;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod each;
pub mod endpoint;
pub mod h2_infer;
pub mod members;
pub mod merge;
pub mod metrics;
pub mod models;
pub mod placement;
pub mod probe;
pub mod stats;
pub mod stream;
pub mod triton;
