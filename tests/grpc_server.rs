//! infergate's own gRPC listener (src/api/grpc), below what a tonic client shows: the
//! gRPC envelope of ModelInfer checked frame by frame over a raw HTTP/2 connection,
//! compressed requests, request ids, and calls spread over several serving threads, each
//! caller getting exactly its own rows. Against the real Triton.

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use infergate::proto::inference::{ModelInferRequest, ModelInferResponse};
use prost::Message;
use tonic::{Code, codec::CompressionEncoding};

const PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// What one raw call got back.
#[derive(Debug)]
struct Raw {
    http: u16,
    grpc_status: Option<String>,
    grpc_message: String,
    body: Bytes,
}

/// A raw HTTP/2 connection to the gateway's gRPC port.
async fn raw_conn(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends `body` in the given DATA frames (`end` closes the stream after the last one) and
/// reads the answer, headers-only or with trailers.
async fn raw_call(
    send: &h2::client::SendRequest<Bytes>,
    headers: &[(&str, &str)],
    frames: Vec<Bytes>,
    end: bool,
) -> Raw {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{PATH}"))
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut send = send.clone().ready().await.unwrap();
    let last = frames.len();
    let (answer, mut stream) = send
        .send_request(req.body(()).unwrap(), last == 0 && end)
        .unwrap();
    for (i, f) in frames.into_iter().enumerate() {
        stream.send_data(f, end && i + 1 == last).unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("an answer in time")
        .unwrap();
    let (parts, mut recv) = resp.into_parts();
    let mut status = parts.headers.get("grpc-status").map(text);
    let mut message = parts.headers.get("grpc-message").map(text);
    let mut body = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    if let Some(t) = recv.trailers().await.unwrap() {
        status = t.get("grpc-status").map(text);
        message = t.get("grpc-message").map(text);
    }
    Raw {
        http: parts.status.as_u16(),
        grpc_status: status,
        grpc_message: message.unwrap_or_default(),
        body: body.freeze(),
    }
}

fn text(v: &http::HeaderValue) -> String {
    v.to_str().unwrap().replace("%20", " ")
}

fn framed(flag: u8, msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(flag);
    b.put_u32(msg.len() as u32);
    b.extend_from_slice(msg);
    b.freeze()
}

fn grpc() -> Vec<(&'static str, &'static str)> {
    vec![("content-type", "application/grpc")]
}

/// The add_sub answer in a successful raw call, decoded.
fn decoded(r: &Raw) -> ModelInferResponse {
    assert_eq!(r.grpc_status.as_deref(), Some("0"), "{r:?}");
    assert_eq!(r.body[0], 0, "uncompressed answer");
    ModelInferResponse::decode(&r.body[5..]).unwrap()
}

#[tokio::test]
async fn the_envelope_is_checked_and_each_fault_named() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.max_request_bytes = 16 * 1024;
    let gw = gateway_with(cfg).await;
    let conn = raw_conn(gw.grpc_addr).await;
    let good = add_sub_request().encode_to_vec();

    // A well-formed call, raw: the answer is Triton's, 2+1 and 2-1 in every element.
    let ok = raw_call(&conn, &grpc(), vec![framed(0, &good)], true).await;
    let out = decoded(&ok);
    assert_eq!(f32_from(&out.raw_output_contents[0]), vec![3.0; 16]);
    assert_eq!(f32_from(&out.raw_output_contents[1]), vec![1.0; 16]);
    // The same message split over three DATA frames, the prefix itself cut in two.
    let whole = framed(0, &good);
    let parts = vec![whole.slice(..3), whole.slice(3..40), whole.slice(40..)];
    assert_eq!(
        decoded(&raw_call(&conn, &grpc(), parts, true).await).raw_output_contents,
        out.raw_output_contents
    );

    let refused = |r: &Raw, code: Code, needle: &str| {
        assert_eq!(r.http, 200, "{r:?}");
        assert_eq!(
            r.grpc_status.as_deref(),
            Some((code as i32).to_string().as_str()),
            "{r:?}"
        );
        assert!(r.grpc_message.contains(needle), "{needle:?} not in {r:?}");
        assert!(r.body.is_empty(), "a refusal carries no message: {r:?}");
    };
    let garbage = raw_call(&conn, &grpc(), vec![framed(0, &[0xff; 12])], true).await;
    refused(&garbage, Code::InvalidArgument, "not a ModelInferRequest");
    let two = raw_call(
        &conn,
        &grpc(),
        vec![framed(0, &good), framed(0, &good)],
        true,
    )
    .await;
    refused(&two, Code::InvalidArgument, "one message");
    let none = raw_call(&conn, &grpc(), vec![], true).await;
    refused(&none, Code::InvalidArgument, "no message");
    let cut = raw_call(&conn, &grpc(), vec![framed(0, &good).slice(..15)], true).await;
    refused(&cut, Code::InvalidArgument, "ended 10 bytes into");
    let flagged = raw_call(&conn, &grpc(), vec![framed(1, &good)], true).await;
    refused(&flagged, Code::InvalidArgument, "names no grpc-encoding");
    let mut brotli = grpc();
    brotli.push(("grpc-encoding", "br"));
    let br = raw_call(&conn, &brotli, vec![framed(1, &good)], true).await;
    refused(&br, Code::Unimplemented, "grpc-encoding 'br'");

    // A prefix announcing 1 GiB is refused from the prefix alone: the stream stays open,
    // no body follows, and the answer still comes.
    let mut prefix = BytesMut::new();
    prefix.put_u8(0);
    prefix.put_u32(1 << 30);
    let big = raw_call(&conn, &grpc(), vec![prefix.freeze()], false).await;
    refused(&big, Code::ResourceExhausted, "message length too large");
    assert!(
        big.grpc_message.contains("server.max_request_bytes"),
        "{big:?}"
    );

    // Not gRPC at all: HTTP 415, as the gRPC spec asks.
    let plain = raw_call(
        &conn,
        &[("content-type", "application/json")],
        vec![Bytes::from_static(b"{}")],
        true,
    )
    .await;
    assert_eq!(plain.http, 415, "{plain:?}");

    // After all that, the same connection still serves.
    decoded(&raw_call(&conn, &grpc(), vec![framed(0, &good)], true).await);
}

#[tokio::test]
async fn gzip_requests_are_inflated_within_the_limit() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.max_request_bytes = 16 * 1024;
    let gw = gateway_with(cfg).await;
    let mut c = gw.client().await.send_compressed(CompressionEncoding::Gzip);
    let out = c.model_infer(add_sub_request()).await.expect("gzip call");
    assert_eq!(
        f32_from(&out.into_inner().raw_output_contents[0]),
        vec![3.0; 16]
    );
    // Zeros compress to almost nothing, but inflate past the 16 KiB limit.
    let mut big = add_sub_request();
    big.raw_input_contents
        .push(Bytes::from(vec![0u8; 64 * 1024]));
    let e = c
        .model_infer(big)
        .await
        .expect_err("over the limit once inflated");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("inflated request"), "{e:?}");
}

