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
    let out = Command::new(repo().join("scripts/install-triton.sh"))
        .output()
        .expect("run install-triton.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string()
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
    assert!(error.contains("deadline"), "{error}");
    let (sent, _) = cancelled_at(&log, "late").await;
    assert!(sent < 100, "the model ran to its end");
}
