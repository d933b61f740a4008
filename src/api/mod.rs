//! The two front doors: gRPC (`inference.GRPCInferenceService`) and HTTP/JSON, both speaking
//! the Open Inference Protocol and both ending in [`crate::infer::InferService`].

pub mod grpc;
pub mod grpc_tasks;
pub mod http;

/// Protocol extensions infergate serves (a subset of what Triton announces: repository control,
/// shared memory, trace and log settings stay on Triton's own port).
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "sequence",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
];

/// Triton's server metadata with the extensions narrowed to those infergate serves.
pub fn narrow_extensions(extensions: Vec<String>) -> Vec<String> {
    extensions
        .into_iter()
        .filter(|e| EXTENSIONS.contains(&e.as_str()))
        .collect()
}
