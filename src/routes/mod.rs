//! Model routes: a name clients call exactly as they call a model, whose requests are split
//! over its targets by weight (a canary at 10 %, an A/B test at 50/50). A sticky key (a request
//! parameter the route names) keeps one caller on one target by a hash, the same on every front
//! end; without it each request draws its target. The route is resolved where a request is
//! looked up (`InferService`), so gRPC, HTTP and tasks all see it, and Triton's answer names the
//! model and version that served it, as it always does.
//!
//! The routes come from their own file (`--routes-file`), read at start and again on SIGHUP; a
//! file that does not load is refused with the setting named, and the running routes stay.

pub mod config;
pub mod file;
pub mod metrics;
pub mod reload;
pub mod route;
pub mod shadow;

use std::{
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::breaker::{Admit, Breaker, State};
pub use file::RouteError;
pub use route::{Route, RouteTable, STICKY_CARRIER, Target};
use tokio::sync::OwnedSemaphorePermit;

use crate::{call::Deadline, error::GatewayError, proto::inference::ModelInferRequest};

/// What a resolved request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The caller's own call, sent now: it takes the target's breaker admission (a probe when
    /// half-open), reports its outcome through the [`Watch`], and may draw a shadow copy.
    Call,
    /// A check (a task being accepted), a fallback or a shadow copy: the breakers are only
    /// read, nothing is drawn.
    Look,
}

/// What resolving a route leaves to do after the call: tell its breaker the outcome, and
/// send its shadow copy.
#[derive(Default)]
pub struct Routed {
    pub watch: Option<Watch>,
    pub shadow: Option<ShadowCall>,
}

/// A request's copy for a route's shadow target, with its place among the shadow's calls.
pub struct ShadowCall {
    pub route: String,
    pub target: Target,
    pub permit: OwnedSemaphorePermit,
}

/// A call let through a guarded target's breaker, to be told its outcome ([`Watch::finish`]).
/// Dropped untold (the caller went away), it frees its probe place without counting.
pub struct Watch {
    breaker: Arc<Breaker>,
    admit: Admit,
    fallback: Option<Target>,
    slo: Option<Duration>,
    started: Instant,
    done: bool,
    route: String,
    target: String,
}

impl Watch {
    /// A probe (the circuit half-open) with a fallback to answer instead should it fail: the
    /// caller gets an answer, not the probe's error.
    pub fn retry_on(&self) -> Option<&Target> {
        self.fallback
            .as_ref()
            .filter(|_| self.admit == Admit::Probe)
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    /// `ok`: the target answered (errors of the request itself are not its fault). A call
    /// slower than the route's SLO counts as a failure all the same.
    pub fn finish(mut self, ok: bool) {
        let now = Instant::now();
        let took = now - self.started;
        self.breaker.observe(took, now);
        let in_time = self.slo.is_none_or(|slo| took <= slo);
        self.breaker.record(self.admit, ok && in_time, now);
        self.done = true;
        metrics::metrics().breaker(&self.route, &self.target, self.breaker.state(now));
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.release(self.admit);
        }
    }
}

/// The running routes, swapped whole on reload: a request holds the table it started with.
#[derive(Default)]
pub struct Routes {
    table: RwLock<Arc<RouteTable>>,
    /// Skips the lookup on the hot path while no route is configured.
    any: AtomicBool,
    file: Option<PathBuf>,
}

impl Routes {
    /// The routes of `file` (none without one); a file that does not load stops the start.
    pub fn load(file: Option<PathBuf>) -> Result<Self, RouteError> {
        let routes = Self {
            file,
            ..Self::default()
        };
        routes.reload()?;
        Ok(routes)
    }

    /// Reads the file again; on an error the running routes stay as they were.
    pub fn reload(&self) -> Result<usize, RouteError> {
        let table = self.read()?;
        let n = table.routes.len();
        self.set(table);
        Ok(n)
    }

    /// The file's routes, checked on their own, not yet running.
    pub fn read(&self) -> Result<RouteTable, RouteError> {
        match &self.file {
            Some(path) => file::read(path),
            None => Ok(RouteTable::default()),
        }
    }

    pub fn set(&self, table: RouteTable) {
        self.any.store(
            !table.routes.is_empty() || !table.caches.is_empty(),
            Ordering::Release,
        );
        *self.table.write().expect("routes lock") = Arc::new(table);
    }

    /// True when the running table caches some model or route.
    pub fn caches_anything(&self) -> bool {
        self.any.load(Ordering::Acquire)
            && !self.table.read().expect("routes lock").caches.is_empty()
    }

