//! Checks an inference request against the model's metadata and config before anything is
//! forwarded, and normalises its tensor data to raw bytes. Every error names the field.

use bytes::Bytes;

use crate::{
    error::GatewayError,
    model::{ModelInfo, TensorSpec},
    proto::inference::ModelInferRequest,
    tensor::{self, DataType, shape_str},
};

/// What validation learnt about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    /// Rows along the batch dimension; `None` for models without one.
    pub batch_size: Option<i64>,
}

fn invalid(msg: String) -> GatewayError {
    GatewayError::InvalidArgument(msg)
}

/// Validates `req` against `info` and moves all tensor data into `raw_input_contents`.
pub fn validate(req: &mut ModelInferRequest, info: &ModelInfo) -> Result<Validated, GatewayError> {
    let model = info.name.as_str();
    if req.inputs.is_empty() {
        return Err(invalid(format!(
            "request for model '{model}' has no inputs"
        )));
    }
    let raw_mode = !req.raw_input_contents.is_empty();
    if raw_mode && req.raw_input_contents.len() != req.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut raws: Vec<Bytes> = Vec::with_capacity(req.inputs.len());
    // Which of the model's inputs were given, by their index in `info.inputs`: an unknown or
    // repeated name fails at once, so the loop never runs more than inputs + 1 times and a
    // flag per input is all the bookkeeping needed (no name is copied or hashed).
    let mut seen = vec![false; info.inputs.len()];
    // Rows and the index in `info.inputs` of the first input that has a batch dimension.
    let mut batch: Option<(i64, usize)> = None;
    for i in 0..req.inputs.len() {
        let input = &mut req.inputs[i];
        let name = input.name.as_str();
        let Some(at) = info.inputs.iter().position(|t| t.name == name) else {
            return Err(invalid(format!(
                "unexpected input '{name}' for model '{model}'; its inputs are {}",
                ModelInfo::names(&info.inputs)
            )));
        };
        let spec = &info.inputs[at];
        if std::mem::replace(&mut seen[at], true) {
            return Err(invalid(format!("input '{name}' is given twice")));
        }
        let dtype = DataType::parse(&input.datatype).ok_or_else(|| {
            invalid(format!(
                "input '{name}': unknown datatype '{}'",
                input.datatype
            ))
        })?;
        if input.datatype != spec.datatype {
            return Err(invalid(format!(
                "input '{name}': datatype {} does not match the model's {}",
                input.datatype, spec.datatype
            )));
        }
        let rows = check_shape(name, &input.shape, spec, info.max_batch_size, model)?;
        if let Some(rows) = rows {
            match batch {
                Some((b, first)) if b != rows => {
                    return Err(invalid(format!(
                        "input '{name}': batch size {rows} differs from input '{}' ({b})",
                        info.inputs[first].name
                    )));
                }
                None => batch = Some((rows, at)),
                _ => {}
            }
        }
        let elements = tensor::element_count(&input.shape).ok_or_else(|| {
            invalid(format!(
                "input '{name}': shape {} has too many elements",
                shape_str(&input.shape)
            ))
        })?;
        let data = if raw_mode {
            if input.contents.is_some() {
                return Err(invalid(format!(
                    "input '{name}': has both contents and raw_input_contents"
                )));
            }
            std::mem::take(&mut req.raw_input_contents[i])
        } else {
            let contents = input.contents.take().ok_or_else(|| {
                invalid(format!(
                    "input '{name}': no data (neither contents nor raw_input_contents)"
                ))
            })?;
            let (raw, n) = tensor::contents_to_raw(dtype, &contents)
                .map_err(|e| invalid(format!("input '{name}': {e}")))?;
            if n != elements {
                return Err(invalid(format!(
                    "input '{name}': shape {} needs {elements} elements, contents has {n}",
                    shape_str(&input.shape)
                )));
            }
            raw
        };
        check_data_size(name, dtype, &input.shape, elements, &data)?;
        raws.push(data);
    }
    if let Some(missing) = info
        .inputs
        .iter()
        .zip(&seen)
        .find(|(s, seen)| !s.optional && !**seen)
    {
        return Err(invalid(format!(
            "missing input '{}' of model '{model}'",
            missing.0.name
        )));
    }
    // As for the inputs: a flag per model output, and the first unknown or repeated name ends
    // the loop.
    let mut wanted = vec![false; info.outputs.len()];
    for out in &req.outputs {
        let Some(at) = info.outputs.iter().position(|o| o.name == out.name) else {
            return Err(invalid(format!(
                "unknown output '{}' requested from model '{model}'; its outputs are {}",
                out.name,
                ModelInfo::names(&info.outputs)
            )));
        };
        if std::mem::replace(&mut wanted[at], true) {
            return Err(invalid(format!("output '{}' is requested twice", out.name)));
        }
    }
    req.raw_input_contents = raws;
    Ok(Validated {
        batch_size: batch.map(|(b, _)| b),
    })
}

