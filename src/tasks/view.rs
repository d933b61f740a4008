//! A task as every JSON form shows it: the HTTP API's task, the task inside a dead letter, and
//! the `data` of a completion webhook. One struct, serialised as it is (no JSON tree built
//! first), so the three cannot drift apart, and the OpenAPI document's `TaskBody` and
//! `DeadLetterBody` are derived from it. The gRPC API answers with its protobuf message.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{Attempt, TaskError, TaskRecord, TaskState, WebhookStatus, result_url};

/// An async task: its state, times (ms since the Unix epoch), attempts and, once it
/// succeeded, the inference response.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = TaskBody)]
pub struct TaskView<'a> {
    /// 32 hex characters, unguessable.
    #[schema(value_type = String)]
    pub id: &'a str,
    #[schema(value_type = String)]
    pub model: &'a str,
    #[schema(value_type = String)]
    pub version: &'a str,
    #[schema(value_type = TaskState)]
    pub status: &'static str,
    pub attempts: u32,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    #[schema(value_type = Option<TaskError>)]
    pub error: Option<&'a TaskError>,
    /// How each attempt ended, oldest first (the last 16; absent before the first ends, so a
    /// submit's answer stays small).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[schema(value_type = Option<Vec<Attempt>>)]
    pub history: &'a [Attempt],
    /// The inference response (an `InferResponseBody`), when the caller reads it inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub response: Option<Value>,
    /// Where the result is read when it is not inline: `GET` it (an encoded
    /// ModelInferResponse, streamed). Set instead of `response` when the result is over
    /// `tasks.claim_check_bytes` and kept in the blob store, and in a webhook, which never
    /// carries the result itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
    /// The stored result's size in bytes, with `result_url` (not in a webhook).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_bytes: Option<u64>,
    /// Where the final state is POSTed (the `Callback-Url` header at submit).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub callback_url: Option<&'a str>,
    /// How the completion webhook's delivery went, once there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WebhookStatus>)]
    pub webhook: Option<&'a WebhookStatus>,
}

impl<'a> TaskView<'a> {
    /// The record, without its result.
    pub fn of(rec: &'a TaskRecord) -> Self {
        Self {
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
            response: None,
            result_url: None,
            result_bytes: None,
            callback_url: rec.callback_url.as_deref(),
            webhook: rec.webhook.as_ref(),
        }
    }

    /// As a completion webhook carries it: where the result is (once succeeded), not the
    /// result itself nor the delivery's own state.
    pub fn for_webhook(rec: &'a TaskRecord) -> Self {
        Self {
            result_url: (rec.state == TaskState::Succeeded).then(|| result_url(&rec.id)),
            webhook: None,
            callback_url: None,
            ..Self::of(rec)
        }
    }
}

/// A dead-lettered task: the task as it failed (error and attempt history), why, and when.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetterBody)]
pub struct DeadView<'a> {
    #[serde(flatten)]
    pub task: TaskView<'a>,
    #[schema(value_type = String)]
    pub tenant: &'a str,
    #[schema(value_type = String)]
    pub reason: &'a str,
    /// When it was dead-lettered (ms since the Unix epoch).
    pub dead_at_ms: u64,
    /// Bytes of the queued request a replay sends again.
    pub payload_bytes: u64,
}

impl<'a> DeadView<'a> {
    pub fn of(e: &'a super::dead::DeadEntry) -> Self {
        Self {
            task: TaskView::of(&e.record),
            tenant: &e.record.tenant,
            reason: &e.reason,
            dead_at_ms: e.dead_at_ms,
            payload_bytes: e.payload_bytes,
        }
    }
}
