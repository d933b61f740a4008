//! A model's batching settings: what Triton's config says, overridden by infergate's own.

use std::time::Duration;

use crate::{
    batch::config::{BatchMode, BatchingConfig, ModelBatching},
    error::GatewayError,
    model::ModelInfo,
    proto::inference::{
        ModelInferRequest, ModelInstanceGroup, infer_parameter::ParameterChoice,
        model_config::SchedulingChoice, model_instance_group::Kind,
    },
};

/// Effective batching settings of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub mode: BatchMode,
    pub max_batch_size: i64,
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<i64>,
    pub max_queue_size: usize,
    pub max_inflight_batches: usize,
    pub priority_levels: usize,
    /// Level used when a request names no priority (0-based).
    pub default_level: usize,
    pub max_priority_wait: Duration,
}

/// The default number of a model's batches in flight per endpoint, from its instance groups
/// in Triton's config: one per instance, so every instance can run a batch, and one more, so
/// that a batch waits in Triton while the answer of the previous one travels back and the next
/// one is sent, keeping an instance (a GPU above all) busy across the hop. One instance gets 2.
/// A fixed default would leave instances idle: a model with four gets at most two of them busy.
fn inflight_for_instances(groups: &[ModelInstanceGroup]) -> usize {
    let instances: usize = groups
        .iter()
        .map(|g| {
            let count = usize::try_from(g.count).unwrap_or(0).max(1);
            // Without a `gpus` list Triton puts `count` instances on each GPU it sees, and the
            // config it serves then lists them.
            match g.kind() {
                Kind::Gpu => count.saturating_mul(g.gpus.len().max(1)),
                Kind::Cpu | Kind::Auto | Kind::Model => count,
            }
        })
        .fold(0, usize::saturating_add);
    instances.max(1).saturating_add(1).min(MAX_DEFAULT_INFLIGHT)
}

/// The adaptive window's bound when neither infergate's config nor (a longer) Triton's sets
/// one: long enough for a batch to fill at a few thousand requests a second, and the rule
/// never waits longer than half a Triton call anyway.
pub const ADAPTIVE_DEFAULT_BOUND_US: u64 = 2_000;

/// A bound on the derived default (a config may set up to 1024 itself).
const MAX_DEFAULT_INFLIGHT: usize = 64;

impl ModelSettings {
    /// Settings from the model's Triton config, overridden by infergate's config. `None` when
    /// the model cannot be batched by the gateway (no batch dimension, sequence batching,
    /// decoupled) or batching is off for it.
    pub fn for_model(info: &ModelInfo, cfg: &BatchingConfig) -> Option<Self> {
        let none = ModelBatching::default();
        let ov = cfg.models.get(&info.name).unwrap_or(&none);
        let mode = ov.mode.unwrap_or(cfg.mode);
        let decoupled = info
            .config
            .model_transaction_policy
            .as_ref()
            .is_some_and(|p| p.decoupled);
        let sequence = matches!(
            info.config.scheduling_choice,
            Some(SchedulingChoice::SequenceBatching(_))
        );
        if mode == BatchMode::Off || info.max_batch_size <= 0 || decoupled || sequence {
            return None;
        }
        let triton = match &info.config.scheduling_choice {
            Some(SchedulingChoice::DynamicBatching(d)) => Some(d),
            _ => None,
        };
        let max_batch_size = ov
            .max_batch_size
            .map_or(info.max_batch_size, |m| m.clamp(1, info.max_batch_size));
        let triton_delay_us = triton.map_or(0, |d| d.max_queue_delay_microseconds);
        let delay_us = ov
            .max_queue_delay_us
            .or(cfg.max_queue_delay_us)
            .unwrap_or(match mode {
                // The adaptive rule decides whether to wait at all; this only bounds it.
                BatchMode::Adaptive => triton_delay_us.max(ADAPTIVE_DEFAULT_BOUND_US),
                BatchMode::On | BatchMode::Off => triton_delay_us,
            });
        let preferred = ov
            .preferred_batch_sizes
            .clone()
            .unwrap_or_else(|| {
                triton.map_or_else(Vec::new, |d| {
                    d.preferred_batch_size
                        .iter()
                        .map(|&p| i64::from(p))
                        .collect()
                })
            })
            .into_iter()
            .filter(|&p| p > 0 && p <= max_batch_size)
            .collect();
        let levels = (cfg.priority_levels as usize)
            .max(triton.map_or(0, |d| d.priority_levels as usize))
            .max(1);
        let default_level = triton
            .map(|d| d.default_priority_level as usize)
            .filter(|&l| l >= 1 && l <= levels)
            .map_or(levels.div_ceil(2) - 1, |l| l - 1);
        Some(Self {
            mode,
            max_batch_size,
            max_queue_delay: Duration::from_micros(delay_us),
            preferred_batch_sizes: preferred,
            max_queue_size: ov.max_queue_size.unwrap_or(cfg.max_queue_size),
            max_inflight_batches: ov
                .max_inflight_batches
                .or(cfg.max_inflight_batches)
                .unwrap_or_else(|| inflight_for_instances(&info.config.instance_group)),
            priority_levels: levels,
            default_level,
            max_priority_wait: Duration::from_millis(cfg.max_priority_wait_ms),
        })
    }

