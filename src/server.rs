//! Wires the gRPC and HTTP listeners to the Triton pool, keeps gRPC health in step with
//! readiness, and shuts down gracefully: on the shutdown signal both listeners stop
//! accepting, health turns NOT_SERVING, and in-flight requests get `shutdown_grace_ms`.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{codec::CompressionEncoding, service::interceptor::InterceptedService};
use tonic_health::ServingStatus;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::{
    api::{
        features::Features,
        grpc::{GrpcApi, GrpcServer, GrpcTaskAdmin, GrpcTasks, Tls as GrpcTls},
        http::{HttpState, ops_router, router},
    },
    auth::{Auth, interceptor},
    backend::triton::TritonPool,
    config::{BrokerUrl, Config},
    fleet::Fleet,
    health::Health,
    infer::InferService,
    openai::OpenAi,
    proto::{
        FILE_DESCRIPTOR_SET,
        inference::grpc_inference_service_server::GrpcInferenceServiceServer,
        tasks::{task_admin_server::TaskAdminServer, task_service_server::TaskServiceServer},
    },
    streams::Streams,
    tasks::{TaskStore, outbox, outbox_grace, parts::Tasks},
    worker::{Worker, WorkerConfig},
};

/// gRPC service names whose health follows readiness.
const HEALTH_SERVICES: &[&str] = &[
    "",
    "inference.GRPCInferenceService",
    "infergate.tasks.v1.TaskService",
];

/// The async path's parts named by the config, connected (see [`Tasks::connect`]).
pub async fn connect_tasks(cfg: &Config) -> anyhow::Result<Tasks> {
    Tasks::connect(&cfg.tasks, &cfg.webhooks, &cfg.auth.keys).await
}

/// The async path's upkeep, in every process: owed webhooks whose holder died are taken
/// over, task messages a submitter left in the outbox are published, and every `tasks.blob_sweep_ms` the blobs no task needs any more are removed
/// (removing twice is harmless; a blob younger than one period is left alone, so a submit
/// writing its input is never raced).
fn spawn_task_upkeep(cfg: &Config, tasks: &Tasks, stop: &CancellationToken) {
    Arc::clone(&tasks.webhooks).spawn_resumer(stop.clone());
    outbox::spawn_relay(
        Arc::clone(&tasks.store),
        Arc::clone(&tasks.broker),
        cfg.tasks.broker.kind(),
        Duration::from_millis(cfg.tasks.outbox_sweep_ms),
        outbox_grace(Duration::from_millis(cfg.tasks.publish_timeout_ms)),
        stop.clone(),
    );
    if let Some(blobs) = &tasks.blobs {
        let every = Duration::from_millis(cfg.tasks.blob_sweep_ms);
        Arc::clone(blobs).spawn_sweeper(
            Arc::clone(&tasks.store),
            Arc::clone(&tasks.dead),
            every,
            every,
            stop.clone(),
        );
    }
}

fn health_of(cfg: &Config, pool: &Arc<TritonPool>, tasks: &Tasks) -> Arc<Health> {
    Health::new(
        Arc::clone(pool),
        Some((Arc::clone(&tasks.broker), cfg.tasks.broker.kind())),
        Some(Arc::clone(&tasks.store)),
        cfg.triton.ready_models.clone(),
        Duration::from_millis(cfg.triton.probe_timeout_ms),
    )
}

fn spawn_workers(
    cfg: &Config,
    infer: &InferService,
    tasks: &Tasks,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let streams = Streams::new(infer.clone(), &cfg.streams);
    (0..cfg.tasks.workers)
        .map(|_| {
            let w = Worker {
                tasks: tasks.clone(),
                infer: infer.clone(),
                streams: streams.clone(),
                cfg: WorkerConfig {
                    concurrency: cfg.tasks.worker_concurrency,
                    max_attempts: cfg.tasks.max_attempts,
                    poll: Duration::from_millis(500),
                },
            };
            tokio::spawn(w.run(stop.clone(), cfg.shutdown_grace()))
        })
        .collect()
}

