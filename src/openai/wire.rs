//! OpenAI's request bodies (chat completions and completions) as infergate reads them, with
//! the checks that name the field at fault. Responses are written where they are made
//! ([`super::reply`]).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{errors::OpenAiError, model::ChatMessage};

/// Fields of `/v1/chat/completions` and `/v1/completions` (one shape: each endpoint checks
/// that it got `messages` or `prompt`).
#[derive(Debug, Default, Deserialize)]
pub struct LmRequest {
    pub model: String,
    pub messages: Option<Vec<InMessage>>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u32>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Everything else: accepted only where its value asks for nothing infergate would
    /// ignore ([`LmRequest::check_others`]).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
    /// Token arrays: refused with a message (the model's tokenizer is for counting only).
    Tokens(Value),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// OpenAI's own limit on stop sequences.
const MAX_STOPS: usize = 4;

/// Fields infergate accepts when their value changes nothing (`false`, 0, null, empty), and
/// ones it ignores whatever they hold (they only label the request).
const NEUTRAL: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "suffix",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
];
const LABELS: &[&str] = &["user", "metadata", "store", "service_tier"];

fn neutral(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty() || s == "none" || s == "auto",
        _ => false,
    }
}

impl LmRequest {
    /// Parses a body; a malformed one names the field.
    pub fn parse(body: &[u8]) -> Result<Self, OpenAiError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner().to_string();
            if path == "." || path == "?" {
                // A missing field is named in serde's message (missing field `model`).
                let param = inner
                    .split('`')
                    .nth(1)
                    .filter(|_| inner.starts_with("missing field"))
                    .unwrap_or("body");
                return OpenAiError::invalid(param, format!("malformed request body: {inner}"));
            }
            OpenAiError::invalid(&path, format!("{path}: {inner}"))
        })
    }

    /// Refuses what infergate would otherwise silently ignore.
    pub fn check_others(&self) -> Result<(), OpenAiError> {
        for (key, value) in &self.other {
            if LABELS.contains(&key.as_str()) {
                continue;
            }
            if key == "response_format" {
                if value.get("type").and_then(Value::as_str) == Some("text") || value.is_null() {
                    continue;
                }
                return Err(OpenAiError::invalid(
                    key,
                    "response_format: only {\"type\": \"text\"} is supported",
                ));
            }
            if key == "best_of" && (value.is_null() || value.as_u64() == Some(1)) {
                continue;
            }
            if NEUTRAL.contains(&key.as_str()) {
                if neutral(value) {
                    continue;
                }
                return Err(OpenAiError::invalid(
                    key,
                    format!("{key}: not supported by infergate's OpenAI front"),
                ));
            }
            return Err(OpenAiError::invalid(
                key,
                format!("Unrecognized request argument supplied: {key}"),
            ));
        }
        Ok(())
    }

    /// The stop sequences, checked.
    pub fn stops(&self) -> Result<Vec<String>, OpenAiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(OpenAiError::invalid(
                "stop",
                format!("stop: at most {MAX_STOPS} sequences, got {}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(OpenAiError::invalid("stop", "stop: a sequence is empty"));
        }
        Ok(stops)
    }

    /// The chat's messages, each content one text.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, OpenAiError> {
        let messages = self
            .messages
            .as_ref()
            .ok_or_else(|| OpenAiError::invalid("messages", "messages: required"))?;
        if messages.is_empty() {
            return Err(OpenAiError::invalid(
                "messages",
                "messages: at least one message is required",
            ));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.get("type").and_then(Value::as_str), p.get("text")) {
                                (Some("text"), Some(Value::String(t))) => text.push_str(t),
                                _ => {
                                    return Err(OpenAiError::invalid(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!("messages[{i}].content[{j}]: only text parts are supported"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content,
                    name: m.name.clone(),
                })
            })
            .collect()
    }

    /// The prompts of a completions request (one choice set per prompt).
    pub fn prompts(&self) -> Result<Vec<String>, OpenAiError> {
        match &self.prompt {
            None => Err(OpenAiError::invalid("prompt", "prompt: required")),
            Some(Prompt::One(p)) => Ok(vec![p.clone()]),
            Some(Prompt::Many(v)) if v.is_empty() => Err(OpenAiError::invalid(
                "prompt",
                "prompt: at least one prompt is required",
            )),
            Some(Prompt::Many(v)) => Ok(v.clone()),
            Some(Prompt::Tokens(_)) => Err(OpenAiError::invalid(
                "prompt",
                "prompt: must be a string or an array of strings (token arrays are not supported)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<LmRequest, OpenAiError> {
        LmRequest::parse(body.as_bytes())
    }

    #[test]
    fn malformed_fields_are_named() {
        let e = parse(r#"{"model": "m", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse(r#"{"messages": []}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"), "{e:?}");
        let e = parse("{not json").unwrap_err();
        assert_eq!(e.status, 400);
        let r = parse(r#"{"model": "m", "prompt": [1, 2]}"#).unwrap();
        assert_eq!(r.prompts().unwrap_err().param.as_deref(), Some("prompt"));
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_neutral_ones_pass() {
        let r = parse(
            r#"{"model": "m", "user": "u1", "logprobs": false, "frequency_penalty": 0,
                "response_format": {"type": "text"}, "tools": []}"#,
        )
        .unwrap();
        r.check_others().unwrap();
        let r = parse(r#"{"model": "m", "frequency_penalty": 0.5}"#).unwrap();
        assert_eq!(
            r.check_others().unwrap_err().param.as_deref(),
            Some("frequency_penalty")
        );
        let r = parse(r#"{"model": "m", "temprature": 1}"#).unwrap();
        let e = r.check_others().unwrap_err();
        assert!(
            e.message
                .contains("Unrecognized request argument supplied: temprature")
        );
    }

    #[test]
    fn stops_and_messages_are_checked() {
        let r = parse(r#"{"model": "m", "stop": ["a", "b", "c", "d", "e"]}"#).unwrap();
        assert_eq!(r.stops().unwrap_err().param.as_deref(), Some("stop"));
        let r = parse(
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.chat_messages().unwrap_err().param.as_deref(),
            Some("messages[0].content[1]")
        );
        let r =
            parse(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        assert_eq!(r.chat_messages().unwrap()[0].content, "hi");
    }
}
