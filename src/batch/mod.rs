//! Dynamic batching in front of Triton: requests for the same model that can share a call are
//! gathered inside a short window, sent as one ModelInfer, and each caller gets its own rows.
//! The sync API and (later) async workers both come through [`Batcher::submit`].
//!
//! An actor task owns a [`queue::BatchQueue`]; callers reach it over a channel and wait on a
//! oneshot. A model has one actor per thread that submits to it: each gRPC serving thread
//! (see [`crate::lane`]) and the main runtime. A serving thread's callers, their batch, its
//! Triton call (on the thread's own connection) and the answers then stay on one thread; with
//! a single actor every request and every answer crossed threads, and on 2 shared cores those
//! wake-ups cost 17-26% of infergate's CPU per batched call (BENCHMARKS.md). The actors of a
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

pub mod queue;
pub mod split;

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use crate::{
    backend::triton::{Answer, TritonPool},
    config::{BatchMode, BatchingConfig, ModelBatching},
    error::GatewayError,
    infer::ModelInfo,
    proto::inference::{
        InferParameter, ModelInferRequest, ModelInstanceGroup, infer_parameter::ParameterChoice,
        model_config::SchedulingChoice, model_instance_group::Kind,
    },
    telemetry::metrics::metrics,
};
use queue::{BatchQueue, Dropped, Pending, Waiter};

type Reply = oneshot::Sender<Result<Answer, GatewayError>>;

struct Job {
    req: ModelInferRequest,
    reply: Reply,
    /// The caller can take Triton's answer as Triton framed it (a gRPC caller), should its
    /// batch hold only its own request.
    framed: bool,
    /// The caller's trace context (tracing on only): parent and links of the batch span.
    trace: Option<opentelemetry::Context>,
    /// Open while the request waits for its batch (tracing on only).
    _wait_span: Option<tracing::Span>,
}

