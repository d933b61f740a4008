//! Triton's generate extension (`POST /v2/models/{m}[/versions/{v}]/generate` and
//! `/generate_stream`): a flat JSON object whose keys are the model's input names (a scalar or
//! an array each), with optional `id` and `parameters`; each response is a flat object of the
//! model's outputs (one element: the scalar; more: a flat array), `model_name`,
//! `model_version` and `id`, keys in byte order, as Triton writes them.

use serde_json::{Map, Value};

use crate::{
    error::GatewayError,
    model::ModelInfo,
    proto::inference::{
        ModelInferRequest, ModelInferResponse, model_infer_request::InferInputTensor,
    },
    tensor::{self, DataType},
};

/// The request a generate body stands for, checked against the model's inputs.
/// `model` and `version` are the names called (a route's name stays: the route applies); the
/// inputs are `info`'s (the model it describes).
pub fn request(
    body: &[u8],
    info: &ModelInfo,
    model: &str,
    version: &str,
) -> Result<ModelInferRequest, GatewayError> {
    let Value::Object(fields) = serde_json::from_slice::<Value>(body)
        .map_err(|e| GatewayError::invalid(format!("generate body: malformed JSON: {e}")))?
    else {
        return Err(GatewayError::invalid(
            "generate body: expected a JSON object of inputs",
        ));
    };
    let mut req = ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        ..Default::default()
    };
    for (key, value) in fields {
        match key.as_str() {
            "id" => {
                req.id = match value {
                    Value::String(s) => s,
                    _ => return Err(GatewayError::invalid("id: expected a string")),
                }
            }
            "parameters" => {
                let Value::Object(params) = value else {
                    return Err(GatewayError::invalid("parameters: expected a JSON object"));
                };
                for (k, v) in params {
                    let p = tensor::param_from_json(&v)
                        .map_err(|e| GatewayError::invalid(format!("parameters.{k}: {e}")))?;
                    req.parameters.insert(k, p);
                }
            }
            _ => {
                let (input, raw) = input(info, &key, &value)?;
                req.inputs.push(input);
                req.raw_input_contents.push(raw);
            }
        }
    }
    Ok(req)
}

/// One input tensor from its JSON value: its datatype from the model, its shape from the
/// model's dims (a batch of one where the model batches; a variable dim takes what is left).
fn input(
    info: &ModelInfo,
    name: &str,
    value: &Value,
) -> Result<(InferInputTensor, bytes::Bytes), GatewayError> {
    let spec = info.inputs.iter().find(|s| s.name == name).ok_or_else(|| {
        GatewayError::invalid(format!(
            "'{name}' is not an input of model '{}' (inputs: {})",
            info.name,
            ModelInfo::names(&info.inputs)
        ))
    })?;
    let dtype = spec.dtype.ok_or_else(|| {
        GatewayError::invalid(format!(
            "input '{name}': datatype {} is not supported",
            spec.datatype
        ))
    })?;
    let (raw, n) = tensor::json_to_raw(dtype, value)
        .map_err(|e| GatewayError::invalid(format!("input '{name}': {e}")))?;
    let shape = shape_for(&spec.shape, info.max_batch_size > 0, n).ok_or_else(|| {
        GatewayError::invalid(format!(
            "input '{name}': {n} elements do not fit the model's shape {}",
            tensor::shape_str(&spec.shape)
        ))
    })?;
    Ok((
        InferInputTensor {
            name: name.to_string(),
            datatype: dtype.as_str().to_string(),
            shape,
            ..Default::default()
        },
        raw,
    ))
}

/// `dims` (the model's, with the batch dim first when `batched`) for `n` elements: the batch
/// dim is 1, the first variable dim takes what the fixed ones leave, other variable ones 1.
fn shape_for(dims: &[i64], batched: bool, n: u64) -> Option<Vec<i64>> {
    let mut shape = dims.to_vec();
    if batched && let Some(b) = shape.first_mut() {
        *b = 1;
    }
    let fixed: u64 = shape
        .iter()
        .filter(|&&d| d >= 0)
        .map(|&d| d as u64)
        .product();
    let mut first = true;
    for d in shape.iter_mut().filter(|d| **d < 0) {
        *d = if first && fixed > 0 && n.is_multiple_of(fixed) {
            i64::try_from(n / fixed).ok()?
        } else {
            1
        };
        first = false;
    }
    (tensor::element_count(&shape) == Some(n)).then_some(shape)
}

/// A response as generate writes it; `None` for the empty final response (no outputs),
/// which generate_stream does not send as an event.
pub fn response(resp: &ModelInferResponse) -> Result<Option<Value>, GatewayError> {
    if resp.outputs.is_empty() {
        return Ok(None);
    }
    let mut fields: Vec<(String, Value)> = Vec::with_capacity(resp.outputs.len() + 3);
    for (i, out) in resp.outputs.iter().enumerate() {
        let dtype = DataType::parse(&out.datatype).ok_or_else(|| {
            GatewayError::Internal(format!(
                "output '{}': unknown datatype {}",
                out.name, out.datatype
            ))
        })?;
        let raw = resp.raw_output_contents.get(i).ok_or_else(|| {
            GatewayError::Internal(format!("output '{}' came without its data", out.name))
        })?;
        let value = match tensor::raw_to_json(dtype, raw)
            .map_err(|e| GatewayError::Internal(format!("output '{}': {e}", out.name)))?
        {
            Value::Array(mut items) if items.len() == 1 => items.remove(0),
            v => v,
        };
        fields.push((out.name.clone(), value));
    }
    fields.push(("model_name".into(), resp.model_name.clone().into()));
    fields.push(("model_version".into(), resp.model_version.clone().into()));
    if !resp.id.is_empty() {
        fields.push(("id".into(), resp.id.clone().into()));
    }
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(Value::Object(
        fields.into_iter().collect::<Map<_, _>>(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_models_dims() {
        // add_sub: batched, 16 per row.
        assert_eq!(shape_for(&[-1, 16], true, 16), Some(vec![1, 16]));
        assert_eq!(shape_for(&[-1, 16], true, 15), None);
        // token_stream: not batched, one element.
        assert_eq!(shape_for(&[1], false, 1), Some(vec![1]));
        assert_eq!(shape_for(&[1], false, 2), None);
        // seq_sum: batched, variable length.
        assert_eq!(shape_for(&[-1, -1], true, 5), Some(vec![1, 5]));
        assert_eq!(shape_for(&[-1, 2, -1], false, 6), Some(vec![3, 2, 1]));
    }
}
