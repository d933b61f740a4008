//! infergate's gRPC listener, on the `h2` crate rather than tonic's server.
//!
//! - **Serving threads.** The listener accepts on the main runtime and hands each connection
//!   to the serving thread with the fewest open connections (`server.grpc_threads`, one per
//!   CPU by default; a call carries its thread as its lane, see [`crate::call::Call`]). A
//!   thread runs a single-threaded runtime; all of a connection's I/O happens there.
//! - **ModelInfer inline.** The connection's task drives the HTTP/2 connection and polls its
//!   ModelInfer calls itself (`model_infer`): no task per call, no hand-off between
//!   threads, and a pass-through call uses the thread's own Triton connection. Measured on 2
//!   cores against tonic's server on a work-stealing runtime: half the CPU per call
//!   (loadtest/BENCHMARKS.md).
//! - **Everything else through tonic.** Health, reflection, metadata, statistics,
//!   ModelStreamInfer and the task service go to tonic's router (with the same auth,
//!   request-id and size layers as before), with `grpc-timeout` applied to the answer as
//!   tonic's server does. They run on the main runtime, except ModelStreamInfer: it stays on
//!   its connection's thread ([`OnLane`]), where its relays and the lane's Triton connection
//!   are, so a response crosses no thread on its way (a third off the time to first response,
//!   loadtest/streams-bench.sh).
//! - **Shutdown.** On `stop` the listener closes, every connection sends GOAWAY and finishes
//!   the calls it has; on `kill` (the grace period is over) connections drop what they have.

use std::{
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use h2::{RecvStream, server::SendResponse};
use http::Request;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{
    body::{self, RecvBody},
    model_infer,
    shared::{Routed, Shared},
};
use crate::{
    auth::Auth,
    call::OnLane,
    grpc_wire::{
        CONNECTION_WINDOW, MODEL_INFER_PATH, MODEL_STREAM_INFER_PATH, STREAM_WINDOW, read_timeout,
    },
    infer::InferService,
};
/// Largest header block accepted (hyper's server default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A plaintext client has this long to send the HTTP/2 preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for their serving thread to take them.
const HANDOFF_QUEUE: usize = 256;

/// TLS on the gRPC listener.
pub struct Tls {
    pub config: Arc<tokio_rustls::rustls::ServerConfig>,
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, over all serving threads.
    pub max_handshakes: usize,
}

pub struct GrpcServer {
    pub infer: InferService,
    pub auth: Arc<Auth>,
    pub routes: Routed,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub max_concurrent_streams: u32,
    pub threads: usize,
    pub tls: Option<Tls>,
}

struct Lane {
    handoff: mpsc::Sender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

impl GrpcServer {
    /// Serves `listener` until `stop`, then drains; `kill` drops what is still open.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
        kill: CancellationToken,
    ) -> anyhow::Result<()> {
        let shared = Arc::new(Shared {
            infer: self.infer,
            auth: self.auth,
            routes: self.routes,
            max_request_bytes: self.max_request_bytes,
            max_response_bytes: self.max_response_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            tls: self.tls.map(|t| {
                (
                    tokio_rustls::TlsAcceptor::from(t.config),
                    t.handshake_timeout,
                    Arc::new(Semaphore::new(t.max_handshakes)),
                )
            }),
            main: tokio::runtime::Handle::current(),
            stop: stop.clone(),
            kill,
        });
        let mut lanes = Vec::with_capacity(self.threads);
        let mut threads = Vec::with_capacity(self.threads);
        for index in 0..self.threads.max(1) {
            let (handoff, rx) = mpsc::channel(HANDOFF_QUEUE);
            let open = Arc::new(AtomicUsize::new(0));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a gRPC serving thread's runtime")?;
            let (shared, count) = (Arc::clone(&shared), Arc::clone(&open));
            let thread = std::thread::Builder::new()
                .name(format!("infergate-grpc-{index}"))
                .spawn(move || {
                    runtime.block_on(run_lane(index, rx, shared, count));
                })
                .context("starting a gRPC serving thread")?;
            lanes.push(Lane { handoff, open });
            threads.push(thread);
        }
        accept(&listener, &lanes, &stop).await;
        // Closing the hand-offs ends each thread once its connections have drained.
        drop((listener, lanes));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        Ok(())
    }
}

async fn accept(listener: &TcpListener, lanes: &[Lane], stop: &CancellationToken) {
    let mut next = 0usize;
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "gRPC connection lost before its hand-off");
                continue;
            }
        };
        // The least busy thread; ties go round-robin so equal threads take turns.
        next = next.wrapping_add(1);
        let n = lanes.len();
        let lane = (0..n)
            .map(|k| &lanes[(next + k) % n])
            .min_by_key(|l| l.open.load(Ordering::Relaxed))
            .expect("at least one serving thread");
        lane.open.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            sent = lane.handoff.send(std) => if sent.is_err() {
                lane.open.fetch_sub(1, Ordering::Relaxed);
                tracing::error!("a gRPC serving thread has stopped; connection dropped");
            }
        }
    }
}

