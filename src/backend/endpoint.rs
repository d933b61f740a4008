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

use tonic::transport::{Channel, ClientTlsConfig, Endpoint as TonicEndpoint};

use super::{
    balance::Load,
    config::TritonConfig,
    discovery::Address,
    h2_infer::{H2Infer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT},
    metrics::metrics,
    placement::Placement,
};
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
    /// What it connects to (a resolved address, for a name; see [`super::discovery`]).
    pub url: String,
    /// The configured URL it stands for.
    pub origin: String,
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

/// What every endpoint of the pool is opened with: built once, used again for each address
/// that discovery adds.
pub(super) struct Connector {
    tls: Option<ClientTlsConfig>,
    /// Set in the config: a resolved address keeps it rather than its name.
    tls_domain_set: bool,
    connections: usize,
    connect_timeout: Duration,
    max_message_bytes: usize,
    /// ModelInfer connections of the gRPC serving threads (see [`Endpoint::lane_conns`]).
    lanes: usize,
}

impl Connector {
    pub(super) fn new(
        cfg: &TritonConfig,
        max_message_bytes: usize,
        lanes: usize,
    ) -> Result<Self, GatewayError> {
        let tls = cfg
            .tls()
            .map(crate::tls::triton_client_config)
            .transpose()
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        Ok(Self {
            tls,
            tls_domain_set: cfg.tls.domain.is_some(),
            connections: cfg.connections_per_endpoint,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            max_message_bytes,
            lanes,
        })
    }

    /// An endpoint for `at`, not yet connected: connections are made on first use and made
    /// again after failures.
    pub(super) fn open(&self, at: &Address) -> Result<Arc<Endpoint>, GatewayError> {
        let url = &at.url;
        let lean = |n: usize| -> Vec<Arc<H2Infer>> {
            if self.tls.is_some() {
                return Vec::new();
            }
            (0..n)
                .filter_map(|_| H2Infer::new(url, self.connect_timeout, self.max_message_bytes))
                .map(Arc::new)
                .collect()
        };
        let infer_conns = lean(self.connections);
        let lane_conns = lean(self.lanes);
        // Where ModelInfer has its own connections, tonic's carry only probes, metadata and
        // statistics: one is enough.
        let tonic_conns = if infer_conns.is_empty() {
            self.connections
        } else {
            1
        };
        let tls = self.tls.clone().map(|tls| match &at.domain {
            // A resolved IP: the certificate names the Service, not the pod's address.
            Some(d) if !self.tls_domain_set => tls.domain_name(d.clone()),
            _ => tls,
        });
        let mut clients = Vec::with_capacity(tonic_conns);
        for _ in 0..tonic_conns {
            let mut endpoint = TonicEndpoint::from_shared(url.clone())
                .map_err(|e| GatewayError::Internal(format!("triton url '{url}': {e}")))?;
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| GatewayError::Internal(format!("triton.tls for '{url}': {e}")))?;
            }
            let channel = endpoint
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_lazy();
            clients.push(
                GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(self.max_message_bytes)
                    .max_encoding_message_size(self.max_message_bytes),
            );
        }
        Ok(Arc::new(Endpoint {
            url: url.clone(),
            origin: at.origin.clone(),
            clients,
            infer_conns,
            lane_conns,
            next_client: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            breakers: RwLock::default(),
            placement: Default::default(),
            load: Default::default(),
            calls: metrics().calls(url),
        }))
    }
}

/// Counts a call against its endpoint while it runs.
pub(super) struct InFlight(pub(super) Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