/// Returns the batch size (first dimension) for batching models.
fn check_shape(
    name: &str,
    shape: &[i64],
    spec: &TensorSpec,
    max_batch_size: i64,
    model: &str,
) -> Result<Option<i64>, GatewayError> {
    if let Some(pos) = shape.iter().position(|&d| d < 0) {
        return Err(invalid(format!(
            "input '{name}': dimension {pos} of shape {} is negative",
            shape_str(shape)
        )));
    }
    if shape.len() != spec.shape.len() {
        return Err(invalid(format!(
            "input '{name}': shape {} has {} dimensions, the model expects {} ({})",
            shape_str(shape),
            shape.len(),
            spec.shape.len(),
            shape_str(&spec.shape)
        )));
    }
    let batching = max_batch_size > 0;
    for (pos, (&got, &want)) in shape.iter().zip(&spec.shape).enumerate() {
        if batching && pos == 0 {
            continue;
        }
        if want != -1 && got != want {
            return Err(invalid(format!(
                "input '{name}': dimension {pos} is {got}, the model expects {want} (shape {})",
                shape_str(&spec.shape)
            )));
        }
    }
    if !batching {
        return Ok(None);
    }
    // More rows than max_batch_size is allowed: the request is split across Triton calls.
    let rows = shape[0];
    if rows == 0 {
        return Err(invalid(format!(
            "input '{name}': batch size is 0 (model '{model}')"
        )));
    }
    Ok(Some(rows))
}

