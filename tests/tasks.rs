//! The async path end to end, against a real Triton and the real Redis on 127.0.0.1:6379:
//! accepted tasks all complete with correct results, idempotency keys never run a job twice,
//! a cancelled task never reaches Triton, a poison message is dead-lettered after N attempts,
//! a worker killed with SIGKILL mid-batch loses nothing, and neither does a broker or task
//! store restart.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use infergate::{config::Config, server::connect_tasks};
use serde_json::{Value, json};

/// Tests using RabbitMQ hold this for reading; the restart test holds it for writing.
static RABBIT_UP: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Holds RabbitMQ up for a test that uses it (a no-op guard for other brokers).
async fn rabbit_up(broker: &str) -> Option<tokio::sync::RwLockReadGuard<'static, ()>> {
    if broker.starts_with("amqp") {
        Some(RABBIT_UP.read().await)
    } else {
        None
    }
}

/// The 10,000-task runs count `onnx_linear` rows exactly: one at a time.
static ONNX_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tests whose Triton statistics of the `slow` model must not mix run one at a time.
static SLOW_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix() -> String {
    format!("igtest-{}", infergate::tasks::new_task_id())
}

fn redis_config(prefix: &str, workers: usize) -> Config {
    broker_config(prefix, workers, REDIS)
}

/// Tasks kept in Redis, carried by `broker`.
fn broker_config(prefix: &str, workers: usize, broker: &str) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = broker.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.into();
    cfg.tasks.workers = workers;
    cfg.tasks.visibility_timeout_ms = 1_500;
    cfg
}

async fn rows_inferred(model: &str) -> u64 {
    triton_stats(model).await.1
}

/// `infergate_amqp_group_tasks` (sum, count) from `/metrics`: tasks and the messages they
/// were published in with grouping on.
async fn group_metrics(http: &reqwest::Client, base: &str) -> (f64, f64) {
    let m = scrape(http, base).await;
    let value = |k: &str| m.get(k).copied().unwrap_or(0.0);
    (
        value("infergate_amqp_group_tasks_sum"),
        value("infergate_amqp_group_tasks_count"),
    )
}

fn linear_body(x: [f32; 4]) -> Value {
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": x}]})
}

fn linear_expected(x: [f32; 4]) -> Vec<f64> {
    let b = [0.5f32, -1.0, 2.0];
    (0..3)
        .map(|j| {
            let s: f32 = (0..4)
                .map(|i| x[i] * ((i + 1) * (j + 1)) as f32 / 10.0)
                .sum();
            f64::from(s + b[j])
        })
        .collect()
}

