//! The fault matrix: six faults of infergate's dependencies, each under a steady mix of the
//! operations clients and operators use (submit with an idempotency key, poll, cancel, the
//! dead-letter list and a replay, sync inference, answers from the response cache kept in
//! Redis, completion webhooks, the autoscaler's answer), against the real Redis, RabbitMQ and
//! Triton, with no restart of infergate:
//!
//! | fault | how |
//! |---|---|
//! | Redis SIGKILL + restart | a private redis-server (AOF, fsync always) killed, back 3 s later on its files |
//! | Redis restarted empty | killed, its files removed, back 3 s later with nothing |
//! | Redis paused | SIGSTOP for 10 s, then SIGCONT |
//! | RabbitMQ restart | `rabbitmqctl stop_app`, `start_app` 3 s later |
//! | RabbitMQ queue deleted | `rabbitmqctl delete_queue` of the task queue under the workers |
//! | Triton SIGKILL + restart | the tritonserver process killed, started again 3 s later |
//!
//! For each: the errors each operation saw while the dependency was away, the seconds from its
//! return to the last error, and the accepted tasks that were lost or answered wrongly. For the
//! cache an error is an answer not served from it (the answer itself must still be right); for
//! a webhook, a task accepted then whose delivery never reached the receiver. Every
//! operation must recover within 10 s of the return; no accepted task may be lost or wrong.
//! Restarted empty, the tasks Redis held are gone with it: that is reported (a count, and
//! infergate's `task_store_data_loss` metric), and tasks accepted after it run again.
//! `loadtest/faults.sh` keeps the table in `loadtest/results/`.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use infergate::proto::externalscaler::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    RedisKilled,
    RedisEmptied,
    RedisPaused,
    RabbitRestarted,
    RabbitQueueDeleted,
    TritonKilled,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::RedisKilled => "Redis SIGKILL + restart (AOF)",
            Fault::RedisEmptied => "Redis restarted without its data",
            Fault::RedisPaused => "Redis paused (SIGSTOP) 10 s",
            Fault::RabbitRestarted => "RabbitMQ stop_app/start_app",
            Fault::RabbitQueueDeleted => "RabbitMQ task queue deleted",
            Fault::TritonKilled => "Triton SIGKILL + restart",
        }
    }

    fn rabbit(self) -> bool {
        matches!(self, Fault::RabbitRestarted | Fault::RabbitQueueDeleted)
    }
}

const OPS: [&str; 9] = [
    "submit",
    "poll",
    "cancel",
    "dead letters",
    "replay",
    "sync infer",
    "cache",
    "webhook",
    "scaler",
];

/// The response cache's routes file: onnx_linear answers kept a minute.
const ROUTES: &str = "[cache.onnx_linear]\nttl_ms = 60000\n";
/// The requests the cache loop repeats (sync inference sends each input once: never a hit).
const CACHED: [f32; 4] = [-1000.0, -1001.0, -1002.0, -1003.0];

/// What one operation saw: (when, answered as it should).
type Seen = Arc<Mutex<HashMap<&'static str, Vec<(Instant, bool)>>>>;

/// A task the client was told was accepted.
#[derive(Clone)]
struct Accepted {
    id: String,
    x: f32,
    at: Instant,
    cancel_asked: bool,
    /// Submitted with a callback URL: its completion must reach the receiver.
    hook: bool,
}

fn input(x: f32) -> [f32; 4] {
    [x, 1.0, 0.0, -1.0]
}

fn expected(x: f32) -> Vec<f64> {
    onnx_linear_expected(input(x))
}

fn right(data: &Value, x: f32) -> bool {
    let Some(y) = data.as_array() else {
        return false;
    };
    y.len() == 3
        && y.iter()
            .zip(expected(x))
            .all(|(a, b)| a.as_f64().is_some_and(|a| (a - b).abs() < 1e-3))
}

fn body(x: f32) -> Value {
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": input(x)}]})
}

/// What each load loop shares: the client, where it records what it saw, what was accepted.
#[derive(Clone)]
struct Driver {
    http: reqwest::Client,
    base: String,
    stop: CancellationToken,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    seen: Seen,
}

