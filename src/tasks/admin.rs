//! The operator's side of the task queue, shared by HTTP and gRPC: list and read dead letters,
//! replay them under their own ids, purge them. Only callers marked admin reach it (others
//! are answered 404, as for anything not theirs).
//!
//! A replay is three steps, each safe to repeat: the task store queues the failed record
//! again (refused unless it is `failed`, so a task cannot be replayed twice), the broker gets
//! the original message, and the entry leaves the dead letters. A publish that fails puts the
//! task back to `failed` and keeps the entry.

use serde::Serialize;

use super::{
    Change, StoreError, TaskError, TaskState,
    dead::{DeadDepth, DeadEntry, DeadFilter, report},
    front::{TaskFront, store_error},
};
use crate::queue::metrics::broker_metrics;
use crate::tasks::metrics::task_metrics;
use crate::{auth::Caller, error::GatewayError, queue::QueueError};

/// Which dead letters a replay or purge acts on: the `ids` given, else those the filter
/// selects; a selection of everything must say `all`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selection {
    pub ids: Vec<String>,
    pub model: Option<String>,
    pub tenant: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: Option<usize>,
    pub all: bool,
}

impl Selection {
    pub fn filter(&self) -> DeadFilter {
        DeadFilter {
            model: self.model.clone(),
            tenant: self.tenant.clone(),
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Refusal {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Replayed {
    pub replayed: Vec<String>,
    pub refused: Vec<Refusal>,
}

fn admin_only(caller: &Caller) -> Result<(), GatewayError> {
    if caller.admin {
        Ok(())
    } else {
        Err(GatewayError::NotFound("not found".into()))
    }
}

impl TaskFront {
    pub async fn dead_letters(
        &self,
        caller: &Caller,
        filter: &DeadFilter,
    ) -> Result<(Vec<DeadEntry>, DeadDepth), GatewayError> {
        admin_only(caller)?;
        let list = self.tasks.dead.list(filter).await.map_err(store_error)?;
        let depth = self.tasks.dead.depth().await.map_err(store_error)?;
        report(depth);
        Ok((list, depth))
    }

    pub async fn dead_letter(&self, caller: &Caller, id: &str) -> Result<DeadEntry, GatewayError> {
        admin_only(caller)?;
        self.tasks
            .dead
            .get(id)
            .await
            .map_err(store_error)?
            .map(|dl| dl.entry)
            .ok_or_else(|| {
                GatewayError::NotFound(format!("task '{id}' is not in the dead letters"))
            })
    }

    /// The ids a selection names (bounded by the filter's limit).
    async fn selected(&self, sel: &Selection) -> Result<Vec<String>, GatewayError> {
        if !sel.ids.is_empty() {
            if sel.ids.len() > super::dead::MAX_PAGE {
                return Err(GatewayError::invalid(format!(
                    "ids: at most {} per call",
                    super::dead::MAX_PAGE
                )));
            }
            return Ok(sel.ids.clone());
        }
        let filter = sel.filter();
        if !filter.narrows() && !sel.all {
            return Err(GatewayError::invalid(
                "give ids, a filter (model, tenant, since_ms, until_ms), or all: true",
            ));
        }
        let list = self.tasks.dead.list(&filter).await.map_err(store_error)?;
        Ok(list.into_iter().map(|e| e.record.id).collect())
    }

    pub async fn replay(&self, caller: &Caller, sel: &Selection) -> Result<Replayed, GatewayError> {
        admin_only(caller)?;
        let mut out = Replayed::default();
        for id in self.selected(sel).await? {
            match self.replay_one(&id).await {
                Ok(()) => out.replayed.push(id),
                Err(reason) => out.refused.push(Refusal { id, reason }),
            }
        }
        report(self.tasks.dead.depth().await.map_err(store_error)?);
        Ok(out)
    }

    /// One replay; `Err` says why it was refused.
    async fn replay_one(&self, id: &str) -> Result<(), String> {
        let dl = match self.tasks.dead.get(id).await {
            Ok(Some(dl)) => dl,
            Ok(None) => return Err("not in the dead letters".into()),
            Err(e) => return Err(e.to_string()),
        };
        // The message joins the outbox with the record: should this process fail before the
        // broker has it (and before it can fail the task again), the relay queues it.
        match self
            .tasks
            .store
            .requeue(&dl.entry.record, &dl.message)
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict { from, .. }) => {
                return Err(format!(
                    "the task is {} (only failed tasks are replayed)",
                    from.as_str()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
        if let Err(e) = self.tasks.broker.publish(&dl.message).await {
            broker_metrics().broker_error(self.tasks.broker_kind, "publish");
            let why = match e {
                QueueError::Full(n) => format!("the task queue is full ({n} tasks waiting)"),
                QueueError::Backend(m) => format!("broker unavailable: {m}"),
            };
            // Not queued: failed again, and the entry stays for a later replay.
            let _ = self
                .tasks
                .store
                .transition_quiet(
                    id,
                    TaskState::Failed,
                    Change {
                        error: Some(TaskError {
                            code: "UNAVAILABLE".into(),
                            message: format!("replay not queued: {why}"),
                        }),
                        ..Default::default()
                    },
                )
                .await;
            return Err(why);
        }
        let _ = self.tasks.store.published(id).await;
        task_metrics().task_replays.inc();
        task_metrics().task_state(TaskState::Queued.as_str());
        // Queued: a failure to remove the entry leaves a stale one that a second replay
        // refuses (the task is no longer failed).
        let _ = self.tasks.dead.remove(id).await;
        Ok(())
    }

    /// Removes the selected dead letters; answers how many were there.
    pub async fn purge(&self, caller: &Caller, sel: &Selection) -> Result<u64, GatewayError> {
        admin_only(caller)?;
        let mut purged = 0;
        for id in self.selected(sel).await? {
            if self.tasks.dead.remove(&id).await.map_err(store_error)? {
                purged += 1;
            }
        }
        report(self.tasks.dead.depth().await.map_err(store_error)?);
        Ok(purged)
    }
}
