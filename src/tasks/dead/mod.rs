//! Dead letters an operator can act on: a task that failed for good is kept here with its
//! record (error and attempt history), the reason, and its message (payload, trace, priority),
//! so it can be listed, read, replayed under its own id, or purged.
//!
//! The index is bounded twice: by count (`tasks.dead_letter_max`; past it the oldest entry is
//! dropped and counted) and by age (`tasks.dead_letter_ttl_ms`). It outlives the task record
//! on purpose: a task record is kept for the task TTL (an hour by default), while an operator
//! may look at last week's failures.

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{StoreError, TaskRecord};
use crate::queue::TaskMessage;
use crate::tasks::metrics::task_metrics;

/// One dead-lettered task.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub entry: DeadEntry,
    /// The message as it was queued: what a replay publishes again.
    pub message: TaskMessage,
}

/// What the index shows of a dead letter without its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadEntry {
    /// The task as it failed: state, error, attempts, history.
    pub record: TaskRecord,
    pub reason: String,
    pub dead_at_ms: u64,
    /// Bytes of the queued request.
    pub payload_bytes: u64,
}

/// Which dead letters a list, replay or purge is about. Every field narrows; `limit` bounds
/// the answer (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadFilter {
    pub model: Option<String>,
    pub tenant: Option<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Dead-lettered before (ms since the epoch).
    pub until_ms: Option<u64>,
    pub limit: Option<usize>,
}

/// The most entries one list, replay or purge touches.
pub const MAX_PAGE: usize = 1000;

impl DeadFilter {
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(100).clamp(1, MAX_PAGE)
    }

    /// Whether anything narrows the selection (a purge or replay of everything must say so).
    pub fn narrows(&self) -> bool {
        self.model.is_some()
            || self.tenant.is_some()
            || self.since_ms.is_some()
            || self.until_ms.is_some()
    }

    pub fn matches(&self, tenant: &str, model: &str, dead_at_ms: u64) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
            && self.tenant.as_deref().is_none_or(|t| t == tenant)
            && self.since_ms.is_none_or(|s| dead_at_ms >= s)
            && self.until_ms.is_none_or(|u| dead_at_ms < u)
    }
}

/// The index's size and what its bounds dropped since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeadDepth {
    pub depth: u64,
    pub dropped: u64,
}

/// Sets the depth gauges from what a dead-letter store answered.
pub fn report(d: DeadDepth) {
    let m = task_metrics();
    m.task_dead_letters.set(d.depth as i64);
    m.task_dead_letters_dropped.set(d.dropped as i64);
}

/// Where dead letters are kept: in process (memory) or in Redis, next to the task store.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Keeps a dead letter (replacing one of the same task), dropping the oldest past the
    /// bounds. Answers the depth after it.
    async fn bury(&self, dl: DeadLetter) -> Result<DeadDepth, StoreError>;
    /// Entries that match, oldest first, at most `filter.limit()`.
    async fn list(&self, filter: &DeadFilter) -> Result<Vec<DeadEntry>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError>;
    /// Removes an entry; false if there was none.
    async fn remove(&self, id: &str) -> Result<bool, StoreError>;
    async fn depth(&self) -> Result<DeadDepth, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_narrows_by_each_field() {
        let f = DeadFilter {
            model: Some("m".into()),
            since_ms: Some(10),
            until_ms: Some(20),
            ..Default::default()
        };
        assert!(f.narrows());
        assert!(f.matches("any", "m", 10));
        assert!(!f.matches("any", "m", 20), "until is exclusive");
        assert!(!f.matches("any", "other", 15));
        assert!(!DeadFilter::default().narrows());
        assert!(DeadFilter::default().matches("t", "m", 0));
        assert_eq!(DeadFilter::default().limit(), 100);
        let big = DeadFilter {
            limit: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(big.limit(), MAX_PAGE);
    }
}
