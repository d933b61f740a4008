//! The inference entry point shared by the gRPC and HTTP APIs (and later the async workers):
//! look up the model, validate the request, then send it through the model's batcher or alone.
//! Client batches larger than the model's max_batch_size are split into chunks here and put
//! back together in order. A request whose deadline has passed is never sent to Triton.

pub mod validate;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::model::{ModelInfo, TensorSpec};
pub use validate::Validated;

use crate::{
    backend::triton::{Answer, TritonPool},
    batch::config::BatchingConfig,
    batch::{Batcher, ModelSettings, request_is_batchable, split},
    cache::{CachePolicy, Store},
    call::{Admission, Call, Deadline, TenantId},
    error::GatewayError,
    proto::inference::{
        ModelConfigResponse, ModelInferRequest, ModelInferResponse, ModelMetadataResponse,
        RepositoryIndexRequest, infer_parameter::ParameterChoice,
    },
    routes::{Route, RouteTable, Routed, Routes, ShadowCall, Use, Watch, refuse_version},
    telemetry::activity::{Activity, Busy},
};

/// A request on its way to Triton on a stream of its own (a decoupled model): routed,
/// validated and admitted. Held while its responses come: it counts as the model's demand
/// and holds its place under the model's cap until dropped.
pub struct Admitted {
    pub req: ModelInferRequest,
    pub info: Arc<ModelInfo>,
    /// The caller's deadline, or the one the request's `timeout` parameter sets.
    pub deadline: Option<Deadline>,
    /// The route's breaker, to be told how the stream ended.
    pub watch: Option<Watch>,
    _busy: Busy,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Clone)]
pub struct InferService {
    backend: Arc<TritonPool>,
    batcher: Arc<Batcher>,
    caps: Arc<ModelCaps>,
    /// Calls inside infergate per model, read by the autoscaler.
    activity: Arc<Activity>,
    /// Names clients call as models, split over models (`routes`).
    routes: Arc<Routes>,
    /// The runtime that made this service (the main one): shadow calls run there.
    main: Option<tokio::runtime::Handle>,
    /// The response cache, when one is configured.
    cache: Option<Arc<Store>>,
}

/// Per-model caps on requests inside infergate at once (`max_concurrent_requests`).
struct ModelCaps {
    global: usize,
    per_model: HashMap<String, usize>,
    /// One semaphore per capped model, made on first use (bounded by the models Triton has).
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ModelCaps {
    fn new(cfg: &BatchingConfig) -> Self {
        Self {
            global: cfg.max_concurrent_requests,
            per_model: cfg
                .models
                .iter()
                .filter_map(|(m, o)| o.max_concurrent_requests.map(|c| (m.clone(), c)))
                .collect(),
            gates: Mutex::default(),
        }
    }

    fn gate(&self, model: &str) -> Option<(Arc<Semaphore>, usize)> {
        let cap = self.per_model.get(model).copied().unwrap_or(self.global);
        if cap == 0 {
            return None;
        }
        let mut gates = self.gates.lock().expect("model caps lock");
        let gate = gates
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(cap)));
        Some((Arc::clone(gate), cap))
    }

    async fn admit(
        &self,
        model: &str,
        how: Admission,
    ) -> Result<Option<OwnedSemaphorePermit>, GatewayError> {
        let Some((gate, cap)) = self.gate(model) else {
            return Ok(None);
        };
        match how {
            Admission::Refuse => gate.try_acquire_owned().map(Some).map_err(|_| {
                GatewayError::Overloaded(format!(
                    "model '{model}' already has {cap} requests in flight \
                     (max_concurrent_requests)"
                ))
            }),
            Admission::Wait => Ok(gate.acquire_owned().await.ok()),
        }
    }
}

/// The earlier of the caller's deadline and the one Triton's `timeout` request parameter (µs)
/// sets from `now`.
fn deadline_of(
    req: &ModelInferRequest,
    caller: Option<Deadline>,
    now: Instant,
) -> Option<Deadline> {
    let param = req
        .parameters
        .get("timeout")
        .and_then(|p| match p.parameter_choice {
            Some(ParameterChoice::Int64Param(us)) if us > 0 => {
                Some(Duration::from_micros(us as u64))
            }
            Some(ParameterChoice::Uint64Param(us)) if us > 0 => Some(Duration::from_micros(us)),
            _ => None,
        })
        .and_then(|t| now.checked_add(t))
        .map(Deadline::at);
    Deadline::earliest(caller, param)
}

