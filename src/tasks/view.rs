//! A task as every JSON form shows it: the HTTP API's task, the task inside a dead letter, and
//! the `data` of a completion webhook. One struct, serialised as it is (no JSON tree built
//! first), so the three cannot drift apart; the OpenAPI document's `TaskBody` is checked
//! against it (`api::http::schema`'s tests). The gRPC API answers with its protobuf message.

use serde::Serialize;
use serde_json::Value;

use super::{Attempt, TaskError, TaskRecord, TaskState, WebhookStatus, result_url};

#[derive(Debug, Serialize)]
pub struct TaskView<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub version: &'a str,
    pub status: &'static str,
    pub attempts: u32,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub error: Option<&'a TaskError>,
    /// Attempts that ended (not on a fresh task, so a submit's answer stays small).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub history: &'a [Attempt],
    /// The inference response, as JSON, when the caller reads it inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Where the result is read when it is not inline (the claim check, or a webhook, which
    /// never carries the result itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// A dead letter: its task, and why and when it was set aside.
#[derive(Debug, Serialize)]
pub struct DeadView<'a> {
    #[serde(flatten)]
    pub task: TaskView<'a>,
    pub tenant: &'a str,
    pub reason: &'a str,
    pub dead_at_ms: u64,
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
