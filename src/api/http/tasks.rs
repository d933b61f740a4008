//! The async task API over HTTP (the logic is in [`crate::tasks::front`]).
//!
//! | call | answers |
//! |---|---|
//! | `POST /v1/models/{m}[/versions/{v}]/tasks` (body as for `/infer`) | 202 `{id, status, ...}` with `Location` and `Retry-After`; the same `Idempotency-Key` again: 202 with the existing task and `Idempotent-Replayed: true`; 400/404 for a bad request (checked before queueing); 413 over the size limit; 429 when the queue is full; 503 when the broker or task store is unreachable |
//! | `GET /v1/tasks/{id}` | 200 with state, timestamps (ms since the epoch), attempts, error, and the inference response once succeeded; 404 if unknown or expired |
//! | `DELETE /v1/tasks/{id}` | 200 with the cancelled task; 409 if it already finished; 404 if unknown |
//! | `GET /v1/tasks/{id}/events` | server-sent events until the task is final: its states and, for a decoupled model, each response from the first |

use prost::Message;

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    codec, schema,
    state::{HttpState, ModelPath, Shared, model_and_version, read_body},
};
use crate::{
    api::{header_text, traced},
    auth::Caller,
    error::GatewayError,
    proto::inference::ModelInferResponse,
    tasks::{
        TaskRecord,
        follow::Followed,
        front::{Cancelled, TaskFront, TaskResult},
        result_url,
        view::TaskView,
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

/// A task as the API shows it ([`TaskView`], which the OpenAPI document's `TaskBody` is derived from), with its
/// result inline or where to read it.
fn task_json(rec: &TaskRecord, result: Option<TaskResult>) -> Json<TaskView<'_>> {
    let mut view = TaskView::of(rec);
    match result {
        Some(TaskResult::Inline(r)) => view.response = codec::response_json(r).ok(),
        Some(TaskResult::Stored(s)) => {
            view.result_url = Some(result_url(&rec.id));
            view.result_bytes = Some(s.bytes);
        }
        None => {}
    }
    Json(view)
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
        (status = 202, description = "queued; Location names the task", body = TaskView),
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
        (status = 200, body = TaskView),
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
        (status = 200, description = "cancelled", body = TaskView),
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

#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/events",
    tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, description = "server-sent events until the task is final: `event: state` with the task (as GET /v1/tasks/{id}) at each change, and for a decoupled model `event: response` with `{index, attempt, response}` per response kept, from the first (a client that comes back replays them)", content_type = "text/event-stream"),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "no such task (or another tenant's)", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn events(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    use futures::StreamExt;
    let front = front(&s)?;
    if front.get(&id, &caller.tenant).await?.is_none() {
        return Ok(not_found(&id));
    }
    let events = front
        .follow(
            &id,
            &caller.tenant,
            crate::tasks::follow::RESPONSE_POLL,
            std::time::Duration::from_secs(3600),
        )
        .map(|item| {
            let (name, data) = match item {
                Ok(Followed::State(rec)) => (
                    "state",
                    serde_json::to_value(TaskView::of(&rec)).unwrap_or_default(),
                ),
                Ok(Followed::Response {
                    index,
                    attempt,
                    response,
                }) => match ModelInferResponse::decode(response)
                    .map_err(|e| {
                        GatewayError::Internal(format!("a kept response does not decode: {e}"))
                    })
                    .and_then(codec::response_json)
                {
                    Ok(r) => (
                        "response",
                        serde_json::json!({"index": index, "attempt": attempt, "response": r}),
                    ),
                    Err(e) => ("error", serde_json::json!({ "error": e.to_string() })),
                },
                Err(e) => ("error", serde_json::json!({ "error": e.to_string() })),
            };
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!(
                "event: {name}\ndata: {data}\n\n"
            )))
        });
    let mut r = Body::from_stream(events).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}
