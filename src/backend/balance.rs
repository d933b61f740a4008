//! Choosing a call's endpoint among those that can take it.
//!
//! Peak-EWMA with two random choices (the balancer of Finagle and Linkerd): each endpoint
//! keeps a moving average of its calls' latency that jumps to a slower call at once and
//! forgets over `ewma_decay_ms`; a call draws two endpoints and goes to the one whose
//! average times its calls in flight (plus this one) is lower. A slow or queueing server is
//! avoided within a call or two, with no central state and no herd onto one "best" server.
//! An endpoint that gets no calls looks cheaper as its average decays, so a recovered one is
//! tried again.
//!
//! Slow start: an endpoint that became ready less than `slow_start_ms` ago keeps a call it
//! won only with a probability that ramps from 10 % to 1 over the window (the other choice
//! takes it otherwise), so a cold server's share grows instead of jumping.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::spread::{below, draw};

/// The least share a server in slow start keeps.
const MIN_WEIGHT: f64 = 0.1;

/// One endpoint's latency average and when it became ready.
#[derive(Debug)]
pub struct Load {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Seconds; 0 until the first call answers.
    ewma: f64,
    /// When `ewma` was last fed.
    fed: Instant,
    /// When the endpoint last became ready (slow start counts from here).
    ready_since: Option<Instant>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                ewma: 0.0,
                fed: Instant::now(),
                ready_since: None,
            }),
        }
    }
}

impl Load {
    /// A call answered after `took`.
    pub fn observe(&self, took: Duration, now: Instant, decay: Duration) {
        let mut s = self.inner.lock().expect("load lock");
        let sample = took.as_secs_f64();
        if sample > s.ewma {
            // Peak: a slower call counts at once.
            s.ewma = sample;
        } else {
            let w = weight_of_old(now.saturating_duration_since(s.fed), decay);
            s.ewma = s.ewma * w + sample * (1.0 - w);
        }
        s.fed = now;
    }

    /// A call failed for the endpoint's own reasons (down, broken, out of time). Failing fast
    /// must not make it look cheap, or a broken server would draw the calls: a failure counts
    /// as a call as slow as the average now (or as it took, if slower). Keeping calls away
    /// from it is its circuit's part ([`crate::breaker`]), which half-opens to probe it.
    pub fn failed(&self, took: Duration, now: Instant, decay: Duration) {
        let mut s = self.inner.lock().expect("load lock");
        let now_worth = s.ewma * weight_of_old(now.saturating_duration_since(s.fed), decay);
        s.ewma = now_worth.max(took.as_secs_f64());
        s.fed = now;
    }

    /// The latency average as of `now`: decayed towards 0 for the time no call fed it.
    pub fn latency(&self, now: Instant, decay: Duration) -> f64 {
        let s = self.inner.lock().expect("load lock");
        s.ewma * weight_of_old(now.saturating_duration_since(s.fed), decay)
    }

    /// The endpoint became ready (again): slow start begins.
    pub fn became_ready(&self, now: Instant) {
        self.inner.lock().expect("load lock").ready_since = Some(now);
    }

    /// The share of its calls the endpoint keeps now: 1 outside slow start.
    pub fn weight(&self, now: Instant, window: Duration) -> f64 {
        let s = self.inner.lock().expect("load lock");
        match s.ready_since {
            Some(since) if !window.is_zero() => {
                let ramp =
                    now.saturating_duration_since(since).as_secs_f64() / window.as_secs_f64();
                ramp.clamp(MIN_WEIGHT, 1.0)
            }
            _ => 1.0,
        }
    }
}

/// How much of the old average is left after `age`: e^(-age/decay).
fn weight_of_old(age: Duration, decay: Duration) -> f64 {
    (-age.as_secs_f64() / decay.as_secs_f64()).exp()
}

/// One candidate: its latency average, calls in flight and slow-start weight.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub latency: f64,
    pub in_flight: usize,
    pub weight: f64,
}

impl Candidate {
    /// What one more call would cost here. An endpoint not yet measured costs as little as
    /// the floor, so its calls in flight alone decide until it is.
    fn cost(&self) -> f64 {
        self.latency.max(1e-6) * (self.in_flight + 1) as f64
    }
}

