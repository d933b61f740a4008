//! Redis Streams broker: tasks are entries of one stream read by a consumer group. An entry is
//! acknowledged (XACK) and deleted only after its result is stored; entries left pending by a
//! consumer that stopped answering are reclaimed after `visibility` (XAUTOCLAIM). Dead letters
//! go to a second stream with their reason. The stream is bounded: publishing past `capacity`
//! waiting entries is refused (RESOURCE_EXHAUSTED), and XADD's MAXLEN only ever trims far
//! beyond that, so it never drops a task that was accepted.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Script, Value, aio::ConnectionManager};

use super::{Broker, Delivery, QueueError, TaskMessage};
use crate::queue::metrics::broker_metrics;
use crate::{
    redis_conn::{self, Repeatable},
    telemetry::trace::TraceHeaders,
};

/// XADD to KEYS[1] unless it holds ARGV[1] entries or more already (then -1 - its length).
/// ARGV[2] is MAXLEN's approximate bound, ARGV[3..] the entry's fields and values. One call,
/// so the bound costs no extra round trip and two publishers cannot both pass it at the edge.
const PUBLISH: &str = r#"
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return -1 - depth end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return depth
"#;

/// XACK and XDEL of entry ARGV[2] of stream KEYS[1], group ARGV[1].
const ACK: &str = r#"
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"#;

/// Moves entry ARGV[2] of stream KEYS[1] (group ARGV[1]) to stream KEYS[2] as a new entry
/// (fields ARGV[4..]; MAXLEN ~ ARGV[3]), in one step: never both (a duplicate delivery
/// whose takeover would count an attempt) and never neither (a lost one), even when Redis
/// runs it late (paused) or the reply is lost.
const MOVE: &str = r#"
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"#;

pub struct RedisBroker {
    /// Every command here may be sent twice (see `redis_conn`): the worst a repeat does is a
    /// duplicate entry, which the task's state machine skips.
    conn: Repeatable,
    /// XREADGROUP BLOCK holds its connection: it gets its own, with no response timeout.
    /// With it, when the pending entries were last checked for reclaiming.
    reader: tokio::sync::Mutex<(ConnectionManager, Option<Instant>)>,
    stream: String,
    dead: String,
    group: String,
    consumer: String,
    capacity: u64,
    visibility: Duration,
    publish: Script,
    ack: Script,
    move_entry: Script,
}

fn backend(e: redis::RedisError) -> QueueError {
    QueueError::Backend(e.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Stream entries `[id, [field, value, ...]]` out of a reply, skipping deleted ones (nil).
fn entries(list: &Value) -> Vec<(String, HashMap<String, Vec<u8>>)> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let id = text(parts.first()?)?;
            let Value::Array(kv) = parts.get(1)? else {
                return None;
            };
            let mut fields = HashMap::new();
            for pair in kv.chunks(2) {
                if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                    fields.insert(String::from_utf8_lossy(k).into_owned(), v.clone());
                }
            }
            Some((id, fields))
        })
        .collect()
}

