//! The OpenAI front: `/v1/chat/completions`, `/v1/completions` and `/v1/models` over Triton
//! generate models (text in, text out), with tenants' token and request budgets.
//!
//! A request names a model of `[openai]`; its prompt (a chat rendered with the model's
//! template) is counted by the model's tokenizer and charged to the tenant's budget, and
//! each choice runs as one Triton request: a decoupled model's responses stream through
//! [`crate::streams`], another model answers once through the batcher. Completion tokens are
//! counted as they stream. The edge (`api/http/openai.rs`) speaks OpenAI's JSON and events.

pub mod batch;
pub mod config;
pub mod errors;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod quota;
pub mod reply;
pub mod settled;
pub mod wire;

use std::{sync::Arc, time::Instant};

use crate::{
    call::Call, infer::InferService, proto::inference::ModelInferRequest, streams::Streams,
};
pub use config::OpenAiConfig;
use errors::OpenAiError;
use generate::{Choice, Piece, Sampling, Source};
use model::LmModel;
use quota::{Quota, Standing};

pub struct OpenAi {
    cfg: OpenAiConfig,
    /// In config order (`/v1/models` lists them so).
    models: Vec<Arc<LmModel>>,
    infer: InferService,
    streams: Streams,
    quota: Quota,
    /// Batch lines' final states seen by this process.
    pub settled: settled::Settled,
}

/// One request, read and checked: what [`OpenAi::start`] runs.
pub struct Job {
    pub tenant: Arc<str>,
    pub model: Arc<LmModel>,
    /// One per prompt (a chat has one); each gets `n` choices.
    pub prompts: Vec<String>,
    pub n: u32,
    pub sampling: Sampling,
}

