//! The final states of batch lines this process has seen. A line's task never leaves a final
//! state, so a batch poll reads only the lines still open: O(open lines) store reads per poll
//! instead of O(lines). Kept per process (each front learns alone, and is right alone), for
//! the most recently polled batches only.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Instant,
};

use crate::tasks::TaskState;

/// Batches whose lines' states are kept; the least recently polled goes first.
const BATCHES: usize = 64;

/// Each line's final state once seen (`None`: still open, or not looked at).
type Lines = Vec<Option<TaskState>>;

/// Per batch, when it was last polled and its lines.
#[derive(Default)]
pub struct Settled(Mutex<HashMap<String, (Instant, Lines)>>);

impl Settled {
    /// What is known of batch `id`'s `lines` lines.
    pub fn get(&self, id: &str, lines: usize) -> Vec<Option<TaskState>> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(id) {
            Some((_, states)) if states.len() == lines => states.clone(),
            _ => vec![None; lines],
        }
    }

    /// Keeps what a poll learnt of batch `id`.
    pub fn put(&self, id: &str, states: Vec<Option<TaskState>>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !map.contains_key(id) && map.len() >= BATCHES {
            let oldest = map
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        map.insert(id.to_string(), (Instant::now(), states));
    }

    /// Batch `id` ended: its record holds everything now.
    pub fn forget(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recently_polled_batches() {
        let s = Settled::default();
        assert_eq!(s.get("a", 2), vec![None, None]);
        s.put("a", vec![Some(TaskState::Succeeded), None]);
        assert_eq!(s.get("a", 2), vec![Some(TaskState::Succeeded), None]);
        for i in 0..BATCHES {
            s.put(&format!("b{i}"), vec![None]);
        }
        assert_eq!(s.get("a", 2), vec![None, None], "the oldest went");
        assert_eq!(s.0.lock().unwrap().len(), BATCHES);
        s.forget("b1");
        assert_eq!(s.0.lock().unwrap().len(), BATCHES - 1);
    }
}
