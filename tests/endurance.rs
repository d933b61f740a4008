//! Overload and soak against an `infergate serve` process (so its memory and sockets can be
//! read from /proc) in front of a real Triton, on loopback only, each bounded in time:
//! - 10× overload for 60 s: requests over the model's queue get 429 / RESOURCE_EXHAUSTED at
//!   once, admitted ones keep a bounded p99, goodput stays near capacity, RSS stays flat;
//! - a steady mixed load (gRPC, HTTP, async tasks) for `INFERGATE_SOAK_SECS` (default 600):
//!   every call succeeds, memory shows no trend after its 120 s warm-up, sockets do not grow.
//!
//! Both print their figures (`cargo test --test endurance -- --nocapture`).

mod common;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use infergate::proto::inference::{
    InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor,
};
use serde_json::json;
use tokio::sync::Semaphore;
use tonic::Code;

/// A running `infergate serve`, killed on drop.
struct Process {
    child: Reaped,
    grpc_port: u16,
    http_port: u16,
}

impl Process {
    fn start(name: &str, config: &str, extra: &[&str]) -> Process {
        let (grpc_port, http_port) = (free_port(), free_port());
        let dir = std::env::temp_dir();
        let cfg = dir.join(format!("infergate-{name}-{grpc_port}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let mut args: Vec<String> = [
            "serve",
            "--triton-url",
            &triton().grpc_url(),
            "--grpc-addr",
            &format!("127.0.0.1:{grpc_port}"),
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--config",
            cfg.to_str().unwrap(),
            "--log-level",
            "warn",
        ]
        .map(str::to_string)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log: PathBuf = dir.join(format!("infergate-{name}-{grpc_port}.log"));
        let child = infergate(&args, &log);
        wait_status(http_port, "/readyz", 200, Duration::from_secs(30));
        Process {
            child,
            grpc_port,
            http_port,
        }
    }

    fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).expect("VmRSS")
    }

    /// Open sockets (listeners, client connections, connections to Triton).
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

fn slow(delay_ms: i64) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "slow".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[1.0])],
        parameters: [(
            "delay_ms".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(delay_ms)),
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn add_sub_json() -> serde_json::Value {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![2.0; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0; 16]}]})
}

const DELAY_MS: i64 = 20;
const QUEUE: usize = 8;

