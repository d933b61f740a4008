//! Redis task store: one hash per task (`<prefix>:task:<id>`) with a TTL, state changes made
//! atomic by Lua scripts, idempotency keys as `SET NX` entries per tenant with the same TTL.
//! Each tenant's unfinished tasks are a sorted set (`<prefix>:open:<tenant>`, score = the
//! task's expiry) so the open-task quota holds across every front end; an entry whose task
//! expired unfinished drops out by its score, so the count cannot drift upwards.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Script, Value, aio::ConnectionManager};

use super::{Change, Start, StoreError, TaskError, TaskRecord, TaskState, TaskStore};
use crate::{queue::TaskMessage, redis_conn::Repeatable};

/// Creates the task unless the idempotency key (KEYS[2], if ARGV[3] == '1') names one already,
/// or the tenant's open tasks (KEYS[3]) number ARGV[5] (> 0) already. Returns the id of the
/// task that holds the key afterwards, or '' when over the quota. With a time in ARGV[7], the
/// task joins the outbox (KEYS[4]) due then: its message is among its fields (`ob_*`). Safe to
/// send twice: a second run finds the task and answers its id.
const CREATE: &str = r#"
-- Ids are fresh random: a task already there is this very call, sent again.
if redis.call('EXISTS', KEYS[1]) == 1 then return ARGV[1] end
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', ARGV[4] .. existing) == 1 then return existing end
end
-- Entries of tasks that expired unfinished leave by their score (every time, quota or not,
-- so the set stays as small as the tenant's live tasks).
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local quota = tonumber(ARGV[5])
if quota > 0 and redis.call('ZCARD', KEYS[3]) >= quota then return '' end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], tonumber(ARGV[7]), ARGV[1]) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return ARGV[1]
"#;

/// The record's fields, in the order the scripts return them (after a status code) and
/// `get` reads them; the result, often large, is read only when asked for.
const FIELDS: [&str; 14] = [
    "state",
    "tenant",
    "model",
    "version",
    "attempts",
    "queued_at_ms",
    "started_at_ms",
    "finished_at_ms",
    "error_code",
    "error_message",
    "idempotency_key",
    "history",
    "callback_url",
    "webhook",
];

/// Writes the webhook delivery state ARGV[1] of task KEYS[1] (id ARGV[2]) if the task still
/// exists (an HSET alone would bring back an expired task without its TTL). Pending (ARGV[3]
/// is a time): the outbox entry (KEYS[2]) is held until then; otherwise it leaves.
const SET_WEBHOOK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'webhook', ARGV[1])
  if ARGV[3] ~= '' then
    redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[2])
    return 0
  end
end
redis.call('ZREM', KEYS[2], ARGV[2])
return 0
"#;

/// Claims up to ARGV[3] entries of the webhook outbox KEYS[1] due by ARGV[1] (their holder
/// stopped renewing): each still owed (task ARGV[4] .. id in a final state of ARGV[5], with a
/// callback, its delivery not ended) is held ARGV[2] ms more and answered; the others leave.
const CLAIM_WEBHOOKS: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local state, callback, hook =
    unpack(redis.call('HMGET', ARGV[4] .. id, 'state', 'callback_url', 'webhook'))
  local owed = state and string.find(ARGV[5], ',' .. state .. ',', 1, true)
    and callback and callback ~= ''
  if owed and hook and hook ~= '' then
    local ok, h = pcall(cjson.decode, hook)
    if ok and type(h) == 'table' and h.state ~= 'pending' then owed = false end
  end
  if owed then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    table.insert(out, id)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

/// Prepended to the scripts below: `record(key, code)` is `{code, HMGET key FIELDS...}`, so a
/// state change answers with the record it left and needs no second read.
fn record_prelude() -> String {
    let names: Vec<String> = FIELDS.iter().map(|f| format!("'{f}'")).collect();
    format!(
        "local F = {{{}}}\nlocal function record(key, code)\n  local r = redis.call('HMGET', key, unpack(F))\n  table.insert(r, 1, code)\n  return r\nend\n{REMEMBER}",
        names.join(", ")
    )
}

