//! The fleet against real Tritons: two servers in explicit model control mode, each with a
//! repository of its own (the second lacks `text_stats`), behind one infergate. Model load
//! and unload through infergate, over HTTP and gRPC, must change every endpoint, and one
//! endpoint refusing must be reported as such.

mod common;

use std::{path::Path, process::Command};

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
fn ready_on(tritons: &[&Triton], model: &str, want: [bool; 2]) -> Vec<bool> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now: Vec<bool> = tritons
            .iter()
            .map(|t| http_status(t.http_port, &format!("/v2/models/{model}/ready")) == Some(200))
            .collect();
        if now == want || std::time::Instant::now() > deadline {
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
    let (repo_a, repo_b) = (dir.join("a"), dir.join("b"));
    repository(&repo_a, &["add_sub", "text_stats"]);
    repository(&repo_b, &["add_sub"]);
    // Strict readiness would make a server unready once one of its models is unloaded or
    // failed to load, and infergate reads server readiness as the endpoint's health.
    let explicit = [
        "--model-control-mode=explicit".to_string(),
        "--strict-readiness=false".to_string(),
    ];
    let a = Triton::serving(Some(&repo_a), None, &explicit);
    let b = Triton::serving(Some(&repo_b), None, &explicit);
    let both = [&a, &b];
    assert_eq!(
        ready_on(&both, "add_sub", [false, false]),
        [false, false],
        "nothing loaded at start"
    );

    let gw = gateway_with(test_config(vec![a.grpc_url(), b.grpc_url()])).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();

    // HTTP: load and unload change both servers; the answer lists each.
    let (status, body) = control(&http, &base, "add_sub", "load").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready_on(&both, "add_sub", [true, true]), [true, true]);
    let each = body["endpoints"].as_array().unwrap();
    assert_eq!(each.len(), 2, "{body}");
    assert!(each.iter().all(|e| e["ok"] == true), "{body}");
    assert_eq!(each[0]["endpoint"], a.grpc_url());
    assert_eq!(each[1]["endpoint"], b.grpc_url());

    let (status, body) = control(&http, &base, "add_sub", "unload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready_on(&both, "add_sub", [false, false]), [false, false]);
    unloaded(&http, &both, "add_sub").await;

    // A model only the first repository holds: loaded there, refused by the second, and
    // the answer says so, endpoint by endpoint.
    let (status, body) = control(&http, &base, "text_stats", "load").await;
    assert_ne!(status, 200, "{body}");
    assert_eq!(
        ready_on(&both, "text_stats", [true, false]),
        [true, false],
        "{body}"
    );
    let each = body["endpoints"].as_array().unwrap();
    assert_eq!(each[0]["ok"], true, "{body}");
    assert_eq!(each[1]["ok"], false, "{body}");
    assert!(
        !each[1]["error"].as_str().unwrap().is_empty(),
        "the refusal carries Triton's reason: {body}"
    );
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("failed on 1 of 2"), "{error}");
    assert!(error.contains(&b.grpc_url()), "{error}");
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
    assert_eq!(ready_on(&both, "add_sub", [false, false]), [false, false]);

    // gRPC: the same, through RepositoryModelLoad and RepositoryModelUnload.
    let mut client = connect(&gw.grpc_url()).await;
    let load = |model: &str| RepositoryModelLoadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    client.repository_model_load(load("add_sub")).await.unwrap();
    assert_eq!(ready_on(&both, "add_sub", [true, true]), [true, true]);
    // Served through infergate on both, now that both have it.
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
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "add_sub".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ready_on(&both, "add_sub", [false, false]), [false, false]);
    unloaded(&http, &both, "add_sub").await;

    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "text_stats".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    unloaded(&http, &both, "text_stats").await;
    let refused = client
        .repository_model_load(load("text_stats"))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("failed on 1 of 2"),
        "{refused:?}"
    );
    assert!(refused.message().contains(&b.grpc_url()), "{refused:?}");
    assert_eq!(ready_on(&both, "text_stats", [true, false]), [true, false]);

    let empty = client.repository_model_load(load("")).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    gw.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
