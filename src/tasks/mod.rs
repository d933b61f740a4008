//! Async tasks: what a task is, the states it moves through, and where tasks are kept.
//!
//! The one state machine:
//!
//! ```text
//! queued ──► running ──► succeeded
//!   │  ▲        │ ├────► failed
//!   │  └─retry──┘ ├────► cancelled
//!   │             └────► expired
//!   ├──► cancelled / expired / failed
//! ```
//!
//! `running → running` is allowed only for a delivery the broker reclaimed from a worker that
//! stopped answering. Final states never change, so a late result cannot overwrite a task that
//! was cancelled or expired meanwhile.

pub mod admin;
pub mod blobs;
pub mod claim;
pub mod config;
pub mod dead;
pub mod follow;
pub mod front;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod parts;
pub mod redis;
pub mod view;
pub mod webhooks;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::queue::TaskMessage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = TaskStatus)]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

pub const ALL_STATES: [TaskState; 6] = [
    TaskState::Queued,
    TaskState::Running,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
    TaskState::Expired,
];

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL_STATES.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Expired
        )
    }

    /// The allowed transitions, all of them, in one place.
    pub fn can_become(self, next: Self) -> bool {
        use TaskState::*;
        matches!(
            (self, next),
            (Queued, Running | Cancelled | Expired | Failed)
                | (
                    Running,
                    Running | Queued | Succeeded | Failed | Cancelled | Expired
                )
        )
    }

    /// Whether a worker holding a delivery of the task may start it from this state: when
    /// queued, or when running and `reclaimed` (no worker holds the delivery any more: the
    /// broker took it back from a dead consumer, or a worker handed it back).
    pub fn startable(self, reclaimed: bool) -> bool {
        self.can_become(TaskState::Running) && (self != TaskState::Running || reclaimed)
    }

    /// States from which `self` may be reached.
    pub fn reachable_from(self) -> Vec<TaskState> {
        ALL_STATES
            .into_iter()
            .filter(|s| s.can_become(self))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = TaskErrorBody)]
pub struct TaskError {
    /// gRPC code name, e.g. `INVALID_ARGUMENT`.
    pub code: String,
    pub message: String,
}

