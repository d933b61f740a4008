//! `infergate-load`: a load generator for Open Inference Protocol servers (infergate or Triton
//! itself), over gRPC or HTTP, printing a ghz-like summary and optionally writing ghz-shaped
//! JSON. Only meant for servers you run yourself (loopback, a test cluster).

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use infergate::loadgen::{LoadSpec, Protocol, run};

// The generator shares the machine with what it measures: jemalloc's per-thread caches keep its
// own CPU per request lower than glibc malloc's (same reason as in the gateway's main.rs).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "infergate-load",
    version,
    about = "Load generator for KServe v2 / Triton endpoints"
)]
struct Args {
    /// gRPC target (host:port).
    #[arg(long, conflicts_with = "http", required_unless_present = "http")]
    grpc: Option<String>,
    /// HTTP target (host:port); requests use the binary tensor extension.
    #[arg(long)]
    http: Option<String>,
    /// Model name.
    #[arg(short, long)]
    model: String,
    /// Rows per request (models with a batch dimension).
    #[arg(short, long, default_value_t = 1)]
    batch: i64,
    /// Requests in flight at once (closed loop), or the most outstanding with --rate.
    #[arg(short, long, default_value_t = 8)]
    concurrency: usize,
    /// gRPC connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Measure for this long (e.g. 10s, 500ms).
    #[arg(short = 'z', long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Measure this many requests.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Unmeasured warm-up before the run.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Open loop: requests started per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    timeout: Duration,
    /// Write the summary as JSON (ghz's field names) to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// An integer request parameter sent with every request, e.g. `--param priority=1`
    /// (repeat for several).
    #[arg(long = "param", value_name = "KEY=INT", value_parser = parse_param)]
    params: Vec<(String, i64)>,
    /// Write an HTML report (summary, latency histogram, requests per second) to this file.
    #[arg(long)]
    html: Option<std::path::PathBuf>,
    /// No progress line.
    #[arg(short, long)]
    quiet: bool,
    /// Async-task mode (HTTP only): submit this many tasks at --concurrency, then poll until
    /// all are final; reports completed tasks per second.
    #[arg(long, value_name = "N")]
    tasks: Option<u64>,
    /// Stream mode (gRPC ModelStreamInfer, a decoupled model like `token_stream`): each of
    /// --concurrency streams sends requests of this many responses, one after another;
    /// reports time to first response and the gaps between responses.
    #[arg(long, value_name = "RESPONSES")]
    stream_tokens: Option<i32>,
    /// Stream mode: the model's delay between responses (its `delay_ms` input).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    stream_delay_ms: i32,
    /// Stream mode: open --concurrency idle streams (each waits on a response), hold them
    /// this long, then close them.
    #[arg(long, value_parser = parse_duration)]
    stream_hold: Option<Duration>,
    /// Stream mode: each request on a ModelStreamInfer call of its own (how infergate sends
    /// them to Triton; a reference for its benchmark).
    #[arg(long)]
    stream_per_request: bool,
}

fn parse_param(s: &str) -> Result<(String, i64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=INT"))?;
    let v = v
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': the value must be an integer"))?;
    Ok((k.trim().to_string(), v))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 10s or 500ms"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("'{s}': unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run_title = format!(
        "infergate-load: {} {} model {} batch {} concurrency {}{}",
        if a.grpc.is_some() { "gRPC" } else { "HTTP" },
        a.grpc.as_deref().or(a.http.as_deref()).unwrap_or(""),
        a.model,
        a.batch,
        a.concurrency,
        a.rate.map(|r| format!(" rate {r}/s")).unwrap_or_default(),
    );
    let (protocol, target) = match (a.grpc, a.http) {
        (Some(g), _) => (Protocol::Grpc, g),
        (None, Some(h)) => (Protocol::Http, h),
        (None, None) => unreachable!("clap requires one"),
    };
    let spec = LoadSpec {
        protocol,
        target,
        model: a.model,
        batch: a.batch.max(1),
        concurrency: a.concurrency.max(1),
        connections: a.connections.max(1),
        duration: a.duration.or(if a.requests.is_none() {
            Some(Duration::from_secs(10))
        } else {
            None
        }),
        requests: a.requests,
        warmup: a.warmup,
        rate: a.rate,
        timeout: a.timeout,
        progress: !a.quiet,
        params: a.params,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if a.stream_tokens.is_some() || a.stream_hold.is_some() {
        let Protocol::Grpc = spec.protocol else {
            eprintln!("infergate-load: stream mode needs --grpc");
            return ExitCode::from(2);
        };
        let s = infergate::loadgen::streams::StreamSpec {
            target: spec.target.clone(),
            model: spec.model.clone(),
            concurrency: spec.concurrency,
            tokens: a.stream_tokens.unwrap_or(2),
            delay_ms: a.stream_delay_ms,
            duration: spec.duration.unwrap_or(Duration::from_secs(10)),
            warmup: spec.warmup,
            hold: a.stream_hold,
            per_request: a.stream_per_request,
        };
        return match rt.block_on(infergate::loadgen::streams::run_streams(&s)) {
            Ok(run) => {
                print!("{}", run.text());
                if let Some(path) = a.json {
                    let text = serde_json::to_string_pretty(&run).expect("run serialises");
                    if let Err(e) = std::fs::write(&path, text) {
                        eprintln!("infergate-load: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                if run.errors > 0 {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("infergate-load: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(n) = a.tasks {
        return match rt.block_on(infergate::loadgen::tasks::run_tasks(&spec, n)) {
            Ok(run) => {
                print!("{}", run.text());
                if let Some(path) = a.json {
                    let text = serde_json::to_string_pretty(&run).expect("run serialises");
                    if let Err(e) = std::fs::write(&path, text) {
                        eprintln!("infergate-load: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                if run.failed > 0 || !run.refused.is_empty() {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("infergate-load: {e}");
                ExitCode::from(2)
            }
        };
    }
    match rt.block_on(run(&spec)) {
        Ok(outcome) => {
            let summary = outcome.summary();
            print!("{}", summary.text());
            let files = [
                a.json.map(|p| {
                    let text = serde_json::to_string_pretty(&summary).expect("summary serialises");
                    (p, text)
                }),
                a.html
                    .map(|p| (p, infergate::loadgen::html::render(&run_title, &summary))),
            ];
            for (path, text) in files.into_iter().flatten() {
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("infergate-load: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infergate-load: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
    }
}
