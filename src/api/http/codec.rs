//! The Open Inference Protocol's HTTP/JSON body and Triton's binary tensor data extension.
//!
//! A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by
//! the raw data of every input whose `parameters.binary_data_size` is set, in input order.
//! Outputs are returned binary when asked (`binary_data` on the output, or
//! `binary_data_output` on the request), with the same framing.

use std::collections::HashMap;

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    error::GatewayError,
    proto::inference::{
        InferParameter, ModelInferRequest, ModelInferResponse,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
    tensor::{self, DataType, shape_str},
};

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Parameters that only frame the HTTP body; they are not forwarded to Triton.
const HTTP_ONLY_PARAMS: &[&str] = &["binary_data_size", "binary_data", "binary_data_output"];

#[derive(Deserialize)]
struct JsonRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// How the client wants each output encoded.
#[derive(Debug, Default, Clone)]
pub struct OutputPrefs {
    default_binary: bool,
    per_output: HashMap<String, bool>,
}

impl OutputPrefs {
    fn binary(&self, name: &str) -> bool {
        self.per_output
            .get(name)
            .copied()
            .unwrap_or(self.default_binary)
    }
}

fn invalid(msg: String) -> GatewayError {
    GatewayError::InvalidArgument(msg)
}

/// Decodes an HTTP infer body into a protocol request with raw tensor data.
pub fn decode_request(
    model: &str,
    version: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(ModelInferRequest, OutputPrefs), GatewayError> {
    let (json_part, mut binary) = match headers.get(HEADER_LENGTH) {
        Some(v) => {
            let len: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| invalid(format!("header {HEADER_LENGTH} is not a byte count")))?;
            if len > body.len() {
                return Err(invalid(format!(
                    "header {HEADER_LENGTH} is {len} but the body has {} bytes",
                    body.len()
                )));
            }
            (body.slice(..len), body.slice(len..))
        }
        None => (body, Bytes::new()),
    };
    let de = &mut serde_json::Deserializer::from_slice(&json_part);
    let parsed: JsonRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        invalid(format!("malformed JSON request at '{path}': {}", e.inner()))
    })?;

    let mut prefs = OutputPrefs::default();
    let mut parameters = HashMap::new();
    for (k, v) in parsed.parameters.unwrap_or_default() {
        if k == "binary_data_output" {
            prefs.default_binary = v.as_bool().unwrap_or(false);
        } else if !HTTP_ONLY_PARAMS.contains(&k.as_str()) {
            parameters.insert(k.clone(), to_param(&format!("parameters.{k}"), &v)?);
        }
    }

    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    let mut raws = Vec::with_capacity(parsed.inputs.len());
    for inp in parsed.inputs {
        let name = inp.name;
        let dtype = DataType::parse(&inp.datatype).ok_or_else(|| {
            invalid(format!(
                "input '{name}': unknown datatype '{}'",
                inp.datatype
            ))
        })?;
        let mut params = HashMap::new();
        let mut binary_size = None;
        for (k, v) in inp.parameters.unwrap_or_default() {
            if k == "binary_data_size" {
                binary_size = Some(v.as_u64().ok_or_else(|| {
                    invalid(format!(
                        "input '{name}': binary_data_size must be a byte count"
                    ))
                })?);
            } else if k == "shared_memory_region" {
                return Err(invalid(format!(
                    "input '{name}': shared memory is not supported by infergate; send the data inline"
                )));
            } else if !HTTP_ONLY_PARAMS.contains(&k.as_str()) {
                params.insert(
                    k.clone(),
                    to_param(&format!("input '{name}' parameter {k}"), &v)?,
                );
            }
        }
        let raw = match (binary_size, &inp.data) {
            (Some(size), _) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > binary.len() {
                    return Err(invalid(format!(
                        "input '{name}': binary_data_size {size} exceeds the {} binary bytes left in the body",
                        binary.len()
                    )));
                }
                binary.split_to(size)
            }
            (None, Some(data)) => {
                let (raw, n) = tensor::json_to_raw(dtype, data)
                    .map_err(|e| invalid(format!("input '{name}' data: {e}")))?;
                if tensor::element_count(&inp.shape) != Some(n) {
                    return Err(invalid(format!(
                        "input '{name}': shape {} does not match the {n} elements of its data",
                        shape_str(&inp.shape)
                    )));
                }
                raw
            }
            (None, None) => {
                return Err(invalid(format!(
                    "input '{name}': no data and no binary_data_size"
                )));
            }
        };
        inputs.push(InferInputTensor {
            name,
            datatype: inp.datatype,
            shape: inp.shape,
            parameters: params,
            contents: None,
        });
        raws.push(raw);
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "the body has {} binary bytes that no input claims",
            binary.len()
        )));
    }

    let mut outputs = Vec::new();
    for out in parsed.outputs.unwrap_or_default() {
        let mut params = HashMap::new();
        for (k, v) in out.parameters.unwrap_or_default() {
            if k == "binary_data" {
                prefs
                    .per_output
                    .insert(out.name.clone(), v.as_bool().unwrap_or(false));
            } else if k == "shared_memory_region" {
                return Err(invalid(format!(
                    "output '{}': shared memory is not supported by infergate",
                    out.name
                )));
            } else if !HTTP_ONLY_PARAMS.contains(&k.as_str()) {
                params.insert(
                    k.clone(),
                    to_param(&format!("output '{}' parameter {k}", out.name), &v)?,
                );
            }
        }
        outputs.push(InferRequestedOutputTensor {
            name: out.name,
            parameters: params,
        });
    }

    let req = ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: parsed.id.unwrap_or_default(),
        parameters,
        inputs,
        outputs,
        raw_input_contents: raws,
    };
    Ok((req, prefs))
}

