//! Typed configuration: built-in defaults, then an optional TOML file, then `INFERGATE_*`
//! environment variables and command-line flags (clap merges those two, flags winning).
//! Validated once at start, with a message that names the setting.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, ValueEnum};
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub triton: TritonConfig,
    pub batching: BatchingConfig,
    pub tasks: TasksConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
}

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
            .finish()
    }
}

/// OpenTelemetry tracing. Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; unset: no spans are exported
    /// and no trace context is sent to Triton.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded (0.0..=1.0); a sampled incoming `traceparent` is followed.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Spans buffered for export; more are dropped (never blocking a request).
    pub max_queue_size: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "infergate".into(),
            max_queue_size: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// `memory` (in-process, the default), `redis://host:port[/db]` (Redis Streams) or
    /// `amqp://user:pass@host:port/vhost` (RabbitMQ).
    pub broker: BrokerUrl,
    /// `memory` (the default) or `redis://host:port[/db]`.
    pub task_store: StoreUrl,
    /// Worker loops inside `serve` (0: API only; tasks then need `infergate worker`).
    pub workers: usize,
    /// Tasks one worker loop runs at once.
    pub worker_concurrency: usize,
    /// Attempts before a task fails and its message is dead-lettered.
    pub max_attempts: u32,
    /// How long task records and results are kept.
    pub ttl_ms: u64,
    /// Largest result stored, in bytes (bigger ones fail the task with RESOURCE_EXHAUSTED).
    pub max_result_bytes: usize,
    /// Tasks waiting in the broker before submissions get 429.
    pub queue_capacity: u64,
    /// Redis broker: a pending message idle this long is reclaimed from its (dead) consumer.
    pub visibility_timeout_ms: u64,
    /// RabbitMQ broker: up to this many concurrent submissions may share one message (1: one
    /// message per task). The queue bound then counts messages, not tasks.
    pub amqp_group_max: usize,
    /// RabbitMQ broker: longest wait for a publisher confirm before the submission gets 503.
    pub publish_timeout_ms: u64,
    /// Prefix of every Redis key (and RabbitMQ queue name) infergate uses.
    pub redis_prefix: String,
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

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            broker: BrokerUrl::Memory,
            task_store: StoreUrl::Memory,
            workers: 1,
            worker_concurrency: 256,
            max_attempts: 3,
            ttl_ms: 3_600_000,
            max_result_bytes: 16 << 20,
            queue_capacity: 100_000,
            visibility_timeout_ms: 30_000,
            amqp_group_max: 1,
            publish_timeout_ms: 10_000,
            redis_prefix: "infergate".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address of the gRPC API (Open Inference Protocol, health, reflection).
    pub grpc_addr: SocketAddr,
    /// Listen address of the HTTP/JSON API.
    pub http_addr: SocketAddr,
    /// Largest accepted request (HTTP body or gRPC message), in bytes.
    pub max_request_bytes: usize,
    /// Largest response passed back from Triton, in bytes.
    pub max_response_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// HTTP/2 streams one gRPC client connection may have open.
    pub max_concurrent_streams: u32,
    /// Requests of one ModelStreamInfer stream that run at once (answers keep request order).
    pub stream_concurrency: usize,
    /// Threads that serve gRPC connections, each connection on one of them with its own
    /// Triton connections; 0 = one per CPU the process may use.
    pub grpc_threads: usize,
    /// TLS on both listeners (gRPC and HTTP); plaintext when absent.
    pub tls: Option<ServerTls>,
}

/// Certificates of the two listeners (PEM files; re-read only at start).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTls {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle for client certificates: when set, clients must present one it signed (mTLS).
    pub client_ca: Option<PathBuf>,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once on each listener; more connections wait.
    pub max_handshakes: usize,
}

impl Default for ServerTls {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: None,
            handshake_timeout_ms: 10_000,
            max_handshakes: 256,
        }
    }
}

