//! Tenants' budgets: tokens and requests in any minute, kept as sliding windows of 600 slots
//! of 100 ms. A window (not a token bucket) because a bucket that starts full lets a tenant
//! spend twice its budget in its first minute; a window holds "per minute" for every minute.
//!
//! A request is admitted when one more request and its prompt tokens fit; its completion
//! tokens are charged as they stream, so a tenant's last streams may overrun the minute by
//! what they generate, and its next requests wait that much longer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::config::OpenAiConfig;

const SLOTS: usize = 600;
const SLOT: Duration = Duration::from_millis(100);

/// Amounts in the last minute, by 100 ms slot.
struct Window {
    slots: Box<[u64; SLOTS]>,
    /// The slot (counted from `origin`) written last.
    head: u64,
    sum: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            slots: Box::new([0; SLOTS]),
            head: 0,
            sum: 0,
        }
    }

    /// Forgets the slots older than a minute before `slot`.
    fn advance(&mut self, slot: u64) {
        if slot <= self.head {
            return;
        }
        let gone = (slot - self.head).min(SLOTS as u64);
        for s in self.head + 1..=self.head + gone {
            let i = (s % SLOTS as u64) as usize;
            self.sum -= self.slots[i];
            self.slots[i] = 0;
        }
        self.head = slot;
    }

    fn add(&mut self, slot: u64, n: u64) {
        self.advance(slot);
        self.slots[(slot % SLOTS as u64) as usize] += n;
        self.sum += n;
    }

    /// Takes back up to `n` from the newest slots (a charge that turned out too high).
    fn refund(&mut self, slot: u64, mut n: u64) {
        self.advance(slot);
        for back in 0..SLOTS as u64 {
            if n == 0 || back > self.head {
                break;
            }
            let i = ((self.head - back) % SLOTS as u64) as usize;
            let take = self.slots[i].min(n);
            self.slots[i] -= take;
            self.sum -= take;
            n -= take;
        }
    }

    /// How long until `need` more fits under `limit`: the oldest slots leave first.
    fn wait_for(&self, need: u64, limit: u64) -> Duration {
        let mut over = (self.sum + need).saturating_sub(limit);
        if over == 0 {
            return Duration::ZERO;
        }
        let oldest = self.head + 1;
        for k in 0..SLOTS as u64 {
            let i = ((oldest + k) % SLOTS as u64) as usize;
            over = over.saturating_sub(self.slots[i]);
            if over == 0 {
                return SLOT * (k as u32 + 1);
            }
        }
        Duration::from_secs(60)
    }
}

/// One tenant's limits (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
}

struct Usage {
    tokens: Window,
    requests: Window,
}

/// What a tenant has left: the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub limits: Limits,
    pub remaining_tokens: u64,
    pub remaining_requests: u64,
    pub reset_tokens: Duration,
    pub reset_requests: Duration,
}

/// Why a request waits: which budget, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    /// `tokens` or `requests`.
    pub kind: &'static str,
    pub message: String,
    pub wait: Duration,
    pub standing: Standing,
}

pub struct Quota {
    origin: Instant,
    default: Limits,
    tenants: HashMap<String, Limits>,
    usage: Mutex<HashMap<Arc<str>, Usage>>,
}

impl Quota {
    pub fn new(cfg: &OpenAiConfig) -> Self {
        Self {
            origin: Instant::now(),
            default: Limits {
                tokens_per_minute: cfg.tokens_per_minute,
                requests_per_minute: cfg.requests_per_minute,
            },
            tenants: cfg
                .tenants
                .iter()
                .map(|t| {
                    let limits = Limits {
                        tokens_per_minute: t.tokens_per_minute,
                        requests_per_minute: t.requests_per_minute,
                    };
                    (t.tenant.clone(), limits)
                })
                .collect(),
            usage: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self, tenant: &str) -> Limits {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }

    fn slot(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_millis() / SLOT.as_millis()) as u64
    }

    fn standing(limits: Limits, u: &Usage) -> Standing {
        Standing {
            limits,
            remaining_tokens: limits.tokens_per_minute.saturating_sub(u.tokens.sum),
            remaining_requests: limits.requests_per_minute.saturating_sub(u.requests.sum),
            // Until the window is empty again, as OpenAI's reset headers mean.
            reset_tokens: u.tokens.wait_for(0, 0),
            reset_requests: u.requests.wait_for(0, 0),
        }
    }

