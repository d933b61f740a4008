//! Streaming (decoupled) models end to end, against a real Triton serving `token_stream`:
//! gRPC ModelStreamInfer and HTTP generate / generate_stream give what Triton gives directly
//! (Triton's own Python client, curl and an SSE client library), and a caller that leaves or
//! runs out of time cancels the request in Triton.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use futures::StreamExt;
use infergate::proto::inference::{
    InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor,
};

/// The tests here read the process's stream gauges: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn venv() -> String {
    triton_venv()
}

async fn python(args: &[String]) -> String {
    let v = venv();
    let out = tokio::task::block_in_place(|| {
        Command::new("timeout")
            .arg("300")
            .arg(format!("{v}/bin/python"))
            .arg(repo().join("tests/clients/streams.py"))
            .args(args)
            .output()
    })
    .expect("spawn python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "streams.py failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
    text
}

fn param(s: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.into())),
    }
}

/// A `token_stream` request: `n` responses `delay_ms` apart.
fn tokens(
    id: &str,
    n: i32,
    delay_ms: i32,
    cancel_log: Option<&std::path::Path>,
) -> ModelInferRequest {
    let text = b"one two three";
    let mut raw_text = (text.len() as u32).to_le_bytes().to_vec();
    raw_text.extend_from_slice(text);
    let tensor = |name: &str, datatype: &str| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![1],
        ..Default::default()
    };
    let mut req = ModelInferRequest {
        model_name: "token_stream".into(),
        id: id.into(),
        inputs: vec![
            tensor("text_input", "BYTES"),
            tensor("max_tokens", "INT32"),
            tensor("delay_ms", "INT32"),
        ],
        raw_input_contents: vec![
            raw_text.into(),
            n.to_le_bytes().to_vec().into(),
            delay_ms.to_le_bytes().to_vec().into(),
        ],
        ..Default::default()
    };
    if let Some(path) = cancel_log {
        req.parameters
            .insert("cancel_log".into(), param(path.to_str().unwrap()));
    }
    req
}

