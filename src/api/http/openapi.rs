//! The HTTP API's OpenAPI 3.1 document, served at `GET /openapi.json`. Paths come from the
//! `#[utoipa::path]` attributes on the handlers themselves (so a route and its document sit
//! together); the JSON bodies are described in `schema.rs`. The `/versions/{version}` form of
//! every model route is derived from the plain one, as the router does, rather than written
//! twice.

use std::sync::OnceLock;

use utoipa::{
    Modify, OpenApi, PartialSchema,
    openapi::{
        OpenApi as Document, PathItem,
        path::{Operation, Parameter, ParameterBuilder, ParameterIn},
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::{admin, generate, inference, repository, tasks};

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
        inference::live,
        inference::ready,
        inference::server_metadata,
        inference::model_metadata,
        inference::model_ready,
        inference::model_config,
        inference::model_stats,
        inference::all_stats,
        inference::repository_index,
        repository::load,
        repository::unload,
        inference::infer,
        generate::generate,
        generate::generate_stream,
        tasks::submit,
        tasks::get,
        tasks::result,
        tasks::cancel,
        tasks::events,
        admin::list,
        admin::get,
        admin::delete,
        admin::replay,
        admin::purge,
    ),
    modifiers(&Keys),
    tags(
        (name = "inference", description = "Open Inference Protocol routes, as Triton's"),
        (name = "tasks", description = "Async tasks: submit, poll, cancel"),
        (name = "admin", description = "Dead letters: list, read, replay, purge (admin keys only)"),
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
        let mut json = serde_json::to_value(&doc).expect("the OpenAPI document serializes");
        // The task's `response` is the inference response's JSON, a shape of this edge's:
        // the task view (which knows no edge) says only "object", and is pointed to it here.
        json["components"]["schemas"]["TaskBody"]["properties"]["response"] = serde_json::json!({
            "$ref": "#/components/schemas/InferResponseBody",
        });
        json.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_is_documented_with_its_versioned_form() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v2", "get"),
            ("/v2/health/live", "get"),
            ("/v2/health/ready", "get"),
            ("/v2/models/stats", "get"),
            ("/v2/repository/index", "post"),
            ("/v2/repository/models/{model}/load", "post"),
            ("/v2/repository/models/{model}/unload", "post"),
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
            ("/v1/admin/dead-letters", "get"),
            ("/v1/admin/dead-letters/{id}", "get"),
            ("/v1/admin/dead-letters/{id}", "delete"),
            ("/v1/admin/dead-letters/replay", "post"),
            ("/v1/admin/dead-letters/purge", "post"),
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
