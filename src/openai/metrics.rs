//! The OpenAI front's metrics (`infergate_openai_*`): usage per tenant and model, and the
//! budgets' refusals. Tenants come from `[auth]` keys and models from `[openai]`, so the
//! series are bounded by the config.

use std::{sync::OnceLock, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
};

use crate::telemetry::metrics::{Hist, register};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabel {
    pub tenant: String,
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub tenant: String,
    pub model: String,
    /// `ok`, `error` (after admission) or `cancelled` (the client left).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub tenant: String,
    /// `tokens` or `requests`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOnly {
    pub model: String,
}

pub struct OpenAiMetrics {
    pub tokens: Family<UsageLabel, Counter>,
    pub requests: Family<RequestLabel, Counter>,
    pub rate_limited: Family<LimitLabel, Counter>,
    /// From admission to the first streamed text.
    pub first_token: Hist<ModelOnly>,
}

fn seconds() -> Histogram {
    // 100 µs .. ~7 min, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 23))
}

pub fn metrics() -> &'static OpenAiMetrics {
    static M: OnceLock<OpenAiMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = OpenAiMetrics {
            tokens: Family::default(),
            requests: Family::default(),
            rate_limited: Family::default(),
            first_token: Family::new_with_constructor(seconds),
        };
        register(
            "openai_tokens",
            "Tokens of the OpenAI front by tenant, model and kind (prompt, completion), as the model's tokenizer counts them",
            m.tokens.clone(),
        );
        register(
            "openai_requests",
            "Requests of the OpenAI front admitted, by tenant, model and outcome",
            m.requests.clone(),
        );
        register(
            "openai_rate_limited",
            "Requests refused for a tenant's budget (tokens or requests per minute)",
            m.rate_limited.clone(),
        );
        register(
            "openai_first_token_seconds",
            "Time from a request's admission to its first streamed text, by model",
            m.first_token.clone(),
        );
        m
    })
}

impl OpenAiMetrics {
    pub fn used(&self, tenant: &str, model: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.tokens
                .get_or_create(&UsageLabel {
                    tenant: tenant.to_string(),
                    model: model.to_string(),
                    kind,
                })
                .inc_by(n);
        }
    }

    pub fn ended(&self, tenant: &str, model: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabel {
                tenant: tenant.to_string(),
                model: model.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn limited(&self, tenant: &str, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabel {
                tenant: tenant.to_string(),
                limit,
            })
            .inc();
    }

    pub fn first(&self, model: &str, after: Duration) {
        self.first_token
            .get_or_create(&ModelOnly {
                model: model.to_string(),
            })
            .observe(after.as_secs_f64());
    }
}
