//! `[openai]` (files only): the language models the OpenAI front serves, and each tenant's
//! token and request budgets.
//!
//! ```toml
//! [[openai.models]]
//! name = "tiny-chat"                               # what clients call it
//! triton_model = "tiny_chat"                       # a Triton generate model or a route
//! tokenizer = "triton-models/tiny_chat/tokenizer"  # tokenizer.json + tokenizer_config.json
//!
//! [[openai.tenants]]
//! tenant = "team-a"
//! tokens_per_minute = 60000
//! requests_per_minute = 600
//! models = ["tiny-chat"]                           # empty: every model
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    pub models: Vec<LmModelConfig>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// The most `max_tokens` (and `n` × it) one request may ask for; more is refused (400).
    pub max_tokens_limit: u32,
    /// The most choices (`n`) one request may ask for.
    pub max_choices: u32,
    /// Budgets of tenants not listed in `tenants`: 0 = unlimited.
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    pub tenants: Vec<TenantBudget>,
    /// The largest file `/v1/files` keeps, in bytes.
    pub max_file_bytes: u64,
    /// The most lines one batch may have.
    pub max_batch_lines: u64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            default_max_tokens: 256,
            max_tokens_limit: 32_768,
            max_choices: 8,
            tokens_per_minute: 0,
            requests_per_minute: 0,
            tenants: Vec::new(),
            max_file_bytes: 200 << 20,
            max_batch_lines: 50_000,
        }
    }
}

/// One model of the OpenAI front.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LmModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// The Triton model (or route) that generates: inputs `text_input` and, where it takes
    /// them, `max_tokens`, `temperature`, `top_p`, `random_seed`, `stream`; output
    /// `text_output`. Empty: `name`.
    pub triton_model: String,
    /// A directory with the model's `tokenizer.json` and `tokenizer_config.json` (its
    /// `chat_template`, `eos_token`, `bos_token`).
    pub tokenizer: PathBuf,
}

impl LmModelConfig {
    pub fn target(&self) -> &str {
        if self.triton_model.is_empty() {
            &self.name
        } else {
            &self.triton_model
        }
    }
}

/// One tenant's budgets (the tenant of `[auth]` keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantBudget {
    pub tenant: String,
    /// Prompt and completion tokens in any minute; 0 = unlimited.
    pub tokens_per_minute: u64,
    /// Requests in any minute; 0 = unlimited.
    pub requests_per_minute: u64,
    /// The models this tenant may call (and `/v1/models` lists); empty = every model.
    pub models: Vec<String>,
}

const MAX_PER_MINUTE: u64 = 1_000_000_000;

impl Section for OpenAiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        crate::section::in_range(
            "openai.max_tokens_limit",
            self.max_tokens_limit.into(),
            1,
            10_000_000,
        )?;
        crate::section::in_range(
            "openai.default_max_tokens",
            self.default_max_tokens.into(),
            1,
            self.max_tokens_limit.into(),
        )?;
        crate::section::in_range("openai.max_choices", self.max_choices.into(), 1, 128)?;
        crate::section::in_range(
            "openai.tokens_per_minute",
            self.tokens_per_minute,
            0,
            MAX_PER_MINUTE,
        )?;
        crate::section::in_range(
            "openai.requests_per_minute",
            self.requests_per_minute,
            0,
            MAX_PER_MINUTE,
        )?;
        crate::section::in_range("openai.max_file_bytes", self.max_file_bytes, 1024, 4 << 30)?;
        crate::section::in_range("openai.max_batch_lines", self.max_batch_lines, 1, 1_000_000)?;
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let bad = |msg: String| invalid("openai.models", format!("model #{}: {msg}", i + 1));
            if m.name.is_empty() || m.name.len() > 256 {
                return Err(bad("name must be 1..=256 characters".into()));
            }
            if !names.insert(&m.name) {
                return Err(bad(format!("'{}' is listed twice", m.name)));
            }
            let json = m.tokenizer.join("tokenizer.json");
            if !json.is_file() {
                return Err(bad(format!(
                    "'{}': no tokenizer.json in tokenizer directory '{}'",
                    m.name,
                    m.tokenizer.display()
                )));
            }
        }
        let mut tenants = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let bad = |msg: String| invalid("openai.tenants", format!("tenant #{}: {msg}", i + 1));
            if t.tenant.is_empty() {
                return Err(bad("tenant is required".into()));
            }
            if !tenants.insert(&t.tenant) {
                return Err(bad(format!("'{}' is listed twice", t.tenant)));
            }
            if t.tokens_per_minute > MAX_PER_MINUTE || t.requests_per_minute > MAX_PER_MINUTE {
                return Err(bad(format!("budgets must be 0 ..= {MAX_PER_MINUTE}")));
            }
            if let Some(m) = t.models.iter().find(|m| !names.contains(m)) {
                return Err(bad(format!(
                    "'{}' may call model '{m}', which openai.models does not list",
                    t.tenant
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> LmModelConfig {
        LmModelConfig {
            name: name.into(),
            triton_model: String::new(),
            tokenizer: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/triton-models/tiny_chat/tokenizer"
            )
            .into(),
        }
    }

    #[test]
    fn settings_are_checked_and_named() {
        let ok = OpenAiConfig {
            models: vec![model("tiny-chat")],
            tenants: vec![TenantBudget {
                tenant: "a".into(),
                models: vec!["tiny-chat".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(ok.models[0].target(), "tiny-chat");

        let mut twice = ok.clone();
        twice.models.push(model("tiny-chat"));
        assert!(twice.validate().unwrap_err().to_string().contains("twice"));

        let mut no_tokenizer = ok.clone();
        no_tokenizer.models[0].tokenizer = "/nonexistent".into();
        let e = no_tokenizer.validate().unwrap_err().to_string();
        assert!(
            e.contains("openai.models") && e.contains("tokenizer.json"),
            "{e}"
        );

        let mut unknown = ok.clone();
        unknown.tenants[0].models = vec!["gpt-9".into()];
        let e = unknown.validate().unwrap_err().to_string();
        assert!(e.contains("gpt-9") && e.contains("openai.tenants"), "{e}");

        let mut big_default = ok;
        big_default.default_max_tokens = big_default.max_tokens_limit + 1;
        let e = big_default.validate().unwrap_err().to_string();
        assert!(e.contains("openai.default_max_tokens"), "{e}");
    }
}
