//! RabbitMQ broker (AMQP 0-9-1, lapin): a durable priority queue of persistent messages.
//! `publish` returns only after the broker's publisher confirm, so a 202 means RabbitMQ holds
//! the task on disk. Consumers ack manually after the result is stored; prefetch bounds what
//! a worker holds unacknowledged; a consumer that dies has its messages redelivered (flagged
//! `redelivered`). The queue is bounded with `x-max-length` and `reject-publish`, so a full
//! queue nacks the publish (→ 429) instead of dropping old tasks. Dead letters go to a second
//! durable queue with their reason in a header. Publishing, consuming and the readiness probe
//! use their own long-lived connections (named `infergate <role> <queue>` in RabbitMQ), each
//! re-established with bounded backoff when RabbitMQ goes away.

//!
//! Grouping (`tasks.amqp_group_max` > 1) lives in [`group`].

mod consume;
mod group;
mod headers;

use crate::queue::metrics::broker_metrics;
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};

use self::group::{
    GROUPS_IN_FLIGHT, Group, Pending, PublishGroup, decode_group, encode_group, group_loop,
};
use self::headers::{header, long, trace_of};
use super::{Broker, Delivery, QueueError, TaskMessage};

pub struct RabbitBroker {
    inner: Arc<Inner>,
    /// The grouping publisher loop's inbox (bounded), when grouping is on.
    grouper: Option<mpsc::Sender<Pending>>,
}

struct Inner {
    url: String,
    queue: String,
    dead: String,
    capacity: u64,
    prefetch: u16,
    /// Longest wait for a publisher confirm.
    publish_timeout: Duration,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    /// Set while the publishing connection cannot be re-opened: until `retry_at` submissions
    /// are refused at once (503) instead of each waiting on a reconnect of its own.
    publisher_down: Mutex<Option<Down>>,
    consumer: tokio::sync::Mutex<Option<(Connection, Channel, Consumer, u64)>>,
    /// The readiness probe's own connection, kept open: a probe every second must not be a
    /// connection every second (RabbitMQ warns about connection churn).
    probe: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    /// Ackers of delivered messages, by our tag (`<connection generation>:<delivery tag>`).
    ackers: Mutex<HashMap<String, Acker>>,
    /// Delivered groups by the group's tag; a member's tag is `<group tag>#<index>`.
    groups: Mutex<HashMap<String, Group>>,
    /// Members of received groups beyond what `receive` was asked for (at most prefetch ×
    /// group size), handed out first next time.
    buffered: Mutex<VecDeque<Delivery>>,
    generation: AtomicU64,
}

/// Why and until when the publishing connection is not tried again.
struct Down {
    error: String,
    retry_at: Instant,
    /// The wait after the next failed attempt (doubling, capped).
    next_delay: Duration,
}

/// First and longest wait between attempts to re-open the publishing connection.
const REOPEN_DELAY_MIN: Duration = Duration::from_millis(100);
const REOPEN_DELAY_MAX: Duration = Duration::from_secs(2);

/// A mandatory message RabbitMQ could not route: its queue does not exist.
struct Unroutable;

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

/// Counts a lost connection, which the next call re-opens (with backoff).
fn reconnecting(had_one: bool) {
    if had_one {
        broker_metrics().broker_reconnect("rabbitmq");
    }
}

impl RabbitBroker {
    /// `group_max` > 1 lets up to that many concurrent submissions share one message.
    pub async fn connect(
        url: &str,
        prefix: &str,
        capacity: u64,
        prefetch: u16,
        group_max: usize,
        publish_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let b = Inner {
            url: url.to_string(),
            queue: format!("{prefix}.tasks"),
            dead: format!("{prefix}.tasks.dead"),
            capacity,
            prefetch: prefetch.max(1),
            publish_timeout,
            publisher: tokio::sync::Mutex::new(None),
            publisher_down: Mutex::new(None),
            consumer: tokio::sync::Mutex::new(None),
            probe: tokio::sync::Mutex::new(None),
            ackers: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            buffered: Mutex::new(VecDeque::new()),
            generation: AtomicU64::new(0),
        };
        // Fail at start with a clear message when RabbitMQ is not there at all.
        let (conn, ch) = b.open("publish").await?;
        *b.publisher.lock().await = Some((conn, ch));
        let inner = Arc::new(b);
        let grouper = (group_max > 1).then(|| {
            let (tx, rx) = mpsc::channel(group_max * GROUPS_IN_FLIGHT * 2);
            tokio::spawn(group_loop(Arc::clone(&inner), rx, group_max));
            tx
        });
        Ok(Self { inner, grouper })
    }

