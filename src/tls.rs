//! TLS (rustls with the ring provider): on the gRPC listener through tonic, on the HTTP
//! listener through [`TlsListener`], and towards Triton through tonic's client config.
//!
//! The HTTP listener does handshakes in their own tasks, at most `max_handshakes` at once and
//! each within `handshake_timeout_ms`, so a client that connects and stalls holds neither the
//! accept loop nor memory for long; only finished handshakes reach the server.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, server::WebPkiClientVerifier},
    server::TlsStream,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::section::{ConfigError, Section, bounds, clap_defaults, invalid, readable};

/// Certificates of the two listeners (PEM files, read at start).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first: serve both APIs over TLS (with the key).
    #[arg(long = "tls-cert", env = "INFERGATE_TLS_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long = "tls-key", env = "INFERGATE_TLS_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS).
    #[arg(
        long = "tls-client-ca",
        env = "INFERGATE_TLS_CLIENT_CA",
        value_name = "FILE"
    )]
    pub client_ca: Option<PathBuf>,
    /// A client that has not finished its TLS handshake by then is dropped, in ms.
    #[arg(
        long = "tls-handshake-timeout-ms",
        env = "INFERGATE_TLS_HANDSHAKE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once on each listener; more connections wait.
    #[arg(
        long = "tls-max-handshakes",
        env = "INFERGATE_TLS_MAX_HANDSHAKES",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_handshakes: usize,
}

impl ServerTls {
    /// TLS is on once any of its files is named (then certificate and key are both needed).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }
}
impl Section for ServerTls {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        readable("server.tls.cert", self.cert.as_deref())?;
        readable("server.tls.key", self.key.as_deref())?;
        if let Some(ca) = &self.client_ca {
            readable("server.tls.client_ca", Some(ca))?;
        }
        bounds!(self, "server.tls", {
            handshake_timeout_ms: 1..=600_000,
            max_handshakes: 1..=65_536,
        });
        Ok(())
    }
}

/// TLS towards Triton (used for `https://` Triton URLs). Its certificate and key share
/// their field names with the listeners' own, so their flag ids spell the whole path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TritonTls {
    /// PEM CA bundle that signed Triton's certificate (for https:// Triton URLs).
    #[arg(long = "triton-ca", env = "INFERGATE_TRITON_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate towards Triton, for its `--grpc-use-ssl-mutual` (with the key).
    #[arg(
        id = "triton.tls.cert",
        long = "triton-cert",
        env = "INFERGATE_TRITON_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key of that client certificate.
    #[arg(
        id = "triton.tls.key",
        long = "triton-key",
        env = "INFERGATE_TRITON_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
    /// Name to check Triton's certificate against, when not the URL's host.
    #[arg(
        long = "triton-domain",
        env = "INFERGATE_TRITON_DOMAIN",
        value_name = "NAME"
    )]
    pub domain: Option<String>,
}

impl TritonTls {
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }
}

impl Section for TritonTls {
    fn validate(&self) -> Result<(), ConfigError> {
        readable("triton.tls.ca", self.ca.as_deref())?;
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                readable("triton.tls.cert", Some(c))?;
                readable("triton.tls.key", Some(k))
            }
            (None, None) => Ok(()),
            _ => Err(invalid(
                "triton.tls.cert",
                "a client certificate needs its key, and a key its certificate",
            )),
        }
    }
}

clap_defaults!(ServerTls, TritonTls);

#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

/// A file the config names; an unnamed one reads as an empty path, whose error names the field
/// (the config's validation asks for it before this runs).
fn named(path: &Option<std::path::PathBuf>) -> &Path {
    path.as_deref().unwrap_or(Path::new(""))
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError {
        field,
        message: format!("cannot read '{}': {e}", path.display()),
    })
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError {
            field,
            message: format!("'{}' is not PEM certificates: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError {
            field,
            message: format!("'{}' holds no certificate", path.display()),
        });
    }
    Ok(certs)
}

fn key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(field, path)?).map_err(|e| TlsError {
        field,
        message: format!("'{}' is not a PEM private key: {e}", path.display()),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The HTTP listener's rustls config: HTTP/2 and HTTP/1.1 by ALPN, client certificates
/// required when `client_ca` is set.
pub fn http_server_config(cfg: &ServerTls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs("server.tls.cert", named(&cfg.cert))?;
    let key = key("server.tls.key", named(&cfg.key))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            field: "server.tls",
            message: e.to_string(),
        })?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs("server.tls.client_ca", ca)? {
                roots.add(c).map_err(|e| TlsError {
                    field: "server.tls.client_ca",
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError {
                    field: "server.tls.client_ca",
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError {
        field: "server.tls.key",
        message: format!("does not match the certificate: {e}"),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The gRPC listener's rustls config: the HTTP listener's certificates and client checks,
/// with HTTP/2 alone offered by ALPN (gRPC has no HTTP/1.1).
pub fn grpc_server_config(cfg: &ServerTls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = Arc::unwrap_or_clone(http_server_config(cfg)?);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS towards Triton: its CA, optionally a client identity (mTLS) and the name to check.
pub fn triton_client_config(cfg: &TritonTls) -> Result<ClientTlsConfig, TlsError> {
    certs("triton.tls.ca", named(&cfg.ca))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
        "triton.tls.ca",
        named(&cfg.ca),
    )?));
    if let (Some(cert), Some(k)) = (&cfg.cert, &cfg.key) {
        certs("triton.tls.cert", cert)?;
        key("triton.tls.key", k)?;
        tls = tls.identity(Identity::from_pem(
            read("triton.tls.cert", cert)?,
            read("triton.tls.key", k)?,
        ));
    }
    if let Some(d) = &cfg.domain {
        tls = tls.domain_name(d.clone());
    }
    Ok(tls)
}

/// A TCP listener whose connections come out already through a TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, cfg: &ServerTls, config: Arc<rustls::ServerConfig>) -> Self {
        let local = listener
            .local_addr()
            .expect("a bound listener has an address");
        let acceptor = TlsAcceptor::from(config);
        let limit = Arc::new(Semaphore::new(cfg.max_handshakes));
        let timeout = Duration::from_millis(cfg.handshake_timeout_ms);
        let (tx, ready) = mpsc::channel(cfg.max_handshakes);
        tokio::spawn(async move {
            loop {
                // Wait for a handshake slot before accepting: the backlog holds the rest.
                let permit = tokio::select! {
                    _ = tx.closed() => return,
                    p = Arc::clone(&limit).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (tcp, addr) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors and the like: pause rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(stream) = handshake(&acceptor, tcp, timeout, "HTTP").await {
                        let _ = tx.send((stream, addr)).await;
                    }
                });
            }
        });
        Self { ready, local }
    }
}

/// One server-side TLS handshake within `timeout`; a failed or stalled one is logged (at
/// debug: it says more about the client than about infergate) and its connection dropped.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
    listener: &'static str,
) -> Option<TlsStream<TcpStream>> {
    let peer = tcp.peer_addr().ok();
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(listener, ?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener, ?peer, "TLS handshake timed out");
            None
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it never does while this listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
