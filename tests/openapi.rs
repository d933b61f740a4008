//! The served OpenAPI document against a live infergate and a real Triton: schemathesis
//! (pinned, from PyPI) generates requests from it, valid and invalid, for every operation, and
//! not one may get a 5xx. Its settings (tests/schemathesis/schemathesis.toml) steer model and
//! input names towards real ones so requests get past 404 into validation and Triton.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// The operations left out of the run (see below).
const CONTROL: &str = "^/v2/repository/models/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let venv = Command::new(repo().join("scripts/install-schemathesis.sh"))
        .output()
        .expect("run scripts/install-schemathesis.sh");
    assert!(
        venv.status.success(),
        "{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let venv = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let gw = gateway().await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", gw.http_base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let url = format!("{}/openapi.json", gw.http_base());
    let args = [
        "--config-file",
        repo()
            .join("tests/schemathesis/schemathesis.toml")
            .to_str()
            .unwrap(),
        "run",
        &url,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "40",
        "--workers",
        "2",
        "--request-timeout",
        "10",
        "--seed",
        "20261123",
        // Model load and unload act on the Triton every other test shares: fuzzing them
        // would unload its models under those tests. tests/fleet.rs covers them.
        "--exclude-path-regex",
        CONTROL,
        "--no-color",
    ]
    .map(str::to_string);
    let run = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("600")
            .arg(format!("{venv}/bin/schemathesis"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let summary = out
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("{summary}");
    assert!(run.status.success(), "schemathesis failed:\n{out}");
    // It really ran: every operation tested and a few hundred cases generated.
    let cases: u64 = summary
        .lines()
        .find_map(|l| l.trim().strip_suffix(" passed"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(cases >= 300, "too few cases ran:\n{summary}");
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| !path.starts_with("/v2/repository/models/"))
        .map(|(_, p)| p.as_object().unwrap().len())
        .sum();
    assert!(operations >= 30, "{operations} operations in the document");
    assert!(
        summary.contains(&format!("Tested: {operations}")),
        "every one of the {operations} operations: {summary}"
    );
}
