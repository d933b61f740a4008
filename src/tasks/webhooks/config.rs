//! `[webhooks]`: who may be called back, how it is signed, how long it is retried.

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid};

/// Completion webhooks: who may be called, how it is signed, and how long it is retried.
#[derive(Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Hosts a task's `callback_url` may name (comma-separated in the variable): `host`,
    /// `*.example.com`, an IP, or a network such as `10.1.0.0/16`. Private, loopback and
    /// link-local addresses are refused unless an entry names them (a host exactly, or its
    /// network). None: callbacks are refused.
    #[arg(
        long = "webhook-allow-host",
        env = "INFERGATE_WEBHOOK_ALLOW_HOSTS",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub allow_hosts: Vec<String>,
    /// The signing secret of tenants without their own (`auth.keys[].webhook_secret`):
    /// `whsec_<base64>` (Standard Webhooks) or 16+ characters. Prefer the variable or a file.
    #[arg(
        long = "webhook-secret",
        env = "INFERGATE_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// How long a delivery is retried (with backoff) before it is marked failed, in ms.
    #[arg(
        long = "webhook-retry-ms",
        env = "INFERGATE_WEBHOOK_RETRY_MS",
        value_name = "MS",
        default_value_t = 3_600_000
    )]
    pub retry_ms: u64,
    /// Longest pause between two tries of a delivery, in ms (the pause doubles from 500 ms).
    #[arg(
        long = "webhook-max-backoff-ms",
        env = "INFERGATE_WEBHOOK_MAX_BACKOFF_MS",
        value_name = "MS",
        default_value_t = 60_000
    )]
    pub max_backoff_ms: u64,
    /// Longest wait for one try's answer, in ms.
    #[arg(
        long = "webhook-timeout-ms",
        env = "INFERGATE_WEBHOOK_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,
    /// Tries in flight at once, per process.
    #[arg(
        long = "webhook-concurrency",
        env = "INFERGATE_WEBHOOK_CONCURRENCY",
        value_name = "N",
        default_value_t = 64
    )]
    pub concurrency: usize,
    /// Deliveries kept retrying at once, per process; past it a new one waits in the outbox
    /// (Redis task store) or is marked failed (in-memory store).
    #[arg(
        long = "webhook-max-pending",
        env = "INFERGATE_WEBHOOK_MAX_PENDING",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_pending: usize,
}

/// The secret never reaches logs.
impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("allow_hosts", &self.allow_hosts)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("retry_ms", &self.retry_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("concurrency", &self.concurrency)
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

impl Section for WebhooksConfig {
    fn redact(&mut self) {
        if self.secret.is_some() {
            self.secret = Some("<redacted>".into());
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "webhooks", {
            retry_ms: 0..=7 * 86_400_000u64,
            max_backoff_ms: 100..=3_600_000,
            timeout_ms: 100..=600_000,
            concurrency: 1..=10_000,
            max_pending: 1..=1_000_000,
        });
        for h in &self.allow_hosts {
            super::allow::AllowEntry::parse(h)
                .map_err(|m| invalid("webhooks.allow_hosts", format!("'{h}': {m}")))?;
        }
        if let Some(s) = &self.secret {
            crate::auth::secret_bytes(s).map_err(|m| invalid("webhooks.secret", m))?;
        }
        Ok(())
    }
}

clap_defaults!(WebhooksConfig);
