//! Discovery against real Tritons: several servers on loopback addresses (127.0.0.2, …) that
//! share one set of ports, as the pods behind a headless Service do, and one name for them
//! served by a DNS server this test controls (in process, on a UDP port of 127.0.0.1; the
//! gateway asks it through `triton.dns_server`; the machine's resolver is not touched).
//! Shares of calls are counted by each Triton's own statistics.

mod common;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use infergate::batch::config::BatchMode;
use serde_json::Value;

/// The tests here start several Tritons each and read shares of calls: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A DNS server that answers A queries for the names it is given (TTL 0), NXDOMAIN for
/// others, and no records for other types of a known name.
struct Dns {
    addr: std::net::SocketAddr,
    names: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    queries: Arc<AtomicU64>,
}

impl Dns {
    async fn start() -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let names: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let (known, asked) = (Arc::clone(&names), Arc::clone(&queries));
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                asked.fetch_add(1, Ordering::Relaxed);
                let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                answer.metadata.authoritative = true;
                for q in &query.queries {
                    let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
                    match known.lock().unwrap().get(&name) {
                        None => answer.metadata.response_code = ResponseCode::NXDomain,
                        Some(ips) if q.query_type() == RecordType::A => {
                            for ip in ips {
                                answer.answers.push(Record::from_rdata(
                                    q.name().clone(),
                                    0,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                        Some(_) => {}
                    }
                }
                answer.queries = query.queries.clone();
                answer.metadata.message_type = MessageType::Response;
                let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        Dns {
            addr,
            names,
            queries,
        }
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.names
            .lock()
            .unwrap()
            .insert(name.to_string(), ips.to_vec());
    }
}

fn lo(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Tritons serving triton-models/ on `hosts`, all on the same three ports, started at once.
fn fleet(hosts: &[Ipv4Addr]) -> Vec<Triton> {
    let ports = (free_port(), free_port(), free_port());
    let starts: Vec<_> = hosts
        .iter()
        .map(|h| {
            let h = *h;
            std::thread::spawn(move || Triton::serving_at(h, None, Some(ports), &[]))
        })
        .collect();
    starts.into_iter().map(|s| s.join().unwrap()).collect()
}

/// One call of `slow` that sleeps 2 ms on Triton: the servers' own time is then nearly the
/// same on each, so they are as identical as servers can be on a shared 2-core host (with a
/// CPU-bound model, whichever Triton the scheduler favours is faster, and a balancer that
/// weighs latency rightly gives it more).
fn call() -> infergate::proto::inference::ModelInferRequest {
    use infergate::proto::inference::{InferParameter, infer_parameter::ParameterChoice};
    let mut req = one_input("slow", 1.0);
    req.parameters.insert(
        "delay_ms".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(2)),
        },
    );
    req
}

/// `slow` inferences each Triton has run, by its own statistics (0 once it is gone).
async fn counts(http: &reqwest::Client, tritons: &[&Triton]) -> Vec<u64> {
    let mut out = Vec::new();
    for t in tritons {
        let r = http
            .get(format!("{}/v2/models/slow/stats", t.http_base()))
            .send()
            .await;
        let n = match r {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap();
                v["model_stats"][0]["inference_count"].as_u64().unwrap()
            }
            _ => 0,
        };
        out.push(n);
    }
    out
}

/// Open TCP connections to `ip:port` on this machine, from /proc/net/tcp (ESTABLISHED).
fn connections_to(ip: Ipv4Addr, port: u16) -> usize {
    let peer = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == peer && f[3] == "01"
        })
        .count()
}

fn shares(before: &[u64], after: &[u64]) -> Vec<f64> {
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = d.iter().sum();
    assert!(total > 0, "calls ran: {before:?} -> {after:?}");
    d.iter().map(|n| 100.0 * *n as f64 / total as f64).collect()
}

/// Steady load at a fixed rate (open loop, so each Triton's count is the share of calls the
/// gateway sent it, whatever its latency), at most 64 calls in flight; every outcome is kept.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Client, per_second: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed: Arc<Mutex<Vec<String>>> = Arc::default();
        let done = Arc::new(AtomicU64::new(0));
        let (c, s, f, d) = (client.clone(), stop.clone(), failed.clone(), done.clone());
        let sender = tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut calls = tokio::task::JoinSet::new();
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    f.lock()
                        .unwrap()
                        .push("64 calls in flight: one not sent".into());
                    continue;
                };
                let (mut c, f, d) = (c.clone(), f.clone(), d.clone());
                calls.spawn(async move {
                    match c.model_infer(call()).await {
                        Ok(_) => d.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            f.lock()
                                .unwrap()
                                .push(format!("{:?}: {}", e.code(), e.message()));
                            0
                        }
                    };
                    drop(slot);
                });
                while calls.try_join_next().is_some() {}
            }
            while calls.join_next().await.is_some() {}
        });
        Load {
            stop,
            failed,
            done,
            tasks: vec![sender],
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.done.load(Ordering::Relaxed), failed)
    }
}

