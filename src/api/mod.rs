//! The two front doors: gRPC (`inference.GRPCInferenceService`) and HTTP/JSON, both speaking
//! the Open Inference Protocol and both ending in [`crate::infer::InferService`].

pub mod features;
pub mod grpc;
pub mod http;

/// Protocol extensions infergate serves (a subset of what Triton announces: repository control,
/// shared memory, trace and log settings stay on Triton's own port).
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "sequence",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
];

/// Triton's server metadata with the extensions narrowed to those infergate serves.
pub fn narrow_extensions(extensions: Vec<String>) -> Vec<String> {
    extensions
        .into_iter()
        .filter(|e| EXTENSIONS.contains(&e.as_str()))
        .collect()
}

use std::{future::Future, time::Instant};

use opentelemetry::propagation::Extractor;
use tracing::Instrument;

use crate::{
    error::{GatewayError, code_name},
    telemetry::{metrics::metrics, trace},
};

/// The request id set (or passed on) by the `x-request-id` layer of both listeners.
pub fn request_id(headers: &::http::HeaderMap) -> Option<&str> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok())
}

/// A fresh request id (a v4 UUID), marked sensitive so that HTTP/2 sends it as a literal
/// HPACK never indexes: every id is new, and indexing one would only evict useful entries
/// from the connection's header table (and make the encoder compare each new id with the
/// dozens of old ones there).
pub fn new_request_id() -> ::http::HeaderValue {
    // Encoded on the stack: `to_string` would run the formatting machinery per call.
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let mut value =
        ::http::HeaderValue::from_bytes(id.as_bytes()).expect("a UUID is a valid header value");
    value.set_sensitive(true);
    value
}

/// The `x-request-id` layers' source of ids: [`new_request_id`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIds;

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _: &::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        Some(tower_http::request_id::RequestId::new(new_request_id()))
    }
}

/// A header's value as text, if it is visible ASCII.
pub fn header_text(headers: &::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Runs one API call inside its server span (child of the caller's trace context).
pub async fn traced<T>(
    name: &'static str,
    protocol: &'static str,
    model: &str,
    headers: &::http::HeaderMap,
    fut: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    let span = span_of(name, protocol, model, headers);
    let result = fut.instrument(span.clone()).await;
    if let Err(e) = &result {
        trace::record_error(&span, e);
    }
    result
}

/// The server span of one call, continuing the caller's trace.
pub(crate) fn span_of(
    name: &'static str,
    protocol: &'static str,
    model: &str,
    headers: &::http::HeaderMap,
) -> tracing::Span {
    trace::server_span(
        name,
        protocol,
        model,
        request_id(headers),
        &trace::HeaderExtractor(headers) as &(dyn Extractor + Sync),
    )
}

/// [`observed`] for an answer that goes on after its handler returned (a stream): the span
/// comes back with the result, for the stream to hold (and add its events to) until it ends.
pub async fn observed_open<T>(
    name: &'static str,
    protocol: &'static str,
    model: &str,
    headers: &::http::HeaderMap,
    fut: impl Future<Output = Result<T, GatewayError>>,
) -> (Result<T, GatewayError>, tracing::Span) {
    let span = span_of(name, protocol, model, headers);
    let fut = fut.instrument(span.clone());
    let result = observed_untraced(protocol, model, fut).await;
    if let Err(e) = &result {
        trace::record_error(&span, e);
    }
    (result, span)
}

/// [`traced`], and counted in `infergate_requests_total` and the `total` phase histogram.
pub async fn observed<T>(
    name: &'static str,
    protocol: &'static str,
    model: &str,
    headers: &::http::HeaderMap,
    fut: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    observed_untraced(protocol, model, traced(name, protocol, model, headers, fut)).await
}

/// Counts a call in `infergate_requests_total` and the `total` phase histogram.
async fn observed_untraced<T>(
    protocol: &'static str,
    model: &str,
    fut: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    let started = Instant::now();
    let result = fut.await;
    let code: std::borrow::Cow<'static, str> = match (&result, protocol) {
        (Ok(_), "http") => "200".into(),
        (Ok(_), _) => "OK".into(),
        (Err(e), "http") => e.http_status().as_u16().to_string().into(),
        (Err(e), _) => code_name(e.grpc_code()).into(),
    };
    let kind = result.as_ref().err().map_or("", GatewayError::kind);
    tracing::debug!(target: "infergate::api", model, protocol, code = %code, error = kind, "request answered");
    metrics().request(model, protocol, code, started);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_fresh_uuids_hpack_does_not_index() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(id.is_sensitive());
            let text = id.to_str().unwrap();
            let parsed = uuid::Uuid::parse_str(text).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(parsed.hyphenated().to_string(), text);
        }
        let mut make = RequestIds;
        let id = tower_http::request_id::MakeRequestId::make_request_id(
            &mut make,
            &::http::Request::new(()),
        )
        .unwrap();
        assert!(id.header_value().is_sensitive());
    }
}
