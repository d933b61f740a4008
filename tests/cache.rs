//! The response cache against a real Triton: repeated requests answered from it (Triton's own
//! counts prove they never reached it), over HTTP and gRPC, per tenant, expiring, and bounded in
//! memory while distinct requests stream through.

mod common;

use std::time::Duration;

use common::*;
use infergate::config::{ApiKey, Config};
use serde_json::{Value, json};
use tonic::Request;

/// Both tests count onnx_linear's executions on Triton: one at a time.
static ONNX: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KEY_A: &str = "tenant-a-cache-key-0123";
const KEY_B: &str = "tenant-b-cache-key-0123";

fn config(routes: &str, max_bytes: usize) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    let dir = std::env::temp_dir().join(format!(
        "infergate-cache-{}-{max_bytes}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("routes.toml");
    std::fs::write(&file, routes).unwrap();
    cfg.routes.file = Some(file);
    cfg.cache.max_bytes = max_bytes;
    cfg.auth.keys = [(KEY_A, "a"), (KEY_B, "b")]
        .into_iter()
        .map(|(key, tenant)| ApiKey {
            key: key.into(),
            tenant: tenant.into(),
            ..Default::default()
        })
        .collect();
    cfg
}

fn body(x: f32) -> Value {
    let data = [x; 4];
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": data}]})
}

/// POSTs one onnx_linear request as `key`; answers (cache header, outputs).
async fn infer(http: &reqwest::Client, base: &str, key: &str, x: f32) -> (bool, Value) {
    let r = http
        .post(format!("{base}/v2/models/onnx_linear/infer"))
        .header("x-api-key", key)
        .json(&body(x))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hit = r.headers().get("infergate-cache").is_some();
    let v: Value = r.json().await.unwrap();
    (hit, v["outputs"].clone())
}

/// Requests Triton counted for onnx_linear.
async fn executed() -> u64 {
    triton_stats("onnx_linear").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_come_from_the_cache_per_tenant_and_expire() {
    let _one = ONNX.lock().await;
    let gw = gateway_with(config("[cache.onnx_linear]\nttl_ms = 1500\n", 64 << 20)).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let before = executed().await;
    // Tenant A: the first asks Triton, the next 49 are hits with the same answer.
    let (hit, first) = infer(&http, &base, KEY_A, 3.0).await;
    assert!(!hit);
    for _ in 0..49 {
        let (hit, again) = infer(&http, &base, KEY_A, 3.0).await;
        assert!(hit);
        assert_eq!(again, first);
    }
    assert_eq!(
        executed().await - before,
        1,
        "Triton ran it once for 50 requests"
    );
    // Tenant B never gets A's entry: its first is a miss.
    let (hit, b) = infer(&http, &base, KEY_B, 3.0).await;
    assert!(!hit);
    assert_eq!(b, first);
    assert!(infer(&http, &base, KEY_B, 3.0).await.0);
    assert_eq!(executed().await - before, 2);
    // gRPC: the same entry for tenant A, marked by a response parameter.
    let mut c = gw.client().await;
    let req = infergate::proto::inference::ModelInferRequest {
        model_name: "onnx_linear".into(),
        id: "grpc-1".into(),
        inputs: vec![
            infergate::proto::inference::model_infer_request::InferInputTensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            },
        ],
        raw_input_contents: vec![f32_bytes(&[3.0; 4])],
        ..Default::default()
    };
    let call = |req: infergate::proto::inference::ModelInferRequest| {
        let mut r = Request::new(req);
        r.metadata_mut().insert("x-api-key", KEY_A.parse().unwrap());
        r
    };
    // HTTP's JSON data reaches Triton as the same raw bytes: the same entry, a hit.
    let r = c.model_infer(call(req)).await.unwrap().into_inner();
    assert!(r.parameters.contains_key("infergate_cache"), "{r:?}");
    assert_eq!(r.id, "grpc-1", "the answer carries the caller's id");
    assert_eq!(executed().await - before, 2);
    // Entries expire with their TTL.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert!(!infer(&http, &base, KEY_A, 3.0).await.0);
    assert_eq!(executed().await - before, 3);
    let m = scrape(&http, &base).await;
    assert!(
        m["infergate_cache_requests_total{name=\"onnx_linear\",result=\"hit\"}"] >= 51.0,
        "{m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_its_bound_while_distinct_requests_fill_it() {
    let _one = ONNX.lock().await;
    let bound = 4 << 10;
    let gw = gateway_with(config("[cache.onnx_linear]\nttl_ms = 60000\n", bound)).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    for i in 0..400 {
        infer(&http, &base, KEY_A, 100.0 + i as f32).await;
    }
    let m = scrape(&http, &base).await;
    let (bytes, evicted) = (
        m["infergate_cache_bytes"],
        m["infergate_cache_evictions_total"],
    );
    println!(
        "400 distinct answers into a {bound}-byte cache: {bytes} bytes held, {evicted} evicted"
    );
    assert!(bytes > 0.0 && bytes <= bound as f64, "{bytes}");
    assert!(evicted > 200.0, "{evicted}");
    // The most recent answers are still there.
    assert!(infer(&http, &base, KEY_A, 499.0).await.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_ends_share_one_cache_in_redis_and_a_redis_down_is_only_misses() {
    let _one = ONNX.lock().await;
    let prefix = format!("infergate-cache-test-{}", std::process::id());
    let shared = || {
        let mut cfg = config("[cache.onnx_linear]\nttl_ms = 1500\n", 64 << 20);
        cfg.cache.redis = Some(REDIS.into());
        cfg.tasks.redis_prefix.clone_from(&prefix);
        cfg
    };
    let (one, two) = (gateway_with(shared()).await, gateway_with(shared()).await);
    let http = reqwest::Client::new();
    let before = executed().await;
    // Front end one asks Triton; front end two answers the same request from Redis.
    let (hit, first) = infer(&http, &one.http_base(), KEY_A, 5.0).await;
    assert!(!hit);
    for k in 0..20 {
        let gw = if k % 2 == 0 { &two } else { &one };
        let (hit, again) = infer(&http, &gw.http_base(), KEY_A, 5.0).await;
        assert!(hit, "request {k}");
        assert_eq!(again, first);
    }
    // Tenant B's same request is its own entry.
    assert!(!infer(&http, &two.http_base(), KEY_B, 5.0).await.0);
    assert_eq!(
        executed().await - before,
        2,
        "21 of tenant A's 22 and B's one: two calls"
    );
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:cache:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=1500).contains(&ttl),
        "Redis expires it itself: {ttl} ms"
    );
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert!(
        !infer(&http, &two.http_base(), KEY_A, 5.0).await.0,
        "expired"
    );

    // A Redis that answers nothing (a port with no listener): every call still answered,
    // each a miss, the failures counted.
    let mut cfg = config("[cache.onnx_linear]\nttl_ms = 1500\n", 64 << 20);
    cfg.cache.redis = Some("redis://127.0.0.1:1".into());
    let down = gateway_with(cfg).await;
    for _ in 0..3 {
        let (hit, out) = infer(&http, &down.http_base(), KEY_A, 5.0).await;
        assert!(!hit);
        assert_eq!(out, first);
    }
    let m = scrape(&http, &down.http_base()).await;
    assert!(
        m["infergate_cache_errors_total{op=\"lookup\"}"] >= 3.0,
        "{m:?}"
    );
}
