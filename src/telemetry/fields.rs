//! How the text log formats span and event fields.
//!
//! The log layer formats a span's fields when the span opens, so that a line logged inside it
//! can name them. Every request opens a span, and almost none logs a line, so that formatting
//! is paid per request for nothing. With tracing-subscriber's default formatter it was the
//! largest single cost of a pass-through call that infergate controls (9,200 instructions of
//! 123,000 per request, callgrind; loadtest/BENCHMARKS.md). This formatter writes the same
//! text for a fraction of that:
//! - a string field whose value needs no escaping is written as `name="value"` directly,
//!   without going through `fmt::Debug`;
//! - `otel.*` fields are left out: they steer the trace exporter (span name, kind, status)
//!   and carry nothing for a log reader;
//! - everything else (the message, numbers, errors, strings that need escaping, and every
//!   field when the log is coloured) goes to the default formatter, so what a line shows, and
//!   the escaping that keeps a message from injecting terminal codes, are unchanged.

use std::fmt;

use tracing::{
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{
        FormatFields, FormattedFields,
        format::{DefaultVisitor, Writer},
    },
};

/// The text log's [`FormatFields`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LogFields;

impl<'w> FormatFields<'w> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = FieldVisitor::new(writer, true);
        fields.record(&mut v);
        v.finish()
    }

    /// Fields recorded on an open span: appended with a separating space only when one of
    /// them is written (the default adds the space first, and a skipped field would leave it
    /// trailing).
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &span::Record<'_>,
    ) -> fmt::Result {
        let empty = current.fields.is_empty();
        let mut v = FieldVisitor::new(current.as_writer(), empty);
        fields.record(&mut v);
        v.finish()
    }
}

/// Text gathered before it goes to the writer: a span's fields land in a `String` that starts
/// empty, and writing them piece by piece grew it four or five times per span.
const STAGED: usize = 256;

struct FieldVisitor<'w> {
    writer: Writer<'w>,
    /// Nothing written yet (so no separating space).
    empty: bool,
    result: fmt::Result,
    staged: [u8; STAGED],
    len: usize,
}

/// Written between quotes as it is: `fmt::Debug` would write it the same way.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

fn skipped(name: &str) -> bool {
    // `log.*` fields are the `log` crate's metadata, which the default formatter also skips.
    name.starts_with("otel.") || name.starts_with("log.")
}

impl<'w> FieldVisitor<'w> {
    fn new(writer: Writer<'w>, empty: bool) -> Self {
        Self {
            writer,
            empty,
            result: Ok(()),
            staged: [0; STAGED],
            len: 0,
        }
    }

    /// Stages text that `plain` accepted (ASCII, so any cut is a character boundary).
    fn stage(&mut self, text: &str) {
        if self.len + text.len() > STAGED {
            self.flush();
            if text.len() > STAGED {
                self.result = self.writer.write_str(text);
                return;
            }
        }
        self.staged[self.len..self.len + text.len()].copy_from_slice(text.as_bytes());
        self.len += text.len();
    }

    fn flush(&mut self) {
        if self.len > 0 && self.result.is_ok() {
            let text = std::str::from_utf8(&self.staged[..self.len]).expect("staged ASCII");
            self.result = self.writer.write_str(text);
        }
        self.len = 0;
    }

    fn finish(mut self) -> fmt::Result {
        self.flush();
        self.result
    }

    /// Hands one field to the default formatter.
    fn default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        self.flush();
        if self.result.is_err() {
            return;
        }
        let mut d = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        record(&mut d);
        self.result = tracing_subscriber::field::VisitOutput::finish(d);
        // The default visitor writes something for every field it does not skip.
        self.empty = false;
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let name = field.name();
        if self.result.is_err() || skipped(name) {
            return;
        }
        if name == "message"
            || name.starts_with("r#")
            || self.writer.has_ansi_escapes()
            || !plain(name)
            || !plain(value)
        {
            return self.default(|d| d.record_str(field, value));
        }
        if !self.empty {
            self.stage(" ");
        }
        self.stage(name);
        self.stage("=\"");
        self.stage(value);
        self.stage("\"");
        self.empty = false;
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() || skipped(field.name()) {
            return;
        }
        self.default(|d| d.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || skipped(field.name()) {
            return;
        }
        self.default(|d| d.record_debug(field, value));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// The log line of one event inside one span, with the given formatter.
    fn line(fields: Option<LogFields>, id: &str) -> String {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false);
        let run = || {
            let span = tracing::info_span!(
                "request",
                otel.name = "grpc ModelInfer",
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                model = "add_sub",
                request_id = id,
                attempt = 3,
            );
            let _in = span.enter();
            span.record("otel.status_code", "ERROR");
            let err = std::io::Error::other("boom");
            tracing::warn!(
                error = &err as &(dyn std::error::Error + 'static),
                size = 7,
                kind = "late",
                "refused \"{}\" \u{1b}[31mred",
                "x"
            );
        };
        match fields {
            Some(f) => tracing::subscriber::with_default(
                tracing_subscriber::registry().with(layer.fmt_fields(f)),
                run,
            ),
            None => {
                tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), run)
            }
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_read_as_the_default_formatter_writes_them_less_the_otel_fields() {
        let long = "r".repeat(300); // over the staging buffer
        for id in [
            "9b2f0c1e-53a4-4d7e-8a61-0f5e2b7c9d10",
            "",
            "has \"quotes\" and \\",
            &long,
        ] {
            let ours = line(Some(LogFields), id);
            let default = line(None, id);
            let expected = default
                .replace("otel.name=\"grpc ModelInfer\" ", "")
                .replace("otel.kind=\"server\" ", "")
                .replace(" otel.status_code=\"ERROR\"", "");
            assert_eq!(ours, expected, "request_id {id:?}");
            assert!(ours.contains("model=\"add_sub\""), "{ours}");
            assert!(!ours.contains("otel."), "{ours}");
            // The message keeps the default formatter's escaping of terminal codes.
            assert!(!ours.contains('\u{1b}'), "{ours}");
            assert!(ours.contains("error=boom size=7 kind=\"late\""), "{ours}");
        }
    }

    #[test]
    fn only_printable_ascii_without_quotes_or_backslashes_is_written_as_it_is() {
        assert!(plain("add_sub 1.0-x"));
        assert!(plain(""));
        // Debug would write these as they are too, but the check need not know it.
        assert!(!plain("é"));
        for s in ["a\"b", "a\\b", "tab\t", "\u{1b}[0m", "\u{7f}"] {
            assert!(!plain(s), "{s:?}");
            // What Debug writes for these differs from the text between quotes.
            assert_ne!(format!("{s:?}"), format!("\"{s}\""), "{s:?}");
        }
    }
}
