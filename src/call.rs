//! What one inference call carries from the API edge to Triton, decided once where the call
//! enters (the gRPC listener, the HTTP handler, the task worker) and read, not recomputed, by
//! `infer`, `batch` and `backend`.

use std::time::{Duration, Instant};

/// When a call must be answered by. The caller's `grpc-timeout` or `Infergate-Timeout-Ms`
/// becomes one at the edge, the request's own `timeout` parameter may bring it forward, a
/// batch leaves by its tightest member's, and what is left of it goes to Triton (as the call's
/// `grpc-timeout` and `timeout` parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// `budget` from now; a budget too large to represent is no deadline at all.
    pub fn after(budget: Duration) -> Option<Self> {
        Instant::now().checked_add(budget).map(Self)
    }

    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    /// The time left at `now` (zero once passed).
    pub fn left_at(self, now: Instant) -> Duration {
        self.0.saturating_duration_since(now)
    }

    pub fn passed_at(self, now: Instant) -> bool {
        self.0 <= now
    }

    /// The earlier of two optional deadlines.
    pub fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The request parameter that carries a route's sticky header from the edge (HTTP, gRPC, a
/// task's stored request) to where the route is resolved, which takes it out again: Triton
/// never sees it, and the response cache's key leaves it out.
pub const STICKY_CARRIER: &str = "infergate_sticky";

/// What a caller over its model's `max_concurrent_requests` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Refused at once (sync APIs: the client retries after `Retry-After`).
    Refuse,
    /// Waits for a place (task workers, whose own concurrency already bounds how many wait).
    Wait,
}

/// How the caller takes Triton's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// As Triton framed it, should the request reach Triton alone over a lean connection: a
    /// gRPC caller sends those bytes on unchanged, neither decoded nor encoded again.
    AsTriton,
    /// Decoded (HTTP, tasks, streams: they re-encode it anyway).
    Decoded,
}

/// The lane a gRPC stream arrived on, carried to its handler in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnLane(pub usize);

/// One call's properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub deadline: Option<Deadline>,
    pub admission: Admission,
    pub framing: Framing,
    /// The serving thread ("lane") the call arrived on, if any. Each accepted gRPC connection
    /// lives on one lane, a thread with its own single-threaded runtime; a call on a lane
    /// uses that lane's own Triton connection and batching queue, so it never leaves its
    /// thread (on a loaded 2-core host the hand-offs of a shared work-stealing runtime cost
    /// more than the call itself). `None`: the main runtime (HTTP, tasks, other RPCs).
    pub lane: Option<usize>,
    /// The caller's tenant, as the response cache names it (a digest of its name); `None`:
    /// the call is not cached (tasks, streams).
    pub tenant: Option<TenantId>,
}

/// A tenant's name digested to a fixed size, so that a call stays a small `Copy` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId(pub [u8; 16]);

impl TenantId {
    pub fn of(tenant: &str) -> Self {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(tenant.as_bytes());
        Self(d[..16].try_into().expect("16 of 32 bytes"))
    }
}

impl Call {
    /// The same call, made by `tenant` (its answers may come from the response cache).
    pub fn for_tenant(self, tenant: &str) -> Self {
        Self {
            tenant: Some(TenantId::of(tenant)),
            ..self
        }
    }

    /// A synchronous API call on the main runtime: refused over the cap, answered decoded.
    pub fn sync(deadline: Option<Deadline>) -> Self {
        Self {
            deadline,
            admission: Admission::Refuse,
            framing: Framing::Decoded,
            lane: None,
            tenant: None,
        }
    }

    /// A task worker's call: no deadline of its own, waits for a place under the cap.
    pub fn task() -> Self {
        Self {
            deadline: None,
            admission: Admission::Wait,
            framing: Framing::Decoded,
            lane: None,
            tenant: None,
        }
    }

    /// A gRPC ModelInfer on serving thread `lane`: answered as Triton framed it when it can be.
    pub fn grpc_on_lane(deadline: Option<Deadline>, lane: usize) -> Self {
        Self {
            deadline,
            admission: Admission::Refuse,
            framing: Framing::AsTriton,
            lane: Some(lane),
            tenant: None,
        }
    }

    /// A batch's one call to Triton on `lane`: its tightest member's deadline; admission was
    /// decided for each member before it joined.
    pub fn batch(deadline: Option<Deadline>, framing: Framing, lane: Option<usize>) -> Self {
        Self {
            deadline,
            admission: Admission::Wait,
            framing,
            lane,
            tenant: None,
        }
    }

    /// The same call answered decoded (a part of a split request, a shared batch).
    pub fn decoded(self) -> Self {
        Self {
            framing: Framing::Decoded,
            ..self
        }
    }

    pub fn with_deadline(self, deadline: Option<Deadline>) -> Self {
        Self { deadline, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_deadline_wins_and_none_means_unbounded() {
        let now = Instant::now();
        let (a, b) = (
            Deadline::at(now + Duration::from_millis(5)),
            Deadline::at(now + Duration::from_millis(9)),
        );
        assert_eq!(Deadline::earliest(Some(b), Some(a)), Some(a));
        assert_eq!(Deadline::earliest(None, Some(b)), Some(b));
        assert_eq!(Deadline::earliest(None, None), None);
        assert_eq!(a.left_at(now), Duration::from_millis(5));
        assert_eq!(a.left_at(now + Duration::from_secs(1)), Duration::ZERO);
        assert!(a.passed_at(a.instant()) && !a.passed_at(now));
        assert_eq!(Deadline::after(Duration::MAX), None);
    }
}