    /// Admits one request with `prompt` tokens, charging both, or says which budget is
    /// spent and for how long. Tenants without limits are not tracked.
    pub fn admit(
        &self,
        tenant: &Arc<str>,
        prompt: u64,
        now: Instant,
    ) -> Result<Option<Standing>, OverBudget> {
        let limits = self.limits(tenant);
        if limits == Limits::default() {
            return Ok(None);
        }
        let slot = self.slot(now);
        let mut all = self.usage.lock().expect("quota lock");
        let u = all.entry(Arc::clone(tenant)).or_insert_with(|| Usage {
            tokens: Window::new(),
            requests: Window::new(),
        });
        u.tokens.advance(slot);
        u.requests.advance(slot);
        let rpm = limits.requests_per_minute;
        if rpm > 0 && u.requests.sum + 1 > rpm {
            return Err(OverBudget {
                kind: "requests",
                message: format!(
                    "Rate limit reached for requests per minute (RPM) of tenant '{tenant}': Limit {rpm}, Used {}, Requested 1.",
                    u.requests.sum
                ),
                wait: u.requests.wait_for(1, rpm),
                standing: Self::standing(limits, u),
            });
        }
        let tpm = limits.tokens_per_minute;
        if tpm > 0 && u.tokens.sum + prompt > tpm {
            let message = if prompt > tpm {
                format!(
                    "Request too large for tenant '{tenant}': Limit {tpm} tokens per minute (TPM), Requested {prompt}."
                )
            } else {
                format!(
                    "Rate limit reached for tokens per minute (TPM) of tenant '{tenant}': Limit {tpm}, Used {}, Requested {prompt}.",
                    u.tokens.sum
                )
            };
            return Err(OverBudget {
                kind: "tokens",
                message,
                wait: u.tokens.wait_for(prompt.min(tpm), tpm),
                standing: Self::standing(limits, u),
            });
        }
        u.requests.add(slot, 1);
        u.tokens.add(slot, prompt);
        Ok(Some(Self::standing(limits, u)))
    }

    /// Charges tokens generated for an admitted request (negative: gives back an overcharge).
    pub fn charge(&self, tenant: &str, tokens: i64, now: Instant) {
        let slot = self.slot(now);
        let mut all = self.usage.lock().expect("quota lock");
        if let Some(u) = all.get_mut(tenant) {
            if tokens >= 0 {
                u.tokens.add(slot, tokens as u64);
            } else {
                u.tokens.refund(slot, tokens.unsigned_abs());
            }
        }
    }
}

/// How OpenAI's reset headers write a wait (`250ms`, `1.5s`, `6m0s`).
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64();
    if s < 60.0 {
        return format!("{}s", (s * 10.0).round() / 10.0);
    }
    format!("{}m{}s", (s / 60.0) as u64, (s % 60.0) as u64)
}

/// The `x-ratelimit-*` headers OpenAI's clients read, for the budgets the tenant has.
pub fn headers(s: &Standing) -> Vec<(&'static str, String)> {
    let budgets = [
        (
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            s.limits.requests_per_minute,
            s.remaining_requests,
            s.reset_requests,
        ),
        (
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            s.limits.tokens_per_minute,
            s.remaining_tokens,
            s.reset_tokens,
        ),
    ];
    let mut out = Vec::new();
    for ([limit_h, remaining_h, reset_h], limit, remaining, reset) in budgets {
        if limit > 0 {
            out.push((limit_h, limit.to_string()));
            out.push((remaining_h, remaining.to_string()));
            out.push((reset_h, reset_text(reset)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::config::TenantBudget;

    fn quota(tpm: u64, rpm: u64) -> Quota {
        Quota::new(&OpenAiConfig {
            tenants: vec![TenantBudget {
                tenant: "a".into(),
                tokens_per_minute: tpm,
                requests_per_minute: rpm,
                models: vec![],
            }],
            ..Default::default()
        })
    }

    #[test]
    fn a_minute_holds_its_budget_and_frees_as_it_slides() {
        let q = quota(100, 0);
        let a: Arc<str> = "a".into();
        let t0 = q.origin;
        // 60 + 30 fit; the next 20 do not until the first 60 leave the window.
        assert!(q.admit(&a, 60, t0).is_ok());
        let s = q
            .admit(&a, 30, t0 + Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(s.remaining_tokens, 10);
        let over = q.admit(&a, 20, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(over.kind, "tokens");
        // The 60 were charged in slot 0: they leave at 60 s, 40 s after now.
        assert_eq!(over.wait, Duration::from_secs(40));
        assert!(q.admit(&a, 20, t0 + Duration::from_millis(60_100)).is_ok());
        // Completion tokens count as they come, and an overcharge is given back.
        q.charge("a", 50, t0 + Duration::from_millis(60_100));
        assert!(q.admit(&a, 1, t0 + Duration::from_millis(60_200)).is_err());
        q.charge("a", -50, t0 + Duration::from_millis(60_200));
        assert!(q.admit(&a, 1, t0 + Duration::from_millis(60_200)).is_ok());
    }

    #[test]
    fn requests_per_minute_and_tenants_without_limits() {
        let q = quota(0, 2);
        let a: Arc<str> = "a".into();
        let t0 = q.origin;
        assert!(q.admit(&a, 1_000_000, t0).is_ok());
        assert!(q.admit(&a, 0, t0).is_ok());
        let over = q.admit(&a, 0, t0 + Duration::from_secs(1)).unwrap_err();
        assert_eq!(over.kind, "requests");
        assert_eq!(over.standing.remaining_requests, 0);
        // Tenant b has no budget: never tracked, never refused.
        let b: Arc<str> = "b".into();
        for _ in 0..1000 {
            assert_eq!(q.admit(&b, 1000, t0).unwrap(), None);
        }
    }

    #[test]
    fn resets_read_as_openai_writes_them() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn a_request_larger_than_the_budget_says_so() {
        let q = quota(100, 0);
        let over = q.admit(&"a".into(), 101, q.origin).unwrap_err();
        assert!(
            over.message.contains("Request too large"),
            "{}",
            over.message
        );
    }
}
