//! Liveness and readiness, kept apart on purpose.
//!
//! - Liveness (`/livez`): the process answers HTTP. Nothing else: a gateway that is busy, or
//!   whose Triton or broker is down, is still alive, and restarting it would only drop the
//!   requests it holds. Only a wedged process (no answer) should be restarted.
//! - Readiness (`/readyz`, grpc.health.v1): should this instance get traffic now? It needs at
//!   least one Triton endpoint ready, every model in `triton.ready_models` ready, the task
//!   broker reachable, and no shutdown in progress. An unready instance is taken out of the
//!   Service's endpoints, not killed; it turns ready again by itself.
//!
//! A monitor task re-checks on `triton.health_interval_ms`, so probes are answered from memory
//! and a flood of probes cannot load Triton or the broker.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::queue::metrics::broker_metrics;
use crate::tasks::metrics::task_metrics;
use crate::{
    backend::triton::TritonPool,
    queue::Broker,
    queue::metrics::BrokerLabel,
    tasks::TaskStore,
    telemetry::metrics::{EndpointLabel, metrics},
};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    /// At least one Triton endpoint passed its last probe.
    pub triton: bool,
    /// Each model of `triton.ready_models`, ready or not.
    pub models: BTreeMap<String, bool>,
    /// Whether the broker answered; absent when there is no broker to check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<bool>,
    /// Whether the task store answered with its data intact (false for the one check that
    /// finds it came back empty); absent when there is none to check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_store: Option<bool>,
    pub draining: bool,
}

pub struct Health {
    pool: Arc<TritonPool>,
    broker: Option<(Arc<dyn Broker>, &'static str)>,
    store: Option<Arc<dyn TaskStore>>,
    models: Vec<String>,
    timeout: Duration,
    draining: AtomicBool,
    state: RwLock<Readiness>,
    /// Readiness changes, for grpc.health.v1.
    ready_tx: tokio::sync::watch::Sender<bool>,
}

impl Health {
    /// `store`: readiness also asks the task store (reachable, its data intact).
    pub fn new(
        pool: Arc<TritonPool>,
        broker: Option<(Arc<dyn Broker>, &'static str)>,
        store: Option<Arc<dyn TaskStore>>,
        models: Vec<String>,
        timeout: Duration,
    ) -> Arc<Self> {
        // The task side's and the broker's families are registered here, at start, so
        // /metrics lists them (and dashboards find them) before their first event.
        let (brokers, tasks) = (broker_metrics(), task_metrics());
        if let Some((_, kind)) = &broker {
            brokers.init(kind);
            tasks.init(crate::tasks::ALL_STATES.map(|s| s.as_str()));
        }
        Arc::new(Self {
            pool,
            broker,
            store,
            models,
            timeout,
            draining: AtomicBool::new(false),
            state: RwLock::new(Readiness::default()),
            ready_tx: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Follows readiness as it changes (the current value first).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    pub fn readiness(&self) -> Readiness {
        self.state.read().expect("health lock").clone()
    }

    /// From now on unready (shutdown): load balancers stop sending new work.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let mut s = self.state.write().expect("health lock");
        s.draining = true;
        s.ready = false;
        metrics().ready.set(0);
        self.ready_tx.send_replace(false);
    }

    /// Checks everything once and stores the answer.
    pub async fn check(&self) -> Readiness {
        let m = metrics();
        for ep in self.pool.endpoints().iter() {
            m.triton_up
                .get_or_create(&EndpointLabel {
                    endpoint: ep.url.clone(),
                })
                .set(ep.is_healthy() as i64);
        }
        let triton = self.pool.is_ready();
        let mut models = BTreeMap::new();
        for name in &self.models {
            let ok = triton
                && matches!(
                    tokio::time::timeout(self.timeout, self.pool.model_ready(name, "")).await,
                    Ok(Ok(true))
                );
            models.insert(name.clone(), ok);
        }
        let broker = match &self.broker {
            Some((b, kind)) => Some(match tokio::time::timeout(self.timeout, b.depth()).await {
                Ok(Ok(depth)) => {
                    broker_metrics()
                        .task_queue_depth
                        .get_or_create(&BrokerLabel { broker: kind })
                        .set(depth.min(i64::MAX as u64) as i64);
                    true
                }
                _ => false,
            }),
            None => None,
        };
        let task_store = match &self.store {
            Some(s) => Some(matches!(
                tokio::time::timeout(self.timeout, s.check()).await,
                Ok(Ok(true))
            )),
            None => None,
        };
        let draining = self.draining.load(Ordering::Relaxed);
        let ready = triton
            && models.values().all(|&v| v)
            && broker != Some(false)
            && task_store != Some(false)
            && !draining;
        let r = Readiness {
            ready,
            triton,
            models,
            broker,
            task_store,
            draining,
        };
        m.ready.set(ready as i64);
        let mut s = self.state.write().expect("health lock");
        if s.ready != r.ready {
            if r.ready {
                tracing::info!(readiness = ?r, "ready");
            } else {
                tracing::warn!(readiness = ?r, "not ready");
            }
        }
        *s = r.clone();
        drop(s);
        self.ready_tx
            .send_if_modified(|v| std::mem::replace(v, ready) != ready);
        r
    }

    /// Re-checks every `interval` until `stop`.
    pub fn spawn(
        self: &Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let h = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => { h.check().await; }
                }
            }
        })
    }
}
