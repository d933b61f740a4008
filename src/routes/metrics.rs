//! The routes' metrics (`infergate_route_*`): requests per target, fallbacks, breakers,
//! shadows and reloads, registered in the process's registry on first use (the server does
//! that at start).

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

use crate::{
    breaker::State,
    telemetry::metrics::{Hist, ResultLabel, register},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    /// `model` or `model:version`.
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResult {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteName {
    pub route: String,
}

fn shadow_diff() -> Histogram {
    Histogram::new([0.0, 1e-6, 1e-4, 1e-2, 1.0, 100.0])
}

pub struct RouteMetrics {
    /// Requests sent through each route, by the target chosen.
    pub requests: Family<RouteLabels, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    /// Requests a route sent to its fallback (by the fallback), and each target's breaker.
    pub fallbacks: Family<RouteLabels, Counter>,
    pub breaker_state: Family<RouteLabels, Gauge>,
    /// Shadow calls by outcome, their comparisons, and the largest difference per call.
    pub shadow: Family<RouteResult, Counter>,
    pub shadow_compared: Family<RouteResult, Counter>,
    pub shadow_max_abs_diff: Hist<RouteName>,
}

/// This process's route metrics.
pub fn metrics() -> &'static RouteMetrics {
    static M: OnceLock<RouteMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = RouteMetrics {
            requests: Family::default(),
            reloads: Family::default(),
            fallbacks: Family::default(),
            breaker_state: Family::default(),
            shadow: Family::default(),
            shadow_compared: Family::default(),
            shadow_max_abs_diff: Family::new_with_constructor(shadow_diff),
        };
            register(
                "route_requests",
                "Requests sent through a route, by route and the target chosen",
                m.requests.clone(),
            );
            register(
                "route_reloads",
                "Reloads of the routes file on SIGHUP, by result (ok, refused)",
                m.reloads.clone(),
            );
            register(
                "route_fallbacks",
                "Requests a route sent to its fallback because the target's circuit was open",
                m.fallbacks.clone(),
            );
            register(
                "route_breaker_state",
                "Circuit breaker of each route target: 0 closed, 1 open, 2 half-open",
                m.breaker_state.clone(),
            );
            register(
                "route_shadow",
                "Shadow calls of a route by result: sent, dropped (every place taken), failed",
                m.shadow.clone(),
            );
            register(
                "route_shadow_compared",
                "Shadow answers compared with the primary's: match (same bytes) or mismatch",
                m.shadow_compared.clone(),
            );
            register(
                "route_shadow_max_abs_diff",
                "Largest absolute difference between a shadow's numeric outputs and the primary's, per call",
                m.shadow_max_abs_diff.clone(),
            );
        m
    })
}

impl RouteMetrics {
    /// `fallback`: as [`crate::routes::Target::label`] names it.
    pub fn fallback(&self, route: &str, fallback: String) {
        self.fallbacks
            .get_or_create(&RouteLabels {
                route: route.to_string(),
                target: fallback,
            })
            .inc();
    }

    pub fn breaker(&self, route: &str, target: &str, state: State) {
        self.breaker_state
            .get_or_create(&RouteLabels {
                route: route.to_string(),
                target: target.to_string(),
            })
            .set(state.gauge());
    }

    pub fn shadow(&self, route: &str, result: &'static str) {
        self.shadow
            .get_or_create(&RouteResult {
                route: route.to_string(),
                result,
            })
            .inc();
    }

    /// A shadow answer compared with its primary's.
    pub fn shadow_compared(&self, route: &str, exact: bool, max_abs_diff: Option<f64>) {
        self.shadow_compared
            .get_or_create(&RouteResult {
                route: route.to_string(),
                result: if exact { "match" } else { "mismatch" },
            })
            .inc();
        if let Some(d) = max_abs_diff {
            self.shadow_max_abs_diff
                .get_or_create(&RouteName {
                    route: route.to_string(),
                })
                .observe(d);
        }
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// `target`: as [`crate::routes::Target::label`] names it.
    pub fn request(&self, route: &str, target: String) {
        self.requests
            .get_or_create(&RouteLabels {
                route: route.to_string(),
                target,
            })
            .inc();
    }
}
