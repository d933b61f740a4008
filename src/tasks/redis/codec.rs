//! Reading the scripts' replies: records, outbox messages, status codes.

use bytes::Bytes;
use redis::Value;

use crate::queue::TaskMessage;
use crate::tasks::{StoreError, TaskError, TaskRecord, TaskState};

/// A message's fields as the outbox keeps them in its task's hash.
pub(super) fn message_fields(msg: &TaskMessage) -> [(&'static str, Vec<u8>); 4] {
    let text = |s: &Option<String>| s.clone().unwrap_or_default().into_bytes();
    [
        ("ob_payload", msg.payload.to_vec()),
        ("ob_priority", msg.priority.to_string().into_bytes()),
        ("ob_traceparent", text(&msg.trace.traceparent)),
        ("ob_tracestate", text(&msg.trace.tracestate)),
    ]
}

/// The message of task `id` from `[model, payload, priority, traceparent, tracestate]`.
pub(super) fn outboxed(id: &str, values: &[Value]) -> Option<TaskMessage> {
    let text = |i| {
        field(values, i)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .filter(|t| !t.is_empty())
    };
    Some(TaskMessage {
        task_id: id.to_string(),
        model: text(0).unwrap_or_default(),
        payload: Bytes::copy_from_slice(field(values, 1)?),
        priority: text(2).and_then(|p| p.parse().ok()).unwrap_or(4),
        trace: crate::telemetry::trace::TraceHeaders {
            traceparent: text(3),
            tracestate: text(4),
        },
    })
}

/// A field's bytes from an HMGET answer (nil, a missing field, is `None`).
pub(super) fn field(values: &[Value], i: usize) -> Option<&[u8]> {
    match values.get(i)? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A record from values in `FIELDS` order, read by position: one reply per task on the hot
/// paths, so no map of names is built for it.
pub(super) fn parse(id: &str, values: &[Value]) -> Option<TaskRecord> {
    let text = |i| field(values, i).map(|v| String::from_utf8_lossy(v).into_owned());
    let num = |i| {
        field(values, i)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let state = TaskState::parse(std::str::from_utf8(field(values, 0)?).ok()?)?;
    Some(TaskRecord {
        id: id.to_string(),
        tenant: text(1).unwrap_or_default(),
        model: text(2).unwrap_or_default(),
        version: text(3).unwrap_or_default(),
        state,
        attempts: num(4).unwrap_or(0) as u32,
        queued_at_ms: num(5).unwrap_or(0),
        started_at_ms: num(6),
        finished_at_ms: num(7),
        error: text(8).map(|code| TaskError {
            code,
            message: text(9).unwrap_or_default(),
        }),
        idempotency_key: text(10).filter(|k| !k.is_empty()),
        // Lua's cjson writes an empty list as `{}`.
        history: field(values, 11)
            .filter(|h| *h != b"{}")
            .and_then(|h| serde_json::from_slice(h).ok())
            .unwrap_or_default(),
        callback_url: text(12).filter(|u| !u.is_empty()),
        webhook: field(values, 13).and_then(|w| serde_json::from_slice(w).ok()),
    })
}

/// The error of a write refused by its fence (`{2, attempts}`).
pub(super) fn fenced(id: &str, fence: Option<u32>, values: &[Value]) -> StoreError {
    let current = match values.first() {
        Some(Value::Int(n)) => *n as u32,
        _ => 0,
    };
    StoreError::Fenced {
        id: id.to_string(),
        fence: fence.unwrap_or(0),
        current,
    }
}

/// A script's `{code, values...}` answer.
pub(super) fn coded(reply: Vec<Value>) -> Result<(i64, Vec<Value>), StoreError> {
    let mut it = reply.into_iter();
    match it.next() {
        Some(Value::Int(c)) => Ok((c, it.collect())),
        other => Err(StoreError::Backend(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}
