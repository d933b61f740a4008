//! Dynamic batching against a real Triton: hundreds of concurrent callers each get exactly
//! their own rows back while Triton sees far fewer requests; deadlines, cancellation, overload,
//! priorities with anti-starvation, and pass-through of requests that cannot be batched.

mod common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use infergate::{
    config::{BatchMode, Config, ModelBatching},
    proto::inference::{
        InferParameter, ModelInferRequest, ModelInferResponse,
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
};
use tonic::Code;

/// Tests that time the single-instance `slow` model run one at a time.
static SLOW_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Tests that count `add_sub`'s requests in Triton's statistics, or send it requests, run one
/// at a time, so no test's count includes another's calls.
static ADD_SUB_COUNTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn add_sub(rows: usize, seed: u32) -> (ModelInferRequest, Vec<f32>, Vec<f32>) {
    // Distinct values per caller, so a row returned to the wrong caller is caught.
    let a: Vec<f32> = (0..rows * 16)
        .map(|i| (seed * 10_000 + i as u32) as f32)
        .collect();
    let b: Vec<f32> = (0..rows * 16)
        .map(|i| (i % 7) as f32 - seed as f32)
        .collect();
    let t = |n: &str| InferInputTensor {
        name: n.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, 16],
        ..Default::default()
    };
    let req = ModelInferRequest {
        model_name: "add_sub".into(),
        id: format!("caller-{seed}"),
        inputs: vec![t("INPUT0"), t("INPUT1")],
        raw_input_contents: vec![f32_bytes(&a), f32_bytes(&b)],
        ..Default::default()
    };
    (req, a, b)
}

/// The answer to `add_sub(_, seed)` carries that caller's id, `a+b` and `a-b`.
fn assert_own_rows(r: &ModelInferResponse, seed: u32, a: &[f32], b: &[f32]) {
    assert_eq!(r.id, format!("caller-{seed}"));
    let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
    let diff: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    assert_eq!(f32_from(&r.raw_output_contents[0]), sum, "caller {seed}");
    assert_eq!(f32_from(&r.raw_output_contents[1]), diff, "caller {seed}");
}

/// Triton's `(requests, rows, executions)` for `model` once `done` holds for them: Triton
/// counts a request just after it answers it. Gives up after about 2 s with the last reading.
async fn settled_stats(model: &str, done: impl Fn((u64, u64, u64)) -> bool) -> (u64, u64, u64) {
    let mut stats = triton_stats(model).await;
    for _ in 0..100 {
        if done(stats) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = triton_stats(model).await;
    }
    stats
}

/// A refusal with `code` whose message names what went wrong.
fn assert_refused(err: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());
}

fn param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

fn slow(value: f32, delay_ms: i64, priority: Option<i64>) -> ModelInferRequest {
    let mut parameters = std::collections::HashMap::new();
    parameters.insert("delay_ms".to_string(), param(delay_ms));
    if let Some(p) = priority {
        parameters.insert("priority".to_string(), param(p));
    }
    ModelInferRequest {
        model_name: "slow".into(),
        id: format!("v{value}"),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[value])],
        parameters,
        ..Default::default()
    }
}

/// The test config with `model`'s batching overridden, then `tweak`ed.
fn config_with(model: &str, ov: ModelBatching, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.batching.models = BTreeMap::from([(model.to_string(), ov)]);
    tweak(&mut cfg);
    cfg
}

/// One slow call at a time, one request per call: makes queue order observable.
fn one_by_one() -> ModelBatching {
    ModelBatching {
        max_batch_size: Some(1),
        max_inflight_batches: Some(1),
        ..Default::default()
    }
}

