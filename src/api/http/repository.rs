//! Model control over HTTP, Triton's repository extension: `POST
//! /v2/repository/models/{model}/load` and `/unload`, on every endpoint ([`crate::fleet`]).
//! 200 when every endpoint did it; otherwise the first failure's status, and in both cases
//! each endpoint's outcome.

use std::collections::HashMap;

use axum::{
    Extension, Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use super::{schema, state::Shared};
use crate::{
    auth::Caller,
    error::GatewayError,
    fleet::Action,
    proto::inference::{ModelRepositoryParameter, model_repository_parameter::ParameterChoice},
};

#[utoipa::path(
    post,
    path = "/v2/repository/models/{model}/load",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    request_body(content = Option<schema::ModelControlBody>),
    responses(
        (status = 200, description = "loaded on every endpoint", body = schema::ModelControlAnswer),
        (status = 400, description = "malformed request, or an endpoint refused; each endpoint's outcome", body = schema::ModelControlError),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not an admin key, or an endpoint does not know the model", body = schema::ModelControlError),
        (status = 500, description = "an endpoint failed", body = schema::ModelControlError),
        (status = 503, description = "an endpoint did not answer", body = schema::ModelControlError),
        (status = 504, description = "an endpoint did not finish in fleet.control_timeout_ms", body = schema::ModelControlError),
    ),
)]
pub(super) async fn load(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<Response, GatewayError> {
    control(&s, &caller, Action::Load, &model, &body).await
}

#[utoipa::path(
    post,
    path = "/v2/repository/models/{model}/unload",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    request_body(content = Option<schema::ModelControlBody>),
    responses(
        (status = 200, description = "unloaded on every endpoint", body = schema::ModelControlAnswer),
        (status = 400, description = "malformed request, or an endpoint refused; each endpoint's outcome", body = schema::ModelControlError),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not an admin key, or an endpoint does not know the model", body = schema::ModelControlError),
        (status = 500, description = "an endpoint failed", body = schema::ModelControlError),
        (status = 503, description = "an endpoint did not answer", body = schema::ModelControlError),
        (status = 504, description = "an endpoint did not finish in fleet.control_timeout_ms", body = schema::ModelControlError),
    ),
)]
pub(super) async fn unload(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
    body: Bytes,
) -> Result<Response, GatewayError> {
    control(&s, &caller, Action::Unload, &model, &body).await
}

async fn control(
    s: &Shared,
    caller: &Caller,
    action: Action,
    model: &str,
    body: &[u8],
) -> Result<Response, GatewayError> {
    let parameters = parameters(body)?;
    let outcome = s
        .features
        .fleet
        .control(caller, action, "", model, parameters)
        .await?;
    let endpoints = outcome.endpoints_json();
    Ok(match outcome.error() {
        None => Json(json!({ "model": model, "action": action.name(), "endpoints": endpoints }))
            .into_response(),
        Some(e) => (
            e.http_status(),
            Json(json!({ "error": e.to_string(), "endpoints": endpoints })),
        )
            .into_response(),
    })
}

/// `{"parameters": {...}}` as Triton's HTTP front reads it: strings, booleans and integers;
/// a `file:` key's string is base64 for its bytes.
fn parameters(body: &[u8]) -> Result<HashMap<String, ModelRepositoryParameter>, GatewayError> {
    if body.is_empty() {
        return Ok(HashMap::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::invalid(format!("malformed JSON request: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(GatewayError::invalid(
            "the request body is not a JSON object",
        ));
    };
    let Some(params) = obj.get("parameters") else {
        return Ok(HashMap::new());
    };
    let Some(params) = params.as_object() else {
        return Err(GatewayError::invalid("'parameters' is not a JSON object"));
    };
    params
        .iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::String(s) if k.starts_with("file:") => ParameterChoice::BytesParam(
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| {
                            GatewayError::invalid(format!("parameter '{k}' is not base64: {e}"))
                        })?
                        .into(),
                ),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::Number(n) if n.is_i64() => {
                    ParameterChoice::Int64Param(n.as_i64().unwrap_or_default())
                }
                _ => {
                    return Err(GatewayError::invalid(format!(
                        "parameter '{k}' must be a string, a boolean or an integer"
                    )));
                }
            };
            Ok((
                k.clone(),
                ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_as_triton_reads_them() {
        assert!(parameters(b"").unwrap().is_empty());
        let p = parameters(
            br#"{"parameters": {"config": "{}", "unload_dependents": true, "n": 3, "file:1/m.txt": "aGk="}}"#,
        )
        .unwrap();
        let choice = |k: &str| p[k].parameter_choice.clone().unwrap();
        assert_eq!(choice("config"), ParameterChoice::StringParam("{}".into()));
        assert_eq!(
            choice("unload_dependents"),
            ParameterChoice::BoolParam(true)
        );
        assert_eq!(choice("n"), ParameterChoice::Int64Param(3));
        assert_eq!(
            choice("file:1/m.txt"),
            ParameterChoice::BytesParam(Bytes::from_static(b"hi"))
        );
        for bad in [
            &br#"{"parameters": {"x": 1.5}}"#[..],
            br#"{"parameters": {"file:a": "%%"}}"#,
            br#"{"parameters": 3}"#,
            b"[",
        ] {
            let e = parameters(bad).unwrap_err();
            assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument, "{e}");
        }
        let e = parameters(br#"{"parameters": {"x": 1.5}}"#).unwrap_err();
        assert!(e.to_string().contains("'x'"), "{e}");
    }
}
