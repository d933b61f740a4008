//! The async task API over HTTP (the logic is in [`crate::tasks::front`]).
//!
//! | call | answers |
//! |---|---|
//! | `POST /v1/models/{m}[/versions/{v}]/tasks` (body as for `/infer`) | 202 `{id, status, ...}` with `Location` and `Retry-After`; the same `Idempotency-Key` again: 202 with the existing task and `Idempotent-Replayed: true`; 400/404 for a bad request (checked before queueing); 413 over the size limit; 429 when the queue is full; 503 when the broker or task store is unreachable |
//! | `GET /v1/tasks/{id}` | 200 with state, timestamps (ms since the epoch), attempts, error, and the inference response once succeeded; 404 if unknown or expired |
//! | `DELETE /v1/tasks/{id}` | 200 with the cancelled task; 409 if it already finished; 404 if unknown |

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{
    codec, schema,
    state::{HttpState, ModelPath, Shared, model_and_version, read_body},
};
use crate::{
    api::{header_text, traced},
    auth::Caller,
    error::GatewayError,
    tasks::{
        TaskError, TaskRecord,
        front::{Cancelled, TaskFront, TaskResult},
        result_url,
    },
    telemetry::trace::TraceHeaders,
};

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Where the final state is POSTed (completion webhook).
const CALLBACK_URL: &str = "callback-url";

fn front(s: &HttpState) -> Result<&TaskFront, GatewayError> {
    s.tasks
        .as_ref()
        .ok_or_else(|| GatewayError::Unavailable("async tasks are not enabled".into()))
}

fn not_found(id: &str) -> Response {
    GatewayError::TaskNotFound(id.to_string()).into_response()
}

/// A task as the API shows it (`schema::TaskBody` documents it). Serialized as it is, not
/// built as a JSON tree first: every submit and poll answers with one.
#[derive(serde::Serialize)]
struct TaskJson<'a> {
    id: &'a str,
    model: &'a str,
    version: &'a str,
    status: &'static str,
    attempts: u32,
    queued_at_ms: u64,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    error: Option<&'a TaskError>,
    /// Attempts that ended (not on a fresh task, so a submit's answer stays small).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    history: &'a [crate::tasks::Attempt],
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<Value>,
    /// Set instead of `response` when the result is in the blob store (claim check).
    #[serde(skip_serializing_if = "Option::is_none")]
    result_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<&'a crate::tasks::WebhookStatus>,
}

fn task_json(rec: &TaskRecord, result: Option<TaskResult>) -> Json<TaskJson<'_>> {
    let (resp, result_url, result_bytes) = match result {
        Some(TaskResult::Inline(r)) => (Some(r), None, None),
        Some(TaskResult::Stored(s)) => (None, Some(result_url(&rec.id)), Some(s.bytes)),
        None => (None, None, None),
    };
    Json(TaskJson {
        result_url,
        result_bytes,
        callback_url: rec.callback_url.as_deref(),
        webhook: rec.webhook.as_ref(),
        id: &rec.id,
        model: &rec.model,
        version: &rec.version,
        status: rec.state.as_str(),
        attempts: rec.attempts,
        queued_at_ms: rec.queued_at_ms,
        started_at_ms: rec.started_at_ms,
        finished_at_ms: rec.finished_at_ms,
        error: rec.error.as_ref(),
        history: &rec.history,
        response: resp.and_then(|r| codec::response_json(r).ok()),
    })
}

#[utoipa::path(
    post,
    path = "/v1/models/{model}/tasks",
    tag = "tasks",
    params(
        ("model" = String, Path, description = "model name"),
        ("Idempotency-Key" = Option<String>, Header, description = "1..=256 characters; the same key from the same tenant returns the same task"),
        ("Callback-Url" = Option<String>, Header, description = "POSTed the task, signed (webhook-id, webhook-timestamp, webhook-signature), once it is final; its host must be on webhooks.allow_hosts (400 otherwise)"),
    ),
    request_body(content = schema::InferRequestBody),
    responses(
        (status = 202, description = "queued; Location names the task", body = schema::TaskBody),
        (status = 400, description = "malformed request; the message names the field", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "unknown model", body = schema::ErrorBody),
        (status = 413, description = "body over server.max_request_bytes", body = schema::ErrorBody),
        (status = 429, description = "rate, open-task quota or queue full; see Retry-After", body = schema::ErrorBody),
        (status = 503, description = "broker or task store unavailable, or tasks not enabled", body = schema::ErrorBody),
    ),
)]
pub async fn submit(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let front = front(&s)?;
    let (model, version) = model_and_version(p);
    let bytes = read_body(body, &headers, s.max_request_bytes).await?;
    let (mut req, _) = codec::decode_request(&model, &version, &headers, bytes)?;
    front.stick(&mut req, &headers);
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| GatewayError::invalid("header Idempotency-Key must be visible ASCII"))
        })
        .transpose()?;
    let callback = headers
        .get(CALLBACK_URL)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| GatewayError::invalid("header Callback-Url must be visible ASCII"))
        })
        .transpose()?;
    let incoming = TraceHeaders {
        traceparent: header_text(&headers, "traceparent"),
        tracestate: header_text(&headers, "tracestate"),
    };
    let (rec, created) = traced(
        "http task submit",
        "http",
        &model,
        &headers,
        front.submit(req, key, callback, incoming, &caller),
    )
    .await?;
    let mut r = (StatusCode::ACCEPTED, task_json(&rec, None)).into_response();
    let h = r.headers_mut();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/tasks/{}", rec.id)) {
        h.insert(header::LOCATION, loc);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if !created {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(r)
}

#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = schema::TaskBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "no such task (or another tenant's)", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn get(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(match front(&s)?.get(&id, &caller.tenant).await? {
        Some((rec, resp)) => task_json(&rec, resp).into_response(),
        None => not_found(&id),
    })
}

#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/result",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "the succeeded task's result, an encoded inference.ModelInferResponse (protobuf), streamed from the blob store when it is kept there", content_type = "application/x-protobuf", body = Vec<u8>),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "no such task (or another tenant's), or not succeeded", body = schema::ErrorBody),
        (status = 503, description = "task store or blob store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn result(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let Some((len, chunks)) = front(&s)?.result_stream(&id, &caller.tenant).await? else {
        return Ok(not_found(&id));
    };
    let mut r = Body::from_stream(chunks).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(r)
}

#[utoipa::path(
    delete,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "cancelled", body = schema::TaskBody),
        (status = 409, description = "already finished", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "no such task (or another tenant's)", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn cancel(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(match front(&s)?.cancel(&id, &caller.tenant).await? {
        Cancelled::Done(rec) => task_json(&rec, None).into_response(),
        Cancelled::NotFound => not_found(&id),
        Cancelled::AlreadyFinal(state) => GatewayError::TaskFinal {
            id,
            state: state.as_str(),
        }
        .into_response(),
    })
}