fn check_data_size(
    name: &str,
    dtype: DataType,
    shape: &[i64],
    elements: u64,
    data: &[u8],
) -> Result<(), GatewayError> {
    match dtype.byte_size() {
        Some(size) => {
            let want = elements.checked_mul(size as u64);
            if want != Some(data.len() as u64) {
                return Err(invalid(format!(
                    "input '{name}': shape {} of {} needs {} bytes, got {}",
                    shape_str(shape),
                    dtype.as_str(),
                    want.map_or_else(|| "too many".to_string(), |w| w.to_string()),
                    data.len()
                )));
            }
        }
        None => {
            let n = tensor::count_bytes_elements(data)
                .map_err(|e| invalid(format!("input '{name}': {e}")))?;
            if n != elements {
                return Err(invalid(format!(
                    "input '{name}': shape {} needs {elements} BYTES elements, got {n}",
                    shape_str(shape)
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::{
        InferTensorContents, ModelConfig, ModelInput, ModelMetadataResponse,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
        model_metadata_response::TensorMetadata,
    };

    fn add_sub() -> ModelInfo {
        let t = |n: &str| TensorMetadata {
            name: n.into(),
            datatype: "FP32".into(),
            shape: vec![-1, 16],
        };
        let metadata = ModelMetadataResponse {
            name: "add_sub".into(),
            versions: vec!["1".into()],
            platform: "python".into(),
            inputs: vec![t("INPUT0"), t("INPUT1")],
            outputs: vec![t("OUTPUT0"), t("OUTPUT1")],
        };
        let config = ModelConfig {
            name: "add_sub".into(),
            max_batch_size: 8,
            input: vec![ModelInput {
                name: "INPUT0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        ModelInfo::new(metadata, config)
    }

    fn input(name: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        }
    }

    fn request(rows: i64) -> ModelInferRequest {
        let bytes = Bytes::from(vec![0u8; (rows * 16 * 4) as usize]);
        ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![
                input("INPUT0", vec![rows, 16]),
                input("INPUT1", vec![rows, 16]),
            ],
            raw_input_contents: vec![bytes.clone(), bytes],
            ..Default::default()
        }
    }

    fn err(mut req: ModelInferRequest) -> String {
        validate(&mut req, &add_sub()).unwrap_err().to_string()
    }

    #[test]
    fn a_good_request_passes_and_reports_its_batch() {
        let mut req = request(3);
        assert_eq!(validate(&mut req, &add_sub()).unwrap().batch_size, Some(3));
    }

    #[test]
    fn typed_contents_are_moved_to_raw() {
        let mut req = request(1);
        req.raw_input_contents.clear();
        for inp in &mut req.inputs {
            inp.contents = Some(InferTensorContents {
                fp32_contents: vec![1.0; 16],
                ..Default::default()
            });
        }
        validate(&mut req, &add_sub()).unwrap();
        assert_eq!(req.raw_input_contents.len(), 2);
        assert_eq!(req.raw_input_contents[0].len(), 64);
        assert!(req.inputs.iter().all(|i| i.contents.is_none()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = request(1);
        r.inputs[1].name = "INPUT9".into();
        assert!(err(r).contains("unexpected input 'INPUT9'"));

        let mut r = request(1);
        r.inputs[0].datatype = "FP64".into();
        assert!(err(r).contains("input 'INPUT0': datatype FP64 does not match the model's FP32"));

        let mut r = request(1);
        r.inputs[0].shape = vec![1, 15];
        assert!(err(r).contains("input 'INPUT0': dimension 1 is 15"));

        let mut r = request(1);
        r.inputs[0].shape = vec![1, -16];
        assert!(err(r).contains("negative"));

        let mut r = request(1);
        r.raw_input_contents[1] = Bytes::from_static(&[0; 10]);
        assert!(err(r).contains("input 'INPUT1': shape [1,16] of FP32 needs 64 bytes, got 10"));

        let r = request(0);
        assert!(err(r).contains("batch size is 0"));
        // Over max_batch_size is fine: infer/ splits it.
        let mut r = request(9);
        assert_eq!(validate(&mut r, &add_sub()).unwrap().batch_size, Some(9));

        let mut r = request(2);
        r.inputs[1].shape = vec![1, 16];
        r.raw_input_contents[1] = Bytes::from(vec![0u8; 64]);
        assert!(err(r).contains("differs from input 'INPUT0'"));

        let mut r = request(1);
        r.inputs.pop();
        r.raw_input_contents.pop();
        assert!(err(r).contains("missing input 'INPUT1'"));

        let mut r = request(1);
        r.outputs.push(InferRequestedOutputTensor {
            name: "NOPE".into(),
            ..Default::default()
        });
        assert!(err(r).contains("unknown output 'NOPE'"));

        let mut r = request(1);
        r.raw_input_contents.pop();
        assert!(err(r).contains("raw_input_contents has 1 entries for 2 inputs"));

        let mut r = request(1);
        r.inputs[1].name = "INPUT0".into();
        assert!(err(r).contains("input 'INPUT0' is given twice"));

        let mut r = request(1);
        for _ in 0..2 {
            r.outputs.push(InferRequestedOutputTensor {
                name: "OUTPUT1".into(),
                ..Default::default()
            });
        }
        assert!(err(r).contains("output 'OUTPUT1' is requested twice"));

        // Every output once, in any order, is fine.
        let mut r = request(1);
        for name in ["OUTPUT1", "OUTPUT0"] {
            r.outputs.push(InferRequestedOutputTensor {
                name: name.into(),
                ..Default::default()
            });
        }
        assert!(validate(&mut r, &add_sub()).is_ok());
    }

    #[test]
    fn a_huge_declared_shape_with_a_tiny_payload_is_refused_without_allocating() {
        let mut r = request(1);
        r.inputs[0].shape = vec![1, i64::MAX];
        let msg = err(r);
        assert!(msg.contains("INPUT0"), "{msg}");
    }
}
