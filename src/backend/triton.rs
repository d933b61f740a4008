//! A pool of Triton servers reached over gRPC, with a client generated from infergate's own
//! protos. Calls are spread over the endpoints that passed their last readiness probe and
//! hold the call's model ([`super::placement`]; by peak-EWMA, see [`super::balance`], or
//! round robin; a sequence by [`super::affinity`]), each endpoint keeping a few HTTP/2
//! connections.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tracing::Instrument;

use super::{
    affinity::{Sequence, sequence_of},
    balance::{Candidate, two_choices},
    discovery::Discovery,
    endpoint::{Connector, InFlight},
    h2_infer::{H2Infer, is_unsent},
    members::Members,
    metrics::metrics as pool_metrics,
};
pub use super::{
    endpoint::{Endpoint, TritonClient},
    h2_infer::Answer,
};
use crate::{
    backend::config::{Balance, TritonConfig},
    breaker::{Admit, Breaker, BreakerConfig, State},
    call::{Call, Framing},
    error::GatewayError,
    model::ModelInfo,
    proto::inference::{
        InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    },
    telemetry::{metrics::metrics, trace},
};

/// How a ModelInfer call reaches Triton.
enum Via {
    Lean(Arc<H2Infer>),
    Tonic(TritonClient),
}

/// A model's cached descriptions by version, each with the time it was fetched.
pub(super) type ModelVersions = HashMap<String, (Instant, Arc<ModelInfo>)>;

pub struct TritonPool {
    /// Swapped whole when discovery changes them; a call works on the list it loaded.
    pub(super) endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Where new endpoints come from and where old ones drain.
    pub(super) members: Members,
    next: AtomicUsize,
    /// The circuits' settings, when models are guarded per endpoint.
    breaker: Option<BreakerConfig>,
    pub(super) cfg: TritonConfig,
    /// By name, then version: nested so that a lookup borrows the request's strings.
    pub(super) models: RwLock<HashMap<String, ModelVersions>>,
}

impl TritonPool {
    /// Builds the pool without connecting: connections are made on first use and re-made
    /// after failures, so infergate starts (not ready) while Triton is still loading. Triton
    /// names are looked up by the first probe (see [`super::discovery`]).
    pub fn new(cfg: &TritonConfig, max_message_bytes: usize) -> Result<Arc<Self>, GatewayError> {
        Self::with_lanes(cfg, max_message_bytes, 0)
    }

    /// [`TritonPool::new`] with one more ModelInfer connection per endpoint for each of
    /// `lanes` gRPC serving threads.
    pub fn with_lanes(
        cfg: &TritonConfig,
        max_message_bytes: usize,
        lanes: usize,
    ) -> Result<Arc<Self>, GatewayError> {
        let connector = Connector::new(cfg, max_message_bytes, lanes)?;
        let discovery = Discovery::new(cfg)?;
        // Names are resolved by the first probe; what needs no lookup is there at once.
        let endpoints = discovery
            .fixed()
            .iter()
            .map(|a| connector.open(a))
            .collect::<Result<Vec<_>, _>>()?;
        // One endpoint has no other to send a failing model to: the route's breaker and
        // fallback are the answer there.
        let breaker = (cfg.breaker_failures > 0 && (endpoints.len() > 1 || discovery.resolves()))
            .then(|| BreakerConfig {
                consecutive_failures: cfg.breaker_failures,
                cooldown: Duration::from_millis(cfg.breaker_cooldown_ms),
                ..BreakerConfig::default()
            });
        pool_metrics().endpoints.set(endpoints.len() as i64);
        Ok(Arc::new(Self {
            endpoints: ArcSwap::from_pointee(endpoints),
            members: Members::new(connector, discovery),
            next: AtomicUsize::new(0),
            breaker,
            cfg: cfg.clone(),
            models: RwLock::new(HashMap::new()),
        }))
    }