/// `remember(key, outcome, code, message, now)` appends the end of the attempt the task is
/// running to its `history` (a JSON array, the last `MAX_HISTORY` kept).
const REMEMBER: &str = r#"
local function remember(key, outcome, code, message, now)
  local a, s, h = unpack(redis.call('HMGET', key, 'attempts', 'started_at_ms', 'history'))
  local list = {}
  if h and h ~= '' and h ~= '{}' then list = cjson.decode(h) end
  local e = {attempt = tonumber(a or '0'), started_at_ms = tonumber(s or '0'),
             ended_at_ms = tonumber(now), outcome = outcome}
  if code ~= '' then e.error_code = code; e.error_message = message end
  table.insert(list, e)
  while #list > 16 do table.remove(list, 1) end
  redis.call('HSET', key, 'history', cjson.encode(list))
end
"#;

/// Moves KEYS[1] to ARGV[1] if its state is one of ARGV[2] (comma-separated).
/// Returns record(KEYS[1], 1) on success, record(KEYS[1], 0) if the state forbids it, {-1} if
/// there is no task. Quiet (ARGV[13] == '1'): {1} on success, {0, state} when forbidden.
/// With a fence (ARGV[14], an attempt number) other than the task's attempts: {2, attempts}.
/// Leaving `running`, the attempt's end joins the history (outcome ARGV[15]). A final state
/// of a task with a callback puts it in the webhook outbox (KEYS[2]), held ARGV[16] ms for
/// the process delivering it.
const TRANSITION: &str = r#"
local cur, tenant, attempts, callback =
  unpack(redis.call('HMGET', KEYS[1], 'state', 'tenant', 'attempts', 'callback_url'))
if not cur then return {-1} end
local quiet = ARGV[13] == '1'
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then
  if quiet then return {0, cur} end
  return record(KEYS[1], 0)
end
if ARGV[14] ~= '' and tonumber(attempts or '0') ~= tonumber(ARGV[14]) then
  return {2, tonumber(attempts or '0')}
end
if cur == 'running' and ARGV[1] ~= 'running' then
  remember(KEYS[1], ARGV[15], ARGV[6], ARGV[7], ARGV[5])
end
local set = {'state', ARGV[1]}
if ARGV[4] ~= '' then table.insert(set, ARGV[4]); table.insert(set, ARGV[5]) end
if ARGV[6] ~= '' then
  table.insert(set, 'error_code'); table.insert(set, ARGV[6])
  table.insert(set, 'error_message'); table.insert(set, ARGV[7])
end
if ARGV[8] == '1' then table.insert(set, 'result'); table.insert(set, ARGV[9]) end
redis.call('HSET', KEYS[1], unpack(set))
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if ARGV[10] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
  -- Records written before tenants existed have no tenant field, and no place to free.
  if tenant then redis.call('ZREM', ARGV[11] .. tenant, ARGV[12]) end
  if callback and callback ~= '' then
    redis.call('ZADD', KEYS[2], tonumber(ARGV[5]) + tonumber(ARGV[16]), ARGV[12])
  end
end
if quiet then return {1} end
return record(KEYS[1], 1)
"#;

