//! ModelInfer answered on the connection's own task: the gRPC envelope read and checked here
//! (content type, compression, one message within `max_request_bytes`), the request decoded,
//! run through [`InferService`](crate::infer::InferService) like every other caller's, and the
//! answer framed. A request that passes through to Triton alone is answered with Triton's own
//! frame, neither decoded nor encoded again.
//!
//! The API key, the request id, `grpc-timeout`, the span and the metrics are handled as the
//! tonic-served calls have them (`auth::interceptor`, the request-id layers, `observed`).

use std::{
    future::{Future, poll_fn},
    io::Read,
    pin::pin,
    sync::Arc,
    task::Poll,
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use prost::Message;

use super::shared::Shared;
use crate::{
    api::observed,
    backend::triton::Answer,
    call::{Call, Deadline},
    error::GatewayError,
    grpc_wire::{
        GRPC_ACCEPT_ENCODING, GRPC_ENCODING, GRPC_STATUS, PREFIX_LEN, encode_frame, read_prefix,
        read_timeout,
    },
    proto::inference::ModelInferRequest,
};

static X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// What the caller is sent.
enum Reply {
    /// One gRPC frame (flag, length, message), then `grpc-status: 0`.
    Message(Bytes),
    /// A trailers-only answer carrying the error's status.
    Status(GatewayError),
    /// Not a gRPC request at all (gRPC's answer to a wrong content type is HTTP 415).
    NotGrpc,
}

/// Serves one ModelInfer stream. A caller that resets its stream drops the work with it, so
/// a request still waiting for its batch leaves the queue and is never sent to Triton.
pub async fn serve(
    shared: Arc<Shared>,
    lane: usize,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    let request_id = match headers.get(&X_REQUEST_ID) {
        Some(id) => {
            // Echoed as a literal HPACK never indexes, as a generated id is (see
            // `new_request_id`): a caller's ids are as unique as ours.
            let mut id = id.clone();
            id.set_sensitive(true);
            id
        }
        None => {
            let id = crate::api::new_request_id();
            headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let reply = {
        let mut work = pin!(answer(&shared, lane, &headers, body));
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(reply) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(reply));
            }
            respond.poll_reset(cx).map(|_| None)
        })
        .await;
        match outcome {
            Some(reply) => reply,
            None => return,
        }
    };
    send(reply, request_id, &mut respond);
}

async fn answer(shared: &Shared, lane: usize, headers: &HeaderMap, body: RecvStream) -> Reply {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if !grpc {
        return Reply::NotGrpc;
    }
    match infer(shared, lane, headers, body).await {
        Ok(frame) => Reply::Message(frame),
        Err(e) => Reply::Status(e),
    }
}

