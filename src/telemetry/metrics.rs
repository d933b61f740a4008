//! Prometheus metrics (prometheus-client), one registry per process, served at `/metrics`.
//! The names, labels and meanings are listed in the README ("Metrics").
//!
//! Counters and histograms are updated where the event happens; gauges that mirror some
//! other state (queue depths, endpoint health) are refreshed by the health monitor and just
//! before each scrape.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Mutex, OnceLock, RwLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    /// `grpc` or `http`.
    pub protocol: &'static str,
    /// gRPC status name (`OK`, `InvalidArgument`...) or HTTP status (`200`, `400`...).
    /// Borrowed for the success codes, so a successful request allocates no label.
    pub code: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    /// `total` (API request), `batch_wait` (in the batcher), `triton` (one call),
    /// `task_queue` (task accepted → started), `task_run` (started → result stored).
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointModel {
    pub endpoint: String,
    pub model: String,
}

pub type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 100 µs .. ~52 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 20,
    ))
}

fn batch_rows() -> Histogram {
    Histogram::new([
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ])
}

/// The `model` label of API requests for a model Triton has not described to this process
/// (an unknown name, or any name while Triton is unreachable): a caller's made-up names must
/// not each add series that live as long as the process.
pub const UNKNOWN_MODEL: &str = "(unknown)";

/// The series of one model that every request updates, looked up once when Triton describes
/// the model instead of by their labels (an allocation and a hash of the label set each) per
/// request.
struct ModelSeries {
    grpc_ok: Counter,
    http_ok: Counter,
    total: Histogram,
    triton: Histogram,
    /// `batch_wait` phase and rows per batch, made by the model's first batch (a model that
    /// never batches shows no batch series).
    batch: OnceLock<(Histogram, Histogram)>,
}

