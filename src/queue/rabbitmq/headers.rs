//! Message headers as AMQP field tables write them: the trace context and long strings.

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::telemetry::trace::TraceHeaders;

pub(super) fn trace_of(table: &FieldTable) -> TraceHeaders {
    TraceHeaders {
        traceparent: header(table, "traceparent"),
        tracestate: header(table, "tracestate"),
    }
}

pub(super) fn header(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub(super) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}