/// Starts each task KEYS[i] if its state is one of ARGV[2 + i] (comma-delimited, from
/// `TaskState::startable`; after a `|`, a time: a running attempt started after it is not
/// taken over) and fewer than ARGV[1] attempts were made: running, attempts + 1,
/// started at ARGV[2], its message out of the outbox (the last two ARGV: the outbox, and the
/// task keys' prefix). Answers, per key in order, record(key, 1) when started, {0} when the
/// state forbids it, record(key, 2) when the attempts are used up, {-1} if there is no task.
const START: &str = r#"
local outbox, tp = ARGV[#ARGV - 1], ARGV[#ARGV]
local out = {}
for i, key in ipairs(KEYS) do
  local from, before = string.match(ARGV[2 + i], '^([^|]*)|?(%d*)$')
  local cur, attempts, started = unpack(redis.call('HMGET', key, 'state', 'attempts', 'started_at_ms'))
  if not cur then
    out[i] = {-1}
  elseif not string.find(from, ',' .. cur .. ',', 1, true) then
    out[i] = {0}
  elseif cur == 'running' and before ~= '' and tonumber(started or '0') > tonumber(before) then
    -- A stale duplicate: the running attempt is younger than the lease that expired.
    out[i] = {0}
  else
    attempts = tonumber(attempts or '0')
    if attempts >= tonumber(ARGV[1]) then
      out[i] = record(key, 2)
    else
      -- Taken back from a worker that never answered: that attempt was lost.
      if cur == 'running' then remember(key, 'worker lost', '', '', ARGV[2]) end
      redis.call('HSET', key, 'state', 'running', 'started_at_ms', ARGV[2], 'attempts', attempts + 1)
      -- Started: the broker delivered it, so the outbox has nothing more to keep.
      redis.call('ZREM', outbox, string.sub(key, #tp + 1))
      redis.call('HDEL', key, 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate', 'ob_sent')
      out[i] = record(key, 1)
    end
  end
end
return out
"#;

/// Withdraws task KEYS[1] (id ARGV[2]) from the outbox (KEYS[2]) and, unless a worker
/// started it (then 0), deletes it and its place among its tenant's open tasks (1).
const WITHDRAW: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[2])
local state, attempts, tenant = unpack(redis.call('HMGET', KEYS[1], 'state', 'attempts', 'tenant'))
if not state then return 1 end
if state ~= 'queued' or (attempts and attempts ~= '0') then return 0 end
redis.call('DEL', KEYS[1])
if tenant then redis.call('ZREM', ARGV[1] .. tenant, ARGV[2]) end
return 1
"#;

/// Marks task ARGV[1]'s message (hash KEYS[2]) as confirmed by the broker and due again in
/// the outbox KEYS[1] at ARGV[2], if it is still there (a worker may have started it already).
const PUBLISHED: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], 'ob_sent', '1')
end
return 0
"#;

/// The outbox message fields of a task's hash.
const OUTBOX_FIELDS: [&str; 4] = [
    "ob_payload",
    "ob_priority",
    "ob_traceparent",
    "ob_tracestate",
];

/// Claims up to ARGV[4] entries of the outbox KEYS[1] due by ARGV[1] (a time, or +inf): each
/// task (ARGV[5] .. id) still queued and never started is held until ARGV[2] + ARGV[3] ms
/// and answered as {id, model, payload, priority, traceparent, tracestate}; the others leave,
/// with their message.
const CLAIM_UNPUBLISHED: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(due) do
  local key = ARGV[5] .. id
  local state, attempts, model, p, pr, tp, ts = unpack(redis.call('HMGET', key, 'state',
    'attempts', 'model', 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate'))
  if state == 'queued' and (not attempts or attempts == '0') and p then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), id)
    table.insert(out, {id, model or '', p, pr or '', tp or '', ts or ''})
  else
    redis.call('ZREM', KEYS[1], id)
    if state then
      redis.call('HDEL', key, 'ob_payload', 'ob_priority', 'ob_traceparent', 'ob_tracestate', 'ob_sent')
    end
  end
end
return out
"#;

/// Writes a replayed record to KEYS[1] unless a task there is in another state than failed
/// (answered with that state; '' when written). ARGV[1] TTL, ARGV[2] the open set's score
/// base (now), ARGV[3] the id, ARGV[4] when it is due in the outbox (KEYS[3]), ARGV[5..] the
/// record's fields and values, its message among them.
const REQUEUE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if cur and cur ~= 'failed' then return cur end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return ''
"#;

pub struct RedisTaskStore {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    max_result_bytes: usize,
    create: Script,
    transition: Script,
    start: Script,
    withdraw: Script,
    requeue: Script,
    set_webhook: Script,
    claim_webhooks: Script,
    claim_unpublished: Script,
    published: Script,
    /// How long an owed webhook stays with the process delivering it without a renewal.
    webhook_hold: Duration,
    /// How long a new task's message waits in the outbox for its submitter's publish.
    outbox_grace: Duration,
    /// How long a published task's message is kept before it is published again, should no
    /// worker have started the task by then.
    outbox_recheck: Duration,
    /// The epoch this process last saw in `<prefix>:epoch`: the key is written once by
    /// whichever process comes first and never removed, so finding it missing or changed
    /// means Redis lost its data.
    epoch: std::sync::Mutex<Option<String>>,
}

pub(super) fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A managed connection to the Redis the task store (and the dead letters) live in.
pub(super) async fn connect_manager(url: &str) -> Result<ConnectionManager, StoreError> {
    crate::redis_conn::connect(url).await.map_err(backend)
}

impl RedisTaskStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        max_result_bytes: usize,
    ) -> Result<Self, StoreError> {
        let conn = connect_manager(url).await?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            ttl,
            max_result_bytes,
            create: Script::new(CREATE),
            transition: Script::new(&(record_prelude() + TRANSITION)),
            start: Script::new(&(record_prelude() + START)),
            withdraw: Script::new(WITHDRAW),
            requeue: Script::new(REQUEUE),
            set_webhook: Script::new(SET_WEBHOOK),
            claim_webhooks: Script::new(CLAIM_WEBHOOKS),
            claim_unpublished: Script::new(CLAIM_UNPUBLISHED),
            published: Script::new(PUBLISHED),
            webhook_hold: Duration::from_secs(60),
            outbox_grace: super::outbox_grace(Duration::ZERO),
            outbox_recheck: Duration::from_secs(300),
            epoch: Default::default(),
        })
    }

    /// How long a new task's message waits in the outbox for its submitter's publish, and a
    /// published one for a worker to start it before it is published again.
    pub fn with_outbox(mut self, grace: Duration, recheck: Duration) -> Self {
        self.outbox_grace = grace;
        self.outbox_recheck = recheck;
        self
    }

    /// The tasks whose message the broker may not hold yet, by when another process may
    /// publish it.
    fn unpublished_set(&self) -> String {
        format!("{}:outbox", self.prefix)
    }

    /// When a message put in the outbox now is due for another publisher.
    fn outbox_due(&self) -> String {
        (super::now_ms() + self.outbox_grace.as_millis() as u64).to_string()
    }

    /// How long the process delivering a task's webhook holds it between renewals (see
    /// `webhooks::hold`): past it, another process takes the delivery over.
    pub fn with_webhook_hold(mut self, hold: Duration) -> Self {
        self.webhook_hold = hold;
        self
    }

    fn outbox(&self) -> String {
        format!("{}:webhooks", self.prefix)
    }

    /// The connection for commands safe to repeat (reads, conditional or same-value writes):
    /// the first one after Redis came back is not lost to the dead connection.
    fn repeatable(&self) -> Repeatable {
        Repeatable(self.conn.clone())
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

    /// Runs `TRANSITION`; `quiet` asks for no record back. Answers the script's code and
    /// values.
    async fn run_transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
        quiet: bool,
    ) -> Result<(i64, Vec<Value>), StoreError> {
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
        let reply: Vec<Value> = self
            .transition
            .key(self.key(id))
            .key(self.outbox())
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
            .arg(if quiet { "1" } else { "0" })
            .arg(change.fence.map(|f| f.to_string()).unwrap_or_default())
            .arg(super::outcome_of(to))
            .arg(self.webhook_hold.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        coded(reply)
    }
}

