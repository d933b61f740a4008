//! Choosing a call's endpoint among those that can take it.
//!
//! Peak-EWMA with two random choices (the balancer of Finagle and Linkerd): each endpoint
//! keeps a moving average of its calls' latency that forgets over `ewma_decay_ms`, and a peak
//! that jumps to a slower call at once and fades back to the average ten times faster; a call
//! draws two endpoints and goes to the one whose latency (the higher of the two) times its
//! calls in flight (plus this one) is lower. (Finagle's single average jumps to the peak and
//! forgets it over the whole decay: a stall on the gateway's side, which lands on whichever
//! endpoints had calls out, then steers calls for seconds.) A slow or queueing server is
//! avoided within a call or two, with no central state and no herd onto one "best" server.
//! An endpoint that gets no calls looks cheaper as its average decays, so a recovered one is
//! tried again.
//!
//! Latencies within a factor of [`TIE`] of each other count as equal, and then the one with
//! fewer calls in flight wins (the first drawn, on a tie): among identical servers, latency
//! differences are the host's noise, and taken at face value they send most calls to
//! whichever server had the quietest last seconds. A server twice as slow or more is weighed
//! by its latency as above.
//!
//! Slow start: an endpoint that became ready less than `slow_start_ms` ago has a weight that
//! ramps from 10 % to 1 over the window, and keeps a call it won only with the probability
//! of its weight over the other choice's (which takes the call otherwise), so a cold server's
//! share grows instead of jumping. Endpoints that became ready together (a pool starting)
//! hand nothing to each other.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::spread::{below, draw};

/// The least share a server in slow start keeps.
const MIN_WEIGHT: f64 = 0.1;

/// How many times slower one of the two must be before latency counts (below it, the calls
/// in flight alone decide).
pub const TIE: f64 = 2.0;

/// How many times faster a peak fades than the average forgets (with the default 10 s decay,
/// a peak fades over 1 s).
const PEAK_FADE: u32 = 10;

/// The first calls after an endpoint becomes ready are its warm-up: averaged plainly, each
/// weighing the same (a time-weighted average would keep the first, cold, slow call for a
/// whole decay), and meanwhile the endpoint is taken for as fast as the other choice, so calls
/// in flight decide (one cold call would otherwise keep it from the calls that warm it).
const WARM_UP: u32 = 32;

/// One endpoint's latency average and when it became ready.
#[derive(Debug)]
pub struct Load {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Seconds: the moving average of the calls' latency; 0 until the first call answers.
    mean: f64,
    /// Seconds, at least `mean`: jumps to a slower call at once, then fades back to `mean`.
    peak: f64,
    /// Calls in `mean` since it became ready, up to [`WARM_UP`].
    samples: u32,
    /// When they were last fed.
    fed: Instant,
    /// When the endpoint last became ready (slow start counts from here).
    ready_since: Option<Instant>,
}

impl Inner {
    /// The average and the peak as of `now` (the peak faded towards the average).
    fn at(&self, now: Instant, decay: Duration) -> (f64, f64) {
        let age = now.saturating_duration_since(self.fed);
        let fade = weight_of_old(age, decay / PEAK_FADE);
        (self.mean, self.mean + (self.peak - self.mean) * fade)
    }
}

