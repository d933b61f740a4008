//! Load-test results: latency percentiles, status counts and a summary in the shape ghz
//! prints and writes, so reports from either tool read the same way.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

/// Everything one run measured.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Latency of every measured request, nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Count per status ("OK", "Unavailable", "429", ...).
    pub statuses: BTreeMap<String, u64>,
    /// Count per distinct error message (first 200 characters).
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// Completions per whole second since the start of measurement.
    pub per_second: Vec<u64>,
}

/// One bar of the latency histogram, as ghz writes it.
#[derive(Debug, Serialize, PartialEq)]
pub struct Bucket {
    /// Upper edge of the bar, seconds.
    pub mark: f64,
    pub count: u64,
    /// Share of all measured requests.
    pub frequency: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct LatencyPoint {
    pub percentage: u32,
    /// Nanoseconds, as ghz writes durations.
    pub latency: u64,
}

/// The summary, with ghz's JSON field names (durations in nanoseconds).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub count: u64,
    pub total: u64,
    pub average: u64,
    pub fastest: u64,
    pub slowest: u64,
    pub rps: f64,
    pub histogram: Vec<Bucket>,
    pub latency_distribution: Vec<LatencyPoint>,
    pub status_code_distribution: BTreeMap<String, u64>,
    pub error_distribution: BTreeMap<String, u64>,
    /// Completions in each second of the run (not in ghz; used by the HTML report).
    pub per_second: Vec<u64>,
}

pub const PERCENTILES: &[u32] = &[10, 25, 50, 75, 90, 95, 99];

/// Bars of the histogram: equal widths from the fastest to the slowest request.
const BARS: usize = 20;

/// Equal-width buckets over `[first, last]` of sorted latencies (ns).
pub fn histogram(sorted: &[u64]) -> Vec<Bucket> {
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else {
        return Vec::new();
    };
    let width = ((hi - lo) / BARS as u64).max(1);
    let mut counts = vec![0u64; BARS];
    for &v in sorted {
        counts[(((v - lo) / width) as usize).min(BARS - 1)] += 1;
    }
    let n = sorted.len() as f64;
    counts
        .into_iter()
        .enumerate()
        .map(|(i, count)| Bucket {
            mark: (lo + width * (i as u64 + 1)) as f64 / 1e9,
            count,
            frequency: count as f64 / n,
        })
        .collect()
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], pct: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((pct as f64 / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Outcome {
    pub fn summary(&self) -> Summary {
        let mut sorted = self.latencies_ns.clone();
        sorted.sort_unstable();
        let count = self.statuses.values().sum::<u64>();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        Summary {
            count,
            total: self.elapsed.as_nanos() as u64,
            average: if sorted.is_empty() {
                0
            } else {
                (sorted.iter().map(|&x| x as u128).sum::<u128>() / sorted.len() as u128) as u64
            },
            fastest: sorted.first().copied().unwrap_or(0),
            slowest: sorted.last().copied().unwrap_or(0),
            rps: count as f64 / secs,
            histogram: histogram(&sorted),
            latency_distribution: PERCENTILES
                .iter()
                .map(|&p| LatencyPoint {
                    percentage: p,
                    latency: percentile(&sorted, p),
                })
                .collect(),
            status_code_distribution: self.statuses.clone(),
            error_distribution: self.errors.clone(),
            // Whole seconds only: a last, partial second would read as a drop in throughput.
            per_second: {
                let whole = (self.elapsed.as_secs() as usize).max(1);
                self.per_second.iter().copied().take(whole).collect()
            },
        }
    }
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

impl Summary {
    /// The human-readable summary, laid out like ghz's.
    pub fn text(&self) -> String {
        let mut s = String::new();
        s.push_str("Summary:\n");
        s.push_str(&format!("  Count:        {}\n", self.count));
        s.push_str(&format!(
            "  Total:        {:.2} s\n",
            self.total as f64 / 1e9
        ));
        s.push_str(&format!("  Slowest:      {}\n", ms(self.slowest)));
        s.push_str(&format!("  Fastest:      {}\n", ms(self.fastest)));
        s.push_str(&format!("  Average:      {}\n", ms(self.average)));
        s.push_str(&format!("  Requests/sec: {:.2}\n\n", self.rps));
        s.push_str("Latency distribution:\n");
        for p in &self.latency_distribution {
            s.push_str(&format!("  {} % in {}\n", p.percentage, ms(p.latency)));
        }
        s.push_str("\nStatus code distribution:\n");
        for (k, v) in &self.status_code_distribution {
            s.push_str(&format!("  [{k}]   {v} responses\n"));
        }
        if !self.error_distribution.is_empty() {
            s.push_str("\nError distribution:\n");
            for (k, v) in &self.error_distribution {
                s.push_str(&format!("  [{v}]   {k}\n"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[7], 10), 7);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn summary_counts_and_rates() {
        let o = Outcome {
            latencies_ns: vec![3_000_000, 1_000_000, 2_000_000],
            statuses: BTreeMap::from([("OK".into(), 3), ("Unavailable".into(), 1)]),
            elapsed: Duration::from_secs(2),
            ..Default::default()
        };
        let s = o.summary();
        assert_eq!(s.count, 4);
        assert_eq!(s.rps, 2.0);
        assert_eq!(
            (s.fastest, s.slowest, s.average),
            (1_000_000, 3_000_000, 2_000_000)
        );
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["latencyDistribution"].is_array());
        assert_eq!(json["statusCodeDistribution"]["OK"], 3);
        assert!(s.text().contains("Requests/sec: 2.00"));
        assert_eq!(json["histogram"].as_array().unwrap().len(), 20);
        let partial = Outcome {
            elapsed: Duration::from_millis(3_010),
            per_second: vec![10, 11, 12, 1],
            ..Default::default()
        };
        assert_eq!(partial.summary().per_second, vec![10, 11, 12]);
    }

    #[test]
    fn histogram_bars_cover_every_request() {
        let v: Vec<u64> = (0..1000).map(|i| 1_000_000 + i * 1_000).collect();
        let h = histogram(&v);
        assert_eq!(h.len(), 20);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 1000);
        assert!(h.windows(2).all(|w| w[0].mark < w[1].mark));
        assert!((h.iter().map(|b| b.frequency).sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(histogram(&[]).is_empty());
        assert_eq!(
            histogram(&[5, 5, 5]).iter().map(|b| b.count).sum::<u64>(),
            3
        );
    }
}
