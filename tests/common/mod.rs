//! Test harness: one real Triton per test binary (CPU build, started by
//! scripts/start-triton.sh on free ports, stopped by a watchdog when the test process exits)
//! and in-process infergate gateways on ephemeral ports.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use infergate::{
    config::Config, proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient,
    server::Gateway,
};
use serde_json::Value;
use tokio::sync::oneshot;

pub type Client = GrpcInferenceServiceClient<Channel>;
use tonic::transport::Channel;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nothing listens on, never one this process handed out before: the kernel
/// may give a port just freed again, and a server given the same port twice (say, for HTTP and
/// metrics) refuses to start (found by .ci/run with three Tritons started at once).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The cached venv of Triton's CPU build and its Python clients (installed on first use).
pub fn triton_venv() -> String {
    let out = Command::new(repo().join("scripts/install-triton.sh"))
        .output()
        .expect("run install-triton.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

pub const REDIS: &str = "redis://127.0.0.1:6379";
pub const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub struct Triton {
    /// The loopback address it listens on (127.0.0.1 unless a test asks for another).
    pub host: std::net::Ipv4Addr,
    pub grpc_port: u16,
    pub http_port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
}

impl Triton {
    pub fn grpc_url(&self) -> String {
        format!("http://{}:{}", self.host, self.grpc_port)
    }
    pub fn http_base(&self) -> String {
        format!("http://{}:{}", self.host, self.http_port)
    }

    /// A Triton of the caller's own on the given ports (fresh ones if `None`), with extra
    /// tritonserver flags; waits until it is ready. Stopped when dropped.
    pub fn start(ports: Option<(u16, u16, u16)>, extra: &[String]) -> Triton {
        Self::serving(None, ports, extra)
    }

    /// [`Triton::start`] serving the model repository `models` (triton-models/ if `None`).
    pub fn serving(
        models: Option<&std::path::Path>,
        ports: Option<(u16, u16, u16)>,
        extra: &[String],
    ) -> Triton {
        Self::serving_at(std::net::Ipv4Addr::LOCALHOST, models, ports, extra)
    }

    /// [`Triton::serving`] on another loopback address (127.0.0.2, …): several Tritons on
    /// one set of ports, as the pods behind a headless Service look.
    pub fn serving_at(
        host: std::net::Ipv4Addr,
        models: Option<&std::path::Path>,
        ports: Option<(u16, u16, u16)>,
        extra: &[String],
    ) -> Triton {
        let (grpc_port, http_port, metrics_port) =
            ports.unwrap_or_else(|| (free_port(), free_port(), free_port()));
        let log = std::env::temp_dir().join(format!("infergate-triton-{host}-{grpc_port}.log"));
        let mut cmd = Command::new(repo().join("scripts/start-triton.sh"));
        cmd.env("TRITON_ADDRESS", host.to_string());
        if let Some(m) = models {
            cmd.env("TRITON_MODELS", m);
        }
        let child = cmd
            .args([grpc_port, http_port, metrics_port].map(|p| p.to_string()))
            .args(extra)
            .env("INFERGATE_WATCH_PID", std::process::id().to_string())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .expect("start scripts/start-triton.sh");
        let deadline = Instant::now() + Duration::from_secs(180);
        while http_status_at(host, http_port, "/v2/health/ready") != Some(200) {
            assert!(
                Instant::now() < deadline,
                "Triton did not become ready; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Triton {
            host,
            grpc_port,
            http_port,
            metrics_port,
            child: Some(child),
        }
    }

    pub fn ports(&self) -> (u16, u16, u16) {
        (self.grpc_port, self.http_port, self.metrics_port)
    }

    /// SIGTERM to the start script (its trap stops tritonserver), then waits for both.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(30);
            while http_status_at(self.host, self.http_port, "/v2/health/live").is_some()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for Triton {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's resident memory in KiB (`VmRSS`); `None` once it has exited.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Sends a signal (`TERM`, `KILL`...) to a process.
/// A child process's output appended to `path` (kept across restarts of the same process).
pub fn append_log(path: &std::path::Path) -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap(),
    )
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// `rabbitmqctl stop_app|start_app`; start_app waits until the AMQP port answers.
pub fn rabbitmqctl(cmd: &str) {
    let ok = Command::new("rabbitmqctl")
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "rabbitmqctl {cmd}");
    if cmd == "start_app" {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
            assert!(Instant::now() < deadline, "RabbitMQ did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// RabbitMQ's application stopped (the node keeps running) for as long as this lives. Its drop
/// starts it again even when the test fails, so a failed run does not leave the broker down
/// for every test after it.
pub struct RabbitStopped {
    restarted: bool,
}

impl RabbitStopped {
    pub fn new() -> Self {
        rabbitmqctl("stop_app");
        Self { restarted: false }
    }

    /// Starts the application again and waits for the AMQP port.
    pub fn start(mut self) {
        self.restarted = true;
        rabbitmqctl("start_app");
    }
}

impl Drop for RabbitStopped {
    fn drop(&mut self) {
        if !self.restarted {
            // Best effort and no panic: this may run while a test is already panicking.
            let _ = Command::new("rabbitmqctl")
                .arg("start_app")
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// A plain HTTP GET on loopback, for readiness polling without an async runtime.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_at(std::net::Ipv4Addr::LOCALHOST, port, path)
}

/// [`http_status`] on another loopback address.
pub fn http_status_at(host: std::net::Ipv4Addr, port: u16, path: &str) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((host, port)), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// A child process that is SIGKILLed and reaped when dropped: a test that fails (panics)
/// leaves no server running into the tests after it, consuming from the shared brokers.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` as a [`Reaped`] child.
pub fn reaped(cmd: &mut Command) -> Reaped {
    Reaped(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
    )
}

/// An `infergate` process (this build's binary) with stderr to `log`.
pub fn infergate(args: &[String], log: &PathBuf) -> Reaped {
    reaped(
        Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap())),
    )
}

/// Waits until a loopback HTTP GET answers `want`.
pub fn wait_status(port: u16, path: &str, want: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while http_status(port, path) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port}{path} did not answer {want} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Triton of this test binary. `INFERGATE_TEST_TRITON=GRPC_PORT,HTTP_PORT` reuses one
/// already running (handy while developing).
pub fn triton() -> &'static Triton {
    static TRITON: OnceLock<Triton> = OnceLock::new();
    TRITON.get_or_init(|| {
        if let Ok(v) = std::env::var("INFERGATE_TEST_TRITON") {
            let (g, h) = v.split_once(',').expect("INFERGATE_TEST_TRITON=GRPC,HTTP");
            return Triton {
                host: std::net::Ipv4Addr::LOCALHOST,
                grpc_port: g.parse().unwrap(),
                http_port: h.parse().unwrap(),
                metrics_port: 0,
                child: None,
            };
        }
        Triton::start(None, &[])
    })
}

/// An infergate running inside the test's runtime until dropped.
pub struct TestGateway {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }
    pub fn http_base(&self) -> String {
        format!("http://{}", self.http_addr)
    }
    pub async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        connect(&self.grpc_url()).await
    }
    /// Sends the shutdown signal and waits for the gateway to finish draining.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn test_config(triton_urls: Vec<String>) -> Config {
    let mut cfg = Config::default();
    cfg.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.server.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.server.shutdown_grace_ms = 5_000;
    cfg.triton.urls = triton_urls;
    cfg.triton.health_interval_ms = 200;
    cfg.triton.probe_timeout_ms = 500;
    cfg.triton.connect_timeout_ms = 500;
    cfg
}

pub async fn gateway_with(cfg: Config) -> TestGateway {
    let gw = Gateway::bind(cfg).await.expect("bind gateway");
    let (grpc_addr, http_addr) = (gw.grpc_addr(), gw.http_addr());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));
    TestGateway {
        grpc_addr,
        http_addr,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A gateway in front of this binary's Triton.
pub async fn gateway() -> TestGateway {
    gateway_with(test_config(vec![triton().grpc_url()])).await
}

pub async fn connect(url: &str) -> GrpcInferenceServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            Ok(ch) => {
                return GrpcInferenceServiceClient::new(ch)
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20);
            }
            Err(e) if Instant::now() > deadline => panic!("connect {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A request of one FP32 value as `INPUT` [1, 1] (the `flaky` and `slow` models' input).
pub fn one_input(model: &str, x: f32) -> infergate::proto::inference::ModelInferRequest {
    use infergate::proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&[x])],
        ..Default::default()
    }
}

