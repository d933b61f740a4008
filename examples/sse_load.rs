//! A closed-loop load of streaming HTTP requests (server-sent events), for
//! `loadtest/openai-bench.sh`: the same client against infergate's `/v1/chat/completions`
//! and Triton's own `generate_stream`, so the difference is the front end's. Not part of
//! infergate.
//!
//!     sse_load URL BODY_JSON CONCURRENCY SECONDS [BEARER_KEY]
//!
//! Counts as a token each event that carries text (`"content":"x…` or `"text_output"`), and
//! as time to first token the time from sending to the first such event (a chat's role-only
//! first chunk is not a token). Prints one JSON object.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

fn carries_text(event: &str) -> bool {
    event.contains("\"text_output\"")
        || event
            .split("\"content\":\"")
            .nth(1)
            .is_some_and(|rest| !rest.starts_with('"'))
        || event
            .split("\"text\":\"")
            .nth(1)
            .is_some_and(|rest| !rest.starts_with('"'))
}

#[derive(Default)]
struct Tally {
    firsts: Vec<f64>,
    tokens: u64,
    requests: u64,
    errors: u64,
}

async fn one(
    http: &reqwest::Client,
    url: &str,
    body: &str,
    key: Option<&str>,
) -> Result<(Option<Duration>, u64), String> {
    let started = Instant::now();
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let (mut buf, mut first, mut tokens) = (String::new(), None, 0u64);
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.contains("\"error\"") {
                return Err(event);
            }
            if carries_text(&event) {
                tokens += 1;
                first.get_or_insert_with(|| started.elapsed());
            }
        }
    }
    Ok((first, tokens))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, body, c, secs, rest @ ..] = args.as_slice() else {
        eprintln!("usage: sse_load URL BODY_JSON CONCURRENCY SECONDS [BEARER_KEY]");
        std::process::exit(2);
    };
    let key = rest.first().cloned();
    let c: usize = c.parse().expect("CONCURRENCY");
    let run = Duration::from_secs_f64(secs.parse().expect("SECONDS"));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let workers: Vec<_> = (0..c)
        .map(|_| {
            let (http, url, body, key, tally) = (
                http.clone(),
                url.clone(),
                body.clone(),
                key.clone(),
                Arc::clone(&tally),
            );
            tokio::spawn(async move {
                while started.elapsed() < run {
                    let r = one(&http, &url, &body, key.as_deref()).await;
                    let mut t = tally.lock().unwrap();
                    t.requests += 1;
                    match r {
                        Ok((first, tokens)) => {
                            t.tokens += tokens;
                            if let Some(f) = first {
                                t.firsts.push(f.as_secs_f64() * 1e3);
                            }
                        }
                        Err(e) => {
                            if t.errors == 0 {
                                eprintln!("first error: {e}");
                            }
                            t.errors += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut t = tally.lock().unwrap();
    t.firsts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        t.firsts
            .get(((t.firsts.len() as f64 * p) as usize).min(t.firsts.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{{\"requests\": {}, \"errors\": {}, \"tokens\": {}, \"firstP50Ms\": {:.3}, \"firstP99Ms\": {:.3}, \"tokensPerSecond\": {:.1}}}",
        t.requests,
        t.errors,
        t.tokens,
        pct(0.5),
        pct(0.99),
        t.tokens as f64 / elapsed
    );
}