/// add_sub's Triton config sets no queue delay, so by default a batch leaves as soon as a call
/// slot is free and batches form only while both slots are busy: how big they get depends on
/// the host's speed (CI once saw 115 Triton calls for 246 chunks, where this machine sees
/// ~30). A window (20 ms in the property tests) fills batches whatever the speed, so the
/// counts these tests check depend on rows, not timing. (How defaults come from the Triton
/// config is unit-tested in `batch`; the benchmark measures the default's batches.)
fn add_sub_windowed(grpc_threads: usize, window_us: u64) -> Config {
    // A fixed window (`on`): the adaptive default would not wait for company that is not sure
    // to come.
    let window = ModelBatching {
        mode: Some(BatchMode::On),
        max_queue_delay_us: Some(window_us),
        ..Default::default()
    };
    config_with("add_sub", window, |c| c.server.grpc_threads = grpc_threads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_get_exactly_their_rows_and_batches_form() {
    let _g = ADD_SUB_COUNTS.lock().await;
    let gw = gateway_with(add_sub_windowed(0, 20_000)).await;
    let client = gw.client().await;
    let (req_before, rows_before, _) = triton_stats("add_sub").await;
    let callers = 300u32;
    let mut tasks = Vec::new();
    let (mut total_rows, mut chunks) = (0u64, 0u64);
    for seed in 0..callers {
        // Pseudo-random row counts 1..=8, and every 25th caller 65..=100 rows (over add_sub's
        // max_batch_size of 64, so split into two calls).
        let x = seed as usize * 7919 + 13;
        let rows = if seed % 25 == 0 {
            65 + x % 36
        } else {
            1 + x % 8
        };
        total_rows += rows as u64;
        chunks += rows.div_ceil(64) as u64;
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let (req, a, b) = add_sub(rows, seed);
            let r = c.model_infer(req).await.unwrap().into_inner();
            assert_eq!(r.id, format!("caller-{seed}"));
            assert_eq!(r.outputs[0].shape, vec![rows as i64, 16]);
            let sum = f32_from(&r.raw_output_contents[0]);
            let diff = f32_from(&r.raw_output_contents[1]);
            assert_eq!(sum.len(), a.len());
            for i in 0..a.len() {
                assert_eq!(sum[i], a[i] + b[i], "caller {seed} row element {i}");
                assert_eq!(diff[i], a[i] - b[i], "caller {seed} row element {i}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (req_after, rows_after, _) = triton_stats("add_sub").await;
    let triton_requests = req_after - req_before;
    assert_eq!(
        rows_after - rows_before,
        total_rows,
        "every row inferred exactly once"
    );
    // Without batching Triton would get one request per chunk; with it, far fewer.
    assert!(
        triton_requests * 3 < chunks,
        "Triton received {triton_requests} requests for {chunks} chunks of {callers} callers"
    );
    println!(
        "{callers} callers, {chunks} chunks, {total_rows} rows -> {triton_requests} Triton requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_on_several_serving_threads_each_get_their_rows_from_batches() {
    let _g = ADD_SUB_COUNTS.lock().await;
    let gw = gateway_with(add_sub_windowed(3, 20_000)).await;
    // Six connections over three serving threads (connections go to the least busy one), so
    // each thread batches its own callers: a row sent back on the wrong thread or to the
    // wrong caller would show in the values.
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(connect(&gw.grpc_url()).await);
    }
    let (req_before, rows_before, _) = triton_stats("add_sub").await;
    let (mut total_rows, mut chunks) = (0u64, 0u64);
    let mut calls = Vec::new();
    for (ci, conn) in conns.iter().enumerate() {
        for k in 0..40u32 {
            let seed = ci as u32 * 100 + k;
            let x = seed as usize * 7919 + 13;
            let rows = if k == 17 { 65 + x % 36 } else { 1 + x % 8 };
            total_rows += rows as u64;
            chunks += rows.div_ceil(64) as u64;
            let mut c = conn.clone();
            calls.push(tokio::spawn(async move {
                let (req, a, b) = add_sub(rows, seed);
                let r = c.model_infer(req).await.expect("call").into_inner();
                assert_own_rows(&r, seed, &a, &b);
            }));
        }
    }
    for call in calls {
        call.await.expect("a call panicked");
    }
    let (req_after, rows_after, _) = triton_stats("add_sub").await;
    assert_eq!(
        rows_after - rows_before,
        total_rows,
        "every row inferred once"
    );
    let triton_requests = req_after - req_before;
    assert!(
        triton_requests * 3 < chunks,
        "Triton received {triton_requests} requests for {chunks} chunks"
    );
    println!("{chunks} chunks, {total_rows} rows -> {triton_requests} Triton requests");
    gw.shutdown().await.expect("drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_naming_different_outputs_share_a_call_and_each_get_theirs() {
    let _g = ADD_SUB_COUNTS.lock().await;
    // A window far longer than sending a few calls takes: each round is one batch.
    let cfg = add_sub_windowed(1, 200_000);
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    // Round 1 has a caller naming no outputs (so the call asks for all); in round 2 the call
    // asks for the union of what its callers name.
    let rounds: [&[&[&str]]; 2] = [
        &[
            &["OUTPUT0"],
            &["OUTPUT1"],
            &["OUTPUT1", "OUTPUT0"],
            &[],
            &["OUTPUT0"],
        ],
        &[&["OUTPUT1"], &["OUTPUT1", "OUTPUT0"], &["OUTPUT0"]],
    ];
    for (round, asks) in rounds.iter().enumerate() {
        let (req_before, rows_before, _) = triton_stats("add_sub").await;
        let calls = asks.iter().enumerate().map(|(k, names)| {
            let seed = 500 + 10 * round as u32 + k as u32;
            let (mut req, a, b) = add_sub(1 + k, seed);
            req.outputs = names
                .iter()
                .map(|n| InferRequestedOutputTensor {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect();
            let mut c = client.clone();
            async move { (c.model_infer(req).await.expect("call").into_inner(), a, b) }
        });
        let answers = futures::future::join_all(calls).await;
        let (req_after, rows_after, _) = triton_stats("add_sub").await;
        assert_eq!(req_after - req_before, 1, "round {round}: one call for all");
        let rows: usize = (1..=asks.len()).sum();
        assert_eq!(rows_after - rows_before, rows as u64);
        for (k, (r, a, b)) in answers.into_iter().enumerate() {
            // What Triton answers a caller alone: the outputs it named (all if none), in the
            // model's order.
            let expected: Vec<&str> = ["OUTPUT0", "OUTPUT1"]
                .into_iter()
                .filter(|n| asks[k].is_empty() || asks[k].contains(n))
                .collect();
            let got: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
            assert_eq!(got, expected, "round {round} caller {k}");
            assert_eq!(r.raw_output_contents.len(), got.len());
            for (o, raw) in r.outputs.iter().zip(&r.raw_output_contents) {
                assert_eq!(o.shape, vec![1 + k as i64, 16]);
                let want: Vec<f32> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| if o.name == "OUTPUT0" { x + y } else { x - y })
                    .collect();
                assert_eq!(f32_from(raw), want, "round {round} caller {k} {}", o.name);
            }
        }
    }
    gw.shutdown().await.expect("drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_share_the_queue_bound_and_the_call_slots() {
    let _g = SLOW_MODEL.lock().await;
    let ov = ModelBatching {
        max_queue_size: Some(2),
        ..one_by_one()
    };
    let gw = gateway_with(config_with("slow", ov, |c| c.server.grpc_threads = 2)).await;
    // Two connections: one on each serving thread, each with its own queue for `slow`.
    let (a, b) = (connect(&gw.grpc_url()).await, connect(&gw.grpc_url()).await);
    let mut waiting = Vec::new();
    for (v, conn) in [(0, &a), (1, &a), (2, &b)] {
        let mut c = conn.clone();
        waiting.push(tokio::spawn(async move {
            c.model_infer(slow(v as f32, 200, None)).await
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // One call slot for the model: the first runs, and the request on the other thread waits
    // for it rather than taking a slot of its own. So two wait, and the queue (two, counted
    // over both threads) is full for callers on either thread.
    for conn in [&a, &b] {
        let err = conn
            .clone()
            .model_infer(slow(9.0, 0, None))
            .await
            .unwrap_err();
        assert_refused(
            &err,
            Code::ResourceExhausted,
            "queue of model 'slow' is full (2 requests)",
        );
    }
    for w in waiting {
        w.await.unwrap().expect("admitted requests complete");
    }
    gw.shutdown().await.expect("drains");
}

#[tokio::test]
async fn an_expired_request_is_never_sent() {
    let _g = SLOW_MODEL.lock().await;
    let gw = gateway_with(config_with("slow", one_by_one(), |_| {})).await;
    let client = gw.client().await;
    let (before, ..) = triton_stats("slow").await;
    let mut c1 = client.clone();
    let busy = tokio::spawn(async move { c1.model_infer(slow(1.0, 400, None)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c2 = client.clone();
    let mut late = tonic::Request::new(slow(2.0, 0, None));
    late.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let err = c2.model_infer(late).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "answered at its deadline"
    );
    busy.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (after, ..) = triton_stats("slow").await;
    assert_eq!(after - before, 1, "only the first request reached Triton");

    // Over HTTP the deadline header gives 504 the same way.
    let mut c3 = client.clone();
    let busy = tokio::spawn(async move { c3.model_infer(slow(3.0, 300, None)).await });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/slow/infer", gw.http_base()))
        .header("infergate-timeout-ms", "50")
        .json(&serde_json::json!({"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    busy.await.unwrap().unwrap();
}

/// `slow` with `report_timeout` answers the `timeout` (µs) Triton received for the request.
fn reporting_timeout() -> ModelInferRequest {
    let mut req = slow(0.0, 0, None);
    req.parameters.insert("report_timeout".into(), param(1));
    req
}

async fn timeout_seen_by_triton(
    client: &mut Client,
    req: ModelInferRequest,
    deadline: Option<Duration>,
) -> f32 {
    let mut req = tonic::Request::new(req);
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    let resp = client.model_infer(req).await.unwrap().into_inner();
    f32_from(&resp.raw_output_contents[0])[0]
}

#[tokio::test]
async fn the_remaining_budget_reaches_triton_as_its_timeout() {
    let _g = SLOW_MODEL.lock().await;
    let batched = one_by_one();
    let alone = ModelBatching {
        mode: Some(BatchMode::Off),
        ..Default::default()
    };
    for (path, ov) in [("batched", batched), ("pass-through", alone)] {
        let gw = gateway_with(config_with("slow", ov, |_| {})).await;
        let mut client = gw.client().await;
        // grpc-timeout: what is left of 5 s when the call leaves, in µs.
        let us = timeout_seen_by_triton(
            &mut client,
            reporting_timeout(),
            Some(Duration::from_secs(5)),
        )
        .await;
        assert!(
            (4.0e6..=5.0e6).contains(&us),
            "{path}: Triton got {us} µs of 5 s"
        );
        // A caller's own `timeout` parameter (7 s) counts down the same way.
        let mut own = reporting_timeout();
        own.parameters.insert("timeout".into(), param(7_000_000));
        let us = timeout_seen_by_triton(&mut client, own, None).await;
        assert!(
            (6.0e6..7.0e6).contains(&us),
            "{path}: Triton got {us} µs of 7 s"
        );
        // No deadline at all: none is made up.
        let us = timeout_seen_by_triton(&mut client, reporting_timeout(), None).await;
        assert_eq!(us, 0.0, "{path}");
        // Over HTTP, from the deadline header.
        let r: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v2/models/slow/infer", gw.http_base()))
            .header("infergate-timeout-ms", "3000")
            .json(&serde_json::json!({
                "parameters": {"report_timeout": 1, "delay_ms": 0},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [0]}]
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let us = r["outputs"][0]["data"][0].as_f64().unwrap();
        assert!(
            (2.0e6..=3.0e6).contains(&us),
            "{path}: Triton got {us} µs of 3 s ({r})"
        );
        gw.shutdown().await.expect("drains");
    }
}

#[tokio::test]
async fn a_caller_that_leaves_is_removed_before_its_batch_is_sent() {
    let _g = SLOW_MODEL.lock().await;
    let gw = gateway_with(config_with("slow", one_by_one(), |_| {})).await;
    let client = gw.client().await;
    let (before, ..) = triton_stats("slow").await;
    let mut c1 = client.clone();
    let busy = tokio::spawn(async move { c1.model_infer(slow(1.0, 300, None)).await });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let mut c2 = client.clone();
    let leaving = tokio::spawn(async move { c2.model_infer(slow(2.0, 0, None)).await });
    tokio::time::sleep(Duration::from_millis(80)).await;
    leaving.abort();
    busy.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (after, ..) = triton_stats("slow").await;
    assert_eq!(after - before, 1, "the abandoned request was not sent");
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_with_retry_after() {
    let _g = SLOW_MODEL.lock().await;
    let ov = ModelBatching {
        max_queue_size: Some(2),
        ..one_by_one()
    };
    let gw = gateway_with(config_with("slow", ov, |_| {})).await;
    let client = gw.client().await;
    let mut waiting = Vec::new();
    for v in 0..3 {
        let mut c = client.clone();
        waiting.push(tokio::spawn(async move {
            c.model_infer(slow(v as f32, 200, None)).await
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // One running, two queued: the next is refused at once, not blocked.
    let mut c = client.clone();
    let started = Instant::now();
    let err = c.model_infer(slow(9.0, 0, None)).await.unwrap_err();
    assert_refused(
        &err,
        Code::ResourceExhausted,
        "queue of model 'slow' is full",
    );
    assert_eq!(err.metadata().get("retry-after").unwrap(), "1");
    assert!(started.elapsed() < Duration::from_millis(100));
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/slow/infer", gw.http_base()))
        .json(&serde_json::json!({"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    for w in waiting {
        w.await.unwrap().expect("admitted requests complete");
    }
}

#[tokio::test]
async fn a_model_over_its_concurrency_cap_refuses_while_other_models_go_on() {
    let _g = SLOW_MODEL.lock().await;
    let _a = ADD_SUB_COUNTS.lock().await;
    let ov = ModelBatching {
        max_concurrent_requests: Some(2),
        ..Default::default()
    };
    // Every other model is uncapped; `slow` takes two requests at a time.
    let gw = gateway_with(config_with("slow", ov, |_| {})).await;
    let client = gw.client().await;
    let mut admitted = Vec::new();
    for v in 0..2 {
        let mut c = client.clone();
        admitted.push(tokio::spawn(async move {
            c.model_infer(slow(v as f32, 400, None)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = client.clone();
    let err = c.model_infer(slow(9.0, 0, None)).await.unwrap_err();
    assert_refused(
        &err,
        Code::ResourceExhausted,
        "model 'slow' already has 2 requests in flight",
    );
    assert_eq!(err.metadata().get("retry-after").unwrap(), "1");
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/slow/infer", gw.http_base()))
        .json(&serde_json::json!({"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // Meanwhile another model is not held back.
    let ok = c
        .model_infer(add_sub_request())
        .await
        .expect("add_sub runs");
    assert_eq!(
        f32_from(&ok.into_inner().raw_output_contents[0]),
        vec![3.0; 16]
    );
    for w in admitted {
        w.await.unwrap().expect("admitted requests complete");
    }
    // The places are free again.
    c.model_infer(slow(1.0, 0, None))
        .await
        .expect("under the cap again");
}

/// Sends requests one after another into a busy queue and returns their completion order.
async fn completion_order(gw: &TestGateway, reqs: Vec<ModelInferRequest>) -> Vec<String> {
    let client = gw.client().await;
    let order = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut c0 = client.clone();
    let busy = tokio::spawn(async move { c0.model_infer(slow(0.0, 150, None)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut tasks = Vec::new();
    for r in reqs {
        let (mut c, order) = (client.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let id = c.model_infer(r).await.unwrap().into_inner().id;
            order.lock().await.push(id);
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    busy.await.unwrap().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    order.lock().await.clone()
}

#[tokio::test]
async fn higher_priority_goes_first() {
    let _g = SLOW_MODEL.lock().await;
    let gw = gateway_with(config_with("slow", one_by_one(), |c| {
        c.batching.priority_levels = 3;
        c.batching.max_priority_wait_ms = 10_000;
    }))
    .await;
    let order = completion_order(
        &gw,
        vec![
            slow(1.0, 20, Some(3)),
            slow(2.0, 20, Some(2)),
            slow(3.0, 20, Some(1)),
            slow(4.0, 20, Some(3)),
            slow(5.0, 20, Some(1)),
        ],
    )
    .await;
    assert_eq!(order, vec!["v3", "v5", "v2", "v1", "v4"]);

    // A priority beyond the configured levels is a clear INVALID_ARGUMENT.
    let mut c = gw.client().await;
    let err = c.model_infer(slow(1.0, 0, Some(9))).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "'priority' is 9");
}

#[tokio::test]
async fn a_low_priority_request_waits_no_longer_than_the_starvation_bound() {
    let _g = SLOW_MODEL.lock().await;
    let gw = gateway_with(config_with("slow", one_by_one(), |c| {
        c.batching.priority_levels = 2;
        c.batching.max_priority_wait_ms = 120;
    }))
    .await;
    // The low request arrives first; a stream of high ones follows. Each call takes ~60 ms.
    let mut reqs = vec![slow(100.0, 60, Some(2))];
    reqs.extend((1..=6).map(|i| slow(i as f32, 60, Some(1))));
    let order = completion_order(&gw, reqs).await;
    let low = order.iter().position(|id| id == "v100").unwrap();
    // Without the bound it would finish last (index 6); aged past 120 ms it goes within the
    // first few high ones. (That high priority goes first before anything has aged is checked
    // by `higher_priority_goes_first`; here a loaded machine may age the low request before
    // the first dispatch, which the rule rightly lets go first.)
    assert!(
        low <= 3,
        "low-priority request finished at position {low}: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_without_a_batch_dimension_pass_through_alone() {
    let _g = ADD_SUB_COUNTS.lock().await;
    let gw = gateway().await;
    let client = gw.client().await;
    let (before, _, exec_before) = triton_stats("matrix_nobatch").await;
    let mut tasks = Vec::new();
    for k in 0..20i32 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = ModelInferRequest {
                model_name: "matrix_nobatch".into(),
                inputs: vec![InferInputTensor {
                    name: "IN".into(),
                    datatype: "INT32".into(),
                    shape: vec![2, 3],
                    ..Default::default()
                }],
                raw_input_contents: vec![
                    (0..6)
                        .flat_map(|i: i32| (i + k).to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                ],
                ..Default::default()
            };
            // Half of them with a deadline: Triton takes the forwarded `timeout` for a model
            // without a batch dimension too.
            let mut req = tonic::Request::new(req);
            if k % 2 == 0 {
                req.set_timeout(Duration::from_secs(10));
            }
            let r = c.model_infer(req).await.unwrap().into_inner();
            let out: Vec<i32> = r.raw_output_contents[0]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(out, (0..6).map(|i| 2 * (i + k) + 1).collect::<Vec<_>>());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (after, _, exec_after) = triton_stats("matrix_nobatch").await;
    assert_eq!(after - before, 20);
    assert_eq!(exec_after - exec_before, 20, "each request executed alone");

    // With batching off, add_sub requests pass through one Triton request each.
    let off = gateway_with({
        let mut c = test_config(vec![triton().grpc_url()]);
        c.batching.mode = BatchMode::Off;
        c
    })
    .await;
    let (before, ..) = triton_stats("add_sub").await;
    let mut tasks = Vec::new();
    for seed in 0..10 {
        let mut c = off.client().await;
        tasks.push(tokio::spawn(async move {
            c.model_infer(add_sub(2, seed).0).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (after, ..) = triton_stats("add_sub").await;
    assert_eq!(after - before, 10);
}

/// A request whose batch holds only itself is sent to Triton as the caller sent it (its id
/// included) and a gRPC caller gets Triton's answer as Triton framed it. What it gets must be
/// what a shared batch would have given it: its id, the outputs it named, its own values, and
/// the parameters infergate consumes kept from Triton. One row per batch shows in the metrics.
#[tokio::test]
async fn a_request_batched_alone_gets_its_id_outputs_and_values() {
    let _g = ADD_SUB_COUNTS.lock().await;
    let gw = gateway().await;
    let mut c = gw.client().await;
    let http = reqwest::Client::new();
    let rows_count = "infergate_batch_rows_count{model=\"add_sub\"}";
    let before = scrape(&http, &gw.http_base())
        .await
        .get(rows_count)
        .copied()
        .unwrap_or(0.0);
    let (req_before, ..) = triton_stats("add_sub").await;
    for (k, named) in [&["OUTPUT1"][..], &[], &["OUTPUT0", "OUTPUT1"]]
        .into_iter()
        .enumerate()
    {
        let seed = 900 + k as u32;
        let (mut req, a, b) = add_sub(1 + k, seed);
        req.outputs = named
            .iter()
            .map(|n| InferRequestedOutputTensor {
                name: n.to_string(),
                ..Default::default()
            })
            .collect();
        // Consumed by infergate: Triton's add_sub has no priority levels.
        req.parameters.insert("priority".into(), param(1));
        let r = c.model_infer(req).await.expect("call").into_inner();
        assert_eq!(r.id, format!("caller-{seed}"));
        assert_eq!(r.model_name, "add_sub");
        let want: Vec<&str> = ["OUTPUT0", "OUTPUT1"]
            .into_iter()
            .filter(|n| named.is_empty() || named.contains(n))
            .collect();
        let got: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(got, want, "caller {k}");
        for (o, raw) in r.outputs.iter().zip(&r.raw_output_contents) {
            assert_eq!(o.shape, vec![1 + k as i64, 16]);
            let expect: Vec<f32> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| if o.name == "OUTPUT0" { x + y } else { x - y })
                .collect();
            assert_eq!(f32_from(raw), expect, "caller {k} {}", o.name);
        }
    }
    // The same over HTTP, which always gets a decoded answer.
    let body = serde_json::json!({
        "id": "http-alone",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": vec![2.0; 16]},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": vec![0.5; 16]},
        ],
        "outputs": [{"name": "OUTPUT1"}],
    });
    let r = post_json(
        &http,
        &format!("{}/v2/models/add_sub/infer", gw.http_base()),
        &body,
    )
    .await;
    assert_eq!(r["id"], "http-alone", "{r}");
    assert_eq!(r["outputs"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["outputs"][0]["name"], "OUTPUT1");
    assert_eq!(r["outputs"][0]["data"], serde_json::json!(vec![1.5; 16]));
    let sent = settled_stats("add_sub", |s| s.0 - req_before >= 4).await.0 - req_before;
    assert_eq!(sent, 4, "one Triton request each");
    let after = scrape(&http, &gw.http_base()).await[rows_count];
    assert_eq!(after - before, 4.0, "four batches of their own");
    gw.shutdown().await.expect("drains");
}

/// Adaptive mode under callers that each wait for their answer before sending again (a closed
/// loop, as most clients and perf_analyzer are): every row comes back to its own caller, and
/// batches form, since only two calls run at once while sixteen callers are inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_batches_closed_loop_callers_and_each_gets_its_rows() {
    let _g = ADD_SUB_COUNTS.lock().await;
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.batching.mode = BatchMode::Adaptive;
    cfg.batching.max_queue_delay_us = Some(2_000);
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    let (req_before, rows_before, _) = triton_stats("add_sub").await;
    let (callers, each) = (16u32, 12u32);
    let mut tasks = Vec::new();
    let mut total_rows = 0u64;
    for caller in 0..callers {
        let rows: Vec<usize> = (0..each)
            .map(|k| 1 + ((caller * 31 + k * 7) % 5) as usize)
            .collect();
        total_rows += rows.iter().sum::<usize>() as u64;
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            for (k, n) in rows.into_iter().enumerate() {
                let seed = 2_000 + caller * 100 + k as u32;
                let (req, a, b) = add_sub(n, seed);
                let r = c.model_infer(req).await.expect("call").into_inner();
                assert_own_rows(&r, seed, &a, &b);
            }
        }));
    }
    for t in tasks {
        t.await.expect("a caller panicked");
    }
    let (req_after, rows_after, _) =
        settled_stats("add_sub", |s| s.1 - rows_before >= total_rows).await;
    assert_eq!(rows_after - rows_before, total_rows, "every row once");
    let sent = req_after - req_before;
    let requests = (callers * each) as u64;
    assert!(
        sent < requests,
        "{requests} requests reached Triton as {sent} calls: no batch formed"
    );
    println!("adaptive: {requests} closed-loop requests -> {sent} Triton requests");
    gw.shutdown().await.expect("drains");
}

/// `batch_wait` bucket counts of `model` (upper bound in seconds, cumulative count), in order.
fn wait_buckets(m: &BTreeMap<String, f64>, model: &str) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("infergate_phase_duration_seconds_bucket{")
                && k.contains(&format!("model=\"{model}\""))
                && k.contains("phase=\"batch_wait\"")
        })
        .filter_map(|(k, &n)| {
            let le = k.split("le=\"").nth(1)?.split('"').next()?;
            Some((le.parse().unwrap_or(f64::INFINITY), n))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The bucket bound under which at least half of the waits recorded between two scrapes lie
/// (the median is at most this, and above the bound before it), and how many waits there were.
fn median_wait_bound(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let at = |v: &[(f64, f64)], le: f64| v.iter().find(|(b, _)| *b == le).map_or(0.0, |&(_, n)| n);
    let count = after.last().map_or(0.0, |&(_, n)| n) - before.last().map_or(0.0, |&(_, n)| n);
    let bound = after
        .iter()
        .find(|&&(le, n)| n - at(before, le) >= count / 2.0)
        .map_or(f64::INFINITY, |&(le, _)| le);
    (bound, count)
}

/// A fixed window holds a lone caller for about its length, on a serving thread (gRPC) and on
/// the main runtime (HTTP): the time a request waited for company is, at the median, within
/// the window + 0.5 ms (the next bucket bound of the `batch_wait` histogram: 0.8 ms for 100
/// and 300 µs, 1.6 ms for 1 ms), and not under half the window. tokio's millisecond timer
/// made a 100 µs window 1-2 ms. Then the default (adaptive, bounded by 2 ms) does not hold a
/// lone caller for company.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_window_holds_a_lone_caller_its_length_and_the_default_not_at_all() {
    const MODEL: &str = "add_sub_delay";
    let http = reqwest::Client::new();
    let body = serde_json::json!({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": vec![1.0; 16]},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": vec![0.5; 16]},
    ]});
    let calls = 31;
    // `None`: the default settings.
    for window_us in [Some(100u64), Some(300), Some(1_000), None] {
        let cfg = match window_us {
            Some(w) => {
                let window = ModelBatching {
                    mode: Some(BatchMode::On),
                    max_queue_delay_us: Some(w),
                    ..Default::default()
                };
                config_with(MODEL, window, |c| c.server.grpc_threads = 1)
            }
            None => {
                let mut c = test_config(vec![triton().grpc_url()]);
                c.server.grpc_threads = 1;
                c
            }
        };
        let gw = gateway_with(cfg).await;
        let mut client = gw.client().await;
        for protocol in ["grpc", "http"] {
            let before = wait_buckets(&scrape(&http, &gw.http_base()).await, MODEL);
            let started = Instant::now();
            for k in 0..calls {
                if protocol == "grpc" {
                    let (mut req, a, b) = add_sub(1, 7_000 + k);
                    req.model_name = MODEL.into();
                    let r = client.model_infer(req).await.expect("call").into_inner();
                    assert_own_rows(&r, 7_000 + k, &a, &b);
                } else {
                    let r = post_json(
                        &http,
                        &format!("{}/v2/models/{MODEL}/infer", gw.http_base()),
                        &body,
                    )
                    .await;
                    assert_eq!(r["outputs"][0]["data"], serde_json::json!(vec![1.5; 16]));
                }
            }
            let per_call = started.elapsed() / calls;
            let after = wait_buckets(&scrape(&http, &gw.http_base()).await, MODEL);
            let (bound, count) = median_wait_bound(&before, &after);
            assert_eq!(
                count,
                f64::from(calls),
                "each call waited in the batcher once"
            );
            println!(
                "window {window_us:?} µs, {protocol}: median wait ≤ {bound} s, {per_call:?} per call"
            );
            match window_us {
                Some(w) => {
                    let limit = (w as f64 + 500.0) / 1e6;
                    // The histogram's bounds double from 100 µs: the first at or above the limit.
                    let allowed = after
                        .iter()
                        .map(|&(le, _)| le)
                        .find(|&le| le >= limit - 1e-9)
                        .unwrap();
                    assert!(
                        bound <= allowed,
                        "{protocol}, window {w} µs: median wait over {allowed} s (under {bound} s)"
                    );
                    let half = w as f64 / 2e6;
                    let under_half = after
                        .iter()
                        .filter(|&&(le, _)| le <= half)
                        .map(|&(le, n)| n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1))
                        .fold(0.0, f64::max);
                    assert!(
                        under_half < count / 2.0,
                        "{protocol}, window {w} µs: most requests were not held"
                    );
                }
                // Held, it would wait up to the adaptive bound (2 ms); what is left is the hop
                // to the batcher's actor on a busy host.
                None => assert!(
                    bound <= 4e-4,
                    "{protocol}, default: a lone caller waited (median under {bound} s)"
                ),
            }
        }
        gw.shutdown().await.expect("drains");
    }
}

/// One window, not two: a model whose Triton config has a batching delay of its own, batched
/// by infergate too, is named in a warning at start with both delays and the recommended
/// setting; Triton's queue time for it then shows in infergate's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batching_windows_are_reported_at_start_and_triton_queue_time_is_a_metric() {
    use std::io::{BufRead, BufReader};
    let mut child = reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args(["serve", "--triton-url", &triton().grpc_url()])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut warnings = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("two windows") {
            warnings.push(line);
            // add_sub_delay and add_sub_preferred both have one; add_sub has none.
            if warnings.len() == 2 {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let delay = warnings
        .iter()
        .find(|l| l.contains("'add_sub_delay'"))
        .unwrap_or_else(|| panic!("no warning for add_sub_delay: {warnings:?}"));
    let w: serde_json::Value = serde_json::from_str(delay).unwrap();
    assert_eq!(w["level"], "WARN", "{w}");
    assert_eq!(w["triton_max_queue_delay_us"], 100, "{w}");
    assert_eq!(w["infergate_window_us"], 2_000, "{w}");
    let msg = w["message"].as_str().unwrap();
    assert!(msg.contains("max_queue_delay_microseconds: 0"), "{msg}");
    assert!(
        warnings.iter().all(|l| !l.contains("'add_sub'")),
        "add_sub has no Triton delay: {warnings:?}"
    );

    // Triton's queue statistics, read every 100 ms.
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.triton.stats_interval_ms = 100;
    let gw = gateway_with(cfg).await;
    let mut client = gw.client().await;
    for k in 0..5 {
        let (mut req, _, _) = add_sub(1, 8_000 + k);
        req.model_name = "add_sub_preferred".into();
        client.model_infer(req).await.expect("call");
    }
    let http = reqwest::Client::new();
    let key = |name: &str| format!("infergate_{name}{{model=\"add_sub_preferred\"}}");
    let mut m = scrape(&http, &gw.http_base()).await;
    for _ in 0..50 {
        if m.get(&key("triton_queued_requests_total"))
            .copied()
            .unwrap_or(0.0)
            >= 5.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = scrape(&http, &gw.http_base()).await;
    }
    assert!(m[&key("triton_queued_requests_total")] >= 5.0, "{m:?}");
    // Triton's own window: up to 500 µs each for these lone requests.
    assert!(m[&key("triton_queue_seconds_total")] > 0.0, "{m:?}");
    gw.shutdown().await.expect("drains");
}
