//! Workers: take task messages from the broker, run them through the same `InferService`
//! (and so the same batcher) as the sync API, store the result, then acknowledge.
//!
//! - A task already final (cancelled, expired) is acknowledged and never sent to Triton.
//! - A task another worker is running is skipped, unless the broker reclaimed the message
//!   from a consumer that stopped answering.
//! - A failed attempt goes back to the broker, after a pause that doubles with each attempt,
//!   until `max_attempts`; then the task fails with the reason and is kept, with its message,
//!   in the dead letters (`tasks::dead`) for an operator to read and replay.
//! - While a task runs, its delivery's lease is renewed (Redis Streams), so only a dead or
//!   stalled worker loses it.
//! - While no Triton endpoint is ready, no message is taken: tasks wait in the broker through
//!   a Triton outage and run when it is back.
//! - On shutdown no new message is taken; running ones get the grace period, and anything not
//!   acknowledged is delivered again later (to another worker).

use crate::queue::metrics::broker_metrics;
use crate::tasks::metrics::task_metrics;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use crate::{
    call::Call,
    error::{GatewayError, code_name},
    infer::InferService,
    proto::inference::{ModelInferRequest, ModelInferResponse},
    queue::Delivery,
    streams::Streams,
    tasks::{
        Change, Start, StoreError, Takeover, TaskError, TaskRecord, TaskState,
        dead::{DeadEntry, DeadLetter},
        now_ms,
        parts::Tasks,
    },
    telemetry::{metrics::metrics, trace},
};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Tasks one worker runs at once.
    pub concurrency: usize,
    pub max_attempts: u32,
    /// Longest wait for messages in one receive call.
    pub poll: Duration,
}

#[derive(Clone)]
pub struct Worker {
    pub tasks: Tasks,
    pub infer: InferService,
    /// A decoupled model's task runs on a stream, its responses kept as they come.
    pub streams: Streams,
    pub cfg: WorkerConfig,
}

fn task_error(e: &GatewayError) -> TaskError {
    TaskError {
        code: code_name(e.grpc_code()).into(),
        message: e.to_string(),
    }
}

