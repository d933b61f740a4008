//! The response cache's metrics (`infergate_cache_*`), registered in the process's registry
//! on first use (the server does that at start).

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use crate::telemetry::metrics::register;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub name: String,
    /// `hit` or `miss`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

pub struct CacheMetrics {
    /// Response cache lookups by the name called and result, its bytes and evictions.
    pub requests: Family<CacheLabels, Counter>,
    pub bytes: Gauge,
    pub evictions: Counter,
    /// Shared-cache (Redis) lookups and stores that failed or timed out.
    pub errors: Family<OpLabels, Counter>,
}

/// This process's cache metrics.
pub fn metrics() -> &'static CacheMetrics {
    static M: OnceLock<CacheMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = CacheMetrics {
            requests: Family::default(),
            bytes: Gauge::default(),
            evictions: Counter::default(),
            errors: Family::default(),
        };
        register(
            "cache_requests",
            "Response cache lookups by the model or route called and result (hit, miss)",
            m.requests.clone(),
        );
        register(
            "cache_bytes",
            "Bytes of answers the response cache holds",
            m.bytes.clone(),
        );
        register(
            "cache_evictions",
            "Answers the response cache dropped to stay under its bound",
            m.evictions.clone(),
        );
        register(
            "cache_errors",
            "Shared response cache (Redis) operations that failed or timed out, by operation",
            m.errors.clone(),
        );
        m
    })
}

impl CacheMetrics {
    /// `op`: `lookup` or `store`.
    pub fn error(&self, op: &'static str) {
        self.errors.get_or_create(&OpLabels { op }).inc();
    }

    pub fn request(&self, name: &str, result: &'static str) {
        self.requests
            .get_or_create(&CacheLabels {
                name: name.to_string(),
                result,
            })
            .inc();
    }
}
