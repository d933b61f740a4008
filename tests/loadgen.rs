//! infergate-load against a real gateway and Triton: counts are exact, every request succeeds,
//! and the summary holds what was measured.

mod common;

use std::time::Duration;

use common::*;
use infergate::loadgen::{LoadSpec, Protocol, run};

fn spec(protocol: Protocol, target: String) -> LoadSpec {
    LoadSpec {
        protocol,
        target,
        model: "add_sub".into(),
        batch: 2,
        concurrency: 8,
        connections: 2,
        duration: None,
        requests: Some(300),
        warmup: Duration::from_millis(200),
        rate: None,
        timeout: Duration::from_secs(10),
        progress: false,
        params: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_are_exact_over_grpc_and_http() {
    let gw = gateway().await;
    for (proto, target, ok) in [
        (Protocol::Grpc, gw.grpc_addr.to_string(), "OK"),
        (Protocol::Http, gw.http_addr.to_string(), "200"),
    ] {
        let out = run(&spec(proto, target)).await.unwrap();
        let s = out.summary();
        assert_eq!(s.count, 300, "{proto:?}");
        assert_eq!(
            s.status_code_distribution.get(ok),
            Some(&300),
            "{proto:?}: {:?}",
            s.error_distribution
        );
        assert_eq!(out.latencies_ns.len(), 300);
        assert!(s.fastest > 0 && s.fastest <= s.average && s.average <= s.slowest);
        assert!(s.rps > 0.0);
        assert_eq!(s.per_second.iter().sum::<u64>(), 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate_and_errors_are_counted() {
    let gw = gateway().await;
    let mut s = spec(Protocol::Grpc, gw.grpc_addr.to_string());
    s.requests = None;
    s.duration = Some(Duration::from_secs(2));
    s.rate = Some(100.0);
    let out = run(&s).await.unwrap().summary();
    // 100/s for 2 s: about 200 started (timer granularity allows a little slack).
    assert!((180..=205).contains(&out.count), "count {}", out.count);

    let mut bad = spec(Protocol::Grpc, gw.grpc_addr.to_string());
    bad.model = "no_such_model".into();
    let err = run(&bad).await.unwrap_err();
    assert!(err.contains("no_such_model"), "{err}");
}