fn to_param(what: &str, v: &Value) -> Result<InferParameter, GatewayError> {
    crate::tensor::param_from_json(v).map_err(|e| invalid(format!("{what}: {e}")))
}

fn params_json(params: &HashMap<String, InferParameter>) -> Map<String, Value> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), crate::tensor::param_to_json(v)))
        .collect()
}

/// A protocol response as Triton's JSON body, all outputs inline (the task API's form).
pub fn response_json(resp: ModelInferResponse) -> Result<Value, GatewayError> {
    let (body, _) = encode_parts(resp, &OutputPrefs::default())?;
    Ok(Value::Object(body))
}

/// Encodes a protocol response as JSON, with binary outputs appended when asked for.
pub fn encode_response(
    resp: ModelInferResponse,
    prefs: &OutputPrefs,
) -> Result<Response, GatewayError> {
    let (body, tail) = encode_parts(resp, prefs)?;
    let header_json = serde_json::to_vec(&Value::Object(body))
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    finish_response(header_json, tail)
}

/// The JSON header of a response and the binary outputs that follow it.
fn encode_parts(
    resp: ModelInferResponse,
    prefs: &OutputPrefs,
) -> Result<(Map<String, Value>, Vec<Bytes>), GatewayError> {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut tail: Vec<Bytes> = Vec::new();
    for (i, out) in resp.outputs.iter().enumerate() {
        let dtype = DataType::parse(&out.datatype).ok_or_else(|| {
            GatewayError::Internal(format!(
                "Triton returned unknown datatype '{}'",
                out.datatype
            ))
        })?;
        let raw = match (resp.raw_output_contents.get(i), &out.contents) {
            (Some(raw), _) => raw.clone(),
            (None, Some(c)) => {
                tensor::contents_to_raw(dtype, c)
                    .map_err(GatewayError::Internal)?
                    .0
            }
            (None, None) => Bytes::new(),
        };
        let mut obj = Map::new();
        obj.insert("name".into(), json!(out.name));
        obj.insert("datatype".into(), json!(out.datatype));
        obj.insert("shape".into(), json!(out.shape));
        let mut params = params_json(&out.parameters);
        if prefs.binary(&out.name) {
            params.insert("binary_data_size".into(), json!(raw.len()));
            tail.push(raw);
        } else {
            let data = tensor::raw_to_json(dtype, &raw).map_err(|e| {
                GatewayError::Internal(format!("output '{}' from Triton: {e}", out.name))
            })?;
            obj.insert("data".into(), data);
        }
        if !params.is_empty() {
            obj.insert("parameters".into(), Value::Object(params));
        }
        outputs.push(Value::Object(obj));
    }
    let mut body = Map::new();
    body.insert("model_name".into(), json!(resp.model_name));
    body.insert("model_version".into(), json!(resp.model_version));
    if !resp.id.is_empty() {
        body.insert("id".into(), json!(resp.id));
    }
    if !resp.parameters.is_empty() {
        body.insert(
            "parameters".into(),
            Value::Object(params_json(&resp.parameters)),
        );
    }
    body.insert("outputs".into(), Value::Array(outputs));
    Ok((body, tail))
}

