//! `[batching]`: how the gateway batches each model's requests.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, in_range, invalid};

/// How the gateway batches a model's requests (see `batch/`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    /// Fixed window: wait up to `max_queue_delay_us` for a full batch, even a lone caller.
    On,
    /// Every request goes to Triton alone.
    Off,
    /// Window tuned from the observed arrival rate and Triton latency; a caller nobody else
    /// can join leaves at once (the default: sparse traffic never waits).
    #[default]
    Adaptive,
}

/// Bounds shared by the gateway-wide batching settings and each model's own.
const MAX_QUEUE_DELAY_US: u64 = 10_000_000;
const MAX_QUEUE_SIZE: u64 = 1 << 20;
const MAX_INFLIGHT: u64 = 1024;

/// Batching defaults for every model whose Triton config allows it; `[batching.models.NAME]`
/// overrides them per model (file only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Batching for models whose Triton config allows it.
    #[arg(long = "batching", env = "INFERGATE_BATCHING", value_enum, default_value_t = BatchMode::Adaptive)]
    pub mode: BatchMode,
    /// Longest wait for a fuller batch, in µs; unset: the model's Triton
    /// max_queue_delay_microseconds (`on`), or that and at least 2000 (`adaptive`, which
    /// waits only when company can come).
    #[arg(
        long = "batch-max-queue-delay-us",
        env = "INFERGATE_BATCH_MAX_QUEUE_DELAY_US",
        value_name = "US"
    )]
    pub max_queue_delay_us: Option<u64>,
    /// Requests waiting per model before new ones get RESOURCE_EXHAUSTED / 429.
    #[arg(
        long = "batch-max-queue-size",
        env = "INFERGATE_BATCH_MAX_QUEUE_SIZE",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_queue_size: usize,
    /// Batches of one model in flight per Triton endpoint; unset: one per instance of the
    /// model in its Triton config, plus one.
    #[arg(
        long = "batch-max-inflight",
        env = "INFERGATE_BATCH_MAX_INFLIGHT",
        value_name = "N"
    )]
    pub max_inflight_batches: Option<usize>,
    /// Priority levels (Triton's `priority` parameter: 1 is highest); at least the model's own.
    #[arg(
        long = "batch-priority-levels",
        env = "INFERGATE_BATCH_PRIORITY_LEVELS",
        value_name = "N",
        default_value_t = 2
    )]
    pub priority_levels: u32,
    /// Anti-starvation: a request that has waited this long (ms) goes before any newer one.
    #[arg(
        long = "batch-max-priority-wait-ms",
        env = "INFERGATE_BATCH_MAX_PRIORITY_WAIT_MS",
        value_name = "MS",
        default_value_t = 100
    )]
    pub max_priority_wait_ms: u64,
    /// Requests of one model inside infergate at once (batched or not), per instance; over
    /// it, sync calls get RESOURCE_EXHAUSTED / 429 and workers wait. 0 = no cap.
    #[arg(
        long = "batch-max-concurrent-requests",
        env = "INFERGATE_BATCH_MAX_CONCURRENT_REQUESTS",
        value_name = "N",
        default_value_t = 0
    )]
    pub max_concurrent_requests: usize,
    /// Per-model overrides, by model name.
    #[arg(skip)]
    pub models: std::collections::BTreeMap<String, ModelBatching>,
}

/// Overrides for one model; unset fields keep the global or Triton-derived value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelBatching {
    pub mode: Option<BatchMode>,
    /// Capped at the model's Triton max_batch_size.
    pub max_batch_size: Option<i64>,
    pub max_queue_delay_us: Option<u64>,
    pub preferred_batch_sizes: Option<Vec<i64>>,
    pub max_queue_size: Option<usize>,
    pub max_inflight_batches: Option<usize>,
    /// Overrides `batching.max_concurrent_requests` (0 = no cap).
    pub max_concurrent_requests: Option<usize>,
}

impl ModelBatching {
    fn validate(&self) -> Result<(), String> {
        if self.max_batch_size.is_some_and(|v| v < 1) {
            return Err("max_batch_size must be at least 1".into());
        }
        if self
            .max_queue_delay_us
            .is_some_and(|v| v > MAX_QUEUE_DELAY_US)
        {
            return Err("max_queue_delay_us is over 10 s".into());
        }
        if self
            .preferred_batch_sizes
            .as_ref()
            .is_some_and(|p| p.iter().any(|&x| x < 1))
        {
            return Err("preferred_batch_sizes must be positive".into());
        }
        // The gateway-wide bounds: a model's call slots become a semaphore's permits, which
        // have a hard maximum.
        for (name, value, max) in [
            ("max_queue_size", self.max_queue_size, MAX_QUEUE_SIZE),
            (
                "max_inflight_batches",
                self.max_inflight_batches,
                MAX_INFLIGHT,
            ),
        ] {
            if let Some(v) = value.filter(|&v| !(1..=max).contains(&(v as u64))) {
                return Err(format!("{name} {v} is outside 1..={max}"));
            }
        }
        Ok(())
    }
}

impl Section for BatchingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "batching", {
            max_queue_size: 1..=MAX_QUEUE_SIZE,
            priority_levels: 1..=64,
            max_priority_wait_ms: 1..=3_600_000,
        });
        in_range(
            "batching.max_queue_delay_us",
            self.max_queue_delay_us.unwrap_or(0),
            0,
            MAX_QUEUE_DELAY_US,
        )?;
        if let Some(v) = self.max_inflight_batches {
            in_range("batching.max_inflight_batches", v as u64, 1, MAX_INFLIGHT)?;
        }
        for (model, m) in &self.models {
            m.validate()
                .map_err(|what| invalid("batching.models", format!("model '{model}': {what}")))?;
        }
        Ok(())
    }
}

clap_defaults!(BatchingConfig);
