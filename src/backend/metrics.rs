//! The pool's metrics of each endpoint (`infergate_triton_*`): what the balancer sees, the
//! calls sent, and each model's readiness there. Registered in the process's registry when
//! the pool is built.

use std::sync::{OnceLock, atomic::AtomicU64};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::telemetry::metrics::{EndpointLabel, EndpointModel, register};

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct PoolMetrics {
    pub endpoints: Gauge,
    pub calls: Family<EndpointLabel, Counter>,
    pub in_flight: Family<EndpointLabel, Gauge>,
    pub latency: Family<EndpointLabel, FloatGauge>,
    pub weight: Family<EndpointLabel, FloatGauge>,
    pub model_ready: Family<EndpointModel, Gauge>,
    /// Calls Triton never received, sent once more to another endpoint.
    pub retried: Counter,
    /// Endpoints that left discovery's answer and still have calls in flight.
    pub draining: Gauge,
    /// Lookups of a Triton name that failed (its endpoints were kept).
    pub resolve_failures: Counter,
}

/// This process's pool metrics.
pub fn metrics() -> &'static PoolMetrics {
    static M: OnceLock<PoolMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = PoolMetrics {
            endpoints: Gauge::default(),
            calls: Family::default(),
            in_flight: Family::default(),
            latency: Family::default(),
            weight: Family::default(),
            model_ready: Family::default(),
            retried: Counter::default(),
            draining: Gauge::default(),
            resolve_failures: Counter::default(),
        };
        register(
            "triton_endpoints",
            "Triton endpoints the pool knows",
            m.endpoints.clone(),
        );
        register(
            "triton_endpoint_calls",
            "Calls sent to each Triton endpoint",
            m.calls.clone(),
        );
        register(
            "triton_endpoint_in_flight",
            "Calls and streams in flight on each Triton endpoint (as of its last probe)",
            m.in_flight.clone(),
        );
        register(
            "triton_endpoint_latency_seconds",
            "Each Triton endpoint's latency average as the balancer sees it (peak-EWMA, as of its last probe)",
            m.latency.clone(),
        );
        register(
            "triton_endpoint_weight",
            "Each Triton endpoint's slow-start weight: the share of the calls it wins that it keeps, 1 outside slow start",
            m.weight.clone(),
        );
        register(
            "triton_model_ready",
            "A model's readiness on a Triton endpoint (1 ready), from the endpoint's repository index",
            m.model_ready.clone(),
        );
        register(
            "triton_retries",
            "Calls that a Triton endpoint never received (no connection, refused, past a GOAWAY), sent once more to another endpoint",
            m.retried.clone(),
        );
        register(
            "triton_endpoints_draining",
            "Triton endpoints that left the DNS answer and still have calls in flight",
            m.draining.clone(),
        );
        register(
            "triton_resolve_failures",
            "Lookups of a Triton name that failed (the name's endpoints were kept as they were)",
            m.resolve_failures.clone(),
        );
        m
    })
}

fn label(endpoint: &str) -> EndpointLabel {
    EndpointLabel {
        endpoint: endpoint.to_string(),
    }
}

impl PoolMetrics {
    /// The counter of calls sent to `endpoint`, to keep and bump on the hot path.
    pub fn calls(&self, endpoint: &str) -> Counter {
        self.calls.get_or_create(&label(endpoint)).clone()
    }

    /// An endpoint's balancer view, sampled by the probe.
    pub fn endpoint(&self, endpoint: &str, in_flight: usize, latency: f64, weight: f64) {
        let l = label(endpoint);
        self.in_flight.get_or_create(&l).set(in_flight as i64);
        self.latency.get_or_create(&l).set(latency);
        self.weight.get_or_create(&l).set(weight);
    }

    /// Drops a drained endpoint's series (those of `models` included), so pods that come
    /// and go over months do not leave a series each behind.
    pub fn forget(&self, endpoint: &str, models: impl IntoIterator<Item = String>) {
        let l = label(endpoint);
        self.calls.remove(&l);
        self.in_flight.remove(&l);
        self.latency.remove(&l);
        self.weight.remove(&l);
        let general = crate::telemetry::metrics::metrics();
        general.triton_up.remove(&l);
        for model in models {
            let m = EndpointModel {
                endpoint: endpoint.to_string(),
                model,
            };
            self.model_ready.remove(&m);
            general.triton_breaker_state.remove(&m);
        }
    }

    pub fn model_ready(&self, endpoint: &str, model: &str, ready: bool) {
        self.model_ready
            .get_or_create(&EndpointModel {
                endpoint: endpoint.to_string(),
                model: model.to_string(),
            })
            .set(i64::from(ready));
    }
}
