//! Redis task store: one hash per task (`<prefix>:task:<id>`) with a TTL, state changes made
//! atomic by Lua scripts, idempotency keys as `SET NX` entries per tenant with the same TTL.
//! Each tenant's unfinished tasks are a sorted set (`<prefix>:open:<tenant>`, score = the
//! task's expiry) so the open-task quota holds across every front end; an entry whose task
//! expired unfinished drops out by its score, so the count cannot drift upwards.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{AsyncCommands, Script, aio::ConnectionManager};

use super::{Change, StoreError, TaskError, TaskRecord, TaskState, TaskStore};

/// Creates the task unless the idempotency key (KEYS[2], if ARGV[3] == '1') names one already,
/// or the tenant's open tasks (KEYS[3]) number ARGV[5] (> 0) already. Returns the id of the
/// task that holds the key afterwards, or '' when over the quota.
const CREATE: &str = r#"
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', ARGV[4] .. existing) == 1 then return existing end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local quota = tonumber(ARGV[5])
if quota > 0 and redis.call('ZCARD', KEYS[3]) >= quota then return '' end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return ARGV[1]
"#;

/// Moves KEYS[1] to ARGV[1] if its state is one of ARGV[2] (comma-separated).
/// Returns 1 on success, 0 if the state forbids it, -1 if the task does not exist.
const TRANSITION: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'error_code', ARGV[6], 'error_message', ARGV[7]) end
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'result', ARGV[9]) end
if ARGV[10] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
  -- Records written before tenants existed have no tenant field, and no place to free.
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then redis.call('ZREM', ARGV[11] .. tenant, ARGV[12]) end
end
return 1
"#;

/// Deletes task KEYS[1] (id ARGV[2]) and its place among its tenant's open tasks.
const REMOVE: &str = r#"
local tenant = redis.call('HGET', KEYS[1], 'tenant')
redis.call('DEL', KEYS[1])
if tenant then redis.call('ZREM', ARGV[1] .. tenant, ARGV[2]) end
return 1
"#;

pub struct RedisTaskStore {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    max_result_bytes: usize,
    create: Script,
    transition: Script,
    remove: Script,
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedisTaskStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        max_result_bytes: usize,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(6);
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(backend)?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            ttl,
            max_result_bytes,
            create: Script::new(CREATE),
            transition: Script::new(TRANSITION),
            remove: Script::new(REMOVE),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:task:{id}", self.prefix)
    }

    fn open_prefix(&self) -> String {
        format!("{}:open:", self.prefix)
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }
}

fn parse(id: &str, h: &HashMap<String, Vec<u8>>) -> Option<TaskRecord> {
    let s = |k: &str| h.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
    let n = |k: &str| s(k).and_then(|v| v.parse::<u64>().ok());
    let state = TaskState::parse(&s("state")?)?;
    Some(TaskRecord {
        id: id.to_string(),
        tenant: s("tenant").unwrap_or_default(),
        model: s("model").unwrap_or_default(),
        version: s("version").unwrap_or_default(),
        state,
        attempts: n("attempts").unwrap_or(0) as u32,
        queued_at_ms: n("queued_at_ms").unwrap_or(0),
        started_at_ms: n("started_at_ms"),
        finished_at_ms: n("finished_at_ms"),
        error: s("error_code").map(|code| TaskError {
            code,
            message: s("error_message").unwrap_or_default(),
        }),
        idempotency_key: s("idempotency_key").filter(|k| !k.is_empty()),
    })
}

#[async_trait]
impl TaskStore for RedisTaskStore {
    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
    ) -> Result<(TaskRecord, bool), StoreError> {
        let mut conn = self.conn.clone();
        let idem_key = rec
            .idempotency_key
            .as_ref()
            .map(|k| format!("{}:idem:{}:{k}", self.prefix, rec.tenant));
        let mut inv = self.create.key(self.key(&rec.id));
        inv.key(
            idem_key
                .clone()
                .unwrap_or_else(|| format!("{}:idem:-", self.prefix)),
        )
        .arg(&rec.id)
        .arg(self.ttl_ms())
        .arg(if idem_key.is_some() { "1" } else { "0" })
        .key(format!("{}{}", self.open_prefix(), rec.tenant))
        .arg(format!("{}:task:", self.prefix))
        .arg(max_open)
        .arg(super::now_ms());
        for (k, v) in [
            ("state", rec.state.as_str().to_string()),
            ("tenant", rec.tenant.clone()),
            ("model", rec.model.clone()),
            ("version", rec.version.clone()),
            ("attempts", rec.attempts.to_string()),
            ("queued_at_ms", rec.queued_at_ms.to_string()),
            (
                "idempotency_key",
                rec.idempotency_key.clone().unwrap_or_default(),
            ),
        ] {
            inv.arg(k).arg(v);
        }
        let holder: String = inv.invoke_async(&mut conn).await.map_err(backend)?;
        if holder.is_empty() {
            return Err(StoreError::QuotaExceeded {
                tenant: rec.tenant,
                limit: max_open,
            });
        }
        if holder == rec.id {
            return Ok((rec, true));
        }
        let existing = self
            .get(&holder)
            .await?
            .ok_or_else(|| StoreError::NotFound(holder.clone()))?;
        Ok((existing, false))
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = conn.hgetall(self.key(id)).await.map_err(backend)?;
        Ok(parse(id, &h))
    }

    async fn result(&self, id: &str) -> Result<Option<Bytes>, StoreError> {
        let mut conn = self.conn.clone();
        let r: Option<Vec<u8>> = conn.hget(self.key(id), "result").await.map_err(backend)?;
        Ok(r.map(Bytes::from))
    }

    async fn transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<TaskRecord, StoreError> {
        change.check_result_size(self.max_result_bytes)?;
        let from: Vec<&str> = to
            .reachable_from()
            .into_iter()
            .map(TaskState::as_str)
            .collect();
        let stamp = match to {
            TaskState::Running => "started_at_ms",
            TaskState::Queued => "",
            _ => "finished_at_ms",
        };
        let (code, message) = change
            .error
            .as_ref()
            .map_or((String::new(), String::new()), |e| {
                (e.code.clone(), e.message.clone())
            });
        let mut conn = self.conn.clone();
        let done: i64 = self
            .transition
            .key(self.key(id))
            .arg(to.as_str())
            .arg(from.join(","))
            .arg(if change.count_attempt { "1" } else { "0" })
            .arg(stamp)
            .arg(super::now_ms())
            .arg(code)
            .arg(message)
            .arg(if change.result.is_some() { "1" } else { "0" })
            .arg(change.result.as_deref().unwrap_or_default())
            .arg(if to.is_final() {
                self.ttl_ms().to_string()
            } else {
                String::new()
            })
            .arg(self.open_prefix())
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        let rec = self.get(id).await?;
        match (done, rec) {
            (1, Some(rec)) => Ok(rec),
            (0, Some(rec)) => Err(StoreError::Conflict {
                id: id.to_string(),
                from: rec.state,
                to,
            }),
            _ => Err(StoreError::NotFound(id.to_string())),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .remove
            .key(self.key(id))
            .arg(self.open_prefix())
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}