/// The two tests run one after the other: the overload test reads its capacity in its first
/// 5 s and holds goodput to it, so the soak's 400 calls/s on the same two cores must not start
/// between the two (a CI run saw capacity 37/s, then 23/s of goodput under the soak's load).
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_overload_for_60s_sheds_with_429_keeps_p99_bounded_and_memory_flat() {
    let _alone = ALONE.lock().await;
    // `slow` one request at a time, 20 ms each, at most 8 waiting: a known, small capacity.
    let gw = Process::start(
        "overload",
        &format!(
            "[batching.models.slow]\nmax_batch_size = 1\nmax_inflight_batches = 1\n\
             max_queue_size = {QUEUE}\n"
        ),
        &[],
    );
    let client = connect(&gw.grpc_url()).await;

    // Capacity: closed loop, two callers, 5 s.
    let t0 = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (mut c, done) = (client.clone(), Arc::clone(&done));
        loops.push(tokio::spawn(async move {
            while t0.elapsed() < Duration::from_secs(5) {
                c.model_infer(slow(DELAY_MS)).await.expect("capacity run");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let capacity = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    let offered = capacity * 10.0;
    let service = Duration::from_secs_f64(1.0 / capacity);

    // Open loop at 10× for 60 s; RSS sampled every second.
    let secs = 60u64;
    let ok: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let shed: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let other: Arc<Mutex<Vec<String>>> = Arc::default();
    let in_flight = Arc::new(Semaphore::new(4096));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / offered));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut next_sample = start;
    let mut sent = 0u64;
    let mut calls = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        if Instant::now() >= next_sample {
            rss.push(gw.rss_kib());
            next_sample += Duration::from_secs(1);
        }
        let permit = Arc::clone(&in_flight)
            .try_acquire_owned()
            .expect("the gateway answers fast enough that 4,096 calls are never outstanding");
        let (mut c, ok, shed, other) = (
            client.clone(),
            Arc::clone(&ok),
            Arc::clone(&shed),
            Arc::clone(&other),
        );
        sent += 1;
        calls.push(tokio::spawn(async move {
            let _permit = permit;
            let mut req = tonic::Request::new(slow(DELAY_MS));
            req.set_timeout(Duration::from_secs(10));
            let t = Instant::now();
            match c.model_infer(req).await {
                Ok(_) => ok.lock().unwrap().push(t.elapsed()),
                Err(s) if s.code() == Code::ResourceExhausted => {
                    assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
                    shed.lock().unwrap().push(t.elapsed());
                }
                Err(s) => other
                    .lock()
                    .unwrap()
                    .push(format!("{:?}: {}", s.code(), s.message())),
            }
        }));
    }
    let elapsed = start.elapsed().as_secs_f64();
    for c in calls {
        c.await.unwrap();
    }
    let mut ok = ok.lock().unwrap().clone();
    let mut shed = shed.lock().unwrap().clone();
    let other = other.lock().unwrap().clone();
    ok.sort();
    shed.sort();
    let (ok_p99, shed_p99) = (percentile(&ok, 0.99), percentile(&shed, 0.99));
    let early = rss[5..15].iter().max().copied().unwrap();
    let late = rss[rss.len() - 10..].iter().max().copied().unwrap();
    println!(
        "overload: capacity {capacity:.0}/s, offered {:.0}/s for {elapsed:.0} s: {sent} calls, \
         {} OK ({:.0}/s, p50 {:?}, p99 {ok_p99:?}), {} RESOURCE_EXHAUSTED (p99 {shed_p99:?}), \
         {} other; RSS {} KiB at 5-15 s, {} KiB at the end (max {} KiB)",
        sent as f64 / elapsed,
        ok.len(),
        ok.len() as f64 / elapsed,
        percentile(&ok, 0.5),
        shed.len(),
        other.len(),
        early,
        late,
        rss.iter().max().unwrap(),
    );
    assert!(
        other.is_empty(),
        "only OK or 429: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(ok.len() + shed.len(), sent as usize);
    assert!(
        shed.len() as f64 > 0.8 * sent as f64,
        "at 10× capacity most calls are shed"
    );
    assert!(
        ok.len() as f64 >= 0.7 * capacity * elapsed,
        "goodput stays near capacity under overload"
    );
    // An admitted call waits behind at most the queue and the call in flight.
    let bound = service * (QUEUE as u32 + 2) * 2 + Duration::from_millis(100);
    assert!(ok_p99 <= bound, "admitted p99 {ok_p99:?} over {bound:?}");
    assert!(
        shed_p99 <= Duration::from_millis(250),
        "shed at once: {shed_p99:?}"
    );
    assert!(
        late <= early + 1024,
        "RSS grew from {early} KiB to {late} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_soak_keeps_memory_and_sockets_flat() {
    let _alone = ALONE.lock().await;
    let secs: u64 = std::env::var("INFERGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    // Task records live 20 s after they end, so the store reaches its steady size early.
    let gw = Process::start("soak", "", &["--task-ttl-ms", "20000"]);
    let client = connect(&gw.grpc_url()).await;
    let base = format!("http://127.0.0.1:{}", gw.http_port);
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);

    let mut loads = Vec::new();
    // gRPC: 4 callers, ~100/s each.
    for _ in 0..4 {
        let (mut c, errors, count) = (client.clone(), Arc::clone(&errors), Arc::clone(&count));
        loads.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while Instant::now() < stop {
                tick.tick().await;
                match c.model_infer(add_sub_request()).await {
                    Ok(r) => {
                        let out = f32_from(&r.into_inner().raw_output_contents[0]);
                        if out != vec![3.0; 16] {
                            errors.lock().unwrap().push(format!("wrong sum {out:?}"));
                        }
                    }
                    Err(s) => errors.lock().unwrap().push(format!("grpc {s:?}")),
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // HTTP: ~50/s, with a new client (new connections) every 5 s so closed ones must be freed.
    {
        let (base, errors, count) = (base.clone(), Arc::clone(&errors), Arc::clone(&count));
        loads.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut http = reqwest::Client::new();
            let mut made = Instant::now();
            let body = add_sub_json();
            while Instant::now() < stop {
                tick.tick().await;
                if made.elapsed() > Duration::from_secs(5) {
                    http = reqwest::Client::new();
                    made = Instant::now();
                }
                let r = http
                    .post(format!("{base}/v2/models/add_sub/infer"))
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => errors.lock().unwrap().push(format!("http {}", r.status())),
                    Err(e) => errors.lock().unwrap().push(format!("http {e}")),
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Async tasks: one after another, each polled to its end.
    {
        let (base, errors, count) = (base.clone(), Arc::clone(&errors), Arc::clone(&count));
        loads.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let body = add_sub_json();
            while Instant::now() < stop {
                tick.tick().await;
                let r = http
                    .post(format!("{base}/v1/models/add_sub/tasks"))
                    .json(&body)
                    .send()
                    .await;
                let id = match r {
                    Ok(r) if r.status() == 202 => {
                        r.json::<serde_json::Value>().await.unwrap()["id"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    }
                    Ok(r) => {
                        errors.lock().unwrap().push(format!("task {}", r.status()));
                        continue;
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(format!("task {e}"));
                        continue;
                    }
                };
                let t = wait_final(&http, &base, &[id], Duration::from_secs(10))
                    .await
                    .remove(0);
                if t["status"] != "succeeded" {
                    errors.lock().unwrap().push(format!("task {t}"));
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Samples every 5 s.
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        samples.push((t0.elapsed().as_secs(), gw.rss_kib(), gw.sockets()));
    }
    for l in loads {
        l.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let n = count.load(Ordering::Relaxed);
    // RSS settles within about 110 s (jemalloc's arenas and decay); after it, it swings by
    // about 1 MiB with periods near 100 s (measured over 600 s: 40.7 to 41.6 MiB, no trend).
    // A comparison of two short windows reads those swings as growth, so the growth is the
    // least-squares slope over everything after a 120 s warm-up, times that span.
    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= 120).copied().collect();
    assert!(
        steady.len() >= 20,
        "run long enough to compare: {samples:?}"
    );
    let k = (steady.len() / 5).max(1);
    let (first, last) = (&steady[..k], &steady[steady.len() - k..]);
    let max =
        |s: &[(u64, u64, usize)], f: fn(&(u64, u64, usize)) -> u64| s.iter().map(f).max().unwrap();
    let (sock_a, sock_b) = (max(first, |s| s.2 as u64), max(last, |s| s.2 as u64));
    let n_s = steady.len() as f64;
    let mean_t = steady.iter().map(|s| s.0 as f64).sum::<f64>() / n_s;
    let mean_r = steady.iter().map(|s| s.1 as f64).sum::<f64>() / n_s;
    let slope = steady
        .iter()
        .map(|s| (s.0 as f64 - mean_t) * (s.1 as f64 - mean_r))
        .sum::<f64>()
        / steady
            .iter()
            .map(|s| (s.0 as f64 - mean_t).powi(2))
            .sum::<f64>();
    let span = (steady[steady.len() - 1].0 - steady[0].0) as f64;
    let growth = slope * span;
    println!(
        "soak: {secs} s, {n} calls ({:.0}/s), {} errors; RSS trend after 120 s {slope:+.2} KiB/s \
         ({growth:+.0} KiB over {span:.0} s); sockets {sock_a} early, {sock_b} late; samples \
         (s, KiB, sockets): {samples:?}",
        n as f64 / secs as f64,
        errors.len()
    );
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
    // Tight on purpose: expired tasks kept until the in-memory store filled showed up here as
    // about 1 MiB per 5 minutes at this load (some 1.5 MiB over this span).
    assert!(
        growth <= 512.0,
        "RSS grew {growth:.0} KiB over {span:.0} s ({slope:.2} KiB/s)"
    );
    assert!(
        sock_b <= sock_a + 4,
        "sockets grew from {sock_a} to {sock_b}"
    );
}