/// TLS towards Triton (used for `https://` Triton URLs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TritonTls {
    /// CA bundle that signed Triton's certificate.
    pub ca: PathBuf,
    /// Client certificate and key, for Triton's `--grpc-use-ssl-mutual`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to check Triton's certificate against, when not the URL's host.
    pub domain: Option<String>,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:8081".parse().expect("literal address"),
            http_addr: "127.0.0.1:8080".parse().expect("literal address"),
            max_request_bytes: 64 << 20,
            max_response_bytes: 256 << 20,
            shutdown_grace_ms: 10_000,
            max_concurrent_streams: 1024,
            stream_concurrency: 16,
            grpc_threads: 0,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TritonConfig {
    /// gRPC endpoints of the Triton servers (`http://host:port`).
    pub urls: Vec<String>,
    pub connect_timeout_ms: u64,
    /// Upper bound on one call to Triton (a shorter client deadline wins).
    pub request_timeout_ms: u64,
    /// How often each endpoint's readiness is probed.
    pub health_interval_ms: u64,
    pub probe_timeout_ms: u64,
    /// HTTP/2 connections kept to each endpoint; calls are spread over them.
    pub connections_per_endpoint: usize,
    /// How long model metadata and config are cached before they are fetched again.
    pub model_cache_ttl_ms: u64,
    /// How often Triton's own statistics (its queue time per model) are read into infergate's
    /// metrics; 0: never.
    pub stats_interval_ms: u64,
    /// Models that must be ready on Triton for `/readyz` to say ready (empty: server only).
    pub ready_models: Vec<String>,
    /// Needed for `https://` URLs.
    pub tls: Option<TritonTls>,
}

