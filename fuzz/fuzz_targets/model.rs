//! The model every target validates against: a batching model (max_batch_size 8) with a
//! variable FP32 input [-1, 4] and a BYTES input [2], so shapes, sizes and strings all count.

use infergate::{
    infer::ModelInfo,
    proto::inference::{
        DataType, ModelConfig, ModelInput, ModelMetadataResponse,
        model_metadata_response::TensorMetadata,
    },
};

pub fn model() -> ModelInfo {
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    let metadata = ModelMetadataResponse {
        name: "fuzz".into(),
        versions: vec!["1".into()],
        platform: "python".into(),
        inputs: vec![
            tensor("A", "FP32", vec![-1, -1, 4]),
            tensor("S", "BYTES", vec![-1, 2]),
        ],
        outputs: vec![tensor("OUT", "FP32", vec![-1, 4])],
    };
    let input = |name: &str, data_type: DataType, dims: Vec<i64>| ModelInput {
        name: name.into(),
        data_type: data_type as i32,
        dims,
        ..Default::default()
    };
    let config = ModelConfig {
        name: "fuzz".into(),
        max_batch_size: 8,
        input: vec![
            input("A", DataType::TypeFp32, vec![-1, 4]),
            input("S", DataType::TypeString, vec![2]),
        ],
        ..Default::default()
    };
    ModelInfo::new(metadata, config)
}
