//! One choice of a completion: the Triton request its sampling maps to, and its text as the
//! model sends it, cut at a stop sequence or at `max_tokens`.
//!
//! The mapping follows the input names of Triton's TensorRT-LLM backend (`text_input`,
//! `max_tokens`, `temperature`, `top_p`, `random_seed`, `stream`; output `text_output`). An
//! input the model lacks is not sent; a sampling setting the request gives for an input the
//! model lacks is refused (400 naming it), never silently dropped. Stop sequences and the
//! token limit are also enforced here, so they hold for any model: reaching one drops the
//! stream, which cancels the request in Triton.

use serde_json::{Value, json};

use super::model::LmModel;
use crate::{
    error::GatewayError,
    model::ModelInfo,
    proto::inference::{
        ModelInferRequest, ModelInferResponse, model_infer_request::InferInputTensor,
    },
    streams::{Responses, triton_error},
    tensor::{self, DataType},
};

/// What a request asks of each choice.
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub max_tokens: u32,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub stops: Vec<String>,
}

/// Adds `name` = `value` when the model takes it; `Ok(false)` when it does not.
fn add(
    req: &mut ModelInferRequest,
    info: &ModelInfo,
    name: &str,
    value: Value,
) -> Result<bool, GatewayError> {
    let Some(spec) = info.inputs.iter().find(|s| s.name == name) else {
        return Ok(false);
    };
    let dtype = spec.dtype.ok_or_else(|| {
        GatewayError::Internal(format!(
            "input '{name}' of model '{}': datatype {} is not supported",
            info.name, spec.datatype
        ))
    })?;
    let (raw, _) = tensor::json_to_raw(dtype, &json!([value]))
        .map_err(|e| GatewayError::invalid(format!("{name}: {e}")))?;
    req.inputs.push(InferInputTensor {
        name: name.to_string(),
        datatype: dtype.as_str().to_string(),
        shape: if info.max_batch_size > 0 {
            vec![1, 1]
        } else {
            vec![1]
        },
        ..Default::default()
    });
    req.raw_input_contents.push(raw);
    Ok(true)
}

/// The Triton request of one choice. `choice` shifts the seed, so `n` seeded choices differ
/// from each other and repeat from run to run.
pub fn triton_request(
    model: &LmModel,
    info: &ModelInfo,
    prompt: &str,
    s: &Sampling,
    choice: u64,
) -> Result<ModelInferRequest, GatewayError> {
    let mut req = ModelInferRequest {
        model_name: model.target.clone(),
        ..Default::default()
    };
    if !add(&mut req, info, "text_input", json!(prompt))? {
        return Err(GatewayError::Internal(format!(
            "model '{}' (Triton model '{}') has no input 'text_input'; the OpenAI front needs a text-in, text-out generate model",
            model.name, info.name
        )));
    }
    add(&mut req, info, "max_tokens", json!(s.max_tokens))?;
    add(&mut req, info, "stream", json!(s.stream))?;
    let asked = [
        (
            "temperature",
            "temperature",
            s.temperature.map(|v| json!(v)),
        ),
        ("top_p", "top_p", s.top_p.map(|v| json!(v))),
        (
            "seed",
            "random_seed",
            s.seed.map(|v| json!(v.wrapping_add(choice))),
        ),
    ];
    for (param, input, value) in asked {
        if let Some(v) = value
            && !add(&mut req, info, input, v)?
        {
            return Err(GatewayError::invalid(format!(
                "{param}: model '{}' takes no '{input}' input, so it cannot apply {param}",
                model.name
            )));
        }
    }
    Ok(req)
}

/// The text of a response's `text_output` (every element, in order).
pub fn text_of(resp: &ModelInferResponse) -> Result<Option<String>, GatewayError> {
    let Some(i) = resp.outputs.iter().position(|o| o.name == "text_output") else {
        return Ok(None);
    };
    if DataType::parse(&resp.outputs[i].datatype) != Some(DataType::Bytes) {
        return Err(GatewayError::Internal(format!(
            "text_output of model '{}' is {}, not BYTES",
            resp.model_name, resp.outputs[i].datatype
        )));
    }
    let raw = resp.raw_output_contents.get(i).ok_or_else(|| {
        GatewayError::Internal(format!(
            "text_output of model '{}' came without its data",
            resp.model_name
        ))
    })?;
    let mut text = String::new();
    for element in tensor::split_bytes_elements(raw).map_err(GatewayError::Internal)? {
        text.push_str(&String::from_utf8_lossy(element));
    }
    Ok(Some(text))
}

/// Where a choice's text comes from.
pub enum Source {
    /// A decoupled model's responses.
    Stream(Box<Responses>),
    /// Texts already there: a model that answered once (one text).
    Given(std::collections::VecDeque<String>),
}

impl Source {
    async fn next_text(&mut self) -> Option<Result<String, GatewayError>> {
        match self {
            Self::Given(texts) => texts.pop_front().map(Ok),
            Self::Stream(responses) => loop {
                let resp = match responses.next().await? {
                    Ok(resp) => resp,
                    Err(e) => return Some(Err(e)),
                };
                if let Some(e) = triton_error(&resp) {
                    return Some(Err(e));
                }
                let Some(infer) = resp.infer_response else {
                    continue;
                };
                match text_of(&infer) {
                    Ok(Some(text)) => return Some(Ok(text)),
                    // The empty final response, or one without text: nothing to send.
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            },
        }
    }
}

/// Text to send for one choice, its tokens, and why the choice ended (with its last piece).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub tokens: u64,
    pub finish: Option<&'static str>,
}

