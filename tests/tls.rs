//! TLS on both listeners and mutual TLS towards a real Triton started with
//! `--grpc-use-ssl-mutual`: certificates are made for the test (rcgen), clients need one
//! signed by the test CA, plaintext and certificate-less clients are refused, and a gateway
//! without a client certificate for Triton never gets a ready endpoint.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use infergate::{
    config::{ServerTls, TritonTls},
    proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient,
};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tonic::transport::{Certificate as TonicCert, Channel, ClientTlsConfig, Identity};

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    ca: &Certificate,
    ca_key: &KeyPair,
    dir: &Path,
    stem: &str,
) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, stem);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate.
fn pki() -> Pki {
    let dir =
        std::env::temp_dir().join(format!("infergate-tls-{}", infergate::tasks::new_task_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "infergate test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let server = ["localhost", "127.0.0.1"];
    leaf(
        &server,
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
        &ca_key,
        &dir,
        "server",
    );
    leaf(
        &["client"],
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca,
        &ca_key,
        &dir,
        "client",
    );
    Pki { dir }
}

async fn tls_client(
    pki: &Pki,
    addr: std::net::SocketAddr,
    with_identity: bool,
) -> Result<GrpcInferenceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(TonicCert::from_pem(pki.read("ca.pem")))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.pem"),
            pki.read("client.key"),
        ));
    }
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_speak_mtls_and_triton_is_reached_over_mtls() {
    let pki = pki();
    let p = |n: &str| pki.path(n).to_str().unwrap().to_string();
    let triton = Triton::start(
        None,
        &[
            "--grpc-use-ssl=true".into(),
            "--grpc-use-ssl-mutual=true".into(),
            format!("--grpc-server-cert={}", p("server.pem")),
            format!("--grpc-server-key={}", p("server.key")),
            format!("--grpc-root-cert={}", p("ca.pem")),
        ],
    );
    let triton_url = format!("https://127.0.0.1:{}", triton.grpc_port);
    let mut cfg = test_config(vec![triton_url.clone()]);
    cfg.server.tls = ServerTls {
        cert: Some(pki.path("server.pem")),
        key: Some(pki.path("server.key")),
        client_ca: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let triton_tls = TritonTls {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client.key")),
        domain: Some("localhost".into()),
    };
    cfg.triton.tls = triton_tls.clone();
    cfg.validate().expect("valid TLS config");
    let gw = gateway_with(cfg.clone()).await;

    // gRPC over mTLS, through infergate, over mTLS to Triton.
    let mut c = tls_client(&pki, gw.grpc_addr, true)
        .await
        .expect("mTLS connect");
    let out = c
        .model_infer(add_sub_request())
        .await
        .expect("infer over TLS");
    assert_eq!(
        f32_from(&out.into_inner().raw_output_contents[0]),
        vec![3.0; 16]
    );
    // Without a client certificate the handshake (or the first call) is refused.
    let refused = match tls_client(&pki, gw.grpc_addr, false).await {
        Err(_) => true,
        Ok(mut c) => c.model_infer(add_sub_request()).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");
    // Plaintext to the TLS gRPC listener fails.
    let plain = Channel::from_shared(format!("http://{}", gw.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = GrpcInferenceServiceClient::new(ch);
        assert!(c.model_infer(add_sub_request()).await.is_err());
    }

    // HTTPS with a client certificate: HTTP/1.1 and HTTP/2 (ALPN) both work.
    let mut id = pki.read("client.pem");
    id.extend(pki.read("client.key"));
    let https = |identity: bool, h2: bool| {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pki.read("ca.pem")).unwrap())
            .timeout(Duration::from_secs(5));
        if identity {
            b = b.identity(reqwest::Identity::from_pem(&id).unwrap());
        }
        if !h2 {
            b = b.http1_only();
        }
        b.build().unwrap()
    };
    let body = serde_json::json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![2.0; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0; 16]}]});
    let url = format!(
        "https://localhost:{}/v2/models/add_sub/infer",
        gw.http_addr.port()
    );
    for h2 in [false, true] {
        let r = https(true, h2).post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want, "ALPN");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["outputs"][0]["data"][0], 3.0);
    }
    assert!(
        https(false, false)
            .post(&url)
            .json(&body)
            .send()
            .await
            .is_err(),
        "HTTPS without a client certificate is refused"
    );
    let plain = format!("http://127.0.0.1:{}/v2/health/live", gw.http_addr.port());
    assert!(
        reqwest::Client::new()
            .get(plain)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_err(),
        "plaintext HTTP to the TLS listener gets no answer"
    );

    // Triton insists on a client certificate: without one infergate never gets a ready
    // endpoint, and says so.
    let mut no_identity = cfg.clone();
    no_identity.triton.tls = TritonTls {
        cert: None,
        key: None,
        ..triton_tls
    };
    no_identity.server.tls = ServerTls::default();
    let gw2 = gateway_with(no_identity).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c2 = gw2.client().await;
    let err = c2.model_infer(add_sub_request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let r = reqwest::get(format!("{}/readyz", gw2.http_base()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[test]
fn tls_settings_are_checked_at_start_with_the_field_named() {
    let pki = pki();
    let mut cfg = infergate::config::Config::default();
    cfg.server.tls = ServerTls {
        cert: Some(pki.path("server.pem")),
        key: Some(pki.path("missing.key")),
        ..Default::default()
    };
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(
        msg.contains("server.tls.key") && msg.contains("missing.key"),
        "{msg}"
    );

    // A key that does not belong to the certificate.
    let tls = ServerTls {
        cert: Some(pki.path("server.pem")),
        key: Some(pki.path("client.key")),
        ..Default::default()
    };
    let err = infergate::tls::http_server_config(&tls)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.tls.key"), "{err}");
    // Not PEM at all.
    let tls = ServerTls {
        cert: Some(pki.path("server.key")),
        key: Some(pki.path("server.key")),
        ..Default::default()
    };
    let err = infergate::tls::http_server_config(&tls)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.tls.cert"), "{err}");

    let mut cfg = infergate::config::Config::default();
    cfg.triton.urls = vec!["https://127.0.0.1:8001".into()];
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("triton.tls.ca"), "{msg}");
}
