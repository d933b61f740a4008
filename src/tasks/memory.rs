//! In-process task store: the embedded default. Records and results expire after the TTL;
//! the number of tasks kept is bounded.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Change, Start, StoreError, TaskRecord, TaskState, TaskStore, now_ms};
use crate::queue::TaskMessage;

struct Entry {
    rec: TaskRecord,
    result: Option<Bytes>,
    expires: Instant,
    /// A decoupled model's responses, with their attempt and bytes together.
    responses: Option<(u32, Vec<Bytes>, usize)>,
}

pub struct MemoryTaskStore {
    ttl: Duration,
    max_tasks: usize,
    max_result_bytes: usize,
    outbox_grace: Duration,
    outbox_recheck: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<String, Entry>,
    /// (tenant, idempotency key) → (task id, expiry)
    keys: HashMap<(String, String), (String, Instant)>,
    /// Tasks queued or running, per tenant (the quota's count).
    open: HashMap<String, u64>,
    /// Expired entries are swept at most once a second (on a create), so memory follows the
    /// live tasks rather than everything seen since the store was last full.
    last_purge: Option<Instant>,
    /// The outbox: messages of tasks no worker started yet, with when another claimer may
    /// publish them and whether their submitter's publish was confirmed.
    outbox: HashMap<String, (TaskMessage, Instant, bool)>,
}

impl Inner {
    fn closed(&mut self, tenant: &str) {
        if let Some(n) = self.open.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(tenant);
            }
        }
    }
}

impl MemoryTaskStore {
    pub fn new(ttl: Duration, max_tasks: usize, max_result_bytes: usize) -> Self {
        Self {
            ttl,
            max_tasks,
            max_result_bytes,
            outbox_grace: super::outbox_grace(Duration::ZERO),
            outbox_recheck: Duration::from_secs(300),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// How long a new task's message waits in the outbox for its submitter's publish, and a
    /// published one for a worker to start it before it is published again.
    pub fn with_outbox(mut self, grace: Duration, recheck: Duration) -> Self {
        self.outbox_grace = grace;
        self.outbox_recheck = recheck;
        self
    }

    fn purge(inner: &mut Inner, now: Instant) {
        let mut gone_open = Vec::new();
        inner.tasks.retain(|_, e| {
            let keep = e.expires > now;
            if !keep && !e.rec.state.is_final() {
                gone_open.push(e.rec.tenant.clone());
            }
            keep
        });
        for t in gone_open {
            inner.closed(&t);
        }
        inner.keys.retain(|_, (_, exp)| *exp > now);
        let Inner { outbox, tasks, .. } = inner;
        outbox.retain(|id, _| tasks.contains_key(id));
    }
}

#[async_trait]
impl TaskStore for MemoryTaskStore {
    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
        outbox: Option<&mut TaskMessage>,
    ) -> Result<(TaskRecord, bool), StoreError> {
        let outbox = outbox.as_deref();
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task store lock");
        if let Some(key) = &rec.idempotency_key {
            let k = (rec.tenant.clone(), key.clone());
            if let Some((id, exp)) = inner.keys.get(&k)
                && *exp > now
                && let Some(e) = inner.tasks.get(id)
            {
                return Ok((e.rec.clone(), false));
            }
        }
        if inner
            .last_purge
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            Self::purge(&mut inner, now);
            inner.last_purge = Some(now);
        }
        if inner.tasks.len() >= self.max_tasks {
            Self::purge(&mut inner, now);
            if inner.tasks.len() >= self.max_tasks {
                return Err(StoreError::Backend(format!(
                    "the in-memory task store holds its maximum of {} tasks",
                    self.max_tasks
                )));
            }
        }
        let open = inner.open.get(&rec.tenant).copied().unwrap_or(0);
        if max_open > 0 && open >= max_open {
            return Err(StoreError::QuotaExceeded {
                tenant: rec.tenant.clone(),
                limit: max_open,
            });
        }
        *inner.open.entry(rec.tenant.clone()).or_default() += 1;
        if let Some(key) = &rec.idempotency_key {
            inner.keys.insert(
                (rec.tenant.clone(), key.clone()),
                (rec.id.clone(), now + self.ttl),
            );
        }
        inner.tasks.insert(
            rec.id.clone(),
            Entry {
                rec: rec.clone(),
                result: None,
                expires: now + self.ttl,
                responses: None,
            },
        );
        if let Some(msg) = outbox {
            inner.outbox.insert(
                rec.id.clone(),
                (msg.clone(), now + self.outbox_grace, false),
            );
        }
        Ok((rec, true))
    }

