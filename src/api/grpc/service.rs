//! `inference.GRPCInferenceService` behind tonic's router: ModelStreamInfer goes through
//! validation and dispatch; health, metadata, config, statistics and the repository index come from the
//! Triton pool. (Unary ModelInfer is answered earlier, by the listener's `model_infer`.)

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    api::{narrow_extensions, observed},
    backend::triton::TritonPool,
    call::Call,
    infer::InferService,
    proto::inference::{
        ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
        ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
        ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse,
        RepositoryIndexRequest, RepositoryIndexResponse, ServerLiveRequest, ServerLiveResponse,
        ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
        grpc_inference_service_server::GrpcInferenceService,
    },
};

pub struct GrpcApi {
    infer: InferService,
    stream_concurrency: usize,
}

impl GrpcApi {
    pub fn new(infer: InferService, stream_concurrency: usize) -> Self {
        Self {
            infer,
            stream_concurrency,
        }
    }

    fn pool(&self) -> &Arc<TritonPool> {
        self.infer.backend()
    }
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

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

    /// Requests run up to `stream_concurrency` at a time and are answered in request order.
    /// An error answers that request alone (as Triton does); the stream goes on. When the
    /// client goes away tonic drops this stream, which drops the pending calls to Triton.
    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let infer = self.infer.clone();
        let (md, _, stream) = req.into_parts();
        let headers = Arc::new(md.into_headers());
        let out = stream
            .map(move |msg| {
                let (infer, headers) = (infer.clone(), Arc::clone(&headers));
                async move {
                    let mut r = msg?;
                    let call = infer.at_edge(&mut r, &headers, None, Call::sync(None));
                    let (model_name, model_version, id) =
                        (r.model_name.clone(), r.model_version.clone(), r.id.clone());
                    let call = infer.infer(r, call);
                    let result =
                        observed("grpc ModelStreamInfer", "grpc", &model_name, &headers, call)
                            .await;
                    Ok(match result {
                        Ok(resp) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(resp),
                        },
                        Err(e) => ModelStreamInferResponse {
                            error_message: e.to_string(),
                            infer_response: Some(ModelInferResponse {
                                model_name,
                                model_version,
                                id,
                                ..Default::default()
                            }),
                        },
                    })
                }
            })
            .buffered(self.stream_concurrency);
        Ok(Response::new(Box::pin(out)))
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
}
