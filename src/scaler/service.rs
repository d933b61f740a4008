//! The gRPC service KEDA calls (`externalscaler.ExternalScaler`).

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{Policy, decide::Decision, demand::Signals, peaks::PeakStore};
use crate::{
    proto::externalscaler::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
        MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
    },
    scaler::config::{MAX_CAPACITY_PER_REPLICA, MAX_REPLICAS, MAX_TASKS_PER_REPLICA, ScalerConfig},
    scaler::metrics::{ScalerLabels, ScalerWinner, metrics},
};

/// The one metric each scaled object gets: the replicas it should have. Its target is 1, so
/// KEDA's HPA (AverageValue) asks for exactly the value.
pub const METRIC: &str = "infergate-desired-replicas";

/// Whether a name is a model (or route) the front end serves: `Err` names why not. A check
/// that cannot be made (Triton unreachable) passes.
pub type ModelCheck =
    Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The numbers a ScaledObject's metadata may set, with the bounds their flags have.
const BOUNDS: [(&str, u32, u32); 4] = [
    ("minReplicas", 0, MAX_REPLICAS),
    ("maxReplicas", 1, MAX_REPLICAS),
    ("capacityPerReplica", 1, MAX_CAPACITY_PER_REPLICA),
    ("tasksPerReplica", 1, MAX_TASKS_PER_REPLICA),
];

pub struct Scaler {
    cfg: ScalerConfig,
    signals: Signals,
    peaks: Arc<dyn PeakStore>,
    models: ModelCheck,
    /// The objects KEDA asked about, by id: their peaks are recorded between its polls too.
    seen: std::sync::Mutex<std::collections::HashMap<String, Arc<Object>>>,
    /// Ends open StreamIsActive streams at shutdown, so they do not hold the drain.
    stop: CancellationToken,
}

