//! RabbitMQ broker (AMQP 0-9-1, lapin): a durable priority queue of persistent messages.
//! `publish` returns only after the broker's publisher confirm, so a 202 means RabbitMQ holds
//! the task on disk. Consumers ack manually after the result is stored; prefetch bounds what
//! a worker holds unacknowledged; a consumer that dies has its messages redelivered (flagged
//! `redelivered`). The queue is bounded with `x-max-length` and `reject-publish`, so a full
//! queue nacks the publish (→ 429) instead of dropping old tasks. Dead letters go to a second
//! durable queue with their reason in a header. Publishing and consuming use their own
//! connections, each re-established with bounded backoff when RabbitMQ goes away.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use super::{Broker, Delivery, QueueError, TaskMessage};
use crate::telemetry::{metrics::metrics, trace::TraceHeaders};

pub struct RabbitBroker {
    url: String,
    queue: String,
    dead: String,
    capacity: u64,
    prefetch: u16,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    consumer: tokio::sync::Mutex<Option<(Connection, Channel, Consumer, u64)>>,
    /// Ackers of delivered messages, by our tag (`<connection generation>:<delivery tag>`).
    ackers: Mutex<HashMap<String, Acker>>,
    generation: AtomicU64,
}

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

/// Counts a lost connection, which the next call re-opens (with backoff).
fn reconnecting(had_one: bool) {
    if had_one {
        metrics().broker_reconnect("rabbitmq");
    }
}

fn trace_of(table: &FieldTable) -> TraceHeaders {
    TraceHeaders {
        traceparent: header(table, "traceparent"),
        tracestate: header(table, "tracestate"),
    }
}