fn expired() -> GatewayError {
    GatewayError::DeadlineExceeded(
        "the request's deadline passed before it was sent to Triton".into(),
    )
}

impl InferService {
    pub fn new(backend: Arc<TritonPool>, batching: BatchingConfig) -> Self {
        let caps = Arc::new(ModelCaps::new(&batching));
        let batcher = Arc::new(Batcher::new(Arc::clone(&backend), batching));
        Self {
            backend,
            batcher,
            caps,
            activity: Arc::default(),
            routes: Arc::default(),
            main: tokio::runtime::Handle::try_current().ok(),
            cache: None,
        }
    }

    /// Answers cached models and routes from `cache`.
    pub fn with_cache(mut self, cache: Arc<Store>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Serves `routes` besides the models.
    pub fn with_routes(mut self, routes: Arc<Routes>) -> Self {
        self.routes = routes;
        self
    }

    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// What a name asks Triton for its description: a route's primary target, or the model.
    fn described(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(Option<Arc<Route>>, String, String), GatewayError> {
        match self.routes.get(name) {
            Some(route) => {
                refuse_version(&route, version)?;
                let p = route.primary();
                let (m, v) = (p.model.clone(), p.version.clone());
                Ok((Some(route), m, v))
            }
            None => Ok((None, name.to_string(), version.to_string())),
        }
    }

    /// What infergate knows of a model, or of a route's primary.
    pub async fn model_info(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<ModelInfo>, GatewayError> {
        let (_, m, v) = self.described(name, version)?;
        self.backend.model_info(&m, &v).await
    }

    /// Triton's metadata of a model, or of a route's primary under the route's name.
    pub async fn model_metadata(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelMetadataResponse, GatewayError> {
        let (route, m, v) = self.described(name, version)?;
        let mut md = self.backend.model_metadata(&m, &v).await?;
        if route.is_some() {
            md.name = name.to_string();
        }
        Ok(md)
    }

    /// Triton's config of a model, or of a route's primary under the route's name.
    pub async fn model_config(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelConfigResponse, GatewayError> {
        let (route, m, v) = self.described(name, version)?;
        let mut cfg = self.backend.model_config(&m, &v).await?;
        if let (Some(_), Some(c)) = (route, cfg.config.as_mut()) {
            c.name = name.to_string();
        }
        Ok(cfg)
    }

    /// A model's readiness; a route is ready while any of its targets with a weight is.
    pub async fn model_ready(&self, name: &str, version: &str) -> Result<bool, GatewayError> {
        let Some(route) = self.routes.get(name) else {
            return self.backend.model_ready(name, version).await;
        };
        refuse_version(&route, version)?;
        let serving = route.targets.iter().filter(|t| t.weight > 0);
        for t in serving.chain(&route.fallback) {
            if self.backend.model_ready(&t.model, &t.version).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every target and fallback of every route is a model Triton describes, and a fallback
    /// takes the inputs of the targets it stands in for (names, datatypes, shapes). Checked
    /// when routes load, so a route never answers every call with NOT_FOUND, and a request a
    /// target takes is never refused by its fallback.
    pub async fn check_routes(&self, table: &RouteTable) -> Result<(), String> {
        let inputs = |info: &ModelInfo| -> Vec<(String, String, Vec<i64>)> {
            let mut v: Vec<_> = info
                .inputs
                .iter()
                .map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone()))
                .collect();
            v.sort();
            v
        };
        for route in table.routes.values() {
            let mut targets = Vec::with_capacity(route.targets.len());
            for t in &route.targets {
                let info = self
                    .backend
                    .model_info(&t.model, &t.version)
                    .await
                    .map_err(|e| format!("routes.{}.targets: '{}': {e}", route.name, t.label()))?;
                targets.push((t, info));
            }
            let Some(f) = &route.fallback else { continue };
            let fallback = self
                .backend
                .model_info(&f.model, &f.version)
                .await
                .map_err(|e| format!("routes.{}.fallback: '{}': {e}", route.name, f.label()))?;
            for (t, target) in &targets {
                if inputs(target) != inputs(&fallback) {
                    return Err(format!(
                        "routes.{}.fallback: '{}' does not take the inputs of '{}' ({:?} against {:?})",
                        route.name,
                        f.label(),
                        t.label(),
                        inputs(&fallback),
                        inputs(target)
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> &Arc<TritonPool> {
        &self.backend
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Describes every ready model once, so that a model batched in two windows (infergate's
    /// and Triton's own) is reported at start rather than at its first request.
    pub async fn check_ready_models(&self) -> Result<(), GatewayError> {
        let index = self
            .backend
            .repository_index(RepositoryIndexRequest {
                ready: true,
                ..Default::default()
            })
            .await?;
        let mut names: Vec<_> = index.models.into_iter().map(|m| m.name).collect();
        names.dedup();
        for name in names {
            if let Ok(info) = self.backend.model_info(&name, "").await {
                self.batcher.check_windows(&info);
            }
        }
        Ok(())
    }

    /// Requests waiting in each model's batching queue.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        self.batcher.queue_depths()
    }

    /// Validates a request (model known, tensors right) without running it: the task API
    /// refuses bad requests before queueing them.
    pub async fn check(&self, req: &mut ModelInferRequest) -> Result<Validated, GatewayError> {
        self.lookup(req, Use::Look, None).await.map(|(_, v, _)| v)
    }

    /// The model's description, and the request validated against it.
    /// `run`: the request goes to Triton now (not a task being accepted), so a guarded
    /// route's breaker lets it through and wants its outcome; `deadline`: its answer is
    /// needed by then (a route sends it to its fallback when its target would be late).
    async fn lookup(
        &self,
        req: &mut ModelInferRequest,
        used: Use,
        deadline: Option<Deadline>,
    ) -> Result<(Arc<ModelInfo>, Validated, Routed), GatewayError> {
        if req.model_name.is_empty() {
            return Err(GatewayError::invalid("model_name is empty"));
        }
        let routed = self.routes.resolve(req, used, deadline)?;
        let info = self
            .backend
            .model_info(&req.model_name, &req.model_version)
            .await?;
        let validated = validate::validate(req, &info)?;
        Ok((info, validated, routed))
    }

    /// Runs one request, decoded.
    pub async fn infer(
        &self,
        req: ModelInferRequest,
        call: Call,
    ) -> Result<ModelInferResponse, GatewayError> {
        self.answer(req, call.decoded()).await?.into_response()
    }

    /// Runs one request. With [`Framing::AsTriton`](crate::call::Framing), a request that
    /// reaches Triton alone is answered as Triton framed it ([`Answer::Framed`]), ready to be
    /// sent on. A request to a cached model or route by a known tenant may be answered from
    /// the response cache.
    pub async fn answer(&self, req: ModelInferRequest, call: Call) -> Result<Answer, GatewayError> {
        if let (Some(cache), Some(tenant)) = (&self.cache, call.tenant)
            && let Some(policy) = self.routes.cache_policy(&req.model_name)
        {
            return self.cached(cache, &policy, tenant, req, call).await;
        }
        self.answer_live(req, call).await
    }

    /// What an edge hands on with a request it decoded: the route's sticky header carried in
    /// the request, and the caller's tenant on the call when something is cached (the cache
    /// is the tenant's only reader here, so it is digested only then).
    pub fn at_edge(
        &self,
        req: &mut ModelInferRequest,
        headers: &http::HeaderMap,
        tenant: Option<&str>,
        call: Call,
    ) -> Call {
        self.routes.stick(req, headers);
        match tenant {
            Some(t) if self.cache.is_some() && self.routes.caches_anything() => call.for_tenant(t),
            _ => call,
        }
    }

    /// True when the model a request goes to (after its route) is decoupled, so its answers
    /// are a stream. A lookup that fails answers false: the unary path then gives its error.
    pub async fn is_decoupled(&self, req: &ModelInferRequest) -> bool {
        let mut probe = ModelInferRequest {
            model_name: req.model_name.clone(),
            model_version: req.model_version.clone(),
            parameters: req.parameters.clone(),
            ..Default::default()
        };
        if self.routes.resolve(&mut probe, Use::Look, None).is_err() {
            return false;
        }
        self.backend
            .model_info(&probe.model_name, &probe.model_version)
            .await
            .is_ok_and(|info| info.decoupled())
    }

    /// Routes, validates and admits a request whose answers will be a stream. A route's
    /// shadow copy is not made: a stream is not compared answer for answer. A model over its
    /// cap refuses at once (RESOURCE_EXHAUSTED) rather than hold a stream open waiting.
    pub async fn admit_stream(
        &self,
        mut req: ModelInferRequest,
        caller: Option<Deadline>,
    ) -> Result<Admitted, GatewayError> {
        let deadline = deadline_of(&req, caller, Instant::now());
        let (info, _, routed) = self.lookup(&mut req, Use::Call, deadline).await?;
        let busy = self.activity.enter(&info.name);
        let permit = self.caps.admit(&info.name, Admission::Refuse).await?;
        Ok(Admitted {
            req,
            info,
            deadline,
            watch: routed.watch,
            _busy: busy,
            _permit: permit,
        })
    }

    async fn cached(
        &self,
        cache: &Store,
        policy: &CachePolicy,
        tenant: TenantId,
        req: ModelInferRequest,
        call: Call,
    ) -> Result<Answer, GatewayError> {
        let name = req.model_name.clone();
        let key = crate::cache::key(&req, (!policy.shared).then_some(&tenant));
        let m = crate::cache::metrics::metrics();
        if let Some(hit) = cache.get(&key).await {
            m.request(&name, "hit");
            let mut resp = (*hit).clone();
            resp.id.clone_from(&req.id);
            crate::cache::mark_hit(&mut resp);
            return Ok(Answer::Decoded(resp));
        }
        m.request(&name, "miss");
        let resp = self.answer_live(req, call).await?.into_response()?;
        let bytes = prost::Message::encoded_len(&resp);
        if bytes <= policy.max_entry_bytes {
            let mut kept = resp.clone();
            kept.id.clear();
            cache.put(key, kept, bytes, policy.ttl).await;
        }
        Ok(Answer::Decoded(resp))
    }

    async fn answer_live(
        &self,
        mut req: ModelInferRequest,
        call: Call,
    ) -> Result<Answer, GatewayError> {
        let call = call.with_deadline(deadline_of(&req, call.deadline, Instant::now()));
        let (info, validated, routed) = self.lookup(&mut req, Use::Call, call.deadline).await?;
        let shadow = routed.shadow.map(|s| {
            let mut copy = req.clone();
            copy.model_name.clone_from(&s.target.model);
            copy.model_version.clone_from(&s.target.version);
            (copy, s)
        });
        let answer = self.guarded(req, call, info, validated, routed.watch).await;
        if let Some((copy, s)) = shadow {
            self.spawn_shadow(copy, s, answer.as_ref().ok().cloned());
        }
        answer
    }

    /// Runs a routed call and tells its target's breaker how it went; a probe that fails is
    /// answered by the route's fallback (only probes keep a copy of the request for that).
    async fn guarded(
        &self,
        req: ModelInferRequest,
        call: Call,
        info: Arc<ModelInfo>,
        validated: Validated,
        watch: Option<Watch>,
    ) -> Result<Answer, GatewayError> {
        let Some(watch) = watch else {
            return self.run(req, call, info, validated).await;
        };
        let again = watch.retry_on().map(|f| {
            let mut again = req.clone();
            again.model_name.clone_from(&f.model);
            again.model_version.clone_from(&f.version);
            (again, f.clone())
        });
        let answer = self.run(req, call, info, validated).await;
        let failed = answer.as_ref().is_err_and(GatewayError::is_target_fault);
        let route = watch.route().to_string();
        watch.finish(!failed);
        match again {
            Some((mut again, fallback)) if failed => {
                crate::routes::metrics::metrics().fallback(&route, fallback.label());
                let (info, validated, _) = self.lookup(&mut again, Use::Look, None).await?;
                self.run(again, call, info, validated).await
            }
            _ => answer,
        }
    }

    /// Sends a route's shadow copy on the main runtime (never on the caller's serving
    /// thread), and compares its answer with the primary's. The caller does not wait; the
    /// permit bounds how many run at once.
    fn spawn_shadow(&self, mut copy: ModelInferRequest, s: ShadowCall, primary: Option<Answer>) {
        let this = self.clone();
        let task = async move {
            let ShadowCall { route, permit, .. } = s;
            let shadow = async {
                let (info, validated, _) = this.lookup(&mut copy, Use::Look, None).await?;
                this.run(copy, Call::sync(None), info, validated)
                    .await?
                    .into_response()
            }
            .await;
            drop(permit);
            let m = crate::routes::metrics::metrics();
            let Ok(shadow) = shadow else {
                m.shadow(&route, "failed");
                return;
            };
            m.shadow(&route, "sent");
            if let Some(Ok(primary)) = primary.map(Answer::into_response) {
                let (exact, diff) = crate::routes::shadow::compare(&primary, &shadow);
                m.shadow_compared(&route, exact, diff);
            }
        };
        match &self.main {
            Some(main) => drop(main.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    async fn run(
        &self,
        req: ModelInferRequest,
        call: Call,
        info: Arc<ModelInfo>,
        validated: Validated,
    ) -> Result<Answer, GatewayError> {
        let _busy = self.activity.enter(&info.name);
        let _permit = self.caps.admit(&info.name, call.admission).await?;
        let settings = self
            .batcher
            .settings(&info)
            .filter(|_| request_is_batchable(&req));
        let rows = validated.batch_size.unwrap_or(0);
        if rows <= info.max_batch_size || info.max_batch_size <= 0 {
            return self.dispatch(&info, settings, req, rows, call).await;
        }
        // A client batch over max_batch_size: chunks run concurrently, answers keep order.
        let id = req.id.clone();
        let chunks = split::split_request(&req, rows, info.max_batch_size)?;
        let (info, settings) = (&info, &settings);
        let calls = chunks.into_iter().map(|(chunk, n)| async move {
            self.dispatch(info, settings.clone(), chunk, n, call.decoded())
                .await?
                .into_response()
        });
        let parts = futures::future::try_join_all(calls).await?;
        let mut resp = split::concat_responses(parts)?;
        resp.id = id;
        Ok(Answer::Decoded(resp))
    }

    async fn dispatch(
        &self,
        info: &ModelInfo,
        settings: Option<ModelSettings>,
        req: ModelInferRequest,
        rows: i64,
        call: Call,
    ) -> Result<Answer, GatewayError> {
        if call.deadline.is_some_and(|d| d.passed_at(Instant::now())) {
            return Err(expired());
        }
        match settings {
            Some(s) => self.batcher.submit(info, s, req, rows, call).await,
            // Boxed: the call's future is ~4 KB, which every caller's future (the batched
            // path's included) would otherwise carry and copy when moved.
            None => Box::pin(self.backend.infer_answer(req, call)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::InferParameter;

    fn with_timeout(choice: ParameterChoice) -> ModelInferRequest {
        let mut req = ModelInferRequest::default();
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
        req
    }

    #[test]
    fn the_timeout_parameter_can_only_bring_the_deadline_forward() {
        let now = Instant::now();
        let caller = Some(Deadline::at(now + Duration::from_millis(50)));
        let req = with_timeout(ParameterChoice::Int64Param(10_000));
        assert_eq!(
            deadline_of(&req, caller, now),
            Some(Deadline::at(now + Duration::from_millis(10)))
        );
        // A later parameter, however large, leaves the caller's deadline; zero is no parameter.
        let req = with_timeout(ParameterChoice::Int64Param(90_000));
        assert_eq!(deadline_of(&req, caller, now), caller);
        let req = with_timeout(ParameterChoice::Uint64Param(u64::MAX));
        assert_eq!(deadline_of(&req, caller, now), caller);
        let req = with_timeout(ParameterChoice::Int64Param(0));
        assert_eq!(deadline_of(&req, None, now), None);
    }
}
