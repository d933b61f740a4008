//! The transactional outbox's two halves: `queue`, how a submitter hands a task's message
//! to the broker once the store has it (and what it does when the broker fails), and the
//! relay, in every process, that publishes what a submitter left behind.
//!
//! Accepting is one store write: the record and its message together
//! ([`TaskStore::create`] with an outbox message). Then the submitter publishes and says
//! so ([`TaskStore::published`]). Whatever happens in between (the process dies, the
//! store or the broker goes away, a publish's confirmation is lost), the message stays in the
//! outbox and the relay publishes it once the grace is over. The message stays there until a
//! worker starts the task: should the broker lose it after confirming (a queue deleted, a
//! stream's group gone), the relay publishes it again, at once when the broker says so
//! (`queue::report_lost_messages`), else at the recheck. A message published twice is
//! harmless: the worker that starts the task first runs it, and the state machine skips the
//! other delivery (`TaskState::startable`), so a task never runs twice from it, and the
//! payload is the same stored bytes either way.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{StoreError, TaskStore};
use crate::queue::metrics::broker_metrics;
use crate::queue::{Broker, QueueError, TaskMessage};
use crate::tasks::metrics::task_metrics;

/// Messages one relay pass publishes at most.
const RELAY_BATCH: usize = 256;
/// Messages the pass after a reported loss publishes at most (every task not started yet).
const RELAY_ALL: usize = 10_000;

/// What publishing a task's message came to.
#[derive(Debug)]
pub enum Queued {
    /// The broker holds it (or a worker already started the task, so it held it).
    Yes,
    /// Not accepted now, and forgotten: the task is withdrawn (its input blob may go).
    Withdrawn(QueueError),
    /// Not accepted now, but kept in the outbox for the relay (an earlier submission, or the
    /// store could not be told): its input blob stays.
    Kept(QueueError),
}

/// On a broker failure, whether the task is withdrawn (a new submission: the client is
/// refused, and nothing is remembered) or kept in the outbox (an earlier one, found by its
/// idempotency key: its id stays the key's, and the relay or the client's next retry
/// publishes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Withdraw,
    Keep,
}

/// Publishes a stored task's message, then takes it out of the outbox. On a broker failure
/// the task is withdrawn (as `on_failure` says), unless a worker started it already (the
/// broker held it after all: it stands) or the store cannot be reached (the relay publishes
/// it later).
pub async fn queue(
    store: &dyn TaskStore,
    broker: &dyn Broker,
    broker_kind: &'static str,
    msg: &TaskMessage,
    on_failure: OnFailure,
) -> Queued {
    match broker.publish(msg).await {
        Ok(()) => {
            // A failure here leaves the message for the relay: one duplicate, skipped.
            if let Err(e) = store.published(&msg.task_id).await {
                tracing::debug!(task = %msg.task_id, error = %e, "the outbox entry stays; the relay publishes it again");
            }
            Queued::Yes
        }
        Err(e) if on_failure == OnFailure::Keep => {
            broker_metrics().broker_error(broker_kind, "publish");
            Queued::Kept(e)
        }
        Err(e) => {
            broker_metrics().broker_error(broker_kind, "publish");
            match store.withdraw(&msg.task_id).await {
                Ok(true) => Queued::Withdrawn(e),
                Ok(false) => Queued::Yes,
                Err(w) => {
                    tracing::warn!(task = %msg.task_id, error = %w, "withdrawing an unpublished task failed; the outbox relay queues it when the store is back");
                    Queued::Kept(e)
                }
            }
        }
    }
}

/// One relay pass: publishes up to [`RELAY_BATCH`] messages whose submitter never confirmed
/// them, or that no worker started by their recheck, each held `hold` for this process
/// meanwhile; with `all` (a broker reported lost messages), up to [`RELAY_ALL`] of every
/// task not started yet. Answers how many were published.
pub async fn relay_once(
    store: &dyn TaskStore,
    broker: &dyn Broker,
    broker_kind: &'static str,
    hold: Duration,
    all: bool,
) -> Result<usize, StoreError> {
    let limit = if all { RELAY_ALL } else { RELAY_BATCH };
    let due = store.claim_unpublished(limit, hold, all).await?;
    let mut sent = 0;
    for msg in due {
        match broker.publish(&msg).await {
            Ok(()) => {
                sent += 1;
                task_metrics().task_outbox_relayed.inc();
                store.published(&msg.task_id).await?;
            }
            // Still held for `hold`: the next pass after that tries again.
            Err(e) => {
                broker_metrics().broker_error(broker_kind, "publish");
                tracing::warn!(task = %msg.task_id, error = %e, "the outbox relay could not publish; trying again later");
                break;
            }
        }
    }
    if sent > 0 {
        tracing::info!(
            published = sent,
            "the outbox relay queued tasks their submitter left unconfirmed"
        );
    }
    Ok(sent)
}

/// Runs [`relay_once`] every `every` until `stop`.
pub fn spawn_relay(
    store: Arc<dyn TaskStore>,
    broker: Arc<dyn Broker>,
    broker_kind: &'static str,
    every: Duration,
    hold: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let all = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => false,
                _ = crate::queue::lost_messages() => true,
            };
            if let Err(e) = relay_once(&*store, &*broker, broker_kind, hold, all).await {
                tracing::debug!(error = %e, "the outbox relay could not read the task store");
            }
        }
    })
}