impl Waiter for Job {
    fn is_gone(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Effective batching settings of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub mode: BatchMode,
    pub max_batch_size: i64,
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<i64>,
    pub max_queue_size: usize,
    pub max_inflight_batches: usize,
    pub priority_levels: usize,
    /// Level used when a request names no priority (0-based).
    pub default_level: usize,
    pub max_priority_wait: Duration,
}

/// The default number of a model's batches in flight per endpoint, from its instance groups
/// in Triton's config: one per instance, so every instance can run a batch, and one more, so
/// that a batch waits in Triton while the answer of the previous one travels back and the next
/// one is sent, keeping an instance (a GPU above all) busy across the hop. One instance gets 2.
/// A fixed default would leave instances idle: a model with four gets at most two of them busy.
fn inflight_for_instances(groups: &[ModelInstanceGroup]) -> usize {
    let instances: usize = groups
        .iter()
        .map(|g| {
            let count = usize::try_from(g.count).unwrap_or(0).max(1);
            // Without a `gpus` list Triton puts `count` instances on each GPU it sees, and the
            // config it serves then lists them.
            match g.kind() {
                Kind::Gpu => count.saturating_mul(g.gpus.len().max(1)),
                Kind::Cpu | Kind::Auto | Kind::Model => count,
            }
        })
        .fold(0, usize::saturating_add);
    instances.max(1).saturating_add(1).min(MAX_DEFAULT_INFLIGHT)
}

/// A bound on the derived default (a config may set up to 1024 itself).
const MAX_DEFAULT_INFLIGHT: usize = 64;

/// Request parameters that sequence (stateful) models use: such requests are never batched.
const SEQUENCE_PARAMS: &[&str] = &["sequence_id", "sequence_start", "sequence_end"];
/// Parameters infergate consumes rather than forwards.
const OWN_PARAMS: &[&str] = &["priority", "timeout"];

impl ModelSettings {
    /// Settings from the model's Triton config, overridden by infergate's config. `None` when
    /// the model cannot be batched by the gateway (no batch dimension, sequence batching,
    /// decoupled) or batching is off for it.
    pub fn for_model(info: &ModelInfo, cfg: &BatchingConfig) -> Option<Self> {
        let none = ModelBatching::default();
        let ov = cfg.models.get(&info.name).unwrap_or(&none);
        let mode = ov.mode.unwrap_or(cfg.mode);
        let decoupled = info
            .config
            .model_transaction_policy
            .as_ref()
            .is_some_and(|p| p.decoupled);
        let sequence = matches!(
            info.config.scheduling_choice,
            Some(SchedulingChoice::SequenceBatching(_))
        );
        if mode == BatchMode::Off || info.max_batch_size <= 0 || decoupled || sequence {
            return None;
        }
        let triton = match &info.config.scheduling_choice {
            Some(SchedulingChoice::DynamicBatching(d)) => Some(d),
            _ => None,
        };
        let max_batch_size = ov
            .max_batch_size
            .map_or(info.max_batch_size, |m| m.clamp(1, info.max_batch_size));
        let delay_us = ov
            .max_queue_delay_us
            .or(cfg.max_queue_delay_us)
            .or(triton.map(|d| d.max_queue_delay_microseconds))
            .unwrap_or(0);
        let preferred = ov
            .preferred_batch_sizes
            .clone()
            .unwrap_or_else(|| {
                triton.map_or_else(Vec::new, |d| {
                    d.preferred_batch_size
                        .iter()
                        .map(|&p| i64::from(p))
                        .collect()
                })
            })
            .into_iter()
            .filter(|&p| p > 0 && p <= max_batch_size)
            .collect();
        let levels = (cfg.priority_levels as usize)
            .max(triton.map_or(0, |d| d.priority_levels as usize))
            .max(1);
        let default_level = triton
            .map(|d| d.default_priority_level as usize)
            .filter(|&l| l >= 1 && l <= levels)
            .map_or(levels.div_ceil(2) - 1, |l| l - 1);
        Some(Self {
            mode,
            max_batch_size,
            max_queue_delay: Duration::from_micros(delay_us),
            preferred_batch_sizes: preferred,
            max_queue_size: ov.max_queue_size.unwrap_or(cfg.max_queue_size),
            max_inflight_batches: ov
                .max_inflight_batches
                .or(cfg.max_inflight_batches)
                .unwrap_or_else(|| inflight_for_instances(&info.config.instance_group)),
            priority_levels: levels,
            default_level,
            max_priority_wait: Duration::from_millis(cfg.max_priority_wait_ms),
        })
    }

