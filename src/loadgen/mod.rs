//! infergate's own load generator (the `infergate-load` binary): Open Inference Protocol
//! requests over gRPC or HTTP (binary tensor extension, as tritonclient sends), at a fixed
//! concurrency (closed loop) or a fixed rate (open loop), for a duration or a count, after a
//! warm-up. It is lean on purpose: on a 2-core machine every cycle the load generator spends is
//! taken from the system under test.

pub mod html;
pub mod report;
pub mod streams;
pub mod tasks;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    proto::inference::{
        InferParameter, ModelConfigRequest, ModelInferRequest, ModelMetadataRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    },
    tensor::{DataType, element_count},
};
pub use report::{Outcome, Summary};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub protocol: Protocol,
    /// `host:port`.
    pub target: String,
    pub model: String,
    /// Rows per request for batching models.
    pub batch: i64,
    pub concurrency: usize,
    pub connections: usize,
    /// Stop after this long, or after `requests`, whichever comes first.
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub warmup: Duration,
    /// Open loop: start this many requests per second (at most `concurrency` outstanding).
    pub rate: Option<f64>,
    pub timeout: Duration,
    pub progress: bool,
    /// Integer request parameters sent with every request (e.g. `priority`).
    pub params: Vec<(String, i64)>,
}

/// One input as the model declares it.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// Deterministic data for one input: numbers counting up, or short strings.
fn fill(dtype: DataType, elements: u64) -> Bytes {
    let mut v = Vec::new();
    for i in 0..elements {
        match dtype {
            DataType::Bytes => {
                v.extend_from_slice(&1u32.to_le_bytes());
                v.push(b'a' + (i % 26) as u8);
            }
            DataType::F32 => v.extend_from_slice(&((i % 100) as f32 * 0.5).to_le_bytes()),
            DataType::F64 => v.extend_from_slice(&((i % 100) as f64 * 0.5).to_le_bytes()),
            dt => {
                let size = dt.byte_size().unwrap_or(1);
                let x = (i % 100).to_le_bytes();
                v.extend_from_slice(&x[..size]);
            }
        }
    }
    v.into()
}

/// A request with every input of the model, `batch` rows for batching models and 1 for any
/// other variable dimension.
pub fn build_request(
    model: &str,
    inputs: &[InputSpec],
    max_batch_size: i64,
    batch: i64,
) -> Result<ModelInferRequest, String> {
    let mut req = ModelInferRequest {
        model_name: model.to_string(),
        ..Default::default()
    };
    for inp in inputs {
        let dtype = DataType::parse(&inp.datatype)
            .ok_or_else(|| format!("input '{}': datatype {} unknown", inp.name, inp.datatype))?;
        let mut shape: Vec<i64> = inp
            .shape
            .iter()
            .map(|&d| if d < 0 { 1 } else { d })
            .collect();
        if max_batch_size > 0 && !shape.is_empty() {
            shape[0] = batch;
        }
        let n = element_count(&shape).ok_or("shape overflows")?;
        req.raw_input_contents.push(fill(dtype, n));
        req.inputs.push(InferInputTensor {
            name: inp.name.clone(),
            datatype: inp.datatype.clone(),
            shape,
            ..Default::default()
        });
    }
    Ok(req)
}

/// Where requests go, prepared once.
#[derive(Clone)]
pub enum Sender {
    Grpc {
        clients: Vec<GrpcInferenceServiceClient<Channel>>,
        req: ModelInferRequest,
    },
    Http {
        client: reqwest::Client,
        url: String,
        body: Bytes,
        header_len: usize,
    },
}

