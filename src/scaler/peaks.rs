//! Where the baseline tier keeps its recorded peaks: the highest ask per bucket of time, per
//! scaled object. In this process's memory with the embedded store (lost on restart), in
//! Redis when the task store is there ([`super::peaks_redis`]), so every front end answers
//! KEDA alike and a restart keeps the baseline.

use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;

use super::decide::Peak;

#[derive(Debug, Clone, thiserror::Error)]
#[error("scaler peaks: {0}")]
pub struct PeakError(pub String);

#[async_trait]
pub trait PeakStore: Send + Sync {
    /// Records `replicas` asked for at `now_s` in the bucket holding it, if above the
    /// bucket's peak so far; buckets older than `keep_s` are dropped.
    async fn record(
        &self,
        object: &str,
        bucket_s: u64,
        now_s: u64,
        replicas: u32,
        keep_s: u64,
    ) -> Result<(), PeakError>;
    /// The peaks of the last `keep_s` seconds.
    async fn peaks(&self, object: &str, now_s: u64, keep_s: u64) -> Result<Vec<Peak>, PeakError>;
}

/// Bucket start → peak, per scaled object.
#[derive(Default)]
pub struct MemoryPeaks {
    objects: Mutex<HashMap<String, HashMap<u64, u32>>>,
}

#[async_trait]
impl PeakStore for MemoryPeaks {
    async fn record(
        &self,
        object: &str,
        bucket_s: u64,
        now_s: u64,
        replicas: u32,
        keep_s: u64,
    ) -> Result<(), PeakError> {
        let mut objects = self.objects.lock().expect("peaks lock");
        let buckets = objects.entry(object.to_string()).or_default();
        buckets.retain(|&at, _| now_s.saturating_sub(at) <= keep_s);
        if replicas > 0 {
            let at = now_s - now_s % bucket_s.max(1);
            let peak = buckets.entry(at).or_default();
            *peak = (*peak).max(replicas);
        }
        Ok(())
    }

    async fn peaks(&self, object: &str, now_s: u64, keep_s: u64) -> Result<Vec<Peak>, PeakError> {
        let objects = self.objects.lock().expect("peaks lock");
        Ok(objects
            .get(object)
            .into_iter()
            .flatten()
            .filter(|&(&at, _)| now_s.saturating_sub(at) <= keep_s)
            .map(|(&at_s, &replicas)| Peak { at_s, replicas })
            .collect())
    }
}