    /// The queue level for a request's `priority` parameter (Triton's convention: 1 is the
    /// highest, 0 or absent means the default level).
    pub fn level_of(&self, req: &ModelInferRequest) -> Result<usize, GatewayError> {
        let Some(p) = req.parameters.get("priority") else {
            return Ok(self.default_level);
        };
        let value = match p.parameter_choice {
            Some(ParameterChoice::Int64Param(v)) if v >= 0 => v as u64,
            Some(ParameterChoice::Uint64Param(v)) => v,
            _ => {
                return Err(GatewayError::invalid(
                    "parameter 'priority' must be a non-negative integer",
                ));
            }
        };
        match value {
            0 => Ok(self.default_level),
            v if v as usize <= self.priority_levels => Ok(v as usize - 1),
            v => Err(GatewayError::invalid(format!(
                "parameter 'priority' is {v}, the model has {} priority levels",
                self.priority_levels
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(max_batch_size: i32, scheduling: Option<SchedulingChoice>) -> ModelInfo {
        use crate::proto::inference::{ModelConfig, ModelMetadataResponse};
        let metadata = ModelMetadataResponse {
            name: "m".into(),
            ..Default::default()
        };
        let config = ModelConfig {
            name: "m".into(),
            max_batch_size,
            scheduling_choice: scheduling,
            ..Default::default()
        };
        ModelInfo::new(metadata, config)
    }

    fn dynamic(delay_us: u64, preferred: &[i32], levels: u64, default: u64) -> SchedulingChoice {
        SchedulingChoice::DynamicBatching(crate::proto::inference::ModelDynamicBatching {
            preferred_batch_size: preferred.to_vec(),
            max_queue_delay_microseconds: delay_us,
            priority_levels: levels,
            default_priority_level: default,
            ..Default::default()
        })
    }

    #[test]
    fn batching_is_adaptive_by_default_with_the_triton_configs_settings() {
        let cfg = BatchingConfig::default();
        let info = model(64, Some(dynamic(300, &[8, 32, 128], 3, 2)));
        let s = ModelSettings::for_model(&info, &cfg)
            .expect("a model with a batch dimension is batched by default");
        assert_eq!(s.mode, BatchMode::Adaptive);
        assert_eq!(s.max_batch_size, 64);
        // Adaptive: Triton's delay, but at least the default bound.
        assert_eq!(s.max_queue_delay, Duration::from_micros(2_000));
        let long = model(64, Some(dynamic(5_000, &[], 0, 0)));
        let s_long = ModelSettings::for_model(&long, &cfg).unwrap();
        assert_eq!(s_long.max_queue_delay, Duration::from_micros(5_000));
        // 128 is over max_batch_size, so it can never be reached.
        assert_eq!(s.preferred_batch_sizes, vec![8, 32]);
        assert_eq!((s.priority_levels, s.default_level), (3, 1));
        assert_eq!(s.max_queue_size, cfg.max_queue_size);
        // No instance groups in this config (Triton always serves one): as for one instance.
        assert_eq!(s.max_inflight_batches, 2);
        // No dynamic_batching block: still batched, with the default bound and the gateway's
        // levels; requests without a priority go to the middle level, rounded up (1 of 2).
        let plain = ModelSettings::for_model(&model(8, None), &cfg).unwrap();
        assert_eq!(
            plain.max_queue_delay,
            Duration::from_micros(ADAPTIVE_DEFAULT_BOUND_US)
        );
        assert!(plain.preferred_batch_sizes.is_empty());
        assert_eq!((plain.priority_levels, plain.default_level), (2, 0));
        // A fixed window (`on`) is Triton's delay exactly, none without one.
        let on = BatchingConfig {
            mode: BatchMode::On,
            ..Default::default()
        };
        let s = ModelSettings::for_model(&info, &on).unwrap();
        assert_eq!(s.max_queue_delay, Duration::from_micros(300));
        let plain = ModelSettings::for_model(&model(8, None), &on).unwrap();
        assert_eq!(plain.max_queue_delay, Duration::ZERO);
    }

    #[test]
    fn call_slots_default_to_one_per_model_instance_plus_one() {
        let group = |kind: Kind, count: i32, gpus: &[i32]| ModelInstanceGroup {
            kind: kind as i32,
            count,
            gpus: gpus.to_vec(),
            ..Default::default()
        };
        let slots = |groups: Vec<ModelInstanceGroup>, cfg: &BatchingConfig| {
            let mut info = model(8, None);
            info.config.instance_group = groups;
            ModelSettings::for_model(&info, cfg)
                .unwrap()
                .max_inflight_batches
        };
        let cfg = BatchingConfig::default();
        assert_eq!(slots(vec![group(Kind::Cpu, 1, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Cpu, 4, &[])], &cfg), 5);
        // A count of 0 still runs one instance in Triton.
        assert_eq!(slots(vec![group(Kind::Cpu, 0, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 2);
        assert_eq!(slots(vec![group(Kind::Gpu, 2, &[0, 1])], &cfg), 5);
        assert_eq!(slots(vec![group(Kind::Model, 1, &[])], &cfg), 2);
        assert_eq!(
            slots(
                vec![group(Kind::Cpu, 1, &[]), group(Kind::Gpu, 1, &[0])],
                &cfg
            ),
            3
        );
        assert_eq!(
            slots(vec![group(Kind::Cpu, i32::MAX, &[])], &cfg),
            MAX_DEFAULT_INFLIGHT
        );
        // Configuration wins: the gateway-wide value, then the model's own.
        let mut cfg = BatchingConfig {
            max_inflight_batches: Some(4),
            ..Default::default()
        };
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 4);
        cfg.models.insert(
            "m".into(),
            crate::batch::config::ModelBatching {
                max_inflight_batches: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(slots(vec![group(Kind::Gpu, 1, &[])], &cfg), 1);
    }

    #[test]
    fn configuration_overrides_the_triton_config_within_its_limits() {
        let mut cfg = BatchingConfig {
            max_queue_delay_us: Some(1_000),
            ..Default::default()
        };
        let info = model(64, Some(dynamic(300, &[], 0, 0)));
        // The gateway-wide delay wins over Triton's.
        let s = ModelSettings::for_model(&info, &cfg).unwrap();
        assert_eq!(s.max_queue_delay, Duration::from_micros(1_000));
        cfg.models.insert(
            "m".into(),
            crate::batch::config::ModelBatching {
                mode: Some(BatchMode::Adaptive),
                max_batch_size: Some(500),
                max_queue_delay_us: Some(50),
                preferred_batch_sizes: Some(vec![0, 16, 65]),
                max_queue_size: Some(7),
                max_inflight_batches: Some(3),
                max_concurrent_requests: None,
            },
        );
        let s = ModelSettings::for_model(&info, &cfg).unwrap();
        assert_eq!(s.mode, BatchMode::Adaptive);
        // Never above Triton's max_batch_size, which Triton would refuse.
        assert_eq!(s.max_batch_size, 64);
        assert_eq!(s.max_queue_delay, Duration::from_micros(50));
        assert_eq!(s.preferred_batch_sizes, vec![16]);
        assert_eq!((s.max_queue_size, s.max_inflight_batches), (7, 3));
    }

    #[test]
    fn models_the_gateway_must_not_batch_get_no_settings() {
        let cfg = BatchingConfig::default();
        let no_batch_dim = model(0, Some(dynamic(0, &[], 0, 0)));
        let sequence = model(
            8,
            Some(SchedulingChoice::SequenceBatching(
                crate::proto::inference::ModelSequenceBatching::default(),
            )),
        );
        let mut decoupled = model(8, None);
        decoupled.config.model_transaction_policy =
            Some(crate::proto::inference::ModelTransactionPolicy { decoupled: true });
        for (what, info) in [
            ("no batch dimension", &no_batch_dim),
            ("sequence", &sequence),
            ("decoupled", &decoupled),
        ] {
            assert_eq!(ModelSettings::for_model(info, &cfg), None, "{what}");
        }
        let off = BatchingConfig {
            mode: BatchMode::Off,
            ..Default::default()
        };
        assert_eq!(ModelSettings::for_model(&model(8, None), &off), None);
        // ... unless configured on for that model alone.
        let mut one_on = off.clone();
        one_on.models.insert(
            "m".into(),
            crate::batch::config::ModelBatching {
                mode: Some(BatchMode::On),
                ..Default::default()
            },
        );
        assert!(ModelSettings::for_model(&model(8, None), &one_on).is_some());
    }
}
