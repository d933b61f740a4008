//! Peaks in Redis: one hash per scaled object (`<prefix>:scaler:peaks:<object>`, field =
//! bucket start in seconds, value = the peak), raised atomically by a script and expiring
//! when no peak in it can matter any more.

use async_trait::async_trait;
use redis::Script;

use super::{
    decide::Peak,
    peaks::{PeakError, PeakStore},
};
use crate::redis_conn::LazyRedis;

/// Raises field ARGV[1] of KEYS[1] to ARGV[2] if below it; drops fields before ARGV[4]; the
/// hash lives ARGV[3] seconds past its last record.
const RECORD: &str = r#"
if tonumber(ARGV[2]) > 0 then
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if tonumber(f) < tonumber(ARGV[4]) then redis.call('HDEL', KEYS[1], f) end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"#;

pub struct RedisPeaks {
    conn: LazyRedis,
    prefix: String,
    record: Script,
}

fn backend(e: redis::RedisError) -> PeakError {
    PeakError(e.to_string())
}

impl RedisPeaks {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, PeakError> {
        Ok(Self {
            conn: LazyRedis::new(url).map_err(backend)?,
            prefix: prefix.to_string(),
            record: Script::new(RECORD),
        })
    }

    fn key(&self, object: &str) -> String {
        format!("{}:scaler:peaks:{object}", self.prefix)
    }
}

#[async_trait]
impl PeakStore for RedisPeaks {
    async fn record(
        &self,
        object: &str,
        bucket_s: u64,
        now_s: u64,
        replicas: u32,
        keep_s: u64,
    ) -> Result<(), PeakError> {
        let at = now_s - now_s % bucket_s.max(1);
        let mut conn = self.conn.get().await.map_err(backend)?;
        self.record
            .key(self.key(object))
            .arg(at)
            .arg(replicas)
            .arg(keep_s.max(1))
            .arg(now_s.saturating_sub(keep_s))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(backend)
    }

    async fn peaks(&self, object: &str, now_s: u64, keep_s: u64) -> Result<Vec<Peak>, PeakError> {
        let mut conn = self.conn.get().await.map_err(backend)?;
        let all: Vec<(u64, u32)> = redis::cmd("HGETALL")
            .arg(self.key(object))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(all
            .into_iter()
            .filter(|&(at, _)| now_s.saturating_sub(at) <= keep_s)
            .map(|(at_s, replicas)| Peak { at_s, replicas })
            .collect())
    }
}
