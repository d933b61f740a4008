//! Streams: the responses of decoupled models (language models on the TensorRT-LLM or vLLM
//! backends, any python model with a response sender), relayed one by one as Triton sends
//! them. Each request goes to Triton on an HTTP/2 stream of its own ([`crate::backend::stream`]),
//! so a caller that leaves, cancels or runs out of time cancels that request in Triton.
//!
//! The edges use it: gRPC `ModelStreamInfer` multiplexes requests over one client stream,
//! HTTP `generate` and `generate_stream` (Triton's generate extension, [`generate`]) map JSON
//! to tensors. Routes, model caps and the scaler's demand apply as for any call
//! ([`InferService::admit_stream`]).

pub mod config;
pub mod generate;
pub mod metrics;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    backend::stream::Upstream,
    call::Deadline,
    error::GatewayError,
    infer::{Admitted, InferService},
    proto::inference::{ModelInferRequest, ModelStreamInferResponse},
};
pub use config::StreamsConfig;

/// The parameter of a decoupled task's result that says how many responses it kept.
pub const RESPONSES_KEPT: &str = "infergate_responses";

/// Triton's error in band (a response that carries `error_message`), as infergate's error.
/// Triton's HTTP front answers it with 400; gRPC clients read it as it is.
pub fn triton_error(resp: &ModelStreamInferResponse) -> Option<GatewayError> {
    (!resp.error_message.is_empty()).then(|| GatewayError::Backend {
        code: tonic::Code::InvalidArgument,
        message: resp.error_message.clone(),
    })
}

#[derive(Clone)]
pub struct Streams {
    infer: InferService,
    cfg: StreamsConfig,
    /// Streams open to Triton from this process (`max_open`).
    open: Arc<Semaphore>,
}

impl Streams {
    pub fn new(infer: InferService, cfg: &StreamsConfig) -> Self {
        Self {
            infer,
            open: Arc::new(Semaphore::new(cfg.max_open)),
            cfg: cfg.clone(),
        }
    }

    pub fn config(&self) -> &StreamsConfig {
        &self.cfg
    }

    /// True when the request's model (after its route) answers with a stream.
    pub async fn is_decoupled(&self, req: &ModelInferRequest) -> bool {
        self.infer.is_decoupled(req).await
    }

    /// Routes, validates and admits one request, and sends it to Triton (on `lane`'s own
    /// connection when it came on a gRPC serving thread). The answer is its responses, ended
    /// by the last one; dropped before that, the request is cancelled.
    pub async fn open(
        &self,
        req: ModelInferRequest,
        caller: Option<Deadline>,
        lane: Option<usize>,
    ) -> Result<Responses, GatewayError> {
        let slot = Arc::clone(&self.open).try_acquire_owned().map_err(|_| {
            GatewayError::Overloaded(format!(
                "{} streams are already open (streams.max_open)",
                self.cfg.max_open
            ))
        })?;
        let started = Instant::now();
        let limit = Duration::from_millis(self.cfg.max_duration_ms);
        let mut admitted = self.infer.admit_stream(req, caller).await?;
        let deadline = admitted
            .deadline
            .map_or(started + limit, |d| d.instant().min(started + limit));
        let upstream = self
            .infer
            .backend()
            .stream_infer(
                std::mem::take(&mut admitted.req),
                deadline.saturating_duration_since(Instant::now()),
                lane,
            )
            .await?;
        let model = admitted.info.name.clone();
        metrics::metrics().opened(&model);
        Ok(Responses {
            upstream: Some(upstream),
            admitted,
            _slot: slot,
            model,
            started,
            deadline,
            sent: 0,
            max: self.cfg.max_responses,
            complete: false,
            target_fault: false,
        })
    }
}

/// One request's responses, as Triton sends them (each with its `triton_final_response`
/// flag and, when asked for, the empty final response).
pub struct Responses {
    /// `None` once the stream ended.
    upstream: Option<Upstream>,
    admitted: Admitted,
    _slot: OwnedSemaphorePermit,
    model: String,
    started: Instant,
    deadline: Instant,
    sent: u64,
    max: u64,
    /// Triton ended the stream itself.
    complete: bool,
    /// Triton answered an error or failed the stream: the route's breaker hears of it (a
    /// caller that left says nothing of the target).
    target_fault: bool,
}

impl Responses {
    /// The model the request ran on (after its route).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The next response, or the error that ended the stream; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<ModelStreamInferResponse, GatewayError>> {
        let upstream = self.upstream.as_mut()?;
        let next = tokio::time::timeout_at(self.deadline.into(), upstream.next()).await;
        let out = match next {
            Ok(Ok(Some(resp))) => {
                if self.sent == 0 {
                    metrics::metrics().first(&self.model, self.started.elapsed());
                }
                self.sent += 1;
                self.target_fault |= !resp.error_message.is_empty();
                if self.sent > self.max {
                    self.upstream = None;
                    return Some(Err(GatewayError::Overloaded(format!(
                        "model '{}' sent more than {} responses to one request (streams.max_responses)",
                        self.model, self.max
                    ))));
                }
                return Some(Ok(resp));
            }
            Ok(Ok(None)) => {
                self.complete = true;
                None
            }
            Ok(Err(e)) => {
                self.target_fault |= e.is_target_fault();
                Some(Err(e))
            }
            Err(_) => Some(Err(GatewayError::DeadlineExceeded(format!(
                "the stream of model '{}' passed its deadline after {} responses",
                self.model, self.sent
            )))),
        };
        // Ended: an error drops the upstream, which cancels the request in Triton.
        self.upstream = None;
        out
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        metrics::metrics().closed(
            &self.model,
            self.sent,
            self.started.elapsed(),
            self.complete,
        );
        if let Some(watch) = self.admitted.watch.take() {
            watch.finish(!self.target_fault);
        }
    }
}