pub struct Choice {
    pub index: u32,
    /// `None` once the choice ended (dropping it cancels the request in Triton).
    source: Option<Source>,
    stops: Vec<String>,
    /// Bytes held back: the longest stop sequence but one, which could still be completing.
    hold: usize,
    pending: String,
    /// All text sent so far: `usage` counts it again whole.
    pub text: String,
    /// Tokens counted piece by piece (what the budget was charged as it streamed).
    pub tokens: u64,
    max_tokens: u64,
    pub finish: Option<&'static str>,
}

/// How long, and for how many more texts, a choice that reached `max_tokens` waits for its
/// model to end the request itself before it is cancelled.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
const SETTLE_TEXTS: usize = 4;

async fn settle(mut source: Source) {
    let _ = tokio::time::timeout(SETTLE, async {
        for _ in 0..=SETTLE_TEXTS {
            if source.next_text().await.is_none() {
                break;
            }
        }
    })
    .await;
}

/// The longest prefix of `s` that leaves at least `hold` bytes, on a char boundary.
fn safe_len(s: &str, hold: usize) -> usize {
    let mut cut = s.len().saturating_sub(hold);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    cut
}

impl Choice {
    pub fn new(index: u32, source: Source, s: &Sampling) -> Self {
        Self {
            index,
            source: Some(source),
            hold: s.stops.iter().map(String::len).max().unwrap_or(1) - 1,
            stops: s.stops.clone(),
            pending: String::new(),
            text: String::new(),
            tokens: 0,
            max_tokens: s.max_tokens.into(),
            finish: None,
        }
    }

    fn piece(
        &mut self,
        model: &LmModel,
        text: String,
        finish: Option<&'static str>,
    ) -> Result<Piece, GatewayError> {
        let tokens = model.count(&text)?;
        self.tokens += tokens;
        self.text.push_str(&text);
        if finish.is_some() {
            self.end(finish);
        }
        Ok(Piece {
            text,
            tokens,
            finish,
        })
    }

    fn end(&mut self, why: Option<&'static str>) {
        self.finish = why;
        self.source = None;
        self.pending.clear();
    }

    /// The next piece to send; `None` after the one that ended the choice.
    pub async fn next(&mut self, model: &LmModel) -> Option<Result<Piece, GatewayError>> {
        loop {
            let source = self.source.as_mut()?;
            let text = match source.next_text().await {
                Some(Ok(text)) => text,
                Some(Err(e)) => {
                    self.end(Some("error"));
                    return Some(Err(e));
                }
                None => {
                    let rest = std::mem::take(&mut self.pending);
                    let tokens = self.tokens + model.count(&rest).unwrap_or(0);
                    let why = if tokens >= self.max_tokens {
                        "length"
                    } else {
                        "stop"
                    };
                    return Some(self.piece(model, rest, Some(why)));
                }
            };
            self.pending.push_str(&text);
            let stop = self
                .stops
                .iter()
                .filter_map(|s| self.pending.find(s.as_str()))
                .min();
            if let Some(at) = stop {
                self.pending.truncate(at);
                let out = std::mem::take(&mut self.pending);
                return Some(self.piece(model, out, Some("stop")));
            }
            let cut = safe_len(&self.pending, self.hold);
            if cut == 0 {
                continue;
            }
            let out: String = self.pending.drain(..cut).collect();
            let piece = self.piece(model, out, None);
            if self.tokens >= self.max_tokens {
                // A model that takes max_tokens ends by itself now: its last response is
                // awaited (briefly) rather than cancelled, as a cancel racing the model's own
                // end is a path Triton's backends take far less often. Any other is stopped.
                if let Some(source) = self.source.take() {
                    settle(source).await;
                }
                self.end(Some("length"));
                return Some(piece.map(|p| Piece {
                    finish: Some("length"),
                    ..p
                }));
            }
            return Some(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::model::tiny;

    /// A choice over pieces given in advance (the cutting logic, without a server).
    fn choice(pieces: &[&str], s: &Sampling) -> Choice {
        let texts = pieces.iter().map(|p| p.to_string()).collect();
        Choice::new(0, Source::Given(texts), s)
    }

    async fn drain(c: &mut Choice, m: &LmModel) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some(p) = c.next(m).await {
            out.push(p.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn stops_and_limits_cut_the_text() {
        let m = tiny();
        let s = Sampling {
            max_tokens: 100,
            stops: vec!["world".into()],
            ..Default::default()
        };
        let mut c = choice(&["Hello, ", "world", "!"], &s);
        let pieces = drain(&mut c, &m).await;
        assert_eq!(c.text, "Hello, ");
        assert_eq!(pieces.last().unwrap().finish, Some("stop"));

        let s = Sampling {
            max_tokens: 2,
            ..Default::default()
        };
        let mut c = choice(&["one two three"], &s);
        drain(&mut c, &m).await;
        assert_eq!(c.finish, Some("length"));

        let s = Sampling {
            max_tokens: 10,
            ..Default::default()
        };
        let mut c = choice(&["one two"], &s);
        let pieces = drain(&mut c, &m).await;
        assert_eq!((c.text.as_str(), c.tokens), ("one two", 2));
        assert_eq!(pieces.last().unwrap().finish, Some("stop"));
    }

    #[test]
    fn held_back_text_ends_on_a_char_boundary() {
        assert_eq!(safe_len("abcdé", 1), 4);
        assert_eq!(safe_len("abcdé", 2), 4);
        assert_eq!(safe_len("ab", 5), 0);
        assert_eq!(safe_len("ab", 0), 2);
    }
}
