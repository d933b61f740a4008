//! OpenAI's Batch API over durable tasks, against a real Triton (`tiny_chat`), Redis Streams
//! and a worker process: 1,000 lines complete with one answer per line while the worker is
//! SIGKILLed once, and cancelling a batch stops the lines not yet started.

mod common;

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use common::*;
use infergate::{config::Config, openai::config::LmModelConfig};
use serde_json::{Value, json};

const REDIS: &str = "redis://127.0.0.1:6379";

fn config(prefix: &str, blobs: &str) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.into();
    cfg.tasks.workers = 0;
    cfg.tasks.visibility_timeout_ms = 1_500;
    cfg.tasks.max_attempts = 6;
    cfg.tasks.blob_store = Some(blobs.into());
    cfg.openai.models = vec![LmModelConfig {
        name: "tiny-chat".into(),
        triton_model: "tiny_chat".into(),
        tokenizer: repo().join("triton-models/tiny_chat/tokenizer"),
    }];
    cfg
}

/// An `infergate worker` process on the same broker and store.
fn worker(prefix: &str, blobs: &str, concurrency: usize) -> Child {
    let log = std::env::temp_dir().join(format!("{prefix}-worker.log"));
    Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["worker", "--triton-url", &triton().grpc_url()])
        .args([
            "--broker",
            REDIS,
            "--task-store",
            REDIS,
            "--redis-prefix",
            prefix,
        ])
        .args([
            "--visibility-timeout-ms",
            "1500",
            "--task-max-attempts",
            "6",
        ])
        .args([
            "--workers",
            "1",
            "--log-level",
            "warn",
            "--blob-store",
            blobs,
        ])
        .args(["--worker-concurrency", &concurrency.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(append_log(&log))
        .spawn()
        .unwrap()
}

/// What line `i` asks, and what tiny_chat answers (it says the user turn back).
fn said(i: usize) -> String {
    let words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "star"];
    (0..3 + i % 5)
        .map(|k| words[(i + k) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn jsonl(lines: usize) -> String {
    (0..lines)
        .map(|i| {
            json!({
                "custom_id": format!("line-{i}"),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": said(i)}]},
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A multipart upload as OpenAI's clients send it.
async fn upload(http: &reqwest::Client, base: &str, content: &str) -> String {
    let boundary = "infergate-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let r = http
        .post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "file");
    assert_eq!(v["bytes"].as_u64().unwrap() as usize, content.len());
    v["id"].as_str().unwrap().to_string()
}

async fn batch(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/v1/batches/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn content(http: &reqwest::Client, base: &str, file: &Value) -> Vec<Value> {
    let Some(id) = file.as_str() else {
        return Vec::new();
    };
    let text = http
        .get(format!("{base}/v1/files/{id}/content"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn create(http: &reqwest::Client, base: &str, file: &str) -> String {
    let r = http
        .post(format!("{base}/v1/batches"))
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "in_progress", "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// A batch the API refuses: the status and OpenAI's error message.
async fn refused(http: &reqwest::Client, base: &str, file: &str) -> (u16, String) {
    let r = http
        .post(format!("{base}/v1/batches"))
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_lines_complete_through_a_worker_kill_and_cancel_stops_the_rest() {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let dir = std::env::temp_dir().join(format!("{prefix}-blobs"));
    let blobs = format!("file://{}", dir.display());
    let gw = gateway_with(config(&prefix, &blobs)).await;
    let base = gw.http_base();
    let http = reqwest::Client::new();

    // A bad line refuses the batch, naming the line.
    let bad = upload(&http, &base, &(jsonl(2) + "{\"custom_id\": \"x\"}\n")).await;
    let (status, message) = refused(&http, &base, &bad).await;
    assert_eq!(status, 400);
    assert!(message.starts_with("line 3:"), "{message}");

    // 1,000 lines; the worker is SIGKILLed once a third of them are done.
    const LINES: usize = 1000;
    let file = upload(&http, &base, &jsonl(LINES)).await;
    let id = create(&http, &base, &file).await;
    let mut w = worker(&prefix, &blobs, 8);
    let started = Instant::now();
    let mut killed = false;
    let done = loop {
        let b = batch(&http, &base, &id).await;
        let completed = b["request_counts"]["completed"].as_u64().unwrap();
        if !killed && completed >= LINES as u64 / 3 {
            signal(w.id(), "KILL");
            let _ = w.wait();
            println!(
                "{:.1} s: worker SIGKILLed at {completed} lines done",
                started.elapsed().as_secs_f64()
            );
            w = worker(&prefix, &blobs, 8);
            killed = true;
        }
        if b["status"] == "completed" {
            break b;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "{b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(killed);
    println!("{:.1} s: {done}", started.elapsed().as_secs_f64());
    assert_eq!(done["request_counts"]["completed"], LINES as u64, "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    assert!(done["error_file_id"].is_null(), "{done}");
    let out = content(&http, &base, &done["output_file_id"]).await;
    assert_eq!(out.len(), LINES);
    let mut seen = std::collections::HashSet::new();
    for line in &out {
        let i: usize = line["custom_id"].as_str().unwrap()[5..].parse().unwrap();
        assert!(seen.insert(i), "line {i} answered twice");
        let resp = &line["response"];
        assert_eq!(resp["status_code"], 200, "{line}");
        let body = &resp["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], said(i), "{line}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let words = said(i).split(' ').count() as u64;
        assert_eq!(body["usage"]["completion_tokens"], words, "{line}");
        assert!(line["error"].is_null());
    }

    // Cancel: with one line at a time, a batch cancelled early keeps the lines already
    // answered and never sends the rest to Triton.
    signal(w.id(), "KILL");
    let _ = w.wait();
    let before = quiet_stats("tiny_chat").await.0;
    const SLOW: usize = 300;
    let file = upload(&http, &base, &jsonl(SLOW)).await;
    let id = create(&http, &base, &file).await;
    let mut w = worker(&prefix, &blobs, 1);
    let at_cancel = loop {
        let b = batch(&http, &base, &id).await;
        let completed = b["request_counts"]["completed"].as_u64().unwrap();
        if completed >= 10 {
            break completed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = http
        .post(format!("{base}/v1/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let end = loop {
        let b = batch(&http, &base, &id).await;
        if b["status"] == "cancelled" {
            break b;
        }
        assert_eq!(b["status"], "cancelling", "{b}");
        assert!(started.elapsed() < Duration::from_secs(60), "{b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let completed = end["request_counts"]["completed"].as_u64().unwrap();
    let failed = end["request_counts"]["failed"].as_u64().unwrap();
    println!("cancelled at {at_cancel} done: {end}");
    assert_eq!(completed + failed, SLOW as u64, "{end}");
    // Most lines never ran, and Triton saw only the answered ones (and at most the one
    // line the worker held when its task was cancelled).
    assert!(completed >= at_cancel && failed >= SLOW as u64 / 2, "{end}");
    let ran = quiet_stats("tiny_chat").await.0 - before;
    assert!(
        (completed..=completed + 1).contains(&ran),
        "Triton ran {ran}, {completed} answered"
    );
    let out = content(&http, &base, &end["output_file_id"]).await;
    let errors = content(&http, &base, &end["error_file_id"]).await;
    assert_eq!(out.len() as u64, completed);
    assert_eq!(errors.len() as u64, failed);
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "batch_cancelled"),
        "{errors:?}"
    );
    signal(w.id(), "KILL");
    let _ = w.wait();
    let _ = std::fs::remove_dir_all(dir);
    lines_the_queue_refuses_fail_alone(&http).await;
}

/// A batch submitted into a queue with room for only some of its lines: those queued run and
/// are answered, the rest end as failed lines naming why (no line runs that the batch does
/// not name), and a batch none of whose lines could be queued is refused.
async fn lines_the_queue_refuses_fail_alone(http: &reqwest::Client) {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let dir = std::env::temp_dir().join(format!("{prefix}-blobs"));
    let blobs = format!("file://{}", dir.display());
    let mut cfg = config(&prefix, &blobs);
    cfg.tasks.queue_capacity = 20;
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let before = quiet_stats("tiny_chat").await.0;

    let file = upload(http, &base, &jsonl(30)).await;
    let id = create(http, &base, &file).await;
    let b = batch(http, &base, &id).await;
    assert_eq!(b["request_counts"]["total"], 30, "{b}");
    assert_eq!(b["request_counts"]["failed"], 10, "{b}");

    // The queue is full now: a batch none of whose lines fits is refused as a whole.
    let full = upload(http, &base, &jsonl(5)).await;
    let (status, message) = refused(http, &base, &full).await;
    assert_eq!(status, 429);
    assert!(message.contains("queue is full"), "{message}");

    let mut w = worker(&prefix, &blobs, 4);
    let started = Instant::now();
    let done = loop {
        let b = batch(http, &base, &id).await;
        if b["status"] == "completed" {
            break b;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("a batch into a queue of 20: {done}");
    assert_eq!(done["request_counts"]["completed"], 20, "{done}");
    assert_eq!(done["request_counts"]["failed"], 10, "{done}");
    let out = content(http, &base, &done["output_file_id"]).await;
    let errors = content(http, &base, &done["error_file_id"]).await;
    let mut answered = std::collections::HashSet::new();
    for line in &out {
        let i: usize = line["custom_id"].as_str().unwrap()[5..].parse().unwrap();
        assert_eq!(
            line["response"]["body"]["choices"][0]["message"]["content"],
            said(i),
            "{line}"
        );
        answered.insert(i);
    }
    assert_eq!(answered.len(), 20);
    assert_eq!(errors.len(), 10);
    for e in &errors {
        let i: usize = e["custom_id"].as_str().unwrap()[5..].parse().unwrap();
        assert!(!answered.contains(&i), "line {i} both answered and refused");
        assert_eq!(e["error"]["code"], "overloaded", "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("not submitted: ") && msg.contains("queue is full"),
            "{e}"
        );
    }
    // Triton ran exactly the lines the batch queued.
    assert_eq!(quiet_stats("tiny_chat").await.0 - before, 20);
    signal(w.id(), "KILL");
    let _ = w.wait();
    let _ = std::fs::remove_dir_all(dir);
}
