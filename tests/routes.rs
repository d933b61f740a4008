//! Model routes against a real Triton: a 90/10 split over gRPC, sticky keys, HTTP and tasks
//! through a route, a route's metadata, config and readiness, and a reload on SIGHUP under
//! load.

mod common;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use infergate::proto::inference::{
    InferParameter, ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest,
    infer_parameter::ParameterChoice,
};
use serde_json::{Value, json};

fn routes_file(tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infergate-routes-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const CANARY: &str = r#"
[routes.canary]
sticky_parameter = "user"
sticky_header = "x-user-id"
targets = [
  { model = "add_sub", weight = 90 },
  { model = "add_sub_delay", weight = 10 },
]
"#;

fn canary_request(user: Option<&str>) -> infergate::proto::inference::ModelInferRequest {
    let mut req = add_sub_request();
    req.model_name = "canary".into();
    if let Some(u) = user {
        req.parameters.insert(
            "user".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(u.into())),
            },
        );
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_route_splits_sticks_and_describes_itself() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.routes.file = Some(routes_file("split", CANARY));
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;

    // 10,000 requests without a sticky key: each arm within 1.5 points of its weight, every
    // answer computed by the model it names.
    let n = 10_000;
    let served: Vec<String> = futures::stream::iter(0..n)
        .map(|_| {
            let mut c = client.clone();
            async move {
                let r = c
                    .model_infer(canary_request(None))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(f32_from(&r.raw_output_contents[0]), vec![3.0; 16]);
                assert_eq!(f32_from(&r.raw_output_contents[1]), vec![1.0; 16]);
                r.model_name
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut by_model: HashMap<&str, usize> = HashMap::new();
    for m in &served {
        *by_model.entry(m.as_str()).or_default() += 1;
    }
    let share = |m: &str| 100.0 * *by_model.get(m).unwrap_or(&0) as f64 / n as f64;
    println!(
        "10,000 requests on a 90/10 route: add_sub {:.2} %, add_sub_delay {:.2} %",
        share("add_sub"),
        share("add_sub_delay")
    );
    assert_eq!(by_model.len(), 2, "{by_model:?}");
    assert!((share("add_sub") - 90.0).abs() <= 1.5, "{by_model:?}");
    assert!((share("add_sub_delay") - 10.0).abs() <= 1.5, "{by_model:?}");

    // A sticky key keeps its caller on one arm, every request.
    let mut arms = HashMap::new();
    for u in 0..300 {
        let user = format!("user-{u}");
        let mut c = client.clone();
        for _ in 0..4 {
            let m = c
                .model_infer(canary_request(Some(&user)))
                .await
                .unwrap()
                .into_inner()
                .model_name;
            let first = arms.entry(user.clone()).or_insert_with(|| m.clone());
            assert_eq!(*first, m, "{user} moved arms");
        }
    }
    let on_canary = arms.values().filter(|m| *m == "add_sub_delay").count();
    println!("sticky: 300 users x 4 requests, {on_canary} users on the 10 % arm");
    assert!((10..=60).contains(&on_canary), "{on_canary}");

    // A sticky header does the same, over gRPC, HTTP and tasks alike (and wins over the
    // parameter): one arm per user.
    let http = reqwest::Client::new();
    let (twos, ones) = ([2.0f32; 16], [1.0f32; 16]);
    let body = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": twos},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": ones}]});
    // POSTs `body` to `path` as `user` (the sticky header), answers the JSON.
    let post_as = |path: &'static str, user: String| {
        let (http, body, url) = (
            http.clone(),
            body.clone(),
            format!("{}{path}", gw.http_base()),
        );
        async move {
            http.post(url)
                .header("x-user-id", user)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let mut by_header: HashMap<String, String> = HashMap::new();
    let mut tasks = Vec::new();
    for u in 0..100 {
        let user = format!("header-user-{u}");
        let mut c = client.clone();
        let mut arms = Vec::new();
        for k in 0..3 {
            // The parameter names another user each time: the header decides.
            let mut req = tonic::Request::new(canary_request(Some(&format!("other-{u}-{k}"))));
            req.metadata_mut()
                .insert("x-user-id", user.parse().unwrap());
            arms.push(c.model_infer(req).await.unwrap().into_inner().model_name);
        }
        let r = post_as("/v2/models/canary/infer", user.clone()).await;
        arms.push(r["model_name"].as_str().unwrap().to_string());
        assert!(arms.iter().all(|a| *a == arms[0]), "{user}: {arms:?}");
        if u < 20 {
            let t = post_as("/v1/models/canary/tasks", user.clone()).await;
            tasks.push((t["id"].as_str().unwrap().to_string(), arms[0].clone()));
        }
        by_header.insert(user, arms.swap_remove(0));
    }
    let ids: Vec<String> = tasks.iter().map(|(id, _)| id.clone()).collect();
    let done = wait_final(&http, &gw.http_base(), &ids, Duration::from_secs(30)).await;
    for (t, (_, arm)) in done.iter().zip(&tasks) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(
            t["model"].as_str(),
            Some(arm.as_str()),
            "a task keeps its caller's arm"
        );
    }
    let on_canary = by_header.values().filter(|m| *m == "add_sub_delay").count();
    println!("sticky header: 100 users x 4 requests + 20 tasks, {on_canary} users on the 10 % arm");
    assert!((2..=25).contains(&on_canary), "{on_canary}");

    // HTTP and tasks call the route as a model.
    let r = post_json(
        &http,
        &format!("{}/v2/models/canary/infer", gw.http_base()),
        &body,
    )
    .await;
    assert!(
        ["add_sub", "add_sub_delay"].contains(&r["model_name"].as_str().unwrap()),
        "{r}"
    );
    let t = post_json(
        &http,
        &format!("{}/v1/models/canary/tasks", gw.http_base()),
        &body,
    )
    .await;
    let id = t["id"].as_str().expect("a task id").to_string();
    let done = wait_final(&http, &gw.http_base(), &[id], Duration::from_secs(20)).await;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert!(
        ["add_sub", "add_sub_delay"].contains(&done[0]["model"].as_str().unwrap_or_default()),
        "the task names the model that ran it: {}",
        done[0]
    );

    // The route's description is its primary's (the 90 % arm), under the route's name.
    let mut c = client.clone();
    let md = c
        .model_metadata(ModelMetadataRequest {
            name: "canary".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.name, "canary");
    assert_eq!(md.inputs.len(), 2);
    let cfg = c
        .model_config(ModelConfigRequest {
            name: "canary".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cfg.config.unwrap().name, "canary");
    let ready = c
        .model_ready(ModelReadyRequest {
            name: "canary".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    let http_cfg: Value = http
        .get(format!("{}/v2/models/canary/config", gw.http_base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http_cfg["name"], "canary");
    let mut versioned = canary_request(None);
    versioned.model_version = "1".into();
    let err = c.model_infer(versioned).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("model_version"), "{}", err.message());

    let m = scrape(&http, &gw.http_base()).await;
    let count = |target: &str| {
        m.get(&format!(
            "infergate_route_requests_total{{route=\"canary\",target=\"{target}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert!(count("add_sub") + count("add_sub_delay") >= (n + 1200 + 2) as f64);
}

#[test]
fn a_reload_on_sighup_moves_traffic_without_dropping_a_request() {
    let file = routes_file("reload", CANARY);
    let (grpc, http) = (free_port(), free_port());
    let log = file.with_file_name("infergate.stderr");
    let mut child = infergate(
        &[
            "serve".into(),
            "--triton-url".into(),
            triton().grpc_url(),
            "--grpc-addr".into(),
            format!("127.0.0.1:{grpc}"),
            "--http-addr".into(),
            format!("127.0.0.1:{http}"),
            "--routes-file".into(),
            file.display().to_string(),
        ],
        &log,
    );
    wait_status(http, "/readyz", 200, Duration::from_secs(30));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&format!("http://127.0.0.1:{grpc}")).await;
        let (stop, errors, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        // Steady load through the route during both reloads; every answer is kept with its
        // time, so traffic before and after each reload can be told apart.
        let answers = Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
        let mut load = Vec::new();
        for _ in 0..8 {
            let (mut c, stop, errors, sent, answers) = (
                client.clone(),
                stop.clone(),
                errors.clone(),
                sent.clone(),
                answers.clone(),
            );
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    match c.model_infer(canary_request(None)).await {
                        Ok(r) => answers
                            .lock()
                            .unwrap()
                            .push((Instant::now(), r.into_inner().model_name)),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // All traffic to the canary.
        std::fs::write(
            &file,
            CANARY.replace("weight = 90", "weight = 0").replace("weight = 10", "weight = 100"),
        )
        .unwrap();
        signal(child.id(), "HUP");
        let reloaded = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A file that does not load, then one whose fallback does not take the target's
        // inputs (checked against Triton): both refused, the running routes stay.
        std::fs::write(&file, "[routes.canary]\ntargets = []\n").unwrap();
        signal(child.id(), "HUP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::write(
            &file,
            "[routes.canary]\ntargets = [{ model = \"add_sub\", weight = 1 }]\nfallback = { model = \"slow\" }\n",
        )
        .unwrap();
        signal(child.id(), "HUP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A target Triton does not serve (a typo, and no fallback): every call to the route
        // would answer NOT_FOUND, so it is refused too.
        std::fs::write(
            &file,
            "[routes.canary]\ntargets = [{ model = \"add_sub\", weight = 1 }, { model = \"ADD_SUB\", weight = 1 }]\n",
        )
        .unwrap();
        signal(child.id(), "HUP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for l in load {
            l.await.unwrap();
        }
        let answers = std::mem::take(&mut *answers.lock().unwrap());
        let before = answers.iter().filter(|(t, _)| *t < reloaded).count();
        // Requests that started before the signal may finish after it: skip the first 100 ms.
        let after: Vec<&String> = answers
            .iter()
            .filter(|(t, _)| *t > reloaded + Duration::from_millis(100))
            .map(|(_, m)| m)
            .collect();
        println!(
            "reload under load: {} requests, {} errors; {before} before the reload, {} after it, all on add_sub_delay: {}",
            sent.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            after.len(),
            after.iter().all(|m| *m == "add_sub_delay")
        );
        assert_eq!(errors.load(Ordering::Relaxed), 0, "no request dropped");
        assert!(before > 100 && after.len() > 100);
        assert!(
            after.iter().all(|m| *m == "add_sub_delay"),
            "the new weights hold, also after the refused file"
        );
        // One reload taken, three refused: the first by the file's own checks (their messages
        // are checked in routes::file's unit test), the second by the fallback's inputs, the
        // third by a target Triton does not know.
        let m = scrape(&reqwest::Client::new(), &format!("http://127.0.0.1:{http}")).await;
        assert_eq!(
            m.get("infergate_route_reloads_total{result=\"ok\"}"),
            Some(&1.0),
            "{m:?}"
        );
        assert_eq!(
            m.get("infergate_route_reloads_total{result=\"refused\"}"),
            Some(&3.0)
        );
    });
    signal(child.id(), "TERM");
    let _ = child.wait();
}

const FLAKY_CONTROL: &str = "/tmp/infergate-flaky-control";

fn flaky_request() -> infergate::proto::inference::ModelInferRequest {
    let mut req = one_input("guarded", 7.0);
    // For the fallback (`slow`): answer at once.
    req.parameters.insert(
        "delay_ms".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(0)),
        },
    );
    req
}

/// One answer of the steady load: when its request started, when it was answered, and the
/// model that answered (or the error).
type Outcome = (Instant, Instant, Result<String, String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_target_opens_its_breaker_and_the_fallback_answers() {
    let _ = std::fs::remove_file(FLAKY_CONTROL);
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.routes.file = Some(routes_file(
        "fallback",
        r#"
[routes.guarded]
targets = [{ model = "flaky", weight = 100 }]
fallback = { model = "slow" }
slo_ms = 150
breaker = { consecutive_failures = 3, cooldown_ms = 1000, probes = 2 }

[routes.deadline]
targets = [{ model = "slow", weight = 100 }]
fallback = { model = "flaky" }
breaker = { consecutive_failures = 1000, cooldown_ms = 10000 }
"#,
    ));
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::<Outcome>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (mut c, stop, outcomes) = (client.clone(), stop.clone(), outcomes.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = c
                    .model_infer(flaky_request())
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        assert_eq!(f32_from(&r.raw_output_contents[0]), vec![7.0]);
                        r.model_name
                    })
                    .map_err(|e| e.message().to_string());
                outcomes.lock().unwrap().push((started, Instant::now(), r));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let breaker = |m: &std::collections::BTreeMap<String, f64>| {
        m.get("infergate_route_breaker_state{route=\"guarded\",target=\"flaky\"}")
            .copied()
    };
    // Phases: healthy, stopped (fails), healthy, slower than the SLO, healthy.
    let mut marks = Vec::new();
    for mode in ["", "fail", "", "slow:400", ""] {
        // Marked first: every answer the new mode can have given comes after its mark.
        marks.push((mode, Instant::now()));
        std::fs::write(FLAKY_CONTROL, mode).unwrap();
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        if mode.is_empty() {
            assert_eq!(
                breaker(&scrape(&http, &gw.http_base()).await),
                Some(0.0),
                "closed when healthy"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let _ = std::fs::remove_file(FLAKY_CONTROL);
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let phase = |k: usize| -> Vec<&Outcome> {
        let start = marks[k].1;
        let end = marks.get(k + 1).map(|m| m.1);
        outcomes
            .iter()
            .filter(|(t, _, _)| *t >= start && end.is_none_or(|e| *t < e))
            .collect()
    };
    let summary = |k: usize| {
        let p = phase(k);
        let by = |m: &str| p.iter().filter(|(_, _, r)| r.as_deref() == Ok(m)).count();
        let errors = p.iter().filter(|(_, _, r)| r.is_err()).count();
        (by("flaky"), by("slow"), errors)
    };
    for (k, (mode, _)) in marks.iter().enumerate() {
        let errors: std::collections::BTreeSet<_> = phase(k)
            .iter()
            .filter_map(|(_, _, r)| r.clone().err())
            .collect();
        println!(
            "phase {k} ({mode:?}): (flaky, fallback, errors) = {:?} {errors:?}",
            summary(k)
        );
    }
    // Stopped: the breaker opens after its 3 failures; once a fallback answer has come back
    // (the circuit was open when that request was routed), no request started later fails:
    // the probes that still fail are answered by the fallback. The phase's answers are those
    // that came after its mark: requests sent just before it may run after it, and fail. (A
    // request's start here is not its routing in the gateway: two requests may be routed in
    // the other order.)
    let stopped: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(t, answered, _)| *answered >= marks[1].1 && *t < marks[2].1)
        .collect();
    let opened = stopped
        .iter()
        .filter(|(_, _, r)| r.as_deref() == Ok("slow"))
        .map(|(_, answered, _)| *answered)
        .min()
        .expect("the fallback answered while the target failed");
    let errors_before_open = stopped.iter().filter(|(_, _, r)| r.is_err()).count();
    assert!(
        (1..=8).contains(&errors_before_open),
        "{errors_before_open}"
    );
    assert!(
        stopped
            .iter()
            .filter(|(t, _, _)| *t > opened)
            .all(|(_, _, r)| r.is_ok()),
        "no errors after the breaker opened"
    );
    // Slower than the SLO: never an error, and the fallback takes over.
    let (_, fallback_slow, errors_slow) = summary(3);
    assert_eq!(errors_slow, 0);
    assert!(fallback_slow > 20, "{fallback_slow}");
    // Healthy again: the probes close it and the last second is the target's alone.
    for k in [2, 4] {
        let end = marks.get(k + 1).map_or(Instant::now(), |m| m.1);
        let tail: Vec<_> = phase(k)
            .into_iter()
            .filter(|(t, _, _)| *t > end - Duration::from_millis(1_000))
            .collect();
        assert!(tail.len() > 10, "phase {k}");
        assert!(
            tail.iter().all(|(_, _, r)| r.as_deref() == Ok("flaky")),
            "phase {k}: traffic returned to the target"
        );
    }
    let m = scrape(&http, &gw.http_base()).await;
    assert!(m["infergate_route_fallbacks_total{route=\"guarded\",target=\"slow\"}"] > 40.0);

    // A deadline the target would miss: `slow` takes 300 ms a call. Callers without a
    // deadline teach the route that; then callers with 150 ms are answered by the fallback
    // (no error), callers with 3 s still by the target.
    let deadline_request = |ms: Option<u64>| {
        let mut r = flaky_request();
        r.model_name = "deadline".into();
        r.parameters.insert(
            "delay_ms".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(300)),
            },
        );
        let mut req = tonic::Request::new(r);
        if let Some(ms) = ms {
            req.set_timeout(Duration::from_millis(ms));
        }
        req
    };
    let mut c = client.clone();
    for _ in 0..3 {
        let r = c.model_infer(deadline_request(None)).await.unwrap();
        assert_eq!(r.into_inner().model_name, "slow");
    }
    let mut served = Vec::new();
    for _ in 0..20 {
        let r = c.model_infer(deadline_request(Some(150))).await;
        served.push(r.map(|r| r.into_inner().model_name).map_err(|e| e.code()));
    }
    println!("20 requests with 150 ms on a 300 ms target: {served:?}");
    assert!(
        served.iter().all(|r| r.as_deref() == Ok("flaky")),
        "{served:?}"
    );
    let r = c.model_infer(deadline_request(Some(3_000))).await.unwrap();
    assert_eq!(r.into_inner().model_name, "slow", "time enough: the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_gets_its_share_and_the_caller_only_the_primarys_answers() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.routes.file = Some(routes_file(
        "shadow",
        r#"
[routes.shadowed]
targets = [{ model = "add_sub", weight = 1 }]
shadow = { model = "add_sub_delay", share = 0.2, max_in_flight = 256 }
"#,
    ));
    let gw = gateway_with(cfg).await;
    let client = gw.client().await;
    // 5,000 draws of 20 %: one standard deviation is 0.57 points, the bound 2.
    let n = 5_000;
    let served: Vec<String> = futures::stream::iter(0..n)
        .map(|_| {
            let mut c = client.clone();
            async move {
                let mut req = add_sub_request();
                req.model_name = "shadowed".into();
                let r = c.model_infer(req).await.unwrap().into_inner();
                assert_eq!(f32_from(&r.raw_output_contents[0]), vec![3.0; 16]);
                r.model_name
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        served.iter().all(|m| m == "add_sub"),
        "callers get the primary's answers only"
    );
    // The shadow calls finish after their callers were answered.
    let http = reqwest::Client::new();
    let series = |m: &std::collections::BTreeMap<String, f64>, name: &str, result: &str| {
        m.get(&format!("{name}{{route=\"shadowed\",result=\"{result}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    // Counted when they finish: wait until the count holds still for half a second.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (-1.0, Instant::now());
    let m = loop {
        let m = scrape(&http, &gw.http_base()).await;
        let done = series(&m, "infergate_route_shadow_total", "sent")
            + series(&m, "infergate_route_shadow_total", "failed")
            + series(&m, "infergate_route_shadow_total", "dropped");
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(500) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (sent, failed, dropped) = (
        series(&m, "infergate_route_shadow_total", "sent"),
        series(&m, "infergate_route_shadow_total", "failed"),
        series(&m, "infergate_route_shadow_total", "dropped"),
    );
    let share = 100.0 * (sent + failed + dropped) / n as f64;
    println!(
        "shadow: {sent} sent, {failed} failed, {dropped} dropped of {n} requests ({share:.2} %)"
    );
    assert!((share - 20.0).abs() <= 2.0, "{share}");
    assert_eq!((failed, dropped), (0.0, 0.0));
    // The same computation on both: every answer matches, the largest difference is 0.
    assert_eq!(
        series(&m, "infergate_route_shadow_compared_total", "match"),
        sent
    );
    assert_eq!(
        series(&m, "infergate_route_shadow_compared_total", "mismatch"),
        0.0
    );
    assert_eq!(
        m.get("infergate_route_shadow_max_abs_diff_sum{route=\"shadowed\"}"),
        Some(&0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_routes_file_is_taken_without_a_signal_when_watched() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    let file = routes_file(
        "watch",
        "[routes.watched]\ntargets = [{ model = \"add_sub\", weight = 1 }]\n",
    );
    cfg.routes.file = Some(file.clone());
    cfg.routes.watch_ms = 100;
    let gw = gateway_with(cfg).await;
    let mut c = gw.client().await;
    let served = |r: infergate::proto::inference::ModelInferResponse| r.model_name;
    let mut req = add_sub_request();
    req.model_name = "watched".into();
    assert_eq!(
        served(c.model_infer(req.clone()).await.unwrap().into_inner()),
        "add_sub"
    );
    // As a ConfigMap update does: the file's content changes, no one signals.
    std::fs::write(
        &file,
        "[routes.watched]\ntargets = [{ model = \"add_sub_delay\", weight = 1 }]\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    loop {
        let m = served(c.model_infer(req.clone()).await.unwrap().into_inner());
        if m == "add_sub_delay" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not taken in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("watched file taken after {:?}", started.elapsed());
    // A bad change is refused and the running routes stay.
    std::fs::write(&file, "[routes.watched]\ntargets = []\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served(c.model_infer(req).await.unwrap().into_inner()),
        "add_sub_delay"
    );
    let m = scrape(&reqwest::Client::new(), &gw.http_base()).await;
    assert_eq!(
        m.get("infergate_route_reloads_total{result=\"ok\"}"),
        Some(&1.0)
    );
    assert_eq!(
        m.get("infergate_route_reloads_total{result=\"refused\"}"),
        Some(&1.0)
    );
}
