//! End-to-end over gRPC against a real Triton: every RPC through infergate answers what Triton
//! answers directly, bad input gets the documented codes, streams keep order and stop when the
//! client leaves, health follows readiness, and shutdown drains in-flight work.

mod common;

use std::time::{Duration, Instant};

use common::*;
use infergate::proto::inference::{
    InferParameter, ModelConfigRequest, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ModelStatisticsRequest, RepositoryIndexRequest, ServerLiveRequest, ServerMetadataRequest,
    ServerReadyRequest, infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
};
use tonic::Code;

fn add_sub_request(rows: usize, seed: f32) -> (ModelInferRequest, Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..rows * 16).map(|i| seed + i as f32).collect();
    let b: Vec<f32> = (0..rows * 16).map(|i| (i as f32) * 0.5 - seed).collect();
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, 16],
        ..Default::default()
    };
    let req = ModelInferRequest {
        model_name: "add_sub".into(),
        id: format!("r{seed}"),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(&a), f32_bytes(&b)],
        ..Default::default()
    };
    (req, a, b)
}

fn bytes_tensor(items: &[&[u8]]) -> bytes::Bytes {
    let mut v = Vec::new();
    for s in items {
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s);
    }
    v.into()
}

/// One request per model of triton-models/.
fn one_request_per_model() -> Vec<ModelInferRequest> {
    let t = |name: &str, dt: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape,
        ..Default::default()
    };
    let req = |model: &str, inputs, raw| ModelInferRequest {
        model_name: model.into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    };
    vec![
        add_sub_request(3, 1.0).0,
        req(
            "onnx_linear",
            vec![t("X", "FP32", vec![2, 4])],
            vec![f32_bytes(&[1., 2., 3., 4., -1., 0., 0.5, 2.])],
        ),
        req(
            "text_stats",
            vec![t("TEXT", "BYTES", vec![2, 1])],
            vec![bytes_tensor(&[b"abc", b"Hello"])],
        ),
        req(
            "seq_sum",
            vec![t("SEQ", "FP32", vec![1, 5])],
            vec![f32_bytes(&[1., 2., 3., 4., 5.])],
        ),
        req(
            "matrix_nobatch",
            vec![t("IN", "INT32", vec![2, 3])],
            vec![
                (0..6i32)
                    .flat_map(|i| i.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            ],
        ),
        req(
            "slow",
            vec![t("INPUT", "FP32", vec![1, 1])],
            vec![f32_bytes(&[7.0])],
        ),
    ]
}

