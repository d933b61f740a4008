//! ModelStreamInfer to Triton, for decoupled models: one upstream stream per request. A
//! request then owns its HTTP/2 stream, so dropping it (its caller left, cancelled or ran out
//! of time) resets that stream alone, and Triton cancels that request (the python backend
//! sees `is_cancelled()`), not its neighbours.

use std::{sync::Arc, time::Duration};

use futures::stream;

use super::{endpoint::InFlight, triton::TritonPool};
use crate::{
    error::GatewayError,
    proto::inference::{ModelInferRequest, ModelStreamInferResponse},
    telemetry::trace,
};

/// One request's responses as Triton sends them. Dropped before its end, it resets the
/// stream, which cancels the request in Triton.
pub struct Upstream {
    responses: tonic::Streaming<ModelStreamInferResponse>,
    /// Counts the stream against its endpoint while it is open (the balancer reads it).
    _in_flight: InFlight,
}

impl Upstream {
    /// The next response; `None` once Triton ended the stream (the request is complete).
    pub async fn next(&mut self) -> Result<Option<ModelStreamInferResponse>, GatewayError> {
        self.responses
            .message()
            .await
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
    ) -> Result<Upstream, GatewayError> {
        let (ep, _) = self.pick(None)?;
        ep.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let in_flight = InFlight(Arc::clone(&ep));
        let mut md = tonic::metadata::MetadataMap::new();
        trace::inject_into(&mut md);
        let mut r = tonic::Request::from_parts(md, Default::default(), stream::iter([req]));
        r.set_timeout(limit);
        match ep.client().model_stream_infer(r).await {
            Ok(resp) => Ok(Upstream {
                responses: resp.into_inner(),
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
