//! Brokers carry accepted tasks to workers. A message is acknowledged only after its result is
//! stored, so a worker that dies leaves it to be delivered again; the task store's state
//! machine keeps a redelivered task from running twice.

pub mod memory;
pub mod metrics;
pub mod rabbitmq;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// Where a broker says that messages may have been lost under it (its queue or consumer
/// group was found missing and made again): the outbox relay then publishes at once every
/// accepted task no worker has started, instead of at its regular recheck.
fn losses() -> &'static tokio::sync::Notify {
    static LOST: std::sync::OnceLock<tokio::sync::Notify> = std::sync::OnceLock::new();
    LOST.get_or_init(tokio::sync::Notify::new)
}

/// Says that messages may have been lost (see [`lost_messages`]).
pub fn report_lost_messages() {
    losses().notify_one();
}

/// Resolves at the next [`report_lost_messages`] (one reported meanwhile counts).
pub async fn lost_messages() {
    losses().notified().await
}

/// One queued task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub task_id: String,
    pub model: String,
    /// The encoded `ModelInferRequest`, already validated.
    pub payload: Bytes,
    /// W3C trace context (`traceparent`, `tracestate`) of the submitting request.
    pub trace: crate::telemetry::trace::TraceHeaders,
    /// 0 (lowest) ..= 9; brokers with priority queues (RabbitMQ) deliver higher first.
    pub priority: u8,
}

impl TaskMessage {
    /// Bytes the message takes on the wire, about: payload, ids and trace headers.
    pub fn wire_size(&self) -> usize {
        let trace = self.trace.traceparent.as_ref().map_or(0, String::len)
            + self.trace.tracestate.as_ref().map_or(0, String::len);
        self.payload.len() + self.task_id.len() + self.model.len() + trace + 1
    }
}

/// A message handed to a worker, to be acked, retried or dead-lettered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: TaskMessage,
    /// True when the broker took it back from a consumer that stopped answering, or a
    /// worker handed it back (`retry`): no worker holds it, so a `running` task may be
    /// taken over.
    pub reclaimed: bool,
    /// Of those, whether the broker took it back because its lease ran out (no sign of life
    /// from its worker for the whole lease), rather than being handed it back.
    pub lease_expired: bool,
    /// Broker-specific handle (stream entry id, delivery tag...).
    pub tag: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("the task queue is full ({0} messages)")]
    Full(u64),
    #[error("broker: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Broker: Send + Sync {
    /// Returns once the broker holds the message durably (publisher confirm, XADD reply).
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError>;
    /// Up to `max` messages, waiting at most `wait` for the first.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;
    /// Done with the message for good.
    async fn ack(&self, d: &Delivery) -> Result<(), QueueError>;
    /// Hand the message back for another delivery.
    async fn retry(&self, d: &Delivery) -> Result<(), QueueError>;
    /// Move the message to the dead-letter queue with a reason, and ack it.
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError>;
    /// How long a delivery stays with its worker without a sign of life before the broker
    /// hands it to another (`None`: the broker sees its consumers die by itself, as RabbitMQ
    /// does through the connection). A worker renews its deliveries well within it.
    fn lease(&self) -> Option<Duration> {
        None
    }
    /// Tells the broker the delivery's worker is alive and still running it.
    async fn renew(&self, _d: &Delivery) -> Result<(), QueueError> {
        Ok(())
    }
    /// The delivered task's encoded request: its payload, unless a decorator keeps large
    /// requests elsewhere (the claim check) and the payload stands in for one.
    async fn input(&self, d: &Delivery) -> Result<Bytes, QueueError> {
        Ok(d.msg.payload.clone())
    }
    /// Messages waiting or in flight.
    async fn depth(&self) -> Result<u64, QueueError>;
    /// Messages in the dead-letter queue.
    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError>;
}
