//! Typed configuration: the list of sections. Each section is defined beside the feature it
//! configures (`tasks::config`, `cache::config`, …) and names each setting once: its field
//! carries its meaning (the doc comment, which is also its `--help`), its flag, its environment
//! variable and its default. A feature imports only `section`, never this list.
//!
//! Layers: built-in defaults, then TOML files (`--config`, repeatable), then `INFERGATE_*`
//! variables and flags (clap merges those two, flags winning). Each section checks its own
//! values ([`Section::validate`]); [`Config::validate`] runs them all once at start, and a bad
//! value is refused with a message naming the setting.

mod server;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches, parser::ValueSource};
use serde::{Deserialize, Serialize};

pub use crate::{
    auth::{ApiKey, AuthConfig},
    backend::config::TritonConfig,
    batch::config::{BatchMode, BatchingConfig, ModelBatching},
    cache::config::CacheConfig,
    fleet::config::FleetConfig,
    openai::config::OpenAiConfig,
    routes::config::RoutesConfig,
    scaler::config::{MAX_CAPACITY_PER_REPLICA, MAX_REPLICAS, MAX_TASKS_PER_REPLICA, ScalerConfig},
    section::{ConfigError, Section},
    streams::config::StreamsConfig,
    tasks::{
        config::{BrokerUrl, StoreUrl, TasksConfig},
        webhooks::config::WebhooksConfig,
    },
    telemetry::config::{LogConfig, LogFormat, TelemetryConfig},
    tls::{ServerTls, TritonTls},
};
pub use server::{MAX_GRPC_THREADS, ServerConfig};

type Augment = fn(Command) -> Command;

/// Writes [`Config`] from the one list of sections: its fields (flags under each section's
/// `--help` heading), the flags' paths, and a visit of every section.
macro_rules! sections {
    (
        flags { $( $key:ident: $ty:ty, $heading:literal, [$($nested:literal => $nty:ty),*]; )* }
        files only { $( $fkey:ident: $fty:ty; )* }
    ) => {
        /// Every setting. Its defaults are clap's (`section::defaults`), so `Config::default()`,
        /// the file's missing keys and `--help` all read the same attribute.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(
                #[command(flatten, next_help_heading = $heading)]
                pub $key: $ty,
            )*
            $(
                #[arg(skip)]
                pub $fkey: $fty,
            )*
        }

        impl Config {
            /// Each section with flags and the path its flags go to; nested sections first,
            /// so their flags keep their own path.
            fn flag_sections() -> Vec<(&'static str, Augment)> {
                vec![
                    $( $( ($nested, <$nty>::augment_args as Augment), )* )*
                    $( (stringify!($key), <$ty>::augment_args as Augment), )*
                ]
            }

            fn each(
                &self,
                mut f: impl FnMut(&dyn Section) -> Result<(), ConfigError>,
            ) -> Result<(), ConfigError> {
                $( f(&self.$key)?; )*
                $( f(&self.$fkey)?; )*
                Ok(())
            }

            fn each_mut(&mut self, mut f: impl FnMut(&mut dyn Section)) {
                $( f(&mut self.$key); )*
                $( f(&mut self.$fkey); )*
            }
        }
    };
}

sections! {
    flags {
    server: ServerConfig, "Listeners", ["server.tls" => ServerTls];
    triton: TritonConfig, "Triton", ["triton.tls" => TritonTls];
    batching: BatchingConfig, "Batching", [];
    tasks: TasksConfig, "Tasks", [];
    webhooks: WebhooksConfig, "Completion webhooks", [];
    log: LogConfig, "Logs", [];
    telemetry: TelemetryConfig, "Traces", [];
    scaler: ScalerConfig, "Autoscaling (KEDA external scaler)", [];
    routes: RoutesConfig, "Routes", [];
    cache: CacheConfig, "Response cache", [];
    streams: StreamsConfig, "Streams (decoupled models)", [];
    fleet: FleetConfig, "Fleet (model control on every endpoint)", [];
    }
    // Keys and tenants live in files only (a Secret), never on a command line.
    files only {
    auth: AuthConfig;
    openai: OpenAiConfig;
    }
}

