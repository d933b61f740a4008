//! Real Triton clients against infergate: Python tritonclient (gRPC and HTTP, binary data on)
//! gives identical results through infergate and directly, perf_analyzer runs with 0 errors,
//! a reflection client lists the services without proto files, and the ghz configs run.

mod common;

use std::process::Command;

use common::*;

fn venv() -> String {
    triton_venv()
}

async fn run(cmd: &mut Command) -> (bool, String) {
    let out = tokio::task::block_in_place(|| cmd.output()).expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_identical_results_through_infergate() {
    let gw = gateway().await;
    let t = triton();
    let v = venv();
    let (ok, out) = run(Command::new(format!("{v}/bin/python"))
        .arg(repo().join("tests/clients/conformance.py"))
        .arg(format!("127.0.0.1:{}", t.grpc_port))
        .arg(format!("127.0.0.1:{}", t.http_port))
        .arg(gw.grpc_addr.to_string())
        .arg(gw.http_addr.to_string()))
    .await;
    println!("{out}");
    assert!(ok, "conformance failed:\n{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_runs_against_infergate_with_no_errors() {
    let gw = gateway().await;
    let v = venv();
    for (proto, addr) in [("grpc", gw.grpc_addr), ("http", gw.http_addr)] {
        let (ok, out) = run(Command::new("timeout")
            .args(["120", &format!("{v}/bin/perf_analyzer")])
            .args(["-m", "add_sub", "-i", proto, "-u", &addr.to_string()])
            .args([
                "--concurrency-range",
                "4",
                "--measurement-mode",
                "count_windows",
            ])
            // Other tests share these 2 cores: accept any stable-enough window.
            .args([
                "--measurement-request-count",
                "300",
                "-s",
                "100",
                "--max-trials",
                "10",
            ])
            .env("LD_LIBRARY_PATH", format!("{v}/infergate-libs")))
        .await;
        println!("{out}");
        assert!(ok, "perf_analyzer over {proto} failed:\n{out}");
        assert!(out.contains("throughput:"), "{out}");
        assert!(
            !out.to_lowercase().contains("error"),
            "perf_analyzer saw errors over {proto}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    let gw = gateway().await;
    let v = venv();
    let (ok, out) = run(Command::new(format!("{v}/bin/python"))
        .arg(repo().join("tests/clients/reflection.py"))
        .arg(gw.grpc_addr.to_string()))
    .await;
    assert!(ok, "{out}");
    for svc in [
        "inference.GRPCInferenceService",
        "infergate.tasks.v1.TaskService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(out.lines().any(|l| l == svc), "{svc} missing from:\n{out}");
    }
    assert!(out.contains("resolved: grpc_service.proto"), "{out}");
}

/// The ghz configs of loadtest/ghz (ghz is not installable here): their `data` parses into
/// the request type of their `call` and runs against infergate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghz_configs_parse_and_run_against_infergate() {
    let gw = gateway().await;
    let v = venv();
    let (ok, out) = run(Command::new(format!("{v}/bin/python"))
        .arg(repo().join("loadtest/ghz/check.py"))
        .arg(gw.grpc_addr.to_string()))
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("3 ghz configs parse and run"), "{out}");
    assert!(
        out.contains("task_submit.json: infergate.tasks.v1.TaskService/Submit -> OK"),
        "{out}"
    );
}
