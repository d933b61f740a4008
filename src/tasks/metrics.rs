//! The task side's metrics (`infergate_tasks_total`, `_task_*`, `_blob_*`, `_webhooks_total`):
//! registered in the process's registry on first use ([`task_metrics`]), which the health part
//! makes at start.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::telemetry::metrics::{ResultLabel, register};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlobLabels {
    /// `put`, `get`, `stream` or `delete`.
    pub op: &'static str,
    pub result: &'static str,
}

pub struct TaskMetrics {
    pub tasks: Family<StateLabel, Counter>,
    /// Tasks a worker handed back to the broker because the task store failed.
    pub task_store_errors: Counter,
    /// Results and failures a worker wrote after another attempt took its task over, refused.
    pub task_fenced: Counter,
    /// Dead letters kept, and those their bounds dropped (both as the dead-letter store
    /// counts them: refreshed on each dead letter and each admin call).
    pub task_dead_letters: Gauge,
    pub task_dead_letters_dropped: Gauge,
    /// Dead-lettered tasks queued again by an operator.
    pub task_replays: Counter,
    /// Task messages the outbox relay published for a submitter that never confirmed its
    /// own publish (it died, or lost the store or the broker on the way).
    pub task_outbox_relayed: Counter,
    /// Times the task store was found to have lost its data (its epoch key gone).
    pub task_store_data_loss: Counter,
    /// Size of each task message handed to the broker (payload and headers).
    pub task_message_bytes: Histogram,
    /// Claim-check blob operations by result, and the bytes they moved.
    pub blob_ops: Family<BlobLabels, Counter>,
    pub blob_bytes: Family<BlobLabels, Counter>,
    /// Completion webhook tries by result.
    pub webhooks: Family<ResultLabel, Counter>,
}

/// This process's task metrics.
pub fn task_metrics() -> &'static TaskMetrics {
    static M: OnceLock<TaskMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = TaskMetrics {
            tasks: Family::default(),
            task_store_errors: Counter::default(),
            task_fenced: Counter::default(),
            task_dead_letters: Gauge::default(),
            task_dead_letters_dropped: Gauge::default(),
            task_replays: Counter::default(),
            task_outbox_relayed: Counter::default(),
            task_store_data_loss: Counter::default(),
            task_message_bytes: Histogram::new([
                1024.0,
                4096.0,
                16384.0,
                65536.0,
                262_144.0,
                1_048_576.0,
                16_777_216.0,
                67_108_864.0,
            ]),
            blob_ops: Family::default(),
            blob_bytes: Family::default(),
            webhooks: Family::default(),
        };
        register(
            "tasks",
            "Task state changes made by this process, by the state entered",
            m.tasks.clone(),
        );
        register(
            "task_store_errors",
            "Tasks a worker handed back to the broker because the task store failed",
            m.task_store_errors.clone(),
        );
        register(
            "task_fenced",
            "Late task results refused because a newer attempt had taken the task over",
            m.task_fenced.clone(),
        );
        register(
            "task_dead_letters",
            "Dead-lettered tasks kept for inspection and replay",
            m.task_dead_letters.clone(),
        );
        register(
            "task_dead_letters_dropped",
            "Dead letters dropped by the bounds (oldest first past tasks.dead_letter_max, or past tasks.dead_letter_ttl_ms), since the store began",
            m.task_dead_letters_dropped.clone(),
        );
        register(
            "task_replays",
            "Dead-lettered tasks queued again by an operator",
            m.task_replays.clone(),
        );
        register(
            "task_outbox_relayed",
            "Task messages published from the task store's outbox because their submitter never confirmed its own publish",
            m.task_outbox_relayed.clone(),
        );
        register(
            "task_store_data_loss",
            "Times the task store (Redis) was found to have come back without its data: the tasks it held are gone",
            m.task_store_data_loss.clone(),
        );
        register(
            "task_message_bytes",
            "Size of each task message handed to the broker, payload and headers (payloads over tasks.claim_check_bytes travel by reference)",
            m.task_message_bytes.clone(),
        );
        register(
            "blob_ops",
            "Claim-check blob store operations by op (put, get, stream, delete) and result",
            m.blob_ops.clone(),
        );
        register(
            "blob_bytes",
            "Bytes written to (put) and read from (get, stream) the claim-check blob store",
            m.blob_bytes.clone(),
        );
        register(
            "webhooks",
            "Completion webhook tries by result: delivered, retried, failed (gave up), refused (not allowed), dropped (too many pending), deferred (too many pending here, left in the outbox), resumed (taken over from a process that stopped)",
            m.webhooks.clone(),
        );
        m
    })
}

impl TaskMetrics {
    /// Creates the series of every task state at zero, so they are scraped (and `rate()`
    /// works) before the first task.
    pub fn init(&self, states: impl IntoIterator<Item = &'static str>) {
        for state in states {
            let _ = self.tasks.get_or_create(&StateLabel { state });
        }
    }

    pub fn task_state(&self, state: &'static str) {
        self.tasks.get_or_create(&StateLabel { state }).inc();
    }

    pub fn blob_op(&self, op: &'static str, ok: bool, bytes: u64) {
        let l = BlobLabels {
            op,
            result: if ok { "ok" } else { "error" },
        };
        self.blob_ops.get_or_create(&l).inc();
        if bytes > 0 {
            self.blob_bytes.get_or_create(&l).inc_by(bytes);
        }
    }

    pub fn webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }
}
