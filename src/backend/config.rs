//! `[triton]`: the Triton servers behind infergate and how they are reached.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{
    section::{ConfigError, Section, bounds, clap_defaults, invalid, validate_url},
    tls::TritonTls,
};

/// How a call's endpoint is chosen among those that hold its model.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Balance {
    /// Two endpoints drawn at random; the call goes to the one whose recent latency (a
    /// moving average that jumps to a slower call at once) times its calls in flight is
    /// lower: Finagle's and Linkerd's peak-EWMA.
    #[default]
    PeakEwma,
    /// Each endpoint in turn, whatever its latency or load (a baseline).
    RoundRobin,
}

/// The Triton servers behind infergate and how they are reached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TritonConfig {
    /// gRPC endpoint of a Triton server (`http://host:port`). Repeat for several
    /// (comma-separated in the variable).
    #[arg(long = "triton-url", env = "INFERGATE_TRITON_URL", value_delimiter = ',', value_name = "URL", default_values_t = [String::from("http://127.0.0.1:8001")])]
    pub urls: Vec<String>,
    /// Timeout for connecting to Triton, in ms.
    #[arg(
        long = "triton-connect-timeout-ms",
        env = "INFERGATE_TRITON_CONNECT_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 2_000
    )]
    pub connect_timeout_ms: u64,
    /// Upper bound on one call to Triton, in ms (a shorter client deadline wins).
    #[arg(
        long = "triton-request-timeout-ms",
        env = "INFERGATE_TRITON_REQUEST_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub request_timeout_ms: u64,
    /// Interval of the readiness probe of each Triton endpoint, in ms.
    #[arg(
        long = "triton-health-interval-ms",
        env = "INFERGATE_TRITON_HEALTH_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 1_000
    )]
    pub health_interval_ms: u64,
    /// Timeout of one readiness probe, in ms.
    #[arg(
        long = "triton-probe-timeout-ms",
        env = "INFERGATE_TRITON_PROBE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 1_000
    )]
    pub probe_timeout_ms: u64,
    /// HTTP/2 connections kept to each Triton endpoint; calls are spread over them.
    #[arg(
        long = "triton-connections",
        env = "INFERGATE_TRITON_CONNECTIONS",
        value_name = "N",
        default_value_t = 2
    )]
    pub connections_per_endpoint: usize,
    /// How long model metadata and config stay cached before they are fetched again, in ms.
    #[arg(
        long = "model-cache-ttl-ms",
        env = "INFERGATE_MODEL_CACHE_TTL_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub model_cache_ttl_ms: u64,
    /// Interval at which Triton's statistics (its queue time per model) are read into the
    /// metrics, in ms; 0 = never.
    #[arg(
        long = "triton-stats-interval-ms",
        env = "INFERGATE_TRITON_STATS_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub stats_interval_ms: u64,
    /// Models that must be ready on Triton for /readyz (comma-separated in the variable);
    /// none: the server's readiness alone.
    #[arg(
        long = "ready-model",
        env = "INFERGATE_READY_MODELS",
        value_delimiter = ',',
        value_name = "MODEL"
    )]
    pub ready_models: Vec<String>,
    /// With several endpoints: a model's calls leave an endpoint after this many failures in
    /// a row there (or half its calls failing over 10 s), while another endpoint serves the
    /// model; 0: never.
    #[arg(
        long = "triton-breaker-failures",
        env = "INFERGATE_TRITON_BREAKER_FAILURES",
        value_name = "N",
        default_value_t = 5
    )]
    pub breaker_failures: u32,
    /// How long a model's calls stay away from an endpoint whose circuit opened, in ms; then
    /// three probe calls decide.
    #[arg(
        long = "triton-breaker-cooldown-ms",
        env = "INFERGATE_TRITON_BREAKER_COOLDOWN_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub breaker_cooldown_ms: u64,
    /// How a call's endpoint is chosen: peak_ewma or round_robin.
    #[arg(long = "triton-balance", env = "INFERGATE_TRITON_BALANCE", value_enum, default_value_t = Balance::PeakEwma)]
    pub balance: Balance,
    /// How fast an endpoint's latency average forgets, in ms: a sample this old weighs 1/e.
    /// An endpoint that gets no calls looks cheaper over this time, so a recovered one is
    /// tried again.
    #[arg(
        long = "triton-ewma-decay-ms",
        env = "INFERGATE_TRITON_EWMA_DECAY_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub ewma_decay_ms: u64,
    /// Slow start, in ms: an endpoint that becomes ready takes a share of calls that grows
    /// from 10 % to all of its share over this window, so a cold server is not flooded; 0:
    /// off.
    #[arg(
        long = "triton-slow-start-ms",
        env = "INFERGATE_TRITON_SLOW_START_MS",
        value_name = "MS",
        default_value_t = 0
    )]
    pub slow_start_ms: u64,
    /// A Triton URL whose host is a name (say, a headless Service) stands for every address
    /// the name resolves to: one endpoint each, resolved again at this interval (in ms) and
    /// soon after an endpoint fails; endpoints that leave the answer are drained. 0: the name
    /// is connected to as one endpoint and never looked up again.
    #[arg(
        long = "triton-resolve-interval-ms",
        env = "INFERGATE_TRITON_RESOLVE_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub resolve_interval_ms: u64,
    /// The DNS server (`ip:port`) that resolves Triton names; unset: the system's
    /// (/etc/resolv.conf and /etc/hosts).
    #[arg(
        long = "triton-dns-server",
        env = "INFERGATE_TRITON_DNS_SERVER",
        value_name = "IP:PORT"
    )]
    pub dns_server: Option<String>,
    /// TLS towards Triton, for `https://` URLs.
    #[command(flatten)]
    pub tls: TritonTls,
}

