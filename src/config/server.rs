//! `[server]`: the listeners, addresses, sizes, streams and threads (their TLS is `tls`).

use std::net::SocketAddr;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::{
    section::{ConfigError, Section, bounds, clap_defaults, invalid},
    tls::ServerTls,
};

/// The listeners: addresses, sizes, streams, threads and TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address of the gRPC API (Open Inference Protocol, health, reflection).
    #[arg(
        long,
        env = "INFERGATE_GRPC_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub grpc_addr: SocketAddr,
    /// Listen address of the HTTP/JSON API.
    #[arg(
        long,
        env = "INFERGATE_HTTP_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// Largest accepted request (HTTP body or gRPC message), in bytes.
    #[arg(long, env = "INFERGATE_MAX_REQUEST_BYTES", value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
    /// Largest response accepted from Triton, in bytes.
    #[arg(long, env = "INFERGATE_MAX_RESPONSE_BYTES", value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_response_bytes: usize,
    /// Grace period for in-flight requests after SIGTERM, in ms.
    #[arg(
        long,
        env = "INFERGATE_SHUTDOWN_GRACE_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// HTTP/2 streams one gRPC client connection may have open.
    #[arg(
        long,
        env = "INFERGATE_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,
    /// Requests of one ModelStreamInfer stream that run at once (answers to models that are not
    /// decoupled keep request order; a decoupled model's responses come as Triton sends them).
    #[arg(
        long,
        env = "INFERGATE_STREAM_CONCURRENCY",
        value_name = "N",
        default_value_t = 16
    )]
    pub stream_concurrency: usize,
    /// Threads serving gRPC connections, each connection on one of them with its own Triton
    /// connections; 0 = one per CPU the process may use.
    #[arg(
        long,
        env = "INFERGATE_GRPC_THREADS",
        value_name = "N",
        default_value_t = 0
    )]
    pub grpc_threads: usize,
    /// TLS on both listeners; plaintext unless a certificate is named.
    #[command(flatten)]
    pub tls: ServerTls,
}

/// The most gRPC serving threads `server.grpc_threads` may ask for.
pub const MAX_GRPC_THREADS: usize = 256;

impl ServerConfig {
    /// `grpc_threads` with 0 resolved to the CPUs this process may use (cgroup quotas
    /// included, as the runtime's own sizing does).
    pub fn grpc_threads(&self) -> usize {
        match self.grpc_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_GRPC_THREADS),
            n => n,
        }
    }

    /// The listeners' certificates, when TLS is on.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.enabled().then_some(&self.tls)
    }
}

impl Section for ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr == self.http_addr && self.grpc_addr.port() != 0 {
            return Err(invalid(
                "server.http_addr",
                format!("{} is also the gRPC address", self.http_addr),
            ));
        }
        bounds!(self, "server", {
            max_request_bytes: 1024..=2u64 << 30,
            max_response_bytes: 1024..=4u64 << 30,
            shutdown_grace_ms: 0..=3_600_000,
            max_concurrent_streams: 1..=1 << 20,
            stream_concurrency: 1..=4096,
            grpc_threads: 0..=MAX_GRPC_THREADS,
        });
        self.tls.validate()
    }
}

clap_defaults!(ServerConfig);
