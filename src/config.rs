//! Typed configuration, each setting named once: its field below carries its meaning (the doc
//! comment, which is also its `--help`), its flag, its environment variable and its default.
//! Layers: built-in defaults, then TOML files (`--config`, repeatable), then `INFERGATE_*`
//! variables and flags (clap merges those two, flags winning). Each section checks its own
//! values beside its type; [`Config::validate`] runs them all once at start, and a bad value
//! is refused with a message naming the setting.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{
    Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches, ValueEnum, parser::ValueSource,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Every setting. Its defaults are clap's (see [`defaults`]), so `Config::default()`, the file's
/// missing keys and `--help` all read the same attribute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    #[command(flatten, next_help_heading = "Listeners")]
    pub server: ServerConfig,
    #[command(flatten, next_help_heading = "Triton")]
    pub triton: TritonConfig,
    #[command(flatten, next_help_heading = "Batching")]
    pub batching: BatchingConfig,
    #[command(flatten, next_help_heading = "Tasks")]
    pub tasks: TasksConfig,
    #[command(flatten, next_help_heading = "Completion webhooks")]
    pub webhooks: WebhooksConfig,
    #[command(flatten, next_help_heading = "Logs")]
    pub log: LogConfig,
    #[command(flatten, next_help_heading = "Traces")]
    pub telemetry: TelemetryConfig,
    #[command(flatten, next_help_heading = "Autoscaling (KEDA external scaler)")]
    pub scaler: ScalerConfig,
    #[command(flatten, next_help_heading = "Routes")]
    pub routes: RoutesConfig,
    #[command(flatten, next_help_heading = "Response cache")]
    pub cache: CacheConfig,
    /// Keys and tenants live in files only (a Secret), never on a command line.
    #[arg(skip)]
    pub auth: AuthConfig,
}

/// A section's defaults: what clap gives it with no flag and no variable.
fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(Command::new("defaults")).mut_args(|a| a.env(None::<&'static str>));
    let m = cmd
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default or is optional");
    T::from_arg_matches(&m).expect("defaults parse into their own types")
}

macro_rules! clap_defaults {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                defaults()
            }
        }
    )*};
}
clap_defaults!(
    Config,
    ServerConfig,
    ServerTls,
    TritonConfig,
    TritonTls,
    BatchingConfig,
    TasksConfig,
    WebhooksConfig,
    LogConfig,
    TelemetryConfig,
    ScalerConfig,
    RoutesConfig,
    CacheConfig
);

/// Range checks that name the setting by its section and field, so the name is not written a
/// second time: `bounds!(self, "server", { max_request_bytes: 1024..=2 << 30 })`.
macro_rules! bounds {
    ($s:expr, $section:literal, { $($field:ident: $lo:literal ..= $hi:expr),* $(,)? }) => {
        $( in_range(
            concat!($section, ".", stringify!($field)),
            $s.$field as u64,
            $lo,
            ($hi) as u64,
        )?; )*
    };
}

fn in_range(field: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(invalid(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// [server]

/// The listeners: addresses, sizes, streams, threads and TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address of the gRPC API (Open Inference Protocol, health, reflection).
    #[arg(
        long,
        env = "INFERGATE_GRPC_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub grpc_addr: SocketAddr,
    /// Listen address of the HTTP/JSON API.
    #[arg(
        long,
        env = "INFERGATE_HTTP_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// Largest accepted request (HTTP body or gRPC message), in bytes.
    #[arg(long, env = "INFERGATE_MAX_REQUEST_BYTES", value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
    /// Largest response accepted from Triton, in bytes.
    #[arg(long, env = "INFERGATE_MAX_RESPONSE_BYTES", value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_response_bytes: usize,
    /// Grace period for in-flight requests after SIGTERM, in ms.
    #[arg(
        long,
        env = "INFERGATE_SHUTDOWN_GRACE_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// HTTP/2 streams one gRPC client connection may have open.
    #[arg(
        long,
        env = "INFERGATE_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,
    /// Requests of one ModelStreamInfer stream that run at once (answers keep request order).
    #[arg(
        long,
        env = "INFERGATE_STREAM_CONCURRENCY",
        value_name = "N",
        default_value_t = 16
    )]
    pub stream_concurrency: usize,
    /// Threads serving gRPC connections, each connection on one of them with its own Triton
    /// connections; 0 = one per CPU the process may use.
    #[arg(
        long,
        env = "INFERGATE_GRPC_THREADS",
        value_name = "N",
        default_value_t = 0
    )]
    pub grpc_threads: usize,
    /// TLS on both listeners; plaintext unless a certificate is named.
    #[command(flatten)]
    pub tls: ServerTls,
}

