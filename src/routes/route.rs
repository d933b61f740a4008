//! One route: its targets, weights and sticky parameter, and how a request picks a target.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::breaker::{Breaker, BreakerConfig};
use crate::proto::inference::{ModelInferRequest, infer_parameter::ParameterChoice};

/// One place a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub model: String,
    /// Empty: the version Triton's policy serves.
    pub version: String,
    pub weight: u32,
}

impl Target {
    /// `model` or `model:version`, as metrics and logs name it.
    pub fn label(&self) -> String {
        if self.version.is_empty() {
            self.model.clone()
        } else {
            format!("{}:{}", self.model, self.version)
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub targets: Vec<Target>,
    /// A request parameter whose value keeps a caller on one target.
    pub sticky_parameter: Option<String>,
    /// A header whose value keeps a caller on one target: the edge that reads it carries its
    /// value to the route in the request parameter [`STICKY_CARRIER`].
    pub sticky_header: Option<http::HeaderName>,
    /// Where a request goes when its target's circuit is open.
    pub fallback: Option<Target>,
    /// A call slower than this counts as a failure of its target.
    pub slo: Option<Duration>,
    /// One per target, when the route guards its targets (a fallback, an SLO or a breaker).
    breakers: Vec<Arc<Breaker>>,
    /// Where a share of the requests is also sent, its answer only compared.
    pub shadow: Option<Shadow>,
    total: u64,
}

/// A shadow target: `share` of the route's requests are also sent there, at most
/// `max_in_flight` at once (more are dropped and counted, never queued).
#[derive(Debug)]
pub struct Shadow {
    pub target: Target,
    pub share: f64,
    slots: Arc<Semaphore>,
}

impl Shadow {
    pub fn new(target: Target, share: f64, max_in_flight: usize) -> Self {
        Self {
            target,
            share,
            slots: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Whether this request is one of the share (`None`: not drawn), and a place for it
    /// (`Some(None)`: drawn, but every place is taken).
    pub fn draw(&self) -> Option<Option<OwnedSemaphorePermit>> {
        let point = (crate::spread::draw() >> 11) as f64 / (1u64 << 53) as f64;
        (point < self.share).then(|| Arc::clone(&self.slots).try_acquire_owned().ok())
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.name,
            &self.targets,
            &self.sticky_parameter,
            &self.sticky_header,
            &self.fallback,
            self.slo,
        ) == (
            &other.name,
            &other.targets,
            &other.sticky_parameter,
            &other.sticky_header,
            &other.fallback,
            other.slo,
        )
    }
}

impl Eq for Route {}

impl Route {
    pub fn new(name: String, targets: Vec<Target>, sticky_parameter: Option<String>) -> Self {
        let total = targets.iter().map(|t| u64::from(t.weight)).sum();
        Self {
            name,
            targets,
            sticky_parameter,
            sticky_header: None,
            fallback: None,
            slo: None,
            breakers: Vec::new(),
            shadow: None,
            total,
        }
    }

    /// Guards every target with a circuit breaker, sending to `fallback` while one is open.
    pub fn guarded(
        mut self,
        fallback: Option<Target>,
        slo: Option<Duration>,
        breaker: BreakerConfig,
    ) -> Self {
        self.breakers = self
            .targets
            .iter()
            .map(|_| Arc::new(Breaker::new(breaker.clone())))
            .collect();
        self.fallback = fallback;
        self.slo = slo;
        self
    }

    pub fn with_shadow(mut self, shadow: Shadow) -> Self {
        self.shadow = Some(shadow);
        self
    }

    /// The breaker of target `i`, when the route guards its targets.
    pub fn breaker(&self, i: usize) -> Option<&Arc<Breaker>> {
        self.breakers.get(i)
    }

    /// The target that answers metadata, config and readiness for the route: the heaviest
    /// (the first of equals), i.e. the version in production during a canary.
    pub fn primary(&self) -> &Target {
        self.targets
            .iter()
            .rev()
            .max_by_key(|t| t.weight)
            .expect("a loaded route has a target")
    }

    /// The target for a point in `0..total`, by index.
    fn at(&self, point: u64) -> usize {
        let mut left = point % self.total.max(1);
        for (i, t) in self.targets.iter().enumerate() {
            if left < u64::from(t.weight) {
                return i;
            }
            left -= u64::from(t.weight);
        }
        0
    }

    /// Where a request goes (an index into `targets`): by its sticky key's hash when it has
    /// one (the sticky header's value, else the sticky parameter's), else by a draw.
    pub fn pick_index(&self, req: &ModelInferRequest) -> usize {
        let from_header = self
            .sticky_header
            .as_ref()
            .and_then(|_| sticky_key(req, STICKY_CARRIER));
        match from_header.or_else(|| {
            self.sticky_parameter
                .as_ref()
                .and_then(|p| sticky_key(req, p))
        }) {
            Some(key) => self.at(fnv1a(&key)),
            None => self.at(crate::spread::draw()),
        }
    }

    pub fn pick(&self, req: &ModelInferRequest) -> &Target {
        &self.targets[self.pick_index(req)]
    }
}

pub use crate::call::STICKY_CARRIER;

/// A parameter's value as bytes (strings, integers and booleans; others are not keys).
fn sticky_key(req: &ModelInferRequest, name: &str) -> Option<Vec<u8>> {
    match req.parameters.get(name)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s.as_bytes().to_vec()),
        ParameterChoice::Int64Param(v) => Some(v.to_le_bytes().to_vec()),
        ParameterChoice::Uint64Param(v) => Some(v.to_le_bytes().to_vec()),
        ParameterChoice::BoolParam(b) => Some(vec![u8::from(*b)]),
        _ => None,
    }
}

/// Stable across processes and releases: a sticky caller stays on its arm whichever front
/// end answers, and after an upgrade.
fn fnv1a(bytes: &[u8]) -> u64 {
    crate::spread::stable_hash(&[bytes])
}

/// Routes by name, and how each cached model or route is cached.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteTable {
    pub routes: HashMap<String, Arc<Route>>,
    pub caches: HashMap<String, crate::cache::CachePolicy>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::InferParameter;

