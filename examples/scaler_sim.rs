//! A day of demand through four autoscaling policies, on the scaler's own decision code
//! (`infergate::scaler::Policy`): queue depth only (KEDA's default queue scaler), HPA on CPU,
//! infergate's tiers 1 and 2 alone, and its three tiers. Prints a table and writes a picture (HTML with an SVG).
//!
//!     cargo run --release --example scaler_sim -- [SEED] [OUT.html]
//!
//! The model, per second of one day:
//! - demand: a diurnal curve (30 req/s at night, about 200 at 14:00) plus 8 bursts of
//!   +150 req/s lasting 5 to 20 minutes at random times (xorshift, seeded); 70 % sync calls,
//!   30 % tasks;
//! - a GPU pod serves 25 req/s (0.2 s each, so 5 calls at once) and is ready 180 s after it
//!   is asked for (node and model load); sync calls go first, tasks take what is left;
//! - every policy is polled every 15 s, scales up at once, and scales down only to the
//!   highest ask of the last 300 s (HPA's stabilization window); 1 to 20 pods;
//! - a sync call waiting over 1 s, or a task over 30 s, misses its SLO.

use std::collections::VecDeque;

use infergate::scaler::{Demand, Peak, Policy};

const DAY: u64 = 86_400;
const POD_RPS: f64 = 25.0;
const SERVICE_S: f64 = 0.2;
const COLD_START: u64 = 180;
const POLL: u64 = 15;
const STABILIZE: u64 = 300;
const MIN: u32 = 1;
const MAX: u32 = 20;
const SYNC_SHARE: f64 = 0.7;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Requests per second at each second of the day.
fn demand(seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed.max(1));
    let bursts: Vec<(u64, u64)> = (0..8)
        .map(|_| {
            let start = (rng.next() * (DAY - 1_200) as f64) as u64;
            (start, start + 300 + (rng.next() * 900.0) as u64)
        })
        .collect();
    (0..DAY)
        .map(|t| {
            let h = t as f64 / 3600.0;
            let day = if (6.0..22.0).contains(&h) {
                (std::f64::consts::PI * (h - 6.0) / 16.0).sin().powi(2)
            } else {
                0.0
            };
            let burst = bursts.iter().filter(|(a, b)| (*a..*b).contains(&t)).count() as f64;
            30.0 + 170.0 * day + 150.0 * burst
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    QueueOnly,
    CpuHpa,
    /// Tiers 1 and 2 alone (no baseline): what the baseline adds.
    Reactive,
    Tiers,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::QueueOnly => "queue depth only",
            Self::CpuHpa => "HPA on CPU (70 %)",
            Self::Reactive => "tiers 1 + 2 (no baseline)",
            Self::Tiers => "three tiers",
        }
    }
}

/// FIFO of (arrival second, requests) of one class.
#[derive(Default)]
struct Backlog {
    q: VecDeque<(u64, f64)>,
    len: f64,
}

impl Backlog {
    fn add(&mut self, t: u64, n: f64) {
        if n > 0.0 {
            self.q.push_back((t, n));
            self.len += n;
        }
    }
    /// Serves up to `cap`; counts what waited past `slo`. Answers what was served.
    fn serve(&mut self, now: u64, mut cap: f64, slo: u64, late: &mut f64) -> f64 {
        let mut served = 0.0;
        while cap > 1e-9 {
            let Some(front) = self.q.front_mut() else {
                break;
            };
            let n = front.1.min(cap);
            if now - front.0 > slo {
                *late += n;
            }
            front.1 -= n;
            cap -= n;
            served += n;
            self.len -= n;
            if front.1 <= 1e-9 {
                self.q.pop_front();
            }
        }
        served
    }
}

struct Run {
    gpu_hours: f64,
    late_sync: f64,
    late_tasks: f64,
    total: f64,
    events: u32,
    /// Ready pods, sampled every minute.
    ready: Vec<u32>,
}

