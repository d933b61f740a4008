//! This process's share of the demand, counted where calls run (`InferService::answer`) and
//! where tasks are accepted.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

/// This process's calls inside infergate per model (sync calls and tasks being run), and a
/// signal for tasks it accepted, which StreamIsActive pushes at once.
#[derive(Default)]
pub struct Activity {
    models: RwLock<HashMap<String, Arc<AtomicU64>>>,
    accepted: Notify,
}

/// One call in flight; counted until dropped.
pub struct Busy(Arc<AtomicU64>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn enter(&self, model: &str) -> Busy {
        let gauge = self
            .models
            .read()
            .expect("activity lock")
            .get(model)
            .cloned();
        // Models are those Triton described: the map is bounded by its repository.
        let gauge = gauge.unwrap_or_else(|| {
            Arc::clone(
                self.models
                    .write()
                    .expect("activity lock")
                    .entry(model.to_string())
                    .or_default(),
            )
        });
        gauge.fetch_add(1, Ordering::Relaxed);
        Busy(gauge)
    }

    /// Calls in flight per model, models with none left out.
    pub fn in_flight(&self) -> HashMap<String, u64> {
        self.models
            .read()
            .expect("activity lock")
            .iter()
            .map(|(m, g)| (m.clone(), g.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn task_accepted(&self) {
        self.accepted.notify_waiters();
    }

    pub async fn accepted(&self) {
        self.accepted.notified().await;
    }
}
