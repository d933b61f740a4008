//! RabbitMQ message grouping (`tasks.amqp_group_max` > 1). Much of RabbitMQ's work is per persistent message
//! (store, confirm, delivery, ack), so concurrent submissions may share one message: a publisher loop keeps at most
//! `GROUPS_IN_FLIGHT` publishes awaiting their confirm, and while they are out, new
//! submissions wait and then leave together (up to the group size, same priority), each
//! answered by that one confirm. A lone submission never waits for company. A consumer splits a
//! group into one delivery per task and acks the message when every member is acked or
//! dead-lettered; a member handed back (`retry`) is republished on its own (if that fails, the
//! message is requeued whole once the other members settle). A redelivered group
//! (its worker died) comes back whole, and the task store skips members that already finished.
//! The queue bound (`x-max-length`) and prefetch count messages, so with grouping a queue may
//! hold up to `queue_capacity × group size` tasks.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use lapin::Acker;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::queue::metrics::broker_metrics;
use crate::{
    queue::{QueueError, TaskMessage},
    telemetry::trace::TraceHeaders,
};

/// Publishes that may await their confirm at once when grouping; more submissions wait and
/// then share a message.
pub(super) const GROUPS_IN_FLIGHT: usize = 2;

/// A submission waiting for its group's confirm.
pub(super) type Pending = (TaskMessage, oneshot::Sender<Result<(), QueueError>>);

/// Sends tasks of one priority as one message and returns after the broker's confirm.
#[async_trait]
pub(super) trait PublishGroup: Send + Sync + 'static {
    async fn publish_group(&self, msgs: &[&TaskMessage]) -> Result<(), QueueError>;
}

/// A delivered group message and what its members still need.
pub(super) struct Group {
    pub acker: Acker,
    /// Members not yet settled.
    pub left: usize,
    /// A member could not be republished alone (`retry`) or dead-lettered: once the others
    /// settle, the message goes back whole rather than being acked, so that member runs again
    /// (the task store skips the members that finished).
    pub requeue: bool,
}

/// Forms groups from waiting submissions while earlier groups await their confirms.
pub(super) async fn group_loop<P: PublishGroup>(
    inner: Arc<P>,
    mut rx: mpsc::Receiver<Pending>,
    max: usize,
) {
    let slots = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let mut by_priority: BTreeMap<u8, Vec<Pending>> = BTreeMap::new();
            for p in batch {
                by_priority.entry(p.0.priority.min(9)).or_default().push(p);
            }
            let sends = by_priority.into_values().map(|group| {
                let inner = &inner;
                async move {
                    let msgs: Vec<&TaskMessage> = group.iter().map(|(m, _)| m).collect();
                    let r = inner.publish_group(&msgs).await;
                    if r.is_ok() {
                        broker_metrics().amqp_group_tasks.observe(msgs.len() as f64);
                    }
                    for (_, tx) in group {
                        let _ = tx.send(r.clone());
                    }
                }
            });
            futures::future::join_all(sends).await;
            drop(permit);
        });
    }
}

/// A group's body: `IGG1`, the member count (u32), then per member its task id, model,
/// traceparent and tracestate (u16 length + bytes; empty = none) and its payload (u32 length +
/// bytes). Big-endian.
const GROUP_MAGIC: &[u8; 4] = b"IGG1";

pub(super) fn encode_group(msgs: &[&TaskMessage]) -> Vec<u8> {
    let size: usize = msgs
        .iter()
        .map(|m| 16 + m.task_id.len() + m.model.len() + m.payload.len() + 64)
        .sum();
    let mut out = Vec::with_capacity(8 + size);
    out.extend_from_slice(GROUP_MAGIC);
    out.extend_from_slice(&(msgs.len() as u32).to_be_bytes());
    let short = |out: &mut Vec<u8>, s: &str| {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    for m in msgs {
        short(&mut out, &m.task_id);
        short(&mut out, &m.model);
        short(&mut out, m.trace.traceparent.as_deref().unwrap_or(""));
        short(&mut out, m.trace.tracestate.as_deref().unwrap_or(""));
        out.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&m.payload);
    }
    out
}

/// The members of a group body, or `None` when it is not a well-formed one.
pub(super) fn decode_group(body: &Bytes, priority: u8) -> Option<Vec<TaskMessage>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<std::ops::Range<usize>> {
        let r = at..at.checked_add(n)?;
        (r.end <= body.len()).then(|| {
            at = r.end;
            r
        })
    };
    if body.get(take(4)?)? != GROUP_MAGIC {
        return None;
    }
    let count = u32::from_be_bytes(body.get(take(4)?)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(count.min(body.len() / 14));
    for _ in 0..count {
        let mut short = || -> Option<String> {
            let n = u16::from_be_bytes(body.get(take(2)?)?.try_into().ok()?) as usize;
            String::from_utf8(body.get(take(n)?)?.to_vec()).ok()
        };
        let (task_id, model, tp, ts) = (short()?, short()?, short()?, short()?);
        let n = u32::from_be_bytes(body.get(take(4)?)?.try_into().ok()?) as usize;
        let payload = body.slice(take(n)?);
        out.push(TaskMessage {
            task_id,
            model,
            payload,
            trace: TraceHeaders {
                traceparent: (!tp.is_empty()).then_some(tp),
                tracestate: (!ts.is_empty()).then_some(ts),
            },
            priority,
        });
    }
    (at == body.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::TraceHeaders;

    fn msg(i: usize, payload: &[u8], traced: bool) -> TaskMessage {
        TaskMessage {
            task_id: format!("task-{i}"),
            model: "add_sub".into(),
            payload: Bytes::copy_from_slice(payload),
            trace: TraceHeaders {
                traceparent: traced
                    .then(|| "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                tracestate: None,
            },
            priority: 3,
        }
    }

    #[test]
    fn a_group_body_gives_back_its_members() {
        let msgs = [
            msg(0, b"abc", true),
            msg(1, b"", false),
            msg(2, &[0u8; 300], true),
        ];
        let refs: Vec<&TaskMessage> = msgs.iter().collect();
        let body = Bytes::from(encode_group(&refs));
        assert_eq!(decode_group(&body, 3).unwrap(), msgs.to_vec());
    }

    #[test]
    fn a_damaged_group_body_is_refused() {
        let msgs = [msg(0, b"abc", true), msg(1, b"defg", false)];
        let refs: Vec<&TaskMessage> = msgs.iter().collect();
        let body = encode_group(&refs);
        // Cut short anywhere, one byte too many, or a wrong magic: never a panic, never a
        // member made of the wrong bytes.
        for n in 0..body.len() {
            assert_eq!(
                decode_group(&Bytes::copy_from_slice(&body[..n]), 3),
                None,
                "{n}"
            );
        }
        let mut long = body.clone();
        long.push(0);
        assert_eq!(decode_group(&Bytes::from(long), 3), None);
        let mut wrong = body.clone();
        wrong[0] = b'X';
        assert_eq!(decode_group(&Bytes::from(wrong), 3), None);
        // A count far beyond the body does not allocate for it.
        let mut huge = body;
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_group(&Bytes::from(huge), 3), None);
    }
}