/// Peak-EWMA's choice among `n` candidates (`n` > 0) that `at` describes: the index of the
/// cheaper of two drawn at random, unless slow start hands its call to the other.
pub fn two_choices(n: usize, at: impl Fn(usize) -> Candidate) -> usize {
    if n == 1 {
        return 0;
    }
    let a = below(n);
    // A second, different one: uniform over the others.
    let b = (a + 1 + below(n - 1)) % n;
    let (ca, cb) = (at(a), at(b));
    let (win, lose, w) = if ca.cost() <= cb.cost() {
        (a, b, ca.weight)
    } else {
        (b, a, cb.weight)
    };
    if w < 1.0 && unit() >= w { lose } else { win }
}

/// A uniform draw in [0, 1).
fn unit() -> f64 {
    (draw() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn a_slow_call_counts_at_once_and_fades_over_the_decay() {
        let l = Load::default();
        let t0 = Instant::now();
        l.observe(Duration::from_millis(2), t0, DECAY);
        assert!((l.latency(t0, DECAY) - 0.002).abs() < 1e-9);
        // Peak: one 50 ms call and the average is 50 ms.
        l.observe(Duration::from_millis(50), t0, DECAY);
        assert!((l.latency(t0, DECAY) - 0.050).abs() < 1e-9);
        // Fast calls pull it back down as they come, by how long since the last.
        l.observe(Duration::from_millis(2), t0 + DECAY, DECAY);
        let after = l.latency(t0 + DECAY, DECAY);
        let want = 0.050 / std::f64::consts::E + 0.002 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((after - want).abs() < 1e-9, "{after} {want}");
        // Unfed, it decays toward 0: an idle endpoint is tried again.
        let idle = l.latency(t0 + DECAY * 6, DECAY);
        assert!(idle < after / 100.0, "{idle}");
        // A fast failure does not make it look faster.
        let t1 = t0 + DECAY * 6;
        l.failed(Duration::from_nanos(1), t1, DECAY);
        assert!((l.latency(t1, DECAY) - idle).abs() < 1e-12);
        l.failed(Duration::from_millis(30), t1, DECAY);
        assert!((l.latency(t1, DECAY) - 0.030).abs() < 1e-12);
    }

    #[test]
    fn slow_start_ramps_from_a_tenth_to_all() {
        let l = Load::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert_eq!(l.weight(t0, w), 1.0, "never became ready: no ramp");
        l.became_ready(t0);
        assert_eq!(l.weight(t0, w), MIN_WEIGHT);
        assert!((l.weight(t0 + Duration::from_secs(5), w) - 0.5).abs() < 1e-9);
        assert_eq!(l.weight(t0 + Duration::from_secs(11), w), 1.0);
        assert_eq!(l.weight(t0, Duration::ZERO), 1.0, "off");
    }

    #[test]
    fn two_choices_avoid_the_slow_and_the_busy_and_spread_the_rest() {
        let at = |lat: [f64; 3], busy: [usize; 3]| {
            move |i: usize| Candidate {
                latency: lat[i],
                in_flight: busy[i],
                weight: 1.0,
            }
        };
        let count = |f: &dyn Fn(usize) -> Candidate| {
            let mut per = [0usize; 3];
            for _ in 0..3000 {
                per[two_choices(3, f)] += 1;
            }
            per
        };
        // Equal: even.
        let even = count(&at([0.002; 3], [0; 3]));
        assert!(even.iter().all(|&k| (850..=1150).contains(&k)), "{even:?}");
        // One ten times slower: it wins only a pair it is not in, never.
        let slow = count(&at([0.002, 0.002, 0.020], [0; 3]));
        assert_eq!(slow[2], 0, "{slow:?}");
        // Fast but with many calls in flight: it loses to the idle ones.
        let busy = count(&at([0.002; 3], [20, 0, 0]));
        assert_eq!(busy[0], 0, "{busy:?}");
        // In slow start at a weight of 0.2, a newcomer keeps about a fifth of what it wins.
        let ramp = |i: usize| Candidate {
            latency: 0.002,
            in_flight: 0,
            weight: if i == 2 { 0.2 } else { 1.0 },
        };
        let r = count(&ramp);
        assert!((100..=320).contains(&r[2]), "{r:?}");
    }
}
