//! The Open Inference Protocol routes over HTTP/JSON, as Triton's (`/v2/...`).

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde_json::{Value, json};

use super::{
    codec, schema,
    state::{Params, Shared, model_and_version, read_body, timeout_header},
};
use crate::{
    api::{narrow_extensions, observed},
    auth::Caller,
    call::{Call, Deadline},
    error::GatewayError,
    proto::{
        inference::{ModelStatisticsRequest, RepositoryIndexRequest},
        to_triton_json,
    },
};

#[utoipa::path(
    get,
    path = "/v2/health/live",
    tag = "inference",
    responses((status = 200, description = "the process answers")),
)]
pub(super) async fn live() -> StatusCode {
    StatusCode::OK
}

#[utoipa::path(
    get,
    path = "/v2/health/ready",
    tag = "inference",
    responses(
        (status = 200, description = "a Triton endpoint is ready"),
        (status = 503, description = "no Triton endpoint is ready"),
    ),
)]
pub(super) async fn ready(State(s): State<Shared>) -> StatusCode {
    if s.pool().is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[utoipa::path(
    get,
    path = "/v2",
    tag = "inference",
    responses(
        (status = 200, body = schema::ServerMetadataBody),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn server_metadata(State(s): State<Shared>) -> Result<Json<Value>, GatewayError> {
    let md = s.pool().server_metadata().await?;
    Ok(Json(json!({
        "name": md.name,
        "version": md.version,
        "extensions": narrow_extensions(md.extensions),
    })))
}

#[utoipa::path(
    get,
    path = "/v2/models/{model}",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    responses(
        (status = 200, body = schema::ModelMetadataBody),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn model_metadata(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Json<Value>, GatewayError> {
    let (m, v) = model_and_version(p);
    Ok(Json(to_triton_json(
        &s.infer.model_metadata(&m, &v).await?,
        "inference.ModelMetadataResponse",
    )))
}

#[utoipa::path(
    get,
    path = "/v2/models/{model}/ready",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    responses(
        (status = 200, description = "ready"),
        (status = 400, description = "unknown or not ready (as Triton answers)", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 429, description = "over the tenant's rate; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    )
)]
pub(super) async fn model_ready(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    Ok(if s.infer.model_ready(&m, &v).await? {
        StatusCode::OK.into_response()
    } else {
        // Triton answers 400 for a model that is unknown or not ready; clients expect that.
        let error = format!("model '{m}' (version '{v}') is not ready");
        (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
    })
}

#[utoipa::path(
    get,
    path = "/v2/models/{model}/config",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    responses(
        (status = 200, description = "Triton's model configuration", body = Object),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn model_config(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Json<Value>, GatewayError> {
    let (m, v) = model_and_version(p);
    let cfg = s.infer.model_config(&m, &v).await?;
    Ok(Json(to_triton_json(
        &cfg.config.unwrap_or_default(),
        "inference.ModelConfig",
    )))
}

#[utoipa::path(
    get,
    path = "/v2/models/{model}/stats",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    responses(
        (status = 200, description = "Triton's statistics, summed over endpoints", body = Object),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn model_stats(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Json<Value>, GatewayError> {
    let (name, version) = model_and_version(p);
    let stats = s
        .pool()
        .model_statistics(ModelStatisticsRequest { name, version })
        .await?;
    Ok(Json(to_triton_json(
        &stats,
        "inference.ModelStatisticsResponse",
    )))
}

#[utoipa::path(
    get,
    path = "/v2/models/stats",
    tag = "inference",
    responses(
        (status = 200, description = "statistics of every model", body = Object),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn all_stats(State(s): State<Shared>) -> Result<Json<Value>, GatewayError> {
    let stats = s
        .pool()
        .model_statistics(ModelStatisticsRequest::default())
        .await?;
    Ok(Json(to_triton_json(
        &stats,
        "inference.ModelStatisticsResponse",
    )))
}

#[utoipa::path(
    post,
    path = "/v2/repository/index",
    tag = "inference",
    request_body(content = Option<schema::RepositoryIndexBody>),
    responses(
        (status = 200, description = "the models of the repository", body = Vec<Object>),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn repository_index(
    State(s): State<Shared>,
    body: Bytes,
) -> Result<Json<Value>, GatewayError> {
    let ready = if body.is_empty() {
        false
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| GatewayError::invalid(format!("malformed JSON request: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let index = s
        .pool()
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready,
        })
        .await?;
    Ok(Json(Value::Array(
        index
            .models
            .iter()
            .map(|m| to_triton_json(m, "inference.RepositoryIndexResponse.ModelIndex"))
            .collect(),
    )))
}

#[utoipa::path(
    post,
    path = "/v2/models/{model}/infer",
    tag = "inference",
    params(
        ("model" = String, Path, description = "model name"),
        ("Infergate-Timeout-Ms" = Option<u64>, Header, description = "deadline in milliseconds"),
    ),
    request_body(content = schema::InferRequestBody, description = "JSON, or JSON + binary tensors (binary extension)"),
    responses(
        (status = 200, body = schema::InferResponseBody),
        (status = 413, description = "body over server.max_request_bytes", body = schema::ErrorBody),
        (status = 504, description = "deadline passed", body = schema::ErrorBody),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = schema::ErrorBody),
    ),
)]
pub(super) async fn infer(
    State(s): State<Shared>,
    Path(p): Params,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    let work = async {
        let bytes = read_body(body, &headers, s.max_request_bytes).await?;
        let (mut req, prefs) = codec::decode_request(&m, &v, &headers, bytes)?;
        let call = Call::sync(timeout_header(&headers)?.and_then(Deadline::after));
        let call = s
            .infer
            .at_edge(&mut req, &headers, Some(&caller.tenant), call);
        let resp = s.infer.infer(req, call).await?;
        let hit = crate::cache::is_hit(&resp);
        let mut out = codec::encode_response(resp, &prefs)?.into_response();
        if hit {
            out.headers_mut()
                .insert("infergate-cache", http::HeaderValue::from_static("hit"));
        }
        Ok(out)
    };
    observed("http infer", "http", &m, &headers, work).await
}