impl Default for Load {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                mean: 0.0,
                peak: 0.0,
                samples: 0,
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
        let (mean, peak) = s.at(now, decay);
        s.mean = if s.samples < WARM_UP {
            s.samples += 1;
            mean + (sample - mean) / f64::from(s.samples)
        } else {
            let w = weight_of_old(now.saturating_duration_since(s.fed), decay);
            mean * w + sample * (1.0 - w)
        };
        // Peak: a slower call counts at once.
        s.peak = peak.max(sample).max(s.mean);
        s.fed = now;
    }

    /// A call failed for the endpoint's own reasons (down, broken, out of time). Failing fast
    /// must not make it look cheap, or a broken server would draw the calls: a failure counts
    /// as a peak of what it took, and feeds no fast sample to the average. Keeping calls away
    /// from it is its circuit's part ([`crate::breaker`]), which half-opens to probe it.
    pub fn failed(&self, took: Duration, now: Instant, decay: Duration) {
        let mut s = self.inner.lock().expect("load lock");
        let (mean, peak) = s.at(now, decay);
        let idle = weight_of_old(now.saturating_duration_since(s.fed), decay);
        s.mean = mean * idle;
        s.peak = (peak * idle).max(took.as_secs_f64()).max(s.mean);
        s.fed = now;
        // Failing, it is measured: not taken for as fast as the others any more.
        s.samples = WARM_UP;
    }

    /// The latency the balancer sees as of `now`: the higher of the average and the fading
    /// peak, decayed towards 0 for the time no call fed them (so an idle endpoint is tried
    /// again); 0 (not yet measured) during the warm-up.
    pub fn latency(&self, now: Instant, decay: Duration) -> f64 {
        let s = self.inner.lock().expect("load lock");
        if s.samples < WARM_UP {
            return 0.0;
        }
        let (mean, peak) = s.at(now, decay);
        mean.max(peak) * weight_of_old(now.saturating_duration_since(s.fed), decay)
    }

    /// The endpoint became ready (again): slow start and the warm-up begin.
    pub fn became_ready(&self, now: Instant) {
        let mut s = self.inner.lock().expect("load lock");
        s.ready_since = Some(now);
        s.samples = 0;
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
    /// What one more call would cost here, at `latency` (its own, or the other candidate's
    /// while it has none).
    fn cost(&self, latency: f64) -> f64 {
        latency.max(1e-6) * (self.in_flight + 1) as f64
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
    // An endpoint not yet measured (just added) is taken to be as fast as the other: its
    // calls in flight decide. Taken for free, it would draw every call until its first
    // answer, and a cold server flooded so answers slowly and keeps that peak for long.
    let (la, lb) = if ca.latency == 0.0 {
        (cb.latency, cb.latency)
    } else if cb.latency == 0.0 {
        (ca.latency, ca.latency)
    } else {
        (ca.latency, cb.latency)
    };
    let a_wins = if la < lb * TIE && lb < la * TIE {
        ca.in_flight <= cb.in_flight
    } else {
        ca.cost(la) <= cb.cost(lb)
    };
    let (win, lose, w) = if a_wins {
        (a, b, ca.weight / ca.weight.max(cb.weight))
    } else {
        (b, a, cb.weight / ca.weight.max(cb.weight))
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

    /// A load warmed up by [`WARM_UP`] calls of `ms` at `t0`.
    fn warm(ms: u64, t0: Instant) -> Load {
        let l = Load::default();
        for _ in 0..WARM_UP {
            l.observe(Duration::from_millis(ms), t0, DECAY);
        }
        l
    }

    #[test]
    fn a_slow_call_counts_at_once_and_fades_faster_than_the_average() {
        let ms = |x: f64| x / 1e3;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let t0 = Instant::now();
        // Warming up: not yet measured, whatever the first calls took; they are averaged
        // plainly, so a cold first call weighs one in 32.
        let l = Load::default();
        l.observe(Duration::from_millis(50), t0, DECAY);
        for _ in 1..WARM_UP - 1 {
            l.observe(Duration::from_millis(2), t0, DECAY);
        }
        assert_eq!(l.latency(t0, DECAY), 0.0);
        l.observe(Duration::from_millis(2), t0 + DECAY / 100, DECAY);
        let mean = l.inner.lock().unwrap().mean;
        assert!(close(mean, ms(2.0 + 48.0 / f64::from(WARM_UP))), "{mean}");

        let l = warm(2, t0);
        assert!(close(l.latency(t0, DECAY), ms(2.0)));
        // Peak: one 50 ms call and the latency seen is 50 ms at once.
        l.observe(Duration::from_millis(50), t0, DECAY);
        assert!(close(l.latency(t0, DECAY), ms(50.0)));
        // The peak fades over a tenth of the decay, towards the average (still 2 ms: a sample
        // at the same instant weighs nothing in a time-weighted average).
        let t1 = t0 + DECAY / PEAK_FADE;
        let peak = ms(2.0) + ms(48.0) / std::f64::consts::E;
        let idle = (-0.1f64).exp();
        assert!(
            close(l.latency(t1, DECAY), peak * idle),
            "{}",
            l.latency(t1, DECAY)
        );
        // A server that turned slow is seen slow at once and stays so: each slow call renews
        // the peak, and meanwhile the average moves most of the way over one decay.
        let l = warm(2, t0);
        for i in 1..=1000 {
            l.observe(Duration::from_millis(10), t0 + DECAY * i / 1000, DECAY);
        }
        let avg = l.latency(t0 + DECAY, DECAY);
        assert!(close(avg, ms(10.0)), "{avg}");
        let mean = l.inner.lock().unwrap().mean;
        let want = ms(2.0) / std::f64::consts::E + ms(10.0) * (1.0 - 1.0 / std::f64::consts::E);
        assert!((mean - want).abs() < ms(0.1), "{mean} {want}");
        // Unfed, it decays toward 0: an idle endpoint is tried again.
        let idle = l.latency(t0 + DECAY * 7, DECAY);
        assert!(idle < avg / 100.0, "{idle}");
        // A fast failure does not make it look faster; a slow one counts as a peak.
        let t2 = t0 + DECAY * 7;
        l.failed(Duration::from_nanos(1), t2, DECAY);
        assert!((l.latency(t2, DECAY) - idle).abs() < 1e-12);
        l.failed(Duration::from_millis(30), t2, DECAY);
        assert!(close(l.latency(t2, DECAY), ms(30.0)));
        // A failure ends the warm-up: a failing new server is not taken for a fast one.
        let l = Load::default();
        l.failed(Duration::from_millis(30), t0, DECAY);
        assert!(close(l.latency(t0, DECAY), ms(30.0)));
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
        // Latencies within a factor of two are a tie: calls in flight decide, and with those
        // equal too the spread stays even (a lingering peak on one server is noise).
        let noisy = count(&at([0.024, 0.038, 0.025], [0; 3]));
        assert!(
            noisy.iter().all(|&k| (850..=1150).contains(&k)),
            "{noisy:?}"
        );
        let fewer = count(&at([0.024, 0.038, 0.025], [2, 1, 2]));
        assert!(fewer[1] > 1800, "{fewer:?}");
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
        // All ramping together (a pool that starts): nothing is handed over, the spread is even.
        let together = |_: usize| Candidate {
            latency: 0.002,
            in_flight: 0,
            weight: 0.3,
        };
        let t = count(&together);
        assert!(t.iter().all(|&k| (850..=1150).contains(&k)), "{t:?}");
        // Not yet measured: as fast as the other one, so calls in flight decide; it does not
        // draw every call.
        let new = count(&at([0.002, 0.002, 0.0], [0, 0, 0]));
        assert!(new.iter().all(|&k| (850..=1150).contains(&k)), "{new:?}");
        let new_busy = count(&at([0.002, 0.002, 0.0], [0, 0, 3]));
        assert_eq!(new_busy[2], 0, "{new_busy:?}");
    }
}
