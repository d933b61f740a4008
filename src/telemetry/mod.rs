//! Logs, traces and metrics.
//!
//! - Logs: text or JSON lines, filtered by `log.level` (or RUST_LOG); JSON lines carry the
//!   fields of the current request span (request id, trace id, model).
//! - Traces: with `telemetry.otlp_endpoint` set, spans go to an OTLP/gRPC collector through a
//!   bounded batch exporter, and W3C trace context flows in from HTTP/gRPC, through broker
//!   messages, and out to Triton (see [`trace`]).
//! - Metrics: Prometheus counters and histograms (see [`metrics`]).

pub mod activity;
pub mod config;
pub mod fields;
pub mod metrics;
pub mod trace;

use std::{io::IsTerminal, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_subscriber::{
    EnvFilter, Layer, Registry, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use config::{LogConfig, LogFormat, TelemetryConfig};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("infergate: flushing spans failed: {e}");
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn log_layer(cfg: &LogConfig) -> BoxedLayer {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    match cfg.format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .fmt_fields(fields::LogFields)
            .with_target(true)
            .with_ansi(ansi_wanted(
                std::io::stdout().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .with_filter(filter)
            .boxed(),
    }
}

/// Colours (ANSI escapes) only for a person at a terminal: logs that are piped or collected
/// (files, `kubectl logs`, log shippers) stay plain text, and a non-empty `NO_COLOR`
/// (no-color.org) turns them off anywhere.
fn ansi_wanted(stdout_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs logging and, when configured, trace export. Call inside the tokio runtime (the
/// OTLP exporter's channel lives on it). A second call in one process (tests start several
/// gateways) keeps the first set-up.
pub fn init(log: &LogConfig, tel: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let mut provider = None;
    let otel_layer: Option<BoxedLayer> = match &tel.otlp_endpoint {
        Some(url) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(Duration::from_secs(5))
                .build()?;
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(tel.max_queue_size)
                .with_scheduled_delay(Duration::from_millis(500))
                .build();
            let p = SdkTracerProvider::builder()
                .with_span_processor(
                    BatchSpanProcessor::builder(exporter)
                        .with_batch_config(batch)
                        .build(),
                )
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    tel.sample_ratio,
                ))))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(tel.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = p.tracer("infergate");
            provider = Some(p);
            // Only infergate's own spans are exported, whatever the log filter says.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("infergate", tracing::Level::INFO))
                    .boxed(),
            )
        }
        None => None,
    };
    let layers: Vec<BoxedLayer> = std::iter::once(log_layer(log)).chain(otel_layer).collect();
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if installed && let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        trace::enable();
    }
    Ok(Telemetry { provider })
}

/// Logging only (no exporter): for tools and tests.
pub fn init_logging(cfg: &LogConfig) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(cfg))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::ansi_wanted;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(ansi_wanted(true, None));
        assert!(!ansi_wanted(false, None), "piped or collected logs");
        assert!(!ansi_wanted(true, Some("1".into())), "NO_COLOR set");
        // no-color.org: an empty NO_COLOR does not count.
        assert!(ansi_wanted(true, Some("".into())));
    }
}