    async fn published(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("task store lock");
        if let Some((_, due, sent)) = inner.outbox.get_mut(id) {
            *due = Instant::now() + self.outbox_recheck;
            *sent = true;
        }
        Ok(())
    }

    async fn unpublished(&self, id: &str) -> Result<Option<TaskMessage>, StoreError> {
        let inner = self.inner.lock().expect("task store lock");
        let queued = inner
            .tasks
            .get(id)
            .is_some_and(|e| e.rec.state == TaskState::Queued && e.rec.attempts == 0);
        Ok(inner
            .outbox
            .get(id)
            .filter(|(_, _, sent)| queued && !sent)
            .map(|(m, ..)| m.clone()))
    }

    async fn claim_unpublished(
        &self,
        limit: usize,
        hold: Duration,
        all: bool,
    ) -> Result<Vec<TaskMessage>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task store lock");
        let Inner { outbox, tasks, .. } = &mut *inner;
        // Only a task still waiting for its first start needs its message; the rest leave.
        outbox.retain(|id, _| {
            tasks.get(id).is_some_and(|e| {
                e.expires > now && e.rec.state == TaskState::Queued && e.rec.attempts == 0
            })
        });
        let mut out = Vec::new();
        for (msg, due, _) in outbox.values_mut() {
            if out.len() >= limit {
                break;
            }
            if all || *due <= now {
                *due = now + hold;
                out.push(msg.clone());
            }
        }
        Ok(out)
    }

    async fn queued_by_model(&self) -> Result<HashMap<String, u64>, StoreError> {
        let inner = self.inner.lock().expect("task store lock");
        let now = Instant::now();
        let mut out = HashMap::new();
        for e in inner.tasks.values() {
            if e.rec.state == TaskState::Queued && e.expires > now {
                *out.entry(e.rec.model.clone()).or_default() += 1;
            }
        }
        Ok(out)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let inner = self.inner.lock().expect("task store lock");
        Ok(inner
            .tasks
            .get(id)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.rec.clone()))
    }

    async fn get_with_result(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Option<Bytes>)>, StoreError> {
        let inner = self.inner.lock().expect("task store lock");
        Ok(inner
            .tasks
            .get(id)
            .filter(|e| e.expires > Instant::now())
            .map(|e| (e.rec.clone(), e.result.clone())))
    }

    async fn start(
        &self,
        id: &str,
        reclaimed: bool,
        max_attempts: u32,
    ) -> Result<Start, StoreError> {
        let mut inner = self.inner.lock().expect("task store lock");
        let Some(e) = inner
            .tasks
            .get_mut(id)
            .filter(|e| e.expires > Instant::now())
        else {
            return Ok(Start::Skip);
        };
        if !e.rec.state.startable(reclaimed) {
            return Ok(Start::Skip);
        }
        if e.rec.attempts >= max_attempts {
            return Ok(Start::Exhausted(e.rec.clone()));
        }
        if e.rec.state == TaskState::Running {
            // Taken back from a worker that never answered: that attempt was lost.
            let lost = super::Attempt::ending(&e.rec, super::WORKER_LOST, None);
            remember(&mut e.rec, lost);
        }
        let change = Change {
            count_attempt: true,
            ..Default::default()
        };
        apply(&mut e.rec, TaskState::Running, &change);
        let rec = e.rec.clone();
        // Started: the broker delivered it, so the outbox has nothing more to keep.
        inner.outbox.remove(id);
        Ok(Start::Started(rec))
    }

    async fn transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<TaskRecord, StoreError> {
        change.check_result_size(self.max_result_bytes)?;
        let mut inner = self.inner.lock().expect("task store lock");
        let e = inner
            .tasks
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if !e.rec.state.can_become(to) {
            return Err(StoreError::Conflict {
                id: id.to_string(),
                from: e.rec.state,
                to,
            });
        }
        if let Some(fence) = change.fence
            && fence != e.rec.attempts
        {
            return Err(StoreError::Fenced {
                id: id.to_string(),
                fence,
                current: e.rec.attempts,
            });
        }
        if e.rec.state == TaskState::Running && to != TaskState::Running {
            let done = super::Attempt::ending(&e.rec, super::outcome_of(to), change.error.as_ref());
            remember(&mut e.rec, done);
        }
        let was_open = !e.rec.state.is_final();
        apply(&mut e.rec, to, &change);
        if let Some(r) = change.result {
            e.result = Some(r);
        }
        if to.is_final() {
            e.expires = Instant::now() + self.ttl;
        }
        let rec = e.rec.clone();
        if was_open && to.is_final() {
            inner.closed(&rec.tenant);
        }
        Ok(rec)
    }

    async fn append_response(&self, id: &str, fence: u32, resp: Bytes) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("task store lock");
        let e = inner
            .tasks
            .get_mut(id)
            .filter(|e| e.expires > Instant::now())
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if fence != e.rec.attempts {
            return Err(StoreError::Fenced {
                id: id.to_string(),
                fence,
                current: e.rec.attempts,
            });
        }
        if e.rec.state != TaskState::Running {
            return Err(StoreError::Conflict {
                id: id.to_string(),
                from: e.rec.state,
                to: TaskState::Running,
            });
        }
        let kept = e.responses.get_or_insert_with(|| (fence, Vec::new(), 0));
        if kept.0 != fence {
            *kept = (fence, Vec::new(), 0);
        }
        let size = kept.2 + resp.len();
        if size > self.max_result_bytes {
            return Err(StoreError::ResultTooLarge {
                size,
                limit: self.max_result_bytes,
            });
        }
        kept.2 = size;
        kept.1.push(resp);
        Ok(())
    }

    async fn responses(
        &self,
        id: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<super::Kept>, StoreError> {
        let inner = self.inner.lock().expect("task store lock");
        Ok(inner
            .tasks
            .get(id)
            .filter(|e| e.expires > Instant::now())
            .map(|e| match &e.responses {
                Some((attempt, items, _)) => super::Kept {
                    attempt: *attempt,
                    responses: items.iter().skip(from).take(max).cloned().collect(),
                },
                None => super::Kept::default(),
            }))
    }

    async fn requeue(&self, rec: &TaskRecord, msg: &TaskMessage) -> Result<TaskRecord, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task store lock");
        let base = match inner.tasks.get(&rec.id).filter(|e| e.expires > now) {
            Some(e) if e.rec.state != TaskState::Failed => {
                return Err(StoreError::Conflict {
                    id: rec.id.clone(),
                    from: e.rec.state,
                    to: TaskState::Queued,
                });
            }
            Some(e) => e.rec.clone(),
            None => rec.clone(),
        };
        let queued = base.replayed();
        *inner.open.entry(queued.tenant.clone()).or_default() += 1;
        inner.outbox.insert(
            queued.id.clone(),
            (msg.clone(), now + self.outbox_grace, false),
        );
        inner.tasks.insert(
            queued.id.clone(),
            Entry {
                rec: queued.clone(),
                result: None,
                expires: now + self.ttl,
                responses: None,
            },
        );
        Ok(queued)
    }

    async fn set_webhook(&self, id: &str, status: &super::WebhookStatus) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("task store lock");
        if let Some(e) = inner.tasks.get_mut(id) {
            e.rec.webhook = Some(status.clone());
        }
        Ok(())
    }

    async fn withdraw(&self, id: &str) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock().expect("task store lock");
        inner.outbox.remove(id);
        match inner.tasks.get(id) {
            None => return Ok(true),
            Some(e) if e.rec.state != TaskState::Queued || e.rec.attempts > 0 => return Ok(false),
            Some(_) => {}
        }
        if let Some(e) = inner.tasks.remove(id) {
            inner.closed(&e.rec.tenant);
        }
        inner.keys.retain(|_, (task, _)| task != id);
        Ok(true)
    }
}

