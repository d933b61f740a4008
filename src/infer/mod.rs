//! The inference entry point shared by the gRPC and HTTP APIs: look up the model, validate
//! the request, dispatch it to the backend.

pub mod validate;

use std::{sync::Arc, time::Duration};

pub use validate::{ModelInfo, TensorSpec, Validated};

use crate::{
    backend::triton::TritonPool,
    error::GatewayError,
    proto::inference::{ModelInferRequest, ModelInferResponse},
};

#[derive(Clone)]
pub struct InferService {
    backend: Arc<TritonPool>,
}

impl InferService {
    pub fn new(backend: Arc<TritonPool>) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<TritonPool> {
        &self.backend
    }

    /// Runs one request. `timeout` is the caller's remaining budget, if it gave one.
    pub async fn infer(
        &self,
        mut req: ModelInferRequest,
        timeout: Option<Duration>,
    ) -> Result<ModelInferResponse, GatewayError> {
        if req.model_name.is_empty() {
            return Err(GatewayError::invalid("model_name is empty"));
        }
        let info = self
            .backend
            .model_info(&req.model_name, &req.model_version)
            .await?;
        validate::validate(&mut req, &info)?;
        self.backend.infer(req, timeout).await
    }
}
