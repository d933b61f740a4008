//! The gRPC front door. [`GrpcServer`] (`listener`) accepts connections on infergate's own
//! HTTP/2 server and answers ModelInfer itself (`model_infer`); every other call goes through
//! tonic's router to [`GrpcApi`] (the rest of `inference.GRPCInferenceService`) or
//! [`GrpcTasks`] (`infergate.tasks.v1.TaskService`, and the admin side [`GrpcTaskAdmin`]). `body` carries h2 streams to and from
//! tonic; `shared` is what every connection reads. Frames, deadlines and statuses are read and
//! written by [`crate::grpc_wire`], which the Triton client uses too.

mod body;
mod listener;
mod model_infer;
mod service;
mod shared;
mod stream_infer;
mod tasks;

pub use listener::{GrpcServer, Tls};
pub use service::GrpcApi;
pub use shared::Routed;
pub use tasks::{GrpcTaskAdmin, GrpcTasks};
