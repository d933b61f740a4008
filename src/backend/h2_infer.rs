//! ModelInfer over a bare HTTP/2 connection (the `h2` crate), for plaintext Triton endpoints.
//!
//! Why not tonic's channel for this one call: it hands every request to a buffer task and
//! streams the body from a separate pipe task that must wait for stream capacity, so the
//! HEADERS frame and the message reach Triton in two TCP segments (strace: a 49-byte and a
//! 204-byte `writev` per `add_sub` call) and Triton wakes twice. Here both frames are queued
//! before the connection task next flushes, so they leave in one write, and the answer is read
//! on the caller's own task. Probes, metadata and statistics stay on tonic; TLS endpoints use
//! tonic for everything.
//!
//! One connection per [`H2Infer`], opened on first use (bounded by the connect timeout) and
//! re-opened on the next call after it fails or Triton closes it. Keep-alive pings every 30 s
//! (20 s to answer) find a peer that vanished without closing.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header};
use prost::Message;
use tokio::net::TcpStream;
use tonic::{Code, Status};

use crate::{
    grpc_wire::{
        CONNECTION_WINDOW, GRPC_TIMEOUT, MODEL_INFER_PATH, MODEL_STREAM_INFER_PATH, PREFIX_LEN,
        STREAM_WINDOW, check_frame, encode_frame, status_for_http, status_from_headers,
        timeout_value,
    },
    proto::inference::{ModelInferRequest, ModelInferResponse},
};

/// Keep-alive for every Triton connection, this client's and tonic's.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

type Sender = h2::client::SendRequest<Bytes>;

pub struct H2Infer {
    /// `host:port`, for the TCP connection.
    authority: String,
    uri: Uri,
    /// ModelStreamInfer's path on the same connection ([`super::stream`]).
    pub(super) stream_uri: Uri,
    connect_timeout: Duration,
    pub(super) max_message_bytes: usize,
    /// The open connection and its generation (so a closed one only clears itself).
    open: Mutex<Option<(u64, Sender)>>,
    /// One caller connects at a time; the others wait for its connection.
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
}

impl H2Infer {
    /// `None` when `url` is not a plain `http://host:port` URL (TLS stays on tonic).
    pub fn new(url: &str, connect_timeout: Duration, max_message_bytes: usize) -> Option<Self> {
        let parsed: Uri = url.parse().ok()?;
        if parsed.scheme_str() != Some("http") {
            return None;
        }
        let auth = parsed.authority()?;
        let authority = match auth.port_u16() {
            Some(_) => auth.as_str().to_string(),
            None => format!("{}:80", auth.host()),
        };
        let path = |p: &str| {
            Uri::builder()
                .scheme("http")
                .authority(auth.as_str())
                .path_and_query(p)
                .build()
                .ok()
        };
        Some(Self {
            authority,
            uri: path(MODEL_INFER_PATH)?,
            stream_uri: path(MODEL_STREAM_INFER_PATH)?,
            connect_timeout,
            max_message_bytes,
            open: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// One ModelInfer call, answered within `budget` (also sent to Triton as `grpc-timeout`).
    /// `extra` carries headers such as `traceparent`.
    pub async fn model_infer(
        self: &Arc<Self>,
        req: &ModelInferRequest,
        budget: Duration,
        extra: HeaderMap,
    ) -> Result<ModelInferResponse, Status> {
        decode(self.model_infer_framed(req, budget, extra).await?)
    }

    /// [`H2Infer::model_infer`], with the answer left as Triton framed it (uncompressed flag,
    /// length prefix, message), checked but not decoded: what a gRPC caller can be sent as it
    /// is.
    pub async fn model_infer_framed(
        self: &Arc<Self>,
        req: &ModelInferRequest,
        budget: Duration,
        extra: HeaderMap,
    ) -> Result<Bytes, Status> {
        let body = self.frame(req)?;
        let request = self.request(&self.uri, budget, extra);
        match tokio::time::timeout(budget, self.exchange(request, body)).await {
            Ok(result) => result,
            // Dropping the exchange resets the stream, so Triton can drop the work too.
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {} ms",
                budget.as_millis()
            ))),
        }
    }

    /// The message with gRPC's 5-byte prefix, within the message limit.
    pub(super) fn frame(&self, req: &ModelInferRequest) -> Result<Bytes, Status> {
        encode_frame(req, self.max_message_bytes).map_err(|e| {
            Status::out_of_range(format!(
                "the request to Triton is {} bytes, over the {} byte message limit",
                e.len, e.limit
            ))
        })
    }