/// `infergate worker`: task workers only, no listeners, until `shutdown` resolves.
pub async fn run_workers(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.tasks.workers > 0,
        "infergate worker needs --workers of at least 1"
    );
    anyhow::ensure!(
        cfg.tasks.broker != BrokerUrl::Memory,
        "infergate worker needs a shared broker (--broker redis://...); the memory broker lives inside one serve process"
    );
    let pool = TritonPool::new(&cfg.triton, cfg.server.max_response_bytes)?;
    // Probes and metrics for the orchestrator, on the HTTP address.
    let ops_listener = TcpListener::bind(cfg.server.http_addr)
        .await
        .with_context(|| format!("binding HTTP address {}", cfg.server.http_addr))?;
    let stop = CancellationToken::new();
    pool.probe_all().await;
    let probe = pool.spawn_probe(stop.clone());
    let tasks = connect_tasks(&cfg).await?;
    let health = health_of(&cfg, &pool, &tasks);
    health.check().await;
    let monitor = health.spawn(cfg.triton_health_interval(), stop.clone());
    let infer = InferService::new(Arc::clone(&pool), cfg.batching.clone());
    let autoscaling = spawn_autoscaling(&cfg, &infer, &tasks.store, None, stop.clone())?;
    spawn_task_upkeep(&cfg, &tasks, &stop);
    let ops = axum::serve(
        ops_listener,
        ops_router::<()>(Arc::clone(&health), Some(infer.clone())),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned())
    .into_future();
    let ops = tokio::spawn(ops);
    let worker_stop = CancellationToken::new();
    let workers = spawn_workers(&cfg, &infer, &tasks, &worker_stop);
    tracing::info!(workers = workers.len(), broker = %cfg.tasks.broker, http_addr = %cfg.server.http_addr, "infergate worker running");
    shutdown.await;
    tracing::info!("worker shutting down: finishing running tasks");
    health.drain();
    worker_stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    stop.cancel();
    let _ = ops.await;
    probe.abort();
    monitor.abort();
    for task in autoscaling {
        let _ = task.await;
    }
    Ok(())
}

/// The autoscaler's parts (see `scaler::start`); a ScaledObject's models must be ones this
/// front end serves (a route, or a model Triton knows): a typo is refused rather than scaled
/// to its minimum forever.
fn spawn_autoscaling(
    cfg: &Config,
    infer: &InferService,
    store: &Arc<dyn TaskStore>,
    listener: Option<TcpListener>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let known = infer.clone();
    let models: crate::scaler::ModelCheck = Arc::new(move |name: String| {
        let infer = known.clone();
        Box::pin(async move {
            if infer.routes().get(&name).is_some() {
                return Ok(());
            }
            match infer.backend().model_info(&name, "").await {
                Err(e) if e.grpc_code() == tonic::Code::NotFound => Err(e.to_string()),
                // Triton unreachable: nothing to check against now.
                _ => Ok(()),
            }
        })
    });
    crate::scaler::start::spawn(
        &cfg.scaler,
        &cfg.tasks,
        Arc::clone(infer.activity()),
        Arc::clone(store),
        models,
        listener,
        stop,
    )
}

