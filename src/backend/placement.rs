//! Which models each endpoint holds ready, from Triton's repository index: read with every
//! probe, after model control, and at once when an endpoint answers a model's call with
//! NOT_FOUND. A model's calls (and its metadata) go only to endpoints that hold it, so a
//! fleet whose pods serve different models needs no routing of its own.
//!
//! Until an endpoint's index has been read once, it is taken to hold every model: a pool
//! starting up sends calls as it did without placement rather than refusing them.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, RwLock},
    time::{Duration, Instant},
};

use crate::proto::inference::RepositoryIndexResponse;

/// The least time between two reads of an endpoint's index on demand (the probe's own reads
/// come on top, at its interval).
const MIN_ASK: Duration = Duration::from_secs(1);

/// The most models one endpoint's placement keeps (a bound under any repository).
const MAX_MODELS: usize = 4096;

/// One endpoint's ready models, by name, each with its ready versions.
#[derive(Default)]
pub struct Placement {
    ready: RwLock<Option<HashMap<String, Vec<String>>>>,
    /// When the last read on demand began: at most one begins a second.
    pub(super) asked: Mutex<Option<Instant>>,
}

impl Placement {
    /// True when `model` (at `version`, or any version for "") is ready here, or when the
    /// index was never read.
    pub fn holds(&self, model: &str, version: &str) -> bool {
        match &*self.ready.read().expect("placement lock") {
            None => true,
            Some(models) => models
                .get(model)
                .is_some_and(|vs| version.is_empty() || vs.iter().any(|v| v == version)),
        }
    }

    /// Takes a repository index (asked with `ready: true`); answers the models that were
    /// ready before and are no longer.
    pub(super) fn set(&self, index: &RepositoryIndexResponse) -> Vec<String> {
        let mut now: HashMap<String, Vec<String>> = HashMap::new();
        for m in index.models.iter().filter(|m| m.state == "READY") {
            if now.len() >= MAX_MODELS && !now.contains_key(&m.name) {
                continue;
            }
            now.entry(m.name.clone())
                .or_default()
                .push(m.version.clone());
        }
        let mut ready = self.ready.write().expect("placement lock");
        let gone = ready
            .as_ref()
            .map(|was| {
                was.keys()
                    .filter(|m| !now.contains_key(*m))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        *ready = Some(now);
        gone
    }

    /// True when a read on demand may begin now: none began within `MIN_ASK` (so a flood of
    /// calls for a model nobody holds cannot turn into a flood of index reads on Triton).
    pub(super) fn may_ask(&self, now: Instant) -> bool {
        let mut asked = self.asked.lock().expect("placement lock");
        if asked.is_some_and(|t| now.saturating_duration_since(t) < MIN_ASK) {
            return false;
        }
        *asked = Some(now);
        true
    }

    /// The ready models' names.
    pub(super) fn models(&self) -> HashSet<String> {
        self.ready
            .read()
            .expect("placement lock")
            .as_ref()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::repository_index_response::ModelIndex;

    fn index(models: &[(&str, &str, &str)]) -> RepositoryIndexResponse {
        RepositoryIndexResponse {
            models: models
                .iter()
                .map(|(name, version, state)| ModelIndex {
                    name: (*name).into(),
                    version: (*version).into(),
                    state: (*state).into(),
                    reason: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_endpoint_holds_its_ready_models_and_versions_only() {
        let p = Placement::default();
        assert!(p.holds("anything", ""), "unknown until the index is read");
        let gone = p.set(&index(&[
            ("add_sub", "1", "READY"),
            ("add_sub", "2", "READY"),
            ("seq_sum", "1", "LOADING"),
            ("slow", "1", "UNAVAILABLE"),
        ]));
        assert!(gone.is_empty());
        assert!(p.holds("add_sub", ""));
        assert!(p.holds("add_sub", "2"));
        assert!(!p.holds("add_sub", "3"));
        assert!(!p.holds("seq_sum", ""), "loading is not ready");
        assert!(!p.holds("slow", ""));
        assert!(!p.holds("anything", ""));
        // Unloaded since: named as gone, and no longer held.
        let gone = p.set(&index(&[("seq_sum", "1", "READY")]));
        assert_eq!(gone, vec!["add_sub".to_string()]);
        assert!(!p.holds("add_sub", ""));
        assert!(p.holds("seq_sum", "1"));
    }

    #[test]
    fn reads_on_demand_come_at_most_once_a_second() {
        let p = Placement::default();
        let t0 = Instant::now();
        assert!(p.may_ask(t0));
        assert!(!p.may_ask(t0 + Duration::from_millis(999)));
        assert!(p.may_ask(t0 + Duration::from_millis(1_000)));
    }
}
