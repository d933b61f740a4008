//! infergate: a gRPC/HTTP front end for NVIDIA Triton speaking the Open Inference Protocol.
//!
//! Data flows one way: `api` (grpc, http) → `infer` (validation) → `batch` (dynamic batching)
//! → `backend` (the pool of Triton endpoints). `server` wires the listeners, health and
//! shutdown.

pub mod api;
pub mod backend;
pub mod batch;
pub mod config;
pub mod error;
pub mod infer;
pub mod proto;
pub mod server;
pub mod telemetry;
pub mod tensor;
