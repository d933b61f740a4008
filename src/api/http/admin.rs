//! The admin API over HTTP (logic in [`crate::tasks::admin`]): dead letters to list, read,
//! replay and purge. Callers without an admin key get 404, as for anything not theirs.
//!
//! | call | answers |
//! |---|---|
//! | `GET /v1/admin/dead-letters?model=&tenant=&since_ms=&until_ms=&limit=` | 200 `{depth, dropped, dead_letters: [...]}`, oldest first, at most `limit` (100; ≤ 1000) |
//! | `GET /v1/admin/dead-letters/{id}` | 200 with the task as it failed (error, history), the reason and when; 404 if not there |
//! | `DELETE /v1/admin/dead-letters/{id}` | 200 `{purged: 1}`; 404 if not there |
//! | `POST /v1/admin/dead-letters/replay` `{ids}` or `{model, tenant, since_ms, until_ms, limit}` or `{all: true}` | 200 `{replayed: [ids], refused: [{id, reason}]}` |
//! | `POST /v1/admin/dead-letters/purge` (the same selection) | 200 `{purged: n}` |

use axum::{
    Extension, Json,
    body::{Body, to_bytes},
    extract::{Path, Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use super::{schema, state::Shared};
use crate::{
    auth::Caller,
    error::GatewayError,
    tasks::{
        admin::{Replayed, Selection},
        dead::DeadFilter,
        front::TaskFront,
        view::DeadView,
    },
};

/// A selection body is a few ids or a filter: 1 MiB is plenty.
const MAX_BODY: usize = 1 << 20;

fn front(s: &super::HttpState) -> Result<&TaskFront, GatewayError> {
    s.tasks
        .as_ref()
        .ok_or_else(|| GatewayError::Unavailable("async tasks are not enabled".into()))
}

#[derive(Serialize)]
struct ListJson<'a> {
    depth: u64,
    dropped: u64,
    dead_letters: Vec<DeadView<'a>>,
}

async fn selection(body: Body) -> Result<Selection, GatewayError> {
    let bytes = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge(format!("body over {MAX_BODY} bytes")))?;
    if bytes.is_empty() {
        return Ok(Selection::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| GatewayError::invalid(format!("body: {e}")))
}

#[utoipa::path(
    get,
    path = "/v1/admin/dead-letters",
    tag = "admin",
    params(
        ("model" = Option<String>, Query, description = "only this model's"),
        ("tenant" = Option<String>, Query, description = "only this tenant's"),
        ("since_ms" = Option<u64>, Query, description = "dead-lettered at or after (ms since the epoch)"),
        ("until_ms" = Option<u64>, Query, description = "dead-lettered before (ms since the epoch)"),
        ("limit" = Option<u32>, Query, description = "at most this many (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, body = schema::DeadLetterListBody),
        (status = 400, description = "a malformed filter; the message names it", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not an admin key", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    filter: Result<Query<DeadFilter>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let Query(filter) = filter.map_err(|e| GatewayError::invalid(e.body_text()))?;
    let (list, depth) = front(&s)?.dead_letters(&caller, &filter).await?;
    Ok(Json(ListJson {
        depth: depth.depth,
        dropped: depth.dropped,
        dead_letters: list.iter().map(DeadView::of).collect(),
    })
    .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/dead-letters/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = DeadView),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not in the dead letters, or not an admin key", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn get(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let e = front(&s)?.dead_letter(&caller, &id).await?;
    Ok(Json(DeadView::of(&e)).into_response())
}

#[derive(Serialize)]
struct Purged {
    purged: u64,
}

#[utoipa::path(
    delete,
    path = "/v1/admin/dead-letters/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = schema::PurgedBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not in the dead letters, or not an admin key", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn delete(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let sel = Selection {
        ids: vec![id.clone()],
        ..Default::default()
    };
    match front(&s)?.purge(&caller, &sel).await? {
        0 => Err(GatewayError::NotFound(format!(
            "task '{id}' is not in the dead letters"
        ))),
        purged => Ok(Json(Purged { purged }).into_response()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/admin/dead-letters/replay",
    tag = "admin",
    request_body(content = schema::SelectionBody),
    responses(
        (status = 200, body = schema::ReplayedBody),
        (status = 400, description = "a malformed selection, or none (give ids, a filter, or all: true)", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not an admin key", body = schema::ErrorBody),
        (status = 413, description = "body over 1 MiB", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn replay(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, GatewayError> {
    let sel = selection(body).await?;
    let out: Replayed = front(&s)?.replay(&caller, &sel).await?;
    Ok(Json(out).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/admin/dead-letters/purge",
    tag = "admin",
    request_body(content = schema::SelectionBody),
    responses(
        (status = 200, body = schema::PurgedBody),
        (status = 400, description = "a malformed selection, or none (give ids, a filter, or all: true)", body = schema::ErrorBody),
        (status = 401, description = "no valid API key", body = schema::ErrorBody),
        (status = 404, description = "not an admin key", body = schema::ErrorBody),
        (status = 413, description = "body over 1 MiB", body = schema::ErrorBody),
        (status = 503, description = "task store unavailable", body = schema::ErrorBody),
    ),
)]
pub async fn purge(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, GatewayError> {
    let sel = selection(body).await?;
    let purged = front(&s)?.purge(&caller, &sel).await?;
    Ok(Json(Purged { purged }).into_response())
}