impl Driver {
    /// Records one operation's outcome, now.
    fn note(&self) -> impl Fn(&'static str, bool) + Clone + Send + 'static {
        let seen = Arc::clone(&self.seen);
        move |op, ok| {
            seen.lock()
                .unwrap()
                .entry(op)
                .or_default()
                .push((Instant::now(), ok));
        }
    }
}

/// One row of the figure.
struct Row {
    fault: Fault,
    errors: Vec<(&'static str, usize)>,
    recovered_s: f64,
    accepted: usize,
    lost: usize,
    wrong: usize,
    gone_with_data: usize,
    /// Webhooks owed by finished tasks that never reached the receiver.
    undelivered: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_recovers_within_ten_seconds_and_loses_no_accepted_task() {
    let mut rows = Vec::new();
    for fault in [
        Fault::RedisKilled,
        Fault::RedisEmptied,
        Fault::RedisPaused,
        Fault::RabbitRestarted,
        Fault::RabbitQueueDeleted,
        Fault::TritonKilled,
    ] {
        let r = run(fault).await;
        println!(
            "{}: errors {:?}, recovered {:.1} s after the return, {} accepted, {} lost, {} wrong, {} gone with the data, {} webhooks undelivered",
            fault.name(),
            r.errors,
            r.recovered_s,
            r.accepted,
            r.lost,
            r.wrong,
            r.gone_with_data,
            r.undelivered
        );
        rows.push(r);
    }
    let mut table = vec![
        "| fault | errors while it lasted (by operation) | recovered (s after its return) | accepted | lost | wrong | gone with the store's data | webhooks undelivered |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for r in &rows {
        let errors: Vec<String> = r
            .errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        table.push(format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            r.fault.name(),
            if errors.is_empty() {
                "none".into()
            } else {
                errors.join(", ")
            },
            r.recovered_s,
            r.accepted,
            r.lost,
            r.wrong,
            r.gone_with_data,
            r.undelivered
        ));
    }
    println!("{}", table.join("\n"));
    for r in &rows {
        assert_eq!(r.lost, 0, "{}: accepted tasks lost", r.fault.name());
        assert_eq!(r.wrong, 0, "{}: wrong answers", r.fault.name());
        assert_eq!(
            r.undelivered,
            0,
            "{}: webhooks never delivered",
            r.fault.name()
        );
        assert!(
            r.recovered_s <= 10.0,
            "{}: an operation failed {:.1} s after the dependency was back",
            r.fault.name(),
            r.recovered_s
        );
    }
}

async fn run(fault: Fault) -> Row {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-matrix-{port}"));
    let mut redis = PrivateRedis::start(port, &dir);
    let own_triton = (fault == Fault::TritonKilled).then(|| Triton::start(None, &[]));
    let triton_url = own_triton
        .as_ref()
        .map_or_else(|| triton().grpc_url(), Triton::grpc_url);
    let prefix = format!("igmatrix-{}", infergate::tasks::new_task_id());
    let mut cfg = test_config(vec![triton_url]);
    cfg.tasks.broker = if fault.rabbit() {
        RABBIT.parse().unwrap()
    } else {
        redis.url().parse().unwrap()
    };
    cfg.tasks.task_store = redis.url().parse().unwrap();
    cfg.tasks.redis_prefix = prefix.clone();
    cfg.tasks.workers = 1;
    cfg.tasks.visibility_timeout_ms = 2_000;
    cfg.tasks.publish_timeout_ms = 1_000;
    cfg.tasks.outbox_sweep_ms = 200;
    cfg.triton.health_interval_ms = 500;
    let scaler_port = free_port();
    cfg.scaler.addr = Some(format!("127.0.0.1:{scaler_port}").parse().unwrap());
    // The response cache in the same Redis; webhooks to a receiver in this test.
    std::fs::create_dir_all(&dir).unwrap();
    let routes = dir.join("routes.toml");
    std::fs::write(&routes, ROUTES).unwrap();
    cfg.routes.file = Some(routes);
    cfg.cache.redis = Some(redis.url());
    cfg.webhooks.allow_hosts = vec!["127.0.0.1".into()];
    cfg.webhooks.secret = Some("the-matrix-secret-0123".into());
    cfg.webhooks.max_backoff_ms = 1_000;
    cfg.webhooks.timeout_ms = 1_000;
    let hooks = HookReceiver::start().await;
    let hook_url = format!("http://127.0.0.1:{}/hook", hooks.port);
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // The cache holds its answers before the steady load starts.
    for x in CACHED {
        let r = http
            .post(format!("{base}/v2/models/onnx_linear/infer"))
            .json(&body(x))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let seen: Seen = Arc::default();
    let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::default();
    let cache_wrong: Arc<Mutex<usize>> = Arc::default();
    let stop = CancellationToken::new();
    let d = Driver {
        http: http.clone(),
        base: base.clone(),
        stop: stop.clone(),
        accepted: Arc::clone(&accepted),
        seen: Arc::clone(&seen),
    };
    let mut load = Vec::new();
    // Submissions: a new key each 100 ms; a refused key is tried again (the client's retry).
    {
        let Driver {
            http,
            base,
            stop,
            accepted,
            ..
        } = d.clone();
        let note = d.note();
        load.push(tokio::spawn(async move {
            let mut next = 0u32;
            let mut refused: Vec<u32> = Vec::new();
            while !stop.is_cancelled() {
                let k = refused.pop().unwrap_or_else(|| {
                    next += 1;
                    next
                });
                let x = k as f32;
                let mut req = http
                    .post(format!("{base}/v1/models/onnx_linear/tasks"))
                    .header("idempotency-key", format!("matrix-{k}"))
                    .json(&body(x));
                // One in three asks for a completion webhook.
                if k.is_multiple_of(3) {
                    req = req.header("callback-url", &hook_url);
                }
                let r = req.send().await;
                let id = match r {
                    Ok(r) if r.status() == 202 => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|t| t["id"].as_str().map(String::from)),
                    _ => None,
                };
                note("submit", id.is_some());
                match id {
                    Some(id) => {
                        let mut a = accepted.lock().unwrap();
                        if !a.iter().any(|t| t.id == id) {
                            a.push(Accepted {
                                id,
                                x,
                                at: Instant::now(),
                                cancel_asked: false,
                                hook: k.is_multiple_of(3),
                            });
                        }
                    }
                    None => refused.push(k),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Polls of the latest accepted task, and cancels of one in five.
    {
        let Driver {
            http,
            base,
            stop,
            accepted,
            ..
        } = d.clone();
        let note = d.note();
        load.push(tokio::spawn(async move {
            let mut tick = 0u64;
            while !stop.is_cancelled() {
                tick += 1;
                let last = accepted.lock().unwrap().last().cloned();
                if let Some(t) = last {
                    let r = http.get(format!("{base}/v1/tasks/{}", t.id)).send().await;
                    note("poll", r.is_ok_and(|r| r.status() == 200));
                    if tick.is_multiple_of(5) {
                        let r = http
                            .delete(format!("{base}/v1/tasks/{}", t.id))
                            .send()
                            .await;
                        let ok = r.is_ok_and(|r| r.status() == 200 || r.status() == 409);
                        note("cancel", ok);
                        let mut a = accepted.lock().unwrap();
                        if let Some(t) = a.iter_mut().find(|a| a.id == t.id) {
                            t.cancel_asked = true;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // The operator's dead-letter list.
    {
        let Driver {
            http, base, stop, ..
        } = d.clone();
        let note = d.note();
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = http
                    .get(format!("{base}/v1/admin/dead-letters"))
                    .send()
                    .await;
                note("dead letters", r.is_ok_and(|r| r.status() == 200));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    // Sync inference, its answer checked.
    {
        let Driver {
            http, base, stop, ..
        } = d.clone();
        let note = d.note();
        load.push(tokio::spawn(async move {
            let mut k = 0u32;
            while !stop.is_cancelled() {
                k += 1;
                let x = k as f32;
                let r = http
                    .post(format!("{base}/v2/models/onnx_linear/infer"))
                    .json(&body(x))
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| right(&v["outputs"][0]["data"], x)),
                    _ => false,
                };
                note("sync infer", ok);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // Answers from the cache: right, and served from it (its `infergate-cache` header).
    {
        let Driver {
            http, base, stop, ..
        } = d.clone();
        let (note, wrong) = (d.note(), Arc::clone(&cache_wrong));
        load.push(tokio::spawn(async move {
            let mut k = 0usize;
            while !stop.is_cancelled() {
                k += 1;
                let x = CACHED[k % CACHED.len()];
                let r = http
                    .post(format!("{base}/v2/models/onnx_linear/infer"))
                    .json(&body(x))
                    .send()
                    .await;
                let hit = match r {
                    Ok(r) if r.status() == 200 => {
                        let hit = r.headers().contains_key("infergate-cache");
                        match r.json::<Value>().await {
                            Ok(v) if right(&v["outputs"][0]["data"], x) => hit,
                            _ => {
                                *wrong.lock().unwrap() += 1;
                                false
                            }
                        }
                    }
                    _ => false,
                };
                note("cache", hit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Poison tasks (the slow model refuses a `delay_ms` that is no number) feed the dead
    // letters; the operator replays the oldest one by id.
    {
        let Driver {
            http, base, stop, ..
        } = d.clone();
        let note = d.note();
        load.push(tokio::spawn(async move {
            let poison = json!({"parameters": {"delay_ms": "x"},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]});
            let (mut tick, mut last) = (0u64, None::<String>);
            while !stop.is_cancelled() {
                tick += 1;
                if tick.is_multiple_of(4) {
                    let _ = http
                        .post(format!("{base}/v1/models/slow/tasks"))
                        .json(&poison)
                        .send()
                        .await;
                }
                let listed = http
                    .get(format!("{base}/v1/admin/dead-letters?limit=1"))
                    .send()
                    .await;
                // While the list fails, the replay is tried on the id listed last (one no
                // longer dead-lettered is answered 200 with it under `refused`).
                if let Ok(r) = listed
                    && r.status() == 200
                    && let Ok(v) = r.json::<Value>().await
                    && let Some(id) = v["dead_letters"][0]["id"].as_str()
                {
                    last = Some(id.to_string());
                }
                if let Some(id) = &last {
                    let r = http
                        .post(format!("{base}/v1/admin/dead-letters/replay"))
                        .json(&json!({"ids": [id]}))
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status() == 200 => r.json::<Value>().await.is_ok_and(|v| {
                            let n = |k: &str| v[k].as_array().map_or(0, Vec::len);
                            n("replayed") + n("refused") == 1
                        }),
                        _ => false,
                    };
                    note("replay", ok);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }
    // KEDA asking the scaler.
    {
        let (stop, note) = (stop.clone(), d.note());
        load.push(tokio::spawn(async move {
            let object = ScaledObjectRef {
                name: "matrix".into(),
                namespace: "gpu".into(),
                scaler_metadata: HashMap::from([("models".into(), "onnx_linear".into())]),
            };
            let mut keda = None;
            while !stop.is_cancelled() {
                if keda.is_none() {
                    keda = ExternalScalerClient::connect(format!("http://127.0.0.1:{scaler_port}"))
                        .await
                        .ok();
                }
                let ok = match keda.as_mut() {
                    Some(c) => {
                        let mut req = tonic::Request::new(GetMetricsRequest {
                            scaled_object_ref: Some(object.clone()),
                            metric_name: String::new(),
                        });
                        req.set_timeout(Duration::from_secs(2));
                        c.get_metrics(req).await.is_ok()
                    }
                    None => false,
                };
                note("scaler", ok);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    // Steady first; then the fault, and the dependency back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rabbit_stopped = None;
    let mut triton = own_triton;
    let down = Instant::now();
    match fault {
        Fault::RedisKilled | Fault::RedisEmptied => redis.kill(),
        Fault::RedisPaused => signal(redis.pid(), "STOP"),
        Fault::RabbitRestarted => {
            rabbit_stopped = Some(
                tokio::task::spawn_blocking(RabbitStopped::new)
                    .await
                    .unwrap(),
            )
        }
        Fault::RabbitQueueDeleted => {
            let queue = format!("{prefix}.tasks");
            tokio::task::spawn_blocking(move || {
                let ok = std::process::Command::new("rabbitmqctl")
                    .args(["delete_queue", &queue])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "rabbitmqctl delete_queue {queue}");
            })
            .await
            .unwrap();
        }
        Fault::TritonKilled => {
            let grpc = triton.as_ref().unwrap().grpc_port;
            let ok = std::process::Command::new("pkill")
                .args([
                    "-KILL",
                    "-f",
                    "--",
                    &format!("tritonserver.*--grpc-port={grpc}"),
                ])
                .status()
                .unwrap()
                .success();
            assert!(ok, "pkill tritonserver");
        }
    }
    let outage = match fault {
        Fault::RedisPaused => Duration::from_secs(10),
        Fault::RabbitQueueDeleted => Duration::ZERO,
        _ => Duration::from_secs(3),
    };
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    match fault {
        Fault::RedisKilled => redis.restart(),
        Fault::RedisEmptied => redis.restart_empty(),
        Fault::RedisPaused => signal(redis.pid(), "CONT"),
        Fault::RabbitRestarted => {
            let stopped = rabbit_stopped.take().unwrap();
            tokio::task::spawn_blocking(move || stopped.start())
                .await
                .unwrap();
        }
        Fault::RabbitQueueDeleted => {}
        Fault::TritonKilled => {
            let ports = triton.as_ref().unwrap().ports();
            drop(triton.take());
            triton = Some(
                tokio::task::spawn_blocking(move || Triton::start(Some(ports), &[]))
                    .await
                    .unwrap(),
            );
        }
    }
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }

    // Every accepted task: succeeded with its own answer, or cancelled when asked.
    let accepted = accepted.lock().unwrap().clone();
    let (mut lost, mut wrong) = (0, 0);
    let mut gone = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let long = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for t in &accepted {
        loop {
            let r = long
                .get(format!("{base}/v1/tasks/{}", t.id))
                .send()
                .await
                .unwrap();
            if r.status() == 404 && fault == Fault::RedisEmptied && t.at < back {
                gone.insert(t.id.clone());
                break;
            }
            let v: Value = if r.status() == 200 {
                r.json().await.unwrap()
            } else {
                Value::Null
            };
            match v["status"].as_str() {
                Some("succeeded") => {
                    if !right(&v["response"]["outputs"][0]["data"], t.x) {
                        wrong += 1;
                    }
                    break;
                }
                Some("cancelled") if t.cancel_asked => break,
                Some("queued" | "running") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => {
                    eprintln!("{}: task {} ended as {v}", fault.name(), t.id);
                    lost += 1;
                    break;
                }
            }
        }
    }
    // Every webhook owed by a task that finished must reach the receiver (at least once;
    // retries keep the same `webhook-id`). Its outcome is noted as of the task's acceptance.
    let owed: Vec<&Accepted> = accepted
        .iter()
        .filter(|t| t.hook && !gone.contains(&t.id))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<&Accepted> = owed.clone();
    while !missing.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = hooks.got.lock().unwrap().clone();
        missing.retain(|t| !got.iter().any(|id| id.starts_with(&t.id)));
    }
    {
        let mut seen = seen.lock().unwrap();
        let calls = seen.entry("webhook").or_default();
        for t in &owed {
            calls.push((t.at, !missing.iter().any(|m| m.id == t.id)));
        }
        calls.sort_by_key(|(t, _)| *t);
    }
    for t in &missing {
        eprintln!(
            "{}: task {} owed a webhook that never came",
            fault.name(),
            t.id
        );
    }
    wrong += *cache_wrong.lock().unwrap();
    let (errors, recovered_s) = tally(fault, &seen.lock().unwrap(), down, back);
    if fault == Fault::RedisEmptied {
        let m = scrape(&http, &base).await;
        assert!(
            m.get("infergate_task_store_data_loss_total").copied() >= Some(1.0),
            "the data loss was not reported: {m:?}"
        );
        assert!(
            accepted.iter().any(|t| t.at > back),
            "tasks are accepted again after the loss"
        );
    }
    gw.shutdown().await.unwrap();
    drop(triton);
    Row {
        fault,
        errors,
        recovered_s,
        accepted: accepted.len(),
        lost,
        wrong,
        gone_with_data: gone.len(),
        undelivered: missing.len(),
    }
}

/// What each operation saw from the fault on (errors by operation), and the seconds from the
/// dependency's return to the last error of any. Every operation must answer as it should
/// again within 10 s of the return.
fn tally(
    fault: Fault,
    seen: &HashMap<&'static str, Vec<(Instant, bool)>>,
    down: Instant,
    back: Instant,
) -> (Vec<(&'static str, usize)>, f64) {
    let mut errors = Vec::new();
    let mut recovered_s = 0f64;
    for op in OPS {
        let calls = seen.get(op).cloned().unwrap_or_default();
        assert!(
            calls
                .iter()
                .any(|(t, ok)| *ok && *t > back + Duration::from_secs(10)),
            "{}: {op} never answered after the return",
            fault.name()
        );
        errors.push((op, calls.iter().filter(|(t, ok)| !ok && *t >= down).count()));
        if let Some((t, _)) = calls.iter().rfind(|(_, ok)| !ok)
            && *t > back
        {
            recovered_s = recovered_s.max((*t - back).as_secs_f64());
        }
    }
    (errors, recovered_s)
}

/// Receives completion webhooks on a port of its own and keeps their `webhook-id`s.
struct HookReceiver {
    port: u16,
    got: Arc<Mutex<HashSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HookReceiver {
    async fn start() -> Self {
        let got: Arc<Mutex<HashSet<String>>> = Arc::default();
        let keep = Arc::clone(&got);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let keep = Arc::clone(&keep);
                async move {
                    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
                        keep.lock().unwrap().insert(id.to_string());
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { port, got, task }
    }
}

impl Drop for HookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
