//! Dead letters an operator can act on, end to end against the real Triton, Redis and
//! RabbitMQ: a model made to fail fills the dead letters, the admin API (HTTP and gRPC, admin
//! keys only) lists and reads them with their attempt history, and once the model is fixed a
//! replay by filter runs each task once more under its own id. Also: a task whose worker
//! process dies on it every time is attempted exactly `max_attempts` times across worker
//! restarts, then fails as "worker lost" and is dead-lettered, while the other tasks succeed;
//! and a stalled worker's late result is refused.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use infergate::{
    config::{ApiKey, Config},
    proto::tasks::{DeadLetterFilter, GetRequest, task_admin_client::TaskAdminClient},
};
use serde_json::{Value, json};

const FLAKY_CONTROL: &str = "/tmp/infergate-flaky-control";
const TENANT_KEY: &str = "tenant-a-key-0123456789";
const ADMIN_KEY: &str = "operator-key-0123456789";

/// Tests that count the `slow` model's executions, or hold its one instance for seconds, run
/// one at a time.
static SLOW_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix() -> String {
    format!("igtest-{}", infergate::tasks::new_task_id())
}

/// Tasks kept in Redis, carried by `broker`, `max_attempts` each.
fn config(prefix: &str, broker: &str, workers: usize, max_attempts: u32) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = broker.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.into();
    cfg.tasks.workers = workers;
    cfg.tasks.max_attempts = max_attempts;
    cfg.tasks.visibility_timeout_ms = 1_500;
    cfg
}