    pub(super) fn request(&self, uri: &Uri, budget: Duration, extra: HeaderMap) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        *request.version_mut() = Version::HTTP_2;
        let headers = request.headers_mut();
        *headers = extra;
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::USER_AGENT, HeaderValue::from_static("infergate"));
        let timeout = timeout_value(budget);
        headers.insert(GRPC_TIMEOUT.clone(), timeout);
        request
    }

    /// Sends `request` with `body` (its one message) and waits for the answer's headers: the
    /// answer's body, with the connection's generation for [`H2Infer::failed`].
    pub(super) async fn send(
        self: &Arc<Self>,
        request: Request<()>,
        body: Bytes,
    ) -> Result<(u64, h2::RecvStream), Status> {
        let (generation, sender) = self.sender().await.map_err(unsent)?;
        let failed = |e| self.failed(generation, e);
        // Until the request is queued on the connection, Triton cannot have it.
        let mut sender = sender.ready().await.map_err(|e| unsent(failed(e)))?;
        let (answer, mut stream) = sender
            .send_request(request, false)
            .map_err(|e| unsent(failed(e)))?;
        stream.send_data(body, true).map_err(failed)?;
        let (parts, recv) = answer
            .await
            .map_err(|e| {
                // Refused, or beyond the last stream a GOAWAY said Triton would process.
                let never = e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away();
                let status = failed(e);
                if never { unsent(status) } else { status }
            })?
            .into_parts();
        if parts.status != http::StatusCode::OK {
            let s = status_for_http(parts.status);
            return Err(Status::new(s.code(), format!("Triton: {}", s.message())));
        }
        // A trailers-only answer carries its error in the headers.
        if let Some(status) = status_from_headers(parts.headers) {
            return Err(if status.code() == Code::Ok {
                Status::internal("Triton answered OK without a message")
            } else {
                status
            });
        }
        Ok((generation, recv))
    }

    async fn exchange(
        self: &Arc<Self>,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Bytes, Status> {
        let (generation, mut recv) = self.send(request, body).await?;
        let failed = |e| self.failed(generation, e);
        let limit = self.max_message_bytes + PREFIX_LEN;
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        let mut total = 0usize;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(failed)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            total += chunk.len();
            if total > limit {
                return Err(Status::out_of_range(format!(
                    "Triton's answer is over the {} byte message limit",
                    self.max_message_bytes
                )));
            }
            match &first {
                None if more.is_empty() => first = Some(chunk),
                _ => {
                    if let Some(f) = first.take() {
                        more.extend_from_slice(&f);
                    }
                    more.extend_from_slice(&chunk);
                }
            }
        }
        let trailers = recv.trailers().await.map_err(failed)?;
        match trailers.and_then(status_from_headers) {
            Some(status) if status.code() == Code::Ok => {}
            Some(status) => return Err(status),
            None => {
                return Err(Status::internal(
                    "Triton's answer ended without a grpc-status",
                ));
            }
        }
        let data = first.unwrap_or_else(|| more.freeze());
        checked(&data)?;
        Ok(data)
    }

    /// The open connection, or a new one.
    async fn sender(self: &Arc<Self>) -> Result<(u64, Sender), Status> {
        if let Some(open) = &*self.open.lock().expect("h2 slot") {
            return Ok(open.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(open) = &*self.open.lock().expect("h2 slot") {
            return Ok(open.clone());
        }
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "connection to {} timed out after {} ms",
                    self.authority,
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| Status::unavailable(format!("connection to {}: {e}", self.authority)))?;
        let _ = tcp.set_nodelay(true);
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tcp);
        let (sender, conn) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "HTTP/2 handshake with {} timed out",
                    self.authority
                ))
            })?
            .map_err(|e| {
                Status::unavailable(format!("HTTP/2 connection to {}: {e}", self.authority))
            })?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.open.lock().expect("h2 slot") = Some((generation, sender.clone()));
        tokio::spawn(drive(conn, Arc::downgrade(self), generation));
        Ok((generation, sender))
    }

    /// Maps an h2 failure; a connection-level one also forgets that connection (a GOAWAY leaves
    /// it running for its last streams, but new calls must go to a fresh one).
    pub(super) fn failed(&self, generation: u64, e: h2::Error) -> Status {
        if e.is_io() || e.is_go_away() {
            self.forget(generation);
            return Status::unavailable(format!("connection to {}: {e}", self.authority));
        }
        Status::from_error(Box::new(e))
    }

    /// Forgets the connection of `generation`, not a newer one another caller opened since.
    fn forget(&self, generation: u64) {
        let mut open = self.open.lock().expect("h2 slot");
        if matches!(&*open, Some((g, _)) if *g == generation) {
            *open = None;
        }
    }
}