    fn route(weights: &[u32]) -> Route {
        Route::new(
            "r".into(),
            weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Target {
                    model: format!("m{i}"),
                    version: String::new(),
                    weight: w,
                })
                .collect(),
            Some("user".into()),
        )
    }

    fn with_user(user: &str) -> ModelInferRequest {
        let mut req = ModelInferRequest::default();
        req.parameters.insert(
            "user".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(user.into())),
            },
        );
        req
    }

    #[test]
    fn weights_split_the_draws_and_keys_stick() {
        let r = route(&[90, 10]);
        let n = 100_000;
        let canary = (0..n)
            .filter(|_| r.pick(&ModelInferRequest::default()).model == "m1")
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.01, "{share}");
        // Sticky: the same key, the same arm, every time; keys spread by weight too.
        let mut on_canary = 0;
        for u in 0..10_000 {
            let key = format!("user-{u}");
            let first = r.pick(&with_user(&key)).model.clone();
            assert!((0..5).all(|_| r.pick(&with_user(&key)).model == first));
            on_canary += usize::from(first == "m1");
        }
        assert!(
            (on_canary as f64 / 10_000.0 - 0.10).abs() < 0.015,
            "{on_canary}"
        );
        assert_eq!(r.primary().model, "m0");
        assert_eq!(
            route(&[50, 50]).primary().model,
            "m0",
            "the first of equals"
        );
        assert_eq!(
            route(&[0, 1]).pick(&ModelInferRequest::default()).model,
            "m1"
        );
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: a change would move sticky callers to another arm after an upgrade.
        assert_eq!(fnv1a(b"user-1"), fnv1a(b"user-1"));
        assert_eq!(fnv1a(b""), 0xecba_3df2_c338_3c52);
    }
}
