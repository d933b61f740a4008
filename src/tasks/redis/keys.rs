//! The store's key names, all under its prefix: one place to read what it keeps in Redis.

use super::RedisTaskStore;

impl RedisTaskStore {
    /// A task's record (a hash).
    pub(super) fn key(&self, id: &str) -> String {
        format!("{}:task:{id}", self.prefix)
    }

    /// A decoupled model's responses kept with task `id` (a list).
    pub(super) fn responses_key(&self, id: &str) -> String {
        format!("{}:task:{id}:responses", self.prefix)
    }

    /// Per tenant (suffix), its tasks queued or running (a sorted set: the quota's count).
    pub(super) fn open_prefix(&self) -> String {
        format!("{}:open:", self.prefix)
    }

    /// The tasks whose message the broker may not hold yet, by when another process may
    /// publish it.
    pub(super) fn unpublished_set(&self) -> String {
        format!("{}:outbox", self.prefix)
    }

    /// The tasks whose completion webhook is owed, by when their holder's hold ends.
    pub(super) fn outbox(&self) -> String {
        format!("{}:webhooks", self.prefix)
    }
}