fn message(fields: &HashMap<String, Vec<u8>>) -> Option<TaskMessage> {
    let s = |k: &str| {
        fields
            .get(k)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    Some(TaskMessage {
        task_id: s("task_id")?,
        model: s("model").unwrap_or_default(),
        payload: Bytes::from(fields.get("payload")?.clone()),
        trace: TraceHeaders {
            traceparent: s("traceparent").filter(|t| !t.is_empty()),
            tracestate: s("tracestate").filter(|t| !t.is_empty()),
        },
        priority: s("priority").and_then(|p| p.parse().ok()).unwrap_or(0),
    })
}

impl RedisBroker {
    pub async fn connect(
        url: &str,
        prefix: &str,
        consumer: &str,
        capacity: u64,
        visibility: Duration,
    ) -> Result<Self, QueueError> {
        let conn = Repeatable(redis_conn::connect(url).await.map_err(backend)?);
        // Blocking reads wait on the server by design: no response timeout.
        let reader = redis_conn::connect_with(url, None).await.map_err(backend)?;
        let (stream, group) = (format!("{prefix}:tasks"), "workers".to_string());
        let b = Self {
            publish: Script::new(PUBLISH),
            ack: Script::new(ACK),
            move_entry: Script::new(MOVE),
            conn,
            reader: tokio::sync::Mutex::new((reader, None)),
            stream,
            dead: format!("{prefix}:tasks:dead"),
            group,
            consumer: consumer.to_string(),
            capacity,
            visibility,
        };
        b.ensure_group().await?;
        Ok(b)
    }

    /// Creates the consumer group (from the stream's start, so nothing queued earlier is
    /// missed); an existing group is fine.
    async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let r: Result<Value, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    fn fields(msg: &TaskMessage) -> [(&'static str, Vec<u8>); 6] {
        [
            ("task_id", msg.task_id.as_bytes().to_vec()),
            ("model", msg.model.as_bytes().to_vec()),
            ("payload", msg.payload.to_vec()),
            // Streams deliver in order; the level still travels, e.g. to a dead letter.
            ("priority", msg.priority.to_string().into_bytes()),
            (
                "traceparent",
                msg.trace
                    .traceparent
                    .clone()
                    .unwrap_or_default()
                    .into_bytes(),
            ),
            (
                "tracestate",
                msg.trace
                    .tracestate
                    .clone()
                    .unwrap_or_default()
                    .into_bytes(),
            ),
        ]
    }

    /// Moves a delivery's entry to `stream` (this one, handed back; or the dead letters),
    /// with `extra` added to its fields, and acknowledges it: one script.
    async fn move_to(
        &self,
        stream: &str,
        d: &Delivery,
        extra: (&str, &str),
    ) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let mut inv = self.move_entry.key(&self.stream);
        // An approximate bound far above `capacity`: it trims only acknowledged history.
        inv.key(stream)
            .arg(&self.group)
            .arg(&d.tag)
            .arg(self.capacity * 4);
        for (k, v) in Self::fields(&d.msg) {
            inv.arg(k).arg(v);
        }
        inv.arg(extra.0).arg(extra.1);
        let _: Value = inv.invoke_async(&mut c).await.map_err(backend)?;
        Ok(())
    }

    async fn ack_delete(&self, id: &str) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let _: Value = self
            .ack
            .key(&self.stream)
            .arg(&self.group)
            .arg(id)
            .invoke_async(&mut c)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// One receive: entries a dead consumer left pending first, else new ones.
    async fn read(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut guard = self.reader.lock().await;
        let (reader, last_claim) = &mut *guard;
        // First take back what a dead consumer left pending for longer than `visibility`.
        // XAUTOCLAIM scans the pending list, so it runs at most every `visibility / 4` (and
        // at least once a second), unless the last scan filled its batch: reclaiming is late
        // by that much at most, instead of costing a scan per receive.
        let every = (self.visibility / 4).min(Duration::from_secs(1));
        let reclaimed = if last_claim.is_none_or(|t| t.elapsed() >= every) {
            let claimed: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(self.visibility.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(max)
                .query_async(reader)
                .await
                .map_err(backend)?;
            let got = match &claimed {
                Value::Array(parts) => parts.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            };
            *last_claim = (got.len() < max).then(Instant::now);
            got
        } else {
            Vec::new()
        };
        let (list, was_reclaimed) = if reclaimed.is_empty() {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max)
                .arg("BLOCK")
                .arg(wait.as_millis().max(1) as u64)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(">")
                .query_async(reader)
                .await
                .map_err(backend)?;
            let got = match &reply {
                Value::Array(streams) => streams
                    .iter()
                    .filter_map(|s| match s {
                        Value::Array(kv) => kv.get(1).map(entries),
                        _ => None,
                    })
                    .flatten()
                    .collect(),
                Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
                _ => Vec::new(),
            };
            (got, false)
        } else {
            (reclaimed, true)
        };
        drop(guard);
        let mut out = Vec::with_capacity(list.len());
        for (id, fields) in list {
            match message(&fields) {
                Some(msg) => out.push(Delivery {
                    msg,
                    reclaimed: was_reclaimed
                        || fields.get("handed_back").is_some_and(|v| v == b"1"),
                    lease_expired: was_reclaimed,
                    tag: id,
                }),
                // An entry that is not ours (or is damaged) cannot be run: keep it aside,
                // and drop it from the stream only once the dead-letter stream has its note.
                None => {
                    broker_metrics().broker_error("redis", "malformed");
                    tracing::warn!(stream = %self.stream, entry = %id, "an entry that is not a task goes to the dead-letter stream");
                    let mut c = self.conn.clone();
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(&self.dead)
                        .arg("*")
                        .arg("reason")
                        .arg("malformed entry")
                        .arg("entry_id")
                        .arg(&id);
                    // Its own fields travel with it, for whoever inspects the dead letters.
                    for (k, v) in fields
                        .iter()
                        .filter(|(k, _)| *k != "reason" && *k != "entry_id")
                    {
                        cmd.arg(k).arg(v);
                    }
                    let noted: Result<String, _> = cmd.query_async(&mut c).await;
                    if noted.is_ok() {
                        self.ack_delete(&id).await?;
                    }
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let mut inv = self.publish.key(&self.stream);
        inv.arg(self.capacity).arg(self.capacity * 4);
        for (k, v) in Self::fields(msg) {
            inv.arg(k).arg(v);
        }
        let depth: i64 = inv.invoke_async(&mut c).await.map_err(backend)?;
        if depth < 0 {
            return Err(QueueError::Full((-1 - depth) as u64));
        }
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        match self.read(max, wait).await {
            // The group is gone: Redis came back without its data (a new pod without
            // persistence, a flush, a failover to an empty replica), or someone removed it.
            // Made again from the stream's start, so what was published since is read.
            Err(QueueError::Backend(m)) if m.contains("NOGROUP") => {
                tracing::warn!(stream = %self.stream, group = %self.group, "the consumer group is missing (did Redis lose its data?); creating it again");
                broker_metrics().broker_error("redis", "group_missing");
                self.ensure_group().await?;
                super::report_lost_messages();
                Ok(Vec::new())
            }
            other => other,
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        self.ack_delete(&d.tag).await
    }

    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        // The copy replaces the entry in one script: a copy beside a pending original would
        // be two deliveries, each taking the task over from the other. The copy is marked as
        // handed back: the worker that held it may have left the task `running` (a store
        // write whose answer was lost), and the copy must be able to take it over, as a
        // reclaim would.
        self.move_to(&self.stream, d, ("handed_back", "1")).await
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.move_to(&self.dead, d, ("reason", reason)).await
    }

    fn lease(&self) -> Option<Duration> {
        Some(self.visibility)
    }

    /// XCLAIM by its own consumer with a minimum idle time of 0 resets the entry's idle time,
    /// so XAUTOCLAIM leaves it with this live worker (JUSTID: no payload sent back).
    async fn renew(&self, d: &Delivery) -> Result<(), QueueError> {
        let mut c = self.conn.clone();
        let _: Value = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(&d.tag)
            .arg("JUSTID")
            .query_async(&mut c)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let mut c = self.conn.clone();
        redis::cmd("XLEN")
            .arg(&self.stream)
            .query_async(&mut c)
            .await
            .map_err(backend)
    }

    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        let mut c = self.conn.clone();
        let v: Value = redis::cmd("XRANGE")
            .arg(&self.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await
            .map_err(backend)?;
        Ok(entries(&v)
            .into_iter()
            .filter_map(|(_, f)| {
                let reason = f
                    .get("reason")
                    .map(|r| String::from_utf8_lossy(r).into_owned())?;
                // An entry set aside as malformed has no task to show: an empty one.
                let msg = message(&f).unwrap_or_else(|| TaskMessage {
                    task_id: String::new(),
                    model: String::new(),
                    payload: Bytes::new(),
                    trace: TraceHeaders::default(),
                    priority: 0,
                });
                Some((msg, reason))
            })
            .collect())
    }
}