/// Runs the connection, with keep-alive pings, until it ends; then forgets it.
async fn drive(
    mut conn: h2::client::Connection<TcpStream, Bytes>,
    owner: Weak<H2Infer>,
    generation: u64,
) {
    let mut ping = conn.ping_pong();
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "Triton HTTP/2 connection closed");
                }
                break;
            }
            _ = tick.tick() => {
                let Some(p) = ping.as_mut() else { continue };
                let answered = tokio::select! {
                    _ = &mut conn => false,
                    r = tokio::time::timeout(KEEPALIVE_TIMEOUT, p.ping(h2::Ping::opaque())) => {
                        matches!(r, Ok(Ok(_)))
                    }
                };
                if !answered {
                    tracing::warn!("Triton HTTP/2 connection did not answer a keep-alive ping; closing it");
                    break;
                }
            }
        }
    }
    if let Some(owner) = owner.upgrade() {
        owner.forget(generation);
    }
}

/// The metadata key that marks a failure of a call Triton never received.
const UNSENT: &str = "infergate-unsent";

/// Marks `status` as the failure of a call Triton never received (no connection, the
/// connection gone before the request was queued, refused or left unprocessed by a GOAWAY),
/// which is safe to send to another endpoint: it cannot have run.
fn unsent(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(UNSENT, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// True for a failure [`unsent`] marked.
pub fn is_unsent(status: &Status) -> bool {
    status.metadata().contains_key(UNSENT)
}

/// Triton's answer is one uncompressed frame, as asked.
fn checked(data: &[u8]) -> Result<(), Status> {
    check_frame(data).map_err(|e| Status::internal(format!("Triton's answer: {e}")))
}

/// The ModelInferResponse in one frame that [`check_frame`] accepts.
pub fn decode(data: Bytes) -> Result<ModelInferResponse, Status> {
    checked(&data)?;
    ModelInferResponse::decode(data.slice(PREFIX_LEN..))
        .map_err(|e| Status::internal(format!("decoding Triton's answer: {e}")))
}

/// Triton's answer to one ModelInfer.
#[derive(Debug, Clone)]
pub enum Answer {
    Decoded(ModelInferResponse),
    /// One gRPC frame (flag, length, message) exactly as Triton sent it, already checked to be
    /// a single uncompressed message: a pass-through gRPC caller is sent these bytes, saving
    /// a decode and an encode of every tensor.
    Framed(Bytes),
}

impl Answer {
    pub fn into_response(self) -> Result<ModelInferResponse, crate::error::GatewayError> {
        match self {
            Self::Decoded(r) => Ok(r),
            Self::Framed(f) => decode(f).map_err(crate::error::GatewayError::from_backend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_take_this_path() {
        let t = Duration::from_secs(1);
        let h = H2Infer::new("http://triton:8001", t, 1024).unwrap();
        assert_eq!(h.authority, "triton:8001");
        assert_eq!(
            h.uri.to_string(),
            "http://triton:8001/inference.GRPCInferenceService/ModelInfer"
        );
        assert_eq!(
            H2Infer::new("http://triton", t, 1).unwrap().authority,
            "triton:80"
        );
        assert!(H2Infer::new("https://triton:8001", t, 1).is_none());
        assert!(H2Infer::new("not a url", t, 1).is_none());
    }

    #[test]
    fn the_budget_is_sent_as_a_header_hpack_does_not_index() {
        let h = H2Infer::new("http://triton:8001", Duration::from_secs(1), 1024).unwrap();
        let req = h.request(&h.stream_uri, Duration::from_millis(1500), HeaderMap::new());
        assert_eq!(req.uri().path(), crate::grpc_wire::MODEL_STREAM_INFER_PATH);
        let timeout = &req.headers()[&GRPC_TIMEOUT];
        assert_eq!(timeout, "1500m");
        assert!(timeout.is_sensitive());
        assert!(!req.headers()[header::CONTENT_TYPE].is_sensitive());
    }

    #[test]
    fn frames_are_checked_before_decoding() {
        let msg = ModelInferResponse {
            model_name: "m".into(),
            ..Default::default()
        };
        let mut ok = vec![0u8];
        ok.extend((msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut ok).unwrap();
        assert_eq!(decode(Bytes::from(ok.clone())).unwrap().model_name, "m");

        let mut compressed = ok.clone();
        compressed[0] = 1;
        assert!(
            decode(Bytes::from(compressed))
                .unwrap_err()
                .message()
                .contains("compressed")
        );
        let short = Bytes::from(ok[..ok.len() - 1].to_vec());
        assert!(decode(short).unwrap_err().message().contains("announces"));
        assert!(
            decode(Bytes::from_static(&[0, 0]))
                .unwrap_err()
                .message()
                .contains("too short")
        );
    }

    #[test]
    fn oversize_requests_are_refused_before_sending() {
        let h = H2Infer::new("http://127.0.0.1:1", Duration::from_secs(1), 8).unwrap();
        let req = ModelInferRequest {
            model_name: "a model name longer than eight bytes".into(),
            ..Default::default()
        };
        let e = h.frame(&req).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(e.message().contains("8 byte"), "{e}");
    }
}
