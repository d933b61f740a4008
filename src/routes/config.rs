//! `[routes]`: where the routes file is and how often it is read again.

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults};

/// Model routes (see `routes/`): names clients call as models, split over models by weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct RoutesConfig {
    /// TOML file of model routes, read at start and again on SIGHUP (a file that does not
    /// load is refused and the running routes stay); unset: no routes.
    #[arg(
        long = "routes-file",
        env = "INFERGATE_ROUTES_FILE",
        value_name = "FILE"
    )]
    pub file: Option<PathBuf>,
    /// Also read the routes file again when its content changes, looked at every this many
    /// ms (how a Kubernetes ConfigMap update arrives); 0: on SIGHUP only.
    #[arg(
        long = "routes-watch-ms",
        env = "INFERGATE_ROUTES_WATCH_MS",
        value_name = "MS",
        default_value_t = 0
    )]
    pub watch_ms: u64,
}

impl Section for RoutesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "routes", { watch_ms: 0..=3_600_000 });
        Ok(())
    }
}

clap_defaults!(RoutesConfig);