/// A gateway whose listeners are bound (so tests can use port 0 and read the real ports).
pub struct Gateway {
    cfg: Config,
    pool: Arc<TritonPool>,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    /// KEDA's external scaler, when `scaler.addr` is set.
    scaler_listener: Option<TcpListener>,
    /// Loaded at bind time, so a bad routes file stops the start with its setting named.
    routes: Arc<crate::routes::Routes>,
    tasks: Tasks,
    /// Loaded at bind time, so a bad certificate stops the start with its field named.
    grpc_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    http_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Features' metric families, registered at start so that a scrape lists them (and the
/// dashboard's queries find them) before their first event.
fn register_feature_metrics() {
    let _ = crate::routes::metrics::metrics();
    let _ = crate::cache::metrics::metrics();
    let _ = crate::scaler::metrics::metrics();
    let _ = crate::streams::metrics::metrics();
    let _ = crate::openai::metrics::metrics();
}

impl Gateway {
    pub async fn bind(cfg: Config) -> anyhow::Result<Self> {
        register_feature_metrics();
        // One more ModelInfer connection per endpoint for each gRPC serving thread.
        let pool = TritonPool::with_lanes(
            &cfg.triton,
            cfg.server.max_response_bytes,
            cfg.server.grpc_threads(),
        )?;
        let (grpc_tls, http_tls) = match cfg.server.tls() {
            Some(t) => (
                Some(crate::tls::grpc_server_config(t)?),
                Some(crate::tls::http_server_config(t)?),
            ),
            None => (None, None),
        };
        let grpc_listener = TcpListener::bind(cfg.server.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC address {}", cfg.server.grpc_addr))?;
        let http_listener = TcpListener::bind(cfg.server.http_addr)
            .await
            .with_context(|| format!("binding HTTP address {}", cfg.server.http_addr))?;
        let scaler_listener = match cfg.scaler.addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the scaler address {addr}"))?,
            ),
            None => None,
        };
        let routes = Arc::new(crate::routes::Routes::load(cfg.routes.file.clone())?);
        let tasks = connect_tasks(&cfg).await?;
        Ok(Self {
            cfg,
            pool,
            grpc_listener,
            http_listener,
            scaler_listener,
            routes,
            tasks,
            grpc_tls,
            http_tls,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener.local_addr().expect("bound listener")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener.local_addr().expect("bound listener")
    }

    pub fn scaler_addr(&self) -> Option<SocketAddr> {
        self.scaler_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    pub fn pool(&self) -> &Arc<TritonPool> {
        &self.pool
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            cfg,
            pool,
            grpc_listener,
            http_listener,
            scaler_listener,
            routes,
            tasks,
            grpc_tls,
            http_tls,
        } = self;
        let stop = CancellationToken::new();
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        pool.probe_all().await;
        let probe = pool.spawn_probe(stop.clone());
        let health = health_of(&cfg, &pool, &tasks);
        health.check().await;
        let monitor = health.spawn(cfg.triton_health_interval(), stop.clone());

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health_sync = {
            let (mut ready, stop, reporter) = (health.subscribe(), stop.clone(), reporter.clone());
            tokio::spawn(async move {
                loop {
                    let status = if *ready.borrow_and_update() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for svc in HEALTH_SERVICES {
                        reporter.set_service_status(*svc, status).await;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        changed = ready.changed() => if changed.is_err() { return },
                    }
                }
            })
        };

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let mut infer =
            InferService::new(Arc::clone(&pool), cfg.batching.clone()).with_routes(routes);
        if let Some(url) = &cfg.cache.redis {
            let redis = crate::cache::RedisCache::new(
                url,
                &cfg.tasks.redis_prefix,
                Duration::from_millis(cfg.cache.redis_timeout_ms),
            )
            .map_err(|e| anyhow::anyhow!("cache.redis: {e}"))?;
            infer = infer.with_cache(Arc::new(crate::cache::Store::Redis(redis)));
        } else if cfg.cache.max_bytes > 0 {
            let cache = crate::cache::MemoryCache::new(cfg.cache.max_bytes);
            infer = infer.with_cache(Arc::new(crate::cache::Store::Memory(cache)));
        }
        let route_reload = {
            let (ready, check) = (infer.clone(), infer.clone());
            crate::routes::reload::spawn_reload(
                Arc::clone(infer.routes()),
                Duration::from_millis(cfg.routes.watch_ms),
                stop.clone(),
                move || ready.backend().is_ready(),
                move |table| {
                    let infer = check.clone();
                    async move { infer.check_routes(&table).await }
                },
            )
            .context("listening for SIGHUP")?
        };
        let autoscaling =
            spawn_autoscaling(&cfg, &infer, &tasks.store, scaler_listener, stop.clone())?;
        let window_check = spawn_window_check(&infer, cfg.triton_health_interval(), stop.clone());
        let stats = crate::backend::stats::spawn(
            Arc::clone(&pool),
            Duration::from_millis(cfg.triton.stats_interval_ms),
            stop.clone(),
        );
        let front = crate::tasks::front::TaskFront {
            tasks: tasks.clone(),
            infer: infer.clone(),
        };
        spawn_task_upkeep(&cfg, &tasks, &stop);
        let auth = Auth::new(&cfg.auth);
        let task_service = TaskServiceServer::new(GrpcTasks::new(front.clone()))
            .max_decoding_message_size(cfg.server.max_request_bytes)
            .max_encoding_message_size(cfg.server.max_response_bytes);
        let task_service = InterceptedService::new(task_service, interceptor(Arc::clone(&auth)));
        let task_admin = InterceptedService::new(
            TaskAdminServer::new(GrpcTaskAdmin::new(front.clone())),
            interceptor(Arc::clone(&auth)),
        );
        // The parts list: each feature the edges serve, built once.
        let streams = Streams::new(infer.clone(), &cfg.streams);
        let features = Features {
            openai: Arc::new(
                OpenAi::new(&cfg.openai, infer.clone(), streams.clone())
                    .map_err(|e| anyhow::anyhow!("[openai]: {e}"))?,
            ),
            streams,
            fleet: Fleet::new(Arc::clone(infer.backend()), &cfg.fleet),
        };
        let inference = GrpcInferenceServiceServer::new(GrpcApi::new(
            infer.clone(),
            features.clone(),
            cfg.server.stream_concurrency,
        ))
        .max_decoding_message_size(cfg.server.max_request_bytes)
        .max_encoding_message_size(cfg.server.max_response_bytes)
        // Compressed requests are accepted; answers stay uncompressed (as Triton's do): gRPC
        // clients advertise gzip by default, and deflating every tensor costs more CPU than
        // it saves on the short hop between client and gateway.
        .accept_compressed(CompressionEncoding::Gzip);
        let inference = InterceptedService::new(inference, interceptor(Arc::clone(&auth)));

        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(inference)
            .add_service(task_service)
            .add_service(task_admin)
            .prepare();
        let routes = tower::ServiceBuilder::new()
            .layer(tower::util::MapResponseLayer::new(
                oversize_is_resource_exhausted,
            ))
            .layer(SetRequestIdLayer::x_request_id(crate::api::RequestIds))
            .layer(PropagateRequestIdLayer::x_request_id())
            .service(routes);
        let grpc_server = GrpcServer {
            infer: infer.clone(),
            auth: Arc::clone(&auth),
            routes: tower::util::BoxCloneSyncService::new(routes),
            max_request_bytes: cfg.server.max_request_bytes,
            max_response_bytes: cfg.server.max_response_bytes,
            max_concurrent_streams: cfg.server.max_concurrent_streams,
            threads: cfg.server.grpc_threads(),
            tls: grpc_tls.map(|config| {
                let t = cfg.server.tls().expect("TLS files loaded at bind");
                GrpcTls {
                    config,
                    handshake_timeout: Duration::from_millis(t.handshake_timeout_ms),
                    max_handshakes: t.max_handshakes,
                }
            }),
        };
        let kill = CancellationToken::new();
        let grpc = grpc_server.serve(grpc_listener, stop.clone(), kill.clone());
        let worker_stop = CancellationToken::new();
        let workers = spawn_workers(&cfg, &infer, &tasks, &worker_stop);
        let app = router(HttpState {
            infer,
            max_request_bytes: cfg.server.max_request_bytes,
            tasks: Some(front.clone()),
            health: Arc::clone(&health),
            auth,
            features,
        })
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(crate::api::RequestIds));
        let mut http_task = match (http_tls, cfg.server.tls()) {
            (Some(config), Some(files)) => tokio::spawn(
                axum::serve(
                    crate::tls::TlsListener::new(http_listener, files, config),
                    app,
                )
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
            ),
            _ => tokio::spawn(
                axum::serve(
                    http_listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    }),
                    app,
                )
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
            ),
        };
        let mut grpc_task = tokio::spawn(grpc);
        tracing::info!(%grpc_addr, %http_addr, tritons = ?cfg.triton.urls, "infergate serving");

