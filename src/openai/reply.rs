//! OpenAI's answer shapes, written once for the edge's answers and the Batch API's output
//! lines: a whole completion, a streamed chunk, and `usage`.

use serde_json::{Value, json};

use super::Usage;

/// Which endpoint: the shapes of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
}

impl Kind {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Text => "/v1/completions",
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        [Self::Chat, Self::Text]
            .into_iter()
            .find(|k| k.path() == path)
    }

    /// A fresh answer id (`chatcmpl-…`, `cmpl-…`).
    pub fn new_id(self) -> String {
        let prefix = match self {
            Self::Chat => "chatcmpl",
            Self::Text => "cmpl",
        };
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }

    pub fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Text, _) => "text_completion",
        }
    }
}

/// The head every answer and chunk shares.
#[derive(Debug, Clone)]
pub struct Head {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn usage(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// One choice of a whole answer.
pub struct Whole<'a> {
    pub index: u32,
    pub text: &'a str,
    pub finish: Option<&'a str>,
}

impl Head {
    pub fn whole(&self, choices: &[Whole<'_>], u: Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .map(|c| match self.kind {
                Kind::Chat => json!({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": c.finish,
                }),
                Kind::Text => json!({
                    "index": c.index,
                    "text": c.text,
                    "logprobs": null,
                    "finish_reason": c.finish,
                }),
            })
            .collect();
        json!({
            "id": self.id,
            "object": self.kind.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage(u),
        })
    }

    /// One chunk of a streamed answer; `usage` is set only when the client asked for it.
    pub fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.kind.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A choice's part of a chunk: its text (chat: `delta`, the role in the first) and its
    /// finish reason once it ended.
    pub fn part(&self, index: u32, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }
}