#[tokio::test]
async fn every_rpc_answers_what_triton_answers() {
    let _slow = SLOW_MODEL.lock().await;
    let gw = gateway().await;
    let mut via = gw.client().await;
    let mut direct = connect(&triton().grpc_url()).await;

    assert!(
        via.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert_eq!(
        via.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner(),
        direct
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    let (d, v) = (
        direct
            .server_metadata(ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner(),
        via.server_metadata(ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (d.name.as_str(), d.version.as_str()),
        (v.name.as_str(), v.version.as_str())
    );
    assert!(v.extensions.iter().all(|e| d.extensions.contains(e)));
    assert!(v.extensions.contains(&"binary_tensor_data".to_string()));

    let models = [
        "add_sub",
        "onnx_linear",
        "text_stats",
        "seq_sum",
        "matrix_nobatch",
        "slow",
        "add_sub_delay",
        "add_sub_preferred",
        "flaky",
        "token_stream",
        "accumulate",
        "tiny_chat",
    ];
    for m in models {
        let ready = ModelReadyRequest {
            name: m.into(),
            version: String::new(),
        };
        assert_eq!(
            via.model_ready(ready.clone()).await.unwrap().into_inner(),
            direct.model_ready(ready).await.unwrap().into_inner(),
            "{m} ready"
        );
        let md = ModelMetadataRequest {
            name: m.into(),
            version: String::new(),
        };
        assert_eq!(
            via.model_metadata(md.clone()).await.unwrap().into_inner(),
            direct.model_metadata(md).await.unwrap().into_inner(),
            "{m} metadata"
        );
        let cfg = ModelConfigRequest {
            name: m.into(),
            version: "1".into(),
        };
        assert_eq!(
            via.model_config(cfg.clone()).await.unwrap().into_inner(),
            direct.model_config(cfg).await.unwrap().into_inner(),
            "{m} config"
        );
    }
    let idx = RepositoryIndexRequest {
        repository_name: String::new(),
        ready: true,
    };
    let vi = via
        .repository_index(idx.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vi, direct.repository_index(idx).await.unwrap().into_inner());
    assert_eq!(vi.models.len(), models.len());

    for req in one_request_per_model() {
        let model = req.model_name.clone();
        let d = direct.model_infer(req.clone()).await.unwrap().into_inner();
        let v = via.model_infer(req).await.unwrap().into_inner();
        assert_eq!(v.outputs, d.outputs, "{model} outputs");
        assert_eq!(v.raw_output_contents, d.raw_output_contents, "{model} data");
        assert_eq!(
            (v.model_name, v.model_version, v.id),
            (d.model_name, d.model_version, d.id)
        );
    }

    // Statistics: infergate's call is Triton's; after one more request through infergate the
    // success count seen through infergate has grown by exactly one.
    let stats = |c: &mut common::Client| {
        let mut c = c.clone();
        async move {
            c.model_statistics(ModelStatisticsRequest {
                name: "onnx_linear".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .model_stats[0]
                .inference_stats
                .unwrap()
                .success
                .unwrap()
                .count
        }
    };
    let before = stats(&mut via).await;
    assert_eq!(before, stats(&mut direct).await);
    via.model_infer(one_request_per_model()[1].clone())
        .await
        .unwrap();
    assert_eq!(stats(&mut via).await, before + 1);
}

#[tokio::test]
async fn results_are_correct_for_each_caller() {
    let gw = gateway().await;
    let mut c = gw.client().await;
    // 65 and 130 rows are over add_sub's max_batch_size of 64: split and reassembled in order.
    for rows in [1, 5, 64, 65, 130] {
        let (req, a, b) = add_sub_request(rows, rows as f32);
        let r = c.model_infer(req).await.unwrap().into_inner();
        let sum = f32_from(&r.raw_output_contents[0]);
        let diff = f32_from(&r.raw_output_contents[1]);
        for i in 0..a.len() {
            assert_eq!(sum[i], a[i] + b[i]);
            assert_eq!(diff[i], a[i] - b[i]);
        }
        assert_eq!(r.outputs[0].shape, vec![rows as i64, 16]);
    }
    // Typed (non-raw) contents are accepted too.
    let (mut req, a, b) = add_sub_request(1, 2.0);
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(infergate::proto::inference::InferTensorContents {
        fp32_contents: a.clone(),
        ..Default::default()
    });
    req.inputs[1].contents = Some(infergate::proto::inference::InferTensorContents {
        fp32_contents: b.clone(),
        ..Default::default()
    });
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(f32_from(&r.raw_output_contents[0])[3], a[3] + b[3]);
}

#[tokio::test]
async fn bad_requests_get_documented_codes_naming_the_field() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.max_request_bytes = 16 * 1024;
    let gw = gateway_with(cfg).await;
    let mut c = gw.client().await;
    let expect = |r: Result<tonic::Response<_>, tonic::Status>, code: Code, needle: &str| {
        let s = r.expect_err("must fail");
        assert_eq!(s.code(), code, "{s:?}");
        assert!(
            s.message().contains(needle),
            "{needle:?} not in {:?}",
            s.message()
        );
    };

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.model_name = "no_such_model".into();
    expect(c.model_infer(r).await, Code::NotFound, "no_such_model");

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.inputs[1].datatype = "INT32".into();
    expect(
        c.model_infer(r).await,
        Code::InvalidArgument,
        "input 'INPUT1': datatype INT32",
    );

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.inputs[0].shape = vec![1, 8];
    expect(
        c.model_infer(r).await,
        Code::InvalidArgument,
        "input 'INPUT0': dimension 1 is 8",
    );

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.raw_input_contents[0] = r.raw_input_contents[0].slice(..60);
    expect(
        c.model_infer(r).await,
        Code::InvalidArgument,
        "needs 64 bytes, got 60",
    );

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.inputs[0].shape = vec![1, 16, i64::MAX];
    expect(c.model_infer(r).await, Code::InvalidArgument, "INPUT0");

    let (mut r, ..) = add_sub_request(1, 0.0);
    r.inputs[0].shape = vec![0, 16];
    r.inputs[1].shape = vec![0, 16];
    r.raw_input_contents = vec![bytes::Bytes::new(), bytes::Bytes::new()];
    expect(
        c.model_infer(r).await,
        Code::InvalidArgument,
        "batch size is 0",
    );

    let mut r = one_request_per_model()[2].clone();
    r.raw_input_contents[0] = bytes::Bytes::from_static(&[200, 0, 0, 0, b'x']);
    expect(
        c.model_infer(r).await,
        Code::InvalidArgument,
        "input 'TEXT'",
    );

    let (r, ..) = add_sub_request(64, 0.0); // 8 KiB of inputs, over the 16 KiB limit with both
    let big = ModelInferRequest {
        raw_input_contents: vec![r.raw_input_contents[0].clone(); 2]
            .into_iter()
            .chain([f32_bytes(&vec![0.0; 4096])])
            .collect(),
        ..r
    };
    expect(
        c.model_infer(big.clone()).await,
        Code::ResourceExhausted,
        "message length too large",
    );
    // The same message through tonic's router (the task service): RESOURCE_EXHAUSTED too,
    // where tonic itself would answer OUT_OF_RANGE.
    let ch = tonic::transport::Channel::from_shared(gw.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = infergate::proto::tasks::task_service_client::TaskServiceClient::new(ch);
    let s = tasks
        .submit(infergate::proto::tasks::SubmitRequest {
            callback_url: String::new(),
            request: Some(big),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("over max_request_bytes");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    // Triton's own refusals come back with Triton's code and message.
    let (mut r, ..) = add_sub_request(1, 0.0);
    r.model_version = "7".into();
    let s = c.model_infer(r).await.expect_err("unknown version");
    assert!(
        matches!(s.code(), Code::NotFound | Code::InvalidArgument),
        "{s:?}"
    );

    // The gateway is still healthy after all that.
    assert!(c.model_infer(add_sub_request(1, 0.0).0).await.is_ok());
}

#[tokio::test]
async fn stream_answers_in_order_and_reports_errors_in_band() {
    let gw = gateway().await;
    let mut c = gw.client().await;
    let mut reqs = Vec::new();
    for i in 0..30 {
        let (mut r, ..) = add_sub_request(1 + i % 3, i as f32);
        r.id = format!("s{i}");
        if i == 13 {
            r.inputs[0].shape = vec![9, 16]; // bad: disagrees with its data
        }
        reqs.push(r);
    }
    let resp = c
        .model_stream_infer(tokio_stream::iter(reqs.clone()))
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let mut i = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        let r = msg.infer_response.unwrap();
        assert_eq!(r.id, format!("s{i}"), "order kept");
        if i == 13 {
            assert!(
                msg.error_message.contains("INPUT0"),
                "{}",
                msg.error_message
            );
        } else {
            assert!(msg.error_message.is_empty(), "{}", msg.error_message);
            let a = f32_from(&reqs[i].raw_input_contents[0]);
            let b = f32_from(&reqs[i].raw_input_contents[1]);
            assert_eq!(f32_from(&r.raw_output_contents[0])[0], a[0] + b[0]);
        }
        i += 1;
    }
    assert_eq!(i, 30);
}

fn slow_request(delay_ms: i64) -> ModelInferRequest {
    let mut r = one_request_per_model()[5].clone();
    r.parameters.insert(
        "delay_ms".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(delay_ms)),
        },
    );
    r
}

/// Tests that count the `slow` model's executions run one at a time.
static SLOW_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn slow_executions(c: &mut common::Client) -> u64 {
    c.model_statistics(ModelStatisticsRequest {
        name: "slow".into(),
        version: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .model_stats[0]
        .execution_count
}

#[tokio::test]
async fn a_stream_whose_client_leaves_stops_sending_work() {
    let mut cfg = test_config(vec![triton().grpc_url()]);
    cfg.server.stream_concurrency = 1;
    let _slow = SLOW_MODEL.lock().await;
    let gw = gateway_with(cfg).await;
    let mut direct = connect(&triton().grpc_url()).await;
    let before = slow_executions(&mut direct).await;
    {
        let mut c = gw.client().await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for _ in 0..10 {
            tx.send(slow_request(150)).await.unwrap();
        }
        let mut stream = c
            .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Take the first answer, then go away with 9 requests unanswered.
        assert!(stream.message().await.unwrap().is_some());
        drop(stream);
        drop(tx);
    }
    // Ten requests would take 1.5 s; wait that long and count what Triton ran.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let ran = slow_executions(&mut direct).await - before;
    assert!(
        (1..=3).contains(&ran),
        "Triton ran {ran} of 10 after the client left"
    );
}

#[tokio::test]
async fn pool_skips_dead_endpoints_and_reports_unavailable_when_all_are_dead() {
    // One live Triton and one address where nothing listens.
    let cfg = test_config(vec!["http://127.0.0.1:1".into(), triton().grpc_url()]);
    let gw = gateway_with(cfg).await;
    let mut c = gw.client().await;
    for i in 0..20 {
        c.model_infer(add_sub_request(1, i as f32).0).await.unwrap();
    }
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let dead = gateway_with(test_config(vec!["http://127.0.0.1:1".into()])).await;
    let mut d = dead.client().await;
    assert!(
        !d.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        d.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    let started = Instant::now();
    let s = d.model_infer(add_sub_request(1, 0.0).0).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "fails fast");

    // gRPC health follows readiness, per service.
    let health = |url: String| async move {
        let ch = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let mut out = Vec::new();
        for svc in ["", "inference.GRPCInferenceService"] {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: svc.into(),
                })
                .await
                .unwrap()
                .into_inner();
            out.push(r.status);
        }
        out
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health(gw.grpc_url()).await, vec![serving, serving]);
    assert_eq!(
        health(dead.grpc_url()).await,
        vec![not_serving, not_serving]
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_refuses_new_ones() {
    let _slow = SLOW_MODEL.lock().await;
    let gw = gateway().await;
    let mut c = gw.client().await;
    let addr = gw.grpc_addr;
    let in_flight = tokio::spawn(async move { c.model_infer(slow_request(600)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    gw.shutdown().await.unwrap();
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes during the grace period");
    assert_eq!(f32_from(&r.into_inner().raw_output_contents[0]), vec![7.0]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}
