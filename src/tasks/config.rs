//! `[tasks]`: the async path's broker, task store, workers and their bounds.

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid, is_redis};

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

impl Section for TasksConfig {
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

clap_defaults!(TasksConfig);