/// A scaled object as its trigger's metadata describes it.
struct Object {
    id: String,
    models: Vec<String>,
    policy: Policy,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Scaler {
    pub fn new(
        cfg: ScalerConfig,
        signals: Signals,
        peaks: Arc<dyn PeakStore>,
        models: ModelCheck,
        stop: CancellationToken,
    ) -> Self {
        Self {
            cfg,
            signals,
            peaks,
            models,
            seen: Default::default(),
            stop,
        }
    }

    /// The object a request names, its metadata checked like the flags (bounds) and its models
    /// against what this front end serves: a typo is refused, not scaled to its minimum.
    async fn object(&self, r: &ScaledObjectRef) -> Result<Arc<Object>, Status> {
        let obj = Arc::new(self.parse(r)?);
        for m in &obj.models {
            (self.models)(m.clone()).await.map_err(|why| {
                Status::invalid_argument(format!("scalerMetadata.models: '{m}': {why}"))
            })?;
        }
        let mut seen = self.seen.lock().expect("scaler objects lock");
        // Bounded: each object KEDA knows keeps one entry (its latest metadata).
        if seen.len() < 10_000 || seen.contains_key(&obj.id) {
            seen.insert(obj.id.clone(), Arc::clone(&obj));
        }
        Ok(obj)
    }

    /// Records every known object's demand as a peak every `every`, so a burst that comes and
    /// goes between two of KEDA's polls (15 s in the chart) still reaches the baseline tier.
    pub fn spawn_recorder(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let objects: Vec<Arc<Object>> = this
                    .seen
                    .lock()
                    .expect("scaler objects lock")
                    .values()
                    .cloned()
                    .collect();
                for obj in objects {
                    if let Err(e) = this.record(&obj).await {
                        tracing::debug!(object = %obj.id, error = %e, "recording a peak failed");
                    }
                }
            }
        })
    }

    /// Reads the object's demand and records what it asks as a peak; answers the demand.
    async fn record(&self, obj: &Object) -> Result<super::decide::Demand, Status> {
        let demand = self
            .signals
            .demand(&obj.models)
            .await
            .map_err(|e| Status::unavailable(format!("reading demand: {e}")))?;
        self.peaks
            .record(
                &obj.id,
                self.cfg.baseline_bucket_s,
                now_s(),
                obj.policy.asked_now(demand),
                obj.policy.keep_s(),
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(demand)
    }

    fn parse(&self, r: &ScaledObjectRef) -> Result<Object, Status> {
        let meta = &r.scaler_metadata;
        let models: Vec<String> = meta
            .get("models")
            .map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if models.is_empty() {
            return Err(Status::invalid_argument(
                "scalerMetadata.models: name the models this object serves (comma-separated)",
            ));
        }
        // Within the bounds the matching flag has: 0 tasks per replica, or a pool pinned at
        // 0, is refused rather than read as something else.
        let num = |key: &str, default: u32| -> Result<u32, Status> {
            let Some(v) = meta.get(key) else {
                return Ok(default);
            };
            let (_, lo, hi) = BOUNDS
                .iter()
                .find(|(k, ..)| *k == key)
                .expect("a bounded key");
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (*lo..=*hi).contains(n))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "scalerMetadata.{key}: '{v}' is not a whole number in {lo}..={hi}"
                    ))
                })
        };
        let c = &self.cfg;
        let policy = Policy {
            min_replicas: num("minReplicas", c.min_replicas)?,
            max_replicas: num("maxReplicas", c.max_replicas)?,
            capacity_per_replica: num("capacityPerReplica", c.capacity_per_replica)?.into(),
            tasks_per_replica: num("tasksPerReplica", c.tasks_per_replica)?.into(),
            horizon_s: c.baseline_horizon_s,
            half_life_s: c.baseline_half_life_s,
        };
        if policy.min_replicas > policy.max_replicas {
            return Err(Status::invalid_argument(
                "scalerMetadata.minReplicas is over maxReplicas",
            ));
        }
        Ok(Object {
            id: format!("{}/{}", r.namespace, r.name),
            models,
            policy,
        })
    }

    /// One decision: read the demand, record what it asks as a peak, read the peaks back,
    /// decide; export and log it.
    async fn evaluate(&self, obj: &Object) -> Result<Decision, Status> {
        let demand = self.record(obj).await?;
        let now = now_s();
        let keep = obj.policy.keep_s();
        let unavailable = |e: super::peaks::PeakError| Status::unavailable(e.to_string());
        let peaks = self
            .peaks
            .peaks(&obj.id, now, keep)
            .await
            .map_err(unavailable)?;
        let d = obj.policy.decide(demand, &peaks, now);
        let m = metrics();
        for (tier, v) in [
            ("queue", d.queue),
            ("reactive", d.reactive),
            ("baseline", d.baseline),
            ("desired", d.desired),
        ] {
            m.replicas
                .get_or_create(&ScalerLabels {
                    object: obj.id.clone(),
                    tier,
                })
                .set(v.into());
        }
        m.decisions
            .get_or_create(&ScalerWinner {
                object: obj.id.clone(),
                winner: d.winner.as_str(),
            })
            .inc();
        tracing::info!(
            object = %obj.id,
            queued = demand.queued,
            in_flight = demand.in_flight,
            queue = d.queue,
            reactive = d.reactive,
            baseline = d.baseline,
            desired = d.desired,
            winner = d.winner.as_str(),
            reason = %d.reason,
            "scaler decision"
        );
        Ok(d)
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Arc<Scaler> {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let obj = self.object(request.get_ref()).await?;
        let d = self.evaluate(&obj).await?;
        Ok(Response::new(IsActiveResponse {
            result: d.desired > 0,
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    /// Sends the activity at once, then whenever it changes: checked every
    /// `stream_interval_ms`, and at once when this process accepts a task.
    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let obj = self.object(request.get_ref()).await?;
        let (tx, rx) = mpsc::channel(4);
        let this = Arc::clone(self);
        let every = Duration::from_millis(self.cfg.stream_interval_ms);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let active = match this.evaluate(&obj).await {
                    Ok(d) => Ok(d.desired > 0),
                    Err(e) => Err(e),
                };
                let changed = match (&active, last) {
                    (Ok(a), Some(l)) => *a != l,
                    _ => true,
                };
                if changed {
                    if let Ok(a) = &active {
                        last = Some(*a);
                    }
                    let msg = active.map(|result| IsActiveResponse { result });
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = this.stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                    _ = this.signals.activity.accepted() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        self.object(request.get_ref()).await?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: METRIC.into(),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let r = req
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let obj = self.object(&r).await?;
        let d = self.evaluate(&obj).await?;
        let name = if req.metric_name.is_empty() {
            METRIC.to_string()
        } else {
            req.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: name,
                metric_value: d.desired.into(),
                metric_value_float: d.desired.into(),
            }],
        }))
    }
}