fn simulate(kind: Kind, rate: &[f64]) -> Run {
    let mut policy = Policy {
        min_replicas: MIN,
        max_replicas: MAX,
        capacity_per_replica: POD_RPS * SERVICE_S,
        tasks_per_replica: 100.0,
        horizon_s: 3 * 3600,
        half_life_s: 1800,
    };
    if kind == Kind::Reactive {
        // A peak that counts for no time: the baseline tier never asks.
        policy.horizon_s = 0;
        policy.half_life_s = 1;
    }
    let (mut sync, mut tasks) = (Backlog::default(), Backlog::default());
    let (mut late_sync, mut late_tasks, mut total) = (0.0, 0.0, 0.0);
    // Pods: the second each is (or will be) ready.
    let mut pods: Vec<u64> = vec![0; MIN as usize];
    let mut asks: VecDeque<(u64, u32)> = VecDeque::new();
    let mut peaks: Vec<Peak> = Vec::new();
    let (mut gpu_s, mut events, mut target) = (0.0, 0, MIN);
    let mut last = (0.0, 0.0); // (served, in flight) of the last second
    let mut ready_trace = Vec::new();
    for t in 0..DAY {
        let r = rate[t as usize];
        total += r;
        sync.add(t, r * SYNC_SHARE);
        tasks.add(t, r * (1.0 - SYNC_SHARE));
        let ready = pods.iter().filter(|&&at| at <= t).count() as u32;
        if t % 60 == 0 {
            ready_trace.push(ready);
        }
        if t % POLL == 0 {
            let ask = match kind {
                Kind::QueueOnly => policy
                    .queue_tier(Demand {
                        queued: tasks.len as u64,
                        in_flight: 0,
                    })
                    .clamp(MIN, MAX),
                Kind::CpuHpa => {
                    let util = last.0 / (ready.max(1) as f64 * POD_RPS);
                    let want = (ready as f64 * util / 0.7).ceil() as u32;
                    // HPA's 10 % tolerance: no change for a ratio within it.
                    if (util / 0.7 - 1.0).abs() <= 0.1 {
                        target
                    } else {
                        want.clamp(MIN, MAX)
                    }
                }
                Kind::Tiers | Kind::Reactive => {
                    let d = Demand {
                        queued: tasks.len as u64,
                        in_flight: last.1 as u64,
                    };
                    let at = t - t % 60;
                    let now_ask = policy.asked_now(d);
                    match peaks.iter_mut().find(|p| p.at_s == at) {
                        Some(p) => p.replicas = p.replicas.max(now_ask),
                        None => peaks.push(Peak {
                            at_s: at,
                            replicas: now_ask,
                        }),
                    }
                    let keep = policy.keep_s();
                    peaks.retain(|p| t - p.at_s <= keep);
                    policy.decide(d, &peaks, t).desired
                }
            };
            asks.push_back((t, ask));
            while asks.front().is_some_and(|(at, _)| t - at > STABILIZE) {
                asks.pop_front();
            }
            let down_to = asks.iter().map(|(_, a)| *a).max().unwrap_or(ask);
            let next = if ask > target {
                ask
            } else {
                down_to.min(target)
            };
            if next != target {
                events += 1;
                target = next;
            }
            while pods.len() < target as usize {
                pods.push(t + COLD_START);
            }
            // Pods still starting go first, then the newest ready ones.
            pods.sort_unstable();
            pods.truncate(target as usize);
        }
        gpu_s += pods.len() as f64;
        let cap = ready as f64 * POD_RPS;
        let s = sync.serve(t, cap, 1, &mut late_sync);
        let k = tasks.serve(t, cap - s, 30, &mut late_tasks);
        // Calls inside infergate: those served this second for their 0.2 s, and the sync
        // calls still waiting for a pod.
        last = (s + k, (s + k) * SERVICE_S + sync.len);
    }
    // Whatever is still waiting at midnight missed its SLO.
    late_sync += sync.len;
    late_tasks += tasks.len;
    Run {
        gpu_hours: gpu_s / 3600.0,
        late_sync,
        late_tasks,
        total,
        events,
        ready: ready_trace,
    }
}