impl Default for TritonConfig {
    fn default() -> Self {
        Self {
            urls: vec!["http://127.0.0.1:8001".to_string()],
            connect_timeout_ms: 2_000,
            request_timeout_ms: 30_000,
            health_interval_ms: 1_000,
            probe_timeout_ms: 1_000,
            connections_per_endpoint: 2,
            model_cache_ttl_ms: 30_000,
            stats_interval_ms: 10_000,
            ready_models: Vec::new(),
            tls: None,
        }
    }
}

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Default for every model whose Triton config allows batching.
    pub mode: BatchMode,
    /// Longest wait for a fuller batch; unset: the model's Triton `max_queue_delay_microseconds`
    /// (`on`), or that and at least 2 ms (`adaptive`, which waits only when company can come).
    pub max_queue_delay_us: Option<u64>,
    /// Requests waiting per model before new ones get RESOURCE_EXHAUSTED / 429.
    pub max_queue_size: usize,
    /// Batches of one model in flight per Triton endpoint; unset: one per instance of the
    /// model in its Triton config, plus one.
    pub max_inflight_batches: Option<usize>,
    /// Priority levels (Triton's `priority` parameter: 1 is highest); at least the model's own.
    pub priority_levels: u32,
    /// Anti-starvation: a request that has waited this long goes before any newer one.
    pub max_priority_wait_ms: u64,
    /// Requests of one model inside infergate at once (batched or not), per instance; over
    /// it, sync calls get RESOURCE_EXHAUSTED / 429 and workers wait. 0 = no cap.
    pub max_concurrent_requests: usize,
    /// Per-model overrides, by model name.
    pub models: std::collections::BTreeMap<String, ModelBatching>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            mode: BatchMode::Adaptive,
            max_queue_delay_us: None,
            max_queue_size: 1024,
            max_inflight_batches: None,
            priority_levels: 2,
            max_priority_wait_ms: 100,
            max_concurrent_requests: 0,
            models: Default::default(),
        }
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

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `infergate=debug,tower=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Flags of `infergate serve`. Every flag can also be set by the environment variable named
/// in its help; a flag given on the command line wins over the variable, and both win over the
/// config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; repeat to layer several (later files win key by key, e.g. a
    /// ConfigMap file then a Secret file with the broker URLs). Environment variables and
    /// flags override them.
    #[arg(
        long,
        env = "INFERGATE_CONFIG",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub config: Vec<PathBuf>,
    /// gRPC endpoint of a Triton server. Repeat for several (comma-separated in the variable).
    #[arg(
        long = "triton-url",
        env = "INFERGATE_TRITON_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub triton_urls: Vec<String>,
    /// Listen address of the gRPC API [default: 127.0.0.1:8081].
    #[arg(long, env = "INFERGATE_GRPC_ADDR", value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Listen address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "INFERGATE_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// PEM certificate chain: serve both APIs over TLS (with --tls-key).
    #[arg(long, env = "INFERGATE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "INFERGATE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS).
    #[arg(long, env = "INFERGATE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA bundle that signed Triton's certificate (for https:// Triton URLs).
    #[arg(long, env = "INFERGATE_TRITON_CA", value_name = "FILE")]
    pub triton_ca: Option<PathBuf>,
    /// PEM client certificate and key towards Triton (mTLS).
    #[arg(long, env = "INFERGATE_TRITON_CERT", value_name = "FILE")]
    pub triton_cert: Option<PathBuf>,
    #[arg(long, env = "INFERGATE_TRITON_KEY", value_name = "FILE")]
    pub triton_key: Option<PathBuf>,
    /// Name to check Triton's certificate against, when not the URL's host.
    #[arg(long, env = "INFERGATE_TRITON_DOMAIN", value_name = "NAME")]
    pub triton_domain: Option<String>,
    /// Largest accepted request in bytes [default: 67108864].
    #[arg(long, env = "INFERGATE_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Largest response accepted from Triton in bytes [default: 268435456].
    #[arg(long, env = "INFERGATE_MAX_RESPONSE_BYTES", value_name = "BYTES")]
    pub max_response_bytes: Option<usize>,
    /// Grace period for in-flight requests after SIGTERM, in ms [default: 10000].
    #[arg(long, env = "INFERGATE_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// HTTP/2 streams per gRPC client connection [default: 1024].
    #[arg(long, env = "INFERGATE_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<u32>,
    /// Requests of one ModelStreamInfer stream run at once [default: 16].
    #[arg(long, env = "INFERGATE_STREAM_CONCURRENCY", value_name = "N")]
    pub stream_concurrency: Option<usize>,
    /// Threads serving gRPC connections; 0 = one per CPU [default: 0].
    #[arg(long, env = "INFERGATE_GRPC_THREADS", value_name = "N")]
    pub grpc_threads: Option<usize>,
    /// Timeout for connecting to Triton, in ms [default: 2000].
    #[arg(long, env = "INFERGATE_TRITON_CONNECT_TIMEOUT_MS", value_name = "MS")]
    pub triton_connect_timeout_ms: Option<u64>,
    /// Upper bound on one call to Triton, in ms [default: 30000].
    #[arg(long, env = "INFERGATE_TRITON_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub triton_request_timeout_ms: Option<u64>,
    /// Interval at which Triton's statistics (queue time per model) are read into the
    /// metrics, in ms; 0 = never [default: 10000].
    #[arg(long, env = "INFERGATE_TRITON_STATS_INTERVAL_MS", value_name = "MS")]
    pub triton_stats_interval_ms: Option<u64>,
    /// Interval of the readiness probe of each Triton endpoint, in ms [default: 1000].
    #[arg(long, env = "INFERGATE_TRITON_HEALTH_INTERVAL_MS", value_name = "MS")]
    pub triton_health_interval_ms: Option<u64>,
    /// Timeout of one readiness probe, in ms [default: 1000].
    #[arg(long, env = "INFERGATE_TRITON_PROBE_TIMEOUT_MS", value_name = "MS")]
    pub triton_probe_timeout_ms: Option<u64>,
    /// HTTP/2 connections kept to each Triton endpoint [default: 2].
    #[arg(long, env = "INFERGATE_TRITON_CONNECTIONS", value_name = "N")]
    pub triton_connections: Option<usize>,
    /// How long model metadata/config stay cached, in ms [default: 30000].
    #[arg(long, env = "INFERGATE_MODEL_CACHE_TTL_MS", value_name = "MS")]
    pub model_cache_ttl_ms: Option<u64>,
    /// Batching for models whose Triton config allows it [default: adaptive].
    #[arg(long, env = "INFERGATE_BATCHING", value_enum)]
    pub batching: Option<BatchMode>,
    /// Longest wait for a fuller batch in µs [default: the model's Triton max_queue_delay;
    /// adaptive: that and at least 2000].
    #[arg(long, env = "INFERGATE_BATCH_MAX_QUEUE_DELAY_US", value_name = "US")]
    pub batch_max_queue_delay_us: Option<u64>,
    /// Requests queued per model before 429 / RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, env = "INFERGATE_BATCH_MAX_QUEUE_SIZE", value_name = "N")]
    pub batch_max_queue_size: Option<usize>,
    /// Batches of one model in flight per Triton endpoint [default: one per model instance
    /// in its Triton config, plus one].
    #[arg(long, env = "INFERGATE_BATCH_MAX_INFLIGHT", value_name = "N")]
    pub batch_max_inflight: Option<usize>,
    /// Task broker: `memory`, `redis://host:port` or `amqp://user:pass@host:port/%2f` [default: memory].
    #[arg(long, env = "INFERGATE_BROKER", value_name = "URL")]
    pub broker: Option<BrokerUrl>,
    /// Task store: `memory` or `redis://host:port` [default: memory].
    #[arg(long, env = "INFERGATE_TASK_STORE", value_name = "URL")]
    pub task_store: Option<StoreUrl>,
    /// Worker loops inside `serve`; 0 = API only [default: 1].
    #[arg(long, env = "INFERGATE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Tasks one worker loop runs at once [default: 256].
    #[arg(long, env = "INFERGATE_WORKER_CONCURRENCY", value_name = "N")]
    pub worker_concurrency: Option<usize>,
    /// RabbitMQ: concurrent submissions that may share one message [default: 1].
    #[arg(long, env = "INFERGATE_AMQP_GROUP_MAX", value_name = "N")]
    pub amqp_group_max: Option<usize>,
    /// RabbitMQ: longest wait for a publisher confirm, in ms [default: 10000].
    #[arg(long, env = "INFERGATE_PUBLISH_TIMEOUT_MS", value_name = "MS")]
    pub publish_timeout_ms: Option<u64>,
    /// Attempts before a task fails and is dead-lettered [default: 3].
    #[arg(long, env = "INFERGATE_TASK_MAX_ATTEMPTS", value_name = "N")]
    pub task_max_attempts: Option<u32>,
    /// How long task records and results are kept, in ms [default: 3600000].
    #[arg(long, env = "INFERGATE_TASK_TTL_MS", value_name = "MS")]
    pub task_ttl_ms: Option<u64>,
    /// Tasks waiting before submissions get 429 [default: 100000].
    #[arg(long, env = "INFERGATE_QUEUE_CAPACITY", value_name = "N")]
    pub queue_capacity: Option<u64>,
    /// Redis broker: reclaim pending messages idle this long, in ms [default: 30000].
    #[arg(long, env = "INFERGATE_VISIBILITY_TIMEOUT_MS", value_name = "MS")]
    pub visibility_timeout_ms: Option<u64>,
    /// Prefix of infergate's Redis keys [default: infergate].
    #[arg(long, env = "INFERGATE_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "INFERGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `infergate=debug` [default: info].
    #[arg(long, env = "INFERGATE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Models that must be ready for /readyz (comma-separated in the variable) [default: none].
    #[arg(
        long = "ready-model",
        env = "INFERGATE_READY_MODELS",
        value_delimiter = ',',
        value_name = "MODEL"
    )]
    pub ready_models: Vec<String>,
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317 [default: tracing off].
    #[arg(long, env = "INFERGATE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0..=1.0 [default: 1.0].
    #[arg(long, env = "INFERGATE_TRACE_SAMPLE_RATIO", value_name = "RATIO")]
    pub trace_sample_ratio: Option<f64>,
    /// service.name of exported spans [default: infergate].
    #[arg(long, env = "INFERGATE_SERVICE_NAME", value_name = "NAME")]
    pub service_name: Option<String>,
}

