//! Dynamic batching in front of Triton: requests for the same model that can share a call are
//! gathered inside a short window, sent as one ModelInfer, and each caller gets its own rows.
//! The sync API and the async workers both come through [`Batcher::submit`].
//!
//! The files, by concern: `settings` (a model's settings from Triton's config and ours),
//! `key` (which requests may share a call), `adaptive` (the adaptive window's rule), `queue`
//! (the pure queue, no timers or I/O), `actor` (a queue's actor and one batch's call), `split`
//! (joining requests and splitting answers), and this file (the per-model, per-thread queues).
//!
//! An actor task owns a [`queue::BatchQueue`]; callers reach it over a channel and wait on a
//! oneshot. A model has one actor per thread that submits to it: each gRPC serving thread
//! (the call's lane, see [`crate::call::Call`]) and the main runtime. A serving thread's
//! callers, their batch, its Triton call (on the thread's own connection) and the answers then
//! stay on one thread; with a single actor every request and every answer crossed threads,
//! and on a small shared host those wake-ups cost a large share of infergate's CPU per batched
//! call (measured in loadtest/results/). The actors of a
//! model share its admission bound (`max_queue_size` requests over all its queues, then
//! RESOURCE_EXHAUSTED) and its call slots (at most `max_inflight_batches` calls per Triton
//! endpoint at once, from any queue; by default one per model instance in Triton's config,
//! plus one, see [`inflight_for_instances`]). While those run, the next batches keep
//! filling, so load turns into bigger batches rather than more calls. Priority order holds
//! within a queue; across queues, slots go first come, first served.
//!
//! When a batch leaves:
//! - `on` (fixed window): once it holds `max_batch_size` rows (or the largest preferred size),
//!   or the oldest request has waited `max_queue_delay`, whichever comes first. A delay of 0
//!   (Triton's default) means "send what is queued as soon as a call slot is free".
//! - `adaptive`: the window is recomputed before each batch from two moving averages, the gap
//!   between arrivals `g` and Triton's batch latency `L`. Waiting only pays when more requests
//!   are expected before the wait costs much: if `g >= L/2` the batch leaves at once; else it
//!   waits for `min(max_queue_delay, L/2, (target_rows - rows) * g)`, i.e. no longer than it
//!   takes the expected arrivals to fill the batch, and never more than half a Triton call.
//!   At low load this adds no delay; at high load batches fill without a fixed timer.
//!   Callers that wait for their answer before sending again (a closed loop: most clients,
//!   perf_analyzer's concurrency mode) cannot arrive while they are inside, so the actor also
//!   keeps `peak`, a slowly decaying maximum of the requests inside it (queued plus in its
//!   calls to Triton), sampled at each arrival. Only `peak - inside` (rounded) more callers
//!   are expected: the wait is bounded by that many gaps as well, and once every caller seen
//!   lately is inside, the batch leaves at once instead of waiting for arrivals that cannot
//!   come. (A caller that just got its answer is outside until it sends again: waiting for it
//!   is what fills the batch.) The decay (a factor of e per `PEAK_DECAY_ARRIVALS` arrivals)
//!   lets the peak follow a load that shrinks.

mod actor;
mod adaptive;
pub mod config;
mod key;
pub mod queue;
mod settings;
pub mod split;
pub mod timer;
mod windows;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    backend::triton::{Answer, TritonPool},
    batch::config::BatchingConfig,
    call::Call,
    error::GatewayError,
    model::ModelInfo,
    proto::inference::ModelInferRequest,
};
use actor::{Actor, Job};
use key::batch_key;
pub use key::request_is_batchable;
use queue::Pending;
pub use settings::ModelSettings;
pub use windows::{TwoWindows, two_windows};

struct ModelBatcher {
    settings: ModelSettings,
    /// Requests admitted and not yet sent or dropped, in all of the model's queues; bounded by
    /// `max_queue_size`.
    queued: Arc<AtomicUsize>,
    /// Call slots shared by the model's queues: `max_inflight_batches` per Triton endpoint.
    slots: Arc<Semaphore>,
    /// The most endpoints the slots were made for. They grow with the fleet and do not
    /// shrink: Triton queues what a smaller fleet cannot start, within the same bound.
    sized_for: AtomicUsize,
    /// One queue (actor) per thread that submits: slot 0 for the main runtime, `1 + i` for gRPC
    /// serving thread `i`, made on first use.
    inboxes: Mutex<Vec<Option<mpsc::UnboundedSender<Pending<Job>>>>>,
    /// The address of the model description last checked for two windows: a description
    /// fetched anew has another.
    described: AtomicUsize,
}

