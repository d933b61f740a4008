//! A circuit breaker: it opens after N consecutive failures or an error rate over a window,
//! sends nothing for a cool-down, then lets a few probes through (half-open) and closes when
//! they all succeed. One guards each route target (`routes`, where a call slower than the
//! route's SLO counts as a failure) and each model on each Triton endpoint (`backend`).

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    /// Share of failed calls over `window` (with at least `min_calls` in it) that opens it.
    pub error_rate: f64,
    pub window: Duration,
    pub min_calls: u32,
    pub cooldown: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            cooldown: Duration::from_secs(5),
            probes: 3,
        }
    }
}

/// How a call was let through, to be told back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Closed,
    Probe,
    /// Not let through: the caller goes to the fallback (or is refused).
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// The most outcomes the window keeps (a bound on memory under any rate).
const WINDOW_CAP: usize = 4096;

#[derive(Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, passed: u32 },
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    consecutive: u32,
    window: VecDeque<(Instant, bool)>,
    /// The target's recent latency as its callers saw it (queues included): a moving
    /// average, and when it was last fed.
    latency: Option<(Duration, Instant)>,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                consecutive: 0,
                window: VecDeque::new(),
                latency: None,
            }),
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.inner.lock().expect("breaker lock").mode {
            Mode::Closed => State::Closed,
            Mode::Open { until } if now < until => State::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => State::HalfOpen,
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let mut s = self.inner.lock().expect("breaker lock");
        if let Mode::Open { until } = s.mode {
            if now < until {
                return Admit::Open;
            }
            s.mode = Mode::HalfOpen {
                in_flight: 0,
                passed: 0,
            };
        }
        match &mut s.mode {
            Mode::Closed => Admit::Closed,
            Mode::HalfOpen { in_flight, passed } if *in_flight + *passed < self.cfg.probes => {
                *in_flight += 1;
                Admit::Probe
            }
            _ => Admit::Open,
        }
    }

    /// A call let through that will not be told back (its caller went away): its probe
    /// place is freed, and nothing is counted.
    pub fn release(&self, how: Admit) {
        let mut s = self.inner.lock().expect("breaker lock");
        if let (Admit::Probe, Mode::HalfOpen { in_flight, .. }) = (how, &mut s.mode) {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// One call's latency, from its route's resolve to its answer.
    pub fn observe(&self, took: Duration, now: Instant) {
        let mut s = self.inner.lock().expect("breaker lock");
        let avg = match s.latency {
            // A moving average over about the last five calls: quick to see a queue build.
            Some((avg, _)) => (avg * 4 + took) / 5,
            None => took,
        };
        s.latency = Some((avg, now));
    }

    /// What a call is expected to take now, if that is known. An estimate no call has fed
    /// for a cool-down is stale: this caller is let through to measure again (the others go
    /// on with the old estimate until it answers).
    pub fn expected(&self, now: Instant) -> Option<Duration> {
        let mut s = self.inner.lock().expect("breaker lock");
        let (avg, fed) = s.latency.as_mut()?;
        if now.saturating_duration_since(*fed) > self.cfg.cooldown {
            *fed = now;
            return None;
        }
        Some(*avg)
    }

    /// The outcome of a call let through as `how`.
    pub fn record(&self, how: Admit, ok: bool, now: Instant) {
        let mut s = self.inner.lock().expect("breaker lock");
        let cooldown = self.cfg.cooldown;
        match (how, &mut s.mode) {
            (Admit::Probe, Mode::HalfOpen { in_flight, passed }) => {
                *in_flight = in_flight.saturating_sub(1);
                if !ok {
                    s.mode = Mode::Open {
                        until: now + cooldown,
                    };
                } else {
                    *passed += 1;
                    if *passed >= self.cfg.probes {
                        s.mode = Mode::Closed;
                        s.consecutive = 0;
                        s.window.clear();
                    }
                }
            }
            (Admit::Closed, Mode::Closed) => {
                s.consecutive = if ok { 0 } else { s.consecutive + 1 };
                s.window.push_back((now, ok));
                while s.window.len() > WINDOW_CAP
                    || s.window
                        .front()
                        .is_some_and(|(t, _)| now - *t > self.cfg.window)
                {
                    s.window.pop_front();
                }
                let failed = s.window.iter().filter(|(_, ok)| !ok).count();
                let rate_broken = s.window.len() >= self.cfg.min_calls as usize
                    && failed as f64 >= self.cfg.error_rate * s.window.len() as f64;
                if s.consecutive >= self.cfg.consecutive_failures || rate_broken {
                    s.mode = Mode::Open {
                        until: now + cooldown,
                    };
                }
            }
            // An answer from before the state changed says nothing about the new state.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 10,
            cooldown: Duration::from_secs(1),
            probes: 2,
        })
    }

    #[test]
    fn opens_on_consecutive_failures_then_probes_and_closes() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admit::Closed);
            b.record(Admit::Closed, false, t0);
        }
        assert_eq!(b.state(t0), State::Closed, "two failures are not three");
        b.record(Admit::Closed, false, t0);
        assert_eq!(b.state(t0), State::Open);
        assert_eq!(b.admit(t0 + Duration::from_millis(500)), Admit::Open);
        // After the cool-down: two probes, no more until they answer.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::Open);
        b.record(Admit::Probe, true, t1);
        assert_eq!(b.state(t1), State::HalfOpen);
        b.record(Admit::Probe, true, t1);
        assert_eq!(b.state(t1), State::Closed);
        assert_eq!(b.admit(t1), Admit::Closed);
    }

    #[test]
    fn the_expected_latency_follows_calls_and_goes_stale() {
        let b = breaker();
        let t0 = Instant::now();
        assert_eq!(b.expected(t0), None, "nothing measured yet");
        b.observe(Duration::from_millis(100), t0);
        assert_eq!(b.expected(t0), Some(Duration::from_millis(100)));
        b.observe(Duration::from_millis(600), t0);
        assert_eq!(b.expected(t0), Some(Duration::from_millis(200)));
        // Unfed for over the cool-down (1 s): one caller measures, the next reads the old one.
        let t1 = t0 + Duration::from_millis(1_500);
        assert_eq!(b.expected(t1), None);
        assert_eq!(b.expected(t1), Some(Duration::from_millis(200)));
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_the_rate_opens_it_too() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(Admit::Closed, false, t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(Admit::Probe, false, t1);
        assert_eq!(b.state(t1), State::Open);
        assert_eq!(b.admit(t1 + Duration::from_millis(999)), Admit::Open);

        // Alternating failures never reach 3 in a row, but 50 % of 10 calls opens it.
        let b = breaker();
        for i in 0..9 {
            b.record(Admit::Closed, i % 2 == 0, t0);
            assert_eq!(b.state(t0), State::Closed, "call {i}");
        }
        b.record(Admit::Closed, false, t0);
        assert_eq!(b.state(t0), State::Open);
    }
}
