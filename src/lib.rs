//! infergate: a gRPC/HTTP front end for NVIDIA Triton speaking the Open Inference Protocol.
//!
//! Data flows one way: `api` (grpc, http) → `infer` (validation) → `batch` (dynamic batching)
//! → `backend` (the pool of Triton endpoints). Async: `api` → `tasks` (records) + `queue`
//! (broker) → `worker` → `infer` → `batch` → `backend` → `tasks`. `server` wires the
//! listeners, workers, health and shutdown. `model` (what Triton says of a model) is read by
//! backend, infer and batch alike. Features (routes, cache, scaler, webhooks…) are modules
//! owning their config section and metrics; `config` lists the sections, `server` starts the
//! parts. `scripts/check-modules.py` keeps the imports free of circles, between files and
//! between folders, and refuses an import from a lower layer into a higher one.

pub mod api;
pub mod auth;
pub mod backend;
pub mod batch;
pub mod breaker;
pub mod cache;
pub mod call;
pub mod config;
pub mod error;
pub mod fleet;
pub mod grpc_wire;
pub mod health;
pub mod infer;
pub mod loadgen;
pub mod model;
pub mod openai;
pub mod proto;
pub mod queue;
pub mod redis_conn;
pub mod routes;
pub mod scaler;
pub mod section;
pub mod server;
pub mod spread;
pub mod streams;
pub mod tasks;
pub mod telemetry;
pub mod tensor;
pub mod tls;
pub mod worker;
