//! The cache in this process's memory: bounded in bytes (an answer's encoded size), least
//! recently used out first, entries expiring by their TTL.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::proto::inference::ModelInferResponse;

/// A cached entry's name (a SHA-256, see [`super::key`]).
pub type Key = [u8; 32];

struct Entry {
    resp: Arc<ModelInferResponse>,
    bytes: usize,
    expires: Instant,
    used: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
    evicted: u64,
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.used);
            self.bytes -= e.bytes;
        }
    }
}

pub struct MemoryCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl MemoryCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<ModelInferResponse>> {
        let mut s = self.inner.lock().expect("cache lock");
        let expired = s.entries.get(key).map(|e| e.expires <= now)?;
        if expired {
            s.remove(key);
            return None;
        }
        s.tick += 1;
        let tick = s.tick;
        let e = s.entries.get_mut(key).expect("present");
        let old = std::mem::replace(&mut e.used, tick);
        let resp = Arc::clone(&e.resp);
        s.order.remove(&old);
        s.order.insert(tick, *key);
        Some(resp)
    }

    /// Keeps an answer of `bytes` until `expires`, making room by dropping the least recently
    /// used (answers how many); one larger than the whole cache is not kept.
    pub fn put(
        &self,
        key: Key,
        resp: Arc<ModelInferResponse>,
        bytes: usize,
        expires: Instant,
    ) -> u64 {
        if bytes > self.max_bytes {
            return 0;
        }
        let mut dropped = 0;
        let mut s = self.inner.lock().expect("cache lock");
        s.remove(&key);
        while s.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = s.order.pop_first() else {
                break;
            };
            if let Some(e) = s.entries.remove(&oldest) {
                s.bytes -= e.bytes;
                s.evicted += 1;
                dropped += 1;
            }
        }
        s.tick += 1;
        let used = s.tick;
        s.order.insert(used, key);
        s.bytes += bytes;
        s.entries.insert(
            key,
            Entry {
                resp,
                bytes,
                expires,
                used,
            },
        );
        dropped
    }

    /// (bytes held, entries, evictions so far).
    pub fn usage(&self) -> (usize, usize, u64) {
        let s = self.inner.lock().expect("cache lock");
        (s.bytes, s.entries.len(), s.evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounded_in_bytes_least_recently_used_out_and_entries_expire() {
        let c = MemoryCache::new(300);
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let r = Arc::new(ModelInferResponse::default());
        for k in 0u8..3 {
            c.put([k; 32], Arc::clone(&r), 100, later);
        }
        assert!(c.get(&[0; 32], now).is_some(), "0 is now the most recent");
        c.put([3; 32], Arc::clone(&r), 100, later);
        assert!(
            c.get(&[1; 32], now).is_none(),
            "1 was the least recently used"
        );
        assert!(c.get(&[0; 32], now).is_some());
        assert_eq!(c.usage(), (300, 3, 1));
        c.put([9; 32], Arc::clone(&r), 301, later);
        assert!(c.get(&[9; 32], now).is_none(), "larger than the cache");
        assert!(c.get(&[0; 32], later).is_none(), "expired");
        assert_eq!(c.usage().0, 200);
    }
}
