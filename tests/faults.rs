//! Faults, on 127.0.0.1 only and bounded in time: Triton stopped for 30 s under load.
//! Sync requests fail fast with UNAVAILABLE (no pile-up), async tasks accepted before or during
//! the outage wait in the broker and all complete once Triton is back, readiness follows.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const OUTAGE: Duration = Duration::from_secs(30);

/// (start, latency, gRPC code) of each sync call.
type Calls = Arc<Mutex<Vec<(Instant, Duration, tonic::Code)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_outage_fails_sync_calls_fast_and_async_tasks_complete_after_it() {
    let own = Triton::start(None, &[]);
    let ports = own.ports();
    let mut cfg = test_config(vec![own.grpc_url()]);
    cfg.tasks.broker = REDIS.parse().unwrap();
    cfg.tasks.task_store = REDIS.parse().unwrap();
    cfg.tasks.redis_prefix = format!("igfault-{}", infergate::tasks::new_task_id());
    cfg.tasks.workers = 1;
    let gw = gateway_with(cfg).await;
    let http = reqwest::Client::new();
    let base = gw.http_base();
    let stop = CancellationToken::new();

    // Sync load: two callers back to back.
    let calls: Calls = Arc::default();
    let mut load = Vec::new();
    for _ in 0..2 {
        let (mut c, calls, stop) = (gw.client().await, Arc::clone(&calls), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let t = Instant::now();
                let mut req = tonic::Request::new(add_sub_request());
                req.set_timeout(Duration::from_secs(5));
                let code = match c.model_infer(req).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                };
                calls.lock().unwrap().push((t, t.elapsed(), code));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Async load: one submission every 50 ms.
    let accepted: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let refused: Arc<Mutex<Vec<u16>>> = Arc::default();
    {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        let (accepted, refused) = (Arc::clone(&accepted), Arc::clone(&refused));
        load.push(tokio::spawn(async move {
            let body = json!({"inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![3.0; 16]},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0; 16]}]});
            while !stop.is_cancelled() {
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/v1/models/add_sub/tasks"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 202 {
                    let id = r.json::<Value>().await.unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    accepted.lock().unwrap().push((t, id));
                } else {
                    refused.lock().unwrap().push(r.status().as_u16());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let port = gw.http_addr.port();
    let (down_from, up_from, _back) = tokio::task::spawn_blocking(move || {
        let mut own = own;
        own.stop();
        let down_from = Instant::now();
        std::thread::sleep(OUTAGE / 2);
        assert_eq!(
            http_status(port, "/readyz"),
            Some(503),
            "unready mid-outage"
        );
        assert_eq!(http_status(port, "/livez"), Some(200), "alive mid-outage");
        std::thread::sleep(OUTAGE / 2);
        let up_from = Instant::now();
        (down_from, up_from, Triton::start(Some(ports), &[]))
    })
    .await
    .unwrap();
    // Let the gateway see Triton again, then a few seconds of normal load.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(port, "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready after Triton came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }

    // Sync: during the outage every call failed with UNAVAILABLE, and fast.
    let calls = calls.lock().unwrap().clone();
    let during: Vec<_> = calls
        .iter()
        .filter(|(t, d, _)| *t > down_from + Duration::from_secs(1) && *t + *d < up_from)
        .collect();
    assert!(
        during.len() > 100,
        "load kept going: {} calls",
        during.len()
    );
    assert!(
        during
            .iter()
            .all(|(_, _, c)| *c == tonic::Code::Unavailable),
        "codes during the outage: {:?}",
        during
            .iter()
            .map(|c| format!("{:?}", c.2))
            .collect::<std::collections::BTreeSet<_>>()
    );
    let mut lat: Vec<Duration> = during.iter().map(|c| c.1).collect();
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    assert!(
        p99 < Duration::from_millis(100),
        "failures must be fast: p99 {p99:?}"
    );
    let after: Vec<_> = calls
        .iter()
        .filter(|(t, _, _)| *t > back_at + Duration::from_millis(500))
        .collect();
    assert!(!after.is_empty() && after.iter().all(|c| c.2 == tonic::Code::Ok));

    // Async: every accepted task, including those accepted during the outage, succeeded.
    let accepted = accepted.lock().unwrap().clone();
    let in_outage = accepted
        .iter()
        .filter(|(t, _)| *t > down_from && *t < up_from)
        .count();
    assert!(
        in_outage > 100,
        "tasks accepted during the outage: {in_outage}"
    );
    let refused = refused.lock().unwrap().clone();
    assert!(refused.is_empty(), "submissions refused: {refused:?}");
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    let total = ids.len();
    for t in wait_final(&http, &base, &ids, Duration::from_secs(60)).await {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["response"]["outputs"][0]["data"][0], 4.0, "{t}");
    }
    println!(
        "outage of {OUTAGE:?}: {} sync calls failed with UNAVAILABLE (p99 {p99:?}); {total} tasks \
         accepted ({in_outage} during the outage), all succeeded after Triton came back",
        during.len()
    );
}
