//! A test that plays KEDA against infergate's external scaler: a gRPC client calling
//! GetMetricSpec, GetMetrics, IsActive and StreamIsActive while real load runs through two
//! front ends sharing a real Redis (task store and broker) in front of a real Triton.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::*;
use infergate::proto::{
    externalscaler::{
        GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
    },
    inference::{
        InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
        model_infer_request::InferInputTensor,
    },
};
use serde_json::json;
use tonic::transport::Channel;

const REDIS: &str = "redis://127.0.0.1:6379";

fn config(prefix: &str, scaler: bool) -> infergate::config::Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.into();
    // No worker: accepted tasks stay queued, as when GPUs are not there yet.
    cfg.tasks.workers = 0;
    cfg.tasks.ttl_ms = 120_000;
    cfg.scaler.share_interval_ms = 100;
    cfg.scaler.stream_interval_ms = 5_000;
    cfg.scaler.baseline_horizon_s = 5;
    cfg.scaler.baseline_half_life_s = 1;
    cfg.scaler.baseline_bucket_s = 1;
    if scaler {
        cfg.scaler.addr = Some("127.0.0.1:0".parse().unwrap());
    }
    cfg
}

async fn scaler_gateway(
    cfg: infergate::config::Config,
) -> (TestGateway, ExternalScalerClient<Channel>) {
    let port = free_port();
    let mut cfg = cfg;
    cfg.scaler.addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let gw = gateway_with(cfg).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        match ExternalScalerClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("scaler at {port}: {e}"),
        }
    };
    (gw, client)
}

fn object(name: &str, models: &str) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        namespace: "gpu".into(),
        scaler_metadata: HashMap::from([
            ("models".to_string(), models.to_string()),
            ("tasksPerReplica".to_string(), "10".to_string()),
            ("capacityPerReplica".to_string(), "2".to_string()),
            ("maxReplicas".to_string(), "20".to_string()),
        ]),
    }
}

async fn desired(c: &mut ExternalScalerClient<Channel>, o: &ScaledObjectRef) -> i64 {
    let r = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(o.clone()),
            metric_name: "s0-infergate-desired-replicas".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.metric_values.len(), 1);
    assert_eq!(
        r.metric_values[0].metric_name,
        "s0-infergate-desired-replicas"
    );
    r.metric_values[0].metric_value
}

fn slow_call(delay_ms: i64) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "slow".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[1.0])],
        parameters: HashMap::from([(
            "delay_ms".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(delay_ms)),
            },
        )]),
        ..Default::default()
    }
}