/// How one attempt ended, written by the store as the task leaves `running` (the last 16
/// are kept): what an operator reads to see why a task failed, and that a replayed one ran
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = AttemptBody)]
pub struct Attempt {
    pub attempt: u32,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// The state the attempt left the task in (`retried` when queued again, `replayed` to
    /// separate a replayed task's runs), or `worker lost` when its worker never answered and
    /// the broker delivered it again.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

pub const MAX_HISTORY: usize = 16;
pub const WORKER_LOST: &str = "worker lost";
/// The history entry that separates a replayed task's runs.
pub const REPLAYED: &str = "replayed";

impl Attempt {
    /// The entry for the attempt `rec` is running, ending now as `outcome`.
    pub fn ending(rec: &TaskRecord, outcome: &str, error: Option<&TaskError>) -> Self {
        Self {
            attempt: rec.attempts,
            started_at_ms: rec.started_at_ms.unwrap_or(0),
            ended_at_ms: now_ms(),
            outcome: outcome.to_string(),
            error_code: error.map(|e| e.code.clone()),
            error_message: error.map(|e| e.message.clone()),
        }
    }
}

/// The outcome an attempt has when it moves its task to `to`.
pub fn outcome_of(to: TaskState) -> &'static str {
    match to {
        TaskState::Queued => "retried",
        other => other.as_str(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub version: String,
    pub state: TaskState,
    /// Times a worker started the task.
    pub attempts: u32,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub error: Option<TaskError>,
    pub idempotency_key: Option<String>,
    /// Attempts that ended, oldest first.
    #[serde(default)]
    pub history: Vec<Attempt>,
    /// Where the final state is POSTed, signed (checked against the allow-list at submit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// How the completion webhook's delivery went, once there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookStatus>,
}

/// `WebhookStatus::state` while the delivery is retried.
pub const WEBHOOK_PENDING: &str = "pending";

/// The delivery state of a task's completion webhook, kept on the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = WebhookBody)]
pub struct WebhookStatus {
    /// `pending` (retrying), `delivered` or `failed` (gave up, or refused to send).
    pub state: String,
    /// The `webhook-id` header: the same on every try of one delivery.
    pub id: String,
    pub attempts: u32,
    /// The receiver's last HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at_ms: u64,
}

impl TaskRecord {
    pub fn new(id: String, tenant: &str, model: &str, version: &str, key: Option<String>) -> Self {
        Self {
            id,
            tenant: tenant.to_string(),
            model: model.to_string(),
            version: version.to_string(),
            state: TaskState::Queued,
            attempts: 0,
            queued_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            idempotency_key: key,
            history: Vec::new(),
            callback_url: None,
            webhook: None,
        }
    }
}

impl TaskRecord {
    /// The record a replay queues: attempts start again from 0, the error is cleared, and the
    /// history keeps the failed run's attempts followed by a `replayed` entry.
    pub fn replayed(mut self) -> Self {
        let now = now_ms();
        self.history.push(Attempt {
            attempt: self.attempts,
            started_at_ms: now,
            ended_at_ms: now,
            outcome: REPLAYED.to_string(),
            error_code: None,
            error_message: None,
        });
        let over = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..over);
        self.state = TaskState::Queued;
        self.attempts = 0;
        self.queued_at_ms = now;
        self.started_at_ms = None;
        self.finished_at_ms = None;
        self.error = None;
        // A replayed task ends again, and is told about again.
        self.webhook = None;
        self
    }
}

/// Whether a delivery may take over a task another delivery left `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// A first delivery: it starts only a queued task.
    No,
    /// Handed back by the worker that held it (or redelivered by a broker that saw its
    /// consumer die): it takes over.
    Yes,
    /// Reclaimed by the broker after its lease ran out: it takes over an attempt at least
    /// this old.
    AfterLease(std::time::Duration),
}

impl Takeover {
    /// Whether it may take over at all.
    pub fn any(self) -> bool {
        self != Takeover::No
    }
}

/// Whether the running attempt of `rec` started less than `lease` ago.
fn too_young(rec: &TaskRecord, lease: Duration) -> bool {
    rec.started_at_ms
        .is_some_and(|s| now_ms().saturating_sub(s) < lease.as_millis() as u64)
}

/// What `TaskStore::start` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Now running; the record counts this attempt.
    Started(TaskRecord),
    /// Gone (expired), final, or running elsewhere: nothing to run.
    Skip,
    /// Every attempt was used; the record is unchanged (its last error says why).
    Exhausted(TaskRecord),
}

/// What a transition writes besides the new state.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub count_attempt: bool,
    /// The attempt the writer ran (a fencing token): refused with [`StoreError::Fenced`]
    /// when the task has been started again since, so a worker that lost its delivery
    /// cannot overwrite the newer attempt.
    pub fence: Option<u32>,
    pub error: Option<TaskError>,
    /// The encoded `ModelInferResponse` of a succeeded task.
    pub result: Option<Bytes>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StoreError {
    #[error("task {0} not found")]
    NotFound(String),
    /// The task is in a state that cannot become the requested one.
    #[error("task {id} is {from:?} and cannot become {to:?}")]
    Conflict {
        id: String,
        from: TaskState,
        to: TaskState,
    },
    /// The tenant already has `limit` tasks queued or running.
    #[error("tenant '{tenant}' already has {limit} tasks queued or running (its quota)")]
    QuotaExceeded { tenant: String, limit: u64 },
    /// A newer attempt started since the writer's ([`Change::fence`]).
    #[error("task {id}: attempt {fence} was taken over by attempt {current}")]
    Fenced {
        id: String,
        fence: u32,
        current: u32,
    },
    #[error("result of {size} bytes is over the limit of {limit} bytes")]
    ResultTooLarge { size: usize, limit: usize },
    #[error("task store: {0}")]
    Backend(String),
}

