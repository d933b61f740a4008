//! API keys, tenants and per-tenant rates, on HTTP and gRPC alike, against a real Triton:
//! no key or a wrong key is refused, probes need none, a tenant never sees another tenant's
//! task (404, as if it did not exist), idempotency keys are per tenant, and a tenant over its
//! rate gets 429 / RESOURCE_EXHAUSTED with Retry-After while others go on; so does a tenant at
//! its open-task quota, counted in Redis across two front ends.

mod common;

use common::*;
use infergate::{
    config::{ApiKey, Config},
    proto::{
        inference::{
            ModelMetadataRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
        },
        tasks::{GetRequest, SubmitRequest, task_service_client::TaskServiceClient},
    },
};
use serde_json::{Value, json};
use tonic::{Code, Request, transport::Channel};

const KEY_A: &str = "tenant-a-key-0123456789";
const KEY_B: &str = "tenant-b-key-0123456789";
const KEY_SLOW: &str = "tenant-slow-key-0123456";

fn auth_config() -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    let key = |key: &str, tenant: &str, rate: Option<f64>| ApiKey {
        key: key.into(),
        tenant: tenant.into(),
        rate_per_s: rate,
        burst: rate.map(|_| 3),
        ..Default::default()
    };
    cfg.auth.keys = vec![
        key(KEY_A, "a", None),
        key(KEY_B, "b", None),
        key(KEY_SLOW, "slow", Some(0.5)),
    ];
    cfg.validate().expect("valid config");
    cfg
}

fn body(x: f32) -> Value {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![x; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0; 16]}]})
}

fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_required_on_both_protocols_but_not_for_probes() {
    let gw = gateway_with(auth_config()).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let infer = format!("{base}/v2/models/add_sub/infer");

    let r = http.post(&infer).json(&body(1.0)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let msg = r.json::<Value>().await.unwrap()["error"].to_string();
    assert!(msg.contains("API key is required"), "{msg}");
    let r = http
        .post(&infer)
        .header("x-api-key", "tenant-a-key-WRONG")
        .json(&body(1.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let msg = r.text().await.unwrap();
    assert!(
        !msg.contains("WRONG"),
        "the presented key is not echoed: {msg}"
    );
    for (name, value) in [
        ("authorization", format!("Bearer {KEY_A}")),
        ("x-api-key", KEY_A.to_string()),
    ] {
        let r = http
            .post(&infer)
            .header(name, value)
            .json(&body(2.0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let out = r.json::<Value>().await.unwrap();
        assert_eq!(out["outputs"][0]["data"][0], 3.0);
    }
    for probe in [
        "/livez",
        "/readyz",
        "/metrics",
        "/v2/health/ready",
        "/v2/health/live",
    ] {
        let r = http.get(format!("{base}{probe}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe} needs no key");
    }

    let ch = Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = GrpcInferenceServiceClient::new(ch.clone());
    let md = || ModelMetadataRequest {
        name: "add_sub".into(),
        version: String::new(),
    };
    let err = c.model_metadata(md()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .model_metadata(with_key(md(), "tenant-a-key-WRONG"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(c.model_metadata(with_key(md(), KEY_B)).await.is_ok());
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        1,
        "health needs no key: SERVING"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_sees_another_tenants_task() {
    let gw = gateway_with(auth_config()).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let submit = |key: &'static str, idem: &'static str| {
        let http = http.clone();
        let url = format!("{base}/v1/models/add_sub/tasks");
        async move {
            let r = http
                .post(url)
                .header("x-api-key", key)
                .header("idempotency-key", idem)
                .json(&body(5.0))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let a = submit(KEY_A, "same-key").await;
    // The same idempotency key from another tenant is that tenant's own task.
    let b = submit(KEY_B, "same-key").await;
    assert_ne!(a, b);
    assert_eq!(submit(KEY_A, "same-key").await, a, "a's retry is a's task");

    let get = |key: &'static str, id: String| {
        let http = http.clone();
        let url = format!("{base}/v1/tasks/{id}");
        async move {
            http.get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(KEY_A, a.clone()).await, 200);
    assert_eq!(get(KEY_B, a.clone()).await, 404, "no hint that it exists");
    assert_eq!(
        get(KEY_B, "no-such-task".into()).await,
        404,
        "the same answer as for a task that does not exist"
    );
    let r = http
        .delete(format!("{base}/v1/tasks/{a}"))
        .header("x-api-key", KEY_B)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "b cannot cancel a's task");

    let ch = Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = TaskServiceClient::new(ch);
    let err = tasks
        .get(with_key(GetRequest { id: a.clone() }, KEY_B))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let got = tasks
        .get(with_key(GetRequest { id: a.clone() }, KEY_A))
        .await
        .unwrap();
    assert_eq!(got.into_inner().id, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_is_refused_while_others_go_on() {
    let gw = gateway_with(auth_config()).await;
    let http = reqwest::Client::new();
    let infer = format!("{}/v2/models/add_sub/infer", gw.http_base());
    let call = |key: &'static str| {
        let (http, infer) = (http.clone(), infer.clone());
        async move {
            http.post(infer)
                .header("x-api-key", key)
                .json(&body(1.0))
                .send()
                .await
                .unwrap()
        }
    };
    // Rate 0.5/s with a burst of 3: three pass, the fourth waits about 2 s.
    let mut codes = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let r = call(KEY_SLOW).await;
        codes.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = Some(r.headers()["retry-after"].to_str().unwrap().to_string());
            let msg = r.text().await.unwrap();
            assert!(
                msg.contains("tenant 'slow' is over its request rate"),
                "{msg}"
            );
        }
    }
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
    let secs: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    for _ in 0..20 {
        assert_eq!(
            call(KEY_A).await.status(),
            200,
            "other tenants are unaffected"
        );
    }
    let ch = Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = GrpcInferenceServiceClient::new(ch);
    let err = c
        .model_metadata(with_key(
            ModelMetadataRequest {
                name: "add_sub".into(),
                version: String::new(),
            },
            KEY_SLOW,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.metadata().get("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_task_quota_holds_across_front_ends() {
    const KEY_Q: &str = "tenant-q-key-0123456789";
    let prefix = format!("infergate-test-quota-{}", std::process::id());
    let mut cfg = auth_config();
    cfg.auth.keys.push(ApiKey {
        key: KEY_Q.into(),
        tenant: "q".into(),
        max_open_tasks: Some(3),
        ..Default::default()
    });
    // No workers: accepted tasks stay queued, so they stay open.
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.clone();
    cfg.tasks.workers = 0;
    cfg.validate().expect("valid config");
    let one = gateway_with(cfg.clone()).await;
    let two = gateway_with(cfg).await;
    let http = reqwest::Client::new();
    let submit = |base: String, key: &'static str| {
        let http = http.clone();
        async move {
            http.post(format!("{base}/v1/models/add_sub/tasks"))
                .header("x-api-key", key)
                .json(&body(1.0))
                .send()
                .await
                .unwrap()
        }
    };
    let mut ids = Vec::new();
    for base in [one.http_base(), one.http_base(), two.http_base()] {
        let r = submit(base, KEY_Q).await;
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let r = submit(two.http_base(), KEY_Q).await;
    assert_eq!(
        r.status(),
        429,
        "the fourth open task, on the other front end"
    );
    assert_eq!(r.headers()["retry-after"], "1");
    let msg = r.text().await.unwrap();
    assert!(
        msg.contains("tenant 'q' already has 3 tasks queued or running"),
        "{msg}"
    );
    let ch = Channel::from_shared(one.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = TaskServiceClient::new(ch);
    let err = tasks
        .submit(with_key(
            SubmitRequest {
                request: Some(add_sub_request()),
                ..Default::default()
            },
            KEY_Q,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Other tenants are not held back.
    assert_eq!(submit(one.http_base(), KEY_A).await.status(), 202);
    // A cancelled task frees its place, on either front end.
    let r = http
        .delete(format!("{}/v1/tasks/{}", one.http_base(), ids[0]))
        .header("x-api-key", KEY_Q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(submit(two.http_base(), KEY_Q).await.status(), 202);
    assert_eq!(submit(one.http_base(), KEY_Q).await.status(), 429);
}

#[test]
fn bad_key_settings_name_the_setting() {
    let mut cfg = Config::default();
    cfg.auth.keys = vec![ApiKey {
        key: "short".into(),
        tenant: "a".into(),
        ..Default::default()
    }];
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("auth.keys") && msg.contains("16"), "{msg}");
    assert!(
        !format!("{cfg:?}").contains("short"),
        "keys are redacted from debug output"
    );
}