/// Adds an attempt's end to a record's history, keeping the last [`super::MAX_HISTORY`].
pub(crate) fn remember(rec: &mut TaskRecord, a: super::Attempt) {
    rec.history.push(a);
    if rec.history.len() > super::MAX_HISTORY {
        rec.history.remove(0);
    }
}

/// Writes a transition into a record (shared with the tests of other stores).
pub(crate) fn apply(rec: &mut TaskRecord, to: TaskState, change: &Change) {
    let now = now_ms();
    rec.state = to;
    if change.count_attempt {
        rec.attempts += 1;
    }
    match to {
        TaskState::Running => rec.started_at_ms = Some(now),
        TaskState::Queued => {}
        _ => rec.finished_at_ms = Some(now),
    }
    if change.error.is_some() {
        rec.error = change.error.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemoryTaskStore {
        MemoryTaskStore::new(Duration::from_secs(60), 100, 16)
    }

    #[tokio::test]
    async fn the_open_task_quota_counts_queued_and_running_tasks_per_tenant() {
        let s = store();
        for id in ["a", "b"] {
            let key = Some(format!("key-{id}"));
            s.create(TaskRecord::new(id.into(), "t1", "m", "", key), 2, None)
                .await
                .unwrap();
        }
        let err = s
            .create(TaskRecord::new("c".into(), "t1", "m", "", None), 2, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::QuotaExceeded { limit: 2, .. }),
            "{err:?}"
        );
        // Another tenant is not held back; a replayed key is answered despite the quota.
        s.create(TaskRecord::new("d".into(), "t2", "m", "", None), 2, None)
            .await
            .unwrap();
        let replay = TaskRecord::new("z".into(), "t1", "m", "", Some("key-a".into()));
        let (rec, created) = s.create(replay, 2, None).await.unwrap();
        assert_eq!((rec.id.as_str(), created), ("a", false));
        // Running still counts; a final state frees a place; so does removal.
        s.transition("a", TaskState::Running, Change::default())
            .await
            .unwrap();
        assert!(
            s.create(TaskRecord::new("c".into(), "t1", "m", "", None), 2, None)
                .await
                .is_err()
        );
        s.transition("a", TaskState::Succeeded, Change::default())
            .await
            .unwrap();
        s.create(TaskRecord::new("c".into(), "t1", "m", "", None), 2, None)
            .await
            .unwrap();
        assert!(s.withdraw("b").await.unwrap());
        s.create(TaskRecord::new("e".into(), "t1", "m", "", None), 2, None)
            .await
            .unwrap();
        assert!(
            s.create(TaskRecord::new("f".into(), "t1", "m", "", None), 2, None)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn expired_tasks_are_swept_without_waiting_for_the_store_to_fill() {
        let s = MemoryTaskStore::new(Duration::from_millis(50), 1000, 16);
        for i in 0..10 {
            s.create(
                TaskRecord::new(format!("t{i}"), "t", "m", "", None),
                0,
                None,
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        s.create(TaskRecord::new("new".into(), "t", "m", "", None), 0, None)
            .await
            .unwrap();
        let inner = s.inner.lock().unwrap();
        assert_eq!(inner.tasks.len(), 1, "only the live task is kept");
        assert!(inner.open.get("t").is_some_and(|n| *n == 1));
    }

    #[tokio::test]
    async fn idempotency_keys_are_per_tenant() {
        let s = store();
        let a = TaskRecord::new("a".into(), "t1", "m", "", Some("k".into()));
        let (_, created) = s.create(a, 0, None).await.unwrap();
        assert!(created);
        let again = TaskRecord::new("b".into(), "t1", "m", "", Some("k".into()));
        let (rec, created) = s.create(again, 0, None).await.unwrap();
        assert_eq!((rec.id.as_str(), created), ("a", false));
        let other = TaskRecord::new("c".into(), "t2", "m", "", Some("k".into()));
        assert!(
            s.create(other, 0, None).await.unwrap().1,
            "another tenant's key is its own"
        );
    }

    #[tokio::test]
    async fn late_results_do_not_overwrite_a_cancelled_task() {
        let s = store();
        s.create(TaskRecord::new("a".into(), "t", "m", "", None), 0, None)
            .await
            .unwrap();
        s.transition(
            "a",
            TaskState::Running,
            Change {
                count_attempt: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        s.transition("a", TaskState::Cancelled, Change::default())
            .await
            .unwrap();
        let err = s
            .transition(
                "a",
                TaskState::Succeeded,
                Change {
                    result: Some(Bytes::from_static(b"x")),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Conflict {
                from: TaskState::Cancelled,
                ..
            }
        ));
        let (rec, result) = s.get_with_result("a").await.unwrap().unwrap();
        assert_eq!(result, None);
        assert_eq!((rec.state, rec.attempts), (TaskState::Cancelled, 1));
    }

    #[tokio::test]
    async fn oversize_results_are_refused_and_the_store_is_bounded() {
        let s = store();
        s.create(TaskRecord::new("a".into(), "t", "m", "", None), 0, None)
            .await
            .unwrap();
        s.transition("a", TaskState::Running, Change::default())
            .await
            .unwrap();
        let err = s
            .transition(
                "a",
                TaskState::Succeeded,
                Change {
                    result: Some(Bytes::from(vec![0; 17])),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::ResultTooLarge {
                size: 17,
                limit: 16
            }
        );
        for i in 0..99 {
            s.create(
                TaskRecord::new(format!("x{i}"), "t", "m", "", None),
                0,
                None,
            )
            .await
            .unwrap();
        }
        assert!(
            s.create(TaskRecord::new("y".into(), "t", "m", "", None), 0, None)
                .await
                .is_err()
        );
    }
}
