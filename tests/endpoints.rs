//! A model failing on one of two real Triton servers: its calls leave that endpoint (the
//! model's circuit there opens), callers see no error once it has, and after the endpoint
//! heals the circuit's probes close it and the endpoint serves again. Each Triton serves its
//! own copy of `flaky`, made to fail through its own control file.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;

/// A model repository holding `flaky` alone, reading its mode from `control`.
fn flaky_repo(tag: &str) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("triton-models/flaky");
    let dir =
        std::env::temp_dir().join(format!("infergate-endpoints-{tag}-{}", std::process::id()));
    let control = dir.join("control");
    std::fs::create_dir_all(dir.join("flaky/1")).unwrap();
    let config = std::fs::read_to_string(root.join("config.pbtxt"))
        .unwrap()
        .replace("/tmp/infergate-flaky-control", control.to_str().unwrap());
    std::fs::write(dir.join("flaky/config.pbtxt"), config).unwrap();
    std::fs::copy(root.join("1/model.py"), dir.join("flaky/1/model.py")).unwrap();
    let _ = std::fs::remove_file(&control);
    (dir, control)
}

/// Both endpoints passed their probe, as the gateway's metrics say.
async fn both_ready(http: &reqwest::Client, base: &str) -> bool {
    let up = scrape(http, base)
        .await
        .iter()
        .filter(|(k, v)| k.starts_with("infergate_triton_endpoint_up") && **v == 1.0)
        .count();
    up == 2
}

fn request() -> infergate::proto::inference::ModelInferRequest {
    one_input("flaky", 4.0)
}

/// Calls of `flaky` a Triton has run, answered or failed.
async fn calls(triton: &Triton) -> u64 {
    let mut c = connect(&triton.grpc_url()).await;
    let s = c
        .model_statistics(infergate::proto::inference::ModelStatisticsRequest {
            name: "flaky".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats[0]
        .clone()
        .inference_stats
        .unwrap();
    s.success.unwrap().count + s.fail.unwrap().count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_on_one_endpoint_leaves_it_and_comes_back_when_it_heals() {
    let ((repo_a, _), (repo_b, control_b)) = (flaky_repo("a"), flaky_repo("b"));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Triton::serving(Some(&repo_a), None, &[]));
        let b = s.spawn(|| Triton::serving(Some(&repo_b), None, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut cfg = test_config(vec![a.grpc_url(), b.grpc_url()]);
    cfg.triton.breaker_failures = 3;
    cfg.triton.breaker_cooldown_ms = 1_000;
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    let http = reqwest::Client::new();
    // The load starts once the gateway has probed both endpoints: until its first probe it
    // answers UNAVAILABLE (no endpoint known ready), which is right, but not this test's point.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !both_ready(&http, &gw.http_base()).await {
        assert!(
            Instant::now() < deadline,
            "the gateway never saw both endpoints ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool)>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (mut c, stop, outcomes) = (client.clone(), stop.clone(), outcomes.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = match c.model_infer(request()).await {
                    Ok(r) => {
                        assert_eq!(f32_from(&r.into_inner().raw_output_contents[0]), vec![4.0]);
                        true
                    }
                    Err(_) => false,
                };
                outcomes.lock().unwrap().push((started, ok));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Phases: both healthy, B failing the model, B healed.
    let mut marks = Vec::new();
    for mode in ["", "fail", ""] {
        // The phase's mark comes first: a request started before the model changed belongs
        // to the phase that follows it (it may run after the change).
        marks.push((Instant::now(), calls(&a).await, calls(&b).await));
        std::fs::write(&control_b, mode).unwrap();
        tokio::time::sleep(Duration::from_millis(3_000)).await;
    }
    marks.push((Instant::now(), calls(&a).await, calls(&b).await));
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let phase = |k: usize| {
        let (from, to) = (marks[k].0, marks[k + 1].0);
        let p: Vec<_> = outcomes
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .collect();
        let errors = p.iter().filter(|(_, ok)| !ok).count();
        (
            p.len(),
            errors,
            marks[k + 1].1 - marks[k].1,
            marks[k + 1].2 - marks[k].2,
        )
    };
    for (k, name) in ["healthy", "B fails", "B healed"].iter().enumerate() {
        let (n, errors, on_a, on_b) = phase(k);
        println!("{name}: {n} requests, {errors} errors; Triton A ran {on_a}, B ran {on_b}");
    }
    let (_, errors, on_a, on_b) = phase(0);
    assert_eq!(errors, 0);
    assert!(on_a > 30 && on_b > 30, "both serve: {on_a} {on_b}");
    // Failing: the circuit opens after its 3 failures (plus what was in flight then); its
    // probes each second fail, but another endpoint answers their callers.
    let (n, errors, on_a, on_b) = phase(1);
    assert!(errors <= 3 + 4, "{errors} errors of {n}");
    assert!(on_b <= 3 + 4 + 3 * 4, "B ran {on_b} while failing");
    assert!(on_a > 100, "A took the model's calls: {on_a}");
    // Healed: the probes close it and B serves again.
    let (_, errors, _, on_b) = phase(2);
    assert_eq!(errors, 0);
    assert!(on_b > 30, "B serves again: {on_b}");
    let m = scrape(&http, &gw.http_base()).await;
    let state = format!(
        "infergate_triton_breaker_state{{endpoint=\"{}\",model=\"flaky\"}}",
        b.grpc_url()
    );
    assert_eq!(m.get(&state), Some(&0.0), "closed again");
}
