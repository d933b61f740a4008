//! Calls that go to every endpoint rather than to one (model control across the fleet).

use std::{future::Future, time::Duration};

use super::{endpoint::TritonClient, triton::TritonPool};
use crate::error::GatewayError;

impl TritonPool {
    /// Sends the request `make()` builds to every endpoint at once through `f`, each bounded
    /// by `timeout` (also sent as `grpc-timeout`); the outcomes come in the pool's order,
    /// each named by its endpoint's URL. Unhealthy endpoints are tried too: the caller is
    /// told how each one did.
    pub async fn on_each<Req, T, F, Fut, M>(
        &self,
        timeout: Duration,
        f: F,
        make: M,
    ) -> Vec<(String, Result<T, GatewayError>)>
    where
        F: Fn(TritonClient, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
        M: Fn() -> Req,
    {
        let endpoints = self.endpoints();
        let calls = endpoints.iter().map(|ep| {
            let mut req = tonic::Request::new(make());
            req.set_timeout(timeout);
            let call = f(ep.client(), req);
            async move {
                let outcome = match tokio::time::timeout(timeout, call).await {
                    Ok(r) => r.map_err(GatewayError::from_backend),
                    Err(_) => Err(GatewayError::DeadlineExceeded(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    ))),
                };
                (ep.url.clone(), outcome)
            }
        });
        futures::future::join_all(calls).await
    }
}
