//! The cache in Redis, shared by every front end: an answer is one string key
//! (`<prefix>:cache:<sha-256 hex>`) holding its protobuf bytes, set with the entry's TTL in
//! milliseconds, so Redis drops it itself. Redis's `maxmemory` (with an LRU policy) bounds
//! the whole cache. Each lookup and store waits at most a configured time; a Redis that is
//! slow or down turns lookups into misses (counted), never into errors for the caller.

use std::{fmt::Write as _, time::Duration};

use prost::Message;
use redis::AsyncCommands;

use super::Key;
use crate::{proto::inference::ModelInferResponse, redis_conn::LazyRedis};

pub struct RedisCache {
    redis: LazyRedis,
    prefix: String,
    timeout: Duration,
}

impl RedisCache {
    /// Parses the URL only; the connection is made at the first lookup.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            redis: LazyRedis::new(url)?,
            prefix: prefix.to_string(),
            timeout,
        })
    }

    fn name(&self, key: &Key) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 7 + 64);
        s.push_str(&self.prefix);
        s.push_str(":cache:");
        for b in key {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The answer kept under `key`, if any. `Err`: Redis did not answer in time or failed.
    pub async fn get(&self, key: &Key) -> Result<Option<ModelInferResponse>, String> {
        let name = self.name(key);
        let bytes: Option<Vec<u8>> = self
            .bounded(async {
                let mut conn = self.redis.get().await?;
                conn.get(name).await
            })
            .await?;
        bytes
            .map(|b| ModelInferResponse::decode(&b[..]).map_err(|e| format!("decoding: {e}")))
            .transpose()
    }

    /// Keeps `resp` under `key` for `ttl`.
    pub async fn put(
        &self,
        key: &Key,
        resp: &ModelInferResponse,
        ttl: Duration,
    ) -> Result<(), String> {
        let name = self.name(key);
        let bytes = resp.encode_to_vec();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.bounded(async {
            let mut conn = self.redis.get().await?;
            conn.pset_ex::<_, _, ()>(name, bytes, ms).await
        })
        .await
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}