impl ModelBatcher {
    /// Hands a request to the queue of its lane (the calling thread's), starting that queue's
    /// actor if it has none (or it ended with its thread); false if even a new actor cannot
    /// take it (the runtime is shutting down). A serving thread's actor runs on that thread,
    /// so its callers, their batch, its Triton call and the answers never change thread.
    fn send(
        &self,
        p: Pending<Job>,
        lane: Option<usize>,
        backend: &Arc<TritonPool>,
        main: Option<&tokio::runtime::Handle>,
    ) -> bool {
        let slot = lane.map_or(0, |l| l + 1);
        let mut inboxes = self.inboxes.lock().expect("batcher inbox lock");
        if inboxes.len() <= slot {
            inboxes.resize(slot + 1, None);
        }
        let p = match &inboxes[slot] {
            Some(tx) => match tx.send(p) {
                Ok(()) => return true,
                Err(mpsc::error::SendError(p)) => p,
            },
            None => p,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor::new(
            Arc::clone(backend),
            lane,
            self.settings.clone(),
            rx,
            Arc::clone(&self.queued),
            Arc::clone(&self.slots),
        );
        match (lane, main) {
            (None, Some(rt)) => drop(rt.spawn(actor.run())),
            _ => drop(tokio::spawn(actor.run())),
        }
        let sent = tx.send(p).is_ok();
        inboxes[slot] = Some(tx);
        sent
    }
}

/// The batchers of all models, created on first use.
pub struct Batcher {
    backend: Arc<TritonPool>,
    cfg: BatchingConfig,
    /// By model name, then version: looked up with the request's borrowed names.
    models: Mutex<HashMap<String, HashMap<String, Arc<ModelBatcher>>>>,
    /// Where the actors of callers off the serving threads (HTTP, task workers) run: the
    /// runtime the batcher was made on.
    runtime: Option<tokio::runtime::Handle>,
    windows: windows::Reported,
}

impl Batcher {
    pub fn new(backend: Arc<TritonPool>, cfg: BatchingConfig) -> Self {
        Self {
            backend,
            cfg,
            models: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
            windows: windows::Reported::default(),
        }
    }

    /// Requests waiting per model (all versions together), for the queue-depth gauge.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        let models = self.models.lock().expect("batcher map lock");
        let mut depths = std::collections::BTreeMap::<String, usize>::new();
        for (name, versions) in models.iter() {
            let queued: usize = versions
                .values()
                .map(|m| m.queued.load(Ordering::Relaxed))
                .sum();
            *depths.entry(name.clone()).or_default() += queued;
        }
        depths.into_iter().collect()
    }

    /// The batching settings for a model, or `None` when its requests pass through alone.
    pub fn settings(&self, info: &ModelInfo) -> Option<ModelSettings> {
        ModelSettings::for_model(info, &self.cfg)
    }

    /// Warns when the model is batched in infergate and again in Triton's dynamic batcher
    /// (see `windows`); the start-up check of every ready model.
    pub fn check_windows(&self, info: &ModelInfo) {
        self.windows.check(info, self.settings(info).as_ref());
    }

    fn model(&self, info: &ModelInfo, version: &str, settings: ModelSettings) -> Arc<ModelBatcher> {
        let described = std::ptr::from_ref(info) as usize;
        let mut models = self.models.lock().expect("batcher map lock");
        let endpoints = self.backend.endpoint_count().max(1);
        if let Some(m) = models.get(&info.name).and_then(|v| v.get(version))
            && m.settings == settings
        {
            if m.described.swap(described, Ordering::Relaxed) != described {
                self.windows.check(info, Some(&m.settings));
            }
            let was = m.sized_for.fetch_max(endpoints, Ordering::Relaxed);
            if endpoints > was {
                m.slots
                    .add_permits(m.settings.max_inflight_batches * (endpoints - was));
            }
            return Arc::clone(m);
        }
        self.windows.check(info, Some(&settings));
        let permits = settings.max_inflight_batches * endpoints;
        let m = Arc::new(ModelBatcher {
            settings,
            queued: Arc::new(AtomicUsize::new(0)),
            slots: Arc::new(Semaphore::new(permits)),
            sized_for: AtomicUsize::new(endpoints),
            inboxes: Mutex::new(Vec::new()),
            described: AtomicUsize::new(described),
        });
        models
            .entry(info.name.clone())
            .or_default()
            .insert(version.to_string(), Arc::clone(&m));
        m
    }

    /// Queues a validated request of `rows` rows (at most the model's max_batch_size) on the
    /// queue of the call's lane and waits for its share of a batch. A call that takes
    /// Triton's frame (`Framing::AsTriton`) and whose batch is itself alone is answered with
    /// the frame as it came ([`Answer::Framed`]).
    pub async fn submit(
        &self,
        info: &ModelInfo,
        settings: ModelSettings,
        req: ModelInferRequest,
        rows: i64,
        call: Call,
    ) -> Result<Answer, GatewayError> {
        let level = settings.level_of(&req)?;
        let model = self.model(info, &req.model_version, settings);
        let max = model.settings.max_queue_size;
        if model.queued.fetch_add(1, Ordering::AcqRel) >= max {
            model.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(GatewayError::Overloaded(format!(
                "the batching queue of model '{}' is full ({max} requests); retry later",
                info.name
            )));
        }
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            key: batch_key(&req),
            rows,
            level,
            enqueued: Instant::now(),
            deadline: call.deadline,
            item: Job {
                req,
                reply: tx,
                framing: call.framing,
                trace: crate::telemetry::trace::current_context(),
                _wait_span: crate::telemetry::trace::enabled()
                    .then(|| tracing::info_span!("batch_wait", otel.name = "batch wait")),
            },
        };
        if !model.send(pending, call.lane, &self.backend, self.runtime.as_ref()) {
            model.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(GatewayError::Unavailable(
                "the model's batcher stopped".into(),
            ));
        }
        // Dropping this future (caller gone) closes `rx`; the actor then drops the request
        // before it is sent.
        rx.await.unwrap_or_else(|_| {
            Err(GatewayError::Internal(
                "batch task ended without an answer".into(),
            ))
        })
    }
}
