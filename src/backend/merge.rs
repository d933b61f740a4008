//! Model statistics of several Triton servers added into one answer, as if one server had
//! served every call (`ModelStatistics` through infergate).

use std::collections::BTreeMap;

use crate::proto::inference::{
    InferBatchStatistics, InferStatistics, ModelStatistics, ModelStatisticsResponse,
    StatisticDuration,
};

fn add_duration(into: &mut Option<StatisticDuration>, from: &Option<StatisticDuration>) {
    if let Some(f) = from {
        let d = into.get_or_insert_with(Default::default);
        d.count += f.count;
        d.ns += f.ns;
    }
}

fn add_infer_stats(into: &mut InferStatistics, from: &InferStatistics) {
    add_duration(&mut into.success, &from.success);
    add_duration(&mut into.fail, &from.fail);
    add_duration(&mut into.queue, &from.queue);
    add_duration(&mut into.compute_input, &from.compute_input);
    add_duration(&mut into.compute_infer, &from.compute_infer);
    add_duration(&mut into.compute_output, &from.compute_output);
    add_duration(&mut into.cache_hit, &from.cache_hit);
    add_duration(&mut into.cache_miss, &from.cache_miss);
}

/// Sums per-model statistics from several servers, keyed by model name and version.
pub fn merge_statistics(parts: Vec<ModelStatisticsResponse>) -> ModelStatisticsResponse {
    let mut merged: BTreeMap<(String, String), ModelStatistics> = BTreeMap::new();
    for part in parts {
        for s in part.model_stats {
            let key = (s.name.clone(), s.version.clone());
            let Some(m) = merged.get_mut(&key) else {
                merged.insert(key, s);
                continue;
            };
            m.last_inference = m.last_inference.max(s.last_inference);
            m.inference_count += s.inference_count;
            m.execution_count += s.execution_count;
            if let Some(from) = &s.inference_stats {
                add_infer_stats(m.inference_stats.get_or_insert_with(Default::default), from);
            }
            for b in s.batch_stats {
                match m
                    .batch_stats
                    .iter_mut()
                    .find(|x| x.batch_size == b.batch_size)
                {
                    Some(x) => merge_batch(x, &b),
                    None => m.batch_stats.push(b),
                }
            }
        }
    }
    ModelStatisticsResponse {
        model_stats: merged.into_values().collect(),
    }
}

fn merge_batch(into: &mut InferBatchStatistics, from: &InferBatchStatistics) {
    add_duration(&mut into.compute_input, &from.compute_input);
    add_duration(&mut into.compute_infer, &from.compute_infer);
    add_duration(&mut into.compute_output, &from.compute_output);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(count: u64, batch: u64) -> ModelStatisticsResponse {
        let d = Some(StatisticDuration {
            count,
            ns: count * 10,
        });
        ModelStatisticsResponse {
            model_stats: vec![ModelStatistics {
                name: "m".into(),
                version: "1".into(),
                inference_count: count,
                execution_count: count,
                inference_stats: Some(InferStatistics {
                    success: d,
                    ..Default::default()
                }),
                batch_stats: vec![InferBatchStatistics {
                    batch_size: batch,
                    compute_infer: d,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn statistics_of_several_servers_add_up() {
        let m = merge_statistics(vec![stats(3, 1), stats(4, 1), stats(5, 2)]);
        let s = &m.model_stats[0];
        assert_eq!(s.inference_count, 12);
        assert_eq!(s.inference_stats.unwrap().success.unwrap().count, 12);
        assert_eq!(s.batch_stats.len(), 2);
        assert_eq!(s.batch_stats[0].compute_infer.unwrap().count, 7);
    }
}