    /// Closes both connections; RabbitMQ puts back whatever was delivered and not acked.
    pub async fn close(&self) {
        if let Some((conn, ..)) = self.inner.consumer.lock().await.take() {
            let _ = conn.close(200, "".into()).await;
        }
        if let Some((conn, _)) = self.inner.publisher.lock().await.take() {
            let _ = conn.close(200, "".into()).await;
        }
        if let Some((conn, _)) = self.inner.probe.lock().await.take() {
            let _ = conn.close(200, "".into()).await;
        }
    }
}

impl Inner {
    /// A new connection and channel with the queues declared (idempotent). `role` names the
    /// connection as RabbitMQ shows it (`infergate <role> <queue>`).
    async fn open(&self, role: &str) -> Result<(Connection, Channel), QueueError> {
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for _ in 0..6 {
            match self.try_open(role).await {
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

    async fn try_open(&self, role: &str) -> Result<(Connection, Channel), lapin::Error> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("infergate {role} {}", self.queue).into());
        let conn = Connection::connect(&self.url, props).await?;
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

    /// The publishing channel, re-opening the connection if needed. While RabbitMQ is away
    /// one submission per backoff period (100 ms doubling to 2 s) makes a single attempt,
    /// bounded by the publish timeout; the others are refused at once, so an outage turns into
    /// quick 503s rather than every submission waiting out a reconnect of its own in turn.
    async fn publish_channel(&self) -> Result<Channel, QueueError> {
        // The lock covers (re)connecting only: publishes and their confirms run concurrently
        // on the shared channel. It is held only while an attempt runs, so the down state is
        // checked under it: those that queued behind a failed attempt learn of it here, and a
        // healthy publish never looks at it.
        let mut guard = self.publisher.lock().await;
        if guard.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
            self.refuse_while_down()?;
            reconnecting(guard.is_some());
            *guard = None;
            let opened =
                match tokio::time::timeout(self.publish_timeout, self.try_open("publish")).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "no answer within {} ms",
                        self.publish_timeout.as_millis()
                    )),
                };
            match opened {
                Ok(v) => {
                    *guard = Some(v);
                    *self.publisher_down.lock().expect("publisher_down lock") = None;
                }
                Err(e) => {
                    let error = format!("RabbitMQ at {} unreachable: {e}", self.url);
                    let mut down = self.publisher_down.lock().expect("publisher_down lock");
                    let delay = down.as_ref().map_or(REOPEN_DELAY_MIN, |d| d.next_delay);
                    *down = Some(Down {
                        error: error.clone(),
                        retry_at: Instant::now() + delay,
                        next_delay: (delay * 2).min(REOPEN_DELAY_MAX),
                    });
                    return Err(QueueError::Backend(error));
                }
            }
        }
        Ok(guard.as_ref().expect("just opened").1.clone())
    }

    fn refuse_while_down(&self) -> Result<(), QueueError> {
        match &*self.publisher_down.lock().expect("publisher_down lock") {
            Some(d) if Instant::now() < d.retry_at => Err(QueueError::Backend(format!(
                "{} (next attempt in {} ms)",
                d.error,
                d.retry_at
                    .saturating_duration_since(Instant::now())
                    .as_millis()
            ))),
            _ => Ok(()),
        }
    }

    /// One persistent message, returning once RabbitMQ confirms it. Published as mandatory:
    /// a queue deleted under us (by an operator, a policy, a broker that lost its
    /// definitions) returns the message instead of dropping it, and the queues are declared
    /// again on a new channel for a second try.
    async fn publish_raw(
        &self,
        queue: &str,
        body: &[u8],
        priority: u8,
        headers: FieldTable,
    ) -> Result<(), QueueError> {
        match self
            .publish_once(queue, body, priority, headers.clone())
            .await
        {
            Err(Unroutable) => {
                tracing::warn!(
                    queue,
                    "a task message came back unroutable (its queue is gone); declaring the queues again"
                );
                broker_metrics().broker_error("rabbitmq", "queue_missing");
                super::report_lost_messages();
                *self.publisher.lock().await = None;
                self.publish_once(queue, body, priority, headers)
                    .await
                    .map_err(|Unroutable| backend(format!("queue {queue} is missing")))?
            }
            Ok(r) => r,
        }
    }

    /// [`Self::publish_raw`]'s one try; `Err(Unroutable)` when the message came back.
    async fn publish_once(
        &self,
        queue: &str,
        body: &[u8],
        priority: u8,
        headers: FieldTable,
    ) -> Result<Result<(), QueueError>, Unroutable> {
        let ch = match self.publish_channel().await {
            Ok(ch) => ch,
            Err(e) => return Ok(Err(e)),
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(priority.min(9))
            .with_headers(headers);
        let sent = async {
            ch.basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?
            .await
        };
        // Bounded: a broker that stops confirming turns into 503s, not submissions that hang
        // (and, with grouping, hold up every submission behind them).
        let Ok(sent) = tokio::time::timeout(self.publish_timeout, sent).await else {
            *self.publisher.lock().await = None;
            reconnecting(true);
            return Ok(Err(backend(format!(
                "no publisher confirm within {} ms",
                self.publish_timeout.as_millis()
            ))));
        };
        Ok(match sent {
            Ok(Confirmation::Ack(Some(_))) => return Err(Unroutable),
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err(QueueError::Full(self.capacity)),
            Ok(Confirmation::NotRequested) => Err(backend("publisher confirms are off")),
            Err(e) => {
                *self.publisher.lock().await = None;
                reconnecting(true);
                Err(backend(e))
            }
        })
    }

    /// One task as one message. `reclaimed` marks a task handed back by a worker, which
    /// may take over its `running` record.
    async fn publish_to(
        &self,
        queue: &str,
        msg: &TaskMessage,
        reason: Option<&str>,
        reclaimed: bool,
    ) -> Result<(), QueueError> {
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
        if reclaimed {
            headers.insert("reclaimed".into(), long("1"));
        }
        self.publish_raw(queue, &msg.payload, msg.priority, headers)
            .await
    }

    fn take_acker(&self, tag: &str) -> Option<Acker> {
        self.ackers.lock().expect("ackers lock").remove(tag)
    }
}