        let early = tokio::select! {
            _ = shutdown => None,
            r = &mut grpc_task => Some(format!("gRPC server stopped: {r:?}")),
            r = &mut http_task => Some(format!("HTTP server stopped: {r:?}")),
        };
        tracing::info!(
            grace_ms = cfg.server.shutdown_grace_ms,
            "shutting down: draining in-flight requests"
        );
        health.drain();
        for svc in HEALTH_SERVICES {
            reporter
                .set_service_status(*svc, ServingStatus::NotServing)
                .await;
        }
        stop.cancel();
        worker_stop.cancel();
        let drained = tokio::time::timeout(cfg.shutdown_grace(), async {
            for w in workers {
                let _ = w.await;
            }
            if !grpc_task.is_finished() {
                let _ = (&mut grpc_task).await;
            }
            if !http_task.is_finished() {
                let _ = (&mut http_task).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over with requests still running; they are dropped");
            kill.cancel();
            grpc_task.abort();
            http_task.abort();
        }
        probe.abort();
        monitor.abort();
        health_sync.abort();
        window_check.abort();
        route_reload.abort();
        for task in autoscaling {
            task.abort();
        }
        if let Some(stats) = stats {
            stats.abort();
        }
        match early {
            Some(reason) => anyhow::bail!(reason),
            None => {
                tracing::info!("infergate stopped");
                Ok(())
            }
        }
    }
}

/// tonic answers a message over `max_decoding_message_size` with OUT_OF_RANGE, before any
/// handler runs, as a trailers-only response (its status in the headers); infergate's contract
/// is RESOURCE_EXHAUSTED for a message too large, on gRPC as on HTTP (413). Decided by the code
/// alone: no routed service answers OUT_OF_RANGE itself (ModelInfer, whose Triton client can,
/// never reaches this router).
fn oversize_is_resource_exhausted<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers_mut();
    let out_of_range = http::HeaderValue::from(tonic::Code::OutOfRange as i32);
    if h.get(&crate::grpc_wire::GRPC_STATUS) == Some(&out_of_range) {
        let code = http::HeaderValue::from(tonic::Code::ResourceExhausted as i32);
        h.insert(crate::grpc_wire::GRPC_STATUS.clone(), code);
    }
    resp
}

/// Resolves on SIGTERM or Ctrl-C.
/// Checks every ready model for two batching windows once Triton answers (it may start after
/// infergate), retrying at the health interval until one pass succeeds.
fn spawn_window_check(
    infer: &InferService,
    retry: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let infer = infer.clone();
    tokio::spawn(async move {
        loop {
            if infer.backend().is_ready() && infer.check_ready_models().await.is_ok() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    })
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
