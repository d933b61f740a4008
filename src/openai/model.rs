//! One language model of the OpenAI front: its tokenizer (token counts for `usage` and the
//! budgets) and its chat template (a chat's messages as the one prompt text the model reads).

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::config::LmModelConfig;
use crate::error::GatewayError;

/// A chat message as the template sees it (its content already one text).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

pub struct LmModel {
    pub name: String,
    /// The Triton model or route that generates.
    pub target: String,
    tokenizer: Tokenizer,
    /// `None` when the model has no chat template: it serves `/v1/completions` only.
    template: Option<Environment<'static>>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for LmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmModel")
            .field("name", &self.name)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A special token of `tokenizer_config.json`: a string, or an object with its `content`.
fn special(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl LmModel {
    /// Loads the tokenizer and compiles the template; an error names the file and the fault,
    /// so a bad model stops the start rather than its first request.
    pub fn load(cfg: &LmModelConfig) -> Result<Self, String> {
        let dir: &Path = &cfg.tokenizer;
        let json = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&json)
            .map_err(|e| format!("model '{}': {}: {e}", cfg.name, json.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("model '{}': {}: {e}", cfg.name, config_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => {
                return Err(format!(
                    "model '{}': {}: {e}",
                    cfg.name,
                    config_path.display()
                ));
            }
        };
        let template = match config.get("chat_template").and_then(Value::as_str) {
            Some(src) => {
                let mut env = Environment::new();
                // Hugging Face templates call Python's str methods and raise_exception.
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function("raise_exception", |msg: String| {
                    Err::<String, _>(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
                });
                env.add_template_owned("chat", src.to_string())
                    .map_err(|e| {
                        format!(
                            "model '{}': chat_template of {}: {e}",
                            cfg.name,
                            config_path.display()
                        )
                    })?;
                Some(env)
            }
            None => None,
        };
        Ok(Self {
            name: cfg.name.clone(),
            target: cfg.target().to_string(),
            tokenizer,
            template,
            bos: special(&config, "bos_token"),
            eos: special(&config, "eos_token"),
        })
    }

    /// Tokens in `text` as the model's tokenizer counts them (no special tokens added: a
    /// rendered chat prompt already holds its own).
    pub fn count(&self, text: &str) -> Result<u64, GatewayError> {
        if text.is_empty() {
            return Ok(0);
        }
        self.tokenizer
            .encode(text, false)
            .map(|e| e.len() as u64)
            .map_err(|e| GatewayError::Internal(format!("tokenizer of '{}': {e}", self.name)))
    }

    pub fn chats(&self) -> bool {
        self.template.is_some()
    }

    /// The prompt a chat renders to, ready for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, GatewayError> {
        let env = self.template.as_ref().ok_or_else(|| {
            GatewayError::invalid(format!(
                "model: '{}' has no chat template; use /v1/completions",
                self.name
            ))
        })?;
        let template = env
            .get_template("chat")
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| {
                // A template's own refusal (raise_exception) is about the messages.
                let detail = e.detail().map_or_else(|| e.to_string(), str::to_string);
                GatewayError::invalid(format!("messages: {detail}"))
            })
    }
}

/// `triton-models/tiny_chat`, for unit tests.
#[cfg(test)]
pub(crate) fn tiny() -> LmModel {
    LmModel::load(&LmModelConfig {
        name: "tiny-chat".into(),
        triton_model: "tiny_chat".into(),
        tokenizer: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/triton-models/tiny_chat/tokenizer"
        )
        .into(),
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }

    #[test]
    fn renders_the_template_and_counts_its_tokens() {
        let m = tiny();
        let prompt = m
            .render(&[msg("system", "Be quick."), msg("user", "Hello, world!")])
            .unwrap();
        assert_eq!(
            prompt,
            "<|system|>\nBe quick.<|end|>\n<|user|>\nHello, world!<|end|>\n<|assistant|>\n"
        );
        // Markers count one token each: 3 markers + 2 ends + "Be quick ." + "Hello , world !".
        assert_eq!(m.count(&prompt).unwrap(), 5 + 3 + 4);
        // An unknown word is one [UNK] token, not zero.
        assert_eq!(m.count("zebra zebra").unwrap(), 2);
        assert_eq!(m.count("").unwrap(), 0);
    }

    #[test]
    fn a_templates_refusal_names_the_messages() {
        let e = tiny().render(&[msg("tool", "x")]).unwrap_err();
        assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("role must be"), "{e}");
    }

    #[test]
    fn a_bad_tokenizer_stops_the_start_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("infergate-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let e = LmModel::load(&LmModelConfig {
            name: "broken".into(),
            tokenizer: dir.clone(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("broken") && e.contains("tokenizer.json"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
