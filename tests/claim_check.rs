//! Large payloads by reference (the claim check), end to end against the real Triton, Redis
//! and RabbitMQ, with the blob store on the local filesystem (Redis Streams) and on a real
//! S3-compatible server, moto 5.2.6 from PyPI (RabbitMQ): tasks with a 50 MiB input and a 50 MiB
//! answer run through an `infergate serve` process; the broker messages stay under 64 KiB; the
//! result is streamed back over HTTP and gRPC; the process's RSS is sampled throughout and
//! printed; the blobs are gone once their task expired.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use infergate::proto::{
    inference::{ModelInferRequest, ModelInferResponse, model_infer_request::InferInputTensor},
    tasks::{GetRequest, SubmitRequest, task_service_client::TaskServiceClient},
};
use prost::Message;

/// 50 MiB of FP32: the input, and `seq_sum`'s DOUBLED output of the same size.
const ELEMENTS: usize = 50 * (1 << 20) / 4;
const TASKS: usize = 3;
const TTL_MS: u64 = 6_000;
const MIB: f64 = 1048576.0;

/// moto's S3 server, installed (pinned, cached) by scripts/install-s3-server.sh.
fn moto_server() -> PathBuf {
    let venv = Command::new(repo().join("scripts/install-s3-server.sh"))
        .output()
        .expect("run scripts/install-s3-server.sh");
    assert!(
        venv.status.success(),
        "{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    PathBuf::from(String::from_utf8(venv.stdout).unwrap().trim()).join("bin/moto_server")
}

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(log: &std::path::Path) -> Self {
        let port = free_port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(append_log(log))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_status(port, "/").is_none() {
            assert!(
                Instant::now() < deadline,
                "moto did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Self { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the blobs are, to count them from outside infergate.
enum Bucket {
    Dir(PathBuf),
    /// Blobs under `prefix/` in the bucket; keys are answered without it.
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
    },
}

impl Bucket {
    /// Every blob's key.
    async fn keys(&self, http: &reqwest::Client) -> Vec<String> {
        match self {
            Bucket::Dir(dir) => {
                let mut out = Vec::new();
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    let Ok(rd) = std::fs::read_dir(&d) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else {
                            out.push(p.strip_prefix(dir).unwrap().display().to_string());
                        }
                    }
                }
                out
            }
            Bucket::S3 {
                endpoint,
                bucket,
                prefix,
            } => {
                let xml = http
                    .get(format!("{endpoint}/{bucket}?list-type=2"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                xml.split("<Key>")
                    .skip(1)
                    .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k))
                    .map(|k| {
                        k.strip_prefix(&format!("{prefix}/"))
                            .unwrap_or_else(|| panic!("{k} is outside the prefix {prefix}/"))
                            .to_string()
                    })
                    .collect()
            }
        }
    }
}

fn request(seed: f32) -> ModelInferRequest {
    let data: Vec<f32> = (0..ELEMENTS).map(|i| seed + (i % 1000) as f32).collect();
    ModelInferRequest {
        model_name: "seq_sum".into(),
        inputs: vec![InferInputTensor {
            name: "SEQ".into(),
            datatype: "FP32".into(),
            shape: vec![1, ELEMENTS as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&data)],
        ..Default::default()
    }
}

/// The response's DOUBLED output is twice the input made from `seed`.
fn check_doubled(resp: &ModelInferResponse, seed: f32) {
    let i = resp
        .outputs
        .iter()
        .position(|o| o.name == "DOUBLED")
        .expect("DOUBLED output");
    assert_eq!(resp.outputs[i].shape, vec![1, ELEMENTS as i64]);
    let raw = &resp.raw_output_contents[i];
    assert_eq!(raw.len(), ELEMENTS * 4);
    for k in [0, 1, 999, 1000, ELEMENTS / 2, ELEMENTS - 1] {
        let v = f32::from_le_bytes(raw[k * 4..k * 4 + 4].try_into().unwrap());
        assert_eq!(v, 2.0 * (seed + (k % 1000) as f32), "DOUBLED[{k}]");
    }
}

async fn run(broker: &str, blob_url: &str, bucket: Bucket, env: &[(&str, String)], name: &str) {
    let _ = triton();
    let (grpc_port, http_port) = (free_port(), free_port());
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let log = std::env::temp_dir().join(format!("infergate-claim-{name}-{http_port}.log"));
    let args: Vec<String> = [
        "serve",
        "--triton-url",
        &triton().grpc_url(),
        "--grpc-addr",
        &format!("127.0.0.1:{grpc_port}"),
        "--http-addr",
        &format!("127.0.0.1:{http_port}"),
        "--broker",
        broker,
        "--task-store",
        REDIS,
        "--redis-prefix",
        &prefix,
        "--workers",
        "1",
        "--worker-concurrency",
        "2",
        "--blob-store",
        blob_url,
        "--claim-check-bytes",
        "32768",
        "--blob-sweep-ms",
        "500",
        "--task-ttl-ms",
        &TTL_MS.to_string(),
        "--max-request-bytes",
        &(64u64 << 20).to_string(),
        "--task-max-result-bytes",
        &(64u64 << 20).to_string(),
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infergate"));
    cmd.args(&args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(append_log(&log));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = reaped(&mut cmd);
    let pid = child.id();
    wait_status(http_port, "/v2/health/ready", 200, Duration::from_secs(60));
    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();

    // A client may not name a blob itself (it would read another task's input).
    let r = http
        .post(format!("{base}/v1/models/seq_sum/tasks"))
        .json(&serde_json::json!({
            "parameters": {"infergate.claim_check": "tasks/someone-else/input"},
            "inputs": [{"name": "SEQ", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let msg = r.text().await.unwrap();
    assert!(msg.contains("infergate.claim_check"), "{msg}");

    // RSS sampled every 20 ms while the tasks run.
    let idle_kib = rss_kib(pid).expect("VmRSS");
    let peak = Arc::new(AtomicU64::new(idle_kib));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid).unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut tasks = TaskServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let mut after = Vec::new();
    let mut ids = Vec::new();
    for n in 0..TASKS {
        let seed = n as f32 * 7.0;
        let req = request(seed);
        let in_bytes = req.encoded_len();
        let id = tasks
            .submit(SubmitRequest {
                request: Some(req),
                callback_url: String::new(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        let done = wait_final(
            &http,
            &base,
            std::slice::from_ref(&id),
            Duration::from_secs(180),
        )
        .await
        .remove(0);
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(
            done.get("response").is_none(),
            "a stored result is not inlined: {done}"
        );
        let url = done["result_url"].as_str().expect("result_url").to_string();
        let size = done["result_bytes"].as_u64().unwrap();
        assert!(size > (50 << 20), "{size}");

        // While the task lives its result is in the blob store and its input is gone. The
        // worker removes the input after the result is stored (a store write that failed
        // would retry the task, which needs it), so its removal is waited for, bounded.
        let keys = bucket.keys(&http).await;
        assert!(keys.contains(&format!("tasks/{id}/result-1")), "{keys:?}");
        let input = format!("tasks/{id}/input");
        let removed_by = Instant::now() + Duration::from_secs(10);
        loop {
            let keys = bucket.keys(&http).await;
            if !keys.contains(&input) {
                break;
            }
            assert!(
                Instant::now() < removed_by,
                "input kept 10 s after success: {keys:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Streamed over HTTP...
        let r = http.get(format!("{base}{url}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/x-protobuf");
        let mut body = Vec::with_capacity(size as usize);
        let mut pieces = 0;
        let mut s = r.bytes_stream();
        while let Some(chunk) = s.next().await {
            body.extend_from_slice(&chunk.unwrap());
            pieces += 1;
        }
        assert_eq!(body.len() as u64, size);
        check_doubled(&ModelInferResponse::decode(&body[..]).unwrap(), seed);
        // ... and over gRPC, in chunks.
        let mut chunks = tasks
            .get_result(GetRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut grpc_body = Vec::new();
        let mut first_total = None;
        let mut grpc_chunks = 0;
        while let Some(c) = chunks.next().await {
            let c = c.unwrap();
            first_total.get_or_insert(c.total_bytes);
            grpc_body.extend_from_slice(&c.data);
            grpc_chunks += 1;
        }
        assert_eq!(first_total, Some(size));
        assert!(grpc_body == body, "gRPC and HTTP answer the same bytes");
        drop((body, grpc_body));
        after.push(rss_kib(pid).expect("VmRSS"));
        println!(
            "{name}: task {n}: input {:.1} MiB, result {:.1} MiB (HTTP {pieces} pieces, gRPC {grpc_chunks} chunks), RSS after {:.1} MiB",
            in_bytes as f64 / MIB,
            size as f64 / MIB,
            *after.last().unwrap() as f64 / 1024.0
        );
        ids.push(id);
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();

    // Every task message the broker carried was small: the payloads went by reference.
    let m = scrape(&http, &base).await;
    let count = m["infergate_task_message_bytes_count"];
    let small = m["infergate_task_message_bytes_bucket{le=\"65536.0\"}"];
    let largest_le_1k = m["infergate_task_message_bytes_bucket{le=\"1024.0\"}"];
    assert_eq!(count, TASKS as f64);
    assert_eq!(small, count, "every broker message under 64 KiB");
    let put = m["infergate_blob_bytes_total{op=\"put\",result=\"ok\"}"];
    assert!(put >= (TASKS * 2 * ELEMENTS * 4) as f64, "{put}");
    let peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
    println!(
        "{name}: {TASKS} tasks of 50 MiB in and out; broker messages: {count} (all under 1 KiB: {}); blob bytes written {:.0} MiB; RSS idle {:.1} MiB, peak {peak_mib:.1} MiB, after each task {:?} MiB",
        largest_le_1k == count,
        put / MIB,
        idle_kib as f64 / 1024.0,
        after
            .iter()
            .map(|k| (*k as f64 / 1024.0).round())
            .collect::<Vec<_>>()
    );
    // Bounded: the peak is a few copies of one payload (gRPC frame, decoded request, encoded
    // blob; Triton's answer likewise), never one per task; after a task it falls back.
    assert!(
        peak_mib < idle_kib as f64 / 1024.0 + 8.0 * 50.0,
        "peak RSS {peak_mib:.1} MiB"
    );
    let growth = after[TASKS - 1] as f64 / 1024.0 - after[0] as f64 / 1024.0;
    assert!(
        growth < 64.0,
        "RSS grew {growth:.1} MiB from the first task to the last"
    );

    // Once the tasks expire, the sweep removes their blobs.
    let deadline = Instant::now() + Duration::from_millis(TTL_MS) + Duration::from_secs(30);
    loop {
        let keys = bucket.keys(&http).await;
        let left: Vec<_> = keys
            .iter()
            .filter(|k| ids.iter().any(|id| k.contains(id.as_str())))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blobs left after expiry: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in &ids {
        let r = http
            .get(format!("{base}/v1/tasks/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "task {id} expired");
    }
    println!("{name}: blobs of the {TASKS} tasks gone after their expiry");
    signal(pid, "TERM");
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_through_redis_streams_with_blobs_on_the_local_filesystem() {
    let dir = std::env::temp_dir().join(format!("infergate-blobs-{}", free_port()));
    let url = format!("file://{}", dir.display());
    run(REDIS, &url, Bucket::Dir(dir.clone()), &[], "redis+file").await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_through_rabbitmq_with_blobs_on_an_s3_server() {
    let log = std::env::temp_dir().join(format!("infergate-moto-{}.log", free_port()));
    let moto = Moto::start(&log);
    let bucket = "infergate-blobs".to_string();
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/{bucket}", moto.endpoint()))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "creating the bucket: {}",
        r.status()
    );
    let env = [
        ("AWS_ENDPOINT", moto.endpoint()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    run(
        RABBIT,
        &format!("s3://{bucket}/prod"),
        Bucket::S3 {
            endpoint: moto.endpoint(),
            bucket,
            prefix: "prod".into(),
        },
        &env,
        "rabbitmq+s3",
    )
    .await;
}
