//! The HTTP API's OpenAPI 3.1 document, served at `GET /openapi.json`. Paths come from the
//! `#[utoipa::path]` attributes on the handlers themselves (so a route and its document sit
//! together); the JSON shapes the handlers read and write are described by the types below.
//! The `/versions/{version}` form of every model route is derived from the plain one, as the
//! router does, rather than written twice.

// The schema types describe JSON that the codec reads and writes field by field; they are
// never built, only documented.
#![allow(dead_code)]

use std::{collections::BTreeMap, sync::OnceLock};

use serde_json::Value;
use utoipa::{
    Modify, OpenApi, PartialSchema, ToSchema,
    openapi::{
        OpenApi as Document, PathItem,
        path::{Operation, Parameter, ParameterBuilder, ParameterIn},
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

/// Tensor element types of the Open Inference Protocol.
#[derive(ToSchema)]
#[allow(clippy::upper_case_acronyms)]
enum Datatype {
    BOOL,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    INT8,
    INT16,
    INT32,
    INT64,
    FP16,
    FP32,
    FP64,
    BYTES,
    BF16,
}

/// An inference request (Open Inference Protocol, JSON form). With the binary extension the
/// body starts with this JSON (its length in `Inference-Header-Content-Length`) followed by
/// the raw tensors, and an input gives `parameters.binary_data_size` instead of `data`.
#[derive(ToSchema)]
pub struct InferRequestBody {
    id: Option<String>,
    /// Request parameters, e.g. `priority` (1 is highest), `timeout` (µs), `binary_data_output`.
    parameters: Option<BTreeMap<String, Value>>,
    inputs: Vec<RequestInput>,
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(ToSchema)]
pub struct RequestInput {
    name: String,
    /// Dimensions; their product must equal the number of elements in `data`.
    shape: Vec<i64>,
    datatype: Datatype,
    parameters: Option<BTreeMap<String, Value>>,
    /// The elements, flat or nested row-major; strings for BYTES, booleans for BOOL.
    data: Option<Vec<Value>>,
}

#[derive(ToSchema)]
pub struct RequestOutput {
    name: String,
    parameters: Option<BTreeMap<String, Value>>,
}

#[derive(ToSchema)]
pub struct InferResponseBody {
    model_name: String,
    model_version: Option<String>,
    id: Option<String>,
    parameters: Option<BTreeMap<String, Value>>,
    outputs: Vec<ResponseOutput>,
}

#[derive(ToSchema)]
pub struct ResponseOutput {
    name: String,
    shape: Vec<i64>,
    datatype: Datatype,
    parameters: Option<BTreeMap<String, Value>>,
    /// Absent when the output is sent in binary (`binary_data_size` in `parameters`).
    data: Option<Vec<Value>>,
}

/// Every error: one message naming the field or the limit.
#[derive(ToSchema)]
pub struct ErrorBody {
    error: String,
}

#[derive(ToSchema)]
pub struct ServerMetadataBody {
    name: String,
    version: String,
    extensions: Vec<String>,
}

#[derive(ToSchema)]
pub struct TensorMetadata {
    name: String,
    datatype: String,
    /// -1 marks a variable dimension.
    shape: Vec<i64>,
}

#[derive(ToSchema)]
pub struct ModelMetadataBody {
    name: String,
    versions: Option<Vec<String>>,
    platform: String,
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
}

/// Body of `POST /v2/repository/index` (may be empty).
#[derive(ToSchema)]
pub struct RepositoryIndexBody {
    /// Only models that are ready.
    ready: Option<bool>,
}

#[derive(ToSchema)]
#[allow(non_camel_case_types)]
enum TaskStatus {
    queued,
    running,
    succeeded,
    failed,
    cancelled,
    expired,
}

#[derive(ToSchema)]
pub struct TaskErrorBody {
    /// A gRPC status code name, e.g. `InvalidArgument`.
    code: String,
    message: String,
}

/// An async task: its state, times (ms since the Unix epoch), attempts and, once it
/// succeeded, the inference response.
#[derive(ToSchema)]
pub struct TaskBody {
    /// 32 hex characters, unguessable.
    id: String,
    model: String,
    version: String,
    status: TaskStatus,
    attempts: u32,
    queued_at_ms: u64,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    error: Option<TaskErrorBody>,
    response: Option<InferResponseBody>,
}

/// Adds the two ways to present an API key (both optional: keys are off by default).
struct Keys;

impl Modify for Keys {
    fn modify(&self, doc: &mut Document) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "infergate HTTP API",
        description = "Open Inference Protocol (KServe v2) in front of Triton, plus async tasks. \
                       When `auth.keys` are configured, every route except the health probes \
                       needs `Authorization: Bearer <key>` or `x-api-key: <key>` (401 without)."
    ),
    paths(
        super::live,
        super::ready,
        super::server_metadata,
        super::model_metadata,
        super::model_ready,
        super::model_config,
        super::model_stats,
        super::all_stats,
        super::repository_index,
        super::infer,
        super::tasks::submit,
        super::tasks::get,
        super::tasks::cancel,
    ),
    modifiers(&Keys),
    tags(
        (name = "inference", description = "Open Inference Protocol routes, as Triton's"),
        (name = "tasks", description = "Async tasks: submit, poll, cancel"),
    )
)]
struct ApiDoc;