/// A gateway that reaches Triton only through `name` on `dns`, with batching off (one
/// call, one Triton inference).
async fn gateway_for(
    dns: &Dns,
    name: &str,
    port: u16,
    resolve_ms: u64,
    slow_ms: u64,
) -> TestGateway {
    let mut cfg = test_config(vec![format!("http://{name}:{port}")]);
    cfg.triton.dns_server = Some(dns.addr.to_string());
    cfg.triton.resolve_interval_ms = resolve_ms;
    cfg.triton.slow_start_ms = slow_ms;
    cfg.batching.mode = BatchMode::Off;
    gateway_with(cfg).await
}

/// Waits until the gateway knows just the endpoints of `tritons`, all up. (The metrics are
/// the process's: an earlier test's gateway may have left series of its own endpoints.)
async fn until_endpoints(http: &reqwest::Client, gw: &TestGateway, tritons: &[&Triton]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = scrape(http, &gw.http_base()).await;
        let up = |t: &&Triton| {
            m.get(&format!(
                "infergate_triton_endpoint_up{{endpoint=\"{}\"}}",
                t.grpc_url()
            )) == Some(&1.0)
        };
        if m.get("infergate_triton_endpoints") == Some(&(tritons.len() as f64))
            && tritons.iter().all(up)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} endpoints up: {m:?}",
            tritons.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_grows_to_three_pods_spreads_evenly_and_shrinking_fails_no_call() {
    let _one = ONE_AT_A_TIME.lock().await;
    let hosts = [lo(2), lo(3), lo(4)];
    let mut tritons = fleet(&hosts);
    let dns = Dns::start().await;
    let name = "triton.fleet.test";
    dns.set(name, &hosts[..1]);
    let interval = Duration::from_millis(2_000);
    let gw = gateway_for(&dns, name, tritons[0].grpc_port, 2_000, 0).await;
    let http = reqwest::Client::new();
    until_endpoints(&http, &gw, &[&tritons[0]]).await;
    let client = gw.client().await;
    let load = Load::start(&client, 300);
    let loaded = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // Scale up: the name now stands for three pods; no restart.
    let before = counts(&http, &tritons.iter().collect::<Vec<_>>()).await;
    assert!(
        before[0] > 0 && before[1] == 0 && before[2] == 0,
        "{before:?}"
    );
    dns.set(name, &hosts);
    let grown = Instant::now();
    let mut first_call = [None, None];
    while first_call.iter().any(Option::is_none) && grown.elapsed() < 2 * interval {
        let now = counts(&http, &[&tritons[1], &tritons[2]]).await;
        for (i, n) in now.iter().enumerate() {
            if *n > 0 && first_call[i].is_none() {
                first_call[i] = Some(grown.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("first call on each newcomer after {first_call:?}");
    assert!(
        first_call.iter().all(Option::is_some),
        "both newcomers get calls within two resolve intervals"
    );
    // From two intervals on, each pod's share is within ±10 points of even.
    tokio::time::sleep((grown + 2 * interval).saturating_duration_since(Instant::now())).await;
    let all: Vec<&Triton> = tritons.iter().collect();
    until_endpoints(&http, &gw, &all).await;
    let from = counts(&http, &all).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let to = counts(&http, &all).await;
    let s = shares(&from, &to);
    let m = scrape(&http, &gw.http_base()).await;
    let seen: Vec<String> = all
        .iter()
        .map(|t| {
            let of = |what: &str| {
                m.get(&format!(
                    "infergate_triton_endpoint_{what}{{endpoint=\"{}\"}}",
                    t.grpc_url()
                ))
                .copied()
                .unwrap_or(f64::NAN)
            };
            format!(
                "{:.1} ms / {} in flight",
                1e3 * of("latency_seconds"),
                of("in_flight")
            )
        })
        .collect();
    println!("the gateway's view of each pod: {seen:?}");
    println!(
        "shares over 4 s, from two intervals after the scale-up: {s:.1?} ({from:?} -> {to:?})"
    );
    for share in &s {
        assert!(
            (share - 100.0 / 3.0).abs() <= 10.0,
            "within ±10 points of even: {s:.1?}"
        );
    }

    // Scale down: the third pod leaves the answer, then stops after a grace period of two
    // intervals. No call fails; its connections close once drained.
    let port = tritons[2].grpc_port;
    assert!(
        connections_to(hosts[2], port) > 0,
        "the gateway is connected to the third pod"
    );
    dns.set(name, &hosts[..2]);
    tokio::time::sleep(2 * interval + Duration::from_millis(500)).await;
    let m = scrape(&http, &gw.http_base()).await;
    assert_eq!(m.get("infergate_triton_endpoints"), Some(&2.0));
    assert_eq!(m.get("infergate_triton_endpoints_draining"), Some(&0.0));
    let gone = format!("endpoint=\"{}\"", tritons[2].grpc_url());
    assert!(
        !m.keys().any(|k| k.contains(&gone)),
        "the drained endpoint's series are gone: {:?}",
        m.keys().filter(|k| k.contains(&gone)).collect::<Vec<_>>()
    );
    assert_eq!(
        connections_to(hosts[2], port),
        0,
        "drained: its connections closed"
    );
    let third_then = counts(&http, &[&tritons[2]]).await[0];
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counts(&http, &[&tritons[2]]).await[0],
        third_then,
        "no calls reach the pod that left"
    );
    tritons[2].stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (done, failed) = load.finish().await;
    println!(
        "{done} calls in {:.1?}; failed: {failed:?}; DNS queries: {}",
        loaded.elapsed(),
        dns.queries.load(Ordering::Relaxed)
    );
    assert!(failed.is_empty(), "0 failed calls: {failed:?}");
    assert!(done > 500, "the load ran: {done}");

    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_newcomer_and_a_failed_pod_has_its_name_looked_up_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let hosts = [lo(5), lo(6)];
    let mut tritons = fleet(&hosts);
    let port = tritons[0].grpc_port;
    let dns = Dns::start().await;
    let http = reqwest::Client::new();

    // Slow start over 6 s: the newcomer's share grows window by window instead of jumping.
    // Windows of 0.5 s from the change of the DNS answer (the newcomer is found within one
    // 500 ms interval).
    let name = "ramp.fleet.test";
    dns.set(name, &hosts[..1]);
    let gw = gateway_for(&dns, name, port, 500, 6_000).await;
    until_endpoints(&http, &gw, &[&tritons[0]]).await;
    let client = gw.client().await;
    let load = Load::start(&client, 300);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let both: Vec<&Triton> = tritons.iter().collect();
    let mut last = counts(&http, &both).await;
    dns.set(name, &hosts);
    let mut windows = Vec::new();
    for _ in 0..18 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counts(&http, &both).await;
        windows.push(shares(&last, &now)[1]);
        last = now;
    }
    let (_, failed) = load.finish().await;
    gw.shutdown().await.unwrap();
    println!("the newcomer's share by 0.5 s window: {windows:.1?}");
    assert!(failed.is_empty(), "{failed:?}");
    let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len() as f64;
    let (first, third, last_2s) = (
        mean(&windows[..2]),
        mean(&windows[4..6]),
        mean(&windows[14..]),
    );
    // Without slow start the newcomer's share would be about half from its first window.
    assert!(
        first < 0.6 * last_2s,
        "a small share at first: {windows:.1?}"
    );
    assert!(first < third && third < last_2s, "it ramps: {windows:.1?}");
    assert!(last_2s > 35.0, "then about half: {windows:.1?}");

    // A pod is replaced (a new address under the name) while the gateway looks the name up
    // only every 10 minutes: the old pod stopping makes it look again at once.
    let name = "moved.fleet.test";
    dns.set(name, &hosts[..1]);
    let gw = gateway_for(&dns, name, port, 600_000, 0).await;
    let mut client = gw.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.model_infer(call()).await.is_err() {
        assert!(Instant::now() < deadline, "served by the first pod");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dns.set(name, &hosts[1..]);
    tritons[0].stop();
    let stopped = Instant::now();
    loop {
        if client.model_infer(call()).await.is_ok() {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "served by the new pod soon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "served by the new address {:?} after the old pod stopped",
        stopped.elapsed()
    );
    let m = scrape(&http, &gw.http_base()).await;
    assert_eq!(
        m.get(&format!(
            "infergate_triton_endpoint_up{{endpoint=\"{}\"}}",
            tritons[1].grpc_url()
        )),
        Some(&1.0)
    );
    assert_eq!(m.get("infergate_triton_endpoints"), Some(&1.0));
    gw.shutdown().await.unwrap();
}
