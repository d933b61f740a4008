//! The fault matrix: six faults of infergate's dependencies, each under a steady mix of the
//! operations clients and operators use (submit with an idempotency key, poll, cancel, the
//! dead-letter list, sync inference, the autoscaler's answer), against the real Redis,
//! RabbitMQ and Triton, with no restart of infergate:
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
//! return to the last error, and the accepted tasks that were lost or answered wrongly. Every
//! operation must recover within 10 s of the return; no accepted task may be lost or wrong.
//! Restarted empty, the tasks Redis held are gone with it: that is reported (a count, and
//! infergate's `task_store_data_loss` metric), and tasks accepted after it run again.
//! `loadtest/faults.sh` keeps the table in `loadtest/results/`.

mod common;

use std::{
    collections::HashMap,
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

const OPS: [&str; 6] = [
    "submit",
    "poll",
    "cancel",
    "dead letters",
    "sync infer",
    "scaler",
];

/// What one operation saw: (when, answered as it should).
type Seen = Arc<Mutex<HashMap<&'static str, Vec<(Instant, bool)>>>>;

/// A task the client was told was accepted.
#[derive(Clone)]
struct Accepted {
    id: String,
    x: f32,
    at: Instant,
    cancel_asked: bool,
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
            "{}: errors {:?}, recovered {:.1} s after the return, {} accepted, {} lost, {} wrong, {} gone with the data",
            fault.name(),
            r.errors,
            r.recovered_s,
            r.accepted,
            r.lost,
            r.wrong,
            r.gone_with_data
        );
        rows.push(r);
    }
    let mut table = vec![
        "| fault | errors while it lasted (by operation) | recovered (s after its return) | accepted | lost | wrong | gone with the store's data |".to_string(),
        "|---|---|---|---|---|---|---|".to_string(),
    ];
    for r in &rows {
        let errors: Vec<String> = r
            .errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        table.push(format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} |",
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
            r.gone_with_data
        ));
    }
    println!("{}", table.join("\n"));
    for r in &rows {
        assert_eq!(r.lost, 0, "{}: accepted tasks lost", r.fault.name());
        assert_eq!(r.wrong, 0, "{}: wrong answers", r.fault.name());
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
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::default();
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
                let r = http
                    .post(format!("{base}/v1/models/onnx_linear/tasks"))
                    .header("idempotency-key", format!("matrix-{k}"))
                    .json(&body(x))
                    .send()
                    .await;
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
                let x = (k % 50) as f32;
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

    // What each operation saw from the fault on, and how long after the return it failed.
    let seen = seen.lock().unwrap().clone();
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

    // Every accepted task: succeeded with its own answer, or cancelled when asked.
    let accepted = accepted.lock().unwrap().clone();
    let (mut lost, mut wrong, mut gone_with_data) = (0, 0, 0);
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
                gone_with_data += 1;
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
        gone_with_data,
    }
}