    /// The endpoints as they are now (discovery may change them at any time).
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// How many endpoints there are now.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.load().len()
    }

    /// Ready when at least one endpoint passed its last probe.
    pub fn is_ready(&self) -> bool {
        self.endpoints.load().iter().any(|e| e.is_healthy())
    }

    pub(super) fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.probe_timeout_ms)
    }

    pub(super) fn decay(&self) -> Duration {
        Duration::from_millis(self.cfg.ewma_decay_ms)
    }

    pub(super) fn slow_start(&self) -> Duration {
        Duration::from_millis(self.cfg.slow_start_ms)
    }

    /// A healthy endpoint that holds `model` (name, version) ready, chosen as
    /// `triton.balance` says (peak-EWMA over two random choices, or round robin). With `guarded` (a model's call, with
    /// per-endpoint circuits) endpoints whose circuit for it is open are passed over while
    /// another can serve it (when none can, the call goes as if unguarded: failing fast is
    /// the route's breaker's part, not the pool's). Answers the circuit to tell the
    /// outcome, and how the call was let through.
    pub(super) fn pick(
        &self,
        model: Option<(&str, &str)>,
        guarded: bool,
    ) -> Result<Picked, GatewayError> {
        let endpoints = self.endpoints.load();
        let mut healthy: Vec<&Arc<Endpoint>> =
            endpoints.iter().filter(|e| e.is_healthy()).collect();
        if healthy.is_empty() {
            return Err(GatewayError::Unavailable(format!(
                "no Triton endpoint is ready (of {})",
                endpoints.len()
            )));
        }
        if let Some((name, version)) = model {
            healthy.retain(|e| e.placement.holds(name, version));
            if healthy.is_empty() {
                let held = |e: &&Arc<Endpoint>| e.placement.holds(name, version);
                if endpoints.iter().any(|e| held(&e)) {
                    return Err(GatewayError::Unavailable(format!(
                        "model '{name}' is ready only on Triton endpoints that are not ready"
                    )));
                }
                return Err(self.nowhere(name, version));
            }
        }
        let guard = model
            .filter(|_| guarded && endpoints.len() > 1)
            .map(|(name, _)| name)
            .zip(self.breaker.as_ref());
        let now = Instant::now();
        if let Some((model, _)) = guard {
            // One look at each circuit (a lock each), kept only when some endpoint serves.
            let serving: Vec<&Arc<Endpoint>> = healthy
                .iter()
                .copied()
                .filter(|e| !e.is_open_for(model, now))
                .collect();
            if !serving.is_empty() {
                healthy = serving;
            }
        }
        let n = healthy.len();
        let i = match self.cfg.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Balance::PeakEwma => {
                let (decay, window) = (self.decay(), self.slow_start());
                two_choices(n, |i| Candidate {
                    latency: healthy[i].load.latency(now, decay),
                    in_flight: healthy[i].in_flight.load(Ordering::Relaxed),
                    weight: healthy[i].load.weight(now, window),
                })
            }
        };
        let ep = Arc::clone(healthy[i]);
        let circuit = guard.and_then(|(model, cfg)| {
            let b = ep.breaker(model, cfg)?;
            let how = b.admit(now);
            (how != Admit::Open).then_some((b, how))
        });
        Ok((ep, circuit))
    }

    /// The endpoint that holds `seq`'s state (see [`super::affinity`]): its own whatever
    /// the others' load, and an error rather than another endpoint when it is down.
    pub(super) fn pick_sequence(
        &self,
        (name, version): (&str, &str),
        seq: &Sequence,
    ) -> Result<Picked, GatewayError> {
        let endpoints = self.endpoints.load();
        let holders: Vec<&Arc<Endpoint>> = endpoints
            .iter()
            .filter(|e| e.placement.holds(name, version))
            .collect();
        let Some(i) = seq.choose(holders.iter().map(|e| e.url.as_str())) else {
            return Err(self.nowhere(name, version));
        };
        let ep = holders[i];
        if !ep.is_healthy() {
            return Err(GatewayError::Unavailable(format!(
                "sequence {seq} of model '{name}' lives on Triton endpoint {}, which is not ready (its state is there: the sequence is not moved)",
                ep.url
            )));
        }
        Ok((Arc::clone(ep), None))
    }

    /// A model no endpoint holds. Each endpoint's index is read again meanwhile, so a model
    /// loaded behind infergate's back is found on a later call.
    fn nowhere(&self, name: &str, version: &str) -> GatewayError {
        let endpoints = self.endpoints.load();
        for ep in endpoints.iter() {
            ep.read_index_soon(self.probe_timeout());
        }
        GatewayError::ModelNotPlaced {
            model: name.into(),
            version: version.into(),
            endpoints: endpoints.len(),
        }
    }

    /// Runs one call on a picked endpoint. A transport failure marks the endpoint unhealthy
    /// at once, so the next call goes elsewhere without waiting for the probe.
    pub(super) async fn call<T, F, Fut>(
        &self,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T, GatewayError>
    where
        F: FnOnce(TritonClient, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_on(timeout, |ep, budget| {
            let call = f(ep.client(), budget);
            async move { call.await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// [`TritonPool::call`] with the endpoint itself, for calls that choose their connection.
    async fn call_on<T, F, Fut>(&self, timeout: Option<Duration>, f: F) -> Result<T, GatewayError>
    where
        F: FnOnce(&Endpoint, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let picked = self.pick(None, false)?;
        self.run_on(picked, timeout, None, f).await
    }

    /// [`TritonPool::call`] on an endpoint that holds the model.
    pub(super) async fn call_for<T, F, Fut>(
        &self,
        (name, version): (&str, &str),
        f: F,
    ) -> Result<T, GatewayError>
    where
        F: FnOnce(TritonClient, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let picked = self.pick(Some((name, version)), false)?;
        self.run_on(picked, None, Some(name), |ep, budget| {
            let call = f(ep.client(), budget);
            async move { call.await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Runs one call on a picked endpoint; a call of `model` tells the model's circuit on
    /// that endpoint how it went.
    async fn run_on<T, F, Fut>(
        &self,
        picked: Picked,
        timeout: Option<Duration>,
        model: Option<&str>,
        f: F,
    ) -> Result<T, GatewayError>
    where
        F: FnOnce(&Endpoint, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let ep = Arc::clone(&picked.0);
        self.run_raw(picked, timeout, model, f)
            .await
            .map_err(|s| self.fail(&ep, s, model))
    }

    /// [`TritonPool::run_on`] with Triton's own failure, for a caller that reads it first.
    async fn run_raw<T, F, Fut>(
        &self,
        (ep, circuit): Picked,
        timeout: Option<Duration>,
        model: Option<&str>,
        f: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnOnce(&Endpoint, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(Arc::clone(&ep));
        let limit = Duration::from_millis(self.cfg.request_timeout_ms);
        let budget = timeout.map_or(limit, |t| t.min(limit));
        ep.calls.inc();
        let started = Instant::now();
        let result = f(&ep, budget).await;
        let now = Instant::now();
        let failed = result
            .as_ref()
            .is_err_and(|s| endpoint_fault(s, budget == limit));
        match (&result, failed) {
            (Ok(_), _) => ep.load.observe(now - started, now, self.decay()),
            (Err(_), true) => ep.load.failed(now - started, now, self.decay()),
            (Err(_), false) => {}
        }
        if let Some((b, how)) = circuit {
            b.record(how, !failed, now);
            // Only a failure or a probe changes the state (kept off the hot path otherwise).
            if let (true, Some(model)) = (failed || how == Admit::Probe, model) {
                metrics().triton_breaker(&ep.url, model, b.state(now).gauge());
            }
        }
        result
    }

    /// A failed call's error; what it says of the endpoint is taken in.
    fn fail(&self, ep: &Arc<Endpoint>, status: tonic::Status, model: Option<&str>) -> GatewayError {
        // NOT_FOUND for a model it was thought to hold: its models changed.
        if model.is_some() && status.code() == tonic::Code::NotFound {
            ep.read_index_soon(self.probe_timeout());
        }
        let err = GatewayError::from_backend(status);
        if matches!(err, GatewayError::Unavailable(_)) {
            ep.mark_unhealthy(&err);
            // Its pod may be gone: the names are looked up again soon.
            self.members.discovery.soon();
        }
        err
    }

    pub async fn infer(
        &self,
        req: ModelInferRequest,
        call: Call,
    ) -> Result<ModelInferResponse, GatewayError> {
        self.infer_answer(req, call.decoded())
            .await?
            .into_response()
    }

    /// One ModelInfer call, on the call's lane's own connection when it has one. Framed
    /// [`Framing::AsTriton`], an answer over a lean connection comes back as Triton framed it
    /// (see [`Answer`]); TLS endpoints always answer decoded. What is left of the call's
    /// deadline bounds the call and goes to Triton as its `timeout` parameter.
    pub async fn infer_answer(
        &self,
        mut req: ModelInferRequest,
        call: Call,
    ) -> Result<Answer, GatewayError> {
        let timeout = call.deadline.map(|d| d.left_at(Instant::now()));
        if let Some(t) = timeout {
            forward_budget(&mut req, t);
        }
        let framed = call.framing == Framing::AsTriton;
        let model = req.model_name.clone();
        let version = req.model_version.clone();
        let sequence = sequence_of(&req);
        let span = if trace::enabled() {
            tracing::info_span!(
                "triton",
                otel.name = "triton ModelInfer",
                otel.kind = "client",
                model = %model,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        let req = &req;
        let once = |ep: &Endpoint, budget: Duration| {
            // Triton continues the trace when it runs with --trace-config mode=opentelemetry.
            let mut md = tonic::metadata::MetadataMap::new();
            trace::inject_into(&mut md);
            let via = match ep.infer_conn(call.lane) {
                Some(conn) => Via::Lean(Arc::clone(conn)),
                None => Via::Tonic(ep.client()),
            };
            async move {
                match via {
                    Via::Lean(conn) if framed => conn
                        .model_infer_framed(req, budget, md.into_headers())
                        .await
                        .map(Answer::Framed),
                    Via::Lean(conn) => conn
                        .model_infer(req, budget, md.into_headers())
                        .await
                        .map(Answer::Decoded),
                    Via::Tonic(mut c) => {
                        // tonic takes the message; only TLS endpoints come here.
                        let mut r = tonic::Request::from_parts(md, Default::default(), req.clone());
                        r.set_timeout(budget);
                        c.model_infer(r)
                            .await
                            .map(|r| Answer::Decoded(r.into_inner()))
                    }
                }
            }
        };
        let result = async {
            let picked = match &sequence {
                Some(seq) => self.pick_sequence((&model, &version), seq)?,
                None => self.pick(Some((&model, &version)), true)?,
            };
            let first_ep = Arc::clone(&picked.0);
            let probe = picked
                .1
                .as_ref()
                .filter(|(_, how)| *how == Admit::Probe)
                .map(|(b, _)| Arc::clone(b));
            let status = match self.run_raw(picked, timeout, Some(&model), once).await {
                Ok(answer) => return Ok(answer),
                Err(status) => status,
            };
            let unsent = is_unsent(&status);
            let e = self.fail(&first_ep, status, Some(&model));
            // Once more on another endpoint: a call Triton never received (it cannot have
            // run; not a sequence's, whose state is on that one), or a probe of a circuit
            // that failed again (the caller gets an answer, not the probe's error).
            let again = (unsent && sequence.is_none())
                || probe.is_some_and(|b| b.state(Instant::now()) == State::Open);
            if !again {
                return Err(e);
            }
            let Ok(picked) = self.pick(Some((&model, &version)), true) else {
                return Err(e);
            };
            if Arc::ptr_eq(&picked.0, &first_ep) {
                // Not sent: a probe place it took is given back.
                if let Some((b, how)) = &picked.1 {
                    b.release(*how);
                }
                return Err(e);
            }
            if unsent {
                pool_metrics().retried.inc();
            }
            let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
            self.run_on(picked, left, Some(&model), once).await
        }
        .instrument(span.clone())
        .await;
        metrics().triton_call(&model, started.elapsed());
        if let Err(e) = &result {
            trace::record_error(&span, e);
        }
        result
    }
}

/// An endpoint's circuit and how a call was let through it.
pub(super) type Picked = (Arc<Endpoint>, Option<(Arc<Breaker>, Admit)>);

/// True when a call's failure is the endpoint's: it is down, broke or failed the model, or it
/// ran out the pool's own time limit (`own_limit`; a caller's shorter deadline is the
/// caller's). A request Triton refuses as bad is not.
fn endpoint_fault(status: &tonic::Status, own_limit: bool) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss | Code::Aborted => true,
        Code::DeadlineExceeded | Code::Cancelled => own_limit,
        _ => false,
    }
}

/// Sets Triton's own `timeout` request parameter (µs) to the caller's remaining `budget`, so
/// that Triton, too, can drop a request it cannot start in time (its queue policy decides).
/// It replaces a `timeout` the caller sent: that one is already part of the budget.
fn forward_budget(req: &mut ModelInferRequest, budget: Duration) {
    let us = i64::try_from(budget.as_micros()).unwrap_or(i64::MAX).max(1);
    req.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(us)),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_replaces_the_callers_timeout_in_microseconds() {
        let timeout = |r: &ModelInferRequest| r.parameters["timeout"].parameter_choice.clone();
        let mut req = ModelInferRequest::default();
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Uint64Param(9_000_000)),
            },
        );
        forward_budget(&mut req, Duration::from_micros(2_500_300));
        assert_eq!(timeout(&req), Some(ParameterChoice::Int64Param(2_500_300)));
        // A spent budget still asks for the shortest wait: Triton reads 0 as "no timeout".
        forward_budget(&mut req, Duration::ZERO);
        assert_eq!(timeout(&req), Some(ParameterChoice::Int64Param(1)));
        forward_budget(&mut req, Duration::MAX);
        assert_eq!(timeout(&req), Some(ParameterChoice::Int64Param(i64::MAX)));
        assert_eq!(req.parameters.len(), 1);
    }

    #[tokio::test]
    async fn each_serving_thread_has_its_own_infer_connection() {
        let cfg = TritonConfig {
            urls: vec!["http://127.0.0.1:1".into()],
            connections_per_endpoint: 2,
            ..Default::default()
        };
        let pool = TritonPool::with_lanes(&cfg, 1 << 20, 3).unwrap();
        let ep = Arc::clone(&pool.endpoints()[0]);
        assert_eq!((ep.infer_conns.len(), ep.lane_conns.len()), (2, 3));
        // Off the serving threads, calls take turns over the shared connections.
        let shared: Vec<_> = (0..4)
            .map(|_| Arc::as_ptr(ep.infer_conn(None).unwrap()))
            .collect();
        assert_eq!(shared[0], shared[2]);
        assert_ne!(shared[0], shared[1]);
        assert!(
            shared
                .iter()
                .all(|p| ep.infer_conns.iter().any(|c| Arc::as_ptr(c) == *p))
        );
        // A call on serving thread i always uses that thread's own.
        for lane in 0..3 {
            for _ in 0..3 {
                assert!(Arc::ptr_eq(
                    ep.infer_conn(Some(lane)).unwrap(),
                    &ep.lane_conns[lane]
                ));
            }
        }
        // A pool made for no serving threads (the worker process) has none of them.
        assert!(
            TritonPool::new(&cfg, 1 << 20).unwrap().endpoints()[0]
                .lane_conns
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_unreachable_pool_is_not_ready_and_fails_fast() {
        let cfg = TritonConfig {
            urls: vec!["http://127.0.0.1:1".into()],
            connect_timeout_ms: 200,
            probe_timeout_ms: 200,
            ..Default::default()
        };
        let pool = TritonPool::new(&cfg, 1 << 20).unwrap();
        pool.probe_all().await;
        assert!(!pool.is_ready());
        let err = pool.server_metadata().await.unwrap_err();
        assert!(matches!(err, GatewayError::Unavailable(_)), "{err:?}");
    }
}
