//! `[cache]`: where the response cache keeps answers (what is cached is in the routes file).

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid, is_redis};

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

impl Section for CacheConfig {
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

clap_defaults!(CacheConfig);
