//! One batching queue's actor: it takes arrivals from its inbox, decides when a batch leaves,
//! waits for a call slot, and sends each batch with [`run_batch`], which answers every member
//! with its own rows.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::{
    ModelSettings,
    adaptive::{InCall, Observed, PEAK_DECAY_ARRIVALS, adaptive_window, ewma},
    key::OWN_PARAMS,
    queue::{BatchQueue, Dropped, Pending, Waiter},
    split,
    timer::WindowTimer,
};
use crate::{
    backend::triton::{Answer, TritonPool},
    batch::config::BatchMode,
    call::{Call, Framing},
    error::GatewayError,
    proto::inference::ModelInferRequest,
    telemetry::metrics::metrics,
};

pub(super) type Reply = oneshot::Sender<Result<Answer, GatewayError>>;

pub(super) struct Job {
    pub(super) req: ModelInferRequest,
    pub(super) reply: Reply,
    /// How the caller takes the answer should its batch hold only its own request.
    pub(super) framing: Framing,
    /// The caller's trace context (tracing on only): parent and links of the batch span.
    pub(super) trace: Option<opentelemetry::Context>,
    /// Open while the request waits for its batch (tracing on only).
    pub(super) _wait_span: Option<tracing::Span>,
}

impl Waiter for Job {
    fn is_gone(&self) -> bool {
        self.reply.is_closed()
    }
}

pub(super) struct Actor {
    backend: Arc<TritonPool>,
    /// The serving thread this actor runs on (its calls use that lane's Triton connection).
    lane: Option<usize>,
    settings: ModelSettings,
    queue: BatchQueue<Job>,
    inbox: mpsc::UnboundedReceiver<Pending<Job>>,
    queued: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
    observed: Arc<Observed>,
    last_arrival: Option<Instant>,
    /// Decaying maximum of the requests inside (adaptive mode, see the module docs).
    peak: f64,
}

impl Actor {
    pub(super) fn new(
        backend: Arc<TritonPool>,
        lane: Option<usize>,
        settings: ModelSettings,
        inbox: mpsc::UnboundedReceiver<Pending<Job>>,
        queued: Arc<AtomicUsize>,
        slots: Arc<Semaphore>,
    ) -> Self {
        Self {
            backend,
            lane,
            queue: BatchQueue::new(settings.priority_levels, settings.max_priority_wait),
            settings,
            inbox,
            queued,
            slots,
            observed: Arc::new(Observed::default()),
            last_arrival: None,
            peak: 0.0,
        }
    }

    fn admit(&mut self, p: Pending<Job>) {
        if let Some(prev) = self.last_arrival {
            ewma(
                &self.observed.gap_ns,
                p.enqueued.saturating_duration_since(prev),
            );
        }
        self.last_arrival = Some(p.enqueued);
        self.queue.push(p);
        if self.settings.mode == BatchMode::Adaptive {
            let inside = self.inside() as f64;
            self.peak = inside.max(self.peak * (1.0 - 1.0 / PEAK_DECAY_ARRIVALS));
        }
    }

    /// Requests inside this queue: waiting, or in its calls to Triton.
    fn inside(&self) -> usize {
        self.queue.len() + self.observed.in_calls.load(Ordering::Relaxed)
    }

    /// How long the current batch may still wait for company; zero means "send now".
    fn wait_left(&self, now: Instant) -> Duration {
        let s = &self.settings;
        let target = s
            .preferred_batch_sizes
            .iter()
            .copied()
            .max()
            .unwrap_or(s.max_batch_size);
        let rows = self.queue.ready_rows(now, s.max_batch_size);
        if rows >= target {
            return Duration::ZERO;
        }
        let Some(oldest) = self.queue.oldest() else {
            return Duration::ZERO;
        };
        let waited = now.saturating_duration_since(oldest);
        let window = match s.mode {
            BatchMode::Adaptive => adaptive_window(
                Duration::from_nanos(self.observed.gap_ns.load(Ordering::Relaxed)),
                Duration::from_nanos(self.observed.triton_ns.load(Ordering::Relaxed)),
                target - rows,
                self.peak - self.inside() as f64,
                s.max_queue_delay,
            ),
            _ => s.max_queue_delay,
        };
        window.saturating_sub(waited)
    }