impl TritonConfig {
    /// TLS towards Triton, when it is configured.
    pub fn tls(&self) -> Option<&TritonTls> {
        self.tls.enabled().then_some(&self.tls)
    }
}

impl Section for TritonConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(invalid(
                "triton.urls",
                "at least one Triton gRPC URL is needed",
            ));
        }
        for url in &self.urls {
            validate_url("triton.urls", url, "http://127.0.0.1:8001")?;
        }
        bounds!(self, "triton", {
            connect_timeout_ms: 1..=600_000,
            request_timeout_ms: 1..=86_400_000,
            health_interval_ms: 10..=3_600_000,
            probe_timeout_ms: 1..=600_000,
            connections_per_endpoint: 1..=64,
            stats_interval_ms: 0..=86_400_000,
            breaker_failures: 0..=10_000,
            breaker_cooldown_ms: 1..=3_600_000,
            model_cache_ttl_ms: 0..=86_400_000,
            ewma_decay_ms: 1..=3_600_000,
            slow_start_ms: 0..=3_600_000,
            resolve_interval_ms: 0..=3_600_000,
        });
        if (1..100).contains(&self.resolve_interval_ms) {
            return Err(invalid(
                "triton.resolve_interval_ms",
                "must be 0 (never) or at least 100 ms",
            ));
        }
        if let Some(dns) = &self.dns_server
            && dns.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "triton.dns_server",
                "must be an IP address and port, such as 10.96.0.10:53",
            ));
        }
        let https = self
            .urls
            .iter()
            .filter(|u| u.starts_with("https://"))
            .count();
        match self.tls() {
            None if https > 0 => Err(invalid(
                "triton.tls.ca",
                "https:// Triton URLs need the CA that signed Triton's certificate",
            )),
            Some(_) if https < self.urls.len() => Err(invalid(
                "triton.urls",
                "with triton.tls set, every Triton URL must be https://",
            )),
            Some(tls) => tls.validate(),
            None => Ok(()),
        }
    }
}

clap_defaults!(TritonConfig);
