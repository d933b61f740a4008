//! The autoscaler's parts started in a process.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    ModelCheck, Scaler, SharedInFlight, Signals,
    config::ScalerConfig,
    peaks::{MemoryPeaks, PeakStore},
    peaks_redis::RedisPeaks,
};
use crate::{
    proto::externalscaler::external_scaler_server::ExternalScalerServer,
    tasks::{
        TaskStore,
        config::{StoreUrl, TasksConfig},
    },
    telemetry::activity::Activity,
};

/// The autoscaler's parts in this process: with a Redis task store, this process's in-flight
/// calls shared there (front ends and workers alike); with `scaler.addr`, KEDA's external
/// scaler on its own listener (its peaks in Redis when the store is there, else in memory).
pub fn spawn(
    s: &ScalerConfig,
    tasks_cfg: &TasksConfig,
    activity: Arc<Activity>,
    store: Arc<dyn TaskStore>,
    models: ModelCheck,
    listener: Option<TcpListener>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let prefix = &tasks_cfg.redis_prefix;
    let mut tasks = Vec::new();
    let shared = match &tasks_cfg.task_store {
        StoreUrl::Redis(url) => {
            let shared = SharedInFlight::new(url, prefix)
                .with_context(|| format!("{url}, to share in-flight calls"))?;
            tasks.push(shared.clone().spawn_publisher(
                Arc::clone(&activity),
                Duration::from_millis(s.share_interval_ms),
                stop.clone(),
            ));
            Some(shared)
        }
        StoreUrl::Memory => None,
    };
    let Some(listener) = listener else {
        return Ok(tasks);
    };
    let peaks: Arc<dyn PeakStore> = match &tasks_cfg.task_store {
        StoreUrl::Redis(url) => Arc::new(
            RedisPeaks::new(url, prefix)
                .with_context(|| format!("{url}, for the scaler's peaks"))?,
        ),
        StoreUrl::Memory => Arc::new(MemoryPeaks::default()),
    };
    let signals = Signals {
        store,
        activity,
        shared,
    };
    let scaler = Arc::new(Scaler::new(s.clone(), signals, peaks, models, stop.clone()));
    // Peaks recorded as often as the calls in flight are shared.
    tasks.push(scaler.spawn_recorder(Duration::from_millis(s.share_interval_ms)));
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tracing::info!(%addr, "KEDA external scaler serving");
    tasks.push(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(ExternalScalerServer::new(scaler))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the external scaler stopped");
        }
    }));
    Ok(tasks)
}
