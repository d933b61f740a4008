//! The chaos figure, over each broker with the real Triton, Redis and RabbitMQ: 10,000 tasks
//! are submitted (at a steady rate, each with its own idempotency key, retried by the client
//! while the service says 503) while the worker process is SIGKILLed three times and the
//! broker is restarted once. Then: every task succeeded with its own answer, none was lost,
//! each key names one task (a resubmission of all 10,000 returns the same ids and runs
//! nothing), and Triton's row count is at least 10,000 and at most the attempts the store
//! counted, whose excess over 10,000 is what was in flight at the kills.
//!
//! Redis Streams: a private redis-server (AOF, fsync always) is broker and task store, and is
//! SIGKILLed and restarted on the same files. RabbitMQ: the machine's broker has its
//! application stopped and started (`rabbitmqctl`), the task store being the machine's Redis.
//! `loadtest/chaos.sh` runs this in a release build and keeps the output in `loadtest/results/`.

mod common;

use std::{
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};

const TASKS: usize = 10_000;
/// Submissions per second: 10,000 take 40 s, over which the faults are spread.
const RATE: f64 = 250.0;
const SUBMITTERS: usize = 16;
const WORKER_CONCURRENCY: usize = 32;
/// High enough that a task caught by several kills is not failed as "worker lost".
const MAX_ATTEMPTS: u32 = 6;

/// The two tests count `onnx_linear` rows: one at a time.
static ONNX_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn input(k: usize) -> [f32; 4] {
    [k as f32, 1.0, (k % 7) as f32, -1.0]
}

fn expected(x: [f32; 4]) -> Vec<f64> {
    onnx_linear_expected(x)
}

fn body(k: usize) -> Value {
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": input(k)}]})
}

/// Submits task `k` under its key until the service accepts it (202, or 202 replayed);
/// 503/429 and broken connections are retried. Returns the id.
async fn submit(http: &reqwest::Client, base: &str, k: usize, refused: &AtomicU64) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = http
            .post(format!("{base}/v1/models/onnx_linear/tasks"))
            .header("idempotency-key", format!("chaos-{k}"))
            .json(&body(k))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 202 => {
                let t: Value = r.json().await.unwrap();
                return t["id"].as_str().unwrap().to_string();
            }
            Ok(r) if r.status() == 503 || r.status() == 429 => {}
            Ok(r) => panic!("task {k}: {} {}", r.status(), r.text().await.unwrap()),
            Err(_) => {}
        }
        refused.fetch_add(1, Ordering::Relaxed);
        assert!(Instant::now() < deadline, "task {k} not accepted in 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Worker {
    broker: String,
    store: String,
    prefix: String,
    log: std::path::PathBuf,
    child: Child,
}