/// Where task records and results are kept. Transitions are atomic: two workers racing on
/// one task cannot both move it.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Stores a new task, unless its tenant already used its idempotency key (within the TTL):
    /// then the existing task is returned and `false` says nothing was created. With
    /// `max_open` > 0, a tenant that already has that many tasks queued or running gets
    /// `QuotaExceeded` (a replayed idempotency key is answered first, quota or not).
    ///
    /// With `outbox`, the task's broker message is kept with the record, in the same atomic
    /// write, until [`Self::published`] says the broker holds it (the transactional outbox):
    /// a submitter that dies between create and publish, or loses the store before it can
    /// say so, leaves the message for [`Self::claim_unpublished`], so a task the store
    /// accepted is always queued in the end.
    ///
    /// A decorated store may keep a large payload elsewhere and a stand-in in its place (the
    /// claim check, [`claim`]): it rewrites `outbox` so, and the caller publishes the message
    /// as rewritten.
    async fn create(
        &self,
        rec: TaskRecord,
        max_open: u64,
        outbox: Option<&mut TaskMessage>,
    ) -> Result<(TaskRecord, bool), StoreError>;
    /// The broker holds the task's message: it stays in the outbox only for the recheck (a
    /// message the broker loses later is published again) and leaves when a worker starts
    /// the task.
    async fn published(&self, id: &str) -> Result<(), StoreError>;
    /// The message of a task still in the outbox and still queued (never started), if any:
    /// an idempotent retry of a task whose publish was never confirmed publishes it.
    async fn unpublished(&self, id: &str) -> Result<Option<TaskMessage>, StoreError>;
    /// Up to `limit` messages left in the outbox past the store's grace ([`outbox_grace`]:
    /// their submitter died, or lost the store before confirming) or past the recheck after a
    /// publish (no worker started the task: the broker may have lost it), each held `hold`
    /// more for this claimer; with `all`, every one, held or not (a broker reported lost
    /// messages: claimed once so). Entries whose task was started, ended or expired leave.
    async fn claim_unpublished(
        &self,
        limit: usize,
        hold: Duration,
        all: bool,
    ) -> Result<Vec<TaskMessage>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
    /// The task and its stored result (the encoded response of a succeeded task), read
    /// together: a polling client needs both, and one read is one round trip.
    async fn get_with_result(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Option<Bytes>)>, StoreError>;
    /// A worker starts a delivered task in one atomic step: `queued → running` (and
    /// `running → running` when the broker `reclaimed` the delivery from a consumer that
    /// stopped answering), counting an attempt, unless `max_attempts` were made already.
    async fn start(
        &self,
        id: &str,
        reclaimed: bool,
        max_attempts: u32,
    ) -> Result<Start, StoreError>;
    /// `start` for every delivery of a batch, answered in order: one round trip for the batch
    /// where the store can do it. A delivery the broker took back after its lease ran out
    /// (`Takeover::AfterLease`) takes over a `running` task only if that attempt is at least
    /// one lease old: a younger one was started by another delivery of the same task (a
    /// hand-back that raced the reclaim), whose worker is alive, so this one is a stale
    /// duplicate and is skipped rather than burning an attempt.
    async fn start_many(
        &self,
        tasks: &[(&str, Takeover)],
        max_attempts: u32,
    ) -> Vec<Result<Start, StoreError>> {
        let mut out = Vec::with_capacity(tasks.len());
        for (id, how) in tasks {
            let started = match how {
                Takeover::AfterLease(lease) => match self.get(id).await {
                    Ok(Some(rec)) if rec.state == TaskState::Running && too_young(&rec, *lease) => {
                        Ok(Start::Skip)
                    }
                    _ => self.start(id, true, max_attempts).await,
                },
                other => self.start(id, other.any(), max_attempts).await,
            };
            out.push(started);
        }
        out
    }
    /// Moves the task to `to` if its current state allows it, writing `change`.
    async fn transition(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<TaskRecord, StoreError>;
    /// `transition` for a caller that needs only to know it happened (the worker): a store
    /// may then skip reading the record back.
    async fn transition_quiet(
        &self,
        id: &str,
        to: TaskState,
        change: Change,
    ) -> Result<(), StoreError> {
        self.transition(id, to, change).await.map(drop)
    }
    /// Queues a failed task again under its id ([`TaskRecord::replayed`] of the stored record,
    /// or of `rec`, the dead letter's copy, when the stored one expired meanwhile). Conflict
    /// when the task exists and is not `failed`.
    /// The replayed task's message goes to the outbox with it, as at [`Self::create`].
    async fn requeue(&self, rec: &TaskRecord, msg: &TaskMessage) -> Result<TaskRecord, StoreError>;
    /// Withdraws a task whose message could not be queued (so no 202 was sent): removed
    /// when no worker started it, and `false` when one did (the broker held the message
    /// after all, e.g. a publish whose confirmation was lost): the task stands.
    async fn withdraw(&self, id: &str) -> Result<bool, StoreError>;
    /// Writes the completion webhook's delivery state onto the task, if it still exists. In a
    /// store that keeps an outbox, a `pending` write renews the writer's hold on the delivery
    /// and an ended one (`delivered`, `failed`) takes the task out.
    async fn set_webhook(&self, id: &str, status: &WebhookStatus) -> Result<(), StoreError>;
    /// The durable outbox of completion webhooks: up to `limit` tasks whose webhook is owed
    /// and whose holder (the process that finished the task, or the last one to claim it)
    /// stopped renewing its hold, e.g. because it died. Each is held for the claimer now.
    /// A store that lives and dies with its process keeps none.
    async fn claim_webhooks(&self, _limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Whether owed webhooks outlive the process delivering them ([`Self::claim_webhooks`]).
    fn keeps_outbox(&self) -> bool {
        false
    }
    /// Whether the store still holds what it held (readiness asks every health interval):
    /// `Ok(false)` when it came back without its data (a Redis restarted empty, flushed,
    /// or failed over to an empty replica), reported once (log, metric) and then used
    /// afresh; `Err` when unreachable. A store that lives in the process is always intact.
    async fn check(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Tasks accepted and not started yet, per model (the autoscaler's queue tier). Reads
    /// every unfinished task: meant for a poll every few seconds, not per request.
    async fn queued_by_model(&self) -> Result<HashMap<String, u64>, StoreError>;
    /// Keeps one more response of a decoupled model's run, attempt `fence`, after those kept
    /// (a newer attempt starts the list over). Refused: [`StoreError::Fenced`] when the task
    /// was started again since, [`StoreError::Conflict`] when it is no longer running
    /// (cancelled meanwhile), [`StoreError::ResultTooLarge`] when the responses together
    /// would pass the result size limit.
    async fn append_response(&self, id: &str, fence: u32, resp: Bytes) -> Result<(), StoreError>;
    /// Up to `max` kept responses from index `from`, with the attempt they came from; `None`
    /// when there is no such task.
    async fn responses(
        &self,
        id: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<Kept>, StoreError>;
    /// The bytes of a succeeded task's result that is kept outside the store, as its stored
    /// stand-in names it ([`stored_result`]). Only a store decorated with the claim check
    /// has such a place.
    async fn open_result(&self, s: &StoredResult) -> Result<ResultStream, StoreError> {
        Err(StoreError::Backend(format!(
            "the result {} is in a blob store this process was not configured with (tasks.blob_store)",
            s.key
        )))
    }
}

/// A result's encoded `ModelInferResponse`, as chunks.
pub type ResultStream = futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Request parameters under this prefix are infergate's own (the claim check's stand-ins):
/// a client may not send them.
pub const RESERVED_PARAM_PREFIX: &str = "infergate.";
/// The parameter of a stand-in request or response that names where its bytes are kept.
pub const CLAIM_PARAM: &str = "infergate.claim_check";
/// The stand-in response's parameter giving the stored result's size in bytes.
pub const CLAIM_BYTES_PARAM: &str = "infergate.claim_check_bytes";

/// A result kept by reference, as the task's stand-in response names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    pub key: String,
    pub bytes: u64,
}

/// The stored result a task's (stand-in) response points to, if it is one.
pub fn stored_result(resp: &crate::proto::inference::ModelInferResponse) -> Option<StoredResult> {
    use crate::proto::inference::infer_parameter::ParameterChoice;
    let key = match resp
        .parameters
        .get(CLAIM_PARAM)?
        .parameter_choice
        .as_ref()?
    {
        ParameterChoice::StringParam(s) => s.clone(),
        _ => return None,
    };
    let bytes = match resp.parameters.get(CLAIM_BYTES_PARAM)?.parameter_choice {
        Some(ParameterChoice::Int64Param(n)) => n.max(0) as u64,
        _ => 0,
    };
    Some(StoredResult { key, bytes })
}

/// Responses of a decoupled model's run kept with its task ([`TaskStore::responses`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kept {
    /// The attempt they came from (0: none kept yet).
    pub attempt: u32,
    /// Encoded `ModelInferResponse`s, in the order Triton sent them, from the index asked.
    pub responses: Vec<Bytes>,
}

impl Change {
    /// Refuses a result over the store's size limit (every store applies the same rule).
    pub fn check_result_size(&self, limit: usize) -> Result<(), StoreError> {
        match &self.result {
            Some(r) if r.len() > limit => Err(StoreError::ResultTooLarge {
                size: r.len(),
                limit,
            }),
            _ => Ok(()),
        }
    }
}

/// How long a new task's message stays in the outbox before another process may publish it:
/// longer than its submitter's own publish can take (`publish_timeout`, and Redis's 5 s
/// response timeout), so a live submitter is not raced (a race would only queue a duplicate,
/// which the state machine skips).
pub fn outbox_grace(publish_timeout: Duration) -> Duration {
    publish_timeout.max(Duration::from_secs(5)) + Duration::from_secs(2)
}

/// Where a task's result is read over HTTP (`GET`, streamed; a result kept in the blob store
/// is only there).
pub fn result_url(id: &str) -> String {
    format!("/v1/tasks/{id}/result")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 122 random bits (UUID v4), hex: unguessable, so knowing one id tells nothing about another.
/// uuid's `fast-rng` draws them from rand's thread-local CSPRNG (ChaCha, reseeded from the OS)
/// rather than one `getrandom` system call per id.
pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_never_change() {
        for from in ALL_STATES.into_iter().filter(|s| s.is_final()) {
            for to in ALL_STATES {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn the_allowed_paths() {
        use TaskState::*;
        assert!(Queued.can_become(Running));
        assert!(Queued.can_become(Cancelled));
        assert!(
            !Queued.can_become(Succeeded),
            "a task runs before it succeeds"
        );
        assert!(Running.can_become(Queued), "retry");
        assert!(Running.can_become(Succeeded));
        assert_eq!(Succeeded.reachable_from(), vec![Running]);
        assert_eq!(Cancelled.reachable_from(), vec![Queued, Running]);
        for s in ALL_STATES {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        // A worker starts queued tasks; a running one only when no other worker holds it.
        let startable = |reclaimed| -> Vec<TaskState> {
            ALL_STATES
                .into_iter()
                .filter(|s| s.startable(reclaimed))
                .collect()
        };
        assert_eq!(startable(false), vec![Queued]);
        assert_eq!(startable(true), vec![Queued, Running]);
    }

    #[test]
    fn ids_are_random_and_long() {
        let (a, b) = (new_task_id(), new_task_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
