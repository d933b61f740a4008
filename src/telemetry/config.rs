//! `[log]` and `[telemetry]`: log format and level, trace export.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid, validate_url};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Log format.
    #[arg(long = "log-format", env = "INFERGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
    /// Log filter, e.g. `info` or `infergate=debug,tower=warn`.
    #[arg(
        long = "log-level",
        env = "INFERGATE_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub level: String,
}

/// OpenTelemetry tracing. Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317; unset: no spans are
    /// exported and no trace context is sent to Triton.
    #[arg(long, env = "INFERGATE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded, 0.0..=1.0; a sampled incoming `traceparent` is followed.
    #[arg(
        long = "trace-sample-ratio",
        env = "INFERGATE_TRACE_SAMPLE_RATIO",
        value_name = "RATIO",
        default_value_t = 1.0
    )]
    pub sample_ratio: f64,
    /// service.name of the exported spans.
    #[arg(
        long,
        env = "INFERGATE_SERVICE_NAME",
        value_name = "NAME",
        default_value = "infergate"
    )]
    pub service_name: String,
    /// Spans buffered for export; more are dropped (never blocking a request).
    // batching has a max_queue_size too, so this flag's id spells the whole path.
    #[arg(
        id = "telemetry.max_queue_size",
        long = "trace-max-queue-size",
        env = "INFERGATE_TRACE_MAX_QUEUE_SIZE",
        value_name = "N",
        default_value_t = 4096
    )]
    pub max_queue_size: usize,
}

impl Section for LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| invalid("log.level", e.to_string()))
    }
}

impl Section for TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.otlp_endpoint {
            validate_url("telemetry.otlp_endpoint", url, "http://127.0.0.1:4317")?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("{} is outside 0.0..=1.0", self.sample_ratio),
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        bounds!(self, "telemetry", { max_queue_size: 1..=1 << 20 });
        Ok(())
    }
}

clap_defaults!(LogConfig, TelemetryConfig);