    /// The queue level for a request's `priority` parameter (Triton's convention: 1 is the
    /// highest, 0 or absent means the default level).
    pub fn level_of(&self, req: &ModelInferRequest) -> Result<usize, GatewayError> {
        let Some(p) = req.parameters.get("priority") else {
            return Ok(self.default_level);
        };
        let value = match p.parameter_choice {
            Some(ParameterChoice::Int64Param(v)) if v >= 0 => v as u64,
            Some(ParameterChoice::Uint64Param(v)) => v,
            _ => {
                return Err(GatewayError::invalid(
                    "parameter 'priority' must be a non-negative integer",
                ));
            }
        };
        match value {
            0 => Ok(self.default_level),
            v if v as usize <= self.priority_levels => Ok(v as usize - 1),
            v => Err(GatewayError::invalid(format!(
                "parameter 'priority' is {v}, the model has {} priority levels",
                self.priority_levels
            ))),
        }
    }
}

/// Whether a request may share a call with others; sequence requests go alone.
pub fn request_is_batchable(req: &ModelInferRequest) -> bool {
    !req.parameters
        .keys()
        .any(|k| SEQUENCE_PARAMS.contains(&k.as_str()))
}

/// Requests with equal keys can be concatenated: same inputs in the same order with equal
/// datatypes and non-batch dimensions, and the same parameters. Requested outputs without
/// parameters do not count: the batch asks for their union and each member gets its own
/// (`split::select_outputs`). Output parameters (a classification count) change what Triton
/// returns, so such requests share a call only with requests naming the same outputs with
/// the same parameters. Built on every batched request, so the common case (no parameters)
/// writes names and numbers straight into one string, without `Debug` formatting; each name
/// is written after its length, so no name can pass for another's separators.
fn batch_key(req: &ModelInferRequest) -> Arc<str> {
    let mut k = String::with_capacity(96);
    for i in &req.inputs {
        push_name(&mut k, &i.name);
        push_name(&mut k, &i.datatype);
        for &d in i.shape.iter().skip(1) {
            push_int(&mut k, d);
            k.push(',');
        }
        if !i.parameters.is_empty() {
            let _ = write!(k, "{:?}", sorted(&i.parameters));
        }
        k.push(';');
    }
    k.push('|');
    if req.outputs.iter().any(|o| !o.parameters.is_empty()) {
        let mut outs: Vec<_> = req.outputs.iter().collect();
        outs.sort_by(|a, b| a.name.cmp(&b.name));
        for o in outs {
            push_name(&mut k, &o.name);
            let _ = write!(k, "{:?}", sorted(&o.parameters));
            k.push(';');
        }
    }
    k.push('|');
    if req
        .parameters
        .keys()
        .any(|name| !OWN_PARAMS.contains(&name.as_str()))
    {
        let params: Vec<_> = sorted(&req.parameters)
            .into_iter()
            .filter(|(name, _)| !OWN_PARAMS.contains(&name.as_str()))
            .collect();
        let _ = write!(k, "{params:?}");
    }
    k.into()
}

fn push_name(k: &mut String, s: &str) {
    push_int(k, s.len() as i64);
    k.push(':');
    k.push_str(s);
}

/// Decimal digits without `write!`: the formatting machinery cost more than the rest of the
/// key (callgrind, loadtest/BENCHMARKS.md).
fn push_int(k: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        k.push('-');
    }
    k.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

fn sorted(p: &HashMap<String, InferParameter>) -> Vec<(&String, &InferParameter)> {
    let mut v: Vec<_> = p.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// Moving averages the adaptive window reads; updated by the actor and the batch tasks.
#[derive(Default)]
struct Observed {
    /// Gap between arrivals, nanoseconds (EWMA).
    gap_ns: AtomicU64,
    /// Triton latency of a batch, nanoseconds (EWMA).
    triton_ns: AtomicU64,
    /// Requests of this queue in calls to Triton now.
    in_calls: AtomicUsize,
}

/// Counts a batch's members in [`Observed::in_calls`] while it exists.
struct InCall(Arc<Observed>, usize);

impl InCall {
    fn new(observed: &Arc<Observed>, members: usize) -> Self {
        observed.in_calls.fetch_add(members, Ordering::Relaxed);
        Self(Arc::clone(observed), members)
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.in_calls.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Arrivals over which the adaptive `peak` of requests inside decays by a factor of e.
const PEAK_DECAY_ARRIVALS: f64 = 512.0;

/// The adaptive window (module docs): how long a batch missing `missing_rows` rows may wait,
/// given the mean gap between arrivals, the mean Triton call, and how many more callers are
/// expected (`peak - inside`).
fn adaptive_window(
    gap: Duration,
    call: Duration,
    missing_rows: i64,
    expected_callers: f64,
    max_delay: Duration,
) -> Duration {
    let half_call = call / 2;
    // The peak decays between arrivals: 7.98 against 7 inside is one caller still out.
    let expected = expected_callers.round();
    if gap.is_zero() || gap >= half_call || missing_rows <= 0 || expected < 1.0 {
        return Duration::ZERO;
    }
    // Each caller brings at least one row.
    let arrivals = expected.min(missing_rows as f64);
    max_delay.min(half_call).min(gap.mul_f64(arrivals))
}

fn ewma(slot: &AtomicU64, sample: Duration) {
    let s = sample.as_nanos().min(u64::MAX as u128) as u64;
    let old = slot.load(Ordering::Relaxed);
    let new = if old == 0 { s } else { (old * 7 + s) / 8 };
    slot.store(new, Ordering::Relaxed);
}

struct ModelBatcher {
    settings: ModelSettings,
    /// Requests admitted and not yet sent or dropped, in all of the model's queues; bounded by
    /// `max_queue_size`.
    queued: Arc<AtomicUsize>,
    /// Call slots shared by the model's queues: `max_inflight_batches` per Triton endpoint.
    slots: Arc<Semaphore>,
    /// One queue (actor) per thread that submits: slot 0 for the main runtime, `1 + i` for gRPC
    /// serving thread `i`, made on first use.
    inboxes: Mutex<Vec<Option<mpsc::UnboundedSender<Pending<Job>>>>>,
}

impl ModelBatcher {
    /// Hands a request to the queue of the calling thread, starting that queue's actor if it
    /// has none (or it ended with its thread); false if even a new actor cannot take it (the
    /// runtime is shutting down). A serving thread's actor runs on that thread, so its
    /// callers, their batch, its Triton call and the answers never change thread.
    fn send(
        &self,
        p: Pending<Job>,
        backend: &Arc<TritonPool>,
        main: Option<&tokio::runtime::Handle>,
    ) -> bool {
        let lane = crate::lane::current();
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
        let actor = Actor {
            backend: Arc::clone(backend),
            settings: self.settings.clone(),
            queue: BatchQueue::new(
                self.settings.priority_levels,
                self.settings.max_priority_wait,
            ),
            inbox: rx,
            queued: Arc::clone(&self.queued),
            slots: Arc::clone(&self.slots),
            observed: Arc::new(Observed::default()),
            last_arrival: None,
            peak: 0.0,
        };
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
}

impl Batcher {
    pub fn new(backend: Arc<TritonPool>, cfg: BatchingConfig) -> Self {
        Self {
            backend,
            cfg,
            models: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
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

    fn model(&self, info: &ModelInfo, version: &str, settings: ModelSettings) -> Arc<ModelBatcher> {
        let mut models = self.models.lock().expect("batcher map lock");
        if let Some(m) = models.get(&info.name).and_then(|v| v.get(version))
            && m.settings == settings
        {
            return Arc::clone(m);
        }
        let permits = settings.max_inflight_batches * self.backend.endpoints().len().max(1);
        let m = Arc::new(ModelBatcher {
            settings,
            queued: Arc::new(AtomicUsize::new(0)),
            slots: Arc::new(Semaphore::new(permits)),
            inboxes: Mutex::new(Vec::new()),
        });
        models
            .entry(info.name.clone())
            .or_default()
            .insert(version.to_string(), Arc::clone(&m));
        m
    }

    /// Queues a validated request of `rows` rows (at most the model's max_batch_size) and waits
    /// for its share of a batch. With `framed`, a request whose batch is itself alone may be
    /// answered with Triton's frame as it came ([`Answer::Framed`]).
    pub async fn submit(
        &self,
        info: &ModelInfo,
        settings: ModelSettings,
        req: ModelInferRequest,
        rows: i64,
        deadline: Option<Instant>,
        framed: bool,
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
            deadline,
            item: Job {
                req,
                reply: tx,
                framed,
                trace: crate::telemetry::trace::current_context(),
                _wait_span: crate::telemetry::trace::enabled()
                    .then(|| tracing::info_span!("batch_wait", otel.name = "batch wait")),
            },
        };
        if !model.send(pending, &self.backend, self.runtime.as_ref()) {
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

struct Actor {
    backend: Arc<TritonPool>,
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

    async fn run(mut self) {
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
                    _ = tokio::time::sleep(wait) => {}
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
                    tokio::spawn(async move {
                        run_batch(backend, batch, observed).await;
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
async fn run_batch(backend: Arc<TritonPool>, batch: Vec<Pending<Job>>, observed: Arc<Observed>) {
    let now = Instant::now();
    let deadline = batch.iter().filter_map(|p| p.deadline).min();
    let rows: Vec<i64> = batch.iter().map(|p| p.rows).collect();
    let model = batch[0].item.req.model_name.clone();
    let mut members: Vec<(String, Reply)> = Vec::with_capacity(batch.len());
    let mut reqs: Vec<ModelInferRequest> = Vec::with_capacity(batch.len());
    let mut traces = Vec::new();
    let batch_len = batch.len();
    let alone_framed = batch_len == 1 && batch[0].item.framed;
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
    // The tightest member's budget (the backend forwards it as Triton's `timeout`).
    let budget = deadline.map(|d| d.saturating_duration_since(now));
    if members.len() == 1 {
        // Alone: the call is the caller's own request, id included (Triton echoes it), and a
        // gRPC caller gets Triton's frame as it came, neither decoded nor encoded again.
        let (_, reply) = members.pop().expect("one member");
        let mut call = reqs.pop().expect("one request");
        strip_own_params(&mut call);
        let started = Instant::now();
        let result = backend
            .infer_answer(call, budget, alone_framed)
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
    let result = backend.infer(call, budget).instrument(span).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };

    fn req(rows: i64, dims: &[i64], outputs: &[&str]) -> ModelInferRequest {
        let input = |name: &str| InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: [&[rows][..], dims].concat(),
            ..Default::default()
        };
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input("INPUT0"), input("INPUT1")],
            outputs: outputs
                .iter()
                .map(|&n| InferRequestedOutputTensor {
                    name: n.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn int(v: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        }
    }

    #[test]
    fn the_adaptive_window_waits_only_for_callers_that_can_come() {
        let us = Duration::from_micros;
        let max = us(2_000);
        // Arrivals far apart against the call: send at once.
        assert_eq!(adaptive_window(us(600), us(1_000), 10, 5.0, max), us(0));
        // Nothing measured yet.
        assert_eq!(adaptive_window(us(0), us(1_000), 10, 5.0, max), us(0));
        // Every caller seen lately is inside already (closed loop): nobody else can come.
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.0, max), us(0));
        assert_eq!(adaptive_window(us(100), us(1_000), 10, -0.02, max), us(0));
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.4, max), us(0));
        // A decayed peak of 7.98 with 7 inside: one caller is still out.
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.98, max), us(100));
        // The batch is full.
        assert_eq!(adaptive_window(us(100), us(1_000), 0, 8.0, max), us(0));
        // Three callers outside: three gaps, though ten rows are missing.
        assert_eq!(adaptive_window(us(100), us(4_000), 10, 3.2, max), us(300));
        // Many callers outside: bounded by the missing rows, half a call, the delay.
        assert_eq!(adaptive_window(us(100), us(4_000), 5, 50.0, max), us(500));
        assert_eq!(adaptive_window(us(100), us(1_000), 60, 50.0, max), us(500));
        assert_eq!(adaptive_window(us(100), us(8_000), 60, 50.0, max), max);
    }

    #[test]
    fn requests_that_can_share_a_call_have_one_key() {
        let a = req(3, &[16], &["OUT0", "OUT1"]);
        // Another row count, the outputs in another order, its own priority and timeout.
        let mut b = req(7, &[16], &["OUT1", "OUT0"]);
        b.id = "other".into();
        b.parameters.insert("priority".into(), int(1));
        b.parameters.insert("timeout".into(), int(5000));
        assert_eq!(batch_key(&a), batch_key(&b));
        // Other outputs, or none named (all of them): the call asks for the union.
        assert_eq!(batch_key(&a), batch_key(&req(3, &[16], &["OUT0"])));
        assert_eq!(batch_key(&a), batch_key(&req(3, &[16], &[])));
    }

    #[test]
    fn requests_that_cannot_share_a_call_have_different_keys() {
        let base = batch_key(&req(3, &[16], &["OUT0"]));
        let mut other_dtype = req(3, &[16], &["OUT0"]);
        other_dtype.inputs[1].datatype = "FP64".into();
        let mut renamed = req(3, &[16], &["OUT0"]);
        renamed.inputs[0].name = "X".into();
        let mut with_param = req(3, &[16], &["OUT0"]);
        with_param.parameters.insert("mode".into(), int(2));
        let mut tensor_param = req(3, &[16], &["OUT0"]);
        tensor_param.inputs[0].parameters.insert("p".into(), int(1));
        let mut out_param = req(3, &[16], &["OUT0"]);
        out_param.outputs[0]
            .parameters
            .insert("classification".into(), int(3));
        let others = [
            batch_key(&req(3, &[8], &["OUT0"])),
            batch_key(&req(3, &[16, 1], &["OUT0"])),
            batch_key(&req(3, &[-16], &["OUT0"])),
            batch_key(&other_dtype),
            batch_key(&renamed),
            batch_key(&with_param),
            batch_key(&tensor_param),
            batch_key(&out_param),
        ];
        for (n, k) in others.iter().enumerate() {
            assert_ne!(&base, k, "case {n}");
        }
    }

    fn model(max_batch_size: i32, scheduling: Option<SchedulingChoice>) -> ModelInfo {
        use crate::proto::inference::{ModelConfig, ModelMetadataResponse};
        let metadata = ModelMetadataResponse {
            name: "m".into(),
            ..Default::default()
        };
        let config = ModelConfig {
            name: "m".into(),
            max_batch_size,
            scheduling_choice: scheduling,
            ..Default::default()
        };
        ModelInfo::new(metadata, config)
    }

    fn dynamic(delay_us: u64, preferred: &[i32], levels: u64, default: u64) -> SchedulingChoice {
        SchedulingChoice::DynamicBatching(crate::proto::inference::ModelDynamicBatching {
            preferred_batch_size: preferred.to_vec(),
            max_queue_delay_microseconds: delay_us,
            priority_levels: levels,
            default_priority_level: default,
            ..Default::default()
        })
    }

    #[test]
    fn batching_is_on_by_default_with_the_triton_configs_settings() {
        let cfg = BatchingConfig::default();
        let s = ModelSettings::for_model(&model(64, Some(dynamic(300, &[8, 32, 128], 3, 2))), &cfg)
            .expect("a model with a batch dimension is batched by default");
        assert_eq!(s.mode, BatchMode::On);
        assert_eq!(s.max_batch_size, 64);
        assert_eq!(s.max_queue_delay, Duration::from_micros(300));
        // 128 is over max_batch_size, so it can never be reached.
        assert_eq!(s.preferred_batch_sizes, vec![8, 32]);
        assert_eq!((s.priority_levels, s.default_level), (3, 1));
        assert_eq!(s.max_queue_size, cfg.max_queue_size);
        // No instance groups in this config (Triton always serves one): as for one instance.
        assert_eq!(s.max_inflight_batches, 2);
        // No dynamic_batching block: still batched, with no delay and the gateway's levels;
        // requests without a priority go to the middle level, rounded up (1 of 2).
        let plain = ModelSettings::for_model(&model(8, None), &cfg).unwrap();
        assert_eq!(plain.max_queue_delay, Duration::ZERO);
        assert!(plain.preferred_batch_sizes.is_empty());
        assert_eq!((plain.priority_levels, plain.default_level), (2, 0));
    }

    #[test]
    fn call_slots_default_to_one_per_model_instance_plus_one() {
        let group = |kind: Kind, count: i32, gpus: &[i32]| ModelInstanceGroup {
            kind: kind as i32,
            count,
            gpus: gpus.to_vec(),
            ..Default::default()
        };
        let slots = |groups: Vec<ModelInstanceGroup>, cfg: &BatchingConfig| {
            let mut info = model(8, None);
            info.config.instance_group = groups;
            ModelSettings::for_model(&info, cfg)
                .unwrap()
                .max_inflight_batches
        };
        let cfg = BatchingConfig::default();
        assert_eq!(slots(vec![group(Kind::Cpu, 1, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Cpu, 4, &[])], &cfg), 5);
        // A count of 0 still runs one instance in Triton.
        assert_eq!(slots(vec![group(Kind::Cpu, 0, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Gpu, 2, &[0, 1])], &cfg), 5);
        assert_eq!(slots(vec![group(Kind::Model, 1, &[])], &cfg), 2);
        assert_eq!(
            slots(
                vec![group(Kind::Cpu, 1, &[]), group(Kind::Gpu, 1, &[0])],
                &cfg
            ),
            3
        );
        assert_eq!(
            slots(vec![group(Kind::Cpu, i32::MAX, &[])], &cfg),
            MAX_DEFAULT_INFLIGHT
        );
        // Configuration wins: the gateway-wide value, then the model's own.
        let mut cfg = BatchingConfig {
            max_inflight_batches: Some(4),
            ..Default::default()
        };
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 4);
        cfg.models.insert(
            "m".into(),
            crate::config::ModelBatching {
                max_inflight_batches: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 1);
    }

    #[test]
    fn configuration_overrides_the_triton_config_within_its_limits() {
        let mut cfg = BatchingConfig {
            max_queue_delay_us: Some(1_000),
            ..Default::default()
        };
        let info = model(64, Some(dynamic(300, &[], 0, 0)));
        // The gateway-wide delay wins over Triton's.
        let s = ModelSettings::for_model(&info, &cfg).unwrap();
        assert_eq!(s.max_queue_delay, Duration::from_micros(1_000));
        cfg.models.insert(
            "m".into(),
            crate::config::ModelBatching {
                mode: Some(BatchMode::Adaptive),
                max_batch_size: Some(500),
                max_queue_delay_us: Some(50),
                preferred_batch_sizes: Some(vec![0, 16, 65]),
                max_queue_size: Some(7),
                max_inflight_batches: Some(3),
                max_concurrent_requests: None,
            },
        );
        let s = ModelSettings::for_model(&info, &cfg).unwrap();
        assert_eq!(s.mode, BatchMode::Adaptive);
        // Never above Triton's max_batch_size, which Triton would refuse.
        assert_eq!(s.max_batch_size, 64);
        assert_eq!(s.max_queue_delay, Duration::from_micros(50));
        assert_eq!(s.preferred_batch_sizes, vec![16]);
        assert_eq!((s.max_queue_size, s.max_inflight_batches), (7, 3));
    }

    #[test]
    fn models_the_gateway_must_not_batch_get_no_settings() {
        let cfg = BatchingConfig::default();
        let no_batch_dim = model(0, Some(dynamic(0, &[], 0, 0)));
        let sequence = model(
            8,
            Some(SchedulingChoice::SequenceBatching(
                crate::proto::inference::ModelSequenceBatching::default(),
            )),
        );
        let mut decoupled = model(8, None);
        decoupled.config.model_transaction_policy =
            Some(crate::proto::inference::ModelTransactionPolicy { decoupled: true });
        for (what, info) in [
            ("no batch dimension", &no_batch_dim),
            ("sequence", &sequence),
            ("decoupled", &decoupled),
        ] {
            assert_eq!(ModelSettings::for_model(info, &cfg), None, "{what}");
        }
        let off = BatchingConfig {
            mode: BatchMode::Off,
            ..Default::default()
        };
        assert_eq!(ModelSettings::for_model(&model(8, None), &off), None);
        // ... unless configured on for that model alone.
        let mut one_on = off.clone();
        one_on.models.insert(
            "m".into(),
            crate::config::ModelBatching {
                mode: Some(BatchMode::On),
                ..Default::default()
            },
        );
        assert!(ModelSettings::for_model(&model(8, None), &one_on).is_some());
    }

    #[test]
    fn key_numbers_are_written_as_format_writes_them() {
        for n in [0, 7, -7, 10, 1234567890, i64::MAX, i64::MIN, -1] {
            let mut k = String::new();
            push_int(&mut k, n);
            assert_eq!(k, n.to_string());
        }
    }

    #[test]
    fn names_cannot_imitate_the_separators() {
        // Without lengths, these two would both read "a:FP32:..." in some order.
        let mut a = req(1, &[2], &[]);
        a.inputs.truncate(1);
        a.inputs[0].name = "a".into();
        let mut b = a.clone();
        b.inputs[0].name = "a:FP32:2,;1:a".into();
        b.inputs[0].datatype = "FP32".into();
        assert_ne!(batch_key(&a), batch_key(&b));
        let mut n = String::new();
        for v in [0, 7, -42, i64::MAX, i64::MIN] {
            n.clear();
            push_int(&mut n, v);
            assert_eq!(n, v.to_string());
        }
    }
}