async fn infer(
    shared: &Shared,
    lane: usize,
    headers: &HeaderMap,
    body: RecvStream,
) -> Result<Bytes, GatewayError> {
    let caller = shared.auth.admit_http(headers)?;
    let gzip = match headers.get(&GRPC_ENCODING).map(HeaderValue::as_bytes) {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(other) => {
            return Err(GatewayError::Unimplemented(format!(
                "grpc-encoding '{}' is not supported (gzip and identity are)",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let message = read_message(body, shared.max_request_bytes, gzip).await?;
    let mut req = ModelInferRequest::decode(message).map_err(|e| {
        GatewayError::invalid(format!("the message is not a ModelInferRequest: {e}"))
    })?;
    let model = req.model_name.clone();
    // The call's properties, decided here once: its deadline, its lane, Triton's frame.
    let call = Call::grpc_on_lane(read_timeout(headers).and_then(Deadline::after), lane);
    let call = shared
        .infer
        .at_edge(&mut req, headers, Some(&caller.tenant), call);
    let answer = observed(
        "grpc ModelInfer",
        "grpc",
        &model,
        headers,
        // Boxed: `observed` and the span wrapper each move the future they are given, and
        // this one (the whole call) is over a kilobyte; a box is moved as a pointer.
        Box::pin(shared.infer.answer(req, call)),
    )
    .await?;
    match answer {
        Answer::Framed(frame) => Ok(frame),
        Answer::Decoded(resp) => frame(&resp, shared.max_response_bytes),
    }
}

/// The request's one message, decompressed when its flag says so. Refuses a message over
/// `limit` from its length prefix, before reading it; a second message is refused, as is a
/// body that ends before its message does.
async fn read_message(
    mut body: RecvStream,
    limit: usize,
    gzip: bool,
) -> Result<Bytes, GatewayError> {
    let mut buf = BytesMut::new();
    let mut want: Option<(bool, usize)> = None;
    loop {
        if want.is_none()
            && let Some(prefix) = read_prefix(&buf)
        {
            let (compressed, len) = (prefix.compressed, prefix.len);
            if len > limit {
                return Err(too_large("request", len, limit, "server.max_request_bytes"));
            }
            // No room is reserved from the prefix: a caller could claim the limit per stream
            // and send nothing. The buffer grows with what arrives (bounded by the window).
            buf.advance(PREFIX_LEN);
            want = Some((compressed, len));
        }
        if let Some((_, len)) = want
            && buf.len() > len
        {
            return Err(more_than_one());
        }
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
            }
            Some(Err(e)) => {
                return Err(GatewayError::invalid(format!("reading the request: {e}")));
            }
            None => break,
        }
    }
    let Some((compressed, len)) = want else {
        return Err(GatewayError::invalid(if buf.is_empty() {
            "the request has no message".to_string()
        } else {
            format!(
                "the request ended inside its 5-byte message prefix ({} bytes)",
                buf.len()
            )
        }));
    };
    if buf.len() > len {
        return Err(more_than_one());
    }
    if buf.len() < len {
        return Err(GatewayError::invalid(format!(
            "the request ended {} bytes into its {len}-byte message",
            buf.len()
        )));
    }
    let message = buf.freeze();
    match (compressed, gzip) {
        (false, _) => Ok(message),
        (true, true) => gunzip(&message, limit),
        (true, false) => Err(GatewayError::invalid(
            "the message is flagged compressed but the call names no grpc-encoding",
        )),
    }
}

fn more_than_one() -> GatewayError {
    GatewayError::invalid("a ModelInfer call carries one message; this one sent more")
}

/// Inflates a gzip message, refusing one that inflates past `limit`.
fn gunzip(message: &[u8], limit: usize) -> Result<Bytes, GatewayError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(message)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| GatewayError::invalid(format!("the gzip message does not inflate: {e}")))?;
    if out.len() > limit {
        return Err(too_large(
            "inflated request",
            out.len(),
            limit,
            "server.max_request_bytes",
        ));
    }
    Ok(out.into())
}

/// A decoded answer as one gRPC frame.
fn frame(
    resp: &crate::proto::inference::ModelInferResponse,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    encode_frame(resp, limit)
        .map_err(|e| too_large("response", e.len, e.limit, "server.max_response_bytes"))
}

fn too_large(what: &str, len: usize, limit: usize, setting: &str) -> GatewayError {
    GatewayError::PayloadTooLarge(format!(
        "{what} message length too large: found {len} bytes, the limit is {limit} bytes ({setting})"
    ))
}

fn send(reply: Reply, request_id: HeaderValue, respond: &mut SendResponse<Bytes>) {
    match reply {
        Reply::Message(frame) => {
            let mut head = Response::new(());
            let h = head.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(
                GRPC_ACCEPT_ENCODING.clone(),
                HeaderValue::from_static("gzip"),
            );
            h.insert(X_REQUEST_ID.clone(), request_id);
            let Ok(mut tx) = respond.send_response(head, false) else {
                return;
            };
            // The whole message is in memory already (bounded by max_response_bytes): h2
            // sends it as the caller's window opens.
            if tx.send_data(frame, false).is_err() {
                return;
            }
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
            let _ = tx.send_trailers(trailers);
        }
        Reply::Status(err) => {
            let mut head: Response<()> = tonic::Status::from(err).into_http();
            head.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            let _ = respond.send_response(head, true);
        }
        Reply::NotGrpc => {
            let mut head = Response::new(());
            *head.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            head.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            let _ = respond.send_response(head, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_messages_inflate_within_the_limit() {
        let data = vec![7u8; 4096];
        assert_eq!(&gunzip(&gz(&data), 4096).unwrap()[..], &data[..]);
        let e = gunzip(&gz(&data), 4095).unwrap_err();
        assert!(matches!(e, GatewayError::PayloadTooLarge(_)), "{e:?}");
        assert!(e.to_string().contains("message length too large"), "{e}");
        assert!(gunzip(b"not gzip", 100).is_err());
    }

    #[test]
    fn answers_over_the_limit_are_refused_with_the_setting_named() {
        let resp = crate::proto::inference::ModelInferResponse {
            model_name: "m".repeat(100),
            ..Default::default()
        };
        let f = frame(&resp, 1024).unwrap();
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
        let e = frame(&resp, 50).unwrap_err();
        assert_eq!(e.grpc_code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("server.max_response_bytes"), "{e}");
    }
}
