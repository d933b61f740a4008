//! Stream load (gRPC ModelStreamInfer, a decoupled model shaped like `token_stream`): each of
//! `concurrency` workers keeps one client stream and sends one request after another, each
//! asking for `tokens` responses `delay_ms` apart. Measured per request: the time to its
//! first response and the gaps between its responses. With `hold`, every worker sends one
//! request that keeps its stream open and waits (idle streams), for the memory they cost.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use super::report::percentile;
use crate::proto::inference::{
    ModelInferRequest, ModelStreamInferResponse,
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};

#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub target: String,
    pub model: String,
    pub concurrency: usize,
    pub tokens: i32,
    pub delay_ms: i32,
    pub duration: Duration,
    pub warmup: Duration,
    /// Idle mode: open the streams, wait until each has its first response, hold this long.
    pub hold: Option<Duration>,
    /// Each request on a ModelStreamInfer call of its own, as infergate sends them upstream:
    /// against Triton directly, what that costs Triton (a reference, not a client's way).
    pub per_request: bool,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamRun {
    pub requests: u64,
    pub errors: u64,
    pub responses: u64,
    pub first_p50_ms: f64,
    pub first_p99_ms: f64,
    pub gap_p50_ms: f64,
    pub gap_p99_ms: f64,
    pub requests_per_second: f64,
    /// Idle mode: streams that held open with their first response in.
    pub held: u64,
}

impl StreamRun {
    pub fn text(&self) -> String {
        format!(
            "Streams:\n  Requests:     {} ({} errors)\n  Responses:    {}\n  First:        p50 {:.3} ms, p99 {:.3} ms\n  Gap:          p50 {:.3} ms, p99 {:.3} ms\n  Requests/sec: {:.1}\n  Held open:    {}\n",
            self.requests,
            self.errors,
            self.responses,
            self.first_p50_ms,
            self.first_p99_ms,
            self.gap_p50_ms,
            self.gap_p99_ms,
            self.requests_per_second,
            self.held
        )
    }
}

fn request(model: &str, tokens: i32, delay_ms: i32) -> ModelInferRequest {
    let text = b"alpha beta gamma delta";
    let mut raw_text = (text.len() as u32).to_le_bytes().to_vec();
    raw_text.extend_from_slice(text);
    let tensor = |name: &str, datatype: &str| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![1],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![
            tensor("text_input", "BYTES"),
            tensor("max_tokens", "INT32"),
            tensor("delay_ms", "INT32"),
        ],
        raw_input_contents: vec![
            raw_text.into(),
            tokens.to_le_bytes().to_vec().into(),
            delay_ms.to_le_bytes().to_vec().into(),
        ],
        ..Default::default()
    }
}

/// What one worker measured.
#[derive(Default)]
struct Measured {
    requests: u64,
    errors: u64,
    responses: u64,
    first: Vec<Duration>,
    gaps: Vec<Duration>,
    held: u64,
}

async fn worker(
    spec: StreamSpec,
    channel: tonic::transport::Channel,
    measure_from: Instant,
    until: Instant,
) -> Result<Measured, String> {
    let mut client = GrpcInferenceServiceClient::new(channel);
    if spec.per_request {
        return call_per_request(spec, client, measure_from, until).await;
    }
    let (tx, rx) = mpsc::channel(4);
    // The first request goes in before the call is made: a server may send its response
    // headers only once it has read a message, and the call waits for those headers.
    let first = match spec.hold {
        Some(hold) => request(
            &spec.model,
            2,
            i32::try_from(hold.as_millis() * 2).unwrap_or(i32::MAX),
        ),
        None => request(&spec.model, spec.tokens, spec.delay_ms),
    };
    let mut sent = Instant::now();
    tx.send(first)
        .await
        .map_err(|_| "the stream closed".to_string())?;
    let mut answers = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("opening a stream: {e}"))?
        .into_inner();
    let mut m = Measured::default();
    if spec.hold.is_some() {
        // One long request: its first response says the stream is up, then it idles.
        match answers.message().await {
            Ok(Some(r)) if r.error_message.is_empty() => m.held = 1,
            Ok(Some(r)) => return Err(r.error_message),
            other => return Err(format!("no first response: {other:?}")),
        }
        tokio::time::sleep_until(until.into()).await;
        return Ok(m);
    }
    let mut first_sent = true;
    while Instant::now() < until {
        if !first_sent {
            sent = Instant::now();
            tx.send(request(&spec.model, spec.tokens, spec.delay_ms))
                .await
                .map_err(|_| "the stream closed".to_string())?;
        }
        first_sent = false;
        read_request(
            &mut answers,
            spec.tokens,
            sent,
            sent >= measure_from,
            &mut m,
        )
        .await?;
    }
    Ok(m)
}

