//! End-to-end over HTTP/JSON against a real Triton: the same answers as Triton's own HTTP API
//! for JSON and binary tensor bodies, and clear 4xx errors for bad bodies.

mod common;

use common::*;
use serde_json::{Value, json};

fn add_sub_json(rows: usize) -> Value {
    let a: Vec<f32> = (0..rows * 16).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..rows * 16).map(|i| 100.0 - i as f32).collect();
    json!({
        "id": "h1",
        "inputs": [
            {"name": "INPUT0", "shape": [rows, 16], "datatype": "FP32", "data": a},
            {"name": "INPUT1", "shape": [rows, 16], "datatype": "FP32", "data": b},
        ]
    })
}

fn sorted_outputs(mut v: Value) -> Value {
    // Compare outputs regardless of key order and of Triton's JSON formatting.
    if let Some(outs) = v.get_mut("outputs").and_then(Value::as_array_mut) {
        outs.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    }
    v
}

async fn post(url: String, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn json_inference_matches_triton() {
    let gw = gateway().await;
    let t = triton();
    for (model, body) in [
        ("add_sub", add_sub_json(2)),
        (
            "text_stats",
            json!({"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["ab", "Zed"]}]}),
        ),
        (
            "seq_sum",
            json!({"inputs": [{"name": "SEQ", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3.5]]}]}),
        ),
        (
            "matrix_nobatch",
            json!({"inputs": [{"name": "IN", "shape": [2, 3], "datatype": "INT32", "data": [1, 2, 3, 4, 5, 6]}]}),
        ),
    ] {
        let (ds, direct) = post(
            format!("{}/v2/models/{model}/infer", t.http_base()),
            body.clone(),
        )
        .await;
        let (vs, via) = post(format!("{}/v2/models/{model}/infer", gw.http_base()), body).await;
        assert_eq!((ds, vs), (200, 200), "{model}: {via}");
        assert_eq!(sorted_outputs(via), sorted_outputs(direct), "{model}");
    }
}

#[tokio::test]
async fn binary_tensor_extension_round_trips() {
    let gw = gateway().await;
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
        ],
        "outputs": [
            {"name": "OUTPUT0", "parameters": {"binary_data": true}},
            {"name": "OUTPUT1", "parameters": {"binary_data": false}},
        ]
    });
    let header = serde_json::to_vec(&header).unwrap();
    let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let b = vec![2.0f32; 16];
    let mut body = header.clone();
    body.extend_from_slice(&f32_bytes(&a));
    body.extend_from_slice(&f32_bytes(&b));
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/add_sub/infer", gw.http_base()))
        .header("Inference-Header-Content-Length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    let outs = head["outputs"].as_array().unwrap();
    let o0 = outs.iter().find(|o| o["name"] == "OUTPUT0").unwrap();
    let o1 = outs.iter().find(|o| o["name"] == "OUTPUT1").unwrap();
    assert_eq!(o0["parameters"]["binary_data_size"], 64);
    assert_eq!(
        f32_from(&bytes[json_len..]),
        a.iter().map(|x| x + 2.0).collect::<Vec<_>>()
    );
    assert_eq!(o1["data"][5], json!(3.0));
}

