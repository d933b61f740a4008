//! The decision, free of I/O: what each tier asks for and which one wins. The external scaler
//! and the simulator (`examples/scaler_sim.rs`) both call this code.

/// One scaled object's rule: its bounds, its capacities, and how long a peak is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Calls (sync calls and running tasks) one replica carries at once.
    pub capacity_per_replica: f64,
    /// Queued tasks one replica is given to work off.
    pub tasks_per_replica: f64,
    /// A recorded peak is a floor for this long.
    pub horizon_s: u64,
    /// Past the horizon a peak halves every this many seconds.
    pub half_life_s: u64,
}

/// What is asked of the scaled object's models right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Tasks accepted and not started yet.
    pub queued: u64,
    /// Sync calls and tasks being run, over every front end and worker.
    pub in_flight: u64,
}

/// The replicas asked for at some time (the highest in its bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    pub at_s: u64,
    pub replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Event-driven: queued tasks.
    Queue,
    /// Work in flight above what the replicas carry.
    Reactive,
    /// The recent peak, kept as a floor.
    Baseline,
    /// Nothing asked more than the configured minimum.
    Min,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Reactive => "reactive",
            Self::Baseline => "baseline",
            Self::Min => "min",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub queue: u32,
    pub reactive: u32,
    pub baseline: u32,
    /// The max of the three, clipped to the bounds.
    pub desired: u32,
    pub winner: Tier,
    /// True when `max_replicas` cut the winner's ask.
    pub capped: bool,
    /// One line a person reads: the winner's numbers.
    pub reason: String,
}

fn replicas_for(amount: u64, per_replica: f64) -> u32 {
    (amount as f64 / per_replica).ceil().min(u32::MAX as f64) as u32
}

impl Policy {
    /// Tier 1: queued tasks, each replica given `tasks_per_replica` of them.
    pub fn queue_tier(&self, d: Demand) -> u32 {
        replicas_for(d.queued, self.tasks_per_replica)
    }

    /// Tier 2: replicas that carry the work in flight now.
    pub fn reactive_tier(&self, d: Demand) -> u32 {
        replicas_for(d.in_flight, self.capacity_per_replica)
    }

    /// What the demand asks for now, before the baseline: the figure recorded as a peak.
    pub fn asked_now(&self, d: Demand) -> u32 {
        self.queue_tier(d)
            .max(self.reactive_tier(d))
            .min(self.max_replicas)
    }

    /// A peak's weight at `now_s`: whole within the horizon, then halving every half-life.
    pub fn decayed(&self, p: Peak, now_s: u64) -> f64 {
        let age = now_s.saturating_sub(p.at_s);
        let past = age.saturating_sub(self.horizon_s) as f64;
        p.replicas as f64 * 0.5f64.powf(past / self.half_life_s.max(1) as f64)
    }

    /// Tier 3: the highest decayed peak, in whole replicas. A peak counts while it weighs at
    /// least half a replica, so a decayed floor reaches zero rather than lingering at one.
    pub fn baseline_tier(&self, peaks: &[Peak], now_s: u64) -> (u32, Option<Peak>) {
        peaks
            .iter()
            .map(|&p| (self.decayed(p, now_s), p))
            .filter(|(w, _)| *w >= 0.5)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or((0, None), |(w, p)| ((w - 1e-9).ceil() as u32, Some(p)))
    }

    /// How long a peak can matter: the horizon and enough half-lives for the largest ask
    /// (`max_replicas`) to fall under half a replica.
    pub fn keep_s(&self) -> u64 {
        let halvings = (2.0 * self.max_replicas.max(1) as f64).log2().ceil() as u64;
        self.horizon_s + halvings * self.half_life_s.max(1)
    }

