//! What Triton says about its models, asked of an endpoint that holds the model: metadata
//! and config (cached for `model_cache_ttl_ms` as [`ModelInfo`]), readiness, the repository
//! index and statistics (summed over the endpoints, so a pool looks like one server).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{merge::merge_statistics, triton::TritonPool};
use crate::{
    error::GatewayError,
    model::ModelInfo,
    proto::inference::{
        ModelConfigRequest, ModelConfigResponse, ModelMetadataRequest, ModelMetadataResponse,
        ModelReadyRequest, ModelStatisticsRequest, ModelStatisticsResponse, RepositoryIndexRequest,
        RepositoryIndexResponse, ServerMetadataRequest, ServerMetadataResponse,
    },
    telemetry::metrics::metrics,
};

impl TritonPool {
    /// Reads every endpoint's repository index now (after model control changed them).
    pub async fn read_placement(&self) {
        let timeout = self.probe_timeout();
        let endpoints = self.endpoints();
        let reads = endpoints.iter().map(|ep| ep.read_index(timeout));
        futures::future::join_all(reads).await;
    }

    pub async fn server_metadata(&self) -> Result<ServerMetadataResponse, GatewayError> {
        self.call(None, |mut c, t| async move {
            c.server_metadata(timed(ServerMetadataRequest {}, t)).await
        })
        .await
    }

    pub async fn model_ready(&self, name: &str, version: &str) -> Result<bool, GatewayError> {
        let req = ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        // Held by no endpoint is an answer here, as Triton answers for a model it lacks.
        match self
            .call_for((name, version), |mut c, t| async move {
                c.model_ready(timed(req, t)).await
            })
            .await
        {
            Err(GatewayError::ModelNotPlaced { .. }) => Ok(false),
            r => r.map(|r| r.ready),
        }
    }

    pub async fn model_metadata(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelMetadataResponse, GatewayError> {
        let req = ModelMetadataRequest {
            name: name.into(),
            version: version.into(),
        };
        self.call_for((name, version), |mut c, t| async move {
            c.model_metadata(timed(req, t)).await
        })
        .await
        .map_err(|e| not_found(e, name, version))
    }

    pub async fn model_config(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelConfigResponse, GatewayError> {
        let req = ModelConfigRequest {
            name: name.into(),
            version: version.into(),
        };
        self.call_for((name, version), |mut c, t| async move {
            c.model_config(timed(req, t)).await
        })
        .await
        .map_err(|e| not_found(e, name, version))
    }

    pub async fn repository_index(
        &self,
        req: RepositoryIndexRequest,
    ) -> Result<RepositoryIndexResponse, GatewayError> {
        self.call(None, |mut c, t| async move {
            c.repository_index(timed(req, t)).await
        })
        .await
    }

    /// Statistics summed over every ready endpoint, so a pool looks like one server.
    pub async fn model_statistics(
        &self,
        req: ModelStatisticsRequest,
    ) -> Result<ModelStatisticsResponse, GatewayError> {
        let endpoints = self.endpoints();
        let ready: Vec<_> = endpoints.iter().filter(|e| e.is_healthy()).collect();
        if ready.len() <= 1 {
            return self
                .call(None, |mut c, t| async move {
                    c.model_statistics(timed(req, t)).await
                })
                .await
                .map_err(|e| not_found(e, "", ""));
        }
        let timeout = Duration::from_millis(self.cfg.request_timeout_ms);
        let calls = ready.iter().map(|ep| {
            let mut c = ep.client();
            let req = timed(req.clone(), timeout);
            async move { c.model_statistics(req).await }
        });
        let mut parts = Vec::new();
        for r in futures::future::join_all(calls).await {
            parts.push(r.map_err(GatewayError::from_backend)?.into_inner());
        }
        Ok(merge_statistics(parts))
    }

    /// Metadata and config of a model, from the cache when fresh.
    pub async fn model_info(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<ModelInfo>, GatewayError> {
        let ttl = Duration::from_millis(self.cfg.model_cache_ttl_ms);
        if let Some((at, info)) = self.cached(name, version)
            && at.elapsed() < ttl
        {
            return Ok(info);
        }
        // Boxed: the fetch's future (two tonic calls) is ~7.7 KB, and every caller's future
        // (each request and task) would otherwise carry that much for a rare cache miss.
        Box::pin(self.fetch_model_info(name, version)).await
    }

    fn cached(&self, name: &str, version: &str) -> Option<(Instant, Arc<ModelInfo>)> {
        let models = self.models.read().expect("model cache lock");
        let (at, info) = models.get(name)?.get(version)?;
        Some((*at, Arc::clone(info)))
    }

    /// Reads a model's metadata and config from Triton into the cache.
    async fn fetch_model_info(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<ModelInfo>, GatewayError> {
        let fetched = tokio::try_join!(
            self.model_metadata(name, version),
            self.model_config(name, version)
        );
        let (metadata, config) = match fetched {
            Ok(v) => v,
            // Triton unreachable: a description we had is still the best guess, so async
            // tasks keep being accepted (and wait in the broker) through an outage.
            Err(e @ GatewayError::Unavailable(_)) => {
                return match self.cached(name, version) {
                    Some((_, info)) => Ok(info),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let info = Arc::new(ModelInfo::new(metadata, config.config.unwrap_or_default()));
        // The name as asked for: it is the one requests are counted under.
        metrics().register_model(name);
        self.models
            .write()
            .expect("model cache lock")
            .entry(name.to_string())
            .or_default()
            .insert(version.to_string(), (Instant::now(), Arc::clone(&info)));
        Ok(info)
    }
}

fn timed<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Triton answers an unknown model or version with NOT_FOUND (2.51, checked against its
/// gRPC port): that becomes infergate's one ModelNotFound, naming what was asked for.
fn not_found(err: GatewayError, name: &str, version: &str) -> GatewayError {
    match &err {
        GatewayError::Backend { code, .. }
            if *code == tonic::Code::NotFound && !name.is_empty() =>
        {
            GatewayError::ModelNotFound {
                model: name.into(),
                version: version.into(),
            }
        }
        _ => err,
    }
}
