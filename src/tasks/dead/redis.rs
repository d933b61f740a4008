//! Dead letters in Redis, shared by every front end and worker: a sorted set
//! `<prefix>:dead` (score: when the task was dead-lettered) indexes one hash per task,
//! `<prefix>:dead:<id>` (the entry as JSON, the payload and the message's trace and
//! priority). Bounds are applied in the same script that adds an entry.

use async_trait::async_trait;
use bytes::Bytes;
use redis::Script;

use super::{DeadDepth, DeadEntry, DeadFilter, DeadLetter, DeadLetterStore};
use crate::{
    queue::TaskMessage,
    redis_conn::Repeatable,
    tasks::{
        StoreError, now_ms,
        redis::{backend, connect_manager},
    },
    telemetry::trace::TraceHeaders,
};

/// Adds entry KEYS[2] (id ARGV[1], dead at ARGV[2]) to the index KEYS[1], then drops entries
/// older than ARGV[4] and the oldest past ARGV[3] entries, counting them in KEYS[3]. ARGV[5]
/// is the entries' key prefix, ARGV[6..] the entry's fields and values. Answers
/// {depth, dropped in all}.
const BURY: &str = r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local dropped = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])) do
  redis.call('DEL', ARGV[5] .. id)
  redis.call('ZREM', KEYS[1], id)
  dropped = dropped + 1
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  local gone = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #gone, 2 do
    redis.call('DEL', ARGV[5] .. gone[i])
    dropped = dropped + 1
  end
end
if dropped > 0 then redis.call('INCRBY', KEYS[3], dropped) end
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
"#;

/// Removes id ARGV[1] from the index KEYS[1] and its entry KEYS[2]; answers 1 if it was there.
const REMOVE: &str = r#"
local n = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return n
"#;

pub struct RedisDeadLetters {
    /// Every command here is safe to repeat (a bury writes the same entry again), so the
    /// first one after Redis came back is not lost to the dead connection.
    conn: Repeatable,
    prefix: String,
    max: usize,
    ttl_ms: u64,
    bury: Script,
    remove: Script,
}

impl RedisDeadLetters {
    pub async fn connect(
        url: &str,
        prefix: &str,
        max: usize,
        ttl_ms: u64,
    ) -> Result<Self, StoreError> {
        let conn = Repeatable(connect_manager(url).await?);
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            max: max.max(1),
            ttl_ms,
            bury: Script::new(BURY),
            remove: Script::new(REMOVE),
        })
    }

    fn index(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    fn entry_prefix(&self) -> String {
        format!("{}:dead:", self.prefix)
    }

    fn dropped_key(&self) -> String {
        format!("{}:deadcount", self.prefix)
    }

    fn oldest_kept(&self) -> u64 {
        now_ms().saturating_sub(self.ttl_ms)
    }
}

fn parse_entry(json: &[u8]) -> Option<DeadEntry> {
    serde_json::from_slice(json).ok()
}

#[async_trait]
impl DeadLetterStore for RedisDeadLetters {
    async fn bury(&self, dl: DeadLetter) -> Result<DeadDepth, StoreError> {
        let entry =
            serde_json::to_vec(&dl.entry).map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = &dl.entry.record.id;
        let m = &dl.message;
        let mut conn = self.conn.clone();
        let (depth, dropped): (u64, u64) = self
            .bury
            .key(self.index())
            .key(format!("{}{id}", self.entry_prefix()))
            .key(self.dropped_key())
            .arg(id)
            .arg(dl.entry.dead_at_ms)
            .arg(self.max)
            .arg(self.oldest_kept())
            .arg(self.entry_prefix())
            .arg("entry")
            .arg(entry)
            .arg("model")
            .arg(&m.model)
            .arg("payload")
            .arg(m.payload.as_ref())
            .arg("priority")
            .arg(m.priority)
            .arg("traceparent")
            .arg(m.trace.traceparent.as_deref().unwrap_or(""))
            .arg("tracestate")
            .arg(m.trace.tracestate.as_deref().unwrap_or(""))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(DeadDepth { depth, dropped })
    }

    async fn list(&self, filter: &DeadFilter) -> Result<Vec<DeadEntry>, StoreError> {
        const CHUNK: usize = 500;
        let mut conn = self.conn.clone();
        let since = filter.since_ms.unwrap_or(0).max(self.oldest_kept());
        let until = filter
            .until_ms
            .map_or_else(|| "+inf".to_string(), |u| format!("({u}"));
        let (limit, mut offset, mut out) = (filter.limit(), 0usize, Vec::new());
        // Oldest first, a chunk of ids at a time, until `limit` match or the index ends.
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.index())
                .arg(since)
                .arg(&until)
                .arg("LIMIT")
                .arg(offset)
                .arg(CHUNK)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET")
                    .arg(format!("{}{id}", self.entry_prefix()))
                    .arg("entry");
            }
            let entries: Vec<Option<Vec<u8>>> = if ids.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn).await.map_err(backend)?
            };
            for e in entries.iter().flatten().filter_map(|j| parse_entry(j)) {
                if filter.matches(&e.record.tenant, &e.record.model, e.dead_at_ms) {
                    out.push(e);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if ids.len() < CHUNK {
                return Ok(out);
            }
            offset += CHUNK;
        }
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.conn.clone();
        type Row = (
            Option<Vec<u8>>,
            Option<String>,
            Option<Vec<u8>>,
            Option<u8>,
            Option<String>,
            Option<String>,
        );
        let (entry, model, payload, priority, traceparent, tracestate): Row = redis::cmd("HMGET")
            .arg(format!("{}{id}", self.entry_prefix()))
            .arg(&[
                "entry",
                "model",
                "payload",
                "priority",
                "traceparent",
                "tracestate",
            ])
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let Some(entry) = entry.as_deref().and_then(parse_entry) else {
            return Ok(None);
        };
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(Some(DeadLetter {
            message: TaskMessage {
                task_id: entry.record.id.clone(),
                model: model.unwrap_or_else(|| entry.record.model.clone()),
                payload: Bytes::from(payload.unwrap_or_default()),
                trace: TraceHeaders {
                    traceparent: nonempty(traceparent),
                    tracestate: nonempty(tracestate),
                },
                priority: priority.unwrap_or(4),
            },
            entry,
        }))
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .remove
            .key(self.index())
            .key(format!("{}{id}", self.entry_prefix()))
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn depth(&self) -> Result<DeadDepth, StoreError> {
        let mut conn = self.conn.clone();
        let (depth, dropped): (u64, Option<u64>) = redis::pipe()
            .cmd("ZCARD")
            .arg(self.index())
            .cmd("GET")
            .arg(self.dropped_key())
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(DeadDepth {
            depth,
            dropped: dropped.unwrap_or(0),
        })
    }
}
