//! What the HTTP handlers share: the state behind every route, the model path, the request
//! body read under its limit, and the deadline header.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::Path,
    http::{HeaderMap, header},
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::{
    auth::Auth, backend::triton::TritonPool, error::GatewayError, health::Health,
    infer::InferService,
};

#[derive(Clone)]
pub struct HttpState {
    pub infer: InferService,
    pub max_request_bytes: usize,
    /// The async task API; `None` when no broker/task store is configured.
    pub tasks: Option<crate::tasks::front::TaskFront>,
    pub health: Arc<Health>,
    pub auth: Arc<Auth>,
    /// The features served here (see [`crate::api::features`]).
    pub features: crate::api::features::Features,
}

impl HttpState {
    pub(super) fn pool(&self) -> &Arc<TritonPool> {
        self.infer.backend()
    }
}

/// What the handlers share. Behind one `Arc` because axum clones the state for every request.
pub(super) type Shared = Arc<HttpState>;

/// `{model}` and, on the versioned routes, `{version}` ("" when absent: Triton's default).
#[derive(serde::Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: String,
}

pub(super) type Params = Path<ModelPath>;

pub(crate) fn model_and_version(p: ModelPath) -> (String, String) {
    (p.model, p.version)
}

/// How much of a body over the limit is read and dropped before the 413 is sent, as a multiple
/// of the limit, and for how long. A client that writes its whole body before it reads (Python's
/// urllib, many others) then gets the answer; closing at once would leave its write unread and
/// give it a broken pipe or a reset instead. Past these bounds the connection is closed.
const DRAIN_FACTOR: usize = 4;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The request body, at most `limit` bytes; a larger one is PayloadTooLarge (413), answered
/// after the rest of the body was read and dropped (within [`DRAIN_FACTOR`] and
/// [`DRAIN_TIME`]).
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let too_large = || {
        GatewayError::PayloadTooLarge(format!(
            "request body exceeds the limit of {limit} bytes (server.max_request_bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    if declared.is_none_or(|n| n <= limit as u64) {
        // Most bodies come as one chunk: that one is kept as it is, without a copy.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let chunk = match stream.next().await {
                None if buf.is_empty() => return Ok(first.unwrap_or_default()),
                None => return Ok(buf.freeze()),
                Some(Err(e)) => {
                    return Err(GatewayError::invalid(format!(
                        "the request body could not be read: {e}"
                    )));
                }
                Some(Ok(chunk)) => chunk,
            };
            let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
            if held + chunk.len() > limit {
                seen = held + chunk.len();
                break;
            }
            if first.is_none() && buf.is_empty() {
                first = Some(chunk);
                continue;
            }
            if let Some(earlier) = first.take() {
                buf.reserve(declared.map_or(0, |n| n as usize));
                buf.extend_from_slice(&earlier);
            }
            buf.extend_from_slice(&chunk);
        }
    }
    // Over the limit: drop what follows, within bounds, so that the client reads the answer.
    let bound = limit.saturating_mul(DRAIN_FACTOR);
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while seen <= bound {
            match stream.next().await {
                Some(Ok(chunk)) => seen += chunk.len(),
                _ => break,
            }
        }
    })
    .await;
    Err(too_large())
}

/// The HTTP way to give a deadline: `Infergate-Timeout-Ms: <milliseconds>` (gRPC clients use
/// the standard `grpc-timeout`). Triton's `timeout` request parameter (µs) is honoured too.
pub const TIMEOUT_HEADER: &str = "infergate-timeout-ms";

pub(super) fn timeout_header(
    headers: &HeaderMap,
) -> Result<Option<std::time::Duration>, GatewayError> {
    let Some(v) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|ms| Some(std::time::Duration::from_millis(ms)))
        .ok_or_else(|| {
            GatewayError::invalid(format!(
                "header {TIMEOUT_HEADER} must be a whole number of milliseconds"
            ))
        })
}

/// The key check of every API route; `refuse` writes a refusal in the route's own shape
/// (Triton's `{"error": "..."}`, or OpenAI's error object).
pub(super) async fn admit(
    auth: &Auth,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
    refuse: impl FnOnce(GatewayError) -> axum::response::Response,
) -> axum::response::Response {
    match auth.admit_http(req.headers()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => refuse(e),
    }
}
