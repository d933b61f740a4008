//! The Helm chart and the binary agree. In every mode `scripts/check-helm.sh` renders, each
//! infergate container's environment is parsed the way the pod's `infergate` parses it (every
//! `INFERGATE_*` name must be one infergate reads, every value must parse), the config files it
//! points at (the ConfigMap's `infergate.toml`, the Secret's `tasks.toml`) are taken from the
//! rendered objects, and the whole must load and validate with infergate's own loader, where an
//! unknown key is an error. Values set on the chart must reach the settings they name.
//!
//! Needs the Helm binary that `scripts/check-helm.sh` installs (`scripts/test.sh` runs it first).

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use clap::{Args, FromArgMatches};
use infergate::config::{BatchMode, BrokerUrl, Config, ServeArgs};

fn helm() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    let helm = cache.join("infergate/helm-3.17.2/helm");
    assert!(
        helm.is_file(),
        "{} is missing: run scripts/check-helm.sh (scripts/test.sh runs it before the tests)",
        helm.display()
    );
    helm
}

/// `helm template` of the chart with a values file from `helm/ci` and `--set` overrides.
fn render(values: Option<&str>, set: &[&str]) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cmd = Command::new(helm());
    cmd.args(["template", "rel", &format!("{root}/helm/infergate")])
        .args(["--namespace", "inference", "--kube-version", "1.32.0"])
        .args(["--api-versions", "keda.sh/v1alpha1/ScaledObject"])
        .args(["--api-versions", "keda.sh/v1alpha1/TriggerAuthentication"]);
    if let Some(v) = values {
        cmd.args(["-f", &format!("{root}/helm/ci/{v}")]);
    }
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The block scalar under `key: |` in a rendered document, de-indented.
fn block(doc: &str, key: &str) -> Option<String> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next()?;
    let indent = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let strip = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    Some(
        body.iter()
            .map(|l| l.get(strip..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// `INFERGATE_*` variables of a Deployment, in order: a literal value, or `None` when it
/// comes from a Secret.
fn infergate_env(doc: &str) -> Vec<(String, Option<String>)> {
    let lines: Vec<&str> = doc.lines().map(str::trim).collect();
    let mut env = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_prefix("- name: INFERGATE_") else {
            continue;
        };
        let value = lines
            .get(i + 1)
            .and_then(|v| v.strip_prefix("value: "))
            .map(|v| v.trim_matches('"').to_string());
        env.push((format!("INFERGATE_{name}"), value));
    }
    env
}

/// Each infergate Deployment of a rendering (by name) and the config it would run with.
fn configs(rendered: &str) -> BTreeMap<String, Config> {
    let dir = std::env::temp_dir().join(format!(
        "infergate-helm-{}",
        infergate::tasks::new_task_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let docs: Vec<&str> = rendered.split("\n---").collect();
    let file = |kind: &str, key: &str| {
        let text = docs
            .iter()
            .filter(|d| d.contains(&format!("\nkind: {kind}\n")))
            .find_map(|d| block(d, key))?;
        let path = dir.join(key);
        std::fs::write(&path, text).unwrap();
        Some(path)
    };
    let main = file("ConfigMap", "infergate.toml").expect("the ConfigMap's infergate.toml");
    let secret = file("Secret", "tasks.toml");
    // clap's own view of `infergate serve`: which variable feeds which flag.
    let cli = ServeArgs::augment_args(clap::Command::new("infergate"));
    let flag_of: BTreeMap<String, String> = cli
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((env, format!("--{}", a.get_long()?)))
        })
        .collect();
    let mut out = BTreeMap::new();
    for doc in docs.iter().filter(|d| d.contains("\nkind: Deployment\n")) {
        let env = infergate_env(doc);
        if env.is_empty() {
            continue;
        }
        let name = doc
            .lines()
            .find_map(|l| l.strip_prefix("  name: "))
            .unwrap()
            .to_string();
        let mut argv = vec!["infergate".to_string()];
        for (var, value) in env {
            let flag = flag_of
                .get(&var)
                .unwrap_or_else(|| panic!("{name}: {var} is not a variable infergate reads"));
            let value = match (var.as_str(), value) {
                // The pod's paths, here the files just taken from the rendering.
                ("INFERGATE_CONFIG", Some(v)) => v
                    .split(',')
                    .map(|p| match p {
                        "/etc/infergate/infergate.toml" => main.display().to_string(),
                        "/etc/infergate/secret/tasks.toml" => secret
                            .as_ref()
                            .expect("the Secret's tasks.toml")
                            .display()
                            .to_string(),
                        other => panic!("{name}: unknown config path {other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                (_, Some(v)) => v,
                // From a Secret the user brings: a URL of the kind it names.
                ("INFERGATE_BROKER", None) if doc.contains("name: infergate-rabbitmq") => {
                    "amqp://u:p@rabbitmq:5672/%2f".into()
                }
                ("INFERGATE_WEBHOOK_SECRET", None) => "whsec_MDEyMzQ1Njc4OWFiY2RlZg==".into(),
                (_, None) => "redis://redis:6379/0".into(),
            };
            argv.extend([flag.clone(), value]);
        }
        let matches = cli
            .clone()
            .try_get_matches_from(&argv)
            .unwrap_or_else(|e| panic!("{name}: {argv:?}: {e}"));
        let args = ServeArgs::from_arg_matches(&matches).unwrap();
        let cfg = Config::load(&args).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.insert(name, cfg);
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn every_chart_mode_renders_a_config_infergate_loads() {
    for values in [
        None,
        Some("redis-keda.yaml"),
        Some("rabbitmq-incluster-keda.yaml"),
        Some("rabbitmq-external.yaml"),
        Some("redis-external-url.yaml"),
    ] {
        let cfgs = configs(&render(values, &[]));
        let names: Vec<&str> = cfgs.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["rel-infergate-frontend", "rel-infergate-worker"],
            "{values:?}"
        );
        let (front, workers) = (
            &cfgs["rel-infergate-frontend"],
            &cfgs["rel-infergate-worker"],
        );
        // The frontend only accepts; the workers run tasks; both share one broker and store,
        // which outside the default in-memory mode is a real one.
        assert_eq!((front.tasks.workers, workers.tasks.workers), (0, 1));
        assert_eq!(front.tasks.broker, workers.tasks.broker);
        assert_eq!(front.tasks.task_store, workers.tasks.task_store);
        assert_ne!(
            front.tasks.broker,
            BrokerUrl::Memory,
            "{values:?}: broker {}",
            front.tasks.broker
        );
        // Triton through its pods' headless Service (one endpoint per pod, the name resolved
        // again), or the external URLs the values list.
        let external = values == Some("rabbitmq-external.yaml");
        for cfg in [front, workers] {
            let want: &[&str] = if external {
                &[
                    "http://triton-a.gpu.svc:8001",
                    "http://triton-b.gpu.svc:8001",
                ]
            } else {
                &["http://rel-infergate-triton-pods:8001"]
            };
            assert_eq!(cfg.triton.urls, want, "{values:?}");
            assert_eq!(cfg.triton.connections_per_endpoint, 2, "per pod");
            assert_eq!(cfg.triton.resolve_interval_ms, 5_000);
            assert_eq!(cfg.triton.slow_start_ms, 30_000);
        }
        // values.yaml's defaults, as infergate reads them.
        assert_eq!(front.batching.mode, BatchMode::Adaptive);
        assert_eq!(front.tasks.queue_capacity, 100_000);
        assert_eq!(front.tasks.publish_timeout_ms, 10_000);
        assert_eq!(front.server.grpc_threads, 0);
        assert_eq!(workers.tasks.worker_concurrency, 256);
        // The external scaler where the values turn it on (both KEDA modes of helm/ci).
        let scaled = values.is_some_and(|v| v.ends_with("keda.yaml"));
        assert_eq!(front.scaler.addr.is_some(), scaled, "{values:?}");
        // Completion webhooks where the values list hosts (rabbitmq-external), signed with the
        // Secret's key; the workers, which finish tasks, deliver them.
        let hooks = values == Some("rabbitmq-external.yaml");
        for cfg in [front, workers] {
            assert_eq!(cfg.webhooks.secret.is_some(), hooks, "{values:?}");
            let want: &[&str] = if hooks {
                &["hooks.example.com", "*.partner.example"]
            } else {
                &[]
            };
            assert_eq!(cfg.webhooks.allow_hosts, want, "{values:?}");
        }
    }
}

#[test]
fn chart_values_reach_the_settings_they_name() {
    let cfgs = configs(&render(
        Some("rabbitmq-incluster-keda.yaml"),
        &[
            "config.amqpGroupMax=16",
            "config.publishTimeoutMs=2500",
            "config.queueCapacity=5000",
            "config.batching=off",
            "config.grpcThreads=3",
            "workers.concurrency=32",
            "scaler.port=9191",
            "scaler.capacityPerReplica=12",
            "scaler.baselineHorizonSeconds=600",
            "config.tritonConnectionsPerPod=3",
            "config.tritonResolveIntervalMs=2000",
            "config.tritonSlowStartMs=0",
        ],
    ));
    for cfg in cfgs.values() {
        assert_eq!(cfg.tasks.amqp_group_max, 16);
        assert_eq!(cfg.tasks.publish_timeout_ms, 2_500);
        assert_eq!(cfg.tasks.queue_capacity, 5_000);
        assert_eq!(cfg.batching.mode, BatchMode::Off);
        assert_eq!(cfg.server.grpc_threads, 3);
        // The external scaler's settings (served by the front ends only: `worker` opens no
        // listener for it).
        assert_eq!(cfg.scaler.addr, Some("0.0.0.0:9191".parse().unwrap()));
        assert_eq!(cfg.scaler.capacity_per_replica, 12);
        assert_eq!(cfg.scaler.baseline_horizon_s, 600);
        assert_eq!(cfg.triton.connections_per_endpoint, 3);
        assert_eq!(cfg.triton.resolve_interval_ms, 2_000);
        assert_eq!(cfg.triton.slow_start_ms, 0);
    }
    assert_eq!(cfgs["rel-infergate-worker"].tasks.worker_concurrency, 32);
}

#[test]
fn a_routes_file_is_mounted_read_by_infergate_and_changes_roll_nothing() {
    let rendered = render(Some("routes.yaml"), &[]);
    let cfgs = configs(&rendered);
    for (name, cfg) in &cfgs {
        assert_eq!(
            cfg.routes.file.as_deref(),
            Some(std::path::Path::new("/etc/infergate/routes/routes.toml")),
            "{name}"
        );
        assert_eq!(cfg.routes.watch_ms, 2_000, "{name}");
        // The task store's Redis keeps the cached answers.
        assert_eq!(
            cfg.cache.redis.as_deref(),
            Some("redis://rel-infergate-redis:6379/0")
        );
    }
    // The routes file as mounted, read by infergate's own parser.
    let docs: Vec<&str> = rendered.split("\n---").collect();
    let text = docs
        .iter()
        .filter(|d| d.contains("\nkind: ConfigMap\n") && d.contains("name: rel-infergate-routes"))
        .find_map(|d| block(d, "routes.toml"))
        .expect("the routes ConfigMap");
    let table = infergate::routes::file::parse(&text).expect("the chart's routes file loads");
    assert_eq!(table.routes["add_sub_canary"].targets.len(), 2);
    assert!(table.caches.contains_key("onnx_linear"));
    // Both Deployments mount it.
    for doc in docs
        .iter()
        .filter(|d| d.contains("\nkind: Deployment\n") && d.contains("infergate.toml"))
    {
        assert!(doc.contains("mountPath: /etc/infergate/routes"), "{doc}");
        assert!(doc.contains("name: rel-infergate-routes"), "{doc}");
    }
    // A new weight changes the ConfigMap but not the pods' checksum: the running frontends
    // read it (routes.watchMs), nothing restarts.
    let checksums = |r: &str| -> Vec<String> {
        r.lines()
            .filter_map(|l| l.trim().strip_prefix("checksum/config: "))
            .map(str::to_string)
            .collect()
    };
    let changed = render(
        Some("routes.yaml"),
        &["routes.file=[routes.a]\ntargets = [{ model = \"add_sub\"\\, weight = 1 }]"],
    );
    assert_ne!(rendered, changed);
    assert_eq!(checksums(&rendered), checksums(&changed));
    assert_eq!(checksums(&rendered).len(), 2);
    // Without routes, nothing of them is rendered.
    let plain = render(None, &[]);
    assert!(!plain.contains("rel-infergate-routes"));
    assert!(!plain.contains("/etc/infergate/routes"));
}