/// The most gRPC serving threads `server.grpc_threads` may ask for.
pub const MAX_GRPC_THREADS: usize = 256;

impl ServerConfig {
    /// `grpc_threads` with 0 resolved to the CPUs this process may use (cgroup quotas
    /// included, as the runtime's own sizing does).
    pub fn grpc_threads(&self) -> usize {
        match self.grpc_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_GRPC_THREADS),
            n => n,
        }
    }

    /// The listeners' certificates, when TLS is on.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.enabled().then_some(&self.tls)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr == self.http_addr && self.grpc_addr.port() != 0 {
            return Err(invalid(
                "server.http_addr",
                format!("{} is also the gRPC address", self.http_addr),
            ));
        }
        bounds!(self, "server", {
            max_request_bytes: 1024..=2u64 << 30,
            max_response_bytes: 1024..=4u64 << 30,
            shutdown_grace_ms: 0..=3_600_000,
            max_concurrent_streams: 1..=1 << 20,
            stream_concurrency: 1..=4096,
            grpc_threads: 0..=MAX_GRPC_THREADS,
        });
        self.tls.validate()
    }
}

/// Certificates of the two listeners (PEM files, read at start).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first: serve both APIs over TLS (with the key).
    #[arg(long = "tls-cert", env = "INFERGATE_TLS_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long = "tls-key", env = "INFERGATE_TLS_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS).
    #[arg(
        long = "tls-client-ca",
        env = "INFERGATE_TLS_CLIENT_CA",
        value_name = "FILE"
    )]
    pub client_ca: Option<PathBuf>,
    /// A client that has not finished its TLS handshake by then is dropped, in ms.
    #[arg(
        long = "tls-handshake-timeout-ms",
        env = "INFERGATE_TLS_HANDSHAKE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once on each listener; more connections wait.
    #[arg(
        long = "tls-max-handshakes",
        env = "INFERGATE_TLS_MAX_HANDSHAKES",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_handshakes: usize,
}

impl ServerTls {
    /// TLS is on once any of its files is named (then certificate and key are both needed).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        readable("server.tls.cert", self.cert.as_deref())?;
        readable("server.tls.key", self.key.as_deref())?;
        if let Some(ca) = &self.client_ca {
            readable("server.tls.client_ca", Some(ca))?;
        }
        bounds!(self, "server.tls", {
            handshake_timeout_ms: 1..=600_000,
            max_handshakes: 1..=65_536,
        });
        Ok(())
    }
}

/// A PEM file that is named must be there; what is in it is checked when it is loaded.
fn readable(field: &'static str, path: Option<&Path>) -> Result<(), ConfigError> {
    let path = path.ok_or_else(|| invalid(field, "is required"))?;
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(field, format!("cannot read '{}': {e}", path.display())))
}

// ---------------------------------------------------------------------------------------------
// [triton]

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
    /// TLS towards Triton, for `https://` URLs.
    #[command(flatten)]
    pub tls: TritonTls,
}

impl TritonConfig {
    /// TLS towards Triton, when it is configured.
    pub fn tls(&self) -> Option<&TritonTls> {
        self.tls.enabled().then_some(&self.tls)
    }

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
        });
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

/// TLS towards Triton (used for `https://` Triton URLs). Its certificate and key share
/// their field names with the listeners' own, so their flag ids spell the whole path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TritonTls {
    /// PEM CA bundle that signed Triton's certificate (for https:// Triton URLs).
    #[arg(long = "triton-ca", env = "INFERGATE_TRITON_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate towards Triton, for its `--grpc-use-ssl-mutual` (with the key).
    #[arg(
        id = "triton.tls.cert",
        long = "triton-cert",
        env = "INFERGATE_TRITON_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key of that client certificate.
    #[arg(
        id = "triton.tls.key",
        long = "triton-key",
        env = "INFERGATE_TRITON_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
    /// Name to check Triton's certificate against, when not the URL's host.
    #[arg(
        long = "triton-domain",
        env = "INFERGATE_TRITON_DOMAIN",
        value_name = "NAME"
    )]
    pub domain: Option<String>,
}

impl TritonTls {
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        readable("triton.tls.ca", self.ca.as_deref())?;
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                readable("triton.tls.cert", Some(c))?;
                readable("triton.tls.key", Some(k))
            }
            (None, None) => Ok(()),
            _ => Err(invalid(
                "triton.tls.cert",
                "a client certificate needs its key, and a key its certificate",
            )),
        }
    }
}

