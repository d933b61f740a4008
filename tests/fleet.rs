//! The fleet against real Tritons: three servers in explicit model control mode, each with a
//! repository of its own (only the first holds `text_stats`), behind one infergate. Model
//! load and unload through infergate, over HTTP and gRPC, must change every endpoint, and an
//! endpoint refusing must be reported as such. Then placement: a model held by one endpoint
//! gets all its calls there, while a model all three hold spreads over them. Then sequences
//! of a stateful model: each stays on the server holding its state, and fails clearly once
//! that server is gone.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;

use common::*;
use infergate::proto::inference::{RepositoryModelLoadRequest, RepositoryModelUnloadRequest};
use serde_json::Value;

/// A model repository of the given models of triton-models/, in a fresh directory.
fn repository(dir: &Path, models: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for m in models {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(repo().join("triton-models").join(m))
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "copy {m}");
    }
}

/// Each Triton's own answer to "is `model` ready?", asked directly: once it is `want`, or
/// as it stands after 5 s. Triton's HTTP ready route may still answer 404 for a few
/// milliseconds after its gRPC ModelReady says ready (seen on this host); it is not asked
/// once only.
fn ready_on(tritons: &[&Triton], model: &str, want: &[bool]) -> Vec<bool> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now: Vec<bool> = tritons
            .iter()
            .map(|t| http_status(t.http_port, &format!("/v2/models/{model}/ready")) == Some(200))
            .collect();
        if now.as_slice() == want || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until no Triton still holds `model`: Triton answers an unload at once and unloads
/// the model once its calls are done, so the next load could otherwise race it.
async fn unloaded(http: &reqwest::Client, tritons: &[&Triton], model: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for t in tritons {
        loop {
            let index: Value = http
                .post(format!("{}/v2/repository/index", t.http_base()))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let held = index
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == model && m["state"] != "UNAVAILABLE");
            if !held {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{model} stays: {index}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// One sequence of `accumulate` through infergate: step k adds `id + k`, and each answer
/// must be the running sum.
async fn run_sequence(
    mut infer: infergate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    id: u64,
    steps: u64,
) -> Result<(), tonic::Status> {
    use infergate::proto::inference::{InferParameter, infer_parameter::ParameterChoice};
    let mut sum = 0.0f32;
    for k in 0..steps {
        let x = (id + k) as f32;
        sum += x;
        let flag = |b: bool| InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(b)),
        };
        let mut req = one_input("accumulate", x);
        req.parameters.insert(
            "sequence_id".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(id as i64)),
            },
        );
        req.parameters.insert("sequence_start".into(), flag(k == 0));
        req.parameters
            .insert("sequence_end".into(), flag(k + 1 == steps));
        let out = infer.model_infer(req).await?.into_inner();
        let total = f32_from(&out.raw_output_contents[0]);
        assert_eq!(total, vec![sum], "sequence {id}, step {k}");
    }
    Ok(())
}