    fn drop_dead(&mut self, now: Instant) {
        for (p, why) in self.queue.drain_dead(now) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if why == Dropped::Expired {
                let _ = p.item.reply.send(Err(GatewayError::DeadlineExceeded(
                    "the request's deadline passed while it waited for a batch".into(),
                )));
            }
        }
    }

    pub(super) async fn run(mut self) {
        // Made here, on the runtime that drives this actor: its timerfd registers there.
        let mut timer = WindowTimer::new();
        loop {
            if self.queue.is_empty() {
                match self.inbox.recv().await {
                    Some(p) => self.admit(p),
                    None => return,
                }
                continue;
            }
            let now = Instant::now();
            self.drop_dead(now);
            if self.queue.is_empty() {
                continue;
            }
            let wait = self.wait_left(now);
            if !wait.is_zero() {
                tokio::select! {
                    p = self.inbox.recv() => match p {
                        Some(p) => self.admit(p),
                        None => return,
                    },
                    _ = timer.sleep(wait) => {}
                }
                continue;
            }
            // A batch is due: wait for a call slot, taking in arrivals meanwhile (they make the
            // batch bigger while Triton is busy).
            tokio::select! {
                biased;
                permit = Arc::clone(&self.slots).acquire_owned() => {
                    let permit = permit.expect("semaphore never closed");
                    let now = Instant::now();
                    self.drop_dead(now);
                    let batch = self.queue.take_batch(now, self.settings.max_batch_size, &self.settings.preferred_batch_sizes);
                    if batch.is_empty() {
                        continue;
                    }
                    self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                    let backend = Arc::clone(&self.backend);
                    let observed = Arc::clone(&self.observed);
                    let in_call = InCall::new(&observed, batch.len());
                    let lane = self.lane;
                    tokio::spawn(async move {
                        run_batch(backend, lane, batch, observed).await;
                        drop(in_call);
                        drop(permit);
                    });
                }
                p = self.inbox.recv() => match p {
                    Some(p) => self.admit(p),
                    None => return,
                },
            }
        }
    }
}

/// Removes the parameters infergate consumed; most requests carry none, and then no name is
/// hashed.
fn strip_own_params(call: &mut ModelInferRequest) {
    if !call.parameters.is_empty() {
        for p in OWN_PARAMS {
            call.parameters.remove(*p);
        }
    }
}

/// Sends one batch and answers each member with its rows (or the shared error).
async fn run_batch(
    backend: Arc<TritonPool>,
    lane: Option<usize>,
    batch: Vec<Pending<Job>>,
    observed: Arc<Observed>,
) {
    let now = Instant::now();
    let deadline = batch.iter().filter_map(|p| p.deadline).min();
    let rows: Vec<i64> = batch.iter().map(|p| p.rows).collect();
    let model = batch[0].item.req.model_name.clone();
    let mut members: Vec<(String, Reply)> = Vec::with_capacity(batch.len());
    let mut reqs: Vec<ModelInferRequest> = Vec::with_capacity(batch.len());
    let mut traces = Vec::new();
    let batch_len = batch.len();
    let alone_framing = if batch_len == 1 {
        batch[0].item.framing
    } else {
        Framing::Decoded
    };
    let total_rows: i64 = rows.iter().sum();
    metrics().batch(
        &model,
        batch
            .iter()
            .map(|p| now.saturating_duration_since(p.enqueued)),
        total_rows,
    );
    for p in batch {
        // Dropping the job's wait span here ends it: the wait is over.
        let Job {
            mut req,
            reply,
            trace,
            ..
        } = p.item;
        traces.extend(trace);
        // A shared call carries no member's id (each answer gets its own back); a lone
        // request keeps its id in the call.
        let id = if batch_len == 1 {
            String::new()
        } else {
            std::mem::take(&mut req.id)
        };
        members.push((id, reply));
        reqs.push(req);
    }
    let span = if traces.is_empty() {
        tracing::Span::none()
    } else {
        let span = tracing::info_span!(
            "batch",
            otel.name = "batch",
            model = %model,
            batch.requests = members.len(),
            batch.rows = total_rows,
        );
        crate::telemetry::trace::link_members(&span, &traces);
        span
    };
    // The tightest member's deadline (the backend forwards what is left as Triton's `timeout`).
    let call_of = |framing| Call::batch(deadline, framing, lane);
    if members.len() == 1 {
        // Alone: the call is the caller's own request, id included (Triton echoes it), and a
        // gRPC caller gets Triton's frame as it came, neither decoded nor encoded again.
        let (_, reply) = members.pop().expect("one member");
        let mut call = reqs.pop().expect("one request");
        strip_own_params(&mut call);
        let started = Instant::now();
        let result = backend
            .infer_answer(call, call_of(alone_framing))
            .instrument(span)
            .await;
        ewma(&observed.triton_ns, started.elapsed());
        let _ = reply.send(result);
        return;
    }
    // The outputs each member of a shared call named; the call asks for their union.
    let mut call = split::concat_requests(&reqs.iter().collect::<Vec<_>>());
    let wanted: Vec<_> = reqs
        .iter_mut()
        .map(|r| std::mem::take(&mut r.outputs))
        .collect();
    // The members' inputs are in the call now; no need to hold them during it.
    drop(reqs);
    call.id.clear();
    strip_own_params(&mut call);
    let started = Instant::now();
    let result = backend
        .infer(call, call_of(Framing::Decoded))
        .instrument(span)
        .await;
    ewma(&observed.triton_ns, started.elapsed());
    let parts = result.and_then(|resp| {
        let parts = split::split_response(&resp, &rows)?;
        parts
            .into_iter()
            .zip(&wanted)
            .map(|(part, w)| {
                if w.is_empty() {
                    // Named no outputs: all of them, as Triton sent them.
                    Ok(part)
                } else {
                    split::select_outputs(part, w)
                }
            })
            .collect::<Result<Vec<_>, _>>()
    });
    match parts {
        Ok(parts) => {
            for ((id, reply), mut part) in members.into_iter().zip(parts) {
                part.id = id;
                let _ = reply.send(Ok(Answer::Decoded(part)));
            }
        }
        Err(e) => {
            for (_, reply) in members {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