fn validate_url(field: &'static str, url: &str, example: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(field, format!("'{url}' is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid(
            field,
            format!("'{url}' must start with http:// or https://"),
        ));
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(invalid(
            field,
            format!("'{url}' needs a host and a port, e.g. {example}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// [batching]

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

impl BatchingConfig {
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

// ---------------------------------------------------------------------------------------------
// [webhooks]

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

impl WebhooksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "webhooks", {
            retry_ms: 0..=7 * 86_400_000u64,
            max_backoff_ms: 100..=3_600_000,
            timeout_ms: 100..=600_000,
            concurrency: 1..=10_000,
            max_pending: 1..=1_000_000,
        });
        for h in &self.allow_hosts {
            crate::tasks::webhooks::allow::AllowEntry::parse(h)
                .map_err(|m| invalid("webhooks.allow_hosts", format!("'{h}': {m}")))?;
        }
        if let Some(s) = &self.secret {
            crate::tasks::webhooks::allow::secret_bytes(s)
                .map_err(|m| invalid("webhooks.secret", m))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// [tasks]

/// The async path: broker, task store, workers and their bounds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Task broker: `memory` (in-process), `redis://host:port[/db]` (Redis Streams) or
    /// `amqp://user:pass@host:port/%2f` (RabbitMQ).
    #[arg(long, env = "INFERGATE_BROKER", value_name = "URL", default_value_t = BrokerUrl::Memory)]
    pub broker: BrokerUrl,
    /// Task store: `memory` or `redis://host:port[/db]`.
    #[arg(long, env = "INFERGATE_TASK_STORE", value_name = "URL", default_value_t = StoreUrl::Memory)]
    pub task_store: StoreUrl,
    /// Worker loops inside `serve`; 0 = API only (tasks then need `infergate worker`).
    #[arg(long, env = "INFERGATE_WORKERS", value_name = "N", default_value_t = 1)]
    pub workers: usize,
    /// Tasks one worker loop runs at once.
    #[arg(
        long,
        env = "INFERGATE_WORKER_CONCURRENCY",
        value_name = "N",
        default_value_t = 256
    )]
    pub worker_concurrency: usize,
    /// Attempts before a task fails and its message is dead-lettered.
    #[arg(
        long = "task-max-attempts",
        env = "INFERGATE_TASK_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 3
    )]
    pub max_attempts: u32,
    /// Dead-lettered tasks kept for inspection and replay; past it the oldest is dropped
    /// (counted).
    #[arg(
        long,
        env = "INFERGATE_DEAD_LETTER_MAX",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub dead_letter_max: usize,
    /// How long a dead letter is kept, in ms (7 days by default).
    #[arg(
        long,
        env = "INFERGATE_DEAD_LETTER_TTL_MS",
        value_name = "MS",
        default_value_t = 604_800_000
    )]
    pub dead_letter_ttl_ms: u64,
    /// How long task records and results are kept, in ms.
    #[arg(
        long = "task-ttl-ms",
        env = "INFERGATE_TASK_TTL_MS",
        value_name = "MS",
        default_value_t = 3_600_000
    )]
    pub ttl_ms: u64,
    /// Largest result stored, in bytes (a bigger one fails its task with RESOURCE_EXHAUSTED).
    #[arg(long = "task-max-result-bytes", env = "INFERGATE_TASK_MAX_RESULT_BYTES", value_name = "BYTES", default_value_t = 16 << 20)]
    pub max_result_bytes: usize,
    /// Tasks waiting in the broker before submissions get 429.
    #[arg(
        long,
        env = "INFERGATE_QUEUE_CAPACITY",
        value_name = "N",
        default_value_t = 100_000
    )]
    pub queue_capacity: u64,
    /// Redis broker: a pending message idle this long (ms) is reclaimed from its (dead)
    /// consumer.
    #[arg(
        long,
        env = "INFERGATE_VISIBILITY_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub visibility_timeout_ms: u64,
    /// RabbitMQ broker: concurrent submissions that may share one message (1: one message
    /// per task). The queue bound then counts messages, not tasks.
    #[arg(
        long,
        env = "INFERGATE_AMQP_GROUP_MAX",
        value_name = "N",
        default_value_t = 1
    )]
    pub amqp_group_max: usize,
    /// RabbitMQ broker: longest wait for a publisher confirm before the submission gets 503,
    /// in ms.
    #[arg(
        long,
        env = "INFERGATE_PUBLISH_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub publish_timeout_ms: u64,
    /// Prefix of every Redis key (and RabbitMQ queue name) infergate uses.
    #[arg(
        long,
        env = "INFERGATE_REDIS_PREFIX",
        value_name = "PREFIX",
        default_value = "infergate"
    )]
    pub redis_prefix: String,
    /// Claim check: where payloads over `claim_check_bytes` are kept, so the broker carries
    /// only a reference: `file:///abs/dir` (a disk or mounted volume), `memory:///` or
    /// `s3://bucket[/prefix]` (credentials and endpoint from the `AWS_*` variables). Unset:
    /// payloads travel inside broker messages, bounded by `server.max_request_bytes`.
    #[arg(long, env = "INFERGATE_BLOB_STORE", value_name = "URL")]
    pub blob_store: Option<String>,
    /// Encoded requests and results larger than this go to the blob store, in bytes.
    #[arg(
        long,
        env = "INFERGATE_CLAIM_CHECK_BYTES",
        value_name = "BYTES",
        default_value_t = 32_768
    )]
    pub claim_check_bytes: usize,
    /// How often blobs no task needs any more (expired, purged, finished) are removed, in ms.
    #[arg(
        long,
        env = "INFERGATE_BLOB_SWEEP_MS",
        value_name = "MS",
        default_value_t = 60_000
    )]
    pub blob_sweep_ms: u64,
    /// How often each process publishes task messages their submitter left in the task
    /// store's outbox (it died, or the broker or store failed under it), in ms. A message is
    /// left alone for `publish_timeout_ms` (at least 5 s) + 2 s first.
    #[arg(
        long,
        env = "INFERGATE_OUTBOX_SWEEP_MS",
        value_name = "MS",
        default_value_t = 1_000
    )]
    pub outbox_sweep_ms: u64,
    /// How long an accepted task's message is kept after the broker confirmed it, for a
    /// worker to start the task, before it is published again (the broker may have lost it),
    /// in ms. A broker that finds its queue or consumer group missing has it done at once.
    #[arg(
        long,
        env = "INFERGATE_OUTBOX_RECHECK_MS",
        value_name = "MS",
        default_value_t = 300_000
    )]
    pub outbox_recheck_ms: u64,
}

