//! Traces, metrics and probes against real servers:
//! - one trace id from the client's `traceparent` through infergate's API process, the broker
//!   (Redis Streams and RabbitMQ), a separate worker process and Triton (in its OpenTelemetry
//!   trace mode), all received by a real OTLP collector (rotel) on loopback;
//! - `/metrics` counts a known load exactly (cross-checked with Triton's own statistics);
//! - `/readyz` follows Triton and the broker going away and coming back while `/livez` stays
//!   200;
//! - text logs written to a pipe carry no colour escapes.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};

/// Tests that stop RabbitMQ hold this for writing; tests that need it up, for reading.
static RABBIT_UP: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The OTLP collector of this test binary: rotel, printing every span it receives.
struct Receiver {
    grpc_port: u16,
    http_port: u16,
    log: PathBuf,
    _child: Child,
}

fn receiver() -> &'static Receiver {
    static R: OnceLock<Receiver> = OnceLock::new();
    R.get_or_init(|| {
        let (grpc_port, http_port) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!("infergate-rotel-{grpc_port}.log"));
        let child = Command::new(repo().join("scripts/start-otlp-receiver.sh"))
            .args([grpc_port.to_string(), http_port.to_string()])
            .env("INFERGATE_WATCH_PID", std::process::id().to_string())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .expect("start scripts/start-otlp-receiver.sh");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rotel did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Receiver {
            grpc_port,
            http_port,
            log,
            _child: child,
        }
    })
}

/// A Triton exporting its own spans to the receiver, continuing incoming trace contexts.
fn traced_triton() -> &'static Triton {
    static T: OnceLock<Triton> = OnceLock::new();
    T.get_or_init(|| {
        let r = receiver();
        let flags = [
            "mode=opentelemetry".to_string(),
            format!("opentelemetry,url=127.0.0.1:{}/v1/traces", r.http_port),
            "opentelemetry,resource=service.name=triton".to_string(),
            "opentelemetry,bsp_schedule_delay=200".to_string(),
            "rate=1".to_string(),
            "level=TIMESTAMPS".to_string(),
        ];
        let args: Vec<String> = flags
            .into_iter()
            .flat_map(|f| ["--trace-config".to_string(), f])
            .collect();
        Triton::start(None, &args)
    })
}

/// One span as the receiver printed it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SpanSeen {
    service: String,
    trace_id: String,
    parent: String,
    id: String,
    name: String,
}

/// Reads rotel's debug log: `service.name: Str(x)` opens a resource, then each span prints
/// `Trace ID : <hex>` ... `Name : <name>`.
fn spans_seen(log: &PathBuf) -> Vec<SpanSeen> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut service, mut trace_id, mut parent, mut id) =
        (String::new(), String::new(), String::new(), String::new());
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("-> service.name: Str(") {
            service = rest.trim_end_matches(')').to_string();
        } else if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "Trace ID" => trace_id = v.trim().to_string(),
                "Parent ID" => parent = v.trim().to_string(),
                "ID" => id = v.trim().to_string(),
                "Name" => out.push(SpanSeen {
                    service: service.clone(),
                    trace_id: trace_id.clone(),
                    parent: std::mem::take(&mut parent),
                    id: id.clone(),
                    name: v.trim().to_string(),
                }),
                _ => {}
            }
        }
    }
    out
}

