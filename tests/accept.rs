//! Accepting a task is atomic: the store or the broker going down between the record's
//! creation and the publish never leaves a record that no broker will deliver, and a client
//! retrying with the same idempotency key gets the same task, which runs exactly once.
//!
//! A private Redis (AOF, fsync always) is both broker and task store; an `infergate worker`
//! process runs the tasks on the real Triton. To hit the window between create and publish
//! exactly, the front end's broker is the real Redis broker behind `KillsRedisOnPublish`: a
//! fault injector (named so; not a mock) that SIGKILLs the real Redis just before a publish
//! goes out, so the store write has happened and the publish, and any undo, fail for real.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use common::*;
use infergate::{
    auth::Caller,
    backend::triton::TritonPool,
    error::GatewayError,
    infer::InferService,
    proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor},
    queue::{Broker, Delivery, QueueError, TaskMessage},
    server::connect_tasks,
    tasks::{TaskState, front::TaskFront, outbox, parts::Tasks},
    telemetry::trace::TraceHeaders,
};
use tokio_util::sync::CancellationToken;

/// Fault injector: the next `armed` publishes first SIGKILL the Redis, then go to the real
/// broker (which finds it gone).
struct KillsRedisOnPublish {
    inner: Arc<dyn Broker>,
    redis: Arc<Mutex<PrivateRedis>>,
    armed: AtomicU32,
}

#[async_trait]
impl Broker for KillsRedisOnPublish {
    async fn publish(&self, msg: &TaskMessage) -> Result<(), QueueError> {
        if self
            .armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.redis.lock().unwrap().kill();
        }
        self.inner.publish(msg).await
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.inner.receive(max, wait).await
    }
    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.ack(d).await
    }
    async fn retry(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.retry(d).await
    }
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.inner.dead_letter(d, reason).await
    }
    async fn depth(&self) -> Result<u64, QueueError> {
        self.inner.depth().await
    }
    async fn dead_letters(&self) -> Result<Vec<(TaskMessage, String)>, QueueError> {
        self.inner.dead_letters().await
    }
}

fn linear(x: [f32; 4]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "onnx_linear".into(),
        inputs: vec![InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x)],
        ..Default::default()
    }
}