impl Default for Config {
    fn default() -> Self {
        crate::section::defaults()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    crate::section::invalid(field, message)
}

/// The command line of `infergate serve` and `infergate worker`: the config files, and every
/// setting of [`Config`] as a flag (with its variable). clap reads them; only the settings a
/// flag or a variable actually gave override the files.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    pub config: Vec<PathBuf>,
    /// Every setting as clap read it: given ones, and defaults for the rest.
    settings: Config,
    /// Flag ids of the settings a flag or a variable gave.
    given: Vec<String>,
}

impl Args for ServeArgs {
    fn augment_args(cmd: Command) -> Command {
        Config::augment_args(
            cmd.arg(
                Arg::new("config")
                    .long("config")
                    .env("INFERGATE_CONFIG")
                    .value_name("FILE")
                    .value_delimiter(',')
                    .action(ArgAction::Append)
                    .value_parser(clap::value_parser!(PathBuf))
                    .help(
                        "TOML config file; repeat to layer several (later files win key by key, \
                         e.g. a ConfigMap file then a Secret file with the broker URLs). \
                         Environment variables and flags override them",
                    ),
            ),
        )
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        // Groups (one per section) report a source too; only settings count.
        let paths = flag_paths();
        let given = m
            .ids()
            .map(|id| id.as_str())
            .filter(|id| paths.contains_key(*id))
            .filter(|id| {
                matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(String::from)
            .collect();
        Ok(Self {
            config: m
                .get_many::<PathBuf>("config")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            settings: Config::from_arg_matches(m)?,
            given,
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// Where each flag's value goes in the config: its section's path and the field (the flag's
/// id), or the id itself where it spells the whole path. Nested sections come first.
fn flag_paths() -> HashMap<String, String> {
    let mut paths = HashMap::new();
    for (section, augment) in Config::flag_sections() {
        for arg in augment(Command::new(section)).get_arguments() {
            let id = arg.get_id().as_str();
            let path = if id.contains('.') {
                id.to_string()
            } else {
                format!("{section}.{id}")
            };
            paths.entry(id.to_string()).or_insert(path);
        }
    }
    paths
}

impl Config {
    /// Defaults → files (in order) → environment/flags, then validation.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut table = Self::file_table(&args.config)?;
        if !args.given.is_empty() {
            let settings = toml::Table::try_from(&args.settings).map_err(|e| {
                invalid("flags", format!("a flag or variable is out of range: {e}"))
            })?;
            let paths = flag_paths();
            for id in &args.given {
                let Some(path) = paths.get(id) else { continue };
                if let Some(value) = lookup(&settings, path) {
                    insert(&mut table, path, value.clone());
                }
            }
        }
        let cfg = Self::from_table(table, &args.config)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_files(&[path.to_path_buf()])
    }

    /// Several TOML files merged table by table, later files winning.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        Self::from_table(Self::file_table(paths)?, paths)
    }

    fn file_table(paths: &[PathBuf]) -> Result<toml::Table, ConfigError> {
        let mut merged = toml::Table::new();
        for path in paths {
            merge(&mut merged, read_table(path)?);
        }
        Ok(merged)
    }

    fn from_table(table: toml::Table, paths: &[PathBuf]) -> Result<Self, ConfigError> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                // Name the file at fault: every key has a default, so the one that does not
                // load on its own holds the bad key or value.
                let culprit = paths.iter().find(|p| {
                    read_table(p).is_ok_and(|t| toml::Value::Table(t).try_into::<Self>().is_err())
                });
                ConfigError::Parse {
                    path: culprit.or(paths.last()).cloned().unwrap_or_default(),
                    message: e.to_string(),
                }
            })
    }

    /// Every section's checks, in the order they are listed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.each(|s| s.validate())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }

    pub fn triton_health_interval(&self) -> Duration {
        Duration::from_millis(self.triton.health_interval_ms)
    }

    /// The settings as a TOML file would write them, API keys redacted (`infergate config`).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.each_mut(|s| s.redact());
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let (head, rest) = path.split_once('.').unwrap_or((path, ""));
    let v = table.get(head)?;
    match (rest, v) {
        ("", v) => Some(v),
        (rest, toml::Value::Table(t)) => lookup(t, rest),
        _ => None,
    }
}

fn insert(table: &mut toml::Table, path: &str, value: toml::Value) {
    match path.split_once('.') {
        None => {
            table.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let inner = table
                .entry(head)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !inner.is_table() {
                *inner = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = inner {
                insert(t, rest, value);
            }
        }
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infergate-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().triton.urls, ["http://127.0.0.1:8001"]);
        assert!(Config::default().server.tls().is_none());
    }

    #[test]
    fn flags_override_file_and_repeat_for_urls() {
        let file = temp_dir("cfg").join("c.toml");
        std::fs::write(
            &file,
            "[server]\ngrpc_addr = \"127.0.0.1:9001\"\nmax_request_bytes = 4096\n[triton]\nurls = [\"http://10.0.0.1:8001\"]\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            file.to_str().unwrap(),
            "--triton-url",
            "http://127.0.0.1:1",
            "--triton-url",
            "http://127.0.0.1:2",
            "--grpc-addr",
            "127.0.0.1:9002",
        ]);
        let cfg = Config::load(&cli.serve).unwrap();
        assert_eq!(cfg.server.grpc_addr.port(), 9002);
        assert_eq!(cfg.server.max_request_bytes, 4096, "kept from the file");
        assert_eq!(
            cfg.triton.urls,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
    }

    /// Only what a flag or a variable gave overrides the files: a flag at its default value
    /// still wins over the file, and a flag not given leaves the file's value.
    #[test]
    fn a_flag_at_its_default_value_still_wins_over_the_file() {
        let file = temp_dir("cfg3").join("c.toml");
        std::fs::write(
            &file,
            "[tasks]\nworkers = 3\nredis_prefix = \"blue\"\n[server.tls]\nhandshake_timeout_ms = 5\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--config", file.to_str().unwrap(), "--workers", "1"]);
        let cfg = Config::load(&cli.serve).unwrap();
        assert_eq!(cfg.tasks.workers, 1);
        assert_eq!(cfg.tasks.redis_prefix, "blue");
        // A nested section's own key is kept too, and TLS stays off with no file named.
        assert_eq!(cfg.server.tls.handshake_timeout_ms, 5);
        assert!(cfg.server.tls().is_none());
    }