#[async_trait]
impl PublishGroup for Inner {
    /// Tasks of one priority as one message (a lone task goes out in the plain format).
    async fn publish_group(&self, msgs: &[&TaskMessage]) -> Result<(), QueueError> {
        if let [one] = msgs {
            return self.publish_to(&self.queue, one, None, false).await;
        }
        let mut headers = FieldTable::default();
        headers.insert("group".into(), AMQPValue::LongUInt(msgs.len() as u32));
        let priority = msgs.first().map_or(0, |m| m.priority);
        self.publish_raw(&self.queue, &encode_group(msgs), priority, headers)
            .await
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        let Some(grouper) = &self.grouper else {
            return self
                .inner
                .publish_to(&self.inner.queue, msg, None, false)
                .await;
        };
        let (tx, rx) = oneshot::channel();
        grouper
            .send((msg.clone(), tx))
            .await
            .map_err(|_| backend("the RabbitMQ publisher stopped"))?;
        rx.await
            .map_err(|_| backend("the RabbitMQ publisher stopped"))?
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let b = &self.inner;
        let max = max.max(1);
        {
            let mut buffered = b.buffered.lock().expect("buffered lock");
            if !buffered.is_empty() {
                let n = max.min(buffered.len());
                return Ok(buffered.drain(..n).collect());
            }
        }
        let mut guard = b.consumer.lock().await;
        if guard.as_ref().is_none_or(|(c, ..)| !c.status().connected()) {
            reconnecting(guard.is_some());
            // What the old connection delivered RabbitMQ delivers again: forget it all.
            b.ackers.lock().expect("ackers lock").clear();
            b.groups.lock().expect("groups lock").clear();
            b.buffered.lock().expect("buffered lock").clear();
            let (conn, ch) = b.open("consume").await?;
            ch.basic_qos(b.prefetch, BasicQosOptions::default())
                .await
                .map_err(backend)?;
            let consumer = ch
                .basic_consume(
                    b.queue.as_str().into(),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(backend)?;
            let generation = b.generation.fetch_add(1, Ordering::Relaxed) + 1;
            *guard = Some((conn, ch, consumer, generation));
        }
        let (_, _, consumer, generation) = guard.as_mut().expect("just opened");
        let generation = *generation;
        let mut got: Vec<lapin::message::Delivery> = Vec::new();
        match tokio::time::timeout(wait, consumer.next()).await {
            Err(_) => return Ok(Vec::new()),
            // RabbitMQ cancels a consumer whose queue was deleted: what waited in it is gone.
            Ok(None) => {
                *guard = None;
                reconnecting(true);
                tracing::warn!(queue = %b.queue, "the RabbitMQ consumer was cancelled (its queue deleted?); declaring it again");
                super::report_lost_messages();
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
            b.deliveries(d, generation, &mut out).await;
        }
        if out.len() > max {
            let rest = out.split_off(max);
            b.buffered.lock().expect("buffered lock").extend(rest);
        }
        Ok(out)
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        let b = &self.inner;
        if let Some((group, _)) = d.tag.split_once('#') {
            return b.member_done(group, false).await;
        }
        // After a reconnect the old acker is gone; RabbitMQ redelivers that message and the
        // task's state makes the second delivery a no-op.
        if let Some(a) = b.take_acker(&d.tag) {
            a.ack(BasicAckOptions::default()).await.map_err(backend)?;
        }
        Ok(())
    }

    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        let b = &self.inner;
        if let Some((group, _)) = d.tag.split_once('#') {
            // One member cannot be requeued alone: it goes back as its own message. If that
            // fails (a full queue, a broker that stops confirming), the whole message goes
            // back once its other members settle.
            if !b.groups.lock().expect("groups lock").contains_key(group) {
                return Ok(());
            }
            let alone = b.publish_to(&b.queue, &d.msg, None, true).await;
            if let Err(e) = &alone {
                broker_metrics().broker_error("rabbitmq", "retry");
                tracing::warn!(task = %d.msg.task_id, error = %e, "handing a grouped task back alone failed; its message will be requeued whole");
            }
            return b.member_done(group, alone.is_err()).await;
        }
        if let Some(a) = b.take_acker(&d.tag) {
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
        let b = &self.inner;
        if let Err(e) = b.publish_to(&b.dead, &d.msg, Some(reason), false).await {
            // Not held unacknowledged until some reconnect: the message goes back (a group's
            // whole, once its other members settle, as in `retry`). The store already holds
            // this task's failure, so its next delivery is skipped and acked.
            match d.tag.split_once('#') {
                Some((group, _)) => b.member_done(group, true).await?,
                None => self.retry(d).await?,
            }
            return Err(e);
        }
        self.ack(d).await
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let b = &self.inner;
        let mut guard = b.probe.lock().await;
        // Taken out while in use and put back only after an answer: a probe that fails, or is
        // cancelled by its caller's timeout, drops the connection (lapin closes it on drop)
        // and the next probe opens a fresh one instead of waiting on a wedged one.
        let (conn, ch) = match guard.take() {
            Some((c, ch)) if c.status().connected() && ch.status().connected() => (c, ch),
            _ => b.open("probe").await?,
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(b.queue.as_str().into(), passive, FieldTable::default())
            .await
            .map_err(backend)?;
        *guard = Some((conn, ch));
        Ok(u64::from(q.message_count()))
    }

    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        // Read without acknowledging; closing the channel puts them all back.
        let b = &self.inner;
        let (conn, ch) = b.open("dead-letter reader").await?;
        let mut out = Vec::new();
        while out.len() < 10_000 {
            let Some(m) = ch
                .basic_get(b.dead.as_str().into(), BasicGetOptions { no_ack: false })
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