pub struct Metrics {
    /// Features register their own families here ([`register`]) when they start.
    registry: Mutex<Registry>,
    /// Models Triton has described ([`Metrics::register_model`]): bounded by its repository.
    models: RwLock<HashMap<String, ModelSeries>>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Hist<PhaseLabels>,
    pub batch_rows: Hist<ModelLabel>,
    pub batch_queue_depth: Family<ModelLabel, Gauge>,
    pub triton_up: Family<EndpointLabel, Gauge>,
    pub ready: Gauge,
    /// Triton's own queue time and the requests it counted, per model, from its statistics
    /// (the second window when Triton's dynamic batcher also holds one).
    pub triton_queue_seconds: Family<ModelLabel, Counter<f64, AtomicU64>>,
    pub triton_queued_requests: Family<ModelLabel, Counter>,
    /// Each model's circuit on each Triton endpoint (with several endpoints).
    pub triton_breaker_state: Family<EndpointModel, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self {
            registry: Mutex::new(Registry::with_prefix("infergate")),
            models: RwLock::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            batch_rows: Family::new_with_constructor(batch_rows),
            batch_queue_depth: Family::default(),
            triton_up: Family::default(),
            ready: Gauge::default(),
            triton_queue_seconds: Family::default(),
            triton_queued_requests: Family::default(),
            triton_breaker_state: Family::default(),
        };
        let r = m.registry.get_mut().expect("not yet shared");
        r.register(
            "requests",
            "Inference requests answered, by model, protocol and status code",
            m.requests.clone(),
        );
        r.register(
            "phase_duration_seconds",
            "Time spent per phase: total, batch_wait, triton, task_queue, task_run",
            m.duration.clone(),
        );
        r.register(
            "batch_rows",
            "Rows (batch dimension) of each call sent to Triton through the batcher",
            m.batch_rows.clone(),
        );
        r.register(
            "batch_queue_depth",
            "Requests waiting in a model's batching queue",
            m.batch_queue_depth.clone(),
        );
        r.register(
            "triton_queue_seconds",
            "Time requests waited in Triton's own queue (its statistics), by model",
            m.triton_queue_seconds.clone(),
        );
        r.register(
            "triton_queued_requests",
            "Requests counted in Triton's queue statistics, by model",
            m.triton_queued_requests.clone(),
        );
        r.register(
            "triton_endpoint_up",
            "1 when the Triton endpoint passed its last readiness probe",
            m.triton_up.clone(),
        );
        r.register(
            "ready",
            "1 when this process reports ready on /readyz",
            m.ready.clone(),
        );
        r.register(
            "triton_breaker_state",
            "Circuit of a model on a Triton endpoint: 0 closed, 1 open, 2 half-open",
            m.triton_breaker_state.clone(),
        );
        m
    }

    /// `state`: the breaker's gauge value (0 closed, 1 open, 2 half-open).
    pub fn triton_breaker(&self, endpoint: &str, model: &str, state: i64) {
        self.triton_breaker_state
            .get_or_create(&EndpointModel {
                endpoint: endpoint.to_string(),
                model: model.to_string(),
            })
            .set(state);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn observe(&self, model: &str, phase: &'static str, d: Duration) {
        self.duration
            .get_or_create(&PhaseLabels {
                model: model.to_owned(),
                phase,
            })
            .observe(d.as_secs_f64());
    }

    /// Marks `model` as one Triton serves, so that API requests are counted under its name
    /// (see [`UNKNOWN_MODEL`]). Called when its metadata is fetched; repeats are cheap.
    /// Whether Triton has described `model` to this process.
    pub fn is_registered(&self, model: &str) -> bool {
        self.models
            .read()
            .expect("metrics lock")
            .contains_key(model)
    }

    pub fn register_model(&self, model: &str) {
        if self
            .models
            .read()
            .expect("metrics lock")
            .contains_key(model)
        {
            return;
        }
        let ok = |protocol, code: &'static str| {
            self.requests
                .get_or_create(&RequestLabels {
                    model: model.to_owned(),
                    protocol,
                    code: code.into(),
                })
                .clone()
        };
        let phase = |phase| {
            self.duration
                .get_or_create(&PhaseLabels {
                    model: model.to_owned(),
                    phase,
                })
                .clone()
        };
        let series = ModelSeries {
            grpc_ok: ok("grpc", "OK"),
            http_ok: ok("http", "200"),
            total: phase("total"),
            triton: phase("triton"),
            batch: OnceLock::new(),
        };
        self.models
            .write()
            .expect("metrics lock")
            .entry(model.to_owned())
            .or_insert(series);
    }

    /// One batch of `model` left: the waits of its members (the `batch_wait` phase) and its
    /// rows.
    pub fn batch(&self, model: &str, waits: impl Iterator<Item = Duration>, rows: i64) {
        let make = || {
            let wait = self
                .duration
                .get_or_create(&PhaseLabels {
                    model: model.to_owned(),
                    phase: "batch_wait",
                })
                .clone();
            let rows = self
                .batch_rows
                .get_or_create(&ModelLabel {
                    model: model.to_owned(),
                })
                .clone();
            (wait, rows)
        };
        let models = self.models.read().expect("metrics lock");
        let made;
        let (wait, per_batch) = match models.get(model) {
            Some(s) => s.batch.get_or_init(make),
            None => {
                made = make();
                &made
            }
        };
        for d in waits {
            wait.observe(d.as_secs_f64());
        }
        per_batch.observe(rows as f64);
    }

    /// One Triton call for `model` took `d` (the `triton` phase).
    pub fn triton_call(&self, model: &str, d: Duration) {
        match self.models.read().expect("metrics lock").get(model) {
            Some(s) => s.triton.observe(d.as_secs_f64()),
            None => self.observe(model, "triton", d),
        }
    }

    /// One answered API request: its count by code and its total duration. A model Triton
    /// has not described is counted as [`UNKNOWN_MODEL`].
    pub fn request(
        &self,
        model: &str,
        protocol: &'static str,
        code: Cow<'static, str>,
        started: Instant,
    ) {
        let elapsed = started.elapsed().as_secs_f64();
        let models = self.models.read().expect("metrics lock");
        let Some(series) = models.get(model) else {
            drop(models);
            self.count_request(UNKNOWN_MODEL, protocol, code);
            self.duration
                .get_or_create(&PhaseLabels {
                    model: UNKNOWN_MODEL.to_owned(),
                    phase: "total",
                })
                .observe(elapsed);
            return;
        };
        match (protocol, code.as_ref()) {
            ("grpc", "OK") => {
                series.grpc_ok.inc();
            }
            ("http", "200") => {
                series.http_ok.inc();
            }
            // Errors are counted by their labels: they are rarer, and their codes many.
            _ => self.count_request(model, protocol, code),
        }
        series.total.observe(elapsed);
    }

    fn count_request(&self, model: &str, protocol: &'static str, code: Cow<'static, str>) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                protocol,
                code,
            })
            .inc();
    }
}