fn finish_response(header_json: Vec<u8>, tail: Vec<Bytes>) -> Result<Response, GatewayError> {
    if tail.is_empty() {
        return Ok((
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            header_json,
        )
            .into_response());
    }
    let mut buf =
        BytesMut::with_capacity(header_json.len() + tail.iter().map(Bytes::len).sum::<usize>());
    buf.extend_from_slice(&header_json);
    for t in &tail {
        buf.extend_from_slice(t);
    }
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_json.len()),
            ),
        ],
        buf.freeze(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(l) = len {
            h.insert(HEADER_LENGTH, HeaderValue::from(l));
        }
        h
    }

    #[test]
    fn json_inputs_become_raw_and_http_params_are_dropped() {
        let body = br#"{"id":"7","parameters":{"binary_data_output":true,"priority":2},
            "inputs":[{"name":"A","shape":[1,2],"datatype":"INT32","data":[[1,2]]}],
            "outputs":[{"name":"B","parameters":{"binary_data":false}}]}"#;
        let (req, prefs) =
            decode_request("m", "", &headers(None), Bytes::from_static(body)).unwrap();
        assert_eq!(req.id, "7");
        assert_eq!(
            req.raw_input_contents[0].as_ref(),
            &[1, 0, 0, 0, 2, 0, 0, 0]
        );
        assert!(req.parameters.contains_key("priority"));
        assert!(!req.parameters.contains_key("binary_data_output"));
        assert!(prefs.binary("other") && !prefs.binary("B"));
    }

    #[test]
    fn binary_inputs_are_sliced_in_order() {
        let json = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}},{"name":"B","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":1}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[1, 2, 3]);
        let (req, _) =
            decode_request("m", "", &headers(Some(json.len())), Bytes::from(body)).unwrap();
        assert_eq!(req.raw_input_contents[0].as_ref(), &[1, 2]);
        assert_eq!(req.raw_input_contents[1].as_ref(), &[3]);
    }

    #[test]
    fn bad_bodies_get_messages_naming_the_field() {
        let err = |body: &[u8], len: Option<usize>| {
            decode_request("m", "", &headers(len), Bytes::copy_from_slice(body))
                .unwrap_err()
                .to_string()
        };
        let e = err(
            br#"{"inputs":[{"name":"A","shape":[1.5],"datatype":"FP32","data":[1]}]}"#,
            None,
        );
        assert!(e.contains("inputs[0].shape"), "{e}");
        let e = err(
            br#"{"inputs":[{"name":"A","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
            None,
        );
        assert!(
            e.contains("input 'A': shape [3] does not match the 2 elements"),
            "{e}"
        );
        let header = br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":400}}]}"#;
        let e = err(header, Some(header.len()));
        assert!(e.contains("binary_data_size 400 exceeds"), "{e}");
        let e = err(br#"{"inputs":"#, Some(1000));
        assert!(e.contains("inference-header-content-length is 1000"), "{e}");
        let e = err(br#"{"inputs": [}"#, None);
        assert!(e.contains("malformed JSON"), "{e}");
    }

    #[test]
    fn outputs_encode_as_json_or_binary() {
        let resp = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            outputs: vec![
                crate::proto::inference::model_infer_response::InferOutputTensor {
                    name: "A".into(),
                    datatype: "INT32".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![Bytes::from_static(&[5, 0, 0, 0])],
            ..Default::default()
        };
        let r = encode_response(resp.clone(), &OutputPrefs::default()).unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let prefs = OutputPrefs {
            default_binary: true,
            ..Default::default()
        };
        let r = encode_response(resp, &prefs).unwrap();
        let len: usize = r.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(len > 0);
    }
}