    /// How answers called by `name` (a model or a route) are cached, if they are.
    pub fn cache_policy(&self, name: &str) -> Option<crate::cache::CachePolicy> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.table
            .read()
            .expect("routes lock")
            .caches
            .get(name)
            .cloned()
    }

    /// The running table.
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.table.read().expect("routes lock"))
    }

    /// Every running route.
    pub fn get_all(&self) -> Vec<Arc<Route>> {
        self.table().routes.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Route>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.table
            .read()
            .expect("routes lock")
            .routes
            .get(name)
            .cloned()
    }

    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }

    /// At the edge: when `req` names a route with a sticky header and `headers` carry it, its
    /// value goes with the request (as [`STICKY_CARRIER`]) to where the route is resolved,
    /// now or, for a task, in the worker.
    pub fn stick(&self, req: &mut ModelInferRequest, headers: &http::HeaderMap) {
        let Some(route) = self.get(&req.model_name) else {
            return;
        };
        let value = route
            .sticky_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok());
        if let Some(v) = value {
            req.parameters.insert(
                STICKY_CARRIER.into(),
                crate::proto::inference::InferParameter {
                    parameter_choice: Some(
                        crate::proto::inference::infer_parameter::ParameterChoice::StringParam(
                            v.into(),
                        ),
                    ),
                },
            );
        }
    }

    /// Sends a request named by a route to its target: by weight (or its sticky key), or to
    /// the route's fallback while the target's circuit is open, or when the target's recent
    /// latency says the request's `deadline` would pass before it answers. [`Use`] says
    /// whether the call goes to Triton now (its outcome told back through the [`Watch`]) or
    /// the breakers are only read.
    pub fn resolve(
        &self,
        req: &mut ModelInferRequest,
        used: Use,
        deadline: Option<Deadline>,
    ) -> Result<Routed, GatewayError> {
        let run = used == Use::Call;
        let Some(route) = self.get(&req.model_name) else {
            return Ok(Routed::default());
        };
        refuse_version(&route, &req.model_version)?;
        let i = route.pick_index(req);
        req.parameters.remove(STICKY_CARRIER);
        let picked = &route.targets[i];
        let mut watch = None;
        let target = match route.breaker(i) {
            None => picked,
            Some(b) => {
                let now = Instant::now();
                let mut admit = match (run, b.state(now)) {
                    (true, _) => b.admit(now),
                    (false, State::Closed) => Admit::Closed,
                    (false, _) => Admit::Open,
                };
                // Too slow for this caller: the fallback answers it, the target's state
                // untouched (only closed targets; a probe must measure).
                if admit == Admit::Closed
                    && route.fallback.is_some()
                    && let Some(d) = deadline
                    && b.expected(now).is_some_and(|e| now + e > d.instant())
                {
                    admit = Admit::Open;
                }
                metrics::metrics().breaker(&route.name, &picked.label(), b.state(now));
                match (admit, &route.fallback) {
                    (Admit::Open, Some(fallback)) => {
                        metrics::metrics().fallback(&route.name, fallback.label());
                        fallback
                    }
                    (Admit::Open, None) => {
                        return Err(GatewayError::Unavailable(format!(
                            "route '{}': '{}' is failing (its circuit is open) and the route has no fallback",
                            route.name,
                            picked.label()
                        )));
                    }
                    (how, _) => {
                        if run {
                            watch = Some(Watch {
                                breaker: Arc::clone(b),
                                admit: how,
                                fallback: route.fallback.clone(),
                                slo: route.slo,
                                started: now,
                                done: false,
                                route: route.name.clone(),
                                target: picked.label(),
                            });
                        }
                        picked
                    }
                }
            }
        };
        metrics::metrics().request(&route.name, target.label());
        req.model_name.clone_from(&target.model);
        req.model_version.clone_from(&target.version);
        let mut shadow = None;
        if let (true, Some(sh)) = (run, &route.shadow) {
            match sh.draw() {
                Some(Some(permit)) => {
                    shadow = Some(ShadowCall {
                        route: route.name.clone(),
                        target: sh.target.clone(),
                        permit,
                    });
                }
                Some(None) => metrics::metrics().shadow(&route.name, "dropped"),
                None => {}
            }
        }
        Ok(Routed { watch, shadow })
    }
}

/// A route picks its targets' versions itself.
pub fn refuse_version(route: &Route, version: &str) -> Result<(), GatewayError> {
    if version.is_empty() {
        return Ok(());
    }
    Err(GatewayError::invalid(format!(
        "model_version: '{}' is a route, which picks its targets' versions; send none",
        route.name
    )))
}
