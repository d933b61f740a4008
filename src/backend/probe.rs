//! The probe loop: each endpoint's readiness and models on an interval, and the Triton names
//! looked up again when due (what that adds is probed at once; what leaves drains).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{endpoint::Endpoint, metrics::metrics as pool_metrics, triton::TritonPool};
use crate::proto::inference::ServerReadyRequest;

impl TritonPool {
    /// Probes every endpoint once (ServerReady, then the ready models of those that are
    /// ready; each bounded by `probe_timeout_ms`), after a lookup of the Triton names when one
    /// is due.
    pub async fn probe_all(&self) {
        if self
            .members
            .discovery
            .next_at()
            .is_some_and(|at| at <= Instant::now())
        {
            self.refresh().await;
        }
        self.probe(&self.endpoints()).await;
        self.sweep();
    }

    /// Probes `endpoints` once.
    pub(super) async fn probe(&self, endpoints: &[Arc<Endpoint>]) {
        let probes = endpoints.iter().map(|ep| async move {
            let mut client = ep.client();
            let mut req = tonic::Request::new(ServerReadyRequest {});
            req.set_timeout(self.probe_timeout());
            let ready = matches!(client.server_ready(req).await, Ok(r) if r.get_ref().ready);
            let now = Instant::now();
            // A server without the repository extension keeps holding every model.
            if ready && let Err(e) = ep.read_index(self.probe_timeout()).await {
                tracing::debug!(endpoint = %ep.url, error = %e, "repository index not read");
            }
            if !ready {
                // Its pod may be gone (or not yet up): the names are looked up again soon.
                self.members.discovery.soon();
            }
            let was = ep.healthy.swap(ready, Ordering::Relaxed);
            pool_metrics().endpoint(
                &ep.url,
                ep.in_flight.load(Ordering::Relaxed),
                ep.load.latency(now, self.decay()),
                ep.load.weight(now, self.slow_start()),
            );
            if was != ready {
                if ready {
                    ep.load.became_ready(now);
                    tracing::info!(endpoint = %ep.url, "Triton endpoint is ready");
                } else {
                    tracing::warn!(endpoint = %ep.url, "Triton endpoint is not ready");
                }
            }
        });
        futures::future::join_all(probes).await;
    }

    /// Looks the Triton names up and applies the answer; returns the endpoints added.
    pub(super) async fn refresh(&self) -> Vec<Arc<Endpoint>> {
        let _one = self.members.changing.lock().await;
        let resolved = self.members.discovery.resolve().await;
        let Some((next, added)) = self.members.apply(&self.endpoints(), &resolved) else {
            return Vec::new();
        };
        self.endpoints.store(Arc::new(next));
        added
    }

    /// Lets go of endpoints that finished draining.
    fn sweep(&self) {
        self.members
            .sweep(Duration::from_millis(self.cfg.request_timeout_ms));
    }

    /// Endpoints that left and still have calls in flight.
    pub fn draining(&self) -> usize {
        self.members.draining()
    }

    /// Probes on an interval, and looks the Triton names up when due (probing what that
    /// adds at once), until `shutdown` is cancelled.
    pub fn spawn_probe(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(pool.cfg.health_interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let discovery = &pool.members.discovery;
            loop {
                let lookup = discovery.next_at();
                let at = lookup.unwrap_or_else(Instant::now).into();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => pool.probe_all().await,
                    // A failure asked for a lookup: the loop takes the new time.
                    _ = discovery.woken() => {}
                    _ = tokio::time::sleep_until(at), if lookup.is_some() => {
                        let added = pool.refresh().await;
                        pool.probe(&added).await;
                        pool.sweep();
                    }
                }
            }
        })
    }
}
