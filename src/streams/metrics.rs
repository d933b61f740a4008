//! The streams' metrics (`infergate_stream_*`), registered in the process's registry on first
//! use (the server does that at start).

use std::{sync::OnceLock, time::Duration};

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};

use crate::telemetry::metrics::{Hist, ModelLabel, register};

pub struct StreamMetrics {
    /// From the request's admission to its first response.
    pub first_response: Hist<ModelLabel>,
    /// Responses relayed per stream, and how long streams lasted.
    pub responses: Hist<ModelLabel>,
    pub duration: Hist<ModelLabel>,
    /// Streams that ended before their last response: the caller left, cancelled or ran out
    /// of time (Triton was told to stop).
    pub cancelled: Family<ModelLabel, Counter>,
    pub open: Family<ModelLabel, Gauge>,
}

fn seconds() -> Histogram {
    // 100 µs .. ~7 min, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 23))
}

fn counts() -> Histogram {
    // 1 .. ~1M responses, quadrupling.
    Histogram::new(exponential_buckets(1.0, 4.0, 11))
}

/// This process's stream metrics.
pub fn metrics() -> &'static StreamMetrics {
    static M: OnceLock<StreamMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = StreamMetrics {
            first_response: Family::new_with_constructor(seconds),
            responses: Family::new_with_constructor(counts),
            duration: Family::new_with_constructor(seconds),
            cancelled: Family::default(),
            open: Family::default(),
        };
        register(
            "stream_first_response_seconds",
            "Time from a streaming request's admission to its first response, by model",
            m.first_response.clone(),
        );
        register(
            "stream_responses",
            "Responses relayed per stream, by model",
            m.responses.clone(),
        );
        register(
            "stream_duration_seconds",
            "How long streams lasted, by model",
            m.duration.clone(),
        );
        register(
            "streams_cancelled",
            "Streams ended before their last response (caller left, cancelled or out of time), by model",
            m.cancelled.clone(),
        );
        register(
            "streams_open",
            "Streams in flight to Triton, by model",
            m.open.clone(),
        );
        m
    })
}

impl StreamMetrics {
    pub fn opened(&self, model: &str) {
        self.open.get_or_create(&label(model)).inc();
    }

    pub fn first(&self, model: &str, after: Duration) {
        self.first_response
            .get_or_create(&label(model))
            .observe(after.as_secs_f64());
    }

    /// A stream ended (`complete`: Triton sent its last response).
    pub fn closed(&self, model: &str, responses: u64, lasted: Duration, complete: bool) {
        let l = label(model);
        self.open.get_or_create(&l).dec();
        self.responses.get_or_create(&l).observe(responses as f64);
        self.duration
            .get_or_create(&l)
            .observe(lasted.as_secs_f64());
        if !complete {
            self.cancelled.get_or_create(&l).inc();
        }
    }
}

fn label(model: &str) -> ModelLabel {
    ModelLabel {
        model: model.to_string(),
    }
}
