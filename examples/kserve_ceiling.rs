//! Benchmark reference, not part of infergate: a KServe v2 gRPC server (tonic, a multi-thread
//! runtime) that answers `add_sub` itself, computing both outputs, with no Triton behind it.
//! No front end can answer faster than a server that does no forwarding, so its throughput
//! with a given load generator on a machine is the ceiling for any front end there
//! (`loadtest/compare.sh`). It serves what perf_analyzer and infergate-load ask before they
//! start (metadata, config, statistics) and refuses every other model and call. It answers
//! `add_sub_delay` (add_sub with a Triton-side window) the same way.
//!
//!     cargo run --release --example kserve_ceiling -- 127.0.0.1:9002

use bytes::Bytes;
use infergate::proto::inference::{
    DataType, ModelConfig, ModelConfigRequest, ModelConfigResponse, ModelInferRequest,
    ModelInferResponse, ModelInput, ModelMetadataRequest, ModelMetadataResponse, ModelOutput,
    ModelReadyRequest, ModelReadyResponse, ModelStatistics, ModelStatisticsRequest,
    ModelStatisticsResponse, ModelStreamInferResponse, RepositoryIndexRequest,
    RepositoryIndexResponse, RepositoryModelLoadRequest, RepositoryModelLoadResponse,
    RepositoryModelUnloadRequest, RepositoryModelUnloadResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
    model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata,
    repository_index_response,
};
use tonic::{Request, Response, Status, Streaming};

const MODEL: &str = "add_sub";
const WIDTH: usize = 16;

struct Ceiling;

/// `add_sub_delay` is add_sub with a Triton-side window: the same computation here.
fn check(name: &str) -> Result<(), Status> {
    if name == MODEL || name == "add_sub_delay" {
        Ok(())
    } else {
        Err(Status::not_found(format!("only '{MODEL}' is served here")))
    }
}

fn tensor(name: &str) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![-1, WIDTH as i64],
    }
}

/// `a + b` and `a - b` of two little-endian FP32 buffers of equal length.
fn add_sub(a: &[u8], b: &[u8]) -> (Bytes, Bytes) {
    let (mut sum, mut diff) = (Vec::with_capacity(a.len()), Vec::with_capacity(a.len()));
    for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        let (x, y) = (
            f32::from_le_bytes(x.try_into().expect("4 bytes")),
            f32::from_le_bytes(y.try_into().expect("4 bytes")),
        );
        sum.extend_from_slice(&(x + y).to_le_bytes());
        diff.extend_from_slice(&(x - y).to_le_bytes());
    }
    (sum.into(), diff.into())
}

#[tonic::async_trait]
impl GrpcInferenceService for Ceiling {
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
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse {
            ready: check(&req.get_ref().name).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kserve-ceiling".into(),
            version: "0".into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        check(&req.get_ref().name)?;
        Ok(Response::new(ModelMetadataResponse {
            name: MODEL.into(),
            versions: vec!["1".into()],
            platform: "ceiling".into(),
            inputs: vec![tensor("INPUT0"), tensor("INPUT1")],
            outputs: vec![tensor("OUTPUT0"), tensor("OUTPUT1")],
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let r = req.into_inner();
        check(&r.model_name)?;
        let [a, b] = r.raw_input_contents.as_slice() else {
            return Err(Status::invalid_argument("two raw inputs expected"));
        };
        if a.len() != b.len() || a.len() % (4 * WIDTH) != 0 {
            return Err(Status::invalid_argument(
                "inputs must be equal [-1, 16] FP32",
            ));
        }
        let rows = (a.len() / (4 * WIDTH)) as i64;
        let (sum, diff) = add_sub(a, b);
        let out = |name: &str| InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: vec![rows, WIDTH as i64],
            ..Default::default()
        };
        Ok(Response::new(ModelInferResponse {
            model_name: MODEL.into(),
            model_version: "1".into(),
            id: r.id,
            outputs: vec![out("OUTPUT0"), out("OUTPUT1")],
            raw_output_contents: vec![sum, diff],
            ..Default::default()
        }))
    }

    type ModelStreamInferStream = futures::stream::Empty<Result<ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        _: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        Err(Status::unimplemented("not served by the ceiling server"))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        check(&req.get_ref().name)?;
        let input = |name: &str| ModelInput {
            name: name.into(),
            data_type: DataType::TypeFp32 as i32,
            dims: vec![WIDTH as i64],
            ..Default::default()
        };
        let output = |name: &str| ModelOutput {
            name: name.into(),
            data_type: DataType::TypeFp32 as i32,
            dims: vec![WIDTH as i64],
            ..Default::default()
        };
        Ok(Response::new(ModelConfigResponse {
            config: Some(ModelConfig {
                name: MODEL.into(),
                max_batch_size: 64,
                input: vec![input("INPUT0"), input("INPUT1")],
                output: vec![output("OUTPUT0"), output("OUTPUT1")],
                ..Default::default()
            }),
        }))
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: vec![ModelStatistics {
                name: MODEL.into(),
                version: "1".into(),
                ..Default::default()
            }],
        }))
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Ok(Response::new(RepositoryIndexResponse {
            models: vec![repository_index_response::ModelIndex {
                name: MODEL.into(),
                version: "1".into(),
                state: "READY".into(),
                reason: String::new(),
            }],
        }))
    }

    async fn repository_model_load(
        &self,
        _: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        Err(Status::unimplemented("not served by the ceiling server"))
    }

    async fn repository_model_unload(
        &self,
        _: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        Err(Status::unimplemented("not served by the ceiling server"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: kserve_ceiling LISTEN_ADDR");
        std::process::exit(2);
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(GrpcInferenceServiceServer::new(Ceiling))
        .serve(addr.parse()?)
        .await?;
    Ok(())
}
