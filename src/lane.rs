//! Serving threads ("lanes"). Each accepted gRPC connection lives on one lane, a thread with
//! its own single-threaded runtime; a ModelInfer passed through to Triton uses that lane's own
//! Triton connection, and a batched one joins the lane's own batching queue. A call then never
//! leaves its thread: on a loaded 2-core host the thread hand-offs of a shared work-stealing
//! runtime cost more than the call itself (one runtime thread instead of two cut infergate's
//! CPU per call by 10-35%, BENCHMARKS.md).
//!
//! This module only records which lane, if any, the current thread is; `api::grpc`'s listener
//! starts the lanes, `backend::triton` picks connections and `batch` picks queues by it.

use std::cell::Cell;

thread_local! {
    static LANE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The lane the current thread serves, or `None` on other threads (the main runtime's
/// workers, the batcher, task workers).
pub fn current() -> Option<usize> {
    LANE.with(Cell::get)
}

/// Marks the current thread as lane `index`; called once by each lane thread as it starts.
pub(crate) fn enter(index: usize) {
    LANE.with(|l| l.set(Some(index)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_known_only_on_its_own_thread() {
        assert_eq!(current(), None);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(current(), Some(3));
        })
        .join()
        .unwrap();
        assert_eq!(current(), None);
    }
}
