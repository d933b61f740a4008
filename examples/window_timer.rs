//! Benchmark, not part of infergate: how late a batching window ends, and what the wait costs
//! in CPU, with three ways to wait, on the two kinds of runtime infergate runs its batching
//! actors on (a serving thread's current-thread runtime, the main multi-thread one), with the
//! host idle and with every core busy (one spinning process per core, started here).
//! - `tokio`: `tokio::time::sleep` (millisecond wheel);
//! - `timerfd`: `infergate::batch::timer::WindowTimer::without_finish` (the timerfd alone);
//! - `timerfd+finish`: `WindowTimer::new` (what the batcher uses: armed early by the lateness
//!   it has seen, then yielding until the deadline);
//! - `spin`: tokio's sleep to 1 ms before the end, then yielding until the deadline.
//!
//! Prints one markdown row per cell: median and p99 overshoot past the deadline, and the
//! process's CPU time per wait.
//!
//!     cargo run --release --example window_timer [-- SECONDS_PER_CELL]

use std::{
    process::{Child, Command},
    time::{Duration, Instant},
};

use infergate::batch::timer::WindowTimer;

#[derive(Clone, Copy)]
enum Way {
    Tokio,
    Timerfd,
    Finish,
    Spin,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Tokio => "tokio",
            Way::Timerfd => "timerfd",
            Way::Finish => "timerfd+finish",
            Way::Spin => "spin",
        }
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

async fn cell(way: Way, window: Duration, seconds: f64) -> (Duration, Duration, Duration, usize) {
    let n = ((seconds / window.as_secs_f64()) as usize).clamp(20, 2_000);
    let mut timer = match way {
        Way::Finish => WindowTimer::new(),
        _ => WindowTimer::without_finish(),
    };
    let mut late = Vec::with_capacity(n);
    let cpu0 = cpu_time();
    for _ in 0..n {
        let deadline = Instant::now() + window;
        match way {
            Way::Tokio => tokio::time::sleep_until(deadline.into()).await,
            Way::Timerfd | Way::Finish => timer.sleep_until(deadline).await,
            Way::Spin => {
                let coarse = window.saturating_sub(Duration::from_millis(1));
                if !coarse.is_zero() {
                    tokio::time::sleep(coarse).await;
                }
                while Instant::now() < deadline {
                    tokio::task::yield_now().await;
                }
            }
        }
        late.push(Instant::now().saturating_duration_since(deadline));
    }
    let cpu = (cpu_time() - cpu0) / n as u32;
    late.sort();
    (late[n / 2], late[n * 99 / 100], cpu, n)
}

fn burners() -> Vec<Child> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..cores)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("start a busy loop")
        })
        .collect()
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let windows = [50, 100, 300, 1_000, 3_000, 10_000].map(Duration::from_micros);
    println!(
        "| host | runtime | way | window µs | waits | median late µs | p99 late µs | CPU µs/wait |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for load in [false, true] {
        let mut busy = if load { burners() } else { Vec::new() };
        for multi in [false, true] {
            let rt = if multi {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            }
            .expect("runtime");
            for window in windows {
                for way in [Way::Tokio, Way::Timerfd, Way::Finish, Way::Spin] {
                    let (p50, p99, cpu, n) = rt.block_on(cell(way, window, seconds));
                    println!(
                        "| {} | {} | {} | {} | {n} | {:.0} | {:.0} | {:.1} |",
                        if load { "all cores busy" } else { "idle" },
                        if multi {
                            "multi-thread"
                        } else {
                            "current-thread"
                        },
                        way.name(),
                        window.as_micros(),
                        p50.as_secs_f64() * 1e6,
                        p99.as_secs_f64() * 1e6,
                        cpu.as_secs_f64() * 1e6,
                    );
                }
            }
        }
        for b in &mut busy {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}
