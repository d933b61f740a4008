//! The `infergate` binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use infergate::{
    config::{Config, ServeArgs},
    server::{Gateway, run_workers, shutdown_signal},
    telemetry,
};

// glibc malloc took a large share of the gateway's CPU on the task path (perf profiles):
// every request allocates many small short-lived buffers, often freed on another runtime thread,
// which glibc serves under arena locks and jemalloc from per-thread caches.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "infergate",
    version,
    about = "gRPC/HTTP front end for NVIDIA Triton (Open Inference Protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Open Inference Protocol on gRPC and HTTP in front of Triton.
    Serve(ServeArgs),
    /// Run async task workers only (needs a shared broker, e.g. --broker redis://...).
    Worker(ServeArgs),
    /// Print the settings `serve` would run with (files, environment and flags merged, API
    /// keys redacted) as TOML, after checking them; exit code 2 when they are refused.
    Config(ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, worker, print) = match cli.command {
        Command::Serve(args) => (args, false, false),
        Command::Worker(args) => (args, true, false),
        Command::Config(args) => (args, false, true),
    };
    let cfg = match Config::load(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("infergate: {e}");
            return ExitCode::from(2);
        }
    };
    if print {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("infergate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        // The OTLP exporter's channel lives on this runtime.
        let telemetry = telemetry::init(&cfg.log, &cfg.telemetry)?;
        let served = if worker {
            run_workers(cfg, shutdown_signal()).await
        } else {
            match Gateway::bind(cfg).await {
                Ok(gw) => gw.run(shutdown_signal()).await,
                Err(e) => Err(e),
            }
        };
        telemetry.shutdown();
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "infergate failed");
            eprintln!("infergate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
