//! ModelStreamInfer: the requests of one client stream, multiplexed as Triton does it.
//! - A request to a decoupled model is relayed response by response as Triton sends them
//!   ([`crate::streams`]): responses of different requests interleave, each request's keep
//!   their order, ids and final flags.
//! - Any other request runs as a unary call (batching, cache and all); these are answered in
//!   their request order, each with `triton_final_response: true` as Triton's stream sets it.
//! - At most `stream_concurrency` requests of one stream run at once; a client that reads
//!   slowly fills the bounded buffer (`streams.buffer`) and the relays wait, which holds
//!   Triton back through HTTP/2 flow control.
//! - A client that resets the stream, disconnects or passes its `grpc-timeout` drops the
//!   relays, and each dropped upstream stream cancels its request in Triton.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt, stream::FuturesOrdered};
use http::HeaderMap;
use tokio::{sync::mpsc, task::JoinSet};
use tonic::{Status, Streaming};
use tracing::Span;

use crate::{
    api::observed,
    call::{Call, Deadline},
    error::GatewayError,
    infer::InferService,
    proto::inference::{
        InferParameter, ModelInferRequest, ModelInferResponse, ModelStreamInferResponse,
        infer_parameter::ParameterChoice,
    },
    streams::Streams,
    telemetry::trace,
};

pub type StreamOut = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

type Out = mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

/// What every request of one client stream shares.
struct Shared {
    infer: InferService,
    streams: Streams,
    headers: HeaderMap,
    deadline: Option<Deadline>,
    /// The serving thread the stream arrived on, whose Triton connection its relays use.
    lane: Option<usize>,
}

/// Starts relaying one client stream; the answer stream ends when every request is answered
/// after the client closed its side. Dropping it stops everything still running.
pub fn serve(
    infer: InferService,
    streams: Streams,
    concurrency: usize,
    headers: HeaderMap,
    input: Streaming<ModelInferRequest>,
    lane: Option<usize>,
) -> StreamOut {
    let (tx, rx) = mpsc::channel(streams.config().buffer);
    let deadline = crate::grpc_wire::read_timeout(&headers).and_then(Deadline::after);
    let shared = Arc::new(Shared {
        infer,
        streams,
        headers,
        deadline,
        lane,
    });
    let driver = tokio::spawn(drive(shared, concurrency, input, tx));
    Box::pin(Answers {
        rx,
        driver: driver.abort_handle(),
    })
}

/// The answers, as the driver and the relays send them. Dropped (the client left), it aborts
/// the driver, whose relays go with it.
struct Answers {
    rx: mpsc::Receiver<Result<ModelStreamInferResponse, Status>>,
    driver: tokio::task::AbortHandle,
}

impl Stream for Answers {
    type Item = Result<ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn drive(
    shared: Arc<Shared>,
    concurrency: usize,
    mut input: Streaming<ModelInferRequest>,
    tx: Out,
) {
    let mut unary = FuturesOrdered::new();
    // Dropped with the driver: aborting the driver aborts every relay.
    let mut relays = JoinSet::new();
    let mut reading = true;
    loop {
        let running = unary.len() + relays.len();
        tokio::select! {
            Some(answer) = unary.next(), if !unary.is_empty() => {
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
            msg = input.message(), if reading && running < concurrency => match msg {
                Ok(Some(mut req)) => {
                    let call = shared.infer.at_edge(
                        &mut req,
                        &shared.headers,
                        None,
                        Call::sync(shared.deadline),
                    );
                    if shared.streams.is_decoupled(&req).await {
                        relays.spawn(relay(Arc::clone(&shared), req, tx.clone()));
                    } else {
                        unary.push_back(answer(Arc::clone(&shared), req, call));
                    }
                }
                Ok(None) => reading = false,
                Err(status) => {
                    // The client's side broke (malformed message, reset): nothing more
                    // comes, and what runs is for nobody.
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            else => return,
        }
    }
}

/// A request to a model that is not decoupled: one unary call, one answer.
async fn answer(
    shared: Arc<Shared>,
    req: ModelInferRequest,
    call: Call,
) -> ModelStreamInferResponse {
    let (model, version, id) = (
        req.model_name.clone(),
        req.model_version.clone(),
        req.id.clone(),
    );
    let run = shared.infer.infer(req, call);
    match observed(
        "grpc ModelStreamInfer",
        "grpc",
        &model,
        &shared.headers,
        run,
    )
    .await
    {
        Ok(mut resp) => {
            resp.parameters.insert(FINAL.into(), flag(true));
            ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(resp),
            }
        }
        Err(e) => failed(&e, model, version, id),
    }
}

/// A request to a decoupled model: its responses as they come, until its last.
async fn relay(shared: Arc<Shared>, req: ModelInferRequest, tx: Out) {
    let (model, version, id) = (
        req.model_name.clone(),
        req.model_version.clone(),
        req.id.clone(),
    );
    let streamed = async {
        let mut responses = shared
            .streams
            .open(req, shared.deadline, shared.lane)
            .await?;
        let span = Span::current();
        let mut n = 0u64;
        while let Some(next) = responses.next().await {
            let resp = next?;
            trace::add_event(&span, "response", n);
            n += 1;
            if tx.send(Ok(resp)).await.is_err() {
                // The client left: dropping `responses` cancels the request in Triton.
                break;
            }
        }
        Ok(())
    };
    if let Err(e) = observed(
        "grpc ModelStreamInfer",
        "grpc",
        &model,
        &shared.headers,
        streamed,
    )
    .await
    {
        let _ = tx.send(Ok(failed(&e, model, version, id))).await;
    }
}

/// Triton's stream flag on each response: true on a request's last.
const FINAL: &str = "triton_final_response";

fn flag(b: bool) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(b)),
    }
}

/// An error answers its request alone, in band, as Triton's stream does; the stream goes on.
fn failed(
    e: &GatewayError,
    model_name: String,
    model_version: String,
    id: String,
) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: e.to_string(),
        infer_response: Some(ModelInferResponse {
            model_name,
            model_version,
            id,
            ..Default::default()
        }),
    }
}
