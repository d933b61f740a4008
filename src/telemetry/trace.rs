//! W3C trace context across every hop: HTTP headers and gRPC metadata in, broker message
//! fields across the queue, gRPC metadata out to Triton.
//!
//! Spans are `tracing` spans; with an OTLP endpoint configured the `tracing-opentelemetry`
//! layer turns them into OpenTelemetry spans. Without one, nothing is exported and nothing is
//! injected towards Triton, but an incoming `traceparent` still rides along with async tasks
//! and its trace id is logged, so logs of both sides can be joined.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Called once the OpenTelemetry layer is installed.
pub(crate) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// True when spans are exported (and so worth creating beyond the request span).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(mut v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            // The context names a new span on every call: HPACK should not index it (see
            // `api::new_request_id`).
            v.set_sensitive(true);
            self.0.insert(k, v);
        }
    }
}

/// The trace context carried by a queued task (the broker stores both fields as they are).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

impl TraceHeaders {
    /// The context to hand on: the current span's when tracing is on, else the caller's own
    /// headers unchanged.
    pub fn outgoing(incoming: &dyn Extractor) -> Self {
        if enabled() {
            let mut out = Self::default();
            TraceContextPropagator::new().inject_context(&Span::current().context(), &mut out);
            return out;
        }
        Self {
            traceparent: incoming.get("traceparent").map(str::to_owned),
            tracestate: incoming.get("tracestate").map(str::to_owned),
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32))
        .then_some(id)
}

/// Makes `span` a child of the context in `carrier` and records its trace id.
pub fn continue_trace(span: &Span, carrier: &dyn Extractor) {
    if enabled() {
        let cx = TraceContextPropagator::new().extract(carrier);
        let _ = span.set_parent(cx);
        let id = span.context().span().span_context().trace_id();
        span.record("trace_id", id.to_string());
    } else if let Some(id) = carrier.get("traceparent").and_then(trace_id_of) {
        span.record("trace_id", id);
    }
}

/// The span of one API request, child of the caller's trace context.
pub fn server_span(
    name: &'static str,
    protocol: &'static str,
    model: &str,
    request_id: Option<&str>,
    carrier: &dyn Extractor,
) -> Span {
    let span = tracing::info_span!(
        target: "infergate::api",
        "request",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = protocol,
        model = model,
        request_id = request_id.unwrap_or(""),
        trace_id = Empty,
    );
    continue_trace(&span, carrier);
    span
}

/// Marks a span as failed, with the reason, for the trace backend.
pub fn record_error(span: &Span, err: &dyn std::fmt::Display) {
    span.record("otel.status_code", "ERROR");
    if enabled() {
        span.set_status(opentelemetry::trace::Status::error(err.to_string()));
    }
}

/// An event on a span (a stream's responses: one each, with its index), for the trace
/// backend only: logs never see it.
pub fn add_event(span: &Span, name: &'static str, index: u64) {
    if enabled() {
        span.add_event(
            name,
            vec![opentelemetry::KeyValue::new("index", index as i64)],
        );
    }
}

/// The current context, for a request waiting in a batch (to parent and link the batch span).
pub fn current_context() -> Option<Context> {
    enabled().then(|| Span::current().context())
}

/// Parents `batch` on the first member and links every member, so each caller's trace shows
/// the batch it rode in.
pub fn link_members(batch: &Span, members: &[Context]) {
    let mut first = true;
    for cx in members {
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            continue;
        }
        if first {
            let _ = batch.set_parent(cx.clone());
            first = false;
        }
        batch.add_link(sc);
    }
}

/// Writes the current span's context into the metadata of a call to Triton.
pub fn inject_into(md: &mut MetadataMap) {
    if enabled() {
        TraceContextPropagator::new()
            .inject_context(&Span::current().context(), &mut MetadataInjector(md));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_context_is_marked_for_hpack_not_to_index() {
        let mut md = MetadataMap::new();
        MetadataInjector(&mut md).set(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        let v = md.get("traceparent").unwrap();
        assert!(v.is_sensitive());
        assert!(md.into_headers()["traceparent"].is_sensitive());
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_id_of(&format!("00-{id}-00f067aa0ba902b7-01")),
            Some(id)
        );
        assert_eq!(trace_id_of("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of(""), None);
    }

    #[test]
    fn without_an_exporter_the_callers_context_is_handed_on_unchanged() {
        let incoming = TraceHeaders {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("vendor=1".into()),
        };
        assert_eq!(TraceHeaders::outgoing(&incoming), incoming);
    }
}
