//! `[fleet]`: how infergate acts on every Triton endpoint at once.

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Longest a model load or unload may take on one endpoint, in ms (a large model loads
    /// for minutes); past it that endpoint's outcome is DEADLINE_EXCEEDED.
    #[arg(
        long = "fleet-control-timeout-ms",
        env = "INFERGATE_FLEET_CONTROL_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 300_000
    )]
    pub control_timeout_ms: u64,
}

impl Section for FleetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "fleet", {
            control_timeout_ms: 100..=3_600_000,
        });
        Ok(())
    }
}

clap_defaults!(FleetConfig);