/// The tests time calls of the `slow` model: one at a time.
static SLOW: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_between_two_polls_reaches_the_baseline() {
    let _slow = SLOW.lock().await;
    let prefix = format!("igscaler-{}", infergate::tasks::new_task_id());
    let (gw, mut keda) = scaler_gateway(config(&prefix, true)).await;
    let pool = object("burst-pool", "slow");
    // KEDA's first poll makes the object known; the next comes after the burst is over.
    assert_eq!(desired(&mut keda, &pool).await, 0);
    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = gw.client().await;
        calls.push(tokio::spawn(async move {
            c.model_infer(slow_call(1_500)).await
        }));
    }
    for c in calls {
        c.await.unwrap().expect("slow call");
    }
    let burst = started.elapsed();
    // 8 calls against 2 per replica asked for 4 while they ran; the baseline remembers it
    // for its 5 s horizon, though no poll saw them.
    let after = desired(&mut keda, &pool).await;
    println!("a {burst:?} burst of 8 calls between two polls: the next poll asks {after}");
    assert!(after >= 2, "the burst did not reach the baseline: {after}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keda_sees_the_queue_the_calls_in_flight_and_the_recent_peak() {
    let _slow = SLOW.lock().await;
    let prefix = format!("igscaler-{}", infergate::tasks::new_task_id());
    let (gw, mut keda) = scaler_gateway(config(&prefix, true)).await;
    // A second front end, without the scaler: its calls count through Redis.
    let other = gateway_with(config(&prefix, false)).await;
    let http = reqwest::Client::new();
    let triton_pool = object("triton", "add_sub");
    let slow_pool = object("slow-pool", "slow");

    let spec = keda
        .get_metric_spec(triton_pool.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(
        spec.metric_specs[0].metric_name,
        "infergate-desired-replicas"
    );
    assert_eq!(spec.metric_specs[0].target_size, 1);
    let mut bad = triton_pool.clone();
    bad.scaler_metadata.remove("models");
    let err = keda.get_metric_spec(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("scalerMetadata.models"),
        "{}",
        err.message()
    );
    // Metadata is held to the flags' bounds, and its models to what this front end serves:
    // a typo or a zero is refused naming it, never answered with a pool pinned at its minimum.
    for (key, value, named) in [
        ("models", "ADD_SUB", "'ADD_SUB'"),
        ("models", "add_sub,no_such_model", "'no_such_model'"),
        ("tasksPerReplica", "0", "scalerMetadata.tasksPerReplica"),
        ("maxReplicas", "0", "scalerMetadata.maxReplicas"),
        ("maxReplicas", "4294967295", "scalerMetadata.maxReplicas"),
        (
            "capacityPerReplica",
            "-1",
            "scalerMetadata.capacityPerReplica",
        ),
    ] {
        let mut bad = triton_pool.clone();
        bad.scaler_metadata.insert(key.into(), value.into());
        let err = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(bad.clone()),
                metric_name: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{key}={value}");
        assert!(
            err.message().contains(named),
            "{key}={value}: {}",
            err.message()
        );
        assert!(keda.is_active(bad).await.is_err(), "{key}={value}");
    }

    // Scaled to zero: nothing asked.
    assert!(
        !keda
            .is_active(triton_pool.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert_eq!(desired(&mut keda, &triton_pool).await, 0);
    let mut stream = keda
        .stream_is_active(triton_pool.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.result, "idle at first");

    // Tier 1: a burst of 45 queued tasks. The stream says active at once (its own poll is
    // 5 s away), and the metric asks for 45 / 10 per replica = 5.
    let ones = [1.0f32; 16];
    let body = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": ones},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": ones}]});
    let sent = Instant::now();
    for _ in 0..45 {
        let r = http
            .post(format!("{}/v1/models/add_sub/tasks", gw.http_base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let pushed = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .expect("StreamIsActive pushes the first task without waiting for its poll")
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    println!(
        "StreamIsActive: active {:?} after the first task was sent",
        sent.elapsed()
    );
    assert!(
        keda.is_active(triton_pool.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert_eq!(desired(&mut keda, &triton_pool).await, 5);
    let m = scrape(&http, &gw.http_base()).await;
    let series = |tier: &str| {
        m.get(&format!(
            "infergate_scaler_replicas{{object=\"gpu/triton\",tier=\"{tier}\"}}"
        ))
        .copied()
    };
    assert_eq!(series("queue"), Some(5.0), "{m:?}");
    assert_eq!(series("desired"), Some(5.0));

    // Tier 2: sync load with an empty queue, on the other front end. Eight calls of 2.5 s in
    // flight against 2 per replica ask for 4.
    assert_eq!(desired(&mut keda, &slow_pool).await, 0);
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = other.client().await;
        calls.push(tokio::spawn(async move {
            c.model_infer(slow_call(2_500)).await
        }));
    }
    // KEDA polls through the load; the last poll whose reactive tier asked for 4 is when
    // the peak was last recorded.
    let mut seen = 0;
    let mut last_four = None;
    while !calls.iter().all(|c| c.is_finished()) {
        let v = desired(&mut keda, &slow_pool).await;
        seen = seen.max(v);
        let m = scrape(&http, &gw.http_base()).await;
        let tier = |t: &str| {
            m.get(&format!(
                "infergate_scaler_replicas{{object=\"gpu/slow-pool\",tier=\"{t}\"}}"
            ))
            .copied()
        };
        if tier("reactive") == Some(4.0) {
            last_four = Some(Instant::now());
            assert_eq!(v, 4);
            assert_eq!(tier("queue"), Some(0.0), "nothing queued for slow");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen, 4,
        "8 calls in flight on the other front end, 2 per replica"
    );
    for c in calls {
        c.await.unwrap().expect("slow call");
    }
    assert!(last_four.is_some(), "a poll saw the 8 calls");
    let ended = Instant::now();

    // The scaler restarts: the baseline (in Redis) is still there for a new process.
    let restart = Instant::now();
    drop(stream);
    gw.shutdown().await.unwrap();
    let stopped = restart.elapsed();
    let (gw, mut keda) = scaler_gateway(config(&prefix, true)).await;
    assert_eq!(
        desired(&mut keda, &triton_pool).await,
        5,
        "the queue is still there"
    );
    println!(
        "scaler stopped in {stopped:?}, answering again {:?} after the restart began",
        restart.elapsed()
    );

    // Tier 3: with nothing in flight, the recent peak holds for the horizon (5 s), then
    // halves every second until it is gone.
    let mut trace = Vec::new();
    loop {
        let v = desired(&mut keda, &slow_pool).await;
        let t = ended.elapsed();
        trace.push((t.as_secs_f64(), v));
        if v == 0 || t > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("baseline after the calls ended (s, replicas): {trace:?}");
    let m = scrape(&http, &gw.http_base()).await;
    assert!(
        m.contains_key(
            "infergate_scaler_decisions_total{object=\"gpu/slow-pool\",winner=\"baseline\"}"
        ),
        "{m:?}"
    );
    assert!(
        trace.windows(2).all(|w| w[1].1 <= w[0].1),
        "never rises: {trace:?}"
    );
    // The peak asked for while the calls ran (2 to 4, as they finished) holds with nothing
    // in flight for about the horizon, then decays to zero within a few half-lives.
    assert!(trace[0].1 >= 2, "{trace:?}");
    let last_held = trace
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(t, _)| *t)
        .fold(0.0, f64::max);
    assert!(
        last_held >= 4.5,
        "held for about the 5 s horizon: {trace:?}"
    );
    assert!(
        trace.iter().any(|(_, v)| *v > 0 && *v < trace[0].1),
        "decays through smaller values: {trace:?}"
    );
    assert_eq!(
        trace.last().unwrap().1,
        0,
        "gone after the decay: {trace:?}"
    );
    assert!(trace.last().unwrap().0 < 12.0, "{trace:?}");
    drop(other);
    drop(gw);
}