impl TasksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "tasks", {
            workers: 0..=256,
            worker_concurrency: 1..=65_536,
            max_attempts: 1..=100,
            dead_letter_max: 1..=1_000_000,
            dead_letter_ttl_ms: 60_000..=366 * 86_400_000u64,
            amqp_group_max: 1..=1_000,
            publish_timeout_ms: 100..=600_000,
            ttl_ms: 1_000..=30 * 86_400_000u64,
            max_result_bytes: 1024..=512u64 << 20,
            queue_capacity: 1..=100_000_000,
            visibility_timeout_ms: 100..=86_400_000,
            claim_check_bytes: 1024..=16u64 << 20,
            blob_sweep_ms: 100..=86_400_000,
            outbox_sweep_ms: 50..=600_000,
            outbox_recheck_ms: 1_000..=30 * 86_400_000u64,
        });
        if let Some(url) = &self.blob_store
            && !(url.starts_with("file:///")
                || url.starts_with("memory:")
                || url.starts_with("s3://"))
        {
            return Err(invalid(
                "tasks.blob_store",
                "must be file:///absolute/dir, memory:/// or s3://bucket[/prefix]",
            ));
        }
        if self.redis_prefix.is_empty() {
            return Err(invalid("tasks.redis_prefix", "must not be empty"));
        }
        Ok(())
    }
}

/// Where tasks wait, parsed once from `tasks.broker` / `--broker`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BrokerUrl {
    /// In-process (the embedded default).
    #[default]
    Memory,
    /// Redis Streams at this `redis://` URL.
    Redis(String),
    /// RabbitMQ at this `amqp://` URL.
    RabbitMq(String),
}

/// Where task records and results are kept, parsed once from `tasks.task_store`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StoreUrl {
    #[default]
    Memory,
    Redis(String),
}

fn is_redis(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://")
}