    #[test]
    fn later_config_files_win_key_by_key() {
        let dir = temp_dir("cfg2");
        let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
        std::fs::write(
            &a,
            "[tasks]\nbroker = \"memory\"\nworkers = 3\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        std::fs::write(
            &b,
            "[tasks]\nbroker = \"redis://10.0.0.2:6379\"\ntask_store = \"redis://10.0.0.2:6379\"\n",
        )
        .unwrap();
        let cfg = Config::from_files(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            cfg.tasks.broker,
            BrokerUrl::Redis("redis://10.0.0.2:6379".into())
        );
        assert_eq!(cfg.tasks.broker.kind(), "redis");
        assert_eq!(cfg.tasks.workers, 3, "kept from the first file");
        assert_eq!(cfg.log.format, LogFormat::Json);
        // A bad key in the first of two files: the error names that file, not the last one.
        std::fs::write(&a, "[tasks]\nbrokr = 1\n").unwrap();
        let err = Config::from_files(&[a.clone(), b]).unwrap_err().to_string();
        assert!(err.contains("brokr"), "{err}");
        assert!(err.contains("a.toml") && !err.contains("b.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut cfg = Config::default();
        cfg.triton.urls = vec!["127.0.0.1:8001".into()];
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("triton.urls"), "{msg}");

        let mut cfg = Config::default();
        cfg.triton.connections_per_endpoint = 0;
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("triton.connections_per_endpoint"), "{msg}");

        let mut cfg = Config::default();
        cfg.telemetry.otlp_endpoint = Some("collector".into());
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("telemetry.otlp_endpoint"), "{msg}");