/// One serving thread: takes connections until the listener closes, then waits for them.
async fn run_lane(
    lane: usize,
    mut handoff: mpsc::Receiver<std::net::TcpStream>,
    shared: Arc<Shared>,
    open: Arc<AtomicUsize>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            conn = handoff.recv() => match conn {
                Some(tcp) => {
                    let guard = Open(Arc::clone(&open));
                    conns.spawn(connection(tcp, lane, Arc::clone(&shared), guard));
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Counts a connection against its thread while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(tcp: std::net::TcpStream, lane: usize, shared: Arc<Shared>, _open: Open) {
    let tcp = match TcpStream::from_std(tcp) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "gRPC connection could not join its thread");
            return;
        }
    };
    let Some((acceptor, timeout, handshakes)) = &shared.tls else {
        return serve_h2(tcp, PREFACE_TIMEOUT, lane, &shared).await;
    };
    let tls = {
        let Ok(_slot) = Arc::clone(handshakes).acquire_owned().await else {
            return;
        };
        tokio::select! {
            _ = shared.kill.cancelled() => return,
            tls = crate::tls::handshake(acceptor, tcp, *timeout, "gRPC") => match tls {
                Some(tls) => tls,
                None => return,
            },
        }
    };
    serve_h2(tls, *timeout, lane, &shared).await;
}

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Drives one HTTP/2 connection and its ModelInfer calls on this task.
async fn serve_h2<IO>(io: IO, preface_timeout: Duration, lane: usize, shared: &Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(shared.max_concurrent_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        _ = shared.kill.cancelled() => return,
        r = tokio::time::timeout(preface_timeout, handshake) => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return tracing::debug!(error = %e, "gRPC HTTP/2 handshake failed"),
            Err(_) => return tracing::debug!("gRPC client sent no HTTP/2 preface in time"),
        },
    };
    let mut calls: FuturesUnordered<Stream> = FuturesUnordered::new();
    let mut draining = false;
    loop {
        // Calls first: answers they queue leave in the same write as the connection's next
        // flush, below.
        tokio::select! {
            biased;
            _ = shared.kill.cancelled() => return,
            _ = shared.stop.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            Some(()) = calls.next(), if !calls.is_empty() => {}
            next = conn.accept() => match next {
                Some(Ok((mut req, respond))) => {
                    if req.uri().path() == MODEL_INFER_PATH {
                        calls.push(Box::pin(model_infer::serve(Arc::clone(shared), lane, req, respond)));
                    } else if req.uri().path() == MODEL_STREAM_INFER_PATH {
                        // A stream stays on this thread too, its relays with it, and its
                        // requests go to Triton on the lane's own connection: no hand-off
                        // between threads per response.
                        req.extensions_mut().insert(OnLane(lane));
                        calls.push(Box::pin(routed(Arc::clone(shared), req, respond)));
                    } else {
                        shared.main.spawn(routed(Arc::clone(shared), req, respond));
                    }
                }
                Some(Err(e)) => return tracing::debug!(error = %e, "gRPC connection ended"),
                // Closed (and, after GOAWAY, no stream left): calls still here cannot be
                // answered, and dropping them cancels their work.
                None => return,
            },
        }
    }
}

/// A call other than ModelInfer, through tonic's router; `grpc-timeout` bounds the wait for
/// its answer's headers (as tonic's server does), and a reset by the caller drops it.
async fn routed(shared: Arc<Shared>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let timeout = read_timeout(req.headers());
    let call = shared.routes.clone().oneshot(req.map(RecvBody::new));
    let mut call = pin!(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, call).await.ok(),
            None => Some(call.await),
        }
    });
    let outcome = poll_fn(|cx| {
        if let Poll::Ready(r) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let resp = match outcome {
        None => return,
        Some(Some(Ok(resp))) => resp,
        Some(Some(Err(never))) => match never {},
        Some(None) => tonic::Status::deadline_exceeded("the call's grpc-timeout expired")
            .into_http::<tonic::body::Body>(),
    };
    body::send(resp, respond).await;
}