/// API process + worker process over `broker`; one task with a client `traceparent`; then the
/// spans of every hop must arrive under the client's trace id.
async fn trace_crosses(broker: &str) {
    let r = receiver();
    let triton = traced_triton();
    let prefix = format!("igtrace-{}", infergate::tasks::new_task_id());
    let otlp = format!("http://127.0.0.1:{}", r.grpc_port);
    let (api_port, worker_port) = (free_port(), free_port());
    let common_args = |service: &'static str| -> Vec<String> {
        [
            "--triton-url",
            &triton.grpc_url(),
            "--broker",
            broker,
            "--task-store",
            REDIS,
            "--redis-prefix",
            &prefix,
            "--otlp-endpoint",
            &otlp,
            "--service-name",
            service,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let dir = std::env::temp_dir();
    let mut api_args = vec!["serve".to_string(), "--workers".into(), "0".into()];
    api_args.extend(["--http-addr".into(), format!("127.0.0.1:{api_port}")]);
    api_args.extend(["--grpc-addr".into(), "127.0.0.1:0".into()]);
    api_args.extend(common_args("infergate-api"));
    let mut worker_args = vec!["worker".to_string(), "--workers".into(), "1".into()];
    worker_args.extend(["--http-addr".into(), format!("127.0.0.1:{worker_port}")]);
    worker_args.extend(common_args("infergate-worker"));
    let mut api = infergate(&api_args, &dir.join(format!("{prefix}-api.log")));
    let mut worker = infergate(&worker_args, &dir.join(format!("{prefix}-worker.log")));
    wait_status(api_port, "/readyz", 200, Duration::from_secs(30));
    wait_status(worker_port, "/readyz", 200, Duration::from_secs(30));

    // Several tasks, one after another, each with its own client trace. infergate's own hops
    // must be complete in every trace. Triton 2.51 now and then starts a fresh root trace for a
    // gRPC request that does carry a valid `traceparent` (about 3% of requests sent one at a
    // time with tritonclient straight to Triton, more when two arrive together; seen with no
    // infergate in the path), so its hop is required in at least one of the traces.
    const TASKS: usize = 4;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    let mut trace_ids = Vec::new();
    for _ in 0..TASKS {
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
        let resp = http
            .post(format!("{base}/v1/models/onnx_linear/tasks"))
            .header("traceparent", &traceparent)
            .json(&json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        assert!(resp.headers().contains_key("x-request-id"));
        let id = resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = task(&http, &base, &id).await;
            if t["status"] == "succeeded" {
                break;
            }
            assert!(
                Instant::now() < deadline && t["status"] != "failed",
                "task did not succeed: {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        trace_ids.push(trace_id);
    }
    // SIGTERM: both processes flush their spans on the way out.
    signal(api.id(), "TERM");
    signal(worker.id(), "TERM");
    assert!(api.wait().unwrap().success());
    assert!(worker.wait().unwrap().success());

    let ours: BTreeSet<(&str, &str)> = [
        ("infergate-api", "http task submit"),
        ("infergate-worker", "task run"),
        ("infergate-worker", "batch"),
        ("infergate-worker", "triton ModelInfer"),
        ("infergate-worker", "task store result"),
    ]
    .into();
    let tritons: BTreeSet<(&str, &str)> =
        [("triton", "InferRequest"), ("triton", "compute")].into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = spans_seen(&r.log);
        let traces: Vec<Vec<SpanSeen>> = trace_ids
            .iter()
            .map(|id| all.iter().filter(|s| &s.trace_id == id).cloned().collect())
            .collect();
        let missing = |seen: &[SpanSeen], wanted: &BTreeSet<(&str, &str)>| -> Vec<String> {
            let got: BTreeSet<(&str, &str)> = seen
                .iter()
                .map(|s| (s.service.as_str(), s.name.as_str()))
                .collect();
            wanted
                .difference(&got)
                .map(|(svc, name)| format!("{svc}/{name}"))
                .collect()
        };
        let ours_complete = traces.iter().all(|t| missing(t, &ours).is_empty());
        let continued: Vec<&Vec<SpanSeen>> = traces
            .iter()
            .filter(|t| missing(t, &tritons).is_empty())
            .collect();
        if ours_complete && !continued.is_empty() {
            let span = |seen: &[SpanSeen], service: &str, name: &str| {
                seen.iter()
                    .find(|s| s.service == service && s.name == name)
                    .unwrap()
                    .clone()
            };
            // One chain, hop by hop: client → API → (broker) → worker → batch → Triton call,
            // in every trace; then → Triton's own request span where Triton continued it.
            for seen in &traces {
                let chain = [
                    span(seen, "infergate-api", "http task submit"),
                    span(seen, "infergate-worker", "task run"),
                    span(seen, "infergate-worker", "batch"),
                    span(seen, "infergate-worker", "triton ModelInfer"),
                ];
                assert_eq!(chain[0].parent, "00f067aa0ba902b7", "{seen:?}");
                for pair in chain.windows(2) {
                    assert_eq!(pair[1].parent, pair[0].id, "{seen:?}");
                }
            }
            for seen in &continued {
                let call = span(seen, "infergate-worker", "triton ModelInfer");
                let request = span(seen, "triton", "InferRequest");
                assert_eq!(request.parent, call.id, "{seen:?}");
            }
            let mut by_service = BTreeMap::<&str, Vec<&str>>::new();
            for s in continued[0] {
                by_service.entry(&s.service).or_default().push(&s.name);
            }
            println!(
                "{broker}: {}/{TASKS} traces already continued by Triton; trace {}: {by_service:?}",
                continued.len(),
                continued[0][0].trace_id
            );
            return;
        }
        if Instant::now() >= deadline {
            let report: Vec<String> = trace_ids
                .iter()
                .zip(&traces)
                .map(|(id, t)| {
                    let mut want = ours.clone();
                    want.extend(&tritons);
                    format!("{id}: missing {:?}", missing(t, &want))
                })
                .collect();
            panic!(
                "{broker}: spans missing: {report:?}; log {}",
                r.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_client_through_redis_worker_and_triton() {
    trace_crosses(REDIS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_client_through_rabbitmq_worker_and_triton() {
    let _up = RABBIT_UP.read().await;
    trace_crosses(RABBIT).await;
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_load() {
    use infergate::proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
    let gw = gateway_with(test_config(vec![triton().grpc_url()])).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let before = scrape(&http, &base).await;
    let (triton_before, rows_before, _) = triton_stats("add_sub").await;

    // 40 concurrent gRPC callers of 1..=3 rows (batched), 10 HTTP calls of 2 rows, 3 HTTP calls
    // with a wrong shape, 2 gRPC calls to a model that does not exist.
    let client = gw.client().await;
    let grpc_rows: Vec<i64> = (0..40).map(|i| 1 + i % 3).collect();
    let calls = grpc_rows.iter().map(|&rows| {
        let mut c = client.clone();
        let n = rows as usize * 16;
        let input = |name: &str| InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: vec![rows, 16],
            ..Default::default()
        };
        let req = ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![input("INPUT0"), input("INPUT1")],
            raw_input_contents: vec![f32_bytes(&vec![1.0; n]), f32_bytes(&vec![2.0; n])],
            ..Default::default()
        };
        async move { c.model_infer(req).await.unwrap() }
    });
    futures::future::join_all(calls).await;
    let body = |shape: [i64; 2]| {
        let n = (shape[0] * shape[1]) as usize;
        json!({"inputs": [
            {"name": "INPUT0", "shape": shape, "datatype": "FP32", "data": vec![1.0; n]},
            {"name": "INPUT1", "shape": shape, "datatype": "FP32", "data": vec![1.0; n]}]})
    };
    for _ in 0..10 {
        let r = http
            .post(format!("{base}/v2/models/add_sub/infer"))
            .json(&body([2, 16]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        let r = http
            .post(format!("{base}/v2/models/add_sub/infer"))
            .json(&body([2, 5]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    for _ in 0..2 {
        let mut c = client.clone();
        let err = c
            .model_infer(ModelInferRequest {
                model_name: "no_such_model".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    // The request id is echoed on gRPC as on HTTP (and generated when absent).
    let mut c = client.clone();
    let mut req = tonic::Request::new(ModelInferRequest {
        model_name: "no_such_model".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "req-42");
    let r = http
        .get(format!("{base}/v2/models/add_sub"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 36, "a generated UUID");

    let after = scrape(&http, &base).await;
    let d = |k: &str| delta(&before, &after, k);
    let requests = |model: &str, protocol: &str, code: &str| {
        d(&format!(
            r#"infergate_requests_total{{model="{model}",protocol="{protocol}",code="{code}"}}"#
        ))
    };
    assert_eq!(requests("add_sub", "grpc", "OK"), 40.0);
    assert_eq!(requests("add_sub", "http", "200"), 10.0);
    assert_eq!(requests("add_sub", "http", "400"), 3.0);
    // A name Triton does not serve is counted under one label, not its own.
    assert_eq!(requests("(unknown)", "grpc", "NOT_FOUND"), 3.0);
    assert!(
        !after.keys().any(|k| k.contains("no_such_model")),
        "a made-up model name became a series: {after:?}"
    );
    let phase = |phase: &str, what: &str| {
        d(&format!(
            r#"infergate_phase_duration_seconds_{what}{{model="add_sub",phase="{phase}"}}"#
        ))
    };
    assert_eq!(phase("total", "count"), 53.0);
    // Every valid request waited in the batcher once; every Triton call was timed once and
    // matches Triton's own count of requests; the batch sizes add up to the rows sent.
    assert_eq!(phase("batch_wait", "count"), 50.0);
    let (triton_after, rows_after, _) = triton_stats("add_sub").await;
    let triton_calls = (triton_after - triton_before) as f64;
    assert_eq!(phase("triton", "count"), triton_calls);
    assert!(
        triton_calls < 50.0,
        "no batches formed: {triton_calls} calls"
    );
    let rows_sent: i64 = grpc_rows.iter().sum::<i64>() + 10 * 2;
    assert_eq!(
        d(r#"infergate_batch_rows_sum{model="add_sub"}"#),
        rows_sent as f64
    );
    assert_eq!(
        d(r#"infergate_batch_rows_count{model="add_sub"}"#),
        triton_calls
    );
    assert_eq!((rows_after - rows_before) as i64, rows_sent);
    assert!(phase("total", "sum") > 0.0);
    assert_eq!(
        after.get(&format!(
            r#"infergate_triton_endpoint_up{{endpoint="{}"}}"#,
            triton().grpc_url()
        )),
        Some(&1.0)
    );
    assert_eq!(after.get("infergate_ready"), Some(&1.0));

    // Every metric the Grafana dashboard queries is one this process exposes.
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dashboard =
        std::fs::read_to_string(repo().join("helm/infergate/dashboards/infergate.json")).unwrap();
    let mut queried = BTreeSet::new();
    for (i, _) in dashboard.match_indices("infergate_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, suffix| {
                n.strip_suffix(suffix).map(str::to_string).unwrap_or(n)
            });
        queried.insert(family);
    }
    assert!(queried.len() >= 8, "{queried:?}");
    for family in &queried {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {family}, which /metrics does not have"
        );
    }
    println!(
        "metrics: 56 requests counted by code; {triton_calls} Triton calls for 50 valid requests, {rows_sent} rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_triton_and_the_broker_while_liveness_stays() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let _down = RABBIT_UP.write().await;
    let own = Triton::start(None, &[]);
    let ports = own.ports();
    let mut cfg = test_config(vec![own.grpc_url()]);
    cfg.tasks.broker = RABBIT.parse().unwrap();
    cfg.tasks.redis_prefix = format!("igready-{}", infergate::tasks::new_task_id());
    cfg.triton.ready_models = vec!["add_sub".into()];
    let gw = gateway_with(cfg).await;
    let port = gw.http_addr.port();
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(gw.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // The gRPC health status follows /readyz within moments: wait for `want` (or time out).
    let grpc_status = |h: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus| {
        let mut h = h.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let got = h
                    .check(HealthCheckRequest {
                        service: "inference.GRPCInferenceService".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status();
                if got == want || Instant::now() > deadline {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let readyz = |http: reqwest::Client| async move {
        let r = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let http = reqwest::Client::new();
    let wait = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || wait_status(port, "/readyz", 200, wait))
        .await
        .unwrap();
    assert_eq!(
        grpc_status(&mut health, ServingStatus::Serving).await,
        ServingStatus::Serving
    );
    let (_, body) = readyz(http.clone()).await;
    assert_eq!(body["models"]["add_sub"], true, "{body}");

    // Triton goes away: unready (503, gRPC NOT_SERVING), still alive.
    tokio::task::spawn_blocking(move || {
        let mut own = own;
        own.stop();
        wait_status(port, "/readyz", 503, wait);
    })
    .await
    .unwrap();
    let (_, body) = readyz(http.clone()).await;
    assert_eq!(body["triton"], false, "{body}");
    assert_eq!(http_status(port, "/livez"), Some(200));
    assert_eq!(
        grpc_status(&mut health, ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );

    // Triton back on the same ports: ready again by itself.
    let own = tokio::task::spawn_blocking(move || {
        let t = Triton::start(Some(ports), &[]);
        wait_status(port, "/readyz", 200, wait);
        t
    })
    .await
    .unwrap();
    assert_eq!(
        grpc_status(&mut health, ServingStatus::Serving).await,
        ServingStatus::Serving
    );

    // The broker goes away: unready; back: ready.
    let stopped = tokio::task::spawn_blocking(move || {
        let stopped = RabbitStopped::new();
        wait_status(port, "/readyz", 503, wait);
        stopped
    })
    .await
    .unwrap();
    let (_, body) = readyz(http.clone()).await;
    assert_eq!(body["broker"], false, "{body}");
    assert_eq!(body["triton"], true, "{body}");
    assert_eq!(http_status(port, "/livez"), Some(200));
    tokio::task::spawn_blocking(move || {
        stopped.start();
        wait_status(port, "/readyz", 200, Duration::from_secs(30));
    })
    .await
    .unwrap();
    assert_eq!(http_status(port, "/livez"), Some(200));
    drop(own);
}

#[test]
fn text_logs_to_a_pipe_are_plain() {
    use std::io::{BufRead, BufReader};
    // No Triton is needed to start serving (it is reported unready); the first log line is
    // enough.
    let mut child = reaped(
        Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args(["serve", "--triton-url", "http://127.0.0.1:1"])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(["--log-format", "text", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read.unwrap();
    assert!(line.contains("infergate serving"), "{line:?}");
    assert!(
        !line.contains('\x1b'),
        "escape codes in a piped log: {line:?}"
    );
}