impl BrokerUrl {
    /// The short name used in metric labels and spans (`memory`, `redis`, `rabbitmq`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis(_) => "redis",
            Self::RabbitMq(_) => "rabbitmq",
        }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            u if is_redis(u) => Ok(Self::Redis(u.into())),
            u if u.starts_with("amqp://") => Ok(Self::RabbitMq(u.into())),
            u => Err(format!(
                "tasks.broker '{u}': use memory, redis://host:port or amqp://user:pass@host:port/vhost"
            )),
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            u if is_redis(u) => Ok(Self::Redis(u.into())),
            u => Err(format!(
                "tasks.task_store '{u}': use memory or redis://host:port"
            )),
        }
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(u) | Self::RabbitMq(u) => f.write_str(u),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(u) => f.write_str(u),
        }
    }
}

macro_rules! string_conversions {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    };
}
string_conversions!(BrokerUrl);
string_conversions!(StoreUrl);
// ---------------------------------------------------------------------------------------------
// [log] and [telemetry]

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

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| invalid("log.level", e.to_string()))
    }
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

impl TelemetryConfig {
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

// ---------------------------------------------------------------------------------------------
// [scaler]

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

impl ScalerConfig {
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

// ---------------------------------------------------------------------------------------------
// [routes]

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

// ---------------------------------------------------------------------------------------------
// [cache]

/// Where the response cache keeps answers; which models and routes are cached is in the
/// routes file (`[cache.NAME]`), so it changes on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of answers the response cache keeps in memory (least recently used out first);
    /// 0: no cache.
    #[arg(long = "cache-max-bytes", env = "INFERGATE_CACHE_MAX_BYTES", value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_bytes: usize,
    /// Keep the answers in Redis at this `redis://` URL instead of memory: one cache for every
    /// front end. Entries expire by Redis's TTL; bound Redis's memory with its `maxmemory`
    /// (and an LRU policy).
    #[arg(
        long = "cache-redis",
        env = "INFERGATE_CACHE_REDIS",
        value_name = "URL"
    )]
    pub redis: Option<String>,
    /// Longest wait for Redis on one cache lookup or store, in ms; a slower lookup is a miss.
    #[arg(
        long = "cache-redis-timeout-ms",
        env = "INFERGATE_CACHE_REDIS_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 50
    )]
    pub redis_timeout_ms: u64,
}

impl CacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        bounds!(self, "cache", { max_bytes: 0..=64u64 << 30, redis_timeout_ms: 1..=10_000 });
        match &self.redis {
            Some(u) if !is_redis(u) => Err(invalid(
                "cache.redis",
                format!("'{u}' is not a redis:// or rediss:// URL"),
            )),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [auth] (files only)

/// Who may call and how much. With no `keys`, calls need no key and all belong to the tenant
/// `default`. Keep keys in a Secret-mounted config file (`--config main.toml,keys.toml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<ApiKey>,
    /// Requests per second per tenant (token bucket refill); 0 = unlimited.
    pub rate_per_s: f64,
    /// Bucket size per tenant: requests that may arrive at once.
    pub burst: u32,
    /// Tasks a tenant may have queued or running at once; 0 = unlimited.
    pub max_open_tasks: u64,
}

/// One API key, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
    /// Overrides `auth.rate_per_s` for this key's tenant.
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    /// Overrides `auth.max_open_tasks` for this key's tenant.
    pub max_open_tasks: Option<u64>,
    /// This key may use the admin API (dead letters of every tenant).
    pub admin: bool,
    /// Signs this tenant's completion webhooks (`whsec_<base64>` or 16+ characters);
    /// overrides `webhooks.secret`. Keys of one tenant should carry the same.
    pub webhook_secret: Option<String>,
}

