//! Following a task as it runs: its state changes and, for a decoupled model, each response
//! kept with it, from the first one (a watcher that joins late replays them all). The task
//! store is polled; the edges (gRPC `Watch`, HTTP server-sent events) send what comes.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, stream};

use super::{TaskRecord, front::TaskFront};
use crate::error::GatewayError;

/// What a follower sees, in order.
#[derive(Debug, Clone)]
pub enum Followed {
    /// The task as it is now: first, then after each change of state or attempt.
    State(Box<TaskRecord>),
    /// One response of attempt `attempt` (a retry starts its responses again from 0).
    Response {
        index: u64,
        attempt: u32,
        response: Bytes,
    },
}

/// How often a follower of a decoupled model's responses looks (each one is worth seeing
/// soon; states alone are looked at less often).
pub const RESPONSE_POLL: Duration = Duration::from_millis(20);

/// Responses read from the store per poll.
const PAGE: usize = 64;

struct Cursor {
    front: TaskFront,
    id: String,
    tenant: String,
    poll: Duration,
    limit: tokio::time::Instant,
    /// The last state and attempt sent.
    sent: Option<(super::TaskState, u32)>,
    /// The attempt whose responses are being sent, and the next index.
    attempt: u32,
    next: usize,
    queue: std::collections::VecDeque<Followed>,
    done: bool,
}

impl TaskFront {
    /// The task's states and responses until it is final (every response sent) or `limit`
    /// passed; an error (no such task, the store failing) ends it.
    pub fn follow(
        &self,
        id: &str,
        tenant: &str,
        poll: Duration,
        limit: Duration,
    ) -> impl Stream<Item = Result<Followed, GatewayError>> + Send + 'static {
        let cursor = Cursor {
            front: self.clone(),
            id: id.to_string(),
            tenant: tenant.to_string(),
            poll,
            limit: tokio::time::Instant::now() + limit,
            sent: None,
            attempt: 0,
            next: 0,
            queue: Default::default(),
            done: false,
        };
        stream::unfold(cursor, |mut c| async move {
            loop {
                if let Some(item) = c.queue.pop_front() {
                    return Some((Ok(item), c));
                }
                if c.done || tokio::time::Instant::now() >= c.limit {
                    return None;
                }
                if c.sent.is_some() && c.queue.is_empty() {
                    tokio::time::sleep(c.poll).await;
                }
                if let Err(e) = c.look().await {
                    c.done = true;
                    return Some((Err(e), c));
                }
            }
        })
    }
}

impl Cursor {
    /// Reads the task once, queueing what is new.
    async fn look(&mut self) -> Result<(), GatewayError> {
        let Some((rec, kept)) = self
            .front
            .responses(&self.id, &self.tenant, self.next, PAGE)
            .await?
        else {
            return Err(GatewayError::TaskNotFound(self.id.clone()));
        };
        if kept.attempt != self.attempt && self.next > 0 {
            // A new attempt started its responses over: read them from the first.
            self.attempt = kept.attempt;
            self.next = 0;
            return Ok(());
        }
        self.attempt = kept.attempt;
        let full_page = kept.responses.len() == PAGE;
        let now = (rec.state, rec.attempts);
        let changed = self.sent != Some(now);
        self.sent = Some(now);
        // The record was read before the list: final here means every response is in, so
        // the final state goes after them; any other change goes first.
        let last = rec.state.is_final();
        if changed && !last {
            self.queue.push_back(Followed::State(Box::new(rec.clone())));
        }
        for response in kept.responses {
            self.queue.push_back(Followed::Response {
                index: self.next as u64,
                attempt: kept.attempt,
                response,
            });
            self.next += 1;
        }
        if last && !full_page {
            self.done = true;
            if changed {
                self.queue.push_back(Followed::State(Box::new(rec)));
            }
        } else if last {
            // More responses to read before the final state: look again at once.
            self.sent = None;
        }
        Ok(())
    }
}
