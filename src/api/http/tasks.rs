//! The async task API over HTTP.
//!
//! | call | answers |
//! |---|---|
//! | `POST /v1/models/{m}[/versions/{v}]/tasks` (body as for `/infer`) | 202 `{id, status, ...}` with `Location` and `Retry-After`; the same `Idempotency-Key` again: 202 with the existing task and `Idempotent-Replayed: true`; 400/404 for a bad request (checked before queueing); 429 when the queue is full; 503 when the broker or task store is unreachable |
//! | `GET /v1/tasks/{id}` | 200 with state, timestamps (ms since the epoch), attempts, error, and the inference response once succeeded; 404 if unknown or expired |
//! | `DELETE /v1/tasks/{id}` | 200 with the cancelled task; 409 if it already finished; 404 if unknown |

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use prost::Message;
use serde_json::{Value, json};

use super::{HttpState, codec, read_body};
use crate::{
    error::GatewayError,
    proto::inference::ModelInferResponse,
    queue::{Broker, QueueError, TaskMessage},
    tasks::{Change, StoreError, TaskRecord, TaskState, TaskStore, new_task_id},
};

/// The async side of the HTTP state: where tasks are kept and queued.
#[derive(Clone)]
pub struct TaskApi {
    pub store: Arc<dyn TaskStore>,
    pub broker: Arc<dyn Broker>,
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Tenants arrive with authentication; until then every caller is this one.
const DEFAULT_TENANT: &str = "default";

fn store_error(e: StoreError) -> GatewayError {
    match e {
        StoreError::NotFound(id) => GatewayError::invalid(format!("task {id} not found")),
        StoreError::Backend(m) => GatewayError::Unavailable(format!("task store unavailable: {m}")),
        other => GatewayError::Internal(other.to_string()),
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("task '{id}' not found")})),
    )
        .into_response()
}

async fn task_json(store: &dyn TaskStore, rec: &TaskRecord) -> Value {
    let mut v = json!({
        "id": rec.id,
        "model": rec.model,
        "version": rec.version,
        "status": rec.state.as_str(),
        "attempts": rec.attempts,
        "queued_at_ms": rec.queued_at_ms,
        "started_at_ms": rec.started_at_ms,
        "finished_at_ms": rec.finished_at_ms,
        "error": rec.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
    });
    if rec.state == TaskState::Succeeded
        && let Ok(Some(bytes)) = store.result(&rec.id).await
        && let Ok(resp) = ModelInferResponse::decode(bytes)
        && let Ok(body) = codec::response_json(&resp)
    {
        v["response"] = body;
    }
    v
}

fn accepted(body: Value, id: &str, replayed: bool) -> Response {
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = r.headers_mut();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/tasks/{id}")) {
        h.insert(header::LOCATION, loc);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

/// The request's `priority` parameter (Triton's: 1 is highest, 0 default) as a broker priority
/// (0..=9, 9 highest; default 4).
fn broker_priority(req: &crate::proto::inference::ModelInferRequest) -> u8 {
    use crate::proto::inference::infer_parameter::ParameterChoice;
    let level = match req
        .parameters
        .get("priority")
        .and_then(|p| p.parameter_choice.clone())
    {
        Some(ParameterChoice::Int64Param(v)) if v > 0 => v as u64,
        Some(ParameterChoice::Uint64Param(v)) if v > 0 => v,
        _ => return 4,
    };
    9u64.saturating_sub(level - 1).min(9) as u8
}

pub async fn submit(
    State(s): State<HttpState>,
    Path(p): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let tasks = s
        .tasks
        .as_ref()
        .ok_or_else(|| GatewayError::Unavailable("async tasks are not enabled".into()))?;
    let (model, version) = super::model_and_version(&p);
    let bytes = read_body(body, &headers, s.max_request_bytes).await?;
    let (mut req, _) = codec::decode_request(&model, &version, &headers, bytes)?;
    // Bad requests are refused now, not turned into failed tasks.
    s.infer.check(&mut req).await?;
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 256)
                .map(str::to_string)
                .ok_or_else(|| {
                    GatewayError::invalid(
                        "header Idempotency-Key must be 1..256 visible characters",
                    )
                })
        })
        .transpose()?;
    let rec = TaskRecord::new(new_task_id(), DEFAULT_TENANT, &model, &version, key);
    let (rec, created) = tasks.store.create(rec).await.map_err(store_error)?;
    if !created {
        let body = task_json(tasks.store.as_ref(), &rec).await;
        return Ok(accepted(body, &rec.id, true));
    }
    let msg = TaskMessage {
        priority: broker_priority(&req),
        task_id: rec.id.clone(),
        model: model.clone(),
        payload: req.encode_to_vec().into(),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    if let Err(e) = tasks.broker.publish(&msg).await {
        // Not queued, so not accepted: forget the record and say why.
        let _ = tasks.store.remove(&rec.id).await;
        return Err(match e {
            QueueError::Full(n) => {
                GatewayError::Overloaded(format!("the task queue is full ({n} tasks waiting)"))
            }
            QueueError::Backend(m) => GatewayError::Unavailable(format!("broker unavailable: {m}")),
        });
    }
    let body = task_json(tasks.store.as_ref(), &rec).await;
    Ok(accepted(body, &rec.id, false))
}

pub async fn get(
    State(s): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let tasks = s
        .tasks
        .as_ref()
        .ok_or_else(|| GatewayError::Unavailable("async tasks are not enabled".into()))?;
    match tasks.store.get(&id).await.map_err(store_error)? {
        Some(rec) => Ok(Json(task_json(tasks.store.as_ref(), &rec).await).into_response()),
        None => Ok(not_found(&id)),
    }
}

pub async fn cancel(
    State(s): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let tasks = s
        .tasks
        .as_ref()
        .ok_or_else(|| GatewayError::Unavailable("async tasks are not enabled".into()))?;
    match tasks.store.transition(&id, TaskState::Cancelled, Change::default()).await {
        Ok(rec) => Ok(Json(task_json(tasks.store.as_ref(), &rec).await).into_response()),
        Err(StoreError::NotFound(_)) => Ok(not_found(&id)),
        Err(StoreError::Conflict { from, .. }) => Ok((
            StatusCode::CONFLICT,
            Json(json!({"error": format!("task '{id}' is already {} and cannot be cancelled", from.as_str())})),
        )
            .into_response()),
        Err(e) => Err(store_error(e)),
    }
}
