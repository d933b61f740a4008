//! `inference.GRPCInferenceService` behind tonic's router: ModelStreamInfer goes to
//! [`super::stream_infer`]; health, metadata, config, statistics and the repository index come from the
//! Triton pool. (Unary ModelInfer is answered earlier, by the listener's `model_infer`.)

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::stream_infer::{self, StreamOut};

use crate::{api::features::Features, auth::caller_of, fleet::Action};
use crate::{
    api::narrow_extensions,
    backend::triton::TritonPool,
    call::OnLane,
    infer::InferService,
    proto::inference::{
        ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
        ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
        ModelStatisticsRequest, ModelStatisticsResponse, RepositoryIndexRequest,
        RepositoryIndexResponse, RepositoryModelLoadRequest, RepositoryModelLoadResponse,
        RepositoryModelUnloadRequest, RepositoryModelUnloadResponse, ServerLiveRequest,
        ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
        ServerReadyResponse, grpc_inference_service_server::GrpcInferenceService,
    },
};

pub struct GrpcApi {
    infer: InferService,
    features: Features,
    stream_concurrency: usize,
}

impl GrpcApi {
    pub fn new(infer: InferService, features: Features, stream_concurrency: usize) -> Self {
        Self {
            infer,
            features,
            stream_concurrency,
        }
    }

    fn pool(&self) -> &Arc<TritonPool> {
        self.infer.backend()
    }

    /// Model control on every endpoint: OK only when each endpoint did it.
    async fn control(
        &self,
        caller: &crate::auth::Caller,
        action: Action,
        repo: &str,
        model: &str,
        params: std::collections::HashMap<
            String,
            crate::proto::inference::ModelRepositoryParameter,
        >,
    ) -> Result<(), Status> {
        let outcome = self
            .features
            .fleet
            .control(caller, action, repo, model, params)
            .await?;
        match outcome.error() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcApi {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.pool().is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = self.infer.model_ready(&r.name, &r.version).await?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let mut md = self.pool().server_metadata().await?;
        md.extensions = narrow_extensions(md.extensions);
        Ok(Response::new(md))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.infer.model_metadata(&r.name, &r.version).await?,
        ))
    }

    /// Never called: the listener answers every ModelInfer before tonic's router sees it
    /// (`listener::serve_h2`), so there is one ModelInfer path, not two to keep in step.
    async fn model_infer(
        &self,
        _: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        Err(Status::internal(
            "ModelInfer is answered by infergate's gRPC listener, not through tonic's router",
        ))
    }

    type ModelStreamInferStream = StreamOut;

    /// See [`super::stream_infer`]: decoupled models' responses relayed as they come, other
    /// requests answered in order.
    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let lane = req.extensions().get::<OnLane>().map(|l| l.0);
        let (md, _, input) = req.into_parts();
        Ok(Response::new(stream_infer::serve(
            self.infer.clone(),
            self.features.streams.clone(),
            self.stream_concurrency,
            md.into_headers(),
            input,
            lane,
        )))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.infer.model_config(&r.name, &r.version).await?,
        ))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Ok(Response::new(
            self.pool().model_statistics(req.into_inner()).await?,
        ))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Ok(Response::new(
            self.pool().repository_index(req.into_inner()).await?,
        ))
    }

    /// See [`crate::fleet::control`]: on every endpoint; any endpoint's failure is the
    /// answer's error, whose message names each endpoint that failed.
    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let caller = caller_of(req.extensions());
        let r = req.into_inner();
        self.control(
            &caller,
            Action::Load,
            &r.repository_name,
            &r.model_name,
            r.parameters,
        )
        .await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let caller = caller_of(req.extensions());
        let r = req.into_inner();
        self.control(
            &caller,
            Action::Unload,
            &r.repository_name,
            &r.model_name,
            r.parameters,
        )
        .await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}
