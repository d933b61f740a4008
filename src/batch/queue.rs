//! The state of one model's batching queue, as a plain struct: no timers, no channels, so unit
//! tests drive it directly with chosen instants.
//!
//! Priority: `levels[0]` is the highest level (Triton's `priority` 1). A batch starts from the
//! head: the oldest request that has waited at least `max_priority_wait` (anti-starvation:
//! aged requests go first, whatever their level), or else the front of the highest non-empty
//! level. The batch is then filled, in that same order, with requests compatible with the head
//! (same inputs, non-batch dimensions, outputs and parameters) that still fit.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::call::Deadline;

/// Something waiting for an answer; `is_gone` is true once nobody will read the answer.
pub trait Waiter {
    fn is_gone(&self) -> bool;
}

pub struct Pending<T> {
    /// Requests with equal keys can share a Triton call.
    pub key: Arc<str>,
    pub rows: i64,
    pub level: usize,
    pub enqueued: Instant,
    pub deadline: Option<Deadline>,
    pub item: T,
}

/// Keys are compared often: the batcher gives requests with equal keys one shared `Arc`
/// ([`BatchQueue::push`]), so most comparisons end at the pointer.
fn same_key(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Expired,
    CallerGone,
}

pub struct BatchQueue<T> {
    levels: Vec<VecDeque<Pending<T>>>,
    len: usize,
    max_priority_wait: Duration,
    /// The key of the last request pushed.
    last_key: Option<Arc<str>>,
}

impl<T: Waiter> BatchQueue<T> {
    pub fn new(levels: usize, max_priority_wait: Duration) -> Self {
        Self {
            levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            len: 0,
            max_priority_wait,
            last_key: None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, mut p: Pending<T>) {
        // Share the key of the request before it when equal (the usual case: one kind of
        // request per model), so that comparing the two is a pointer comparison.
        match &self.last_key {
            Some(last) if same_key(last, &p.key) => p.key = Arc::clone(last),
            _ => self.last_key = Some(Arc::clone(&p.key)),
        }
        let level = p.level.min(self.levels.len() - 1);
        self.levels[level].push_back(p);
        self.len += 1;
    }

    /// When the oldest waiting request arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|l| l.front())
            .map(|p| p.enqueued)
            .min()
    }

    /// Removes requests whose deadline passed or whose caller went away: they are never sent.
    pub fn drain_dead(&mut self, now: Instant) -> Vec<(Pending<T>, Dropped)> {
        let mut dead = Vec::new();
        for level in &mut self.levels {
            if level
                .iter()
                .all(|p| !p.item.is_gone() && p.deadline.is_none_or(|d| !d.passed_at(now)))
            {
                continue;
            }
            let kept: VecDeque<Pending<T>> = level
                .drain(..)
                .filter_map(|p| {
                    if p.item.is_gone() {
                        dead.push((p, Dropped::CallerGone));
                        None
                    } else if p.deadline.is_some_and(|d| d.passed_at(now)) {
                        dead.push((p, Dropped::Expired));
                        None
                    } else {
                        Some(p)
                    }
                })
                .collect();
            *level = kept;
        }
        self.len -= dead.len();
        dead
    }

    /// Positions (level, index) in the order a batch is filled.
    fn fill_order(&self, now: Instant) -> Vec<(usize, usize)> {
        let mut aged: Vec<(Instant, usize, usize)> = Vec::new();
        let mut rest = Vec::with_capacity(self.len);
        for (l, level) in self.levels.iter().enumerate() {
            for (i, p) in level.iter().enumerate() {
                if now.saturating_duration_since(p.enqueued) >= self.max_priority_wait {
                    aged.push((p.enqueued, l, i));
                } else {
                    rest.push((l, i));
                }
            }
        }
        aged.sort_by_key(|&(t, l, _)| (t, l));
        aged.into_iter()
            .map(|(_, l, i)| (l, i))
            .chain(rest)
            .collect()
    }

