//! The claim check as decorators on the task store and the broker ([`decorate`]), so the
//! task front and the worker hand whole payloads to a store and a broker and never see the
//! blob store ([`super::blobs`] keeps the blobs and sweeps them).
//!
//! - Store `create`: a large request goes to the blob store and the outbox message (which the
//!   caller then publishes) carries a stand-in; a task not created drops its blob again, as
//!   does one withdrawn.
//! - Broker `input`: a stand-in's request is read back for the worker.
//! - Store transition to `succeeded`: a large result goes to the blob store and the record
//!   keeps a stand-in. A result the store refused (late, fenced, failing) has its blob removed
//!   at once; one it kept drops the task's input, which only a retry would have needed.
//! - Store `open_result`: a stored result's bytes, streamed.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{
    Change, Kept, ResultStream, Start, StoreError, StoredResult, Takeover, TaskRecord, TaskState,
    TaskStore, WebhookStatus,
    blobs::{self, Blobs},
};
use crate::queue::{Broker, Delivery, QueueError, TaskMessage};

/// Wraps a store and a broker in the claim check over `blobs`.
pub fn decorate(
    store: Arc<dyn TaskStore>,
    broker: Arc<dyn Broker>,
    blobs: Arc<Blobs>,
) -> (Arc<dyn TaskStore>, Arc<dyn Broker>) {
    let check = Arc::new(Check {
        blobs,
        read_inputs: Mutex::default(),
    });
    (
        Arc::new(CheckedStore {
            inner: store,
            check: Arc::clone(&check),
        }),
        Arc::new(CheckedBroker {
            inner: broker,
            check,
        }),
    )
}

/// Tasks whose input this process read from a blob, so their success drops it: at most this
/// many (past it the set starts over, and the sweep removes what was not dropped).
const MAX_READ_INPUTS: usize = 65_536;

struct Check {
    blobs: Arc<Blobs>,
    read_inputs: Mutex<HashSet<String>>,
}

