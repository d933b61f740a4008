//! One Triton server of the pool: its connections, health, calls in flight and a circuit
//! per model.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;

use super::{balance::Load, h2_infer::H2Infer, metrics::metrics, placement::Placement};
use crate::{
    breaker::{Breaker, BreakerConfig, State},
    error::GatewayError,
    proto::inference::{
        RepositoryIndexRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    },
};

pub type TritonClient = GrpcInferenceServiceClient<Channel>;

/// One Triton server.
pub struct Endpoint {
    pub url: String,
    pub(super) clients: Vec<TritonClient>,
    /// ModelInfer's own connections (plaintext endpoints only; see [`H2Infer`]).
    pub(super) infer_conns: Vec<Arc<H2Infer>>,
    /// One more per gRPC serving thread, used only by calls on that thread (a call's lane, see
    /// [`crate::call::Call`]), so a pass-through call and its connection's I/O stay on one
    /// thread.
    pub(super) lane_conns: Vec<Arc<H2Infer>>,
    pub(super) next_client: AtomicUsize,
    pub(super) healthy: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    /// A circuit per model served here (with several endpoints; see [`TritonPool::pick`]).
    pub(super) breakers: RwLock<HashMap<String, Arc<Breaker>>>,
    /// The models ready here (Triton's repository index).
    pub placement: Placement,
    /// Its latency average and slow start, for the balancer.
    pub(super) load: Load,
    /// Calls sent here (`infergate_triton_endpoint_calls_total`).
    pub(super) calls: prometheus_client::metrics::counter::Counter,
}

/// The most models whose circuits one endpoint keeps (a bound under any traffic; models past
/// it are not guarded).
const MAX_BREAKERS: usize = 4096;

impl Endpoint {
    /// The circuit of `model` here, made on first use.
    pub(super) fn breaker(&self, model: &str, cfg: &BreakerConfig) -> Option<Arc<Breaker>> {
        if let Some(b) = self.breakers.read().expect("breakers lock").get(model) {
            return Some(Arc::clone(b));
        }
        let mut all = self.breakers.write().expect("breakers lock");
        if all.len() >= MAX_BREAKERS && !all.contains_key(model) {
            return None;
        }
        let b = all
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(Breaker::new(cfg.clone())));
        Some(Arc::clone(b))
    }

    /// True while `model`'s circuit here is open (its cool-down not over).
    pub(super) fn is_open_for(&self, model: &str, now: Instant) -> bool {
        self.breakers
            .read()
            .expect("breakers lock")
            .get(model)
            .is_some_and(|b| b.state(now) == State::Open)
    }

    /// Marks the endpoint down after a transport failure, so the next call goes elsewhere
    /// without waiting for the probe.
    pub(super) fn mark_unhealthy(&self, err: &crate::error::GatewayError) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.url, error = %err, "Triton endpoint failed a call");
        }
    }

    /// Reads this endpoint's repository index (ready models only) into its placement.
    pub(super) async fn read_index(&self, timeout: Duration) -> Result<(), GatewayError> {
        let mut req = tonic::Request::new(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        });
        req.set_timeout(timeout);
        let index = tokio::time::timeout(timeout, self.client().repository_index(req))
            .await
            .map_err(|_| GatewayError::Unavailable(format!("{}: no repository index", self.url)))?
            .map_err(GatewayError::from_backend)?
            .into_inner();
        let gone = self.placement.set(&index);
        for m in self.placement.models() {
            metrics().model_ready(&self.url, &m, true);
        }
        for m in gone {
            metrics().model_ready(&self.url, &m, false);
        }
        Ok(())
    }

    /// Reads the index again soon, on a task of its own (at most one a second): this
    /// endpoint answered a model's call in a way that says its models changed.
    pub(super) fn read_index_soon(self: &Arc<Self>, timeout: Duration) {
        if !self.placement.may_ask(Instant::now()) {
            return;
        }
        let ep = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = ep.read_index(timeout).await {
                tracing::debug!(endpoint = %ep.url, error = %e, "repository index not read");
            }
        });
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(super) fn client(&self) -> TritonClient {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// Lane `i`'s own lean connection, or (off the serving threads) the shared ones in turn.
    pub(super) fn infer_conn(&self, lane: Option<usize>) -> Option<&Arc<H2Infer>> {
        if let Some(conn) = lane.and_then(|i| self.lane_conns.get(i)) {
            return Some(conn);
        }
        let n = self.infer_conns.len();
        (n > 0).then(|| &self.infer_conns[self.next_client.fetch_add(1, Ordering::Relaxed) % n])
    }
}

/// Counts a call against its endpoint while it runs.
pub(super) struct InFlight(pub(super) Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
