//! Redis task store: one hash per task (`<prefix>:task:<id>`) with a TTL, state changes made
//! atomic by Lua scripts, idempotency keys as `SET NX` entries per tenant with the same TTL.
//! Each tenant's unfinished tasks are a sorted set (`<prefix>:open:<tenant>`, score = the
//! task's expiry) so the open-task quota holds across every front end; an entry whose task
//! expired unfinished drops out by its score, so the count cannot drift upwards.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Script, Value, aio::ConnectionManager};

use super::{Change, Kept, Start, StoreError, TaskRecord, TaskState, TaskStore};
use crate::tasks::metrics::task_metrics;
use crate::{queue::TaskMessage, redis_conn::Repeatable};

mod codec;
mod keys;
mod responses;
mod scripts;

use codec::*;
use scripts::*;

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

    /// The connection for commands safe to repeat (reads, conditional or same-value writes):
    /// the first one after Redis came back is not lost to the dead connection.
    fn repeatable(&self) -> Repeatable {
        Repeatable(self.conn.clone())
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

    async fn append_response(&self, id: &str, fence: u32, resp: Bytes) -> Result<(), StoreError> {
        self.append(id, fence, resp).await
    }

    async fn responses(
        &self,
        id: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<Kept>, StoreError> {
        self.read(id, from, max).await
    }

    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
        outbox: Option<&mut TaskMessage>,
    ) -> Result<(TaskRecord, bool), StoreError> {
        let outbox = outbox.as_deref();
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
            task_metrics().task_store_data_loss.inc();
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
