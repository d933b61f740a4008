//! What every connection of every serving thread reads: the listener's state, in a module of
//! its own so that the ModelInfer path and the listener both use it without importing each
//! other.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Request, Response};
use tower::util::BoxCloneSyncService;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::body::RecvBody;
use crate::{auth::Auth, infer::InferService};

/// tonic's router with its layers, taking h2 request bodies.
pub type Routed = BoxCloneSyncService<Request<RecvBody>, Response<tonic::body::Body>, Infallible>;

/// What every connection of every serving thread reads.
pub(super) struct Shared {
    pub(super) infer: InferService,
    pub(super) auth: Arc<Auth>,
    pub(super) routes: Routed,
    pub(super) max_request_bytes: usize,
    pub(super) max_response_bytes: usize,
    pub(super) max_concurrent_streams: u32,
    pub(super) tls: Option<(tokio_rustls::TlsAcceptor, Duration, Arc<Semaphore>)>,
    /// The main runtime, where calls other than ModelInfer run.
    pub(super) main: tokio::runtime::Handle,
    pub(super) stop: CancellationToken,
    pub(super) kill: CancellationToken,
}
