//! The HTTP/JSON API, with the same routes as Triton's (`/v2/...`), so tritonclient.http and
//! perf_analyzer work against it unchanged.

mod admin;
pub mod codec;
mod generate;
mod inference;
mod openai;
mod openai_batch;
mod openapi;
mod repository;
mod schema;
mod state;
pub mod tasks;

pub use state::{HttpState, ModelPath, TIMEOUT_HEADER};

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::{
    auth::Auth,
    health::Health,
    infer::InferService,
    telemetry::metrics::{ModelLabel, metrics},
};

pub fn router(state: HttpState) -> Router {
    let model_routes = |prefix: &str| {
        Router::new()
            .route(prefix, get(inference::model_metadata))
            .route(&format!("{prefix}/ready"), get(inference::model_ready))
            .route(&format!("{prefix}/config"), get(inference::model_config))
            .route(&format!("{prefix}/stats"), get(inference::model_stats))
            .route(&format!("{prefix}/infer"), post(inference::infer))
            .route(&format!("{prefix}/generate"), post(generate::generate))
            .route(
                &format!("{prefix}/generate_stream"),
                post(generate::generate_stream),
            )
    };
    let api = Router::new()
        .route("/v2", get(inference::server_metadata))
        .route("/v2/models/stats", get(inference::all_stats))
        .route("/v2/repository/index", post(inference::repository_index))
        .route("/v2/repository/models/{model}/load", post(repository::load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository::unload),
        )
        .merge(model_routes("/v2/models/{model}"))
        .merge(model_routes("/v2/models/{model}/versions/{version}"))
        .route("/v1/models/{model}/tasks", post(tasks::submit))
        .route(
            "/v1/models/{model}/versions/{version}/tasks",
            post(tasks::submit),
        )
        .route("/v1/tasks/{id}", get(tasks::get).delete(tasks::cancel))
        .route("/v1/tasks/{id}/result", get(tasks::result))
        .route("/v1/tasks/{id}/events", get(tasks::events))
        .route("/v1/admin/dead-letters", get(admin::list))
        .route(
            "/v1/admin/dead-letters/{id}",
            get(admin::get).delete(admin::delete),
        )
        .route("/v1/admin/dead-letters/replay", post(admin::replay))
        .route("/v1/admin/dead-letters/purge", post(admin::purge))
        // Every API route needs a key (when keys are configured) and a token of its tenant.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            authenticate,
        ));
    Router::new()
        .route("/v2/health/live", get(inference::live))
        .route("/v2/health/ready", get(inference::ready))
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
        .merge(openai::routes(Arc::clone(&state.auth)))
        // The infer handler enforces max_request_bytes itself, with a JSON error.
        .layer(DefaultBodyLimit::disable())
        .merge(ops_router(
            Arc::clone(&state.health),
            Some(state.infer.clone()),
        ))
        .fallback(unknown_path)
        .with_state(Arc::new(state))
}

/// Any other path: a JSON error, as every answer of this API (axum's own is an empty 404).
async fn unknown_path(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let error = format!("no route for {method} {}", uri.path());
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

/// Admits the request (API key, tenant rate) and records its tenant, or refuses it.
async fn authenticate(
    State(auth): State<Arc<Auth>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    state::admit(&auth, req, next, IntoResponse::into_response).await
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
