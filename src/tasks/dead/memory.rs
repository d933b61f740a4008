//! Dead letters in process: the embedded default, kept as long as the process lives.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use async_trait::async_trait;

use super::{DeadDepth, DeadEntry, DeadFilter, DeadLetter, DeadLetterStore};
use crate::tasks::{StoreError, now_ms};

pub struct MemoryDeadLetters {
    max: usize,
    ttl_ms: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (dead at, sequence) → task id: oldest first.
    order: BTreeMap<(u64, u64), String>,
    by_id: HashMap<String, ((u64, u64), DeadLetter)>,
    seq: u64,
    dropped: u64,
}

impl Inner {
    fn take(&mut self, id: &str) -> Option<DeadLetter> {
        let (key, dl) = self.by_id.remove(id)?;
        self.order.remove(&key);
        Some(dl)
    }

    /// Drops entries past the age bound, then the oldest past the count bound.
    fn bound(&mut self, max: usize, oldest_kept_ms: u64) {
        while let Some((&(at, seq), _)) = self.order.first_key_value() {
            if at >= oldest_kept_ms && self.order.len() <= max {
                break;
            }
            let id = self.order.remove(&(at, seq)).expect("first key");
            self.by_id.remove(&id);
            self.dropped += 1;
        }
    }

    fn depth(&self) -> DeadDepth {
        DeadDepth {
            depth: self.order.len() as u64,
            dropped: self.dropped,
        }
    }
}

impl MemoryDeadLetters {
    pub fn new(max: usize, ttl_ms: u64) -> Self {
        Self {
            max: max.max(1),
            ttl_ms,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().expect("dead letters lock");
        inner.bound(self.max, now_ms().saturating_sub(self.ttl_ms));
        inner
    }
}

#[async_trait]
impl DeadLetterStore for MemoryDeadLetters {
    async fn bury(&self, dl: DeadLetter) -> Result<DeadDepth, StoreError> {
        let mut inner = self.lock();
        inner.take(&dl.entry.record.id);
        inner.seq += 1;
        let key = (dl.entry.dead_at_ms, inner.seq);
        inner.order.insert(key, dl.entry.record.id.clone());
        inner.by_id.insert(dl.entry.record.id.clone(), (key, dl));
        inner.bound(self.max, now_ms().saturating_sub(self.ttl_ms));
        Ok(inner.depth())
    }

    async fn list(&self, filter: &DeadFilter) -> Result<Vec<DeadEntry>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .order
            .values()
            .filter_map(|id| inner.by_id.get(id))
            .map(|(_, dl)| &dl.entry)
            .filter(|e| filter.matches(&e.record.tenant, &e.record.model, e.dead_at_ms))
            .take(filter.limit())
            .cloned()
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self.lock().by_id.get(id).map(|(_, dl)| dl.clone()))
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().take(id).is_some())
    }

    async fn depth(&self) -> Result<DeadDepth, StoreError> {
        Ok(self.lock().depth())
    }
}