/// The rows a Triton inferred for `model` (its own statistics); 0 when it does not hold it.
async fn inferences(http: &reqwest::Client, triton: &str, model: &str) -> u64 {
    let r = http
        .get(format!("{triton}/v2/models/{model}/stats"))
        .send()
        .await
        .unwrap();
    if !r.status().is_success() {
        return 0;
    }
    let stats: Value = r.json().await.unwrap();
    stats["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["inference_count"].as_u64().unwrap())
        .sum()
}

async fn control(http: &reqwest::Client, base: &str, model: &str, action: &str) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v2/repository/models/{model}/{action}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_reach_every_endpoint_and_a_refusal_is_reported() {
    let dir = std::env::temp_dir().join(format!("infergate-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (repo_a, repo_b, repo_c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    repository(&repo_a, &["add_sub", "text_stats", "accumulate"]);
    repository(&repo_b, &["add_sub", "accumulate"]);
    repository(&repo_c, &["add_sub", "accumulate"]);
    // Strict readiness would make a server unready once one of its models is unloaded or
    // failed to load, and infergate reads server readiness as the endpoint's health.
    let explicit = [
        "--model-control-mode=explicit".to_string(),
        "--strict-readiness=false".to_string(),
    ];
    let a = Triton::serving(Some(&repo_a), None, &explicit);
    let b = Triton::serving(Some(&repo_b), None, &explicit);
    let mut c = Triton::serving(Some(&repo_c), None, &explicit);
    let all = [&a, &b, &c];
    assert_eq!(
        ready_on(&all, "add_sub", &[false; 3]),
        [false; 3],
        "nothing loaded at start"
    );

    let gw = gateway_with(test_config(vec![a.grpc_url(), b.grpc_url(), c.grpc_url()])).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();

    // HTTP: load and unload change every server; the answer lists each.
    let (status, body) = control(&http, &base, "add_sub", "load").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready_on(&all, "add_sub", &[true; 3]), [true; 3]);
    let each = body["endpoints"].as_array().unwrap();
    assert_eq!(each.len(), 3, "{body}");
    assert!(each.iter().all(|e| e["ok"] == true), "{body}");
    assert_eq!(each[0]["endpoint"], a.grpc_url());
    assert_eq!(each[1]["endpoint"], b.grpc_url());
    assert_eq!(each[2]["endpoint"], c.grpc_url());

    let (status, body) = control(&http, &base, "add_sub", "unload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready_on(&all, "add_sub", &[false; 3]), [false; 3]);
    unloaded(&http, &all, "add_sub").await;

    // A model only the first repository holds: loaded there, refused by the second, and
    // the answer says so, endpoint by endpoint.
    let (status, body) = control(&http, &base, "text_stats", "load").await;
    assert_ne!(status, 200, "{body}");
    assert_eq!(
        ready_on(&all, "text_stats", &[true, false, false]),
        [true, false, false],
        "{body}"
    );
    let each = body["endpoints"].as_array().unwrap();
    assert_eq!(each[0]["ok"], true, "{body}");
    assert_eq!(each[1]["ok"], false, "{body}");
    assert_eq!(each[2]["ok"], false, "{body}");
    assert!(
        !each[1]["error"].as_str().unwrap().is_empty(),
        "the refusal carries Triton's reason: {body}"
    );
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("failed on 2 of 3"), "{error}");
    assert!(error.contains(&b.grpc_url()), "{error}");
    assert!(error.contains(&c.grpc_url()), "{error}");
    assert!(!error.contains(&a.grpc_url()), "{error}");

    // Malformed parameters are refused before any endpoint is asked.
    let r = http
        .post(format!("{base}/v2/repository/models/add_sub/load"))
        .body(r#"{"parameters": {"config": 1.5}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("'config'"));
    assert_eq!(ready_on(&all, "add_sub", &[false; 3]), [false; 3]);

    // gRPC: the same, through RepositoryModelLoad and RepositoryModelUnload.
    let mut client = connect(&gw.grpc_url()).await;
    let load = |model: &str| RepositoryModelLoadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    let unload = |model: &str| RepositoryModelUnloadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    client.repository_model_load(load("add_sub")).await.unwrap();
    assert_eq!(ready_on(&all, "add_sub", &[true; 3]), [true; 3]);
    // Served through infergate, now that every server has it.
    let mut infer = client.clone();
    for _ in 0..4 {
        let out = infer
            .model_infer(add_sub_request())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.model_name, "add_sub");
    }
    client
        .repository_model_unload(unload("add_sub"))
        .await
        .unwrap();
    assert_eq!(ready_on(&all, "add_sub", &[false; 3]), [false; 3]);
    unloaded(&http, &all, "add_sub").await;

    client
        .repository_model_unload(unload("text_stats"))
        .await
        .unwrap();
    unloaded(&http, &all, "text_stats").await;
    let refused = client
        .repository_model_load(load("text_stats"))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("failed on 2 of 3"),
        "{refused:?}"
    );
    assert!(refused.message().contains(&b.grpc_url()), "{refused:?}");
    assert_eq!(
        ready_on(&all, "text_stats", &[true, false, false]),
        [true, false, false]
    );

    // Placement: text_stats is ready on the first endpoint alone, add_sub on all three.
    client.repository_model_load(load("add_sub")).await.unwrap();
    assert_eq!(ready_on(&all, "add_sub", &[true; 3]), [true; 3]);
    let count = |m: &'static str| {
        let http = http.clone();
        let tritons: Vec<String> = all.iter().map(|t| t.http_base()).collect();
        async move {
            let mut out = Vec::new();
            for t in tritons {
                out.push(inferences(&http, &t, m).await);
            }
            out
        }
    };
    let (stats_before, adds_before) = (count("text_stats").await, count("add_sub").await);
    let n = 90u64;
    let calls = (0..n).map(|k| {
        let (http, base, mut infer) = (http.clone(), base.clone(), infer.clone());
        async move {
            let text = http
                .post(format!("{base}/v2/models/text_stats/infer"))
                .json(&serde_json::json!({"inputs": [{
                    "name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [format!("w{k}")]
                }]}))
                .send()
                .await
                .unwrap();
            let status = text.status().as_u16();
            let body: Value = text.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["outputs"][0]["data"][0], format!("W{k}"), "{body}");
            infer.model_infer(add_sub_request()).await.unwrap();
        }
    });
    futures::stream::iter(calls)
        .buffer_unordered(6)
        .collect::<Vec<()>>()
        .await;
    let spread = |after: Vec<u64>, before: &[u64]| -> Vec<u64> {
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    };
    let texts = spread(count("text_stats").await, &stats_before);
    let adds = spread(count("add_sub").await, &adds_before);
    println!("{n} calls of each: text_stats {texts:?}, add_sub {adds:?} per endpoint");
    assert_eq!(texts, [n, 0, 0], "all where the model is ready");
    assert_eq!(adds.iter().sum::<u64>(), n);
    assert!(
        adds.iter().all(|&k| k * 100 >= n * 10),
        "add_sub spreads over all three: {adds:?}"
    );
    let ready = |m: &BTreeMap<String, f64>, url: &str| {
        m.get(&format!(
            "infergate_triton_model_ready{{endpoint=\"{url}\",model=\"text_stats\"}}"
        ))
        .copied()
    };
    let m = scrape(&http, &base).await;
    assert_eq!(ready(&m, &a.grpc_url()), Some(1.0));
    assert_eq!(ready(&m, &b.grpc_url()), None);

    // A model ready nowhere: a clear NOT_FOUND naming it.
    let mut nowhere = add_sub_request();
    nowhere.model_name = "seq_sum".into();
    let e = infer.model_infer(nowhere).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .contains("'seq_sum' is ready on none of the 3 Triton endpoints"),
        "{e:?}"
    );
    // Unloaded through infergate: refused at once, not sent to where it was.
    client
        .repository_model_unload(unload("text_stats"))
        .await
        .unwrap();
    let r = http
        .post(format!("{base}/v2/models/text_stats/infer"))
        .json(&serde_json::json!({"inputs": [{
            "name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]
        }]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("'text_stats' is ready on none"), "{body}");
    assert_eq!(ready(&scrape(&http, &base).await, &a.grpc_url()), Some(0.0));

    let empty = client.repository_model_load(load("")).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    // Sequences: 100 of a stateful model, 20 steps each, all open at once over the three
    // endpoints. Each step's answer is the running sum, which only the server that started
    // the sequence knows (another refuses the step).
    client
        .repository_model_load(load("accumulate"))
        .await
        .unwrap();
    assert_eq!(ready_on(&all, "accumulate", &[true; 3]), [true; 3]);
    let sequences = (1..=100u64).map(|id| run_sequence(infer.clone(), id, 20));
    let outcomes = futures::future::join_all(sequences).await;
    let failed: Vec<_> = outcomes.iter().filter(|o| o.is_err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let per = count("accumulate").await;
    println!("100 sequences x 20 steps: steps per endpoint {per:?}");
    assert_eq!(per.iter().sum::<u64>(), 2000);
    assert!(
        per.iter().all(|&k| k > 0 && k % 20 == 0),
        "whole sequences on each endpoint: {per:?}"
    );

    // The third endpoint stops: the sequences it would hold fail, naming it (their state is
    // gone with it); the others still add up.
    let gone = c.grpc_url();
    c.stop();
    let up = format!("infergate_triton_endpoint_up{{endpoint=\"{gone}\"}}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while scrape(&http, &base).await.get(&up) != Some(&0.0) {
        assert!(std::time::Instant::now() < deadline, "the stop is seen");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sequences = (201..=230u64).map(|id| run_sequence(infer.clone(), id, 3));
    let outcomes = futures::future::join_all(sequences).await;
    let refused: Vec<&tonic::Status> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(!refused.is_empty() && refused.len() < 30, "{refused:?}");
    for e in &refused {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            e.message()
                .contains(&format!("lives on Triton endpoint {gone}")),
            "{e:?}"
        );
    }

    gw.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGKILLs the tritonserver serving gRPC on `port` (not its start script: no clean stop).
fn kill_triton(port: u16) {
    let ok = Command::new("pkill")
        .args(["-KILL", "-f", "--", &format!("--grpc-port={port}")])
        .status()
        .unwrap()
        .success();
    assert!(ok, "a tritonserver on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_fails_only_its_calls_in_flight_and_unsent_calls_go_elsewhere() {
    let dir = std::env::temp_dir().join(format!("infergate-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    repository(&dir, &["add_sub"]);
    let tritons: Vec<Triton> = (0..3)
        .map(|_| Triton::serving(Some(&dir), None, &[]))
        .collect();
    // Probed once at start: from then on only calls tell the gateway an endpoint is gone.
    let mut cfg = test_config(tritons.iter().map(|t| t.grpc_url()).collect());
    cfg.triton.health_interval_ms = 600_000;
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&http, &gw.http_base()).await;
        let up = |t: &Triton| {
            m.get(&format!(
                "infergate_triton_endpoint_up{{endpoint=\"{}\"}}",
                t.grpc_url()
            )) == Some(&1.0)
        };
        if tritons.iter().all(up) {
            break;
        }
        assert!(Instant::now() < deadline, "all three probed ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Under load (8 calls in flight), the third Triton is SIGKILLed: only calls in flight on
    // it can fail, and none started after the gateway knew.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(
        Vec::<(Instant, Result<(), String>)>::new(),
    ));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (mut c, stop, outcomes) = (client.clone(), stop.clone(), outcomes.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = c
                    .model_infer(add_sub_request())
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{:?}: {}", e.code(), e.message()));
                outcomes.lock().unwrap().push((started, r));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let killed_at = Instant::now();
    kill_triton(tritons[2].grpc_port);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    let before = outcomes.iter().filter(|(t, _)| *t < killed_at).count();
    println!(
        "{} calls, {before} before the kill; failed: {failed:?}",
        outcomes.len()
    );
    assert!(failed.len() <= 8, "at most the calls in flight: {failed:?}");
    let late = killed_at + Duration::from_millis(500);
    assert!(
        failed.iter().all(|(t, _)| *t < late),
        "none after the gateway knew: {failed:?}"
    );
    assert!(outcomes.iter().filter(|(t, _)| *t >= late).count() > 50);

    // The second Triton is SIGKILLed with no call in flight; the gateway still takes it for
    // ready (no probe, no failed call yet). Calls that pick it cannot connect: Triton never
    // received them, so each goes once to the first Triton, and none fails.
    let retries = "infergate_triton_retries_total";
    let before = scrape(&http, &gw.http_base()).await.get(retries).copied();
    kill_triton(tritons[1].grpc_port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = (0..32).map(|_| {
        let mut c = client.clone();
        async move { c.model_infer(add_sub_request()).await }
    });
    let answers = futures::future::join_all(calls).await;
    let errors: Vec<_> = answers.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let after = scrape(&http, &gw.http_base()).await[retries];
    println!("retried: {before:?} -> {after}");
    assert!(after > before.unwrap_or(0.0), "a call was sent again");

    gw.shutdown().await.unwrap();
    drop(tritons);
    let _ = std::fs::remove_dir_all(&dir);
}
