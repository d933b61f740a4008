//! Bodies between the `h2` crate and tonic's router, for every call other than ModelInfer:
//! an h2 request stream as an `http_body::Body`, and a response body written onto an h2
//! stream within HTTP/2 flow control.

use std::{
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http_body::{Body, Frame};

/// A request body read from an h2 stream; each chunk read is given back to the peer's
/// flow-control window at once (tonic buffers what it has not decoded yet, within its limit).
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.stream.flow_control().release_capacity(chunk.len());
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// Sends `resp` on `respond`: headers, then data as the peer's window allows, then trailers.
/// Stops early (dropping the body, which cancels a streaming handler) when the peer resets
/// the stream or the connection goes.
pub async fn send<B>(resp: http::Response<B>, mut respond: SendResponse<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, mut body) = resp.into_parts();
    let end = body.is_end_stream();
    let Ok(mut tx) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    loop {
        let frame = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "gRPC response body failed; resetting the stream");
                tx.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if send_data(&mut tx, data).await.is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = tx.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// Sends `data` in pieces no larger than the capacity h2 grants, so a slow reader holds back
/// the handler instead of growing h2's send buffer without bound.
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), ()> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            tx.poll_capacity(cx)
        })
        .await;
        match granted {
            Some(Ok(n)) if n > 0 => {
                let piece = data.split_to(n.min(data.len()));
                tx.send_data(piece, false).map_err(|_| ())?;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(()),
        }
    }
    Ok(())
}
