//! Completion webhooks, end to end against the real Triton and Redis: a receiver in this test
//! checks every delivery's Standard Webhooks signature (its own HMAC-SHA256, per tenant secret)
//! and timestamp; a receiver that is down for 30 s still gets every delivery, once, when it is
//! back, and the task shows how the delivery went; a delivery outlives the process that was
//! retrying it (SIGKILLed; another process takes it over from the outbox), and one past the
//! bound on deliveries retrying waits in the outbox instead of failing; a callback URL off
//! the allow-list, or on an address not listed, is refused at submit (400 over HTTP,
//! INVALID_ARGUMENT over gRPC).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use infergate::{
    config::{ApiKey, Config},
    proto::tasks::{GetRequest, SubmitRequest, task_service_client::TaskServiceClient},
};
use serde_json::{Value, json};
use sha2::Sha256;

const KEY_A: &str = "tenant-a-key-0123456789";
const KEY_B: &str = "tenant-b-key-0123456789";
/// Tenant a's own secret (Standard Webhooks form); tenant b signs with the default one.
const SECRET_A: &str = "whsec_c2VjcmV0LW9mLXRlbmFudC1hLTAxMjM0NTY3";
const SECRET_DEFAULT: &str = "the-default-secret-0123";

fn secret_of(tenant: &str) -> Vec<u8> {
    match tenant {
        "a" => base64::engine::general_purpose::STANDARD
            .decode(SECRET_A.trim_start_matches("whsec_"))
            .unwrap(),
        _ => SECRET_DEFAULT.as_bytes().to_vec(),
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Receipt {
    tenant: String,
    id: String,
    signed: bool,
    fresh: bool,
    body: Value,
}

type Receipts = Arc<Mutex<Vec<Receipt>>>;

/// Checks the signature as a receiver would, with its own HMAC: any `v1,` entry of the
/// space-separated header must match HMAC-SHA256(secret, "id.timestamp.body").
async fn hook(
    State(got): State<Receipts>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, ts, sigs) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret_of(&tenant)).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&body);
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let signed = sigs
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()));
    let fresh = ts.parse::<u64>().is_ok_and(|t| t.abs_diff(now_s()) <= 300);
    got.lock().unwrap().push(Receipt {
        tenant,
        id,
        signed,
        fresh,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    if signed && fresh {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// The receiver, listening on `port` until stopped.
struct Receiver {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(port: u16, got: Receipts) -> Self {
        let app = Router::new()
            .route("/hook/{tenant}", post(hook))
            .with_state(got);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the receiver's port again");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

fn config(prefix: &str) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.into();
    cfg.tasks.workers = 2;
    cfg.tasks.max_attempts = 1;
    cfg.webhooks.allow_hosts = vec!["127.0.0.1".into(), "hooks.example.com".into()];
    cfg.webhooks.secret = Some(SECRET_DEFAULT.into());
    cfg.webhooks.max_backoff_ms = 2_000;
    cfg.webhooks.timeout_ms = 2_000;
    cfg.auth.keys = vec![
        ApiKey {
            key: KEY_A.into(),
            tenant: "a".into(),
            webhook_secret: Some(SECRET_A.into()),
            ..Default::default()
        },
        ApiKey {
            key: KEY_B.into(),
            tenant: "b".into(),
            ..Default::default()
        },
    ];
    cfg
}

fn client(key: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("x-api-key", key.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// The `slow` model: `delay_ms` 0 succeeds; a `delay_ms` that is not a number fails it.
fn one(x: f32, delay: Value) -> Value {
    json!({"parameters": {"delay_ms": delay},
        "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [x]}]})
}

async fn submit(http: &reqwest::Client, base: &str, body: &Value, callback: &str) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/models/slow/tasks"))
        .header("callback-url", callback)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Waits until `n` receipts are in (or `limit` passes) and returns them all.
async fn receipts(got: &Receipts, n: usize, limit: Duration) -> Vec<Receipt> {
    let deadline = Instant::now() + limit;
    loop {
        let now: Vec<Receipt> = got.lock().unwrap().clone();
        if now.len() >= n || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_and_a_receiver_down_for_30_s_gets_each_once() {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let gw = gateway_with(config(&prefix)).await;
    let base = gw.http_base();
    let (a, b) = (client(KEY_A), client(KEY_B));
    let port = free_port();
    let hook_url = |tenant: &str| format!("http://127.0.0.1:{port}/hook/{tenant}");
    let got: Receipts = Arc::default();

    // Up: each delivery arrives on its first try, signed with its tenant's secret.
    let receiver = Receiver::start(port, got.clone()).await;
    let mut first = Vec::new();
    for k in 0..4 {
        let (http, t) = if k % 2 == 0 { (&a, "a") } else { (&b, "b") };
        let (code, body) = submit(http, &base, &one(k as f32, json!(0)), &hook_url(t)).await;
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["callback_url"], hook_url(t), "{body}");
        first.push((body["id"].as_str().unwrap().to_string(), t));
    }
    // And one over gRPC, with the API key as metadata.
    let mut grpc = TaskServiceClient::new(connect_channel(&gw.grpc_url()).await);
    let mut req = tonic::Request::new(SubmitRequest {
        request: Some(infer_request(4.0)),
        idempotency_key: String::new(),
        callback_url: hook_url("a"),
    });
    req.metadata_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let grpc_id = grpc.submit(req).await.unwrap().into_inner().id;
    first.push((grpc_id.clone(), "a"));
    let seen = receipts(&got, first.len(), Duration::from_secs(60)).await;
    assert_eq!(seen.len(), first.len(), "{seen:#?}");
    for (id, tenant) in &first {
        let r: Vec<_> = seen
            .iter()
            .filter(|r| r.body["data"]["id"] == **id)
            .collect();
        assert_eq!(r.len(), 1, "one delivery for {id}: {seen:#?}");
        let r = r[0];
        assert!(r.signed && r.fresh, "{r:?}");
        assert_eq!(r.tenant, *tenant);
        assert_eq!(r.body["type"], "task.succeeded", "{r:?}");
        assert_eq!(r.body["data"]["status"], "succeeded");
        assert_eq!(
            r.body["data"]["result_url"],
            format!("/v1/tasks/{id}/result")
        );
        assert!(
            r.id.starts_with(id.as_str()),
            "webhook-id {} names the task",
            r.id
        );
    }
    // The task shows its delivery (the state is written just after the answer: poll a little).
    let http_of = |t: &str| if t == "a" { &a } else { &b };
    for (id, tenant) in &first[..4] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = task(http_of(tenant), &base, id).await;
            if t["webhook"]["state"] == "delivered" {
                assert_eq!(t["webhook"]["attempts"], 1, "{t}");
                assert_eq!(t["webhook"]["last_status"], 204, "{t}");
                break;
            }
            assert!(Instant::now() < deadline, "not shown delivered: {t}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut req = tonic::Request::new(GetRequest {
        id: grpc_id.clone(),
    });
    req.metadata_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let w = grpc.get(req).await.unwrap().into_inner().webhook;
    assert_eq!(w.map(|w| w.state), Some("delivered".to_string()));

    // Down for 30 s: tasks that succeed and tasks that fail meanwhile are delivered once it is
    // back, each once.
    receiver.stop().await;
    let down_at = Instant::now();
    got.lock().unwrap().clear();
    // The poison ones go after the others are done: the model fails a whole batch.
    let mut second = Vec::new();
    for (range, ok) in [(0..8, true), (8..10, false)] {
        let mut ids = Vec::new();
        for k in range {
            let (http, t) = if k % 2 == 0 { (&a, "a") } else { (&b, "b") };
            let delay = if ok { json!(0) } else { json!("poison") };
            let (code, body) = submit(http, &base, &one(k as f32, delay), &hook_url(t)).await;
            assert_eq!(code, 202, "{body}");
            ids.push(body["id"].as_str().unwrap().to_string());
            second.push((body["id"].as_str().unwrap().to_string(), t, ok));
        }
        // The task list is per tenant: wait on each through its own key.
        for (id, t, _) in second.iter().filter(|s| ids.contains(&s.0)) {
            let done = &wait_final(
                http_of(t),
                &base,
                std::slice::from_ref(id),
                Duration::from_secs(60),
            )
            .await[0];
            assert_eq!(
                done["status"],
                if ok { "succeeded" } else { "failed" },
                "{done}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down_at.elapsed())).await;
    for (id, tenant, _) in &second {
        let t = task(http_of(tenant), &base, id).await;
        assert_eq!(t["webhook"]["state"], "pending", "{t}");
        assert!(t["webhook"]["attempts"].as_u64().unwrap() >= 2, "{t}");
        assert!(t["webhook"]["last_error"].is_string(), "{t}");
    }
    assert!(got.lock().unwrap().is_empty());
    let down_for = down_at.elapsed();
    let receiver = Receiver::start(port, got.clone()).await;
    let back_at = Instant::now();
    let seen = receipts(&got, second.len(), Duration::from_secs(30)).await;
    let caught_up = back_at.elapsed();
    // A little longer, to see that nothing comes twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen_all = got.lock().unwrap().clone();
    assert_eq!(seen.len(), second.len(), "{seen:#?}");
    assert_eq!(
        seen_all.len(),
        second.len(),
        "a delivery came twice: {seen_all:#?}"
    );
    let mut attempts = Vec::new();
    for (id, tenant, ok) in &second {
        let r: Vec<_> = seen_all
            .iter()
            .filter(|r| r.body["data"]["id"] == **id)
            .collect();
        assert_eq!(r.len(), 1, "one delivery for {id}");
        let r = r[0];
        assert!(r.signed && r.fresh, "{r:?}");
        assert_eq!(r.tenant, *tenant);
        let status = if *ok { "succeeded" } else { "failed" };
        assert_eq!(r.body["type"], format!("task.{status}"), "{r:?}");
        if !ok {
            assert!(r.body["data"]["error"].is_object(), "{r:?}");
            assert!(r.body["data"]["result_url"].is_null(), "{r:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            let t = task(http_of(tenant), &base, id).await;
            if t["webhook"]["state"] == "delivered" || Instant::now() >= deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(t["webhook"]["state"], "delivered", "{t}");
        assert_eq!(t["webhook"]["id"], r.id.as_str(), "{t}");
        attempts.push(t["webhook"]["attempts"].as_u64().unwrap());
    }
    assert!(attempts.iter().all(|&n| n >= 2), "{attempts:?}");
    println!(
        "webhooks: receiver down {:.1} s; {} deliveries (8 succeeded, 2 failed tasks) all arrived \
         {:.1} s after it was back, each once, every signature valid; tries per delivery {:?}",
        down_for.as_secs_f64(),
        seen_all.len(),
        caught_up.as_secs_f64(),
        attempts
    );
    let m = scrape(&a, &base).await;
    assert!(
        m.get("infergate_webhooks_total{result=\"delivered\"}")
            .copied()
            >= Some(15.0),
        "{:?}",
        m.iter()
            .filter(|(k, _)| k.contains("webhook"))
            .collect::<Vec<_>>()
    );
    receiver.stop().await;
    gw.shutdown().await.unwrap();
}

/// The process retrying deliveries dies: a worker process finishes 6 tasks while the receiver
/// is down, tries each delivery a few times, and is SIGKILLed. Another process (here the
/// front end, which runs no workers) takes each delivery over from the outbox once the dead
/// one's hold ends; the receiver, back at the kill, gets each once, signed, and the task
/// counts the tries on from where the dead process stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_outlives_the_process_that_was_retrying_it() {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let mut cfg = config(&prefix);
    cfg.tasks.workers = 0;
    cfg.webhooks.max_backoff_ms = 1_000;
    cfg.webhooks.timeout_ms = 1_000;
    let hold = infergate::tasks::webhooks::hold(&cfg.webhooks);
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let b = client(KEY_B);
    let port = free_port();
    let hook_url = format!("http://127.0.0.1:{port}/hook/b");
    let log = std::env::temp_dir().join(format!("{prefix}-worker.log"));
    let args: Vec<String> = [
        "worker",
        "--triton-url",
        &triton().grpc_url(),
        "--broker",
        REDIS,
        "--task-store",
        REDIS,
        "--redis-prefix",
        &prefix,
        "--workers",
        "1",
        "--task-max-attempts",
        "1",
        "--webhook-allow-host",
        "127.0.0.1",
        "--webhook-secret",
        SECRET_DEFAULT,
        "--webhook-max-backoff-ms",
        "1000",
        "--webhook-timeout-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut worker = infergate(&args, &log);

    let mut ids = Vec::new();
    for k in 0..6 {
        let (code, body) = submit(&b, &base, &one(k as f32, json!(0)), &hook_url).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Every task done by the worker process, and each delivery tried there at least twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before: Vec<u64> = loop {
        let mut tries = Vec::new();
        for id in &ids {
            let t = task(&b, &base, id).await;
            if t["status"] == "succeeded" && t["webhook"]["state"] == "pending" {
                tries.push(t["webhook"]["attempts"].as_u64().unwrap());
            }
        }
        if tries.len() == ids.len() && tries.iter().all(|&n| n >= 2) {
            break tries;
        }
        assert!(
            Instant::now() < deadline,
            "the worker process did not finish and try every delivery: {:?}; log {}",
            tries,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    signal(worker.id(), "KILL");
    let _ = worker.wait();
    let killed_at = Instant::now();
    let got: Receipts = Arc::default();
    let receiver = Receiver::start(port, got.clone()).await;
    let seen = receipts(&got, ids.len(), hold + Duration::from_secs(30)).await;
    let caught_up = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen_all = got.lock().unwrap().clone();
    assert_eq!(seen.len(), ids.len(), "{seen:#?}");
    assert_eq!(
        seen_all.len(),
        ids.len(),
        "a delivery came twice: {seen_all:#?}"
    );
    let mut after = Vec::new();
    for (id, tried) in ids.iter().zip(&before) {
        let r: Vec<_> = seen_all
            .iter()
            .filter(|r| r.body["data"]["id"] == **id)
            .collect();
        assert_eq!(r.len(), 1, "one delivery for {id}: {seen_all:#?}");
        assert!(r[0].signed && r[0].fresh, "{:?}", r[0]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            let t = task(&b, &base, id).await;
            if t["webhook"]["state"] == "delivered" || Instant::now() >= deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(t["webhook"]["state"], "delivered", "{t}");
        assert_eq!(t["webhook"]["id"], r[0].id.as_str(), "{t}");
        let n = t["webhook"]["attempts"].as_u64().unwrap();
        assert!(n > *tried, "the tries go on from {tried}: {t}");
        after.push(n);
    }
    // The front end took them over: it ran no task, so it owed none of its own.
    let m = scrape(&b, &base).await;
    assert!(
        m.get("infergate_webhooks_total{result=\"resumed\"}")
            .copied()
            >= Some(ids.len() as f64),
        "{:?}",
        m.iter()
            .filter(|(k, _)| k.contains("webhook"))
            .collect::<Vec<_>>()
    );
    println!(
        "webhooks: the worker process SIGKILLed after trying {} deliveries {:?} times each; \
         the front end took them over (hold {:.1} s) and all arrived {:.1} s after the kill, \
         each once, signed; tries in all {:?}",
        ids.len(),
        before,
        hold.as_secs_f64(),
        caught_up.as_secs_f64(),
        after
    );
    receiver.stop().await;
    gw.shutdown().await.unwrap();
}

/// Past `webhooks.max_pending` deliveries retrying in a process, a new one is not failed but
/// left in the outbox: with the receiver down, 2 deliveries retry and 3 wait; once it is back,
/// all 5 arrive, each once, the 3 taken up as room frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_past_max_pending_wait_in_the_outbox_and_none_is_lost() {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let mut cfg = config(&prefix);
    cfg.webhooks.max_pending = 2;
    cfg.webhooks.max_backoff_ms = 1_000;
    cfg.webhooks.timeout_ms = 1_000;
    let hold = infergate::tasks::webhooks::hold(&cfg.webhooks);
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let b = client(KEY_B);
    let port = free_port();
    let hook_url = format!("http://127.0.0.1:{port}/hook/b");
    let mut ids = Vec::new();
    for k in 0..5 {
        let (code, body) = submit(&b, &base, &one(k as f32, json!(0)), &hook_url).await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    for done in wait_final(&b, &base, &ids, Duration::from_secs(60)).await {
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let count = |m: &std::collections::BTreeMap<String, f64>, r: &str| {
        m.get(&format!("infergate_webhooks_total{{result=\"{r}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let m = scrape(&b, &base).await;
    assert_eq!(count(&m, "deferred"), 3.0, "{m:?}");
    assert_eq!(count(&m, "dropped"), 0.0);
    // Past the hold, with no room, still nobody takes them; nothing is marked failed.
    tokio::time::sleep(hold + Duration::from_secs(1)).await;
    for id in &ids {
        let t = task(&b, &base, id).await;
        assert_ne!(t["webhook"]["state"], "failed", "{t}");
    }
    let got: Receipts = Arc::default();
    let receiver = Receiver::start(port, got.clone()).await;
    let back_at = Instant::now();
    let seen = receipts(&got, ids.len(), Duration::from_secs(40)).await;
    let caught_up = back_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen_all = got.lock().unwrap().clone();
    assert_eq!(seen.len(), ids.len(), "{seen:#?}");
    assert_eq!(
        seen_all.len(),
        ids.len(),
        "a delivery came twice: {seen_all:#?}"
    );
    for id in &ids {
        let n = seen_all
            .iter()
            .filter(|r| r.body["data"]["id"] == **id && r.signed)
            .count();
        assert_eq!(n, 1, "one signed delivery for {id}: {seen_all:#?}");
    }
    let m = scrape(&b, &base).await;
    assert!(count(&m, "resumed") >= 3.0, "{m:?}");
    println!(
        "webhooks: max_pending 2, receiver down: 3 of 5 deliveries deferred to the outbox; \
         all 5 arrived {:.1} s after the receiver was back, each once",
        caught_up.as_secs_f64()
    );
    receiver.stop().await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_off_the_allow_list_is_refused_at_submit() {
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let mut cfg = config(&prefix);
    // Tenant b has no secret of its own, and now there is no default one either.
    cfg.webhooks.secret = None;
    let gw = gateway_with(cfg).await;
    let base = gw.http_base();
    let (a, b) = (client(KEY_A), client(KEY_B));
    for (http, url, why) in [
        (
            &a,
            "https://hooks.evil.example/done",
            "not on webhooks.allow_hosts",
        ),
        (
            &a,
            "http://127.0.0.2:9000/hook",
            "not on webhooks.allow_hosts",
        ),
        (
            &a,
            "http://169.254.169.254/latest/meta-data",
            "not on webhooks.allow_hosts",
        ),
        (&a, "http://[::1]:9000/hook", "not on webhooks.allow_hosts"),
        (&a, "http://10.0.0.7/hook", "not on webhooks.allow_hosts"),
        (&a, "ftp://hooks.example.com/x", "http"),
        (&a, "https://user:pw@hooks.example.com/x", "credentials"),
        (&a, "not a url", "is not a URL"),
        (&b, "https://hooks.example.com/x", "no webhook secret"),
    ] {
        let (code, body) = submit(http, &base, &one(1.0, json!(0)), url).await;
        assert_eq!(code, 400, "{url}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("callback_url") && msg.contains(why),
            "{url}: {body}"
        );
    }
    // Listed ones pass (nothing is delivered to hooks.example.com: it does not resolve here,
    // and the task's delivery says so).
    let (code, body) = submit(
        &a,
        &base,
        &one(1.0, json!(0)),
        "https://hooks.example.com/x",
    )
    .await;
    assert_eq!(code, 202, "{body}");

    let mut grpc = TaskServiceClient::new(connect_channel(&gw.grpc_url()).await);
    let mut req = tonic::Request::new(SubmitRequest {
        request: Some(infer_request(1.0)),
        idempotency_key: String::new(),
        callback_url: "http://169.254.169.254/".into(),
    });
    req.metadata_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let e = grpc.submit(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("callback_url"), "{e:?}");
    gw.shutdown().await.unwrap();
}

/// The `slow` model's request, in protobuf.
fn infer_request(x: f32) -> infergate::proto::inference::ModelInferRequest {
    let mut r = one_input("slow", x);
    r.parameters.insert(
        "delay_ms".into(),
        infergate::proto::inference::InferParameter {
            parameter_choice: Some(
                infergate::proto::inference::infer_parameter::ParameterChoice::Int64Param(0),
            ),
        },
    );
    r
}

async fn connect_channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}