fn svg(rate: &[f64], runs: &[(Kind, Run)]) -> String {
    let (w, h) = (1200.0, 420.0);
    let x = |minute: usize| 50.0 + minute as f64 / 1440.0 * (w - 70.0);
    let y = |pods: f64| h - 30.0 - pods / (MAX as f64 + 2.0) * (h - 50.0);
    let line = |pts: Vec<(f64, f64)>, color: &str, width: f64| {
        let p: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" points=\"{}\"/>",
            p.join(" ")
        )
    };
    let need: Vec<(f64, f64)> = (0..1440)
        .map(|m| (x(m), y(rate[m * 60] / POD_RPS)))
        .collect();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    for pods in (0..=MAX).step_by(5) {
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{pods}</text><line x1=\"50\" x2=\"{}\" y1=\"{:.0}\" y2=\"{:.0}\" stroke=\"#ddd\"/>",
            y(pods as f64) + 4.0,
            w - 20.0,
            y(pods as f64),
            y(pods as f64)
        ));
    }
    for hour in (0..=24).step_by(3) {
        out.push_str(&format!(
            "<text x=\"{:.0}\" y=\"{}\">{hour}:00</text>",
            x(hour * 60) - 12.0,
            h - 10.0
        ));
    }
    out.push_str(&line(need, "#999", 3.0));
    let colors = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];
    for (i, (kind, run)) in runs.iter().enumerate() {
        let pts = run
            .ready
            .iter()
            .enumerate()
            .map(|(m, &p)| (x(m), y(p as f64)))
            .collect();
        out.push_str(&line(pts, colors[i], 1.5));
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{}\">{}</text>",
            60 + 190 * i,
            20,
            colors[i],
            kind.name()
        ));
    }
    out.push_str("<text x=\"820\" y=\"20\" fill=\"#999\">demand (pods it needs)</text></svg>");
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(42);
    let out = args.next();
    let rate = demand(seed);
    let runs: Vec<(Kind, Run)> = [Kind::QueueOnly, Kind::CpuHpa, Kind::Reactive, Kind::Tiers]
        .into_iter()
        .map(|k| (k, simulate(k, &rate)))
        .collect();
    let mut table = format!(
        "seed {seed}: {:.2} M requests in the day, peak {:.0} req/s\n\n| policy | GPU-hours | sync over 1 s | tasks over 30 s | missed SLO (share) | scale events |\n|---|---|---|---|---|---|\n",
        runs[0].1.total / 1e6,
        rate.iter().cloned().fold(0.0, f64::max)
    );
    for (kind, r) in &runs {
        table.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.2} % | {} |\n",
            kind.name(),
            r.gpu_hours,
            r.late_sync,
            r.late_tasks,
            100.0 * (r.late_sync + r.late_tasks) / r.total,
            r.events
        ));
    }
    let (q, t) = (&runs[0].1, &runs[3].1);
    table.push_str(&format!(
        "\nthree tiers against queue depth only: {:.2}x the missed requests, {:.2}x the GPU-hours\n",
        (t.late_sync + t.late_tasks) / (q.late_sync + q.late_tasks).max(1.0),
        t.gpu_hours / q.gpu_hours
    ));
    print!("{table}");
    if let Some(path) = out {
        let html = format!(
            "<!doctype html><meta charset=\"utf-8\"><title>infergate autoscaling simulator</title><h1>Ready GPU pods against demand, one day</h1><pre>{table}</pre>{}",
            svg(&rate, &runs)
        );
        std::fs::write(&path, html).expect("write the picture");
        println!("picture: {path}");
    }
}
