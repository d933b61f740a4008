//! ModelStreamInfer to Triton, for decoupled models: one upstream stream per request. A
//! request then owns its HTTP/2 stream, so dropping it (its caller left, cancelled or ran out
//! of time) resets that stream alone, and Triton cancels that request (the python backend
//! sees `is_cancelled()`), not its neighbours.
//!
//! On plaintext endpoints the stream goes over the lean connection ([`H2Infer`]), for the
//! reason ModelInfer does: the request's headers and its one message leave in one write, and
//! the responses are read on the caller's task with no buffer task between. TLS endpoints use
//! tonic.

use std::{sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use futures::stream;
use prost::Message;
use tonic::{Code, Status};

use super::{affinity::sequence_of, endpoint::InFlight, h2_infer::H2Infer, triton::TritonPool};
use crate::{
    error::GatewayError,
    grpc_wire::{PREFIX_LEN, read_prefix, status_from_headers},
    proto::inference::{ModelInferRequest, ModelStreamInferResponse},
    telemetry::trace,
};

/// One request's responses as Triton sends them. Dropped before its end, it resets the
/// stream, which cancels the request in Triton.
pub struct Upstream {
    responses: Responses,
    /// Counts the stream against its endpoint while it is open (the balancer reads it).
    _in_flight: InFlight,
}

enum Responses {
    Lean(LeanResponses),
    Tonic(tonic::Streaming<ModelStreamInferResponse>),
}

impl Upstream {
    /// The next response; `None` once Triton ended the stream (the request is complete).
    pub async fn next(&mut self) -> Result<Option<ModelStreamInferResponse>, GatewayError> {
        match &mut self.responses {
            Responses::Lean(r) => r.next().await,
            Responses::Tonic(r) => r.message().await,
        }
        .map_err(GatewayError::from_backend)
    }
}

impl TritonPool {
    /// Sends `req` on a stream of its own to a ready endpoint and answers once Triton took it
    /// (its response headers came). The request side is closed at once: Triton still sends
    /// every response of a request it holds, then ends the stream. `limit` bounds the
    /// stream as a whole (sent as `grpc-timeout`).
    pub async fn stream_infer(
        &self,
        req: ModelInferRequest,
        limit: Duration,
        lane: Option<usize>,
    ) -> Result<Upstream, GatewayError> {
        let model = (req.model_name.as_str(), req.model_version.as_str());
        let (ep, _) = match sequence_of(&req) {
            Some(seq) => self.pick_sequence(model, &seq)?,
            None => self.pick(Some(model), false)?,
        };
        ep.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ep.calls.inc();
        let in_flight = InFlight(Arc::clone(&ep));
        let mut md = tonic::metadata::MetadataMap::new();
        trace::inject_into(&mut md);
        let opened = match ep.infer_conn(lane) {
            Some(conn) => LeanResponses::open(conn, &req, limit, md.into_headers())
                .await
                .map(Responses::Lean),
            None => {
                let mut r = tonic::Request::from_parts(md, Default::default(), stream::iter([req]));
                r.set_timeout(limit);
                ep.client()
                    .model_stream_infer(r)
                    .await
                    .map(|resp| Responses::Tonic(resp.into_inner()))
            }
        };
        match opened {
            Ok(responses) => Ok(Upstream {
                responses,
                _in_flight: in_flight,
            }),
            Err(status) => {
                let err = GatewayError::from_backend(status);
                if matches!(err, GatewayError::Unavailable(_)) {
                    ep.mark_unhealthy(&err);
                }
                Err(err)
            }
        }
    }
}

/// The responses of one stream on a lean connection, cut from its data frames.
struct LeanResponses {
    conn: Arc<H2Infer>,
    generation: u64,
    recv: h2::RecvStream,
    /// Bytes received and not yet cut into messages: at most one message and its prefix.
    held: BytesMut,
    ended: bool,
}

impl LeanResponses {
    async fn open(
        conn: &Arc<H2Infer>,
        req: &ModelInferRequest,
        limit: Duration,
        extra: http::HeaderMap,
    ) -> Result<Self, Status> {
        let body = conn.frame(req)?;
        let request = conn.request(&conn.stream_uri, limit, extra);
        let (generation, recv) = conn.send(request, body).await?;
        Ok(Self {
            conn: Arc::clone(conn),
            generation,
            recv,
            held: BytesMut::new(),
            ended: false,
        })
    }

    async fn next(&mut self) -> Result<Option<ModelStreamInferResponse>, Status> {
        loop {
            if let Some(resp) = self.cut()? {
                return Ok(Some(resp));
            }
            if self.ended {
                return Ok(None);
            }
            match self.recv.data().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| self.conn.failed(self.generation, e))?;
                    // Read frames are this stream's to take again: h2 holds back no more
                    // than the one response being cut.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.held.extend_from_slice(&chunk);
                }
                None => return self.end().await,
            }
        }
    }

    fn cut(&mut self) -> Result<Option<ModelStreamInferResponse>, Status> {
        let Some(msg) = cut(&mut self.held, self.conn.max_message_bytes)? else {
            return Ok(None);
        };
        ModelStreamInferResponse::decode(msg)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding Triton's response: {e}")))
    }

    /// The body ended: the trailers say how the stream went.
    async fn end(&mut self) -> Result<Option<ModelStreamInferResponse>, Status> {
        self.ended = true;
        if !self.held.is_empty() {
            return Err(Status::internal(format!(
                "Triton's stream ended inside a message ({} bytes held)",
                self.held.len()
            )));
        }
        let trailers = self
            .recv
            .trailers()
            .await
            .map_err(|e| self.conn.failed(self.generation, e))?;
        match trailers.and_then(status_from_headers) {
            Some(status) if status.code() == Code::Ok => Ok(None),
            Some(status) => Err(status),
            None => Err(Status::internal(
                "Triton's stream ended without a grpc-status",
            )),
        }
    }
}

/// One whole message (without its prefix) from the front of `held`, once it is all there;
/// a message announced over `limit` bytes is refused before it arrives.
fn cut(held: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, Status> {
    let Some(prefix) = read_prefix(held) else {
        return Ok(None);
    };
    if prefix.compressed {
        return Err(Status::internal(
            "Triton sent a compressed response, which was not asked for",
        ));
    }
    if prefix.len > limit {
        return Err(Status::out_of_range(format!(
            "Triton's response is {} bytes, over the {limit} byte message limit",
            prefix.len
        )));
    }
    if held.len() < PREFIX_LEN + prefix.len {
        return Ok(None);
    }
    held.advance(PREFIX_LEN);
    Ok(Some(held.split_to(prefix.len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    #[test]
    fn messages_are_cut_whatever_the_frames_boundaries() {
        let mut wire = framed(b"first");
        wire.extend(framed(b""));
        wire.extend(framed(b"third one"));
        // Fed one byte at a time, then all at once: the same three messages.
        for step in [1, wire.len()] {
            let mut held = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                held.extend_from_slice(chunk);
                while let Some(m) = cut(&mut held, 64).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![&b"first"[..], b"", b"third one"], "step {step}");
            assert!(held.is_empty());
        }
    }

    #[test]
    fn an_oversize_or_compressed_message_is_refused_on_its_prefix() {
        let mut held = BytesMut::from(&framed(&[7; 100])[..PREFIX_LEN]);
        let e = cut(&mut held, 64).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(e.message().contains("100 bytes"), "{}", e.message());
        let mut held = BytesMut::from(&[1u8, 0, 0, 0, 1, 9][..]);
        assert_eq!(cut(&mut held, 64).unwrap_err().code(), Code::Internal);
    }
}