impl Config {
    /// Defaults → files (in order) → environment/flags, then validation.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut cfg = Self::from_files(&args.config)?;
        cfg.apply(args);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_files(&[path.to_path_buf()])
    }

    /// Several TOML files merged table by table, later files winning.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        let mut merged = toml::Table::new();
        let mut tables = Vec::with_capacity(paths.len());
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            tables.push(table.clone());
            merge(&mut merged, table);
        }
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| {
                // Name the file at fault: every key has a default, so the one that does not load
                // on its own holds the bad key or value.
                let culprit = paths
                    .iter()
                    .zip(tables)
                    .find(|(_, t)| toml::Value::Table(t.clone()).try_into::<Self>().is_err())
                    .map(|(p, _)| p.clone());
                ConfigError::Parse {
                    path: culprit
                        .or_else(|| paths.last().cloned())
                        .unwrap_or_default(),
                    message: e.to_string(),
                }
            })
    }

    fn apply(&mut self, a: &ServeArgs) {
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        if !a.triton_urls.is_empty() {
            self.triton.urls = a.triton_urls.clone();
        }
        let (s, t, l) = (&mut self.server, &mut self.triton, &mut self.log);
        set(&mut s.grpc_addr, &a.grpc_addr);
        set(&mut s.http_addr, &a.http_addr);
        set(&mut s.max_request_bytes, &a.max_request_bytes);
        set(&mut s.max_response_bytes, &a.max_response_bytes);
        set(&mut s.shutdown_grace_ms, &a.shutdown_grace_ms);
        set(&mut s.max_concurrent_streams, &a.max_concurrent_streams);
        set(&mut s.stream_concurrency, &a.stream_concurrency);
        set(&mut s.grpc_threads, &a.grpc_threads);
        set(&mut t.connect_timeout_ms, &a.triton_connect_timeout_ms);
        set(&mut t.request_timeout_ms, &a.triton_request_timeout_ms);
        set(&mut t.health_interval_ms, &a.triton_health_interval_ms);
        set(&mut t.probe_timeout_ms, &a.triton_probe_timeout_ms);
        set(&mut t.connections_per_endpoint, &a.triton_connections);
        set(&mut t.model_cache_ttl_ms, &a.model_cache_ttl_ms);
        set(&mut t.stats_interval_ms, &a.triton_stats_interval_ms);
        if a.tls_cert.is_some() || a.tls_key.is_some() || a.tls_client_ca.is_some() {
            let tls = s.tls.get_or_insert_with(ServerTls::default);
            set(&mut tls.cert, &a.tls_cert);
            set(&mut tls.key, &a.tls_key);
            if a.tls_client_ca.is_some() {
                tls.client_ca = a.tls_client_ca.clone();
            }
        }
        if a.triton_ca.is_some() || a.triton_cert.is_some() || a.triton_domain.is_some() {
            let tls = t.tls.get_or_insert_with(TritonTls::default);
            set(&mut tls.ca, &a.triton_ca);
            for (slot, v) in [
                (&mut tls.cert, &a.triton_cert),
                (&mut tls.key, &a.triton_key),
            ] {
                if v.is_some() {
                    *slot = v.clone();
                }
            }
            if a.triton_domain.is_some() {
                tls.domain = a.triton_domain.clone();
            }
        }
        let b = &mut self.batching;
        set(&mut b.mode, &a.batching);
        if a.batch_max_queue_delay_us.is_some() {
            b.max_queue_delay_us = a.batch_max_queue_delay_us;
        }
        set(&mut b.max_queue_size, &a.batch_max_queue_size);
        if a.batch_max_inflight.is_some() {
            b.max_inflight_batches = a.batch_max_inflight;
        }
        let k = &mut self.tasks;
        set(&mut k.broker, &a.broker);
        set(&mut k.task_store, &a.task_store);
        set(&mut k.workers, &a.workers);
        set(&mut k.worker_concurrency, &a.worker_concurrency);
        set(&mut k.amqp_group_max, &a.amqp_group_max);
        set(&mut k.publish_timeout_ms, &a.publish_timeout_ms);
        set(&mut k.max_attempts, &a.task_max_attempts);
        set(&mut k.ttl_ms, &a.task_ttl_ms);
        set(&mut k.queue_capacity, &a.queue_capacity);
        set(&mut k.visibility_timeout_ms, &a.visibility_timeout_ms);
        set(&mut k.redis_prefix, &a.redis_prefix);
        set(&mut l.format, &a.log_format);
        set(&mut l.level, &a.log_level);
        if !a.ready_models.is_empty() {
            self.triton.ready_models = a.ready_models.clone();
        }
        let o = &mut self.telemetry;
        if a.otlp_endpoint.is_some() {
            o.otlp_endpoint = a.otlp_endpoint.clone();
        }
        set(&mut o.sample_ratio, &a.trace_sample_ratio);
        set(&mut o.service_name, &a.service_name);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.grpc_addr == s.http_addr && s.grpc_addr.port() != 0 {
            return Err(invalid(
                "server.http_addr",
                format!("{} is also the gRPC address", s.http_addr),
            ));
        }
        in_range(
            "server.max_request_bytes",
            s.max_request_bytes as u64,
            1024,
            2 << 30,
        )?;
        in_range(
            "server.max_response_bytes",
            s.max_response_bytes as u64,
            1024,
            4 << 30,
        )?;
        in_range(
            "server.shutdown_grace_ms",
            s.shutdown_grace_ms,
            0,
            3_600_000,
        )?;
        in_range(
            "server.max_concurrent_streams",
            s.max_concurrent_streams.into(),
            1,
            1 << 20,
        )?;
        in_range(
            "server.stream_concurrency",
            s.stream_concurrency as u64,
            1,
            4096,
        )?;
        in_range(
            "server.grpc_threads",
            s.grpc_threads as u64,
            0,
            MAX_GRPC_THREADS as u64,
        )?;
        let t = &self.triton;
        if t.urls.is_empty() {
            return Err(invalid(
                "triton.urls",
                "at least one Triton gRPC URL is needed",
            ));
        }
        for url in &t.urls {
            validate_url(url)?;
        }
        validate_tls(s.tls.as_ref(), t)?;
        in_range(
            "triton.connect_timeout_ms",
            t.connect_timeout_ms,
            1,
            600_000,
        )?;
        in_range(
            "triton.request_timeout_ms",
            t.request_timeout_ms,
            1,
            86_400_000,
        )?;
        in_range(
            "triton.health_interval_ms",
            t.health_interval_ms,
            10,
            3_600_000,
        )?;
        in_range("triton.probe_timeout_ms", t.probe_timeout_ms, 1, 600_000)?;
        in_range(
            "triton.connections_per_endpoint",
            t.connections_per_endpoint as u64,
            1,
            64,
        )?;
        in_range(
            "triton.stats_interval_ms",
            t.stats_interval_ms,
            0,
            86_400_000,
        )?;
        in_range(
            "triton.model_cache_ttl_ms",
            t.model_cache_ttl_ms,
            0,
            86_400_000,
        )?;
        let b = &self.batching;
        in_range(
            "batching.max_queue_delay_us",
            b.max_queue_delay_us.unwrap_or(0),
            0,
            MAX_QUEUE_DELAY_US,
        )?;
        in_range(
            "batching.max_queue_size",
            b.max_queue_size as u64,
            1,
            MAX_QUEUE_SIZE,
        )?;
        if let Some(v) = b.max_inflight_batches {
            in_range("batching.max_inflight_batches", v as u64, 1, MAX_INFLIGHT)?;
        }
        in_range("batching.priority_levels", b.priority_levels.into(), 1, 64)?;
        in_range(
            "batching.max_priority_wait_ms",
            b.max_priority_wait_ms,
            1,
            3_600_000,
        )?;
        for (model, m) in &b.models {
            let field = "batching.models";
            let bad = |what: String| invalid(field, format!("model '{model}': {what}"));
            if m.max_batch_size.is_some_and(|v| v < 1) {
                return Err(bad("max_batch_size must be at least 1".into()));
            }
            if m.max_queue_delay_us.is_some_and(|v| v > MAX_QUEUE_DELAY_US) {
                return Err(bad("max_queue_delay_us is over 10 s".into()));
            }
            if m.preferred_batch_sizes
                .as_ref()
                .is_some_and(|p| p.iter().any(|&x| x < 1))
            {
                return Err(bad("preferred_batch_sizes must be positive".into()));
            }
            // The gateway-wide bounds: a model's call slots become a semaphore's permits,
            // which have a hard maximum.
            for (name, value, max) in [
                ("max_queue_size", m.max_queue_size, MAX_QUEUE_SIZE),
                ("max_inflight_batches", m.max_inflight_batches, MAX_INFLIGHT),
            ] {
                if let Some(v) = value.filter(|&v| !(1..=max).contains(&(v as u64))) {
                    return Err(bad(format!("{name} {v} is outside 1..={max}")));
                }
            }
        }
        let k = &self.tasks;
        in_range("tasks.workers", k.workers as u64, 0, 256)?;
        in_range(
            "tasks.worker_concurrency",
            k.worker_concurrency as u64,
            1,
            65_536,
        )?;
        in_range("tasks.max_attempts", k.max_attempts.into(), 1, 100)?;
        in_range("tasks.amqp_group_max", k.amqp_group_max as u64, 1, 1_000)?;
        in_range(
            "tasks.publish_timeout_ms",
            k.publish_timeout_ms,
            100,
            600_000,
        )?;
        in_range("tasks.ttl_ms", k.ttl_ms, 1_000, 30 * 86_400_000)?;
        in_range(
            "tasks.max_result_bytes",
            k.max_result_bytes as u64,
            1024,
            512 << 20,
        )?;
        in_range("tasks.queue_capacity", k.queue_capacity, 1, 100_000_000)?;
        in_range(
            "tasks.visibility_timeout_ms",
            k.visibility_timeout_ms,
            100,
            86_400_000,
        )?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        let a = &self.auth;
        let rate_ok = |r: f64| r.is_finite() && (0.0..=1e7).contains(&r);
        if !rate_ok(a.rate_per_s) {
            return Err(invalid("auth.rate_per_s", "must be 0 (unlimited) ..= 1e7"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in a.keys.iter().enumerate() {
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
        }
        let o = &self.telemetry;
        if let Some(url) = &o.otlp_endpoint {
            validate_url(url).map_err(|e| match e {
                ConfigError::Invalid { message, .. } => {
                    invalid("telemetry.otlp_endpoint", message.replace("8001", "4317"))
                }
                other => other,
            })?;
        }
        if !(0.0..=1.0).contains(&o.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("{} is outside 0.0..=1.0", o.sample_ratio),
            ));
        }
        if o.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        in_range(
            "telemetry.max_queue_size",
            o.max_queue_size as u64,
            1,
            1 << 20,
        )?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }

    pub fn triton_health_interval(&self) -> Duration {
        Duration::from_millis(self.triton.health_interval_ms)
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

/// Bounds shared by the gateway-wide batching settings and each model's own.
const MAX_QUEUE_DELAY_US: u64 = 10_000_000;
const MAX_QUEUE_SIZE: u64 = 1 << 20;
const MAX_INFLIGHT: u64 = 1024;

fn in_range(field: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(invalid(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(())
}

/// A PEM file that is named must be there; what is in it is checked when it is loaded.
fn readable(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(field, "is required"));
    }
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(field, format!("cannot read '{}': {e}", path.display())))
}

fn validate_tls(server: Option<&ServerTls>, t: &TritonConfig) -> Result<(), ConfigError> {
    if let Some(tls) = server {
        readable("server.tls.cert", &tls.cert)?;
        readable("server.tls.key", &tls.key)?;
        if let Some(ca) = &tls.client_ca {
            readable("server.tls.client_ca", ca)?;
        }
        in_range(
            "server.tls.handshake_timeout_ms",
            tls.handshake_timeout_ms,
            1,
            600_000,
        )?;
        in_range(
            "server.tls.max_handshakes",
            tls.max_handshakes as u64,
            1,
            65_536,
        )?;
    }
    let https = t.urls.iter().filter(|u| u.starts_with("https://")).count();
    match &t.tls {
        None if https > 0 => Err(invalid(
            "triton.tls.ca",
            "https:// Triton URLs need the CA that signed Triton's certificate",
        )),
        Some(_) if https < t.urls.len() => Err(invalid(
            "triton.urls",
            "with triton.tls set, every Triton URL must be https://",
        )),
        Some(tls) => {
            readable("triton.tls.ca", &tls.ca)?;
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    readable("triton.tls.cert", c)?;
                    readable("triton.tls.key", k)
                }
                (None, None) => Ok(()),
                _ => Err(invalid(
                    "triton.tls.cert",
                    "a client certificate needs its key, and a key its certificate",
                )),
            }
        }
        None => Ok(()),
    }
}