/// A fresh file for the model's cancellation records (written by Triton's python stub).
fn cancel_log(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "infergate-cancelled-{}-{name}.txt",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The model's record of a cancellation: (responses it had sent, when it saw it).
async fn cancelled_at(log: &std::path::Path, id: &str) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(&format!("{id} "))) {
            let f: Vec<&str> = line.split(' ').collect();
            return (f[1].parse().unwrap(), f[2].parse().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "the model never saw {id} cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn streams_open(http: &reqwest::Client, base: &str) -> f64 {
    scrape(http, base)
        .await
        .get("infergate_streams_open{model=\"token_stream\"}")
        .copied()
        .unwrap_or(0.0)
}

async fn gauge_returns_to_zero(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while streams_open(http, base).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "infergate_streams_open stayed above 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_streams_match_direct_triton() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = gateway().await;
    let t = triton();
    python(&[
        "grpc".into(),
        format!("127.0.0.1:{}", t.grpc_port),
        gw.grpc_addr.to_string(),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_generate_stream_match_triton_with_curl_and_an_sse_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = gateway().await;
    python(&["http".into(), triton().http_base(), gw.http_base()]).await;
    // Unknown paths answer a JSON error, as every other answer of the API.
    let r = reqwest::get(format!("{}/v2/no/such/path", gw.http_base()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no route for GET /v2/no/such/path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_request_in_triton() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = gateway().await;
    let http = reqwest::Client::new();
    let log = cancel_log("leave");

    // gRPC: 3 of 100 responses, then the client resets its stream.
    let mut c = gw.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(tokens("grpc-leaver", 100, 20, Some(&log)))
        .await
        .unwrap();
    let mut answers = c
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        let msg = answers.message().await.unwrap().expect("a response");
        assert!(msg.error_message.is_empty(), "{}", msg.error_message);
        assert_eq!(
            msg.infer_response.unwrap().id,
            "grpc-leaver",
            "response {i}"
        );
    }
    assert_eq!(streams_open(&http, &gw.http_base()).await, 1.0);
    let left = unix_now();
    drop(answers);
    drop(tx);
    let (sent, seen) = cancelled_at(&log, "grpc-leaver").await;
    println!(
        "gRPC: the model saw the cancellation {:.1} ms after the client left, having sent {sent}",
        (seen - left) * 1e3
    );
    assert!(
        seen - left <= 0.100,
        "the model saw it {:.3} s after",
        seen - left
    );
    assert!((3..=5).contains(&sent), "it had sent {sent}");
    gauge_returns_to_zero(&http, &gw.http_base()).await;

    // HTTP generate_stream: 3 events read, then the connection closes.
    let mut resp = http
        .post(format!(
            "{}/v2/models/token_stream/generate_stream",
            gw.http_base()
        ))
        .json(&serde_json::json!({
            "id": "sse-leaver", "text_input": "a b c", "max_tokens": 100, "delay_ms": 20,
            "parameters": {"cancel_log": log.to_str().unwrap()},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = 0;
    while events < 3 {
        let chunk = resp.chunk().await.unwrap().expect("an event");
        events += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    let left = unix_now();
    drop(resp);
    drop(http);
    let (_, seen) = cancelled_at(&log, "sse-leaver").await;
    println!(
        "HTTP: the model saw the cancellation {:.1} ms after the client left",
        (seen - left) * 1e3
    );
    assert!(
        seen - left <= 0.100,
        "the model saw it {:.3} s after",
        seen - left
    );
    let http = reqwest::Client::new();
    gauge_returns_to_zero(&http, &gw.http_base()).await;
    let m = scrape(&http, &gw.http_base()).await;
    assert!(
        m["infergate_streams_cancelled_total{model=\"token_stream\"}"] >= 2.0,
        "{m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_deadline_is_cancelled_and_says_so() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = gateway().await;
    let log = cancel_log("deadline");
    let mut c = gw.client().await;
    let mut req = tonic::Request::new(tokio_stream::iter([
        tokens("late", 100, 20, Some(&log)),
        tokens("quick", 2, 0, None),
    ]));
    req.set_timeout(Duration::from_millis(300));
    let mut answers = c.model_stream_infer(req).await.unwrap().into_inner();
    let (mut late, mut quick, mut error) = (0, 0, String::new());
    while let Some(msg) = answers.next().await {
        let msg = msg.unwrap();
        let id = msg
            .infer_response
            .as_ref()
            .map(|r| r.id.clone())
            .unwrap_or_default();
        if !msg.error_message.is_empty() {
            assert_eq!(id, "late");
            error = msg.error_message;
        } else if id == "late" {
            late += 1;
        } else {
            quick += 1;
        }
    }
    // Each request answers on its own: the quick one whole, the late one cut at its deadline.
    assert_eq!(quick, 2);
    assert!(
        (5..=16).contains(&late),
        "{late} responses before the deadline"
    );
    assert!(error.to_lowercase().contains("deadline"), "{error}");
    let (sent, _) = cancelled_at(&log, "late").await;
    assert!(sent < 100, "the model ran to its end");
}

/// The `token_stream` task body (HTTP `/infer` JSON).
fn token_task(n: i32, delay_ms: i32) -> serde_json::Value {
    serde_json::json!({"id": "job", "inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["red green blue"]},
        {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [n]},
        {"name": "delay_ms", "shape": [1], "datatype": "INT32", "data": [delay_ms]},
    ]})
}

/// Reads server-sent events until the stream ends: (event name, data) each.
async fn sse_events(resp: reqwest::Response) -> Vec<(String, serde_json::Value)> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("");
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// What `token_stream` answers at index i for "red green blue".
fn word(i: u64) -> &'static str {
    ["red", "green", "blue"][(i % 3) as usize]
}

async fn decoupled_task_round(cfg: infergate::config::Config, label: &str) {
    use infergate::proto::tasks::{WatchRequest, task_service_client::TaskServiceClient};
    let gw = gateway_with(cfg).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    // 40 responses 25 ms apart: about a second of streaming.
    let r = http
        .post(format!("{base}/v1/models/token_stream/tasks"))
        .json(&token_task(40, 25))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{label}");
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A gRPC watcher from the start, and an HTTP one that joins halfway.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut grpc = TaskServiceClient::connect(gw.grpc_url()).await.unwrap();
    let early = {
        let (id, seen) = (id.clone(), std::sync::Arc::clone(&seen));
        tokio::spawn(async move {
            let mut w = grpc
                .watch(WatchRequest {
                    id,
                    responses: true,
                })
                .await
                .unwrap()
                .into_inner();
            let (mut got, mut states) = (Vec::new(), Vec::new());
            while let Some(t) = w.message().await.unwrap() {
                match t.streamed {
                    Some(s) => {
                        got.push((s.index, s.response.unwrap()));
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    None => states.push(t.state),
                }
            }
            (got, states)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(std::sync::atomic::Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "{label}: no responses came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let joined_at = seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        joined_at < 40,
        "{label}: the stream was over before the late watcher joined"
    );
    let late = sse_events(
        http.get(format!("{base}/v1/tasks/{id}/events"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let (early_got, early_states) = early.await.unwrap();

    // The early watcher: 40 responses in order, each the right word.
    assert_eq!(early_got.len(), 40, "{label}: {early_got:?}");
    for (i, (index, resp)) in early_got.iter().enumerate() {
        assert_eq!(*index, i as u64);
        let text = &resp.raw_output_contents[0][4..];
        assert_eq!(text, word(i as u64).as_bytes(), "{label}: response {i}");
    }
    assert_eq!(*early_states.last().unwrap(), 3, "{label}: ends succeeded"); // SUCCEEDED
    // The late watcher joined after responses were kept and still got every one, first
    // to last, then the final state.
    let responses: Vec<_> = late.iter().filter(|(n, _)| n == "response").collect();
    assert_eq!(responses.len(), 40, "{label}: {late:?}");
    for (i, (_, e)) in responses.iter().enumerate() {
        assert_eq!(e["index"], i as u64);
        assert_eq!(
            e["response"]["outputs"][0]["data"][0],
            word(i as u64),
            "{label}"
        );
    }
    let (name, last) = late.last().unwrap();
    assert_eq!(
        (name.as_str(), last["status"].as_str()),
        ("state", Some("succeeded")),
        "{label}"
    );
    // The result is the summary: how many responses were kept.
    let t: serde_json::Value = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        t["response"]["parameters"]["infergate_responses"], 40,
        "{label}: {t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoupled_task_keeps_its_responses_and_a_late_watcher_replays_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    decoupled_task_round(test_config(vec![triton().grpc_url()]), "memory").await;
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    decoupled_task_round(cfg, "redis").await;
}

/// The block rotel printed for the span named `name` in trace `trace_id`, if it came.
fn span_block(log: &std::path::Path, trace_id: &str, name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(log).ok()?).into_owned();
    text.split("\nSpan #")
        .find(|b| {
            b.lines()
                .any(|l| l.trim() == format!("Trace ID       : {trace_id}"))
                && b.lines()
                    .any(|l| l.trim() == format!("Name           : {name}"))
        })
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stream_is_one_span_with_an_event_per_response() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A real OTLP receiver (rotel) printing what it gets, and infergate exporting to it.
    let (otlp, otlp_http) = (free_port(), free_port());
    let log = std::env::temp_dir().join(format!("infergate-rotel-streams-{otlp}.log"));
    let _rotel = reaped(
        Command::new(repo().join("scripts/start-otlp-receiver.sh"))
            .args([otlp.to_string(), otlp_http.to_string()])
            .env("INFERGATE_WATCH_PID", std::process::id().to_string())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap()),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", otlp)).is_err() {
        assert!(Instant::now() < deadline, "rotel did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (grpc, http) = (free_port(), free_port());
    let args: Vec<String> = [
        "serve",
        "--triton-url",
        &triton().grpc_url(),
        "--grpc-addr",
        &format!("127.0.0.1:{grpc}"),
        "--http-addr",
        &format!("127.0.0.1:{http}"),
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{otlp}"),
        "--service-name",
        "infergate-streams",
    ]
    .map(str::to_string)
    .to_vec();
    let mut ig = infergate(
        &args,
        &std::env::temp_dir().join(format!("infergate-streams-{http}.log")),
    );
    wait_status(http, "/readyz", 200, Duration::from_secs(30));

    let (grpc_trace, http_trace) = (
        uuid::Uuid::new_v4().simple().to_string(),
        uuid::Uuid::new_v4().simple().to_string(),
    );
    let mut c = connect(&format!("http://127.0.0.1:{grpc}")).await;
    let mut req = tonic::Request::new(tokio_stream::iter([tokens("traced", 4, 0, None)]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let got: Vec<_> = c
        .model_stream_infer(req)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(got.len(), 4);
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v2/models/token_stream/generate_stream"
        ))
        .header(
            "traceparent",
            format!("00-{http_trace}-00f067aa0ba902b7-01"),
        )
        .json(&serde_json::json!({"text_input": "a b", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap().matches("data: ").count(), 5);
    // SIGTERM flushes the spans.
    signal(ig.id(), "TERM");
    assert!(ig.wait().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(20);
    for (trace_id, name, responses) in [
        (&grpc_trace, "grpc ModelStreamInfer", 4),
        (&http_trace, "http generate_stream", 5),
    ] {
        let block = loop {
            if let Some(b) = span_block(&log, trace_id, name) {
                break b;
            }
            assert!(
                Instant::now() < deadline,
                "no span '{name}' in trace {trace_id}; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            block.contains("Parent ID      : 00f067aa0ba902b7"),
            "{block}"
        );
        assert_eq!(
            block.matches("-> Name: response").count(),
            responses,
            "{block}"
        );
        for i in 0..responses {
            assert!(block.contains(&format!("-> index: Int({i})")), "{block}");
        }
    }
}