impl Check {
    fn inputs(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Nothing panics while holding it; a poisoned set is still a set.
        self.read_inputs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A succeeded transition's result, checked in: the change to write, and the blob it
    /// wrote (to remove should the store refuse the change).
    async fn result_in(
        &self,
        id: &str,
        to: TaskState,
        mut change: Change,
    ) -> Result<(Change, Option<String>), StoreError> {
        let Some(result) = change
            .result
            .as_ref()
            .filter(|_| to == TaskState::Succeeded)
        else {
            return Ok((change, None));
        };
        let attempt = change.fence.unwrap_or(0);
        match self.blobs.check_in_result(id, attempt, result).await {
            Ok(None) => Ok((change, None)),
            Ok(Some((stand_in, key))) => {
                change.result = Some(stand_in);
                Ok((change, Some(key)))
            }
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }

    /// After the store answered a transition whose result went to blob `written`.
    async fn result_out<T>(
        &self,
        id: &str,
        to: TaskState,
        written: Option<String>,
        out: &Result<T, StoreError>,
    ) {
        match out {
            Ok(_) if to == TaskState::Succeeded => {
                if self.inputs().remove(id) {
                    self.blobs.drop_input(id).await;
                }
            }
            Ok(_) => {}
            // Kept for the record's sake: a result over the store's own limit fails the task,
            // and the sweep removes the blob once nothing points to it.
            Err(StoreError::ResultTooLarge { .. }) => {}
            Err(_) => {
                if let Some(key) = written {
                    let _ = self.blobs.delete(&key).await;
                }
            }
        }
    }
}

struct CheckedStore {
    inner: Arc<dyn TaskStore>,
    check: Arc<Check>,
}

impl CheckedStore {
    async fn transition_checked<T>(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
        write: impl AsyncFnOnce(Change) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (change, written) = self.check.result_in(id, to, change).await?;
        let out = write(change).await;
        self.check.result_out(id, to, written, &out).await;
        out
    }
}

#[async_trait]
impl TaskStore for CheckedStore {
    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
        mut outbox: Option<&mut TaskMessage>,
    ) -> Result<(TaskRecord, bool), StoreError> {
        let id = rec.id.clone();
        let mut claimed = false;
        if let Some(msg) = outbox.as_deref_mut() {
            let stand_in = self
                .check
                .blobs
                .check_in_request(&msg.task_id, &msg.model, &msg.payload)
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            if let Some(stand_in) = stand_in {
                msg.payload = stand_in;
                claimed = true;
            }
        }
        let out = self.inner.create(rec, max_open, outbox).await;
        if claimed && !matches!(out, Ok((_, true))) {
            self.check.blobs.drop_input(&id).await;
        }
        out
    }
    async fn published(&self, id: &str) -> Result<(), StoreError> {
        self.inner.published(id).await
    }
    async fn unpublished(&self, id: &str) -> Result<Option<TaskMessage>, StoreError> {
        self.inner.unpublished(id).await
    }
    async fn claim_unpublished(
        &self,
        limit: usize,
        hold: Duration,
        all: bool,
    ) -> Result<Vec<TaskMessage>, StoreError> {
        self.inner.claim_unpublished(limit, hold, all).await
    }
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn get_with_result(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Option<Bytes>)>, StoreError> {
        self.inner.get_with_result(id).await
    }
    async fn start(
        &self,
        id: &str,
        reclaimed: bool,
        max_attempts: u32,
    ) -> Result<Start, StoreError> {
        self.inner.start(id, reclaimed, max_attempts).await
    }
    async fn start_many(
        &self,
        tasks: &[(&str, Takeover)],
        max_attempts: u32,
    ) -> Vec<Result<Start, StoreError>> {
        self.inner.start_many(tasks, max_attempts).await
    }
    async fn transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<TaskRecord, StoreError> {
        let inner = &self.inner;
        self.transition_checked(id, to, change, async |c| inner.transition(id, to, c).await)
            .await
    }
    async fn transition_quiet(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        self.transition_checked(id, to, change, async |c| {
            inner.transition_quiet(id, to, c).await
        })
        .await
    }
    async fn requeue(&self, rec: &TaskRecord, msg: &TaskMessage) -> Result<TaskRecord, StoreError> {
        // A dead letter's message is still the stand-in, and its input blob was kept for it.
        self.inner.requeue(rec, msg).await
    }
    async fn withdraw(&self, id: &str) -> Result<bool, StoreError> {
        let out = self.inner.withdraw(id).await;
        if matches!(out, Ok(true)) {
            self.check.blobs.drop_input(id).await;
        }
        out
    }
    async fn set_webhook(&self, id: &str, status: &WebhookStatus) -> Result<(), StoreError> {
        self.inner.set_webhook(id, status).await
    }
    async fn claim_webhooks(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.claim_webhooks(limit).await
    }
    fn keeps_outbox(&self) -> bool {
        self.inner.keeps_outbox()
    }
    async fn check(&self) -> Result<bool, StoreError> {
        self.inner.check().await
    }
    async fn queued_by_model(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.inner.queued_by_model().await
    }
    async fn append_response(&self, id: &str, fence: u32, resp: Bytes) -> Result<(), StoreError> {
        self.inner.append_response(id, fence, resp).await
    }
    async fn responses(
        &self,
        id: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<Kept>, StoreError> {
        self.inner.responses(id, from, max).await
    }
    async fn open_result(&self, s: &StoredResult) -> Result<ResultStream, StoreError> {
        let stream = self
            .check
            .blobs
            .stream(&s.key)
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(stream.map_err(std::io::Error::other).boxed())
    }
}

struct CheckedBroker {
    inner: Arc<dyn Broker>,
    check: Arc<Check>,
}

#[async_trait]
impl Broker for CheckedBroker {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        self.inner.publish(msg).await
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.inner.receive(max, wait).await
    }
    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.ack(d).await
    }
    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.retry(d).await
    }
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.inner.dead_letter(d, reason).await
    }
    fn lease(&self) -> Option<Duration> {
        self.inner.lease()
    }
    async fn renew(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.renew(d).await
    }
    async fn input(&self, d: &Delivery) -> Result<Bytes, QueueError> {
        let payload = self.inner.input(d).await?;
        // A stand-in is small: a payload over the size cannot be one, and is not parsed.
        if payload.len() > self.check.blobs.threshold() {
            return Ok(payload);
        }
        let Some(key) = blobs::claimed_key(&payload) else {
            return Ok(payload);
        };
        let id = &d.msg.task_id;
        let input = self
            .check
            .blobs
            .check_out_request(id, &key)
            .await
            .map_err(|e| QueueError::Backend(e.to_string()))?;
        let mut read = self.check.inputs();
        if read.len() >= MAX_READ_INPUTS {
            read.clear();
        }
        read.insert(id.clone());
        Ok(input)
    }
    async fn depth(&self) -> Result<u64, QueueError> {
        self.inner.depth().await
    }
    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        self.inner.dead_letters().await
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{
        proto::inference::{ModelInferRequest, ModelInferResponse},
        queue::memory::MemoryBroker,
        tasks::{memory::MemoryTaskStore, stored_result},
        telemetry::trace::TraceHeaders,
    };

    fn message(id: &str, bytes: usize) -> TaskMessage {
        let req = ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![Bytes::from(vec![3u8; bytes])],
            ..Default::default()
        };
        TaskMessage {
            task_id: id.into(),
            model: "m".into(),
            payload: req.encode_to_vec().into(),
            trace: TraceHeaders::default(),
            priority: 4,
        }
    }

    /// A store and a broker in process, decorated over an in-memory blob store of 1 KiB.
    fn parts() -> (Arc<dyn TaskStore>, Arc<dyn Broker>, Arc<Blobs>) {
        let blobs = Arc::new(Blobs::open("memory:///", 1024).unwrap());
        let store = Arc::new(MemoryTaskStore::new(Duration::from_secs(60), 100, 1 << 20));
        let broker = Arc::new(MemoryBroker::new(100));
        let (store, broker) = decorate(store, broker, Arc::clone(&blobs));
        (store, broker, blobs)
    }

    #[tokio::test]
    async fn a_large_task_travels_by_reference_and_its_blobs_go_when_done() {
        let (store, broker, blobs) = parts();
        let mut msg = message("big", 8192);
        let whole = msg.payload.clone();
        let rec = TaskRecord::new("big".into(), "t", "m", "", None);
        assert!(store.create(rec, 0, Some(&mut msg)).await.unwrap().1);
        assert!(msg.payload.len() < 200, "the caller publishes the stand-in");
        broker.publish(&msg).await.unwrap();

        let d = broker.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            d[0].msg.payload, msg.payload,
            "the broker carries the stand-in"
        );
        assert_eq!(
            broker.input(&d[0]).await.unwrap(),
            whole,
            "the worker gets the request"
        );
        assert!(matches!(
            store.start("big", false, 3).await.unwrap(),
            Start::Started(_)
        ));

        let resp: Bytes = ModelInferResponse {
            raw_output_contents: vec![Bytes::from(vec![5u8; 4096])],
            ..Default::default()
        }
        .encode_to_vec()
        .into();
        let change = Change {
            result: Some(resp.clone()),
            fence: Some(1),
            ..Default::default()
        };
        store
            .transition_quiet("big", TaskState::Succeeded, change)
            .await
            .unwrap();
        let (_, kept) = store.get_with_result("big").await.unwrap().unwrap();
        let stored = stored_result(&ModelInferResponse::decode(kept.unwrap()).unwrap()).unwrap();
        assert_eq!(stored.bytes, resp.len() as u64);
        let read: Vec<Bytes> = store
            .open_result(&stored)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(read.concat(), resp.to_vec());
        assert!(
            blobs.read("tasks/big/input").await.is_err(),
            "the input goes once the result is kept"
        );
    }

    #[tokio::test]
    async fn small_tasks_pass_unchanged_and_refused_ones_leave_no_blob() {
        let (store, broker, blobs) = parts();
        let mut small = message("small", 16);
        let before = small.payload.clone();
        let rec = TaskRecord::new("small".into(), "t", "m", "", None);
        store.create(rec, 0, Some(&mut small)).await.unwrap();
        assert_eq!(small.payload, before);
        broker.publish(&small).await.unwrap();
        let d = broker.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(broker.input(&d[0]).await.unwrap(), before);

        // The tenant's quota refuses the second task: its input blob is removed.
        let mut big = message("over", 8192);
        let rec = TaskRecord::new("over".into(), "t", "m", "", None);
        assert!(store.create(rec, 1, Some(&mut big)).await.is_err());
        assert!(blobs.read("tasks/over/input").await.is_err());

        // A result the store refuses (the task was cancelled) leaves no blob behind.
        store
            .transition("small", TaskState::Cancelled, Change::default())
            .await
            .unwrap();
        let change = Change {
            result: Some(vec![1u8; 4096].into()),
            fence: Some(1),
            ..Default::default()
        };
        let late = store
            .transition_quiet("small", TaskState::Succeeded, change)
            .await;
        assert!(matches!(late, Err(StoreError::Conflict { .. })), "{late:?}");
        assert!(blobs.read("tasks/small/result-1").await.is_err());
    }
}
