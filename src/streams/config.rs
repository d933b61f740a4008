//! `[streams]`: bounds on the responses of streaming (decoupled) models.

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Responses held for one client stream before a slow reader holds Triton back (HTTP/2
    /// flow control then slows the model's stream): memory per stream stays bounded.
    #[arg(
        long = "streams-buffer",
        env = "INFERGATE_STREAMS_BUFFER",
        value_name = "RESPONSES",
        default_value_t = 16
    )]
    pub buffer: usize,
    /// Requests of decoupled models streaming at once in this process; one more is refused
    /// with RESOURCE_EXHAUSTED (429).
    #[arg(
        long = "streams-max-open",
        env = "INFERGATE_STREAMS_MAX_OPEN",
        value_name = "STREAMS",
        default_value_t = 4096
    )]
    pub max_open: usize,
    /// Longest one request of a decoupled model may stream, in ms, when its caller set no
    /// shorter deadline; past it the request is cancelled in Triton and ends with
    /// DEADLINE_EXCEEDED.
    #[arg(
        long = "streams-max-duration-ms",
        env = "INFERGATE_STREAMS_MAX_DURATION_MS",
        value_name = "MS",
        default_value_t = 600_000
    )]
    pub max_duration_ms: u64,
    /// Responses `/generate` (one JSON answer) waits for before refusing a model that gives
    /// more than one; and the most one `/generate_stream` or ModelStreamInfer request may
    /// relay.
    #[arg(
        long = "streams-max-responses",
        env = "INFERGATE_STREAMS_MAX_RESPONSES",
        value_name = "RESPONSES",
        default_value_t = 1_000_000
    )]
    pub max_responses: u64,
}

impl Section for StreamsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "streams", {
            buffer: 1..=4096,
            max_open: 1..=1_000_000,
            max_duration_ms: 100..=86_400_000,
            max_responses: 1..=100_000_000,
        });
        Ok(())
    }
}

clap_defaults!(StreamsConfig);
