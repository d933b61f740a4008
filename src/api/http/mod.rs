//! The HTTP/JSON API, with the same routes as Triton's (`/v2/...`), so tritonclient.http and
//! perf_analyzer work against it unchanged.

pub mod codec;
pub mod openapi;
pub mod tasks;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    api::{narrow_extensions, observed},
    auth::Auth,
    backend::triton::TritonPool,
    error::GatewayError,
    health::Health,
    infer::InferService,
    proto::{
        inference::{ModelStatisticsRequest, RepositoryIndexRequest},
        to_triton_json,
    },
    telemetry::metrics::{ModelLabel, metrics},
};

#[derive(Clone)]
pub struct HttpState {
    pub infer: InferService,
    pub max_request_bytes: usize,
    /// The async task API; `None` when no broker/task store is configured.
    pub tasks: Option<crate::tasks::front::TaskFront>,
    pub health: Arc<Health>,
    pub auth: Arc<Auth>,
}

impl HttpState {
    fn pool(&self) -> &Arc<TritonPool> {
        self.infer.backend()
    }
}

/// What the handlers share. Behind one `Arc` because axum clones the state for every request.
type Shared = Arc<HttpState>;

/// `{model}` and, on the versioned routes, `{version}` ("" when absent: Triton's default).
#[derive(serde::Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: String,
}

type Params = Path<ModelPath>;

pub(crate) fn model_and_version(p: ModelPath) -> (String, String) {
    (p.model, p.version)
}

pub fn router(state: HttpState) -> Router {
    let model_routes = |prefix: &str| {
        Router::new()
            .route(prefix, get(model_metadata))
            .route(&format!("{prefix}/ready"), get(model_ready))
            .route(&format!("{prefix}/config"), get(model_config))
            .route(&format!("{prefix}/stats"), get(model_stats))
            .route(&format!("{prefix}/infer"), post(infer))
    };
    let api = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/repository/index", post(repository_index))
        .merge(model_routes("/v2/models/{model}"))
        .merge(model_routes("/v2/models/{model}/versions/{version}"))
        .route("/v1/models/{model}/tasks", post(tasks::submit))
        .route(
            "/v1/models/{model}/versions/{version}/tasks",
            post(tasks::submit),
        )
        .route("/v1/tasks/{id}", get(tasks::get).delete(tasks::cancel))
        // Every API route needs a key (when keys are configured) and a token of its tenant.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            authenticate,
        ));
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi::document(),
                )
            }),
        )
        .merge(api)
        // The infer handler enforces max_request_bytes itself, with a JSON error.
        .layer(DefaultBodyLimit::disable())
        .merge(ops_router(
            Arc::clone(&state.health),
            Some(state.infer.clone()),
        ))
        .with_state(Arc::new(state))
}

/// Admits the request (API key, tenant rate) and records its tenant, or refuses it.
async fn authenticate(
    State(auth): State<Arc<Auth>>,
    mut req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    match auth.admit_http(req.headers()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Probes and metrics: `/livez`, `/readyz`, `/metrics` (also served by `infergate worker`).
/// What each probe checks, and why, is in [`crate::health`].
pub fn ops_router<S: Clone + Send + Sync + 'static>(
    health: Arc<Health>,
    infer: Option<InferService>,
) -> Router<S> {
    let readyz = {
        let health = Arc::clone(&health);
        move || async move {
            let r = health.readiness();
            let code = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(r))
        }
    };
    let scrape = move || async move {
        let m = metrics();
        if let Some(infer) = &infer {
            for (model, depth) in infer.queue_depths() {
                m.batch_queue_depth
                    .get_or_create(&ModelLabel { model })
                    .set(depth as i64);
            }
        }
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        )
    };
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
}

#[utoipa::path(
    get,
    path = "/v2/health/live",
    tag = "inference",
    responses((status = 200, description = "the process answers")),
)]
async fn live() -> StatusCode {
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
async fn ready(State(s): State<Shared>) -> StatusCode {
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
        (status = 200, body = openapi::ServerMetadataBody),
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn server_metadata(State(s): State<Shared>) -> Result<Json<Value>, GatewayError> {
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
        (status = 200, body = openapi::ModelMetadataBody),
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn model_metadata(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Json<Value>, GatewayError> {
    let (m, v) = model_and_version(p);
    Ok(Json(to_triton_json(
        &s.pool().model_metadata(&m, &v).await?,
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
        (status = 400, description = "unknown or not ready (as Triton answers)", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 429, description = "over the tenant's rate; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    )
)]
async fn model_ready(State(s): State<Shared>, Path(p): Params) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    Ok(if s.pool().model_ready(&m, &v).await? {
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
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn model_config(
    State(s): State<Shared>,
    Path(p): Params,
) -> Result<Json<Value>, GatewayError> {
    let (m, v) = model_and_version(p);
    let cfg = s.pool().model_config(&m, &v).await?;
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
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn model_stats(
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
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn all_stats(State(s): State<Shared>) -> Result<Json<Value>, GatewayError> {
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
    request_body(content = Option<openapi::RepositoryIndexBody>),
    responses(
        (status = 200, description = "the models of the repository", body = Vec<Object>),
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn repository_index(
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

pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let too_large = || {
        GatewayError::PayloadTooLarge(format!(
            "request body exceeds the limit of {limit} bytes (server.max_request_bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())
}

/// The HTTP way to give a deadline: `Infergate-Timeout-Ms: <milliseconds>` (gRPC clients use
/// the standard `grpc-timeout`). Triton's `timeout` request parameter (µs) is honoured too.
pub const TIMEOUT_HEADER: &str = "infergate-timeout-ms";

fn timeout_header(headers: &HeaderMap) -> Result<Option<std::time::Duration>, GatewayError> {
    let Some(v) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|ms| Some(std::time::Duration::from_millis(ms)))
        .ok_or_else(|| {
            GatewayError::invalid(format!(
                "header {TIMEOUT_HEADER} must be a whole number of milliseconds"
            ))
        })
}

#[utoipa::path(
    post,
    path = "/v2/models/{model}/infer",
    tag = "inference",
    params(
        ("model" = String, Path, description = "model name"),
        ("Infergate-Timeout-Ms" = Option<u64>, Header, description = "deadline in milliseconds"),
    ),
    request_body(content = openapi::InferRequestBody, description = "JSON, or JSON + binary tensors (binary extension)"),
    responses(
        (status = 200, body = openapi::InferResponseBody),
        (status = 413, description = "body over server.max_request_bytes", body = openapi::ErrorBody),
        (status = 504, description = "deadline passed", body = openapi::ErrorBody),
        (status = 400, description = "malformed request; the message names the field", body = openapi::ErrorBody),
        (status = 401, description = "no valid API key", body = openapi::ErrorBody),
        (status = 404, description = "unknown model", body = openapi::ErrorBody),
        (status = 429, description = "over a rate, quota or queue limit; see Retry-After", body = openapi::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = openapi::ErrorBody),
    ),
)]
async fn infer(
    State(s): State<Shared>,
    Path(p): Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    let work = async {
        let bytes = read_body(body, &headers, s.max_request_bytes).await?;
        let (req, prefs) = codec::decode_request(&m, &v, &headers, bytes)?;
        let resp = s.infer.infer(req, timeout_header(&headers)?).await?;
        Ok(codec::encode_response(resp, &prefs)?.into_response())
    };
    observed("http infer", "http", &m, &headers, work).await
}
