//! The batching window's timer, precise below a millisecond.
//!
//! tokio's timer wheel counts whole milliseconds and its driver parks with a millisecond
//! timeout, so `tokio::time::sleep(100 µs)` ends 1 to 2 ms later: every sub-millisecond window
//! became one of one to two milliseconds. On Linux each batching actor arms a timerfd of its
//! own (a kernel hrtimer, armed without timer slack) and awaits it through the runtime's
//! reactor, so the wake-up comes on the actor's own thread, as a socket's would: one syscall
//! to arm and one read when it fires, no thread of its own.
//!
//! A timerfd wake-up still comes 40-130 µs late on an idle host (the CPU's wake from idle;
//! longer after longer sleeps), so the timer arms itself early by the lateness it has seen
//! (a moving average, at most [`MAX_EARLY`] and a quarter of the wait) and yields on its
//! runtime for what is left. The finish costs a few tens of microseconds of CPU per wait, not
//! the whole window as a spin would. `examples/window_timer.rs` measures it against tokio's
//! sleep, the plain timerfd and a spin-finished sleep. Elsewhere, or should a timerfd not be
//! had, it falls back to tokio's sleep.

use std::time::{Duration, Instant};

/// A re-armable one-shot timer; [`WindowTimer::sleep_until`] is cancel-safe (a later call
/// re-arms it), so it can sit in a `select!` beside the actor's inbox.
pub struct WindowTimer {
    #[cfg(target_os = "linux")]
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    /// How late the timerfd's wake-ups came (moving average); it is armed that much early.
    early: Duration,
    /// Arm early and finish by yielding (off: the plain timerfd, for the benchmark).
    finish: bool,
}

/// The most the timer is armed ahead of the deadline, so a burst of late wake-ups (a loaded
/// host) cannot turn the finish into a long spin.
pub const MAX_EARLY: Duration = Duration::from_micros(200);

impl WindowTimer {
    /// A timer for the current runtime (which must have its I/O driver on); falls back to
    /// tokio's sleep when no timerfd can be made.
    pub fn new() -> Self {
        #[cfg(target_os = "linux")]
        {
            let fd = linux::timerfd().and_then(|fd| {
                // SAFETY: the OwnedFd stays open, and the same descriptor, for as long as the
                // AsyncFd that owns it lives.
                unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok()
            });
            if fd.is_none() {
                tracing::warn!(
                    "no timerfd for the batching window: windows below 2 ms will run long"
                );
            }
            Self {
                fd,
                early: Duration::ZERO,
                finish: true,
            }
        }
        #[cfg(not(target_os = "linux"))]
        Self {
            early: Duration::ZERO,
            finish: false,
        }
    }

    /// The plain timerfd, without the early arming and the finish (for the benchmark).
    pub fn without_finish() -> Self {
        Self {
            finish: false,
            ..Self::new()
        }
    }

    /// Whether the precise (timerfd) path is in use.
    pub fn is_precise(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.fd.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// Waits until `deadline`; at once if it has passed.
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Some(fd) = &self.fd {
            // At most a quarter of the wait: on a short window the finish would otherwise
            // spin through most of it (a 100 µs window cost 90 µs of CPU without this bound,
            // 34 with the plain timerfd; examples/window_timer.rs).
            let early = if self.finish {
                self.early.min(left / 4)
            } else {
                Duration::ZERO
            };
            let wake = left.saturating_sub(early);
            if wake.is_zero() {
                return self.finish_at(deadline).await;
            }
            let armed_for = Instant::now() + wake;
            if linux::arm(fd.get_ref(), wake).is_ok() {
                linux::fired(fd).await;
                if self.finish {
                    let late = Instant::now().saturating_duration_since(armed_for);
                    self.early = ((self.early * 7 + late) / 8).min(MAX_EARLY);
                    self.finish_at(deadline).await;
                }
                return;
            }
        }
        tokio::time::sleep(left).await;
    }

    /// Yields on the runtime (other tasks run meanwhile) until `deadline`.
    async fn finish_at(&self, deadline: Instant) {
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    }

    /// Waits for `d`.
    pub async fn sleep(&mut self, d: Duration) {
        self.sleep_until(Instant::now() + d).await;
    }
}

impl Default for WindowTimer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        time::Duration,
    };

    use tokio::io::unix::AsyncFd;

    pub(super) fn timerfd() -> Option<OwnedFd> {
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Arms the timer `left` from now (relative, one-shot). Re-arming resets an expiry that
    /// was never read, so a wait cancelled earlier cannot end the next one early.
    pub(super) fn arm(fd: &OwnedFd, left: Duration) -> io::Result<()> {
        let ns = left.as_nanos().max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000).min(i64::MAX as u128) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec and the old value is not asked for.
        let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits until the armed timer has fired. A readiness left from an earlier, cancelled
    /// wait reads as "not yet" (EAGAIN) and is cleared.
    pub(super) async fn fired(fd: &AsyncFd<OwnedFd>) {
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            let read = guard.try_io(|inner| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a buffer of 8.
                let n = unsafe {
                    libc::read(
                        inner.get_ref().as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => return,
                // Any other error would repeat: give up waiting rather than spin.
                Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overshoot past the deadline of each of `n` waits of `d`, sorted.
    async fn overshoots(timer: &mut WindowTimer, d: Duration, n: usize) -> Vec<Duration> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let deadline = Instant::now() + d;
            timer.sleep_until(deadline).await;
            let now = Instant::now();
            assert!(now >= deadline, "woke {:?} early", deadline - now);
            v.push(now - deadline);
        }
        v.sort();
        v
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sub_millisecond_wait_ends_well_before_the_next_millisecond_tick() {
        let mut timer = WindowTimer::new();
        assert!(timer.is_precise(), "timerfd available on Linux");
        for us in [100, 300] {
            let v = overshoots(&mut timer, Duration::from_micros(us), 41).await;
            let median = v[v.len() / 2];
            // tokio's sleep overshoots a 100 µs wait by 0.9-1.9 ms; a loose bound for a
            // shared CI host that the millisecond rounding cannot meet.
            assert!(
                median < Duration::from_micros(500),
                "{us} µs: median overshoot {median:?}"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_wait_does_not_end_the_next_one_early() {
        let mut timer = WindowTimer::new();
        // Armed for 1 ms, abandoned after 0.2: the expiry lands while nobody waits.
        let _ = tokio::time::timeout(
            Duration::from_micros(200),
            timer.sleep(Duration::from_millis(1)),
        )
        .await;
        std::thread::sleep(Duration::from_millis(3));
        let start = Instant::now();
        timer.sleep(Duration::from_millis(5)).await;
        assert!(start.elapsed() >= Duration::from_millis(5));
        // A deadline already passed returns at once.
        let start = Instant::now();
        timer.sleep_until(start - Duration::from_millis(1)).await;
        assert!(start.elapsed() < Duration::from_millis(5));
    }
}