        let mut cfg = Config::default();
        cfg.server.tls.handshake_timeout_ms = 0;
        cfg.validate()
            .expect("TLS bounds apply only when TLS is on");
        cfg.server.tls.key = Some("/nonexistent/key.pem".into());
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(
            msg.contains("server.tls.cert") && msg.contains("required"),
            "{msg}"
        );

        for (key, value) in [
            ("max_inflight_batches", "0"),
            ("max_inflight_batches", "18446744073709551615"),
            ("max_queue_size", "2000000"),
        ] {
            let cfg: Config =
                toml::from_str(&format!("[batching.models.add_sub]\n{key} = {value}")).unwrap();
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(
                msg.contains("batching.models") && msg.contains(key),
                "{msg}"
            );
            assert!(msg.contains("model 'add_sub'"), "{msg}");
        }

        // Broker and store URLs are parsed when read: a file, a flag or the environment with
        // an unknown scheme is refused there, naming the setting.
        for (text, key) in [
            ("[tasks]\nbroker = \"kafka://x:9092\"", "tasks.broker"),
            ("[tasks]\ntask_store = \"amqp://x\"", "tasks.task_store"),
        ] {
            let err = toml::from_str::<Config>(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = Cli::try_parse_from(["x", "--broker", "kafka://x:9092"])
            .err()
            .expect("an unknown broker scheme on the command line")
            .to_string();
        assert!(err.contains("tasks.broker"), "{err}");
        assert_eq!(
            "amqp://guest:guest@127.0.0.1:5672/%2f"
                .parse::<BrokerUrl>()
                .map(|b| b.kind()),
            Ok("rabbitmq")
        );

        let err = toml::from_str::<Config>("[server]\ngrpc_adr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("grpc_adr"), "{err}");
    }

    /// Each flag lands on the file key of the same setting: given alone, it is the one value
    /// taken from the flags, found at its path in the config, and that path is a key the file
    /// format accepts.
    #[test]
    fn every_flag_sets_the_file_key_of_its_setting() {
        let cmd = ServeArgs::augment_args(Command::new("serve"));
        let paths = flag_paths();
        let mut checked = 0;
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "config") {
            let id = arg.get_id().as_str();
            let long = arg.get_long().expect("every setting has a long flag");
            let sample = arg
                .get_possible_values()
                .first()
                .map(|v| v.get_name().to_string())
                .or_else(|| {
                    arg.get_default_values()
                        .first()
                        .map(|v| v.to_string_lossy().into())
                })
                .unwrap_or_else(|| {
                    match arg
                        .get_value_names()
                        .and_then(|v| v.first())
                        .map(|v| v.as_str())
                    {
                        Some("URL") => "http://127.0.0.1:4317".into(),
                        Some("ADDR") => "127.0.0.1:9090".into(),
                        Some("FILE") => "/tmp/x.pem".into(),
                        Some("NAME" | "MODEL") => "x".into(),
                        _ => "5".into(),
                    }
                });
            let flag = format!("--{long}");
            let m = cmd
                .clone()
                .try_get_matches_from(["serve", flag.as_str(), sample.as_str()])
                .unwrap_or_else(|e| panic!("{flag} {sample}: {e}"));
            let args = ServeArgs::from_arg_matches(&m).unwrap();
            assert_eq!(args.given, [id], "{flag}");
            let path = paths
                .get(id)
                .unwrap_or_else(|| panic!("{flag}: no path for {id}"));
            let settings = toml::Table::try_from(&args.settings).unwrap();
            let value = lookup(&settings, path)
                .unwrap_or_else(|| panic!("{flag}: {path} is not a key of the config"));
            let mut table = toml::Table::new();
            insert(&mut table, path, value.clone());
            toml::Value::Table(table)
                .try_into::<Config>()
                .unwrap_or_else(|e| panic!("{flag}: {path} as a file key: {e}"));
            checked += 1;
        }
        assert!(checked >= 45, "only {checked} flags checked");
    }
}