async fn submit(
    http: &reqwest::Client,
    base: &str,
    model: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value) {
    let mut r = http
        .post(format!("{base}/v1/models/{model}/tasks"))
        .json(body);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    if status == 202 {
        assert!(
            r.headers()["location"]
                .to_str()
                .unwrap()
                .starts_with("/v1/tasks/")
        );
        assert!(r.headers().contains_key("retry-after"));
    }
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_default_runs_tasks_and_reports_results() {
    let gw = gateway().await; // memory broker and store, one worker loop inside serve
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let body = json!({"inputs": [
        {"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["ab", "xyz"]}]});
    let (s, t) = submit(&http, &base, "text_stats", &body, None).await;
    assert_eq!(s, 202, "{t}");
    assert_eq!(t["status"], "queued");
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let done = wait_final(
        &http,
        &base,
        std::slice::from_ref(&id),
        Duration::from_secs(20),
    )
    .await;
    let t = &done[0];
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["attempts"], 1);
    assert!(t["finished_at_ms"].as_u64() >= t["started_at_ms"].as_u64());
    let outs = t["response"]["outputs"].as_array().unwrap();
    let upper = outs.iter().find(|o| o["name"] == "UPPER").unwrap();
    assert_eq!(upper["data"], json!(["AB", "XYZ"]));

    // Bad requests are refused at submission, not queued.
    let (s, e) = submit(
        &http,
        &base,
        "text_stats",
        &json!({"inputs": [
        {"name": "TEXT", "shape": [2, 1], "datatype": "INT32", "data": [1, 2]}]}),
        None,
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let (s, _) = submit(&http, &base, "nope", &body, None).await;
    assert_eq!(s, 404);
    let r = http
        .get(format!("{base}/v1/tasks/0123456789abcdef0123456789abcdef"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A finished task cannot be cancelled.
    let r = http
        .delete(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_redis_streams_all_succeed_once() {
    ten_thousand_tasks(REDIS, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_rabbitmq_all_succeed_once() {
    ten_thousand_tasks(RABBIT, 1).await;
}

/// Up to 16 concurrent submissions per RabbitMQ message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_grouped_rabbitmq_all_succeed_once() {
    ten_thousand_tasks(RABBIT, 16).await;
}

async fn ten_thousand_tasks(broker: &str, group: usize) {
    let _onnx = ONNX_MODEL.lock().await;
    let _up = rabbit_up(broker).await;
    let p = prefix();
    let mut cfg = broker_config(&p, 2, broker);
    cfg.tasks.amqp_group_max = group;
    let gw = gateway_with(cfg).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let before = rows_inferred("onnx_linear").await;
    let groups_before = group_metrics(&http, &base).await;
    let n = 10_000usize;
    let started = Instant::now();
    let mut submitters = Vec::new();
    for part in 0..32 {
        let (http, base) = (http.clone(), base.clone());
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in (part..n).step_by(32) {
                let x = [k as f32, 1.0, (k % 7) as f32, -1.0];
                let (s, t) = submit(&http, &base, "onnx_linear", &linear_body(x), None).await;
                assert_eq!(s, 202, "{t}");
                ids.push((k, t["id"].as_str().unwrap().to_string()));
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await.unwrap());
    }
    ids.sort();
    let submitted = started.elapsed();
    let only_ids: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    let done = wait_final(&http, &base, &only_ids, Duration::from_secs(240)).await;
    let mut succeeded = 0;
    for ((k, _), t) in ids.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        let x = [*k as f32, 1.0, (*k % 7) as f32, -1.0];
        let y: Vec<f64> = t["response"]["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (a, b) in y.iter().zip(linear_expected(x)) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "task {k}: {y:?}");
        }
        succeeded += 1;
    }
    assert_eq!(succeeded, n);
    // Exactly one row per task reached Triton: nothing lost, nothing run twice.
    assert_eq!(rows_inferred("onnx_linear").await - before, n as u64);
    let (tasks, messages) = {
        let after = group_metrics(&http, &base).await;
        (after.0 - groups_before.0, after.1 - groups_before.1)
    };
    if group > 1 {
        // Every task left in a group message, and messages carried more than one on average
        // (other tests in this binary may add theirs, hence ≥).
        assert!(
            tasks >= n as f64 && messages < tasks,
            "{tasks} tasks in {messages} messages"
        );
        println!("grouping: {tasks} tasks in {messages} messages");
    }
    println!(
        "{broker} (group {group}): {n} tasks: submitted in {:.1} s, all succeeded after {:.1} s",
        submitted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_and_cancellation_never_run_a_job_twice_or_at_all() {
    let p = prefix();
    // API only: nothing runs until a worker starts.
    let api = gateway_with(redis_config(&p, 0)).await;
    let http = reqwest::Client::new();
    let base = api.http_base();
    let before = rows_inferred("seq_sum").await;
    let body = json!({"inputs": [{"name": "SEQ", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});
    let (s1, a) = submit(&http, &base, "seq_sum", &body, Some("order-42")).await;
    let (s2, b) = submit(&http, &base, "seq_sum", &body, Some("order-42")).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(a["id"], b["id"], "same key, same task");
    let (_, other) = submit(&http, &base, "seq_sum", &body, Some("order-43")).await;
    let (_, cancelled) = submit(&http, &base, "seq_sum", &body, None).await;
    let cid = cancelled["id"].as_str().unwrap();
    let r = http
        .delete(format!("{base}/v1/tasks/{cid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(task(&http, &base, cid).await["status"], "cancelled");

    // Now a worker: it runs the two distinct jobs and skips the cancelled one.
    let workers = gateway_with(redis_config(&p, 1)).await;
    let ids = [
        a["id"].as_str().unwrap().to_string(),
        other["id"].as_str().unwrap().to_string(),
    ];
    let done = wait_final(&http, &base, &ids, Duration::from_secs(30)).await;
    assert!(done.iter().all(|t| t["status"] == "succeeded"), "{done:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(task(&http, &base, cid).await["status"], "cancelled");
    assert_eq!(
        rows_inferred("seq_sum").await - before,
        2,
        "one run per key, none for the cancelled task"
    );
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_n_attempts_over_redis() {
    poison(REDIS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_n_attempts_over_rabbitmq() {
    poison(RABBIT).await;
}

async fn poison(broker: &str) {
    let _slow = SLOW_MODEL.lock().await;
    let _up = rabbit_up(broker).await;
    let p = prefix();
    let mut cfg = broker_config(&p, 1, broker);
    cfg.tasks.max_attempts = 2;
    let gw = gateway_with(cfg.clone()).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    // The slow model parses `delay_ms` as an integer: a string makes Triton fail every time.
    let poison = json!({"parameters": {"delay_ms": "not-a-number"},
        "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}]});
    let good = json!({"parameters": {"delay_ms": 1},
        "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [2]}]});
    let (_, bad) = submit(&http, &base, "slow", &poison, None).await;
    let (_, ok) = submit(&http, &base, "slow", &good, None).await;
    let ids = [
        bad["id"].as_str().unwrap().to_string(),
        ok["id"].as_str().unwrap().to_string(),
    ];
    let done = wait_final(&http, &base, &ids, Duration::from_secs(30)).await;
    assert_eq!(done[0]["status"], "failed", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 2);
    assert!(!done[0]["error"]["message"].as_str().unwrap().is_empty());
    // gRPC's own code names, as documented (`ABORTED`, not `Aborted`).
    let code = done[0]["error"]["code"].as_str().unwrap();
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
        "{code}"
    );
    assert_eq!(done[1]["status"], "succeeded", "{}", done[1]);
    // The dead letters hold the failed task, its message whole, and the reason.
    let tasks = connect_tasks(&cfg).await.unwrap();
    let dead = tasks.dead.list(&Default::default()).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.id, ids[0]);
    assert!(
        !dead[0].reason.is_empty(),
        "the dead letter carries its reason"
    );
    let letter = tasks.dead.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(
        letter.message.payload.len() as u64,
        letter.entry.payload_bytes
    );
    assert!(letter.entry.payload_bytes > 0);
    assert!(
        tasks.broker.dead_letters().await.unwrap().is_empty(),
        "kept once, not also in the broker's dead-letter queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_over_redis() {
    killed_worker(REDIS, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_over_rabbitmq() {
    killed_worker(RABBIT, 1).await;
}

/// Messages of up to 8 tasks: a dead worker's messages come back whole, and the task store
/// skips the members that had finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_over_grouped_rabbitmq() {
    killed_worker(RABBIT, 8).await;
}

async fn killed_worker(broker: &str, group: usize) {
    let _slow = SLOW_MODEL.lock().await;
    let _up = rabbit_up(broker).await;
    let p = prefix();
    let mut cfg = broker_config(&p, 0, broker);
    cfg.tasks.amqp_group_max = group;
    let api = gateway_with(cfg).await;
    let http = reqwest::Client::new();
    let base = api.http_base();
    let before = rows_inferred("slow").await;
    let n = 40;
    // Submitted all at once, so that grouped submissions share messages.
    let submitted = futures::future::join_all((0..n).map(|k| {
        let (http, base) = (&http, &base);
        async move {
            // 150 ms per Triton execution of up to 8 rows: the run takes about a second.
            let body = json!({"parameters": {"delay_ms": 150},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [k]}]});
            submit(http, base, "slow", &body, None).await
        }
    }))
    .await;
    let mut ids = Vec::new();
    for (s, t) in submitted {
        assert_eq!(s, 202, "{t}");
        ids.push(t["id"].as_str().unwrap().to_string());
    }
    let log = std::env::temp_dir().join(format!("{p}-worker.log"));
    let spawn_worker = || {
        reaped(
            Command::new(env!("CARGO_BIN_EXE_infergate"))
                .args([
                    "worker",
                    "--triton-url",
                    &triton().grpc_url(),
                    "--broker",
                    broker,
                ])
                .args([
                    "--task-store",
                    REDIS,
                    "--redis-prefix",
                    &p,
                    "--visibility-timeout-ms",
                    "1500",
                ])
                .args([
                    "--workers",
                    "1",
                    "--worker-concurrency",
                    "8",
                    "--amqp-group-max",
                    &group.to_string(),
                    "--log-level",
                    "warn",
                ])
                .stdout(Stdio::null())
                .stderr(append_log(&log)),
        )
    };
    let mut doomed = spawn_worker();
    // Kill it once its first batch has finished, while the next ones are in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    let unfinished_at_kill = loop {
        let mut states = Vec::new();
        for id in &ids {
            states.push(
                task(&http, &base, id).await["status"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        if states.iter().any(|s| s == "succeeded") {
            signal(doomed.id(), "KILL"); // no chance to ack, release or clean up
            break states.iter().filter(|s| *s != "succeeded").count();
        }
        assert!(
            Instant::now() < deadline,
            "the first worker never finished a task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = doomed.wait();
    assert!(
        unfinished_at_kill >= 8,
        "the kill must leave work behind ({unfinished_at_kill} left)"
    );
    let mut rescuer = spawn_worker();
    let done = wait_final(&http, &base, &ids, Duration::from_secs(60)).await;
    let _ = rescuer.kill();
    let _ = rescuer.wait();
    let mut reclaimed = 0;
    for (k, t) in done.iter().enumerate() {
        assert_eq!(t["status"], "succeeded", "task {k}: {t}");
        assert_eq!(
            t["response"]["outputs"][0]["data"][0],
            json!(k as f64),
            "task {k}"
        );
        if t["attempts"].as_u64().unwrap() > 1 {
            reclaimed += 1;
        }
    }
    let ran = rows_inferred("slow").await - before;
    // Every task ran at least once; only those in flight at the kill (at most the dead
    // worker's concurrency of 8) may have run twice.
    assert!(
        ran >= n as u64 && ran <= n as u64 + 8,
        "Triton ran {ran} for {n} tasks"
    );
    println!(
        "{broker} (group {group}): {n} tasks, worker SIGKILLed with {unfinished_at_kill} unfinished: all succeeded, \
         {reclaimed} reclaimed from the dead worker, Triton ran {ran}"
    );
}

/// The latencies of the submissions refused during a broker outage: asserts there were some
/// and that the median came back within 1 s; returns (count, median, slowest).
fn prompt_refusals(mut refused: Vec<Duration>) -> (usize, Duration, Duration) {
    assert!(!refused.is_empty(), "the outage was not observed");
    refused.sort();
    let median = refused[refused.len() / 2];
    assert!(
        median < Duration::from_secs(1),
        "refusals took {median:?} (median) during the outage"
    );
    (refused.len(), median, refused[refused.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_task_completes_across_a_rabbitmq_restart() {
    let _onnx = ONNX_MODEL.lock().await;
    let _restart = RABBIT_UP.write().await;
    let p = prefix();
    let gw = gateway_with(broker_config(&p, 1, RABBIT)).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut stopped = None;
    for k in 0..300 {
        if k == 100 {
            stopped = Some(RabbitStopped::new());
        }
        if k == 150 {
            stopped.take().expect("stopped at 100").start();
        }
        let x = [k as f32, 0.0, 0.0, 0.0];
        let sent = std::time::Instant::now();
        let (s, t) = submit(&http, &base, "onnx_linear", &linear_body(x), None).await;
        match s {
            202 => accepted.push(t["id"].as_str().unwrap().to_string()),
            // While RabbitMQ is down nothing is accepted, and the client is told so.
            503 => refused.push(sent.elapsed()),
            other => panic!("unexpected status {other}: {t}"),
        }
    }
    // Refused promptly: not each submission waiting out reconnect attempts of its own
    // (5.1 s apiece before the publisher remembered that RabbitMQ was away).
    let (refused, median, slowest) = prompt_refusals(refused);
    let done = wait_final(&http, &base, &accepted, Duration::from_secs(120)).await;
    assert!(done.iter().all(|t| t["status"] == "succeeded"));
    println!(
        "RabbitMQ restart: {} accepted (all succeeded), {refused} refused with 503 \
         (median {median:?}, slowest {slowest:?})",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_task_completes_across_a_redis_restart() {
    let _onnx = ONNX_MODEL.lock().await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-redis-{port}"));
    let mut redis = PrivateRedis::start(port, &dir);
    let p = prefix();
    let mut cfg = broker_config(&p, 1, &redis.url());
    cfg.tasks.task_store = redis.url().parse().unwrap();
    let gw = gateway_with(cfg).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = gw.http_base();
    let before = rows_inferred("onnx_linear").await;
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    let mut down_since = None;
    for k in 0..300 {
        if k == 100 {
            redis.kill();
            down_since = Some(std::time::Instant::now());
        }
        // Down for at least 2 s of submissions, then back on the same port and files.
        if down_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            redis.restart();
            down_since = None;
        }
        let x = [k as f32, 1.0, 0.0, 0.0];
        let sent = std::time::Instant::now();
        let (s, t) = submit(&http, &base, "onnx_linear", &linear_body(x), None).await;
        match s {
            202 => accepted.push((t["id"].as_str().unwrap().to_string(), x)),
            // While Redis is down nothing is accepted, and the client is told so.
            503 => refused.push(sent.elapsed()),
            other => panic!("unexpected status {other}: {t}"),
        }
    }
    // Refused promptly, not after the Redis client's long reconnect series (8-11 s each with
    // its default of six retries).
    let (refused, median, slowest) = prompt_refusals(refused);
    assert!(down_since.is_none(), "Redis was restarted");
    let ids: Vec<String> = accepted.iter().map(|(id, _)| id.clone()).collect();
    let done = wait_final(&http, &base, &ids, Duration::from_secs(120)).await;
    for (t, (_, x)) in done.iter().zip(&accepted) {
        assert_eq!(t["status"], "succeeded", "{t}");
        let got: Vec<f64> = t["response"]["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(linear_expected(*x)) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
    }
    let ran = rows_inferred("onnx_linear").await - before;
    assert!(ran >= accepted.len() as u64);
    println!(
        "Redis restart (SIGKILL, AOF fsync always): {} accepted (all succeeded with the right \
         rows), {refused} refused with 503 while down (median {median:?}, slowest {slowest:?}); \
         Triton ran {ran} rows",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_store_outage_under_a_rabbitmq_worker_loses_nothing_and_does_not_spin() {
    let _onnx = ONNX_MODEL.lock().await;
    let _rabbit = rabbit_up(RABBIT).await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-store-{port}"));
    let mut store = PrivateRedis::start(port, &dir);
    let p = prefix();
    let mut cfg = broker_config(&p, 0, RABBIT);
    cfg.tasks.task_store = store.url().parse().unwrap();
    // An API process with no worker queues 2,000 tasks over RabbitMQ.
    let api = gateway_with(cfg.clone()).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = api.http_base();
    let n = 2_000;
    let accepted: Vec<(String, [f32; 4])> = futures::stream::iter(0..n)
        .map(|k| {
            let (http, base) = (&http, &base);
            async move {
                let x = [k as f32, 2.0, 0.0, 0.0];
                let (s, t) = submit(http, base, "onnx_linear", &linear_body(x), None).await;
                assert_eq!(s, 202, "{t}");
                (t["id"].as_str().unwrap().to_string(), x)
            }
        })
        .buffered(32)
        .collect()
        .await;
    // A worker starts, and the store goes away under it: the tasks it takes cannot start.
    let before = scrape(&http, &base).await["infergate_task_store_errors_total"];
    cfg.tasks.workers = 1;
    let conc = 8;
    cfg.tasks.worker_concurrency = conc;
    let worker = gateway_with(cfg).await;
    store.kill();
    let down = Duration::from_secs(4);
    tokio::time::sleep(down).await;
    let errors = scrape(&http, &base).await["infergate_task_store_errors_total"] - before;
    println!("store down {down:?}: {errors} tasks handed back");
    // Each task that fails a store write goes back: those running when the store went away
    // and one batch taken before a start failed (each at most `conc`). After that the worker
    // takes a single task per try, with a growing pause between tries (about 6 tries in 4 s),
    // so an outage is a handful of hand-backs more, not a batch per try (1,281 in 4 s with
    // 256 slots when it took a full batch each try).
    assert!(errors > 0.0, "the outage was not seen");
    let most = 2 * conc + 10;
    assert!(
        errors <= most as f64,
        "{errors} hand-backs in {down:?} (at most {most} with {conc} slots)"
    );
    // Back on the same port and files: every task completes, with the right rows.
    store.restart();
    let ids: Vec<String> = accepted.iter().map(|(id, _)| id.clone()).collect();
    let done = wait_final(&http, &base, &ids, Duration::from_secs(60)).await;
    for (t, (_, x)) in done.iter().zip(&accepted) {
        assert_eq!(t["status"], "succeeded", "{t}");
        let got = t["response"]["outputs"][0]["data"][0].as_f64().unwrap();
        assert!((got - linear_expected(*x)[0]).abs() < 1e-4, "{t}");
    }
    drop((worker, store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_task_service_submits_watches_and_cancels() {
    use infergate::proto::{
        inference::{ModelInferRequest, model_infer_request::InferInputTensor},
        tasks::{
            CancelRequest, GetRequest, SubmitRequest, TaskState, WatchRequest,
            task_service_client::TaskServiceClient,
        },
    };
    let gw = gateway().await; // memory broker and store, one worker inside
    let ch = tonic::transport::Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = TaskServiceClient::new(ch);
    let text = |s: &str| {
        let mut v = (s.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        bytes::Bytes::from(v)
    };
    let req = ModelInferRequest {
        model_name: "text_stats".into(),
        inputs: vec![InferInputTensor {
            name: "TEXT".into(),
            datatype: "BYTES".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![text("watch me")],
        ..Default::default()
    };
    let first = c
        .submit(SubmitRequest {
            callback_url: String::new(),
            request: Some(req.clone()),
            idempotency_key: "grpc-key-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state, TaskState::Queued as i32);
    assert!(!first.replayed);
    let again = c
        .submit(SubmitRequest {
            callback_url: String::new(),
            request: Some(req.clone()),
            idempotency_key: "grpc-key-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.id.as_str(), again.replayed),
        (first.id.as_str(), true)
    );

    let mut watch = c
        .watch(WatchRequest {
            id: first.id.clone(),
            responses: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    let mut last = None;
    while let Some(t) = watch.message().await.unwrap() {
        states.push(t.state);
        last = Some(t);
    }
    let last = last.unwrap();
    assert_eq!(
        last.state,
        TaskState::Succeeded as i32,
        "states seen: {states:?}"
    );
    let resp = last.response.unwrap();
    let upper = resp.outputs.iter().position(|o| o.name == "UPPER").unwrap();
    assert_eq!(resp.raw_output_contents[upper], text("WATCH ME"));

    let got = c
        .get(GetRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, TaskState::Succeeded as i32);
    let err = c
        .cancel(CancelRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = c.get(GetRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut bad = req.clone();
    bad.inputs[0].datatype = "FP32".into();
    let err = c
        .submit(SubmitRequest {
            callback_url: String::new(),
            request: Some(bad),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = c
        .submit(SubmitRequest {
            callback_url: String::new(),
            request: None,
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