/// A message's fields as the outbox keeps them in its task's hash.
fn message_fields(msg: &TaskMessage) -> [(&'static str, Vec<u8>); 4] {
    let text = |s: &Option<String>| s.clone().unwrap_or_default().into_bytes();
    [
        ("ob_payload", msg.payload.to_vec()),
        ("ob_priority", msg.priority.to_string().into_bytes()),
        ("ob_traceparent", text(&msg.trace.traceparent)),
        ("ob_tracestate", text(&msg.trace.tracestate)),
    ]
}

/// The message of task `id` from `[model, payload, priority, traceparent, tracestate]`.
fn outboxed(id: &str, values: &[Value]) -> Option<TaskMessage> {
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
fn field(values: &[Value], i: usize) -> Option<&[u8]> {
    match values.get(i)? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A record from values in `FIELDS` order, read by position: one reply per task on the hot
/// paths, so no map of names is built for it.
fn parse(id: &str, values: &[Value]) -> Option<TaskRecord> {
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
fn fenced(id: &str, fence: Option<u32>, values: &[Value]) -> StoreError {
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
fn coded(reply: Vec<Value>) -> Result<(i64, Vec<Value>), StoreError> {
    let mut it = reply.into_iter();
    match it.next() {
        Some(Value::Int(c)) => Ok((c, it.collect())),
        other => Err(StoreError::Backend(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

#[async_trait]
impl TaskStore for RedisTaskStore {
    async fn queued_by_model(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut conn = self.repeatable();
        let mut sets: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.open_prefix()))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            sets.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        // Unfinished tasks of every tenant (entries past their expiry excluded), then each
        // one's state and model, a pipeline per thousand.
        let mut out = HashMap::new();
        if sets.is_empty() {
            return Ok(out);
        }
        let now = super::now_ms();
        let mut pipe = redis::pipe();
        for set in &sets {
            pipe.cmd("ZRANGEBYSCORE").arg(set).arg(now).arg("+inf");
        }
        let ids: Vec<Vec<String>> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let ids: Vec<String> = ids.into_iter().flatten().collect();
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(self.key(id))
                    .arg("state")
                    .arg("model");
            }
            let rows: Vec<(Option<String>, Option<String>)> =
                pipe.query_async(&mut conn).await.map_err(backend)?;
            for (state, model) in rows {
                if let (Some(s), Some(m)) = (state, model)
                    && s == TaskState::Queued.as_str()
                {
                    *out.entry(m).or_default() += 1;
                }
            }
        }
        Ok(out)
    }

    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
        outbox: Option<&TaskMessage>,
    ) -> Result<(TaskRecord, bool), StoreError> {
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
        .key(self.unpublished_set())
        .arg(format!("{}:task:", self.prefix))
        .arg(max_open)
        .arg(super::now_ms())
        .arg(outbox.map(|_| self.outbox_due()).unwrap_or_default());
        if let Some(msg) = outbox {
            for (k, v) in message_fields(msg) {
                inv.arg(k).arg(v);
            }
        }
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
            ("callback_url", rec.callback_url.clone().unwrap_or_default()),
        ] {
            inv.arg(k).arg(v);
        }
        let mut conn = self.repeatable();
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
        let mut conn = self.repeatable();
        let values: Vec<Value> = redis::cmd("HMGET")
            .arg(self.key(id))
            .arg(&FIELDS[..])
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(parse(id, &values))
    }

    async fn get_with_result(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Option<Bytes>)>, StoreError> {
        let mut conn = self.repeatable();
        let mut values: Vec<Value> = redis::cmd("HMGET")
            .arg(self.key(id))
            .arg(&FIELDS[..])
            .arg("result")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        // The result comes last, after the record's fields.
        let result = if values.len() > FIELDS.len() {
            match values.pop() {
                Some(Value::BulkString(b)) => Some(Bytes::from(b)),
                _ => None,
            }
        } else {
            None
        };
        Ok(parse(id, &values).map(|rec| (rec, result)))
    }

    async fn start(
        &self,
        id: &str,
        reclaimed: bool,
        max_attempts: u32,
    ) -> Result<Start, StoreError> {
        let how = if reclaimed {
            super::Takeover::Yes
        } else {
            super::Takeover::No
        };
        self.start_many(&[(id, how)], max_attempts)
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::Backend("empty script reply".into())))
    }

    async fn start_many(
        &self,
        tasks: &[(&str, super::Takeover)],
        max_attempts: u32,
    ) -> Vec<Result<Start, StoreError>> {
        if tasks.is_empty() {
            return Vec::new();
        }
        let mut conn = self.conn.clone();
        // The states each delivery may start from, as the script matches them.
        let from = |reclaimed: bool| {
            let names: Vec<&str> = super::ALL_STATES
                .into_iter()
                .filter(|s| s.startable(reclaimed))
                .map(TaskState::as_str)
                .collect();
            format!(",{},", names.join(","))
        };
        let (fresh, reclaimed) = (from(false), from(true));
        let mut inv = self.start.prepare_invoke();
        inv.arg(max_attempts).arg(super::now_ms());
        let now = super::now_ms();
        for (id, how) in tasks {
            let from = match how {
                super::Takeover::No => fresh.clone(),
                super::Takeover::Yes => reclaimed.clone(),
                super::Takeover::AfterLease(lease) => format!(
                    "{reclaimed}|{}",
                    now.saturating_sub(lease.as_millis() as u64)
                ),
            };
            inv.key(self.key(id)).arg(from);
        }
        inv.arg(self.unpublished_set())
            .arg(format!("{}:task:", self.prefix));
        let replies: Vec<Vec<Value>> = match inv.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => return tasks.iter().map(|_| Err(backend(e.clone()))).collect(),
        };
        if replies.len() != tasks.len() {
            let e = format!("{} answers for {} tasks", replies.len(), tasks.len());
            return tasks
                .iter()
                .map(|_| Err(StoreError::Backend(e.clone())))
                .collect();
        }
        tasks
            .iter()
            .zip(replies)
            .map(|((id, _), reply)| {
                let (code, values) = coded(reply)?;
                let rec = || parse(id, &values).ok_or_else(|| StoreError::NotFound(id.to_string()));
                Ok(match code {
                    1 => Start::Started(rec()?),
                    2 => Start::Exhausted(rec()?),
                    _ => Start::Skip,
                })
            })
            .collect()
    }

    async fn transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<TaskRecord, StoreError> {
        let fence = change.fence;
        let (code, values) = self.run_transition(id, to, change, false).await?;
        if code == 2 {
            return Err(fenced(id, fence, &values));
        }
        match (code, parse(id, &values)) {
            (1, Some(rec)) => Ok(rec),
            (0, Some(rec)) => Err(StoreError::Conflict {
                id: id.to_string(),
                from: rec.state,
                to,
            }),
            _ => Err(StoreError::NotFound(id.to_string())),
        }
    }

    async fn transition_quiet(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<(), StoreError> {
        let fence = change.fence;
        let (code, values) = self.run_transition(id, to, change, true).await?;
        if code == 2 {
            return Err(fenced(id, fence, &values));
        }
        let state = field(&values, 0)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(TaskState::parse);
        match (code, state) {
            (1, _) => Ok(()),
            (0, Some(from)) => Err(StoreError::Conflict {
                id: id.to_string(),
                from,
                to,
            }),
            _ => Err(StoreError::NotFound(id.to_string())),
        }
    }

    async fn requeue(&self, rec: &TaskRecord, msg: &TaskMessage) -> Result<TaskRecord, StoreError> {
        let base = match self.get(&rec.id).await? {
            Some(cur) if cur.state != TaskState::Failed => {
                return Err(StoreError::Conflict {
                    id: rec.id.clone(),
                    from: cur.state,
                    to: TaskState::Queued,
                });
            }
            Some(cur) => cur,
            None => rec.clone(),
        };
        let q = base.replayed();
        let history =
            serde_json::to_string(&q.history).map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut inv = self.requeue.key(self.key(&q.id));
        inv.key(format!("{}{}", self.open_prefix(), q.tenant))
            .key(self.unpublished_set())
            .arg(self.ttl_ms())
            .arg(super::now_ms())
            .arg(&q.id)
            .arg(self.outbox_due());
        for (k, v) in message_fields(msg) {
            inv.arg(k).arg(v);
        }
        for (k, v) in [
            ("state", q.state.as_str().to_string()),
            ("tenant", q.tenant.clone()),
            ("model", q.model.clone()),
            ("version", q.version.clone()),
            ("attempts", "0".to_string()),
            ("queued_at_ms", q.queued_at_ms.to_string()),
            (
                "idempotency_key",
                q.idempotency_key.clone().unwrap_or_default(),
            ),
            ("history", history),
            ("callback_url", q.callback_url.clone().unwrap_or_default()),
        ] {
            inv.arg(k).arg(v);
        }
        let mut conn = self.conn.clone();
        let other: String = inv.invoke_async(&mut conn).await.map_err(backend)?;
        match TaskState::parse(&other) {
            Some(from) => Err(StoreError::Conflict {
                id: q.id.clone(),
                from,
                to: TaskState::Queued,
            }),
            None => Ok(q),
        }
    }

    async fn set_webhook(&self, id: &str, status: &super::WebhookStatus) -> Result<(), StoreError> {
        let json = serde_json::to_string(status).map_err(|e| StoreError::Backend(e.to_string()))?;
        let due = (status.state == super::WEBHOOK_PENDING)
            .then(|| (super::now_ms() + self.webhook_hold.as_millis() as u64).to_string());
        let mut conn = self.repeatable();
        let _: i64 = self
            .set_webhook
            .key(self.key(id))
            .key(self.outbox())
            .arg(json)
            .arg(id)
            .arg(due.unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn claim_webhooks(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let finals: Vec<&str> = super::ALL_STATES
            .into_iter()
            .filter(|s| s.is_final())
            .map(TaskState::as_str)
            .collect();
        let mut conn = self.conn.clone();
        self.claim_webhooks
            .key(self.outbox())
            .arg(super::now_ms())
            .arg(self.webhook_hold.as_millis() as u64)
            .arg(limit)
            .arg(format!("{}:task:", self.prefix))
            .arg(format!(",{},", finals.join(",")))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)
    }

    fn keeps_outbox(&self) -> bool {
        true
    }

    async fn check(&self) -> Result<bool, StoreError> {
        let mine = super::new_task_id();
        let mut conn = self.repeatable();
        // SET NX GET: writes ours if there is none, answers what was there.
        let found: Option<String> = redis::cmd("SET")
            .arg(format!("{}:epoch", self.prefix))
            .arg(&mine)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let now = found.unwrap_or(mine);
        let mut seen = self.epoch.lock().expect("epoch lock");
        let intact = seen.as_ref().is_none_or(|e| *e == now);
        if !intact {
            crate::telemetry::metrics::metrics()
                .task_store_data_loss
                .inc();
            tracing::error!(
                prefix = %self.prefix,
                "the task store came back without its data: tasks accepted before now, their \
                 records, results, queued messages and dead letters are gone; new tasks are \
                 accepted and run again"
            );
        }
        *seen = Some(now);
        Ok(intact)
    }

    async fn withdraw(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.repeatable();
        let removed: i64 = self
            .withdraw
            .key(self.key(id))
            .key(self.unpublished_set())
            .arg(self.open_prefix())
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(removed == 1)
    }

    async fn published(&self, id: &str) -> Result<(), StoreError> {
        // Kept until a worker starts the task (START takes it out), due again only at the
        // recheck: a message the broker loses later (a deleted queue) is published again.
        let due = super::now_ms() + self.outbox_recheck.as_millis() as u64;
        let mut conn = self.repeatable();
        let _: i64 = self
            .published
            .key(self.unpublished_set())
            .key(self.key(id))
            .arg(id)
            .arg(due)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn unpublished(&self, id: &str) -> Result<Option<TaskMessage>, StoreError> {
        let mut conn = self.repeatable();
        let (due, values): (Option<f64>, Vec<Value>) = redis::pipe()
            .cmd("ZSCORE")
            .arg(self.unpublished_set())
            .arg(id)
            .cmd("HMGET")
            .arg(self.key(id))
            .arg("state")
            .arg("attempts")
            .arg("ob_sent")
            .arg("model")
            .arg(&OUTBOX_FIELDS[..])
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let waiting = field(&values, 0) == Some(b"queued".as_slice())
            && field(&values, 1).is_none_or(|a| a == b"0")
            && field(&values, 2).is_none();
        if due.is_none() || !waiting {
            return Ok(None);
        }
        Ok(outboxed(id, &values[3..]))
    }

    async fn claim_unpublished(
        &self,
        limit: usize,
        hold: Duration,
        all: bool,
    ) -> Result<Vec<TaskMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = super::now_ms();
        let mut conn = self.repeatable();
        let rows: Vec<Vec<Value>> = self
            .claim_unpublished
            .key(self.unpublished_set())
            .arg(if all {
                "+inf".to_string()
            } else {
                now.to_string()
            })
            .arg(now)
            .arg(hold.as_millis() as u64)
            .arg(limit)
            .arg(format!("{}:task:", self.prefix))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let id = std::str::from_utf8(field(row, 0)?).ok()?;
                outboxed(id, &row[1..])
            })
            .collect())
    }
}