impl OpenAi {
    /// Loads every model's tokenizer and template; a bad one stops the start, naming it.
    pub fn new(cfg: &OpenAiConfig, infer: InferService, streams: Streams) -> Result<Self, String> {
        let models = cfg
            .models
            .iter()
            .map(|m| LmModel::load(m).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let _ = metrics::metrics();
        Ok(Self {
            quota: Quota::new(cfg),
            cfg: cfg.clone(),
            models,
            infer,
            streams,
            settled: Default::default(),
        })
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.cfg
    }

    fn allowed(&self, tenant: &str, model: &str) -> bool {
        match self.cfg.tenants.iter().find(|t| t.tenant == tenant) {
            Some(t) if !t.models.is_empty() => t.models.iter().any(|m| m == model),
            _ => true,
        }
    }

    /// The models a tenant may call.
    pub fn models_for(&self, tenant: &str) -> Vec<Arc<LmModel>> {
        self.models
            .iter()
            .filter(|m| self.allowed(tenant, &m.name))
            .cloned()
            .collect()
    }

    /// A model by the name a client sent; another tenant's model is as unknown as none.
    pub fn model(&self, tenant: &str, name: &str) -> Result<Arc<LmModel>, OpenAiError> {
        self.models
            .iter()
            .find(|m| m.name == name && self.allowed(tenant, name))
            .cloned()
            .ok_or_else(|| OpenAiError::model_not_found(name))
    }

    /// The job a request asks for: its sampling checked against OpenAI's ranges and the
    /// front's limits, each refusal naming its field.
    pub fn job(
        &self,
        tenant: Arc<str>,
        model: Arc<LmModel>,
        req: &wire::LmRequest,
        prompts: Vec<String>,
    ) -> Result<Job, OpenAiError> {
        let (max_param, asked) = match (req.max_completion_tokens, req.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = asked.unwrap_or(self.cfg.default_max_tokens);
        if max_tokens == 0 || max_tokens > self.cfg.max_tokens_limit {
            return Err(OpenAiError::invalid(
                max_param,
                format!(
                    "{max_param}: must be within 1..={}, got {max_tokens}",
                    self.cfg.max_tokens_limit
                ),
            ));
        }
        let n = req.n.unwrap_or(1);
        if n == 0 || n > self.cfg.max_choices {
            return Err(OpenAiError::invalid(
                "n",
                format!("n: must be within 1..={}, got {n}", self.cfg.max_choices),
            ));
        }
        let ranged = |name: &str, v: Option<f64>, hi: f64| match v {
            Some(x) if !(0.0..=hi).contains(&x) => Err(OpenAiError::invalid(
                name,
                format!("{name}: must be within 0..={hi}, got {x}"),
            )),
            _ => Ok(v),
        };
        let sampling = Sampling {
            max_tokens,
            temperature: ranged("temperature", req.temperature, 2.0)?,
            top_p: ranged("top_p", req.top_p, 1.0)?,
            // OpenAI takes any integer; the model's seed input is unsigned.
            seed: req.seed.map(|s| s as u64),
            stream: req.stream.unwrap_or(false),
            stops: req.stops()?,
        };
        Ok(Job {
            tenant,
            model,
            prompts,
            n,
            sampling,
        })
    }

    /// Charges the prompt to the tenant's budget and opens every choice's request to
    /// Triton. `edge` prepares each request as the edge does (sticky key, trace context).
    pub async fn start(
        self: &Arc<Self>,
        job: Job,
        edge: impl Fn(&mut ModelInferRequest) -> Call,
    ) -> Result<Generation, OpenAiError> {
        let mut prompt_tokens = 0;
        for p in &job.prompts {
            prompt_tokens += job.model.count(p)?;
        }
        let standing = match self.quota.admit(&job.tenant, prompt_tokens, Instant::now()) {
            Ok(standing) => standing,
            Err(over) => {
                metrics::metrics().limited(&job.tenant, over.kind);
                let secs = over.wait.as_secs_f64().ceil().max(1.0) as u64;
                let mut e = OpenAiError::rate_limited(over.kind, over.message, secs);
                e.headers = quota::headers(&over.standing);
                return Err(e);
            }
        };
        // From here the request counts: its outcome and usage are recorded however it ends.
        let mut generation = Generation {
            front: Arc::clone(self),
            tenant: Arc::clone(&job.tenant),
            model: Arc::clone(&job.model),
            choices: Vec::with_capacity(job.prompts.len() * job.n as usize),
            current: 0,
            prompt_tokens,
            standing,
            started: Instant::now(),
            first_sent: false,
            outcome: None,
        };
        let info = match self.infer.model_info(&job.model.target, "").await {
            Ok(info) => info,
            Err(e) => return Err(generation.failed(e.into())),
        };
        for (p, prompt) in job.prompts.iter().enumerate() {
            for i in 0..job.n {
                let index = p as u32 * job.n + i;
                match self.open(&job, &info, prompt, i, &edge).await {
                    Ok(source) => {
                        generation
                            .choices
                            .push(Choice::new(index, source, &job.sampling))
                    }
                    Err(e) => return Err(generation.failed(e)),
                }
            }
        }
        Ok(generation)
    }

    async fn open(
        &self,
        job: &Job,
        info: &crate::model::ModelInfo,
        prompt: &str,
        choice: u32,
        edge: &impl Fn(&mut ModelInferRequest) -> Call,
    ) -> Result<Source, OpenAiError> {
        let mut req =
            generate::triton_request(&job.model, info, prompt, &job.sampling, choice.into())?;
        let call = edge(&mut req);
        if self.streams.is_decoupled(&req).await {
            let deadline = call.deadline;
            return Ok(Source::Stream(Box::new(
                self.streams.open(req, deadline, None).await?,
            )));
        }
        let resp = self.infer.infer(req, call).await?;
        Ok(Source::Given(
            generate::text_of(&resp)?.into_iter().collect(),
        ))
    }
}

/// Tokens of a finished request, as the model's tokenizer counts them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The choices of one admitted request, sent piece by piece (choice after choice: a later
/// choice's responses wait in its stream's bounded buffer meanwhile).
pub struct Generation {
    front: Arc<OpenAi>,
    pub tenant: Arc<str>,
    pub model: Arc<LmModel>,
    pub choices: Vec<Choice>,
    current: usize,
    pub prompt_tokens: u64,
    /// The tenant's budget after admission (`None`: the tenant has none).
    pub standing: Option<Standing>,
    started: Instant,
    first_sent: bool,
    /// Set when the request ended: `ok`, `error`; dropped before, it was `cancelled`.
    outcome: Option<&'static str>,
}

impl Generation {
    /// The next piece of text and its choice's index; `None` when every choice ended.
    pub async fn next(&mut self) -> Option<Result<(u32, Piece), OpenAiError>> {
        while let Some(choice) = self.choices.get_mut(self.current) {
            match choice.next(&self.model).await {
                Some(Ok(piece)) => {
                    self.front
                        .quota
                        .charge(&self.tenant, piece.tokens as i64, Instant::now());
                    if !self.first_sent && !piece.text.is_empty() {
                        self.first_sent = true;
                        metrics::metrics().first(&self.model.name, self.started.elapsed());
                    }
                    return Some(Ok((choice.index, piece)));
                }
                Some(Err(e)) => return Some(Err(self.failed(e.into()))),
                None => self.current += 1,
            }
        }
        if self.outcome.is_none() {
            self.record("ok");
        }
        None
    }

    /// Every piece, for an answer sent whole.
    pub async fn collect(&mut self) -> Result<(), OpenAiError> {
        while let Some(piece) = self.next().await {
            piece?;
        }
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self
                .choices
                .iter()
                .map(|c| self.model.count(&c.text).unwrap_or(c.tokens))
                .sum(),
        }
    }

    fn failed(&mut self, e: OpenAiError) -> OpenAiError {
        self.record("error");
        e
    }

    /// Records the outcome and the usage once; the budget's charge for the completion is
    /// set to the whole text's count (pieces may count a token split between them twice).
    fn record(&mut self, outcome: &'static str) {
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(outcome);
        for c in &mut self.choices {
            c.finish.get_or_insert("cancelled");
        }
        let usage = self.usage();
        let charged: u64 = self.choices.iter().map(|c| c.tokens).sum();
        let diff = usage.completion_tokens as i64 - charged as i64;
        if diff != 0 {
            self.front.quota.charge(&self.tenant, diff, Instant::now());
        }
        let m = metrics::metrics();
        m.used(
            &self.tenant,
            &self.model.name,
            usage.prompt_tokens,
            usage.completion_tokens,
        );
        m.ended(&self.tenant, &self.model.name, outcome);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.record("cancelled");
    }
}