fn client(key: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("x-api-key", key.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

fn one(x: f32, delay: Value) -> Value {
    json!({"parameters": {"delay_ms": delay},
        "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [x]}]})
}

async fn submit(http: &reqwest::Client, base: &str, model: &str, body: &Value) -> String {
    let r = http
        .post(format!("{base}/v1/models/{model}/tasks"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn outcomes(task: &Value) -> Vec<String> {
    task["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|a| a["outcome"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_model_fills_the_dead_letters_and_a_replay_by_filter_runs_each_once() {
    std::fs::write(FLAKY_CONTROL, "fail").unwrap();
    let p = prefix();
    let mut cfg = config(&p, RABBIT, 1, 2);
    cfg.auth.keys = vec![
        ApiKey {
            key: TENANT_KEY.into(),
            tenant: "a".into(),
            ..Default::default()
        },
        ApiKey {
            key: ADMIN_KEY.into(),
            tenant: "ops".into(),
            admin: true,
            ..Default::default()
        },
    ];
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let (user, admin) = (client(TENANT_KEY), client(ADMIN_KEY));
    let n = 6;
    let mut flaky = Vec::new();
    for k in 0..n {
        flaky.push(submit(&user, &base, "flaky", &one(k as f32, json!(0))).await);
    }
    // Another model's poison (the slow model parses `delay_ms` as an integer): dead letters
    // the filter must leave alone.
    let mut other = Vec::new();
    for k in 0..2 {
        other.push(submit(&user, &base, "slow", &one(k as f32, json!("x"))).await);
    }
    let all: Vec<String> = flaky.iter().chain(&other).cloned().collect();
    let failed = wait_final(&user, &base, &all, Duration::from_secs(60)).await;
    for t in &failed {
        assert_eq!(t["status"], "failed", "{t}");
        assert_eq!(t["attempts"], 2, "{t}");
        assert_eq!(outcomes(t), ["retried", "failed"], "{t}");
    }

    // Tenants other than admins do not see the admin API, over HTTP or gRPC.
    let dead_url = format!("{base}/v1/admin/dead-letters");
    assert_eq!(get(&user, &dead_url).await.0, 404);
    let ch = tonic::transport::Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = TaskAdminClient::new(ch);
    let with_key = |key: &str, filter: DeadLetterFilter| {
        let mut r = tonic::Request::new(filter);
        r.metadata_mut().insert("x-api-key", key.parse().unwrap());
        r
    };
    let flaky_filter = DeadLetterFilter {
        model: "flaky".into(),
        ..Default::default()
    };
    let refused = grpc
        .list_dead_letters(with_key(TENANT_KEY, flaky_filter.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // The admin lists them by model (oldest first), reads one with its history.
    let (status, list) = get(&admin, &format!("{dead_url}?model=flaky")).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["depth"], 8);
    let listed: Vec<&str> = list["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = flaky.iter().map(String::as_str).collect();
    let mut got = listed.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let (status, one_dead) = get(&admin, &format!("{dead_url}/{}", flaky[0])).await;
    assert_eq!(status, 200);
    assert_eq!(one_dead["tenant"], "a");
    assert_eq!(outcomes(&one_dead), ["retried", "failed"]);
    assert!(
        one_dead["reason"]
            .as_str()
            .unwrap()
            .contains("failing on purpose"),
        "{one_dead}"
    );
    let by_grpc = grpc
        .list_dead_letters(with_key(ADMIN_KEY, flaky_filter.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_grpc.depth, by_grpc.dead_letters.len()), (8, n));
    let mut r = tonic::Request::new(GetRequest {
        id: flaky[1].clone(),
    });
    r.metadata_mut()
        .insert("x-api-key", ADMIN_KEY.parse().unwrap());
    let d = grpc.get_dead_letter(r).await.unwrap().into_inner();
    assert_eq!(d.task.unwrap().history.len(), 2);

    // A replay must say what it is about.
    let (status, e) = post(&admin, &format!("{dead_url}/replay"), &json!({})).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = post(
        &admin,
        &format!("{dead_url}/replay"),
        &json!({"modle": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("modle"), "{e}");

    // Fixed, then replayed by filter: each runs once more and succeeds, under its own id.
    std::fs::remove_file(FLAKY_CONTROL).unwrap();
    let before = quiet_stats("flaky").await.0;
    let (status, out) = post(
        &admin,
        &format!("{dead_url}/replay"),
        &json!({"model": "flaky"}),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["replayed"].as_array().unwrap().len(), n, "{out}");
    assert_eq!(out["refused"].as_array().unwrap().len(), 0, "{out}");
    let done = wait_final(&user, &base, &flaky, Duration::from_secs(60)).await;
    for (k, t) in done.iter().enumerate() {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["response"]["outputs"][0]["data"][0], json!(k as f64));
        assert_eq!(t["attempts"], 1);
        assert_eq!(
            outcomes(t),
            ["retried", "failed", "replayed", "succeeded"],
            "{t}"
        );
    }
    let ran = quiet_stats("flaky").await.0 - before;
    assert_eq!(ran, n as u64, "each replayed task ran once");
    // Nothing left to replay; a task no longer in the dead letters is refused by id.
    let (_, again) = post(
        &admin,
        &format!("{dead_url}/replay"),
        &json!({"model": "flaky"}),
    )
    .await;
    assert_eq!(again["replayed"].as_array().unwrap().len(), 0, "{again}");
    let (_, again) = post(
        &admin,
        &format!("{dead_url}/replay"),
        &json!({"ids": [flaky[0]]}),
    )
    .await;
    assert_eq!(again["refused"][0]["id"], flaky[0].as_str(), "{again}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(quiet_stats("flaky").await.0 - before, n as u64);

    // The other model's dead letters stayed; a purge by filter removes them.
    let (_, list) = get(&admin, &dead_url).await;
    assert_eq!(list["depth"], 2, "{list}");
    let (status, purged) = post(
        &admin,
        &format!("{dead_url}/purge"),
        &json!({"model": "slow"}),
    )
    .await;
    assert_eq!((status, purged["purged"].as_u64()), (200, Some(2)));
    let m = scrape(&reqwest::Client::new(), &base).await;
    assert_eq!(m.get("infergate_task_dead_letters").copied(), Some(0.0));
    assert!(
        m.get("infergate_task_replays_total")
            .copied()
            .unwrap_or(0.0)
            >= n as f64
    );
    println!(
        "poison model: {n} tasks failed twice each and were dead-lettered (depth 8 with 2 of another model); \
         fixed, a replay by model ran each once ({ran} Triton executions), all succeeded with history \
         retried, failed, replayed, succeeded"
    );
}

/// An `infergate worker` process of its own, so it can be killed like a real pod.
struct WorkerProcess {
    child: Child,
    ops_port: u16,
}

impl WorkerProcess {
    fn start(prefix: &str, broker: &str, max_attempts: u32) -> Self {
        let ops_port = free_port();
        let log = std::env::temp_dir().join(format!("{prefix}-worker.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args(["worker", "--triton-url", &triton().grpc_url()])
            .args(["--broker", broker, "--task-store", REDIS])
            .args(["--redis-prefix", prefix, "--visibility-timeout-ms", "1500"])
            .args(["--task-max-attempts", &max_attempts.to_string()])
            .args(["--workers", "1", "--worker-concurrency", "8"])
            .args(["--http-addr", &format!("127.0.0.1:{ops_port}")])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(append_log(&log))
            .spawn()
            .unwrap();
        Self { child, ops_port }
    }

    /// SIGKILL: no chance to answer, ack, or hand anything back.
    fn kill(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the task until `ok` holds for it (at most `limit`).
async fn until(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    limit: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let t = task(http, base, id).await;
        if ok(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "waited {limit:?}; task now {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn linear(x: f32) -> Value {
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [x, 0, 0, 0]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_worker_is_dead_lettered_as_worker_lost_over_redis() {
    task_kills_its_worker(REDIS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_worker_is_dead_lettered_as_worker_lost_over_rabbitmq() {
    task_kills_its_worker(RABBIT).await;
}

/// The poison task runs for 4 s, longer than the Redis lease (1.5 s, renewed while it runs);
/// its worker process is SIGKILLed while it runs, three times, as a task that aborts or
/// exhausts its worker's memory would. Meanwhile 30 other tasks are submitted.
async fn task_kills_its_worker(broker: &str) {
    const MAX_ATTEMPTS: u32 = 3;
    let _slow = SLOW_MODEL.lock().await;
    let p = prefix();
    let gw = gateway_with(config(&p, broker, 0, MAX_ATTEMPTS)).await;
    let base = gw.http_base();
    let http = reqwest::Client::new();
    let slow_before = triton_stats("slow").await.1;
    let poison = submit(&http, &base, "slow", &one(-1.0, json!(4000))).await;
    let others = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..30 {
                ids.push(submit(&http, &base, "onnx_linear", &linear(k as f32)).await);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ids
        })
    };
    let mut worker = WorkerProcess::start(&p, broker, MAX_ATTEMPTS);
    for attempt in 1..=MAX_ATTEMPTS {
        until(&http, &base, &poison, Duration::from_secs(30), |t| {
            t["status"] == "running" && t["attempts"] == attempt
        })
        .await;
        // Long enough for the other tasks started with it to finish, well short of its 4 s.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = task(&http, &base, &poison).await;
        assert_eq!(
            (t["status"].as_str(), t["attempts"].as_u64()),
            (Some("running"), Some(u64::from(attempt))),
            "the poison task is still on its attempt when its worker dies: {t}"
        );
        worker.kill();
        worker = WorkerProcess::start(&p, broker, MAX_ATTEMPTS);
    }
    let ids = others.await.unwrap();
    let mut all = ids.clone();
    all.push(poison.clone());
    let done = wait_final(&http, &base, &all, Duration::from_secs(60)).await;
    let lost = done.last().unwrap();
    assert_eq!(lost["status"], "failed", "{lost}");
    assert_eq!(lost["attempts"], MAX_ATTEMPTS, "{lost}");
    let message = lost["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("worker lost"), "{message}");
    assert_eq!(
        outcomes(lost),
        ["worker lost", "worker lost", "failed"],
        "{lost}"
    );
    let mut retried = 0;
    for (k, t) in done[..ids.len()].iter().enumerate() {
        assert_eq!(t["status"], "succeeded", "task {k}: {t}");
        let want = 0.5 + 0.1 * k as f64;
        let got = t["response"]["outputs"][0]["data"][0].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "task {k}: {got} != {want}");
        retried += usize::from(t["attempts"].as_u64().unwrap() > 1);
    }
    // The dead letters hold it, with why.
    let (status, dead) = get(&http, &format!("{base}/v1/admin/dead-letters/{poison}")).await;
    assert_eq!(status, 200, "{dead}");
    assert!(
        dead["reason"].as_str().unwrap().contains("worker lost"),
        "{dead}"
    );
    // Triton ran the poison at most once per attempt: no lapse of the lease handed a live
    // worker's task to another, and no fourth run. (Triton drops a request whose caller went
    // away before it started, so a kill may leave an attempt unexecuted.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let poison_runs = triton_stats("slow").await.1 - slow_before;
    assert!(
        (1..=u64::from(MAX_ATTEMPTS)).contains(&poison_runs),
        "slow model rows: {poison_runs}"
    );
    drop(worker);
    println!(
        "{broker}: the poison task's worker was SIGKILLed {MAX_ATTEMPTS} times; it ran {poison_runs} times, \
         failed as '{message}' and was dead-lettered; the {} others all succeeded ({retried} of them \
         run again after a kill)",
        ids.len()
    );
}

/// A worker stalled (SIGSTOP) past its lease loses the task to another; when it resumes, the
/// result it then writes is refused (fenced by the attempt number) and the newer attempt's
/// stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_workers_late_result_is_refused() {
    let _slow = SLOW_MODEL.lock().await;
    let p = prefix();
    let gw = gateway_with(config(&p, REDIS, 0, 3)).await;
    let base = gw.http_base();
    let http = reqwest::Client::new();
    let id = submit(&http, &base, "slow", &one(5.0, json!(2000))).await;
    let stalled = WorkerProcess::start(&p, REDIS, 3);
    until(&http, &base, &id, Duration::from_secs(30), |t| {
        t["status"] == "running" && t["attempts"] == 1
    })
    .await;
    // "running" is written just before the call leaves for Triton. Stopped in between (seen
    // once in .ci/run), the worker sent its call only after it resumed, queued behind the
    // rescuer's on the one `slow` instance, and wrote when the task was already final (a
    // conflict, not a fenced write). 300 ms in, the 2,000 ms call is surely in Triton.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(stalled.child.id(), "STOP");
    let _rescuer = WorkerProcess::start(&p, REDIS, 3);
    until(&http, &base, &id, Duration::from_secs(30), |t| {
        t["attempts"] == 2
    })
    .await;
    // The stalled worker's Triton call has finished meanwhile: resumed, it writes its result.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(stalled.child.id(), "CONT");
    let ops = format!("http://127.0.0.1:{}", stalled.ops_port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let fenced = loop {
        if let Ok(r) = http.get(format!("{ops}/metrics")).send().await {
            let m = series(&r.text().await.unwrap());
            let fenced = m.get("infergate_task_fenced_total").copied().unwrap_or(0.0);
            if fenced > 0.0 {
                break fenced;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stalled worker never wrote its result"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done = wait_final(
        &http,
        &base,
        std::slice::from_ref(&id),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(done[0]["attempts"], 2);
    assert_eq!(
        outcomes(&done[0]),
        ["worker lost", "succeeded"],
        "{}",
        done[0]
    );
    println!(
        "stalled worker: its late result was refused ({fenced} fenced write), attempt 2's stands"
    );
}
