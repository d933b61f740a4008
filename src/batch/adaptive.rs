//! The adaptive window's inputs and rule: moving averages of the gap between arrivals and of
//! Triton's call, the requests inside a queue, and how long a batch may wait for company.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

/// Moving averages the adaptive window reads; updated by the actor and the batch tasks.
#[derive(Default)]
pub(super) struct Observed {
    /// Gap between arrivals, nanoseconds (EWMA).
    pub(super) gap_ns: AtomicU64,
    /// Triton latency of a batch, nanoseconds (EWMA).
    pub(super) triton_ns: AtomicU64,
    /// Requests of this queue in calls to Triton now.
    pub(super) in_calls: AtomicUsize,
}

/// Counts a batch's members in [`Observed::in_calls`] while it exists.
pub(super) struct InCall(Arc<Observed>, usize);

impl InCall {
    pub(super) fn new(observed: &Arc<Observed>, members: usize) -> Self {
        observed.in_calls.fetch_add(members, Ordering::Relaxed);
        Self(Arc::clone(observed), members)
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.in_calls.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Arrivals over which the adaptive `peak` of requests inside decays by a factor of e.
pub(super) const PEAK_DECAY_ARRIVALS: f64 = 512.0;

/// The adaptive window (module docs): how long a batch missing `missing_rows` rows may wait,
/// given the mean gap between arrivals, the mean Triton call, and how many more callers are
/// expected (`peak - inside`).
pub(super) fn adaptive_window(
    gap: Duration,
    call: Duration,
    missing_rows: i64,
    expected_callers: f64,
    max_delay: Duration,
) -> Duration {
    let half_call = call / 2;
    // The peak decays between arrivals: 7.98 against 7 inside is one caller still out.
    let expected = expected_callers.round();
    if gap.is_zero() || gap >= half_call || missing_rows <= 0 || expected < 1.0 {
        return Duration::ZERO;
    }
    // Each caller brings at least one row.
    let arrivals = expected.min(missing_rows as f64);
    max_delay.min(half_call).min(gap.mul_f64(arrivals))
}

pub(super) fn ewma(slot: &AtomicU64, sample: Duration) {
    let s = sample.as_nanos().min(u64::MAX as u128) as u64;
    let old = slot.load(Ordering::Relaxed);
    let new = if old == 0 { s } else { (old * 7 + s) / 8 };
    slot.store(new, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adaptive_window_waits_only_for_callers_that_can_come() {
        let us = Duration::from_micros;
        let max = us(2_000);
        // Arrivals far apart against the call: send at once.
        assert_eq!(adaptive_window(us(600), us(1_000), 10, 5.0, max), us(0));
        // Nothing measured yet.
        assert_eq!(adaptive_window(us(0), us(1_000), 10, 5.0, max), us(0));
        // Every caller seen lately is inside already (closed loop): nobody else can come.
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.0, max), us(0));
        assert_eq!(adaptive_window(us(100), us(1_000), 10, -0.02, max), us(0));
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.4, max), us(0));
        // A decayed peak of 7.98 with 7 inside: one caller is still out.
        assert_eq!(adaptive_window(us(100), us(1_000), 10, 0.98, max), us(100));
        // The batch is full.
        assert_eq!(adaptive_window(us(100), us(1_000), 0, 8.0, max), us(0));
        // Three callers outside: three gaps, though ten rows are missing.
        assert_eq!(adaptive_window(us(100), us(4_000), 10, 3.2, max), us(300));
        // Many callers outside: bounded by the missing rows, half a call, the delay.
        assert_eq!(adaptive_window(us(100), us(4_000), 5, 50.0, max), us(500));
        assert_eq!(adaptive_window(us(100), us(1_000), 60, 50.0, max), us(500));
        assert_eq!(adaptive_window(us(100), us(8_000), 60, 50.0, max), max);
    }
}