#[tokio::test]
async fn request_ids_are_kept_or_made_on_answers_and_refusals() {
    let gw = gateway().await;
    let mut c = gw.client().await;
    let mut req = tonic::Request::new(add_sub_request());
    req.metadata_mut()
        .insert("x-request-id", "caller-id-7".parse().unwrap());
    let resp = c.model_infer(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "caller-id-7");

    let resp = c.model_infer(add_sub_request()).await.unwrap();
    let made = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(made.len(), 36, "a UUID: {made}");
    assert_ne!(made, "caller-id-7");

    let mut bad = add_sub_request();
    bad.model_name = "no_such_model".into();
    let mut req = tonic::Request::new(bad);
    req.metadata_mut()
        .insert("x-request-id", "caller-id-8".parse().unwrap());
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.metadata().get("x-request-id").unwrap(), "caller-id-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_several_serving_threads_each_get_their_own_rows() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.grpc_threads = 3;
    cfg.batching.mode = infergate::config::BatchMode::Off;
    let gw = gateway_with(cfg).await;
    // Six connections over three threads, 40 concurrent calls on each, every call with its
    // own values: a mix-up between threads or Triton connections would show in the rows.
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(connect(&gw.grpc_url()).await);
    }
    let mut calls = Vec::new();
    for (ci, c) in conns.iter().enumerate() {
        for k in 0..40 {
            let mut c = c.clone();
            calls.push(tokio::spawn(async move {
                let seed = (ci * 1000 + k) as f32;
                let a: Vec<f32> = (0..16).map(|i| seed + i as f32).collect();
                let b: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
                let mut req: ModelInferRequest = add_sub_request();
                req.raw_input_contents = vec![f32_bytes(&a), f32_bytes(&b)];
                req.id = format!("c{ci}-{k}");
                let out = c.model_infer(req).await.expect("call").into_inner();
                assert_eq!(out.id, format!("c{ci}-{k}"));
                let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
                let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                assert_eq!(f32_from(&out.raw_output_contents[0]), sum);
                assert_eq!(f32_from(&out.raw_output_contents[1]), diff);
            }));
        }
    }
    for call in calls {
        call.await.expect("a call panicked");
    }
    gw.shutdown().await.expect("drains");
}
