//! Triton's own queue time per model, read from its statistics into infergate's metrics
//! (`infergate_triton_queue_seconds_total`, `infergate_triton_queued_requests_total`). When
//! infergate batches a model whose Triton config also has a dynamic-batcher delay, this is
//! where the second window shows.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::triton::TritonPool;
use crate::{
    proto::inference::{ModelStatisticsRequest, ModelStatisticsResponse},
    telemetry::metrics::{ModelLabel, metrics},
};

/// Triton's cumulative queue counters per model (all versions together): requests, ns.
type Totals = HashMap<String, (u64, u64)>;

fn totals(resp: &ModelStatisticsResponse) -> Totals {
    let mut t = Totals::new();
    for m in &resp.model_stats {
        let Some(q) = m.inference_stats.as_ref().and_then(|s| s.queue.as_ref()) else {
            continue;
        };
        let e = t.entry(m.name.clone()).or_default();
        e.0 = e.0.saturating_add(q.count);
        e.1 = e.1.saturating_add(q.ns);
    }
    t
}

/// What each counter grew by since `before`. A total that went down (Triton restarted, or an
/// endpoint left the pool) counts from zero again.
fn growth(before: &Totals, now: &Totals) -> Vec<(String, u64, u64)> {
    now.iter()
        .filter_map(|(name, &(count, ns))| {
            let (c0, n0) = before.get(name).copied().unwrap_or((0, 0));
            let (dc, dn) = if count < c0 || ns < n0 {
                (count, ns)
            } else {
                (count - c0, ns - n0)
            };
            (dc > 0 || dn > 0).then(|| (name.clone(), dc, dn))
        })
        .collect()
}

/// Reads the statistics every `interval` until `shutdown`. Only models this process has had
/// described (bounded by the repository) get series.
pub fn spawn(
    pool: Arc<TritonPool>,
    interval: Duration,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = Totals::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !pool.is_ready() {
                continue;
            }
            let Ok(resp) = pool
                .model_statistics(ModelStatisticsRequest::default())
                .await
            else {
                continue;
            };
            let now = totals(&resp);
            let m = metrics();
            for (model, requests, ns) in growth(&before, &now) {
                if !m.is_registered(&model) {
                    continue;
                }
                let label = ModelLabel { model };
                m.triton_queued_requests
                    .get_or_create(&label)
                    .inc_by(requests);
                m.triton_queue_seconds
                    .get_or_create(&label)
                    .inc_by(ns as f64 / 1e9);
            }
            before = now;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::{InferStatistics, ModelStatistics, StatisticDuration};

    fn stats(models: &[(&str, &str, u64, u64)]) -> ModelStatisticsResponse {
        ModelStatisticsResponse {
            model_stats: models
                .iter()
                .map(|&(name, version, count, ns)| ModelStatistics {
                    name: name.into(),
                    version: version.into(),
                    inference_stats: Some(InferStatistics {
                        queue: Some(StatisticDuration { count, ns }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn versions_add_up_and_only_growth_is_counted() {
        let first = totals(&stats(&[
            ("a", "1", 3, 300),
            ("a", "2", 1, 100),
            ("b", "1", 0, 0),
        ]));
        assert_eq!(first["a"], (4, 400));
        let mut g = growth(&Totals::new(), &first);
        g.sort();
        assert_eq!(g, vec![("a".into(), 4, 400)], "b never queued");
        let second = totals(&stats(&[
            ("a", "1", 5, 900),
            ("a", "2", 1, 100),
            ("b", "1", 2, 50),
        ]));
        let mut g = growth(&first, &second);
        g.sort();
        assert_eq!(g, vec![("a".into(), 2, 600), ("b".into(), 2, 50)]);
        // Triton restarted: its counters start again from zero.
        let restarted = totals(&stats(&[("a", "1", 1, 10)]));
        assert_eq!(growth(&second, &restarted), vec![("a".into(), 1, 10)]);
    }
}
