//! The external scaler's metrics (`infergate_scaler_*`), registered in the process's
//! registry on first use (the server does that at start).

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use crate::telemetry::metrics::register;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalerLabels {
    /// The ScaledObject, `namespace/name`.
    pub object: String,
    /// `queue`, `reactive`, `baseline` (each tier's ask) or `desired` (the answer).
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalerWinner {
    pub object: String,
    /// The tier that decided: `queue`, `reactive`, `baseline` or `min`.
    pub winner: &'static str,
}

pub struct ScalerMetrics {
    /// The external scaler's last answer per scaled object, and each tier's ask.
    pub replicas: Family<ScalerLabels, Gauge>,
    pub decisions: Family<ScalerWinner, Counter>,
}

/// This process's scaler metrics.
pub fn metrics() -> &'static ScalerMetrics {
    static M: OnceLock<ScalerMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = ScalerMetrics {
            replicas: Family::default(),
            decisions: Family::default(),
        };
        register(
            "scaler_replicas",
            "Replicas the external scaler asked for, per scaled object: each tier and the answer",
            m.replicas.clone(),
        );
        register(
            "scaler_decisions",
            "External scaler decisions, per scaled object and the tier that decided",
            m.decisions.clone(),
        );
        m
    })
}