fn expected(x: [f32; 4]) -> Vec<f64> {
    onnx_linear_expected(x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_and_broker_lost_between_create_and_publish_run_a_retried_task_once() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("infergate-accept-{port}"));
    let redis = Arc::new(Mutex::new(PrivateRedis::start(port, &dir)));
    let url = redis.lock().unwrap().url();
    let prefix = format!("igtest-{}", infergate::tasks::new_task_id());
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.tasks.broker = url.parse().unwrap();
    cfg.tasks.task_store = url.parse().unwrap();
    cfg.tasks.redis_prefix = prefix.clone();
    // The outbox grace: publish_timeout (at least 5 s) + 2 s.
    cfg.tasks.publish_timeout_ms = 1_000;
    let grace = infergate::tasks::outbox_grace(Duration::from_secs(1));

    let parts = connect_tasks(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let pool = TritonPool::new(&cfg.triton, cfg.server.max_response_bytes).unwrap();
    pool.probe_all().await;
    let _probe = pool.spawn_probe(stop.clone());
    let faulty = Arc::new(KillsRedisOnPublish {
        inner: Arc::clone(&parts.broker),
        redis: Arc::clone(&redis),
        armed: AtomicU32::new(0),
    });
    let front = TaskFront {
        tasks: Tasks {
            broker: faulty.clone(),
            blobs: None,
            ..parts.clone()
        },
        infer: InferService::new(pool, cfg.batching.clone()),
    };
    let log = std::env::temp_dir().join(format!("{prefix}-worker.log"));
    let ops = free_port();
    let _worker = infergate(
        &[
            "worker",
            "--http-addr",
            &format!("127.0.0.1:{ops}"),
            "--triton-url",
            &triton().grpc_url(),
            "--broker",
            &url,
            "--task-store",
            &url,
            "--redis-prefix",
            &prefix,
            "--workers",
            "1",
            "--log-level",
            "warn",
        ]
        .map(String::from),
        &log,
    );
    // Connected to Redis (a worker that cannot reach it at start exits).
    wait_status(ops, "/livez", 200, Duration::from_secs(30));
    let caller = Caller::default();
    let rows_before = triton_stats("onnx_linear").await.1;
    let submit = |x: [f32; 4], key: &str| {
        front.submit(
            linear(x),
            Some(key.to_string()),
            None,
            TraceHeaders::default(),
            &caller,
        )
    };
    let restart = || {
        redis.lock().unwrap().restart();
    };

    // 1. Redis dies after the record was written, before the publish: the client is told
    // 503, and the record stays (its undo failed too) with its message in the outbox.
    let x1 = [1.0, 2.0, 3.0, 4.0];
    faulty.armed.store(1, Ordering::SeqCst);
    let err = submit(x1, "retried").await.unwrap_err();
    assert!(matches!(err, GatewayError::Unavailable(_)), "{err:?}");
    restart();

    // The client retries with its key: the same task, published now, run once.
    let (rec, created) = retry_until_accepted(|| submit(x1, "retried")).await;
    assert!(!created, "the retry names the task the first try created");
    let t = Instant::now();
    let first = wait_succeeded(&front, &rec.id, x1).await;
    let first_after = t.elapsed();
    assert_eq!(first.attempts, 1, "{first:?}");

    // 2. The same, and the client never comes back: the outbox relay queues the task once
    // its grace is over (the worker process runs it every outbox_sweep_ms, and so does this
    // test, by hand: whichever comes first).
    let x2 = [-1.0, 0.5, 2.0, 8.0];
    faulty.armed.store(1, Ordering::SeqCst);
    assert!(submit(x2, "abandoned").await.is_err());
    restart();
    let orphan = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match parts
                .store
                .get(&key_holder(&parts, "abandoned").await)
                .await
            {
                Ok(Some(rec)) => break rec,
                _ => assert!(Instant::now() < deadline, "the record did not survive"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(orphan.state, TaskState::Queued);
    assert!(
        parts.store.unpublished(&orphan.id).await.unwrap().is_some(),
        "its message waits in the outbox"
    );
    tokio::time::sleep(grace).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while parts.store.unpublished(&orphan.id).await.unwrap().is_some() {
        let _ = outbox::relay_once(&*parts.store, &*parts.broker, "redis", grace, false).await;
        assert!(Instant::now() < deadline, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = wait_succeeded(&front, &orphan.id, x2).await;
    assert_eq!(second.attempts, 1, "{second:?}");

    // 3. A publish that raced another (the relay and a retry both sent it): the second
    // delivery is skipped, the task runs once.
    let x3 = [3.0, 3.0, 3.0, 3.0];
    let (rec3, _) = submit(x3, "twice").await.unwrap();
    let msg = TaskMessage {
        task_id: rec3.id.clone(),
        model: "onnx_linear".into(),
        payload: prost::Message::encode_to_vec(&linear(x3)).into(),
        trace: TraceHeaders::default(),
        priority: 4,
    };
    parts.broker.publish(&msg).await.unwrap();
    let third = wait_succeeded(&front, &rec3.id, x3).await;
    assert_eq!(third.attempts, 1, "{third:?}");

    // Three tasks, three rows: nothing ran twice, nothing ran that no task counts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = triton_stats("onnx_linear").await.1 - rows_before;
    assert_eq!(rows, 3, "Triton ran {rows} rows for 3 tasks");
    println!(
        "kill between create and publish: 503, then the retry with the key got task {} (1 attempt, \
         succeeded {first_after:?} after the retry); abandoned: relayed after the {grace:?} grace, \
         1 attempt; published twice: 1 attempt; Triton rows 3 for 3 tasks",
        rec.id
    );
    stop.cancel();
}

/// The id the tenant's idempotency key names (read from Redis, as the store keeps it).
async fn key_holder(parts: &infergate::tasks::parts::Tasks, key: &str) -> String {
    let probe = infergate::tasks::TaskRecord::new(
        "probe".into(),
        infergate::auth::DEFAULT_TENANT,
        "onnx_linear",
        "",
        Some(key.into()),
    );
    let (rec, created) = parts.store.create(probe, 0, None).await.unwrap();
    assert!(!created, "the key names the first try's task");
    rec.id
}

async fn retry_until_accepted<F, Fut>(mut f: F) -> (infergate::tasks::TaskRecord, bool)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(infergate::tasks::TaskRecord, bool), GatewayError>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "never accepted: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_succeeded(front: &TaskFront, id: &str, x: [f32; 4]) -> infergate::tasks::TaskRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some((rec, result))) = front.get(id, infergate::auth::DEFAULT_TENANT).await
            && rec.state.is_final()
        {
            assert_eq!(rec.state, TaskState::Succeeded, "{rec:?}");
            let Some(infergate::tasks::front::TaskResult::Inline(r)) = result else {
                panic!("no inline result for {id}")
            };
            let y = f32_from(&r.raw_output_contents[0]);
            for (a, b) in y.iter().zip(expected(x)) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "{y:?} for {x:?}");
            }
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not final in 60 s: {:?}",
            front
                .get(id, infergate::auth::DEFAULT_TENANT)
                .await
                .map(|r| r.map(|r| r.0))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
