//! The OpenAI front against a real Triton serving `tiny_chat` (a decoupled python model with
//! a real tokenizer.json and chat template): the official `openai` Python package works
//! unchanged, usage is the tokenizer's count, and a tenant's tokens-per-minute budget holds
//! over a minute of steady load while another tenant is served.

mod common;

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use infergate::{
    config::{ApiKey, Config},
    openai::config::{LmModelConfig, TenantBudget},
};
use serde_json::{Value, json};

const KEY_A: &str = "team-a-key-0123456789";
const KEY_B: &str = "team-b-key-0123456789";

fn tokenizer_dir() -> std::path::PathBuf {
    repo().join("triton-models/tiny_chat/tokenizer")
}

/// Two tenants, two names for tiny_chat: team-a may call `tiny-chat`, team-b `tiny-echo`.
fn config(tpm_a: u64) -> Config {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    // The Batch API keeps its files in the blob store (tasks run in this process).
    cfg.tasks.blob_store = Some("memory:///".into());
    cfg.auth.keys = [(KEY_A, "team-a"), (KEY_B, "team-b")]
        .map(|(key, tenant)| ApiKey {
            key: key.into(),
            tenant: tenant.into(),
            ..Default::default()
        })
        .to_vec();
    cfg.openai.models = ["tiny-chat", "tiny-echo"]
        .map(|name| LmModelConfig {
            name: name.into(),
            triton_model: "tiny_chat".into(),
            tokenizer: tokenizer_dir(),
        })
        .to_vec();
    cfg.openai.tenants = vec![
        TenantBudget {
            tenant: "team-a".into(),
            tokens_per_minute: tpm_a,
            models: vec!["tiny-chat".into()],
            ..Default::default()
        },
        TenantBudget {
            tenant: "team-b".into(),
            models: vec!["tiny-echo".into()],
            ..Default::default()
        },
    ];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_package_works_unchanged() {
    let gw = gateway_with(config(0)).await;
    let venv = triton_venv();
    let out = tokio::task::block_in_place(|| {
        Command::new("timeout")
            .arg("180")
            .arg(format!("{venv}/bin/python"))
            .arg(repo().join("tests/clients/openai_client.py"))
            .arg(format!("http://{}/v1", gw.http_addr))
            .arg(KEY_A)
            .arg(KEY_B)
            .arg(tokenizer_dir().join("tokenizer.json"))
            .output()
            .expect("run openai_client.py")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("7 passed, 0 failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_any_model_runs_are_openais() {
    let gw = gateway_with(config(0)).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", gw.http_addr);
    // Malformed JSON, a wrong type, no key: OpenAI's error object, the field named.
    let cases: [(&str, Option<&str>, u16, Value); 3] = [
        ("{not json", Some(KEY_A), 400, json!("body")),
        (
            r#"{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#,
            Some(KEY_A),
            400,
            json!("max_tokens"),
        ),
        (r#"{"model": "tiny-chat"}"#, None, 401, Value::Null),
    ];
    for (body, key, status, param) in cases {
        let mut req = http.post(&url).body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

/// One chat request of team `key`; its status, total tokens and headers.
async fn chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    model: &str,
) -> (u16, u64, reqwest::header::HeaderMap) {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
        }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v: Value = r.json().await.unwrap();
    let total = v["usage"]["total_tokens"].as_u64().unwrap_or(0);
    (status, total, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_holds_over_a_minute_while_another_tenant_is_served() {
    const TPM: u64 = 3000;
    const RUN: Duration = Duration::from_secs(75);
    // A tenant of its own: the metrics registry is the process's, shared with other tests.
    let mut cfg = config(TPM);
    cfg.auth.keys[0].tenant = "team-quota".into();
    cfg.openai.tenants[0].tenant = "team-quota".into();
    let gw = gateway_with(cfg).await;
    let base = format!("http://{}", gw.http_addr);
    let http = reqwest::Client::new();
    let start = Instant::now();
    // (seconds since start at send, tokens) of team-a's answered requests.
    let served: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let refused = Arc::new(Mutex::new(0u64));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, base, served, refused) = (
            http.clone(),
            base.clone(),
            Arc::clone(&served),
            Arc::clone(&refused),
        );
        load.push(tokio::spawn(async move {
            while start.elapsed() < RUN {
                let sent = start.elapsed().as_secs_f64();
                let (status, tokens, headers) = chat(&http, &base, KEY_A, "tiny-chat").await;
                match status {
                    200 => served.lock().unwrap().push((sent, tokens)),
                    429 => {
                        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                        assert!((1..=60).contains(&retry), "retry-after {retry}");
                        assert_eq!(headers["x-ratelimit-limit-tokens"], "3000");
                        assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
                        assert!(headers.contains_key("x-ratelimit-reset-tokens"));
                        *refused.lock().unwrap() += 1;
                        // Steady pressure: ask again soon rather than after retry-after.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    s => panic!("team-a got {s}"),
                }
            }
        }));
    }
    // Team-b, with no budget, is served all along.
    let mut b_ok = 0;
    while start.elapsed() < RUN {
        let (status, tokens, _) = chat(&http, &base, KEY_B, "tiny-echo").await;
        assert_eq!(
            status, 200,
            "team-b must be served while team-a is over its budget"
        );
        assert!(tokens > 0);
        b_ok += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for l in load {
        l.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    let refused = *refused.lock().unwrap();
    // Every minute-long window that starts in the first 15 s: at most 5 % over the budget,
    // and the first minute is served up to it (the budget is what limits, not the load).
    let window = |from: f64| -> u64 {
        served
            .iter()
            .filter(|(t, _)| *t >= from && *t < from + 60.0)
            .map(|(_, n)| n)
            .sum()
    };
    let worst = (0..=150).map(|i| window(i as f64 * 0.1)).max().unwrap();
    let first = window(0.0);
    println!(
        "team-a: {} served, {refused} refused; first minute {first} tokens, worst minute {worst} (budget {TPM}); team-b: {b_ok} served",
        served.len()
    );
    assert!(
        worst as f64 <= TPM as f64 * 1.05,
        "worst minute {worst} > {TPM} + 5 %"
    );
    assert!(
        first as f64 >= TPM as f64 * 0.9,
        "first minute {first} < 90 % of {TPM}"
    );
    assert!(refused > 0 && b_ok > 100);
    // Usage per tenant and model, as metrics: equal to what the answers said.
    let m = scrape(&http, &base).await;
    let metric = |kind: &str| {
        m.get(&format!(
            "infergate_openai_tokens_total{{tenant=\"team-quota\",model=\"tiny-chat\",kind=\"{kind}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let total: u64 = served.iter().map(|(_, n)| n).sum();
    let ours: Vec<_> = m.iter().filter(|(k, _)| k.contains("openai")).collect();
    assert_eq!(
        (metric("prompt") + metric("completion")) as u64,
        total,
        "{ours:?}"
    );
    assert!(
        m.get("infergate_openai_rate_limited_total{tenant=\"team-quota\",limit=\"tokens\"}")
            .is_some_and(|&v| v as u64 == refused)
    );
}