impl Worker {
    /// Runs until `stop` is cancelled, then waits up to `grace` for running tasks.
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let slots = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let mut running = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        let mut store_backoff = backoff;
        let mut store_failing = false;
        loop {
            while running.try_join_next().is_some() {}
            // No Triton endpoint ready: take nothing, so queued tasks wait in the broker for
            // Triton to come back instead of spending their attempts on an outage.
            if !self.infer.backend().is_ready() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(self.cfg.poll.min(Duration::from_millis(200))) => {}
                }
                continue;
            }
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore open"),
            };
            let mut permits = vec![first];
            while let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
                permits.push(p);
            }
            // After a store failure, take one task at a time (a probe) until a start succeeds,
            // so an outage hands back one message per backoff step, not a batch each.
            let want = if store_failing { 1 } else { permits.len() };
            let got = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.tasks.broker.receive(want, self.cfg.poll) => r,
            };
            match got {
                Ok(deliveries) => {
                    backoff = Duration::from_millis(100);
                    // The whole batch starts in one store call.
                    let lease = self.tasks.broker.lease();
                    let ids: Vec<(&str, Takeover)> = deliveries
                        .iter()
                        .map(|d| {
                            let how = match (d.reclaimed, d.lease_expired, lease) {
                                (true, true, Some(l)) => Takeover::AfterLease(l),
                                (true, ..) => Takeover::Yes,
                                _ => Takeover::No,
                            };
                            (d.msg.task_id.as_str(), how)
                        })
                        .collect();
                    let starts = self
                        .tasks
                        .store
                        .start_many(&ids, self.cfg.max_attempts)
                        .await;
                    store_failing = starts.iter().any(Result::is_err);
                    for (d, started) in deliveries.into_iter().zip(starts) {
                        let permit = permits.pop().expect("one permit per delivery");
                        let w = self.clone();
                        running.spawn(async move {
                            w.handle(d, started).await;
                            drop(permit);
                        });
                    }
                    // The store failed: those tasks go back to the broker, and this worker
                    // waits (bounded, growing) before taking more, rather than cycling the
                    // same messages through a store that is down.
                    if store_failing {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(store_backoff) => {}
                        }
                        store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                    } else {
                        store_backoff = Duration::from_millis(100);
                    }
                }
                Err(e) => {
                    // Broker unreachable: back off (bounded) and try again; nothing is lost,
                    // since nothing was taken.
                    broker_metrics().broker_error(self.tasks.broker_kind, "receive");
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "receiving tasks failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let drained = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("worker grace period over; unfinished tasks will be delivered again");
            running.abort_all();
        }
    }

    async fn finish(&self, d: &Delivery) {
        if let Err(e) = self.tasks.broker.ack(d).await {
            broker_metrics().broker_error(self.tasks.broker_kind, "ack");
            tracing::warn!(task = %d.msg.task_id, error = %e, "ack failed; the task may be delivered again");
        }
    }

    /// The task store failed: hand the message back for a later delivery. If even that fails,
    /// the message stays unacknowledged and the broker delivers it again (reclaim/redelivery).
    async fn retry_later(&self, d: &Delivery, cause: &StoreError) {
        task_metrics().task_store_errors.inc();
        tracing::warn!(task = %d.msg.task_id, error = %cause, "task store unavailable; retrying later");
        if let Err(e) = self.tasks.broker.retry(d).await {
            broker_metrics().broker_error(self.tasks.broker_kind, "retry");
            tracing::warn!(task = %d.msg.task_id, error = %e, "handing the task back failed; it stays unacknowledged");
        }
    }

    /// Runs one delivery, as `start_many` found it, to its end (stored result and ack, retry,
    /// or dead letter) inside a span that continues the submitter's trace.
    pub async fn handle(&self, d: Delivery, started: Result<Start, StoreError>) {
        let span = tracing::info_span!(
            "task",
            otel.name = "task run",
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            task.id = %d.msg.task_id,
            model = %d.msg.model,
            messaging.system = self.tasks.broker_kind,
            task.attempt = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        trace::continue_trace(&span, &d.msg.trace);
        self.run_delivery(d, started).instrument(span).await
    }

    /// One delivery: started → its input read → run → the outcome recorded.
    async fn run_delivery(&self, d: Delivery, started: Result<Start, StoreError>) {
        let Some(rec) = self.started(&d, started).await else {
            return;
        };
        let Some(req) = self.input(&d, &rec).await else {
            return;
        };
        let run_started = Instant::now();
        let result = match req {
            Ok(req) if self.streams.is_decoupled(&req).await => {
                self.renewing(&d, self.stream(&rec, req)).await
            }
            Ok(req) => self.renewing(&d, self.infer.infer(req, Call::task())).await,
            Err(e) => Err(e),
        };
        metrics().observe(&rec.model, "task_run", run_started.elapsed());
        match result {
            Ok(resp) => self.succeeded(&d, &rec, resp).await,
            // Responses over the result limit would be again on every attempt.
            Err(e @ GatewayError::PayloadTooLarge(_)) => {
                self.fail(&d, Some(rec.attempts), task_error(&e)).await
            }
            Err(e) => self.attempt_failed(&d, &rec, e).await,
        }
    }

    /// Runs a decoupled model's task: each response is kept with the task as it comes (so a
    /// watcher sees it at once), in order. The result is then a summary: the model, the id
    /// and the number of responses kept (`infergate_responses`), their data in the list.
    async fn stream(
        &self,
        rec: &TaskRecord,
        req: ModelInferRequest,
    ) -> Result<ModelInferResponse, GatewayError> {
        let id = req.id.clone();
        let mut responses = self.streams.open(req, None, None).await?;
        let mut kept = 0u64;
        let mut last = ModelInferResponse::default();
        while let Some(next) = responses.next().await {
            let next = next?;
            if let Some(e) = crate::streams::triton_error(&next) {
                return Err(e);
            }
            let Some(resp) = next.infer_response else {
                continue;
            };
            let (name, version) = (resp.model_name.clone(), resp.model_version.clone());
            let kept_now = self
                .tasks
                .store
                .append_response(&rec.id, rec.attempts, resp.encode_to_vec().into())
                .await;
            match kept_now {
                Ok(()) => kept += 1,
                Err(StoreError::ResultTooLarge { size, limit }) => {
                    return Err(GatewayError::PayloadTooLarge(format!(
                        "the model's responses reached {size} bytes, over the task result limit of {limit} bytes (tasks.max_result_bytes)"
                    )));
                }
                // Cancelled or taken over meanwhile: dropping the stream cancels the
                // request; the transition that follows says why.
                Err(e) => return Err(GatewayError::Unavailable(e.to_string())),
            }
            (last.model_name, last.model_version) = (name, version);
        }
        last.id = id;
        last.parameters.insert(
            crate::streams::RESPONSES_KEPT.into(),
            crate::proto::inference::InferParameter {
                parameter_choice: Some(
                    crate::proto::inference::infer_parameter::ParameterChoice::Int64Param(
                        kept as i64,
                    ),
                ),
            },
        );
        Ok(last)
    }

    /// The record of a delivery the store started, or `None` when there is nothing to run
    /// (skipped, exhausted or the store failing: each handled here).
    async fn started(
        &self,
        d: &Delivery,
        started: Result<Start, StoreError>,
    ) -> Option<TaskRecord> {
        match started {
            Ok(Start::Started(rec)) => {
                task_metrics().task_state(TaskState::Running.as_str());
                let m = metrics();
                let waited = now_ms().saturating_sub(rec.queued_at_ms);
                m.observe(&rec.model, "task_queue", Duration::from_millis(waited));
                tracing::Span::current().record("task.attempt", rec.attempts);
                Some(rec)
            }
            // Expired from the store, final, or running elsewhere: nothing to run it for.
            Ok(Start::Skip) => {
                self.finish(d).await;
                None
            }
            Ok(Start::Exhausted(rec)) => {
                self.give_up(d, &rec).await;
                None
            }
            Err(e) => {
                self.retry_later(d, &e).await;
                None
            }
        }
    }

    /// The task's request, as the broker gives it (read back from the claim check's blob
    /// store for a large one). An undecodable request fails the task (`None`); one the broker
    /// cannot produce now is a failed attempt.
    async fn input(
        &self,
        d: &Delivery,
        rec: &TaskRecord,
    ) -> Option<Result<ModelInferRequest, GatewayError>> {
        let bytes = match self.tasks.broker.input(d).await {
            Ok(b) => b,
            Err(e) => return Some(Err(GatewayError::Unavailable(e.to_string()))),
        };
        match ModelInferRequest::decode(bytes) {
            Ok(r) => Some(Ok(r)),
            Err(e) => {
                let err = TaskError {
                    code: code_name(Code::InvalidArgument).into(),
                    message: format!("undecodable task payload: {e}"),
                };
                self.fail(d, Some(rec.attempts), err).await;
                None
            }
        }
    }

    /// Stores an answer and records how the store took it: kept (ack, the webhook owed), or
    /// refused as late, fenced, too large, or failing.
    async fn succeeded(&self, d: &Delivery, rec: &TaskRecord, resp: ModelInferResponse) {
        let id = &d.msg.task_id;
        let change = Change {
            result: Some(resp.encode_to_vec().into()),
            fence: Some(rec.attempts),
            ..Default::default()
        };
        drop(resp);
        let stored = self
            .tasks
            .store
            .transition_quiet(id, TaskState::Succeeded, change)
            .instrument(tracing::info_span!(
                "store_result",
                otel.name = "task store result"
            ))
            .await;
        match stored {
            Ok(()) => {
                task_metrics().task_state(TaskState::Succeeded.as_str());
                self.finish(d).await;
                self.notify(rec, None).await;
            }
            // Cancelled or expired meanwhile: the late result is dropped.
            Err(StoreError::Conflict { .. }) => self.finish(d).await,
            // Another worker took the task over (this one was too slow to answer): its
            // attempt owns the task and the delivery; this result is refused.
            Err(e @ StoreError::Fenced { .. }) => {
                task_metrics().task_fenced.inc();
                tracing::warn!(task = %id, error = %e, "a late result was refused");
            }
            Err(StoreError::ResultTooLarge { size, limit }) => {
                let err = TaskError {
                    code: code_name(Code::ResourceExhausted).into(),
                    message: format!(
                        "result of {size} bytes is over the task store limit of {limit} bytes"
                    ),
                };
                self.fail(d, Some(rec.attempts), err).await;
            }
            Err(e) => {
                let _ = self
                    .tasks
                    .store
                    .transition_quiet(id, TaskState::Queued, Change::default())
                    .await;
                self.retry_later(d, &e).await;
            }
        }
    }

    /// An attempt that failed: the task fails for good at its last attempt, else goes back
    /// to the queue after a pause (250 ms, 500 ms, 1 s… ≤ 5 s).
    async fn attempt_failed(&self, d: &Delivery, rec: &TaskRecord, e: GatewayError) {
        trace::record_error(&tracing::Span::current(), &e);
        if e.is_transient() {
            // Triton may be going away: look now rather than at the next probe, so the
            // worker stops taking tasks (see `run`) instead of failing them.
            self.infer.backend().probe_all().await;
        }
        let err = task_error(&e);
        if rec.attempts >= self.cfg.max_attempts {
            self.fail(d, Some(rec.attempts), err).await;
            return;
        }
        let change = Change {
            error: Some(err),
            fence: Some(rec.attempts),
            ..Default::default()
        };
        let back = self
            .tasks
            .store
            .transition_quiet(&d.msg.task_id, TaskState::Queued, change)
            .await;
        match back {
            Ok(_) => {
                let pause = Duration::from_millis(250)
                    .saturating_mul(1 << rec.attempts.saturating_sub(1).min(5))
                    .min(Duration::from_secs(5));
                tokio::time::sleep(pause).await;
                let _ = self.tasks.broker.retry(d).await;
            }
            Err(_) => self.finish(d).await,
        }
    }

    /// Runs `work` while renewing the delivery's lease (a third of it at a time), so a task
    /// longer than the lease stays with this live worker instead of being handed to another.
    async fn renewing<T>(&self, d: &Delivery, work: impl std::future::Future<Output = T>) -> T {
        let Some(lease) = self.tasks.broker.lease() else {
            return work.await;
        };
        let every = (lease / 3).max(Duration::from_millis(50));
        // A sleep on this future's own stack, not an `Interval` (boxed): one allocation less
        // per task, and most tasks end before the first renewal.
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = self.tasks.broker.renew(d).await {
                    broker_metrics().broker_error(self.tasks.broker_kind, "renew");
                    tracing::warn!(task = %d.msg.task_id, error = %e, "renewing the lease failed");
                }
            }
        };
        tokio::select! {
            out = work => out,
            never = renew => never,
        }
    }

    /// A task that ended and asked to be told (a callback URL) is owed its webhook: `done`
    /// is its final record when the transition returned it, else it is read back.
    async fn notify(&self, rec: &TaskRecord, done: Option<TaskRecord>) {
        if rec.callback_url.is_none() {
            return;
        }
        let done = match done {
            Some(done) => Some(done),
            None => self.tasks.store.get(&rec.id).await.ok().flatten(),
        };
        if let Some(done) = done {
            self.tasks.webhooks.notify(done);
        }
    }

    /// Fails the task for good (`fence`: the attempt failing it, when one ran) and keeps it
    /// in the dead letters, record and message, for an operator to read and replay.
    async fn fail(&self, d: &Delivery, fence: Option<u32>, err: TaskError) {
        let reason = format!("{}: {}", err.code, err.message);
        let failed = self
            .tasks
            .store
            .transition(
                &d.msg.task_id,
                TaskState::Failed,
                Change {
                    error: Some(err),
                    fence,
                    ..Default::default()
                },
            )
            .await;
        let record = match failed {
            Ok(rec) => {
                task_metrics().task_state(TaskState::Failed.as_str());
                self.notify(&rec, Some(rec.clone())).await;
                rec
            }
            Err(e @ StoreError::Fenced { .. }) => {
                task_metrics().task_fenced.inc();
                tracing::warn!(task = %d.msg.task_id, error = %e, "a late failure was refused");
                return;
            }
            // Cancelled or expired meanwhile: nothing is left to replay.
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {
                self.finish(d).await;
                return;
            }
            Err(e) => {
                tracing::warn!(task = %d.msg.task_id, error = %e, "failing the task failed; its message goes to the broker's dead-letter queue");
                self.broker_dead_letter(d, &reason).await;
                return;
            }
        };
        let dl = DeadLetter {
            entry: DeadEntry {
                record,
                reason: reason.clone(),
                dead_at_ms: now_ms(),
                payload_bytes: d.msg.payload.len() as u64,
            },
            message: d.msg.clone(),
        };
        match self.tasks.dead.bury(dl).await {
            Ok(depth) => {
                crate::tasks::dead::report(depth);
                self.finish(d).await;
            }
            Err(e) => {
                // The dead letters are unreachable: the broker's own dead-letter queue keeps
                // the message rather than losing it.
                tracing::warn!(task = %d.msg.task_id, error = %e, "keeping the dead letter failed; it goes to the broker's dead-letter queue");
                self.broker_dead_letter(d, &reason).await;
            }
        }
    }

    async fn broker_dead_letter(&self, d: &Delivery, reason: &str) {
        if let Err(e) = self.tasks.broker.dead_letter(d, reason).await {
            broker_metrics().broker_error(self.tasks.broker_kind, "dead_letter");
            tracing::warn!(task = %d.msg.task_id, error = %e, "dead-lettering failed");
        }
    }

    /// Every attempt was used. Still `running`, the last one never answered: its worker
    /// died on it (killed, aborted, out of memory) or stopped answering, and the broker
    /// delivered it again; such a task fails as "worker lost" instead of being delivered
    /// forever.
    async fn give_up(&self, d: &Delivery, rec: &TaskRecord) {
        let last = rec.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
        let message = if rec.state == TaskState::Running {
            format!(
                "{}: attempt {} of {} never answered (its worker died or stopped answering){}",
                crate::tasks::WORKER_LOST,
                rec.attempts,
                self.cfg.max_attempts,
                if last.is_empty() {
                    String::new()
                } else {
                    format!("; an earlier error: {last}")
                }
            )
        } else {
            format!(
                "gave up after {} attempts; last error: {last}",
                self.cfg.max_attempts
            )
        };
        let err = TaskError {
            code: code_name(Code::Aborted).into(),
            message,
        };
        self.fail(d, None, err).await;
    }
}