impl Worker {
    fn spawn(broker: &str, store: &str, prefix: &str, log: &std::path::Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args(["worker", "--triton-url", &triton().grpc_url()])
            .args(["--broker", broker, "--task-store", store])
            .args(["--redis-prefix", prefix, "--visibility-timeout-ms", "1500"])
            .args(["--workers", "1", "--log-level", "warn"])
            .args(["--worker-concurrency", &WORKER_CONCURRENCY.to_string()])
            .args(["--task-max-attempts", &MAX_ATTEMPTS.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(append_log(log))
            .spawn()
            .unwrap()
    }

    fn start(broker: &str, store: &str, prefix: &str) -> Self {
        let log = std::env::temp_dir().join(format!("{prefix}-worker.log"));
        Self {
            child: Self::spawn(broker, store, prefix, &log),
            broker: broker.into(),
            store: store.into(),
            prefix: prefix.into(),
            log,
        }
    }

    /// SIGKILL (no ack, no release, no cleanup), then a new worker process at once.
    fn kill_and_respawn(&mut self) {
        signal(self.child.id(), "KILL");
        let _ = self.child.wait();
        self.child = Self::spawn(&self.broker, &self.store, &self.prefix, &self.log);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the broker restart does: down at once, up again when the returned closure runs.
type Restart = Box<dyn FnOnce() -> Box<dyn FnOnce() + Send> + Send>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_through_worker_kills_and_a_redis_restart() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-chaos-redis-{port}"));
    let redis = Arc::new(std::sync::Mutex::new(PrivateRedis::start(port, &dir)));
    let url = format!("redis://127.0.0.1:{port}");
    let restart: Restart = {
        let redis = redis.clone();
        Box::new(move || {
            // SIGKILL: only what each write made durable (fsync always) survives.
            redis.lock().unwrap().kill();
            Box::new(move || redis.lock().unwrap().restart())
        })
    };
    chaos("Redis Streams", &url, &url, restart).await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_through_worker_kills_and_a_rabbitmq_restart() {
    let restart: Restart = Box::new(|| {
        let stopped = RabbitStopped::new();
        Box::new(move || stopped.start())
    });
    chaos("RabbitMQ", RABBIT, REDIS, restart).await;
}

async fn chaos(name: &str, broker: &str, store: &str, restart: Restart) {
    let _onnx = ONNX_MODEL.lock().await;
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = broker.parse().unwrap();
    cfg.tasks.task_store = store.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.clone();
    cfg.tasks.workers = 0;
    cfg.tasks.max_attempts = MAX_ATTEMPTS;
    cfg.tasks.visibility_timeout_ms = 1_500;
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let rows_before = triton_stats("onnx_linear").await.1;
    let mut worker = Worker::start(broker, store, &prefix);
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // The client: SUBMITTERS loops sharing one steady rate.
    let mut submitters = Vec::new();
    for part in 0..SUBMITTERS {
        let (http, base, refused) = (http.clone(), base.clone(), refused.clone());
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in (part..TASKS).step_by(SUBMITTERS) {
                let due = started + Duration::from_secs_f64(k as f64 / RATE);
                tokio::time::sleep_until(due.into()).await;
                ids.push((k, submit(&http, &base, k, &refused).await));
            }
            ids
        }));
    }

    // The faults, spread over the 40 s of submissions: kills at 6, 14 and 30 s; the broker
    // down from 20 s for about 3 s.
    let mut events = Vec::new();
    let at = |s: u64| tokio::time::sleep_until((started + Duration::from_secs(s)).into());
    for (i, when) in [6u64, 14].into_iter().enumerate() {
        at(when).await;
        worker.kill_and_respawn();
        events.push(format!(
            "{:.1} s: worker SIGKILLed ({} of 2 kills before the restart)",
            started.elapsed().as_secs_f64(),
            i + 1
        ));
    }
    at(20).await;
    let down_at = started.elapsed();
    let up = tokio::task::spawn_blocking(restart).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(up).await.unwrap();
    events.push(format!(
        "{:.1} s: {name} down, back at {:.1} s",
        down_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    at(30).await;
    worker.kill_and_respawn();
    events.push(format!(
        "{:.1} s: worker SIGKILLed (3rd)",
        started.elapsed().as_secs_f64()
    ));

    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await.unwrap());
    }
    ids.sort();
    let submitted = started.elapsed();
    let only: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    let done = wait_final(&http, &base, &only, Duration::from_secs(300)).await;
    let finished = started.elapsed();

    // 0 lost, every answer the task's own.
    let mut attempts = 0u64;
    let mut retried = 0;
    for ((k, id), t) in ids.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "task {k} ({id}): {t}");
        let y: Vec<f64> = t["response"]["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (a, b) in y.iter().zip(expected(input(*k))) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "task {k}: {y:?}");
        }
        let n = t["attempts"].as_u64().unwrap();
        attempts += n;
        retried += usize::from(n > 1);
    }
    let mut unique = only.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), TASKS, "a key was given two tasks");
    let rows = quiet_stats("onnx_linear").await.1 - rows_before;

    // 0 duplicate visible results: every key, submitted again, names the same task, and
    // nothing more runs.
    let again = Arc::new(AtomicU64::new(0));
    let mut resubmitters = Vec::new();
    for part in 0..SUBMITTERS {
        let (http, base, again) = (http.clone(), base.clone(), again.clone());
        let mine: Vec<(usize, String)> = ids
            .iter()
            .filter(|(k, _)| k % SUBMITTERS == part)
            .cloned()
            .collect();
        resubmitters.push(tokio::spawn(async move {
            for (k, id) in mine {
                assert_eq!(submit(&http, &base, k, &again).await, id, "task {k}");
            }
        }));
    }
    for r in resubmitters {
        r.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        triton_stats("onnx_linear").await.1 - rows_before,
        rows,
        "a resubmission ran again"
    );

    // Triton ran each task once, plus at most the attempts the kills and the restart cut
    // short (each attempt is counted by the store when a worker starts it).
    let extra_attempts = attempts - TASKS as u64;
    assert!(
        rows >= TASKS as u64 && rows <= attempts,
        "Triton ran {rows} rows for {TASKS} tasks and {attempts} attempts"
    );
    assert!(
        extra_attempts <= 4 * WORKER_CONCURRENCY as u64,
        "{extra_attempts} attempts beyond one per task: more than was in flight"
    );
    let lines = [
        format!("chaos over {name}: {TASKS} tasks submitted at {RATE}/s by {SUBMITTERS} clients"),
        events.join("; "),
        format!(
            "submissions refused while the broker was down (503 or no answer, retried with the same key): {}",
            refused.load(Ordering::Relaxed)
        ),
        format!(
            "all submitted after {:.1} s; all final after {:.1} s",
            submitted.as_secs_f64(),
            finished.as_secs_f64()
        ),
        format!(
            "succeeded {TASKS}, lost 0, other states 0; {retried} tasks ran more than one attempt, \
             {attempts} attempts in all"
        ),
        format!(
            "Triton rows {rows} = {TASKS} + {} re-run (bound: attempts beyond one per task, {extra_attempts}; \
             worker concurrency {WORKER_CONCURRENCY})",
            rows - TASKS as u64
        ),
        format!("resubmitted {TASKS} keys: same ids, 0 duplicates, 0 new Triton rows"),
    ];
    println!("{}", lines.join("\n"));
    gw.shutdown().await.unwrap();
}