impl Sender {
    /// Connects and prepares a request for `spec.model` from its metadata.
    pub async fn connect(spec: &LoadSpec) -> Result<Self, String> {
        match spec.protocol {
            Protocol::Grpc => {
                let mut clients = Vec::new();
                for _ in 0..spec.connections.max(1) {
                    let ch = Channel::from_shared(format!("http://{}", spec.target))
                        .map_err(|e| e.to_string())?
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .map_err(|e| format!("connect {}: {e}", spec.target))?;
                    clients.push(
                        GrpcInferenceServiceClient::new(ch).max_decoding_message_size(1 << 30),
                    );
                }
                let c = &mut clients[0];
                let md = c
                    .model_metadata(ModelMetadataRequest {
                        name: spec.model.clone(),
                        version: String::new(),
                    })
                    .await
                    .map_err(|e| format!("model metadata: {}", e.message()))?
                    .into_inner();
                let cfg = c
                    .model_config(ModelConfigRequest {
                        name: spec.model.clone(),
                        version: String::new(),
                    })
                    .await
                    .map_err(|e| format!("model config: {}", e.message()))?
                    .into_inner()
                    .config
                    .unwrap_or_default();
                let inputs: Vec<InputSpec> = md
                    .inputs
                    .iter()
                    .map(|t| InputSpec {
                        name: t.name.clone(),
                        datatype: t.datatype.clone(),
                        shape: t.shape.clone(),
                    })
                    .collect();
                let mut req =
                    build_request(&spec.model, &inputs, cfg.max_batch_size.into(), spec.batch)?;
                for (k, v) in &spec.params {
                    req.parameters.insert(
                        k.clone(),
                        InferParameter {
                            parameter_choice: Some(ParameterChoice::Int64Param(*v)),
                        },
                    );
                }
                Ok(Self::Grpc { clients, req })
            }
            Protocol::Http => {
                let client = reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(spec.concurrency.max(1))
                    .build()
                    .map_err(|e| e.to_string())?;
                let base = format!("http://{}/v2/models/{}", spec.target, spec.model);
                let get = |url: String| {
                    let client = client.clone();
                    async move {
                        let r = client
                            .get(&url)
                            .send()
                            .await
                            .map_err(|e| format!("{url}: {e}"))?;
                        if !r.status().is_success() {
                            return Err(format!("{url}: HTTP {}", r.status()));
                        }
                        r.json::<Value>().await.map_err(|e| format!("{url}: {e}"))
                    }
                };
                let md = get(base.clone()).await?;
                let cfg = get(format!("{base}/config")).await?;
                let inputs: Vec<InputSpec> = md["inputs"]
                    .as_array()
                    .ok_or("metadata without inputs")?
                    .iter()
                    .map(|t| InputSpec {
                        name: t["name"].as_str().unwrap_or_default().to_string(),
                        datatype: t["datatype"].as_str().unwrap_or_default().to_string(),
                        shape: t["shape"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_i64).collect())
                            .unwrap_or_default(),
                    })
                    .collect();
                let max_batch = cfg["max_batch_size"].as_i64().unwrap_or(0);
                let req = build_request(&spec.model, &inputs, max_batch, spec.batch)?;
                let header = json!({
                    "inputs": req.inputs.iter().zip(&req.raw_input_contents).map(|(i, raw)| json!({
                        "name": i.name, "shape": i.shape, "datatype": i.datatype,
                        "parameters": {"binary_data_size": raw.len()},
                    })).collect::<Vec<_>>(),
                    "parameters": spec.params.iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .chain([("binary_data_output".to_string(), json!(true))])
                        .collect::<serde_json::Map<_, _>>(),
                });
                let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
                let mut body = header.clone();
                for raw in &req.raw_input_contents {
                    body.extend_from_slice(raw);
                }
                Ok(Self::Http {
                    client,
                    url: format!("{base}/infer"),
                    body: body.into(),
                    header_len: header.len(),
                })
            }
        }
    }

    /// Sends one request; `Ok(status)` for a completed exchange (success or not).
    async fn send(&self, worker: usize, timeout: Duration) -> (String, Option<String>) {
        match self {
            Self::Grpc { clients, req } => {
                let mut c = clients[worker % clients.len()].clone();
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(timeout);
                match c.model_infer(r).await {
                    Ok(_) => ("OK".into(), None),
                    Err(s) => (format!("{:?}", s.code()), Some(s.message().to_string())),
                }
            }
            Self::Http {
                client,
                url,
                body,
                header_len,
            } => {
                let r = client
                    .post(url)
                    .header("Inference-Header-Content-Length", *header_len)
                    .header("Content-Type", "application/octet-stream")
                    .body(body.clone())
                    .timeout(timeout)
                    .send()
                    .await;
                match r {
                    Ok(resp) => {
                        let status = resp.status();
                        let text = resp.bytes().await;
                        if status.is_success() && text.is_ok() {
                            (status.as_u16().to_string(), None)
                        } else {
                            let msg = text
                                .map(|b| String::from_utf8_lossy(&b).chars().take(200).collect())
                                .unwrap_or_else(|e| e.to_string());
                            (status.as_u16().to_string(), Some(msg))
                        }
                    }
                    Err(e) => ("transport".into(), Some(e.to_string())),
                }
            }
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    latencies: Vec<u64>,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// (second since start, completions)
    seconds: Vec<u64>,
}

impl WorkerStats {
    fn record(
        &mut self,
        started: Instant,
        t0: Instant,
        done: Instant,
        status: String,
        err: Option<String>,
    ) {
        self.latencies
            .push(done.saturating_duration_since(t0).as_nanos() as u64);
        *self.statuses.entry(status).or_default() += 1;
        if let Some(e) = err {
            *self
                .errors
                .entry(e.chars().take(200).collect())
                .or_default() += 1;
        }
        let sec = done.saturating_duration_since(started).as_secs() as usize;
        if self.seconds.len() <= sec {
            self.seconds.resize(sec + 1, 0);
        }
        self.seconds[sec] += 1;
    }
}

/// One phase (warm-up or measurement) with the closed-loop or open-loop driver.
async fn phase(
    sender: &Sender,
    spec: &LoadSpec,
    duration: Option<Duration>,
    requests: Option<u64>,
    progress: bool,
) -> Outcome {
    let started = Instant::now();
    let stop_at = duration.map(|d| started + d);
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let may_start = {
        let issued = Arc::clone(&issued);
        move || {
            if stop_at.is_some_and(|t| Instant::now() >= t) {
                return false;
            }
            match requests {
                Some(n) => issued.fetch_add(1, Ordering::Relaxed) < n,
                None => true,
            }
        }
    };
    let ticker = progress.then(|| {
        let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
        tokio::spawn(async move {
            while !finished.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprint!(
                    "\r  {secs:6.1} s  {n:>9} done  {:>10.1} req/s",
                    n as f64 / secs
                );
            }
            eprintln!();
        })
    });

    let mut stats = WorkerStats::default();
    match spec.rate {
        None => {
            let mut workers = Vec::with_capacity(spec.concurrency);
            for w in 0..spec.concurrency.max(1) {
                let (sender, may_start, done) =
                    (sender.clone(), may_start.clone(), Arc::clone(&done));
                let timeout = spec.timeout;
                workers.push(tokio::spawn(async move {
                    let mut st = WorkerStats::default();
                    while may_start() {
                        let t0 = Instant::now();
                        let (status, err) = sender.send(w, timeout).await;
                        st.record(started, t0, Instant::now(), status, err);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    st
                }));
            }
            for w in workers {
                if let Ok(st) = w.await {
                    merge(&mut stats, st);
                }
            }
        }
        Some(rate) => {
            // Open loop: starts follow the clock, not completions; at most `concurrency` wait.
            let slots = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut next = Instant::now();
            let mut k = 0usize;
            while may_start() {
                tokio::time::sleep_until(next.into()).await;
                next += period;
                let permit = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .expect("open semaphore");
                let (sender, tx, done, timeout) =
                    (sender.clone(), tx.clone(), Arc::clone(&done), spec.timeout);
                k += 1;
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let (status, err) = sender.send(k, timeout).await;
                    let _ = tx.send((t0, Instant::now(), status, err));
                    done.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
            drop(tx);
            while let Some((t0, t1, status, err)) = rx.recv().await {
                stats.record(started, t0, t1, status, err);
            }
        }
    }
    finished.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    Outcome {
        latencies_ns: stats.latencies,
        statuses: stats.statuses,
        errors: stats.errors,
        elapsed: started.elapsed(),
        per_second: stats.seconds,
    }
}

fn merge(into: &mut WorkerStats, from: WorkerStats) {
    into.latencies.extend(from.latencies);
    for (k, v) in from.statuses {
        *into.statuses.entry(k).or_default() += v;
    }
    for (k, v) in from.errors {
        *into.errors.entry(k).or_default() += v;
    }
    if into.seconds.len() < from.seconds.len() {
        into.seconds.resize(from.seconds.len(), 0);
    }
    for (i, v) in from.seconds.into_iter().enumerate() {
        into.seconds[i] += v;
    }
}

/// Warm-up, then the measured run.
pub async fn run(spec: &LoadSpec) -> Result<Outcome, String> {
    if spec.duration.is_none() && spec.requests.is_none() {
        return Err("give a duration or a request count".into());
    }
    let sender = Sender::connect(spec).await?;
    if !spec.warmup.is_zero() {
        phase(&sender, spec, Some(spec.warmup), None, false).await;
    }
    Ok(phase(&sender, spec, spec.duration, spec.requests, spec.progress).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_model_inputs() {
        let inputs = vec![
            InputSpec {
                name: "A".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 16],
            },
            InputSpec {
                name: "T".into(),
                datatype: "BYTES".into(),
                shape: vec![-1, -1],
            },
        ];
        let r = build_request("m", &inputs, 8, 4).unwrap();
        assert_eq!(r.inputs[0].shape, vec![4, 16]);
        assert_eq!(r.raw_input_contents[0].len(), 4 * 16 * 4);
        assert_eq!(r.inputs[1].shape, vec![4, 1]);
        assert_eq!(
            crate::tensor::count_bytes_elements(&r.raw_input_contents[1]).unwrap(),
            4
        );
        let nobatch = build_request("m", &inputs[..1], 0, 4).unwrap();
        assert_eq!(nobatch.inputs[0].shape, vec![1, 16]);
    }
}
