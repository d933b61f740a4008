//! `[scaler]`: KEDA's external scaler and its defaults.

use std::net::SocketAddr;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid};

/// KEDA's external scaler, served by the front ends on its own listener (see `scaler/`). Each
/// ScaledObject names its models and may override the replica bounds and capacities in its
/// trigger's metadata; these are the defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ScalerConfig {
    /// Listen address of KEDA's external scaler gRPC service; unset: not served.
    #[arg(
        long = "scaler-addr",
        env = "INFERGATE_SCALER_ADDR",
        value_name = "ADDR"
    )]
    pub addr: Option<SocketAddr>,
    /// Calls one Triton replica carries at once (sync calls and running tasks): the reactive
    /// tier asks for in-flight work / this.
    #[arg(
        long = "scaler-capacity-per-replica",
        env = "INFERGATE_SCALER_CAPACITY_PER_REPLICA",
        value_name = "N",
        default_value_t = 8
    )]
    pub capacity_per_replica: u32,
    /// Queued tasks one replica is given to work off: the event-driven tier asks for
    /// queued tasks / this.
    #[arg(
        long = "scaler-tasks-per-replica",
        env = "INFERGATE_SCALER_TASKS_PER_REPLICA",
        value_name = "N",
        default_value_t = 50
    )]
    pub tasks_per_replica: u32,
    /// Fewest replicas asked for (0 lets a pool scale to zero when nothing is asked of it).
    #[arg(
        long = "scaler-min-replicas",
        env = "INFERGATE_SCALER_MIN_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub min_replicas: u32,
    /// Most replicas asked for.
    #[arg(
        long = "scaler-max-replicas",
        env = "INFERGATE_SCALER_MAX_REPLICAS",
        value_name = "N",
        default_value_t = 16
    )]
    pub max_replicas: u32,
    /// The baseline tier keeps the peak of the last this many seconds as a floor.
    #[arg(
        long = "scaler-baseline-horizon-s",
        env = "INFERGATE_SCALER_BASELINE_HORIZON_S",
        value_name = "S",
        default_value_t = 10_800
    )]
    pub baseline_horizon_s: u64,
    /// Past the horizon a peak halves every this many seconds, so capacity is let go
    /// gradually rather than at once.
    #[arg(
        long = "scaler-baseline-half-life-s",
        env = "INFERGATE_SCALER_BASELINE_HALF_LIFE_S",
        value_name = "S",
        default_value_t = 1_800
    )]
    pub baseline_half_life_s: u64,
    /// Peaks are recorded per bucket of this many seconds (the baseline's resolution).
    #[arg(
        long = "scaler-baseline-bucket-s",
        env = "INFERGATE_SCALER_BASELINE_BUCKET_S",
        value_name = "S",
        default_value_t = 60
    )]
    pub baseline_bucket_s: u64,
    /// How often StreamIsActive looks again, in ms (a task accepted by this process for an
    /// idle model is pushed at once).
    #[arg(
        long = "scaler-stream-interval-ms",
        env = "INFERGATE_SCALER_STREAM_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 500
    )]
    pub stream_interval_ms: u64,
    /// How often each process shares its in-flight calls per model through Redis, in ms
    /// (with a Redis task store; a share not renewed for 5 intervals is dropped).
    #[arg(
        long = "scaler-share-interval-ms",
        env = "INFERGATE_SCALER_SHARE_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 1_000
    )]
    pub share_interval_ms: u64,
}

/// Bounds of the scaler's per-object numbers, for the flags and for a ScaledObject's
/// metadata alike.
pub const MAX_REPLICAS: u32 = 10_000;
pub const MAX_CAPACITY_PER_REPLICA: u32 = 1_000_000;
pub const MAX_TASKS_PER_REPLICA: u32 = 100_000_000;

impl Section for ScalerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "scaler", {
            capacity_per_replica: 1..=MAX_CAPACITY_PER_REPLICA,
            tasks_per_replica: 1..=MAX_TASKS_PER_REPLICA,
            max_replicas: 1..=MAX_REPLICAS,
            baseline_horizon_s: 0..=30 * 86_400,
            baseline_half_life_s: 1..=30 * 86_400,
            baseline_bucket_s: 1..=86_400,
            stream_interval_ms: 10..=600_000,
            share_interval_ms: 50..=600_000,
        });
        if self.min_replicas > self.max_replicas {
            return Err(invalid(
                "scaler.min_replicas",
                format!(
                    "{} is over scaler.max_replicas ({})",
                    self.min_replicas, self.max_replicas
                ),
            ));
        }
        Ok(())
    }
}

clap_defaults!(ScalerConfig);
