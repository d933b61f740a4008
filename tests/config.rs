//! `infergate config` prints the settings `serve` would run with: the layers (file, then the
//! environment, then flags) are checked here through the binary itself, as a pod's
//! environment and arguments reach it.

use std::process::Command;

fn infergate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infergate"));
    // Nothing from the caller's environment leaks into what is checked.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("INFERGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn file_then_environment_then_flags() {
    let dir = std::env::temp_dir().join(format!("infergate-config-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("infergate.toml");
    std::fs::write(
        &file,
        r#"
[tasks]
workers = 3
worker_concurrency = 8
redis_prefix = "from-file"

[[auth.keys]]
key = "0123456789abcdef-secret"
tenant = "team-a"
"#,
    )
    .unwrap();
    let out = infergate()
        .args([
            "config",
            "--config",
            file.to_str().unwrap(),
            "--workers",
            "1",
        ])
        .env("INFERGATE_WORKERS", "5")
        .env("INFERGATE_WORKER_CONCURRENCY", "16")
        .env("INFERGATE_BROKER", "redis://127.0.0.1:6379")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = toml::from_str(&text).unwrap();
    let tasks = cfg["tasks"].as_table().unwrap();
    // The flag wins over the variable and the file, even at its default value (1).
    assert_eq!(tasks["workers"].as_integer(), Some(1));
    // The variable wins over the file.
    assert_eq!(tasks["worker_concurrency"].as_integer(), Some(16));
    assert_eq!(tasks["broker"].as_str(), Some("redis://127.0.0.1:6379"));
    // The file wins over the default where nothing else spoke.
    assert_eq!(tasks["redis_prefix"].as_str(), Some("from-file"));
    // Keys are never printed.
    assert!(!text.contains("0123456789abcdef-secret"), "{text}");
    assert!(text.contains("team-a"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_refused_setting_exits_2_naming_it() {
    let out = infergate()
        .args(["config"])
        .env("INFERGATE_TRITON_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("triton.connections_per_endpoint"), "{err}");

    let out = infergate()
        .args(["config", "--task-store", "amqp://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tasks.task_store"), "{err}");
}