/// What `onnx_linear` answers for the row `x`: y[j] = Σ x[i]·(i+1)(j+1)/10 + b[j].
pub fn onnx_linear_expected(x: [f32; 4]) -> Vec<f64> {
    let b = [0.5f64, -1.0, 2.0];
    (0..3)
        .map(|j| {
            (0..4)
                .map(|i| f64::from(x[i]) * ((i + 1) * (j + 1)) as f64 / 10.0)
                .sum::<f64>()
                + b[j]
        })
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> bytes::Bytes {
    v.iter()
        .flat_map(|x| x.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// One row of `add_sub` (16 × 2.0 and 16 × 1.0) as a gRPC request.
pub fn add_sub_request() -> infergate::proto::inference::ModelInferRequest {
    use infergate::proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "add_sub".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(&[2.0; 16]), f32_bytes(&[1.0; 16])],
        ..Default::default()
    }
}

pub fn f32_from(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Triton's statistics of one model: (requests that succeeded, rows inferred, executions).
pub async fn triton_stats(model: &str) -> (u64, u64, u64) {
    let mut c = connect(&triton().grpc_url()).await;
    let s = c
        .model_statistics(infergate::proto::inference::ModelStatisticsRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats[0]
        .clone();
    let requests = s.inference_stats.unwrap().success.unwrap().count;
    (requests, s.inference_count, s.execution_count)
}

/// [`triton_stats`] once they stop moving: Triton counts a request just after it answers it,
/// so a reading taken as the last answer arrives can miss it. Two readings 300 ms apart that
/// agree (at most about 6 s of trying) are taken as settled.
pub async fn quiet_stats(model: &str) -> (u64, u64, u64) {
    let mut last = triton_stats(model).await;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = triton_stats(model).await;
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// `name{labels} value` lines of a Prometheus text exposition, by the full series name.
pub fn series(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `GET /metrics`, as [`series`].
pub async fn scrape(http: &reqwest::Client, base: &str) -> std::collections::BTreeMap<String, f64> {
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    series(&r.text().await.unwrap())
}

/// `GET /v1/tasks/{id}` as JSON.
pub async fn task(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs `body` as JSON and reads the answer as JSON, whatever its status.
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until every task is final; returns them.
pub async fn wait_final(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
    limit: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut done: Vec<Option<Value>> = vec![None; ids.len()];
    loop {
        for (i, id) in ids.iter().enumerate() {
            if done[i].is_none() {
                let t = task(http, base, id).await;
                if ["succeeded", "failed", "cancelled", "expired"]
                    .contains(&t["status"].as_str().unwrap_or(""))
                {
                    done[i] = Some(t);
                }
            }
        }
        let left = done.iter().filter(|d| d.is_none()).count();
        if left == 0 {
            return done.into_iter().map(Option::unwrap).collect();
        }
        if Instant::now() >= deadline {
            // Say where the stragglers are stuck (state, attempts), not only how many.
            let mut stuck = Vec::new();
            for (id, _) in ids.iter().zip(&done).filter(|(_, d)| d.is_none()).take(5) {
                stuck.push(task(http, base, id).await.to_string());
            }
            panic!(
                "{left} of {} tasks not final in time; first ones: {}",
                ids.len(),
                stuck.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A private redis-server on a free loopback port, persisting every write (AOF, fsync always)
/// into its own directory, so it can be killed and restarted like a real deployment's.
pub struct PrivateRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start(port: u16, dir: &std::path::Path) -> Self {
        Self {
            port,
            dir: dir.to_path_buf(),
            child: Some(Self::spawn(port, dir)),
        }
    }

    /// Starts it again (killing it first if it runs) on the same port and files. A new
    /// value would not do: dropping the old one removes the directory the new one uses.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::spawn(self.port, &self.dir));
    }

    fn spawn(port: u16, dir: &std::path::Path) -> std::process::Child {
        std::fs::create_dir_all(dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/ensure-services.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its process id, for SIGSTOP/SIGCONT.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server running").id()
    }

    /// Kills it and starts it again on the same port with nothing: its files removed, as a
    /// new pod without persistence, a flush or a failover to an empty replica would.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.child = Some(Self::spawn(self.port, &self.dir));
    }

    /// SIGKILL: no chance to save anything beyond what each write already made durable.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
