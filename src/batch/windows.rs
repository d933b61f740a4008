//! One window, not two. When infergate batches a model whose Triton config also has a
//! dynamic-batcher delay, a batch waits out infergate's window and then Triton's again. That
//! is said once per model at start (every ready model) and again whenever a fetched
//! description changes either delay; Triton's queue time itself is a metric
//! (`backend::stats`).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use super::ModelSettings;
use crate::{
    batch::config::BatchMode, model::ModelInfo, proto::inference::model_config::SchedulingChoice,
};

/// A model batched by infergate with a Triton-side delay too.
#[derive(Debug, Clone, PartialEq)]
pub struct TwoWindows {
    pub model: String,
    pub mode: BatchMode,
    /// infergate's window (its bound, in adaptive mode).
    pub gateway: Duration,
    /// Triton's `max_queue_delay_microseconds`.
    pub triton: Duration,
}

/// The two windows of a model, if it has two.
pub fn two_windows(info: &ModelInfo, settings: Option<&ModelSettings>) -> Option<TwoWindows> {
    let settings = settings?;
    let Some(SchedulingChoice::DynamicBatching(d)) = &info.config.scheduling_choice else {
        return None;
    };
    (d.max_queue_delay_microseconds > 0).then(|| TwoWindows {
        model: info.name.clone(),
        mode: settings.mode,
        gateway: settings.max_queue_delay,
        triton: Duration::from_micros(d.max_queue_delay_microseconds),
    })
}

/// What was said per model, so that a refresh that changes nothing says nothing.
#[derive(Default)]
pub(super) struct Reported(Mutex<HashMap<String, Option<TwoWindows>>>);

impl Reported {
    /// Warns when the model's windows differ from what was last said of it.
    pub(super) fn check(&self, info: &ModelInfo, settings: Option<&ModelSettings>) {
        let now = two_windows(info, settings);
        let mut said = self.0.lock().expect("windows lock");
        if said.get(&info.name) == Some(&now) {
            return;
        }
        if let Some(w) = &now {
            tracing::warn!(
                model = %w.model,
                infergate_window_us = w.gateway.as_micros() as u64,
                triton_max_queue_delay_us = w.triton.as_micros() as u64,
                "model '{}' is batched in two windows: infergate's ({}, up to {} µs) and then \
                 Triton's dynamic batcher (max_queue_delay_microseconds: {}). Recommended: \
                 max_queue_delay_microseconds: 0 in its config.pbtxt, so that infergate holds \
                 the one window (Triton still merges batches that arrive together), or \
                 batching mode \"off\" for this model in infergate, so that Triton holds it",
                w.model,
                format!("{:?}", w.mode).to_lowercase(),
                w.gateway.as_micros(),
                w.triton.as_micros(),
            );
        }
        said.insert(info.name.clone(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        batch::config::BatchingConfig,
        proto::inference::{ModelConfig, ModelDynamicBatching, ModelMetadataResponse},
    };

    fn model(scheduling: Option<SchedulingChoice>) -> ModelInfo {
        let metadata = ModelMetadataResponse {
            name: "m".into(),
            ..Default::default()
        };
        let config = ModelConfig {
            name: "m".into(),
            max_batch_size: 8,
            scheduling_choice: scheduling,
            ..Default::default()
        };
        ModelInfo::new(metadata, config)
    }

    fn delay(us: u64) -> Option<SchedulingChoice> {
        Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            max_queue_delay_microseconds: us,
            ..Default::default()
        }))
    }

    #[test]
    fn two_windows_only_where_both_sides_batch_with_a_delay() {
        let cfg = BatchingConfig::default();
        let info = model(delay(100));
        let s = ModelSettings::for_model(&info, &cfg);
        let w = two_windows(&info, s.as_ref()).expect("adaptive here, 100 µs in Triton");
        assert_eq!(w.triton, Duration::from_micros(100));
        assert_eq!(w.gateway, Duration::from_micros(2_000));
        assert_eq!(w.mode, BatchMode::Adaptive);
        // Triton without a delay, or with no dynamic batcher, or infergate not batching.
        let no_delay = model(delay(0));
        assert_eq!(two_windows(&no_delay, s.as_ref()), None);
        assert_eq!(two_windows(&model(None), s.as_ref()), None);
        assert_eq!(two_windows(&info, None), None);
    }
}