fn header(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

impl RabbitBroker {
    pub async fn connect(
        url: &str,
        prefix: &str,
        capacity: u64,
        prefetch: u16,
    ) -> Result<Self, QueueError> {
        let b = Self {
            url: url.to_string(),
            queue: format!("{prefix}.tasks"),
            dead: format!("{prefix}.tasks.dead"),
            capacity,
            prefetch: prefetch.max(1),
            publisher: tokio::sync::Mutex::new(None),
            consumer: tokio::sync::Mutex::new(None),
            ackers: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        };
        // Fail at start with a clear message when RabbitMQ is not there at all.
        let (conn, ch) = b.open().await?;
        *b.publisher.lock().await = Some((conn, ch));
        Ok(b)
    }

    /// A new connection and channel with the queues declared (idempotent).
    async fn open(&self) -> Result<(Connection, Channel), QueueError> {
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for _ in 0..6 {
            match self.try_open().await {
                Ok(v) => return Ok(v),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(QueueError::Backend(format!(
            "RabbitMQ at {} unreachable: {last}",
            self.url
        )))
    }

    async fn try_open(&self) -> Result<(Connection, Channel), lapin::Error> {
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.capacity as i64),
        );
        args.insert("x-overflow".into(), long("reject-publish"));
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.capacity as i64),
        );
        ch.queue_declare(
            self.dead.as_str().into(),
            QueueDeclareOptions::durable(),
            dead_args,
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((conn, ch))
    }

    async fn publish_to(
        &self,
        queue: &str,
        msg: &TaskMessage,
        reason: Option<&str>,
    ) -> Result<(), QueueError> {
        // The lock covers (re)connecting only: publishes and their confirms run concurrently
        // on the shared channel.
        let ch = {
            let mut guard = self.publisher.lock().await;
            if guard.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
                reconnecting(guard.is_some());
                *guard = Some(self.open().await?);
            }
            guard.as_ref().expect("just opened").1.clone()
        };
        let mut headers = FieldTable::default();
        headers.insert("task_id".into(), long(&msg.task_id));
        headers.insert("model".into(), long(&msg.model));
        if let Some(t) = &msg.trace.traceparent {
            headers.insert("traceparent".into(), long(t));
        }
        if let Some(t) = &msg.trace.tracestate {
            headers.insert("tracestate".into(), long(t));
        }
        if let Some(r) = reason {
            headers.insert("reason".into(), long(r));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(msg.priority.min(9))
            .with_headers(headers);
        let sent = async {
            ch.basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                &msg.payload,
                props,
            )
            .await?
            .await
        }
        .await;
        match sent {
            Ok(Confirmation::Ack(_)) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err(QueueError::Full(self.capacity)),
            Ok(Confirmation::NotRequested) => Err(backend("publisher confirms are off")),
            Err(e) => {
                *self.publisher.lock().await = None;
                reconnecting(true);
                Err(backend(e))
            }
        }
    }

    fn take_acker(&self, tag: &str) -> Option<Acker> {
        self.ackers.lock().expect("ackers lock").remove(tag)
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        self.publish_to(&self.queue, msg, None).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut guard = self.consumer.lock().await;
        if guard.as_ref().is_none_or(|(c, ..)| !c.status().connected()) {
            reconnecting(guard.is_some());
            let (conn, ch) = self.open().await?;
            ch.basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(backend)?;
            let consumer = ch
                .basic_consume(
                    self.queue.as_str().into(),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(backend)?;
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            *guard = Some((conn, ch, consumer, generation));
        }
        let (_, _, consumer, generation) = guard.as_mut().expect("just opened");
        let generation = *generation;
        let mut got: Vec<lapin::message::Delivery> = Vec::new();
        match tokio::time::timeout(wait, consumer.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => {
                *guard = None;
                reconnecting(true);
                return Err(backend("the RabbitMQ consumer was cancelled"));
            }
            Ok(Some(Err(e))) => {
                *guard = None;
                reconnecting(true);
                return Err(backend(e));
            }
            Ok(Some(Ok(d))) => got.push(d),
        }
        while got.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => got.push(d),
                _ => break,
            }
        }
        let mut out = Vec::with_capacity(got.len());
        for d in got {
            let tag = format!("{generation}:{}", d.delivery_tag);
            let headers = d.properties.headers().clone().unwrap_or_default();
            let Some(task_id) = header(&headers, "task_id") else {
                // Not one of ours: keep it aside rather than loop on it.
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                continue;
            };
            let msg = TaskMessage {
                task_id,
                model: header(&headers, "model").unwrap_or_default(),
                payload: Bytes::from(d.data),
                trace: trace_of(&headers),
                priority: d.properties.priority().unwrap_or(0),
            };
            self.ackers
                .lock()
                .expect("ackers lock")
                .insert(tag.clone(), d.acker);
            out.push(Delivery {
                msg,
                reclaimed: d.redelivered,
                tag,
            });
        }
        Ok(out)
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        // After a reconnect the old acker is gone; RabbitMQ redelivers that message and the
        // task's state makes the second delivery a no-op.
        if let Some(a) = self.take_acker(&d.tag) {
            a.ack(BasicAckOptions::default()).await.map_err(backend)?;
        }
        Ok(())
    }

    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        if let Some(a) = self.take_acker(&d.tag) {
            a.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        }
        Ok(())
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.publish_to(&self.dead, &d.msg, Some(reason)).await?;
        self.ack(d).await
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let (conn, ch) = self.open().await?;
        let q = ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(backend)?;
        let _ = conn.close(200, "".into()).await;
        Ok(u64::from(q.message_count()))
    }

    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        // Read without acknowledging; closing the channel puts them all back.
        let (conn, ch) = self.open().await?;
        let mut out = Vec::new();
        while out.len() < 10_000 {
            let Some(m) = ch
                .basic_get(self.dead.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(backend)?
            else {
                break;
            };
            let d = m.delivery;
            let headers = d.properties.headers().clone().unwrap_or_default();
            out.push((
                TaskMessage {
                    task_id: header(&headers, "task_id").unwrap_or_default(),
                    model: header(&headers, "model").unwrap_or_default(),
                    payload: Bytes::from(d.data),
                    trace: trace_of(&headers),
                    priority: d.properties.priority().unwrap_or(0),
                },
                header(&headers, "reason").unwrap_or_default(),
            ));
        }
        let _ = conn.close(200, "".into()).await;
        Ok(out)
    }
}