/// Registers a feature's family in the process's registry, under the `infergate_` prefix
/// (each feature keeps its metrics in its own module and registers them once).
pub fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    metrics()
        .registry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .register(name, help, metric);
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family() {
        let m = Metrics::new();
        m.register_model("add_sub");
        m.request("add_sub", "grpc", "OK".into(), Instant::now());
        m.batch_rows
            .get_or_create(&ModelLabel {
                model: "add_sub".into(),
            })
            .observe(3.0);
        let text = m.encode();
        assert!(
            text.contains(
                r#"infergate_requests_total{model="add_sub",protocol="grpc",code="OK"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"infergate_phase_duration_seconds_count{model="add_sub",phase="total"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"infergate_batch_rows_bucket{le="4.0",model="add_sub"} 1"#),
            "{text}"
        );
        assert!(text.contains("# EOF"), "{text}");
    }

    #[test]
    fn requests_for_models_triton_has_not_described_share_one_label() {
        let m = Metrics::new();
        m.register_model("add_sub");
        m.register_model("add_sub");
        for i in 0..50 {
            m.request(
                &format!("made-up-{i}"),
                "grpc",
                "NotFound".into(),
                Instant::now(),
            );
        }
        m.request("made-up-0", "http", "404".into(), Instant::now());
        m.request("add_sub", "grpc", "OK".into(), Instant::now());
        m.request("add_sub", "grpc", "OK".into(), Instant::now());
        m.request("add_sub", "http", "200".into(), Instant::now());
        m.request("add_sub", "grpc", "InvalidArgument".into(), Instant::now());
        m.triton_call("add_sub", Duration::from_millis(1));
        // A model known to the batcher or the workers before it is registered still gets
        // its own series (those names came from Triton).
        m.triton_call("later", Duration::from_millis(1));
        let text = m.encode();
        assert!(!text.contains("made-up"), "{text}");
        for line in [
            r#"infergate_requests_total{model="(unknown)",protocol="grpc",code="NotFound"} 50"#,
            r#"infergate_requests_total{model="(unknown)",protocol="http",code="404"} 1"#,
            r#"infergate_phase_duration_seconds_count{model="(unknown)",phase="total"} 51"#,
            r#"infergate_requests_total{model="add_sub",protocol="grpc",code="OK"} 2"#,
            r#"infergate_requests_total{model="add_sub",protocol="http",code="200"} 1"#,
            r#"infergate_requests_total{model="add_sub",protocol="grpc",code="InvalidArgument"} 1"#,
            r#"infergate_phase_duration_seconds_count{model="add_sub",phase="total"} 4"#,
            r#"infergate_phase_duration_seconds_count{model="add_sub",phase="triton"} 1"#,
            r#"infergate_phase_duration_seconds_count{model="later",phase="triton"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn batch_series_appear_with_a_models_first_batch() {
        let m = Metrics::new();
        m.register_model("add_sub");
        m.register_model("never_batched");
        let text = m.encode();
        assert!(!text.contains("infergate_batch_rows_count"), "{text}");
        assert!(!text.contains(r#"phase="batch_wait""#), "{text}");
        let waits = [Duration::from_millis(1), Duration::from_millis(3)];
        m.batch("add_sub", waits.into_iter(), 5);
        m.batch("add_sub", [Duration::ZERO].into_iter(), 1);
        // A model the batcher knows before it is registered still gets its series.
        m.batch("later", [Duration::ZERO].into_iter(), 2);
        let text = m.encode();
        for line in [
            r#"infergate_batch_rows_count{model="add_sub"} 2"#,
            r#"infergate_batch_rows_sum{model="add_sub"} 6.0"#,
            r#"infergate_phase_duration_seconds_count{model="add_sub",phase="batch_wait"} 3"#,
            r#"infergate_phase_duration_seconds_sum{model="add_sub",phase="batch_wait"} 0.004"#,
            r#"infergate_batch_rows_count{model="later"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(
            !text.contains(r#"infergate_batch_rows_count{model="never_batched"}"#),
            "{text}"
        );
    }
}