fn validate_url(url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid("triton.urls", format!("'{url}' is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(
                "triton.urls",
                format!("'{url}' must start with http:// or https://"),
            ));
        }
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(invalid(
            "triton.urls",
            format!("'{url}' needs a host and a port, e.g. http://127.0.0.1:8001"),
        ));
    }
    Ok(())
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

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_override_file_and_repeat_for_urls() {
        let dir = std::env::temp_dir().join(format!("infergate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
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
        assert_eq!(cfg.server.max_request_bytes, 4096);
        assert_eq!(
            cfg.triton.urls,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
    }

    #[test]
    fn later_config_files_win_key_by_key() {
        let dir = std::env::temp_dir().join(format!("infergate-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        assert_eq!(
            "amqp://guest:guest@127.0.0.1:5672/%2f"
                .parse::<BrokerUrl>()
                .map(|b| b.kind()),
            Ok("rabbitmq")
        );

        let err = toml::from_str::<Config>("[server]\ngrpc_adr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("grpc_adr"), "{err}");
    }

    /// A flag's "[default: …]" is written by hand in its help: giving that value must leave
    /// the built-in defaults as they are, or the help (and docs/configuration.md, generated
    /// from it and checked by tests/docs.rs) says something the code does not do.
    #[test]
    fn every_documented_flag_default_is_the_real_default() {
        use clap::{Command, FromArgMatches};
        let cmd = ServeArgs::augment_args(Command::new("serve"));
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            let Some(value) = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(v, _)| v)
            else {
                continue;
            };
            // Prose ("none", "the model's Triton max_queue_delay; …") describes a computed
            // default; only literal values can be given back.
            if value == "none" || value.contains(char::is_whitespace) {
                continue;
            }
            let flag = format!("--{long}");
            let matches = cmd
                .clone()
                .try_get_matches_from(["serve", flag.as_str(), value])
                .unwrap_or_else(|e| panic!("{flag} {value}: {e}"));
            let args = ServeArgs::from_arg_matches(&matches).unwrap();
            let mut cfg = Config::default();
            cfg.apply(&args);
            assert_eq!(
                cfg,
                Config::default(),
                "{flag}'s help says [default: {value}], but giving it changes the config"
            );
            checked += 1;
        }
        assert!(checked >= 25, "only {checked} flags checked");
    }
}
