//! What infergate knows of a model: Triton's metadata and config, digested once when they are
//! fetched. The backend fetches and caches it, validation checks requests against it, and the
//! batcher reads its batching settings from it; it imports none of them.

use std::collections::HashSet;

use crate::{
    proto::inference::{ModelConfig, ModelMetadataResponse},
    tensor::DataType,
};

/// One input or output of a model, as the model declares it.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Option<DataType>,
    pub datatype: String,
    /// Full shape as in the metadata: with a leading -1 when the model batches.
    pub shape: Vec<i64>,
    pub optional: bool,
}

/// What infergate knows of a model: Triton's metadata and config, digested for validation.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// 0 means the model has no batch dimension.
    pub max_batch_size: i64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub metadata: ModelMetadataResponse,
    pub config: ModelConfig,
}

impl ModelInfo {
    pub fn new(metadata: ModelMetadataResponse, config: ModelConfig) -> Self {
        let optional: HashSet<&str> = config
            .input
            .iter()
            .filter(|i| i.optional)
            .map(|i| i.name.as_str())
            .collect();
        let spec =
            |t: &crate::proto::inference::model_metadata_response::TensorMetadata| TensorSpec {
                name: t.name.clone(),
                dtype: DataType::parse(&t.datatype),
                datatype: t.datatype.clone(),
                shape: t.shape.clone(),
                optional: optional.contains(t.name.as_str()),
            };
        Self {
            name: metadata.name.clone(),
            max_batch_size: i64::from(config.max_batch_size),
            inputs: metadata.inputs.iter().map(spec).collect(),
            outputs: metadata.outputs.iter().map(spec).collect(),
            metadata,
            config,
        }
    }

    /// A decoupled model answers a request with 0..N responses, on a stream only (Triton
    /// refuses unary inference for it).
    pub fn decoupled(&self) -> bool {
        self.config
            .model_transaction_policy
            .as_ref()
            .is_some_and(|p| p.decoupled)
    }

    pub(crate) fn names(list: &[TensorSpec]) -> String {
        let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
        format!("[{}]", names.join(", "))
    }
}