    pub fn decide(&self, d: Demand, peaks: &[Peak], now_s: u64) -> Decision {
        let queue = self.queue_tier(d);
        let reactive = self.reactive_tier(d);
        let (baseline, peak) = self.baseline_tier(peaks, now_s);
        // Ties go to the tier that reacts first: the queue, then the work in flight.
        let (ask, mut winner) = [
            (queue, Tier::Queue),
            (reactive, Tier::Reactive),
            (baseline, Tier::Baseline),
        ]
        .into_iter()
        .fold(
            (0, Tier::Min),
            |best, t| if t.0 > best.0 { t } else { best },
        );
        let desired = ask.clamp(self.min_replicas, self.max_replicas);
        if desired > ask || ask == 0 {
            winner = Tier::Min;
        }
        let capped = ask > self.max_replicas;
        let mut reason = match winner {
            Tier::Queue => format!(
                "{} tasks queued / {} per replica",
                d.queued, self.tasks_per_replica
            ),
            Tier::Reactive => format!(
                "{} calls in flight / {} per replica",
                d.in_flight, self.capacity_per_replica
            ),
            Tier::Baseline => {
                let p = peak.expect("a baseline above zero has its peak");
                format!(
                    "peak of {} replicas {} s ago (horizon {} s)",
                    p.replicas,
                    now_s.saturating_sub(p.at_s),
                    self.horizon_s
                )
            }
            Tier::Min => format!("nothing asks more than min_replicas {}", self.min_replicas),
        };
        if capped {
            reason.push_str(&format!(", capped at max_replicas {}", self.max_replicas));
        }
        Decision {
            queue,
            reactive,
            baseline,
            desired,
            winner,
            capped,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_replicas: 0,
            max_replicas: 10,
            capacity_per_replica: 8.0,
            tasks_per_replica: 50.0,
            horizon_s: 100,
            half_life_s: 10,
        }
    }

    #[test]
    fn each_tier_asks_for_its_own_reason() {
        let p = policy();
        let queued = p.decide(
            Demand {
                queued: 120,
                in_flight: 3,
            },
            &[],
            0,
        );
        assert_eq!((queued.queue, queued.reactive, queued.desired), (3, 1, 3));
        assert_eq!(queued.winner, Tier::Queue);
        let busy = p.decide(
            Demand {
                queued: 0,
                in_flight: 17,
            },
            &[],
            0,
        );
        assert_eq!(
            (busy.reactive, busy.desired, busy.winner),
            (3, 3, Tier::Reactive)
        );
        let idle = p.decide(Demand::default(), &[], 0);
        assert_eq!((idle.desired, idle.winner), (0, Tier::Min));
        let huge = p.decide(
            Demand {
                queued: 10_000,
                in_flight: 0,
            },
            &[],
            0,
        );
        assert_eq!((huge.queue, huge.desired), (200, 10));
        assert!(
            huge.capped && huge.reason.contains("capped"),
            "{}",
            huge.reason
        );
    }

    #[test]
    fn the_baseline_holds_for_the_horizon_then_halves() {
        let p = policy();
        let peaks = [Peak {
            at_s: 1_000,
            replicas: 6,
        }];
        let at = |now| p.decide(Demand::default(), &peaks, now);
        assert_eq!((at(1_000).desired, at(1_000).winner), (6, Tier::Baseline));
        assert_eq!(at(1_100).desired, 6, "the whole horizon");
        assert_eq!(at(1_110).desired, 3, "one half-life later");
        assert_eq!(at(1_120).desired, 2, "1.5 rounds up");
        assert_eq!(at(1_130).desired, 1);
        assert_eq!(at(1_140).desired, 0, "under half a replica: gone");
        assert!(p.keep_s() >= 140 - 100 + 100);
        // Demand above the baseline wins over it.
        let d = p.decide(
            Demand {
                queued: 0,
                in_flight: 80,
            },
            &peaks,
            1_050,
        );
        assert_eq!((d.desired, d.winner), (10, Tier::Reactive));
    }

    #[test]
    fn the_minimum_is_a_floor_and_named_when_it_decides() {
        let p = Policy {
            min_replicas: 2,
            ..policy()
        };
        let d = p.decide(
            Demand {
                queued: 10,
                in_flight: 0,
            },
            &[],
            0,
        );
        assert_eq!((d.desired, d.winner), (2, Tier::Min));
    }
}