/// [`worker`] with a call of its own per request.
async fn call_per_request(
    spec: StreamSpec,
    mut client: GrpcInferenceServiceClient<tonic::transport::Channel>,
    measure_from: Instant,
    until: Instant,
) -> Result<Measured, String> {
    let mut m = Measured::default();
    while Instant::now() < until {
        let sent = Instant::now();
        let req = request(&spec.model, spec.tokens, spec.delay_ms);
        let mut answers = client
            .model_stream_infer(tokio_stream::once(req))
            .await
            .map_err(|e| format!("opening a stream: {e}"))?
            .into_inner();
        read_request(
            &mut answers,
            spec.tokens,
            sent,
            sent >= measure_from,
            &mut m,
        )
        .await?;
        // Read to the call's end, as infergate's relay does: dropped at its last response,
        // the call would be reset as Triton finishes it, and Triton 2.51 (CPU build) crashed
        // under 64 such resets ("double free or corruption").
        while let Ok(Some(_)) = answers.message().await {}
    }
    Ok(m)
}

/// Reads one request's `tokens` responses, timing them from `sent` when `measured`.
async fn read_request(
    answers: &mut tonic::Streaming<ModelStreamInferResponse>,
    tokens: i32,
    sent: Instant,
    measured: bool,
    m: &mut Measured,
) -> Result<(), String> {
    let mut last = sent;
    let mut got = 0;
    while got < tokens {
        match answers.message().await {
            Ok(Some(r)) if r.error_message.is_empty() => {
                let now = Instant::now();
                if measured {
                    if got == 0 {
                        m.first.push(now - sent);
                    } else {
                        m.gaps.push(now - last);
                    }
                    m.responses += 1;
                }
                last = now;
                got += 1;
            }
            Ok(Some(_)) | Err(_) => {
                m.errors += 1;
                break;
            }
            Ok(None) => return Err("the server ended the stream".into()),
        }
    }
    if measured {
        m.requests += 1;
    }
    Ok(())
}

/// Runs the stream load against `spec.target` (host:port).
pub async fn run_streams(spec: &StreamSpec) -> Result<StreamRun, String> {
    // One connection per 100 streams: each HTTP/2 connection carries many.
    let endpoint = Endpoint::from_shared(format!("http://{}", spec.target))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    let conns = spec.concurrency.div_ceil(100).max(1);
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?,
        );
    }
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let until = measure_from + spec.hold.unwrap_or(spec.duration);
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|i| {
            tokio::spawn(worker(
                spec.clone(),
                channels[i % conns].clone(),
                measure_from,
                until,
            ))
        })
        .collect();
    let mut all = Measured::default();
    for w in workers {
        let m = w.await.map_err(|e| e.to_string())??;
        all.requests += m.requests;
        all.errors += m.errors;
        all.responses += m.responses;
        all.first.extend(m.first);
        all.gaps.extend(m.gaps);
        all.held += m.held;
    }
    let measured = until.saturating_duration_since(measure_from).as_secs_f64();
    let ns = |v: &[Duration]| {
        let mut ns: Vec<u64> = v.iter().map(|d| d.as_nanos() as u64).collect();
        ns.sort_unstable();
        ns
    };
    let (first, gaps) = (ns(&all.first), ns(&all.gaps));
    let ms = |sorted: &[u64], pct| percentile(sorted, pct) as f64 / 1e6;
    Ok(StreamRun {
        requests: all.requests,
        errors: all.errors,
        responses: all.responses,
        first_p50_ms: ms(&first, 50),
        first_p99_ms: ms(&first, 99),
        gap_p50_ms: ms(&gaps, 50),
        gap_p99_ms: ms(&gaps, 99),
        requests_per_second: all.requests as f64 / measured.max(1e-9),
        held: all.held,
    })
}
