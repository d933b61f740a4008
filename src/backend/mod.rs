//! What infergate forwards to. Today one implementation: a pool of Triton gRPC endpoints.

pub mod h2_infer;
pub mod stats;
pub mod triton;