#[tokio::test]
async fn metadata_and_health_routes_match_triton() {
    let gw = gateway().await;
    let t = triton();
    let get = |url: String| async move {
        let r = reqwest::get(url).await.unwrap();
        let s = r.status().as_u16();
        (s, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    for path in [
        "/v2/models/add_sub",
        "/v2/models/seq_sum/versions/1",
        "/v2/models/text_stats",
    ] {
        let (ds, d) = get(format!("{}{path}", t.http_base())).await;
        let (vs, v) = get(format!("{}{path}", gw.http_base())).await;
        assert_eq!((ds, vs), (200, 200), "{path}");
        assert_eq!(v, d, "{path}");
    }
    let (_, d) = get(format!("{}/v2/models/onnx_linear/config", t.http_base())).await;
    let (_, v) = get(format!("{}/v2/models/onnx_linear/config", gw.http_base())).await;
    for key in [
        "name",
        "backend",
        "max_batch_size",
        "default_model_filename",
    ] {
        assert_eq!(v[key], d[key], "config {key}");
    }
    assert_eq!(v["input"][0]["dims"], json!([4]));
    assert_eq!(v["input"][0]["data_type"], "TYPE_FP32");
    let (s, stats) = get(format!("{}/v2/models/add_sub/stats", gw.http_base())).await;
    assert_eq!(s, 200);
    assert_eq!(stats["model_stats"][0]["name"], "add_sub");
    assert!(stats["model_stats"][0]["inference_stats"]["success"]["count"].is_u64());
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/add_sub/ready",
    ] {
        assert_eq!(
            reqwest::get(format!("{}{path}", gw.http_base()))
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    // As Triton: a model that is unknown or not ready answers 400 with a JSON error.
    let (s, body) = get(format!("{}/v2/models/no_such_model/ready", gw.http_base())).await;
    assert_eq!(s, 400);
    assert!(
        body["error"].as_str().unwrap().contains("no_such_model"),
        "{body}"
    );
    let (s, md) = get(format!("{}/v2", gw.http_base())).await;
    assert_eq!((s, md["name"].as_str()), (200, Some("triton")));
    let idx = post_json(
        &reqwest::Client::new(),
        &format!("{}/v2/repository/index", gw.http_base()),
        &json!({"ready": true}),
    )
    .await;
    // Every model of triton-models/ is ready.
    let models = std::fs::read_dir(repo().join("triton-models"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("config.pbtxt").exists())
        .count();
    assert_eq!(idx.as_array().unwrap().len(), models);
    assert_eq!(models, 12);
}

/// A client that writes its whole body before it reads the answer (Python's urllib) gets the
/// 413 for a body over max_request_bytes, not a broken pipe: the rest of the body is read and
/// dropped first. Then the same server still answers.
#[tokio::test]
async fn a_client_that_writes_its_whole_oversize_body_first_reads_the_413() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.max_request_bytes = 1024 * 1024;
    let gw = gateway_with(cfg).await;
    let url = format!("{}/v2/models/add_sub/infer", gw.http_base());
    let script = r#"
import sys, urllib.request, urllib.error
body = b"x" * (2 * 1024 * 1024)
req = urllib.request.Request(sys.argv[1], data=body, headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=30)
    print("200")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print("failed:", type(e).__name__, e)
"#;
    for attempt in 0..3 {
        let u = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(["-c", script, &u])
                .output()
                .expect("python3")
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.starts_with("413 ") && text.contains("1048576 bytes"),
            "attempt {attempt}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (s, _) = post(url, add_sub_json(1)).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn bad_bodies_get_clear_4xx_errors() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.max_request_bytes = 8 * 1024;
    let gw = gateway_with(cfg).await;
    let url = |m: &str| format!("{}/v2/models/{m}/infer", gw.http_base());
    let raw = |m: &str, body: &'static str| {
        let u = url(m);
        async move {
            let r = reqwest::Client::new()
                .post(u)
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (
                s,
                r.json::<Value>().await.unwrap()["error"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        }
    };
    let (s, e) = post(url("nope"), add_sub_json(1)).await;
    assert_eq!(
        (s, e["error"].as_str().unwrap()),
        (404, "unknown model 'nope'")
    );

    let (s, e) = raw(
        "add_sub",
        r#"{"inputs": [{"name": "INPUT0", "shape": "x"}]}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(e.contains("inputs[0].shape"), "{e}");

    let (s, e) = raw("add_sub", "{not json").await;
    assert_eq!(s, 400);
    assert!(e.contains("malformed JSON"), "{e}");

    let mut bad = add_sub_json(1);
    bad["inputs"][1]["shape"] = json!([1, 17]);
    let (s, e) = post(url("add_sub"), bad).await;
    assert_eq!(s, 400);
    assert!(
        e["error"].as_str().unwrap().contains("input 'INPUT1'"),
        "{e}"
    );

    let mut bad = add_sub_json(1);
    bad["inputs"][0]["data"][3] = json!("three");
    let (s, e) = post(url("add_sub"), bad).await;
    assert_eq!(s, 400);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("input 'INPUT0' data: element 3"),
        "{e}"
    );

    let (s, e) = post(url("add_sub"), add_sub_json(64)).await; // ~14 KiB of JSON
    assert_eq!(s, 413);
    assert!(e["error"].as_str().unwrap().contains("8192 bytes"), "{e}");

    // Binary framing that lies about its length.
    let r = reqwest::Client::new()
        .post(url("add_sub"))
        .header("Inference-Header-Content-Length", "99999")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Still serving correctly afterwards.
    let (s, _) = post(url("add_sub"), add_sub_json(1)).await;
    assert_eq!(s, 200);
}