/// Keys never reach logs, even through a debug print of the config.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("key", &"<redacted>")
            .field("tenant", &self.tenant)
            .field("rate_per_s", &self.rate_per_s)
            .field("burst", &self.burst)
            .field("max_open_tasks", &self.max_open_tasks)
            .field("admin", &self.admin)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let rate_ok = |r: f64| r.is_finite() && (0.0..=1e7).contains(&r);
        if !rate_ok(self.rate_per_s) {
            return Err(invalid("auth.rate_per_s", "must be 0 (unlimited) ..= 1e7"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let bad = |m: &str| invalid("auth.keys", format!("key #{}: {m}", i + 1));
            if k.key.len() < 16 || !k.key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("must be at least 16 visible ASCII characters"));
            }
            if k.tenant.trim().is_empty() || k.tenant.len() > 128 {
                return Err(bad("tenant must be 1..=128 characters"));
            }
            if k.rate_per_s.is_some_and(|r| !rate_ok(r)) {
                return Err(bad("rate_per_s must be 0 (unlimited) ..= 1e7"));
            }
            if !seen.insert(&k.key) {
                return Err(bad("the same key is listed twice"));
            }
            if let Some(secret) = &k.webhook_secret
                && let Err(m) = crate::tasks::webhooks::allow::secret_bytes(secret)
            {
                return Err(bad(&format!("webhook_secret {m}")));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Loading: files, then what the environment and the flags say.

/// The command line of `infergate serve` and `infergate worker`: the config files, and every
/// setting of [`Config`] as a flag (with its variable). clap reads them; only the settings a
/// flag or a variable actually gave override the files.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    pub config: Vec<PathBuf>,
    /// Every setting as clap read it: given ones, and defaults for the rest.
    settings: Config,
    /// Flag ids of the settings a flag or a variable gave.
    given: Vec<String>,
}

impl Args for ServeArgs {
    fn augment_args(cmd: Command) -> Command {
        Config::augment_args(
            cmd.arg(
                Arg::new("config")
                    .long("config")
                    .env("INFERGATE_CONFIG")
                    .value_name("FILE")
                    .value_delimiter(',')
                    .action(ArgAction::Append)
                    .value_parser(clap::value_parser!(PathBuf))
                    .help(
                        "TOML config file; repeat to layer several (later files win key by key, \
                         e.g. a ConfigMap file then a Secret file with the broker URLs). \
                         Environment variables and flags override them",
                    ),
            ),
        )
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        // Groups (one per section) report a source too; only settings count.
        let paths = flag_paths();
        let given = m
            .ids()
            .map(|id| id.as_str())
            .filter(|id| paths.contains_key(*id))
            .filter(|id| {
                matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(String::from)
            .collect();
        Ok(Self {
            config: m
                .get_many::<PathBuf>("config")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            settings: Config::from_arg_matches(m)?,
            given,
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// Where each flag's value goes in the config: its section's path and the field (the flag's
/// id), or the id itself where it spells the whole path. Nested sections come first.
fn flag_paths() -> HashMap<String, String> {
    type Augment = fn(Command) -> Command;
    let parts: [(&str, Augment); 12] = [
        ("server.tls", ServerTls::augment_args),
        ("triton.tls", TritonTls::augment_args),
        ("server", ServerConfig::augment_args),
        ("triton", TritonConfig::augment_args),
        ("batching", BatchingConfig::augment_args),
        ("tasks", TasksConfig::augment_args),
        ("log", LogConfig::augment_args),
        ("telemetry", TelemetryConfig::augment_args),
        ("scaler", ScalerConfig::augment_args),
        ("routes", RoutesConfig::augment_args),
        ("cache", CacheConfig::augment_args),
        ("webhooks", WebhooksConfig::augment_args),
    ];
    let mut paths = HashMap::new();
    for (section, augment) in parts {
        for arg in augment(Command::new(section)).get_arguments() {
            let id = arg.get_id().as_str();
            let path = if id.contains('.') {
                id.to_string()
            } else {
                format!("{section}.{id}")
            };
            paths.entry(id.to_string()).or_insert(path);
        }
    }
    paths
}

impl Config {
    /// Defaults → files (in order) → environment/flags, then validation.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut table = Self::file_table(&args.config)?;
        if !args.given.is_empty() {
            let settings = toml::Table::try_from(&args.settings).map_err(|e| {
                invalid("flags", format!("a flag or variable is out of range: {e}"))
            })?;
            let paths = flag_paths();
            for id in &args.given {
                let Some(path) = paths.get(id) else { continue };
                if let Some(value) = lookup(&settings, path) {
                    insert(&mut table, path, value.clone());
                }
            }
        }
        let cfg = Self::from_table(table, &args.config)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_files(&[path.to_path_buf()])
    }

    /// Several TOML files merged table by table, later files winning.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        Self::from_table(Self::file_table(paths)?, paths)
    }

    fn file_table(paths: &[PathBuf]) -> Result<toml::Table, ConfigError> {
        let mut merged = toml::Table::new();
        for path in paths {
            merge(&mut merged, read_table(path)?);
        }
        Ok(merged)
    }

    fn from_table(table: toml::Table, paths: &[PathBuf]) -> Result<Self, ConfigError> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                // Name the file at fault: every key has a default, so the one that does not
                // load on its own holds the bad key or value.
                let culprit = paths.iter().find(|p| {
                    read_table(p).is_ok_and(|t| toml::Value::Table(t).try_into::<Self>().is_err())
                });
                ConfigError::Parse {
                    path: culprit.or(paths.last()).cloned().unwrap_or_default(),
                    message: e.to_string(),
                }
            })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.triton.validate()?;
        self.batching.validate()?;
        self.tasks.validate()?;
        self.webhooks.validate()?;
        self.log.validate()?;
        self.telemetry.validate()?;
        self.scaler.validate()?;
        self.cache.validate()?;
        bounds!(self.routes, "routes", { watch_ms: 0..=3_600_000 });
        self.auth.validate()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }

    pub fn triton_health_interval(&self) -> Duration {
        Duration::from_millis(self.triton.health_interval_ms)
    }

    /// The settings as a TOML file would write them, API keys redacted (`infergate config`).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for k in &mut shown.auth.keys {
            k.key = "<redacted>".into();
            if k.webhook_secret.is_some() {
                k.webhook_secret = Some("<redacted>".into());
            }
        }
        if shown.webhooks.secret.is_some() {
            shown.webhooks.secret = Some("<redacted>".into());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let (head, rest) = path.split_once('.').unwrap_or((path, ""));
    let v = table.get(head)?;
    match (rest, v) {
        ("", v) => Some(v),
        (rest, toml::Value::Table(t)) => lookup(t, rest),
        _ => None,
    }
}

fn insert(table: &mut toml::Table, path: &str, value: toml::Value) {
    match path.split_once('.') {
        None => {
            table.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let inner = table
                .entry(head)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !inner.is_table() {
                *inner = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = inner {
                insert(t, rest, value);
            }
        }
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infergate-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().triton.urls, ["http://127.0.0.1:8001"]);
        assert!(Config::default().server.tls().is_none());
    }

    #[test]
    fn flags_override_file_and_repeat_for_urls() {
        let file = temp_dir("cfg").join("c.toml");
        std::fs::write(
            &file,
            "[server]\ngrpc_addr = \"127.0.0.1:9001\"\nmax_request_bytes = 4096\n[triton]\nurls = [\"http://10.0.0.1:8001\"]\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            file.to_str().unwrap(),
            "--triton-url",
            "http://127.0.0.1:1",
            "--triton-url",
            "http://127.0.0.1:2",
            "--grpc-addr",
            "127.0.0.1:9002",
        ]);
        let cfg = Config::load(&cli.serve).unwrap();
        assert_eq!(cfg.server.grpc_addr.port(), 9002);
        assert_eq!(cfg.server.max_request_bytes, 4096, "kept from the file");
        assert_eq!(
            cfg.triton.urls,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
    }

    /// Only what a flag or a variable gave overrides the files: a flag at its default value
    /// still wins over the file, and a flag not given leaves the file's value.
    #[test]
    fn a_flag_at_its_default_value_still_wins_over_the_file() {
        let file = temp_dir("cfg3").join("c.toml");
        std::fs::write(
            &file,
            "[tasks]\nworkers = 3\nredis_prefix = \"blue\"\n[server.tls]\nhandshake_timeout_ms = 5\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--config", file.to_str().unwrap(), "--workers", "1"]);
        let cfg = Config::load(&cli.serve).unwrap();
        assert_eq!(cfg.tasks.workers, 1);
        assert_eq!(cfg.tasks.redis_prefix, "blue");
        // A nested section's own key is kept too, and TLS stays off with no file named.
        assert_eq!(cfg.server.tls.handshake_timeout_ms, 5);
        assert!(cfg.server.tls().is_none());
    }

    #[test]
    fn later_config_files_win_key_by_key() {
        let dir = temp_dir("cfg2");
        let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
        std::fs::write(
            &a,
            "[tasks]\nbroker = \"memory\"\nworkers = 3\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        std::fs::write(
            &b,
            "[tasks]\nbroker = \"redis://10.0.0.2:6379\"\ntask_store = \"redis://10.0.0.2:6379\"\n",
        )
        .unwrap();
        let cfg = Config::from_files(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            cfg.tasks.broker,
            BrokerUrl::Redis("redis://10.0.0.2:6379".into())
        );
        assert_eq!(cfg.tasks.broker.kind(), "redis");
        assert_eq!(cfg.tasks.workers, 3, "kept from the first file");
        assert_eq!(cfg.log.format, LogFormat::Json);
        // A bad key in the first of two files: the error names that file, not the last one.
        std::fs::write(&a, "[tasks]\nbrokr = 1\n").unwrap();
        let err = Config::from_files(&[a.clone(), b]).unwrap_err().to_string();
        assert!(err.contains("brokr"), "{err}");
        assert!(err.contains("a.toml") && !err.contains("b.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut cfg = Config::default();
        cfg.triton.urls = vec!["127.0.0.1:8001".into()];
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("triton.urls"), "{msg}");

        let mut cfg = Config::default();
        cfg.triton.connections_per_endpoint = 0;
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("triton.connections_per_endpoint"), "{msg}");

        let mut cfg = Config::default();
        cfg.telemetry.otlp_endpoint = Some("collector".into());
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("telemetry.otlp_endpoint"), "{msg}");

        let mut cfg = Config::default();
        cfg.server.tls.handshake_timeout_ms = 0;
        cfg.validate()
            .expect("TLS bounds apply only when TLS is on");
        cfg.server.tls.key = Some("/nonexistent/key.pem".into());
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(
            msg.contains("server.tls.cert") && msg.contains("required"),
            "{msg}"
        );

        for (key, value) in [
            ("max_inflight_batches", "0"),
            ("max_inflight_batches", "18446744073709551615"),
            ("max_queue_size", "2000000"),
        ] {
            let cfg: Config =
                toml::from_str(&format!("[batching.models.add_sub]\n{key} = {value}")).unwrap();
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(
                msg.contains("batching.models") && msg.contains(key),
                "{msg}"
            );
            assert!(msg.contains("model 'add_sub'"), "{msg}");
        }

        // Broker and store URLs are parsed when read: a file, a flag or the environment with
        // an unknown scheme is refused there, naming the setting.
        for (text, key) in [
            ("[tasks]\nbroker = \"kafka://x:9092\"", "tasks.broker"),
            ("[tasks]\ntask_store = \"amqp://x\"", "tasks.task_store"),
        ] {
            let err = toml::from_str::<Config>(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = Cli::try_parse_from(["x", "--broker", "kafka://x:9092"])
            .err()
            .expect("an unknown broker scheme on the command line")
            .to_string();
        assert!(err.contains("tasks.broker"), "{err}");
        assert_eq!(
            "amqp://guest:guest@127.0.0.1:5672/%2f"
                .parse::<BrokerUrl>()
                .map(|b| b.kind()),
            Ok("rabbitmq")
        );

        let err = toml::from_str::<Config>("[server]\ngrpc_adr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("grpc_adr"), "{err}");
    }

    /// Each flag lands on the file key of the same setting: given alone, it is the one value
    /// taken from the flags, found at its path in the config, and that path is a key the file
    /// format accepts.
    #[test]
    fn every_flag_sets_the_file_key_of_its_setting() {
        let cmd = ServeArgs::augment_args(Command::new("serve"));
        let paths = flag_paths();
        let mut checked = 0;
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "config") {
            let id = arg.get_id().as_str();
            let long = arg.get_long().expect("every setting has a long flag");
            let sample = arg
                .get_possible_values()
                .first()
                .map(|v| v.get_name().to_string())
                .or_else(|| {
                    arg.get_default_values()
                        .first()
                        .map(|v| v.to_string_lossy().into())
                })
                .unwrap_or_else(|| {
                    match arg
                        .get_value_names()
                        .and_then(|v| v.first())
                        .map(|v| v.as_str())
                    {
                        Some("URL") => "http://127.0.0.1:4317".into(),
                        Some("ADDR") => "127.0.0.1:9090".into(),
                        Some("FILE") => "/tmp/x.pem".into(),
                        Some("NAME" | "MODEL") => "x".into(),
                        _ => "5".into(),
                    }
                });
            let flag = format!("--{long}");
            let m = cmd
                .clone()
                .try_get_matches_from(["serve", flag.as_str(), sample.as_str()])
                .unwrap_or_else(|e| panic!("{flag} {sample}: {e}"));
            let args = ServeArgs::from_arg_matches(&m).unwrap();
            assert_eq!(args.given, [id], "{flag}");
            let path = paths
                .get(id)
                .unwrap_or_else(|| panic!("{flag}: no path for {id}"));
            let settings = toml::Table::try_from(&args.settings).unwrap();
            let value = lookup(&settings, path)
                .unwrap_or_else(|| panic!("{flag}: {path} is not a key of the config"));
            let mut table = toml::Table::new();
            insert(&mut table, path, value.clone());
            toml::Value::Table(table)
                .try_into::<Config>()
                .unwrap_or_else(|e| panic!("{flag}: {path} as a file key: {e}"));
            checked += 1;
        }
        assert!(checked >= 45, "only {checked} flags checked");
    }
}
