//! What is asked of a scaled object's models: calls in flight (counted by each process,
//! [`Activity`], shared through Redis when the task store is there) and tasks queued (from the
//! task store, which every front end and worker writes).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::decide::Demand;
use crate::redis_conn::LazyRedis;
use crate::tasks::TaskStore;
use crate::telemetry::activity::Activity;

/// In-flight counts of every process, through Redis: each process writes its own hash
/// (`<prefix>:scaler:inflight:<instance>`, model → calls) every interval, expiring after five
/// intervals, so a process that dies drops out rather than leaving its counts behind.
#[derive(Clone)]
pub struct SharedInFlight {
    conn: LazyRedis,
    prefix: String,
    instance: String,
}

impl SharedInFlight {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            conn: LazyRedis::new(url)?,
            prefix: prefix.to_string(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    fn key(&self, instance: &str) -> String {
        format!("{}:scaler:inflight:{instance}", self.prefix)
    }

    async fn publish(
        &self,
        counts: &HashMap<String, u64>,
        ttl: Duration,
    ) -> Result<(), redis::RedisError> {
        let key = self.key(&self.instance);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key);
        if !counts.is_empty() {
            let fields: Vec<(&String, &u64)> = counts.iter().collect();
            pipe.hset_multiple(&key, &fields)
                .pexpire(&key, ttl.as_millis() as i64);
        }
        pipe.query_async::<()>(&mut self.conn.get().await?).await
    }

    /// Writes this process's counts every `interval` until `stop`.
    pub fn spawn_publisher(
        self,
        activity: Arc<Activity>,
        interval: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // Said once when sharing stops working and once when it works again, not
                // every interval of an outage.
                match self.publish(&activity.in_flight(), interval * 5).await {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot share in-flight calls through Redis");
                    }
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("sharing in-flight calls through Redis again");
                    }
                    _ => {}
                }
            }
            // Gone at once rather than after its expiry, if Redis answers soon.
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                self.publish(&HashMap::new(), interval),
            )
            .await;
        })
    }

    /// Every other process's latest counts, summed per model.
    async fn others(&self) -> Result<HashMap<String, u64>, redis::RedisError> {
        let mut conn = self.conn.get().await?;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.key("*"))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let own = self.key(&self.instance);
        keys.retain(|k| *k != own);
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hgetall(k);
        }
        let maps: Vec<HashMap<String, u64>> = pipe.query_async(&mut conn).await?;
        let mut sum = HashMap::new();
        for (model, n) in maps.into_iter().flatten() {
            *sum.entry(model).or_default() += n;
        }
        Ok(sum)
    }
}

/// Reads a scaled object's demand.
pub struct Signals {
    pub store: Arc<dyn TaskStore>,
    pub activity: Arc<Activity>,
    pub shared: Option<SharedInFlight>,
}

impl Signals {
    pub async fn demand(&self, models: &[String]) -> Result<Demand, String> {
        let queued = self
            .store
            .queued_by_model()
            .await
            .map_err(|e| e.to_string())?;
        let mut in_flight = self.activity.in_flight();
        if let Some(shared) = &self.shared {
            for (m, n) in shared.others().await.map_err(|e| e.to_string())? {
                *in_flight.entry(m).or_default() += n;
            }
        }
        let sum = |counts: &HashMap<String, u64>| -> u64 {
            models.iter().filter_map(|m| counts.get(m)).sum()
        };
        Ok(Demand {
            queued: sum(&queued),
            in_flight: sum(&in_flight),
        })
    }
}