    /// Rows that the next batch would hold if it were taken now (capped at `max_rows`).
    ///
    /// The batcher asks this on every arrival, so the usual case (no request has aged past
    /// `max_priority_wait`: the fill order is the levels in turn) walks the queue in place,
    /// without building the order, and stops once the batch is full.
    pub fn ready_rows(&self, now: Instant, max_rows: i64) -> i64 {
        // Aged, as `fill_order` counts it: enqueued at or before `now - max_priority_wait`
        // (one subtraction instead of one per request); with no wait at all, every request.
        let wait = self.max_priority_wait;
        let aged = wait.is_zero()
            || now
                .checked_sub(wait)
                .is_some_and(|cutoff| self.levels.iter().flatten().any(|p| p.enqueued <= cutoff));
        if aged {
            let order = self.fill_order(now);
            return Self::fill(order.iter().map(|&(l, i)| &self.levels[l][i]), max_rows);
        }
        Self::fill(self.levels.iter().flatten(), max_rows)
    }

    /// Rows of the head and of the compatible requests after it that fit in `max_rows`.
    fn fill<'a>(mut order: impl Iterator<Item = &'a Pending<T>>, max_rows: i64) -> i64
    where
        T: 'a,
    {
        let Some(head) = order.next() else {
            return 0;
        };
        let mut rows = if head.rows <= max_rows { head.rows } else { 0 };
        for p in order {
            if rows >= max_rows {
                break;
            }
            if rows + p.rows <= max_rows && same_key(&p.key, &head.key) {
                rows += p.rows;
            }
        }
        rows
    }

    /// Takes the next batch: the head and the compatible requests that fit in `max_rows`, or
    /// in the largest preferred size the waiting rows can fill.
    pub fn take_batch(
        &mut self,
        now: Instant,
        max_rows: i64,
        preferred: &[i64],
    ) -> Vec<Pending<T>> {
        let available = self.ready_rows(now, max_rows);
        let cap = preferred
            .iter()
            .copied()
            .filter(|&p| p <= available && p <= max_rows)
            .max()
            .unwrap_or(max_rows);
        let order = self.fill_order(now);
        let Some(&(hl, hi)) = order.first() else {
            return Vec::new();
        };
        let key = Arc::clone(&self.levels[hl][hi].key);
        let mut chosen = Vec::new();
        let mut rows = 0;
        for (l, i) in order {
            let p = &self.levels[l][i];
            // The head always goes, even alone; others only while they fit.
            if same_key(&p.key, &key) && (chosen.is_empty() || rows + p.rows <= cap) {
                rows += p.rows;
                chosen.push((l, i));
            }
        }
        let mut taken: Vec<Option<Pending<T>>> = Vec::new();
        let mut slots: Vec<(usize, usize, usize)> = chosen
            .iter()
            .enumerate()
            .map(|(n, &(l, i))| (l, i, n))
            .collect();
        taken.resize_with(chosen.len(), || None);
        // Remove from the back of each level first so earlier indices stay valid.
        slots.sort_by_key(|&(l, i, _)| std::cmp::Reverse((l, i)));
        for (l, i, n) in slots {
            taken[n] = self.levels[l].remove(i);
        }
        self.len -= chosen.len();
        taken.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct W {
        id: u32,
        gone: bool,
    }
    impl Waiter for W {
        fn is_gone(&self) -> bool {
            self.gone
        }
    }

    fn p(id: u32, key: &str, rows: i64, level: usize, at: Instant) -> Pending<W> {
        Pending {
            key: key.into(),
            rows,
            level,
            enqueued: at,
            deadline: None,
            item: W { id, gone: false },
        }
    }

    fn ids(batch: &[Pending<W>]) -> Vec<u32> {
        batch.iter().map(|p| p.item.id).collect()
    }

    #[test]
    fn batches_compatible_requests_up_to_max_rows_in_order() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1, Duration::from_secs(1));
        q.push(p(1, "a", 3, 0, t));
        q.push(p(2, "b", 1, 0, t));
        q.push(p(3, "a", 4, 0, t));
        q.push(p(4, "a", 2, 0, t));
        assert_eq!(q.ready_rows(t, 8), 7);
        let b = q.take_batch(t, 8, &[]);
        assert_eq!(ids(&b), vec![1, 3]); // 3+4 = 7; request 4 (2 rows) no longer fits
        assert_eq!(ids(&q.take_batch(t, 8, &[])), vec![2]);
        assert_eq!(ids(&q.take_batch(t, 8, &[])), vec![4]);
        assert!(q.is_empty());
    }

    #[test]
    fn preferred_sizes_cap_the_batch() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1, Duration::from_secs(1));
        for i in 0..6 {
            q.push(p(i, "a", 1, 0, t));
        }
        assert_eq!(q.take_batch(t, 8, &[4]).len(), 4);
        assert_eq!(q.take_batch(t, 8, &[4]).len(), 2);
    }

    #[test]
    fn higher_levels_go_first_until_a_lower_one_has_waited_too_long() {
        let t = Instant::now();
        let wait = Duration::from_millis(50);
        let mut q = BatchQueue::new(3, wait);
        q.push(p(1, "low", 1, 2, t));
        q.push(p(2, "high", 1, 0, t + Duration::from_millis(10)));
        q.push(p(3, "mid", 1, 1, t + Duration::from_millis(20)));
        let now = t + Duration::from_millis(30);
        assert_eq!(ids(&q.take_batch(now, 1, &[])), vec![2]);
        assert_eq!(ids(&q.take_batch(now, 1, &[])), vec![3]);
        // Starvation bound: once old enough, the low request beats newer high ones.
        q.push(p(4, "high", 1, 0, t + Duration::from_millis(40)));
        assert_eq!(ids(&q.take_batch(t + wait, 1, &[])), vec![1]);
        assert_eq!(ids(&q.take_batch(t + wait, 1, &[])), vec![4]);
    }

    #[test]
    fn ready_rows_are_the_rows_the_next_batch_takes() {
        // Random queues (a small LCG, so a failure repeats): keys, levels, sizes and ages
        // mixed, some aged past max_priority_wait and some not, so both ways of walking the
        // queue are checked against take_batch, which always builds the full fill order.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        let t = Instant::now();
        let mut aged_cases = 0;
        for _ in 0..500 {
            // Now and then no wait at all (every request counts as aged); some requests are
            // enqueued after `now` (the actor reads the clock after callers stamp them).
            let wait = Duration::from_millis(if next(10) == 0 { 0 } else { 50 });
            let mut q = BatchQueue::new(3, wait);
            let n = 1 + next(12);
            // No request is over max_batch_size here: larger ones are split before batching.
            let max = 1 + next(8) as i64;
            for id in 0..n {
                let key = ["a", "b"][next(2) as usize];
                let at = t + Duration::from_millis(next(40));
                let rows = 1 + next(max as u64) as i64;
                q.push(p(id as u32, key, rows, next(3) as usize, at));
            }
            let now = t + Duration::from_millis(next(100));
            if q.levels
                .iter()
                .flatten()
                .any(|x| now.saturating_duration_since(x.enqueued) >= wait)
            {
                aged_cases += 1;
            }
            let ready = q.ready_rows(now, max);
            let taken: i64 = q.take_batch(now, max, &[]).iter().map(|x| x.rows).sum();
            assert_eq!(ready, taken, "n={n} max={max}");
        }
        assert!(
            (50..450).contains(&aged_cases),
            "{aged_cases} of 500 had aged requests"
        );
    }

    #[test]
    fn equal_keys_share_one_allocation() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1, Duration::from_secs(1));
        q.push(p(1, "a", 1, 0, t));
        q.push(p(2, "a", 1, 0, t));
        q.push(p(3, "b", 1, 0, t));
        q.push(p(4, "b", 1, 0, t));
        let l = &q.levels[0];
        assert!(Arc::ptr_eq(&l[0].key, &l[1].key));
        assert!(Arc::ptr_eq(&l[2].key, &l[3].key));
        assert!(!Arc::ptr_eq(&l[1].key, &l[2].key));
        assert_eq!(&*l[3].key, "b");
    }

    #[test]
    fn expired_and_abandoned_requests_are_dropped_before_sending() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1, Duration::from_secs(1));
        let mut a = p(1, "a", 1, 0, t);
        a.deadline = Some(Deadline::at(t + Duration::from_millis(5)));
        let mut b = p(2, "a", 1, 0, t);
        b.item.gone = true;
        q.push(a);
        q.push(b);
        q.push(p(3, "a", 1, 0, t));
        let dead = q.drain_dead(t + Duration::from_millis(5));
        let mut why: Vec<(u32, Dropped)> = dead.iter().map(|(p, d)| (p.item.id, *d)).collect();
        why.sort_by_key(|x| x.0);
        assert_eq!(why, vec![(1, Dropped::Expired), (2, Dropped::CallerGone)]);
        assert_eq!(q.len(), 1);
        assert_eq!(ids(&q.take_batch(t, 8, &[])), vec![3]);
    }
}
