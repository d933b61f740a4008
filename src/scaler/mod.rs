//! Autoscaling that sees demand before GPUs are needed: KEDA's external scaler, served by the
//! front ends on `scaler.addr`. Each ScaledObject (Triton's Deployment, the workers) names its
//! models in its trigger's metadata; the answer is the replicas it should have, the max of
//! three tiers clipped to its bounds:
//!
//! 1. **queue**: tasks accepted and not started, from the task store;
//! 2. **reactive**: sync calls and tasks being run, summed over every process;
//! 3. **baseline**: the peak of the first two over the recent horizon, decaying after it.
//!
//! It runs on the front ends rather than in a Deployment of its own: they already hold the
//! task store and the in-flight counts, and with Redis every front end answers alike (peaks
//! and counts are shared there), so KEDA may ask any of them through the Service. With the
//! embedded default there is one process, whose own counts are the whole demand.

pub mod config;
pub mod decide;
pub mod demand;
pub mod metrics;
pub mod peaks;
pub mod peaks_redis;
pub mod service;
pub mod start;

pub use crate::telemetry::activity::Activity;
pub use decide::{Decision, Demand, Peak, Policy, Tier};
pub use demand::{SharedInFlight, Signals};
pub use service::{ModelCheck, Scaler};
