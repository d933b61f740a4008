//! The JSON bodies of the HTTP API as the OpenAPI document describes them (`openapi.rs`). The
//! codec reads and writes these shapes field by field; the types are never built, only
//! documented.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::Value;
use utoipa::ToSchema;

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

/// Body of `POST /v2/repository/models/{model}/load` and `/unload` (may be empty): Triton's
/// parameters, such as `config` (a model configuration as JSON) or `unload_dependents`.
#[derive(ToSchema)]
pub struct ModelControlBody {
    /// Values are strings, booleans or integers; a `file:` key carries base64.
    parameters: Option<BTreeMap<String, Value>>,
}

/// One endpoint's outcome of a load or unload.
#[derive(ToSchema)]
pub struct EndpointOutcome {
    endpoint: String,
    ok: bool,
    /// Its error's code (`INVALID_ARGUMENT`, …), when it failed.
    code: Option<String>,
    error: Option<String>,
}

/// A load or unload that every endpoint did.
#[derive(ToSchema)]
pub struct ModelControlAnswer {
    model: String,
    action: String,
    endpoints: Vec<EndpointOutcome>,
}

/// A load or unload that failed on one endpoint or more: which, and how.
#[derive(ToSchema)]
pub struct ModelControlError {
    error: String,
    endpoints: Vec<EndpointOutcome>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct DeadLetterListBody {
    /// Dead letters kept.
    depth: u64,
    /// Dropped by the bounds (count and age) since the store began.
    dropped: u64,
    dead_letters: Vec<crate::tasks::view::DeadView<'static>>,
}

/// Which dead letters to act on: `ids`, else those the filter selects (at most `limit`,
/// oldest first); a selection of everything says `all: true`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SelectionBody {
    ids: Option<Vec<String>>,
    model: Option<String>,
    tenant: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    limit: Option<u32>,
    all: Option<bool>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RefusalBody {
    id: String,
    reason: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ReplayedBody {
    /// Queued again under their ids.
    replayed: Vec<String>,
    refused: Vec<RefusalBody>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PurgedBody {
    purged: u64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};
    use utoipa::PartialSchema;

    use crate::tasks::{
        Attempt, TaskError, TaskRecord, TaskState, WebhookStatus,
        dead::DeadEntry,
        view::{DeadView, TaskView},
    };

    fn documented<T: PartialSchema>() -> BTreeSet<String> {
        let schema = serde_json::to_value(T::schema()).unwrap();
        schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn served(v: impl serde::Serialize) -> BTreeSet<String> {
        let v: Value = serde_json::to_value(v).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// A record with every optional part there, so every field is served.
    fn full() -> TaskRecord {
        TaskRecord {
            id: "t".into(),
            tenant: "a".into(),
            model: "m".into(),
            version: "1".into(),
            state: TaskState::Failed,
            attempts: 1,
            queued_at_ms: 1,
            started_at_ms: Some(2),
            finished_at_ms: Some(3),
            error: Some(TaskError {
                code: "INVALID_ARGUMENT".into(),
                message: "x".into(),
            }),
            idempotency_key: Some("k".into()),
            history: vec![Attempt {
                attempt: 1,
                started_at_ms: 2,
                ended_at_ms: 3,
                outcome: "failed".into(),
                error_code: None,
                error_message: None,
            }],
            callback_url: Some("https://hooks.example.com/x".into()),
            webhook: Some(WebhookStatus {
                state: "delivered".into(),
                id: "t.3".into(),
                attempts: 1,
                last_status: Some(204),
                last_error: None,
                updated_at_ms: 4,
            }),
        }
    }

    /// The document's task shapes are derived from the served structs; this checks that the
    /// derive reads serde's attributes as serde does (names, skipped fields, the flattened
    /// task of a dead letter), field for field, in the document the API serves.
    #[test]
    fn the_documented_task_shapes_are_the_served_ones() {
        let doc: Value = serde_json::from_str(super::super::openapi::document()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let props = |v: &Value| -> BTreeSet<String> {
            v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let rec = full();
        let mut task = TaskView::of(&rec);
        task.response = Some(json!({}));
        task.result_url = Some("/v1/tasks/t/result".into());
        task.result_bytes = Some(1);
        let task_props = props(&schemas["TaskBody"]);
        assert_eq!(served(&task), task_props);
        assert_eq!(documented::<TaskView>(), task_props);
        let required: BTreeSet<String> = schemas["TaskBody"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            required,
            served(TaskView::of(&TaskRecord::new(
                "t".into(),
                "a",
                "m",
                "",
                None
            )))
            .into_iter()
            .filter(|k| !k.ends_with("_at_ms") || k == "queued_at_ms")
            .filter(|k| k != "error")
            .collect(),
            "required: what a fresh task always shows"
        );
        let refs = |field: &str| schemas["TaskBody"]["properties"][field]["$ref"].clone();
        assert_eq!(refs("status"), "#/components/schemas/TaskStatus");
        assert_eq!(refs("response"), "#/components/schemas/InferResponseBody");
        assert!(schemas["InferResponseBody"].is_object());
        let dead = DeadEntry {
            record: rec.clone(),
            reason: "r".into(),
            dead_at_ms: 5,
            payload_bytes: 6,
        };
        // A dead letter is the task flattened, plus its own fields.
        let parts = schemas["DeadLetterBody"]["allOf"].as_array().unwrap();
        let mut documented_dead = BTreeSet::new();
        for p in parts {
            match p["$ref"].as_str() {
                Some(r) => documented_dead.extend(props(&schemas[r.rsplit('/').next().unwrap()])),
                None => documented_dead.extend(props(p)),
            }
        }
        let mut served_dead = served(DeadView::of(&dead));
        served_dead.extend(["response", "result_url", "result_bytes"].map(String::from));
        assert_eq!(served_dead, documented_dead);
        // A webhook's `data` is the same shape, less the result and the delivery's own state.
        let hook = served(TaskView::for_webhook(&rec));
        assert!(hook.is_subset(&task_props), "{hook:?}");
    }
}