/// The `{version}` path parameter the versioned copies add.
fn version_param() -> Parameter {
    ParameterBuilder::new()
        .name("version")
        .parameter_in(ParameterIn::Path)
        .required(utoipa::openapi::Required::True)
        .description(Some("model version"))
        .schema(Some(String::schema()))
        .build()
}

fn add_version(op: &mut Option<Operation>) {
    if let Some(op) = op {
        op.parameters
            .get_or_insert_with(Vec::new)
            .push(version_param());
        if let Some(id) = &mut op.operation_id {
            id.push_str("_version");
        }
    }
}

/// The document, with `/v2/models/{model}/versions/{version}...` and
/// `/v1/models/{model}/versions/{version}/tasks` beside each unversioned model route.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        let versioned: Vec<(String, PathItem)> = doc
            .paths
            .paths
            .iter()
            .filter(|(p, _)| p.starts_with("/v2/models/{model}") || p.starts_with("/v1/models/"))
            .map(|(p, item)| {
                let mut item = item.clone();
                for op in [&mut item.get, &mut item.post, &mut item.delete] {
                    add_version(op);
                }
                let path = p.replacen("{model}", "{model}/versions/{version}", 1);
                (path, item)
            })
            .collect();
        doc.paths.paths.extend(versioned);
        doc.to_json().expect("the OpenAPI document serializes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_is_documented_with_its_versioned_form() {
        let doc: Value = serde_json::from_str(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v2", "get"),
            ("/v2/health/live", "get"),
            ("/v2/health/ready", "get"),
            ("/v2/models/stats", "get"),
            ("/v2/repository/index", "post"),
            ("/v2/models/{model}", "get"),
            ("/v2/models/{model}/ready", "get"),
            ("/v2/models/{model}/config", "get"),
            ("/v2/models/{model}/stats", "get"),
            ("/v2/models/{model}/infer", "post"),
            ("/v2/models/{model}/versions/{version}", "get"),
            ("/v2/models/{model}/versions/{version}/infer", "post"),
            ("/v1/models/{model}/tasks", "post"),
            ("/v1/models/{model}/versions/{version}/tasks", "post"),
            ("/v1/tasks/{id}", "get"),
            ("/v1/tasks/{id}", "delete"),
        ] {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} is missing"
            );
        }
        let infer = &paths["/v2/models/{model}/versions/{version}/infer"]["post"];
        let names: Vec<&str> = infer["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"model") && names.contains(&"version"),
            "{names:?}"
        );
        assert!(infer["responses"].get("429").is_some());
        assert_eq!(
            doc["components"]["securitySchemes"]["api_key"]["name"],
            "x-api-key"
        );
    }
}
