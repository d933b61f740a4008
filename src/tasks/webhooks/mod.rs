//! Completion webhooks: a task may carry a `callback_url`; when it reaches a final state, the
//! process that moved it there POSTs the task, signed, and retries with backoff for a bounded
//! time. The delivery's state is kept on the task (`pending`, `delivered`, `failed`).
//!
//! - **Who may be called.** The URL's host must be on `webhooks.allow_hosts` (checked at
//!   submit: 400 otherwise). Private, loopback and link-local addresses are refused unless an
//!   entry names them exactly (the host, or a network holding the address): at submit for an
//!   address in the URL, and at each try for the addresses a name resolves to, the connection
//!   then going to the address that was checked (no second lookup to rebind).
//! - **Signed** as Standard Webhooks does: headers `webhook-id` (the same on every try),
//!   `webhook-timestamp` (Unix seconds) and `webhook-signature` = `v1,` + base64 of
//!   HMAC-SHA256(secret, `id.timestamp.body`), with the tenant's secret.
//! - **Bounded**: tries in flight (`concurrency`), deliveries retrying (`max_pending`), each
//!   try (`timeout_ms`), the pause between tries (500 ms doubling up to `max_backoff_ms`) and
//!   the whole (`retry_ms`).
//!
//! - **Durable** with the Redis task store: the final transition itself puts the task in an
//!   outbox (a sorted set, scored by when its holder's hold runs out), the process that
//!   finished the task delivers it and renews the hold after each try, and an ended delivery
//!   leaves. Every process claims, every [`RESUME_EVERY`], the entries whose hold ran out (the
//!   holder died, or deferred it past `max_pending`) and goes on from the attempts recorded,
//!   within `retry_ms` of the task's end. So a webhook outlives the process that owed it; the
//!   price is at-least-once: a holder that dies after a receiver's 2xx and before writing
//!   `delivered` leaves the next process to send it again (the same `webhook-id`).
//!   The in-memory store lives and dies with its process, and keeps no outbox.

pub mod allow;
pub mod config;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use allow::{AllowEntry, is_public};
pub use config::WebhooksConfig;

use super::{TaskRecord, TaskStore, WEBHOOK_PENDING, WebhookStatus, now_ms};
use crate::tasks::metrics::task_metrics;
use crate::{
    auth::{ApiKey, secret_bytes},
    error::GatewayError,
};

/// How often each process looks for owed webhooks whose holder stopped renewing.
pub const RESUME_EVERY: Duration = Duration::from_secs(2);

/// How long the process delivering a webhook holds it without renewing: the longest pause
/// between tries, plus a try (a lookup and a POST, each up to `timeout_ms`), plus slack.
pub fn hold(cfg: &WebhooksConfig) -> Duration {
    Duration::from_millis(cfg.max_backoff_ms + 2 * cfg.timeout_ms + 5_000)
}

/// `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`.
pub fn sign(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The URL's host and port, once checked against the allow-list; `exact`: an entry names the
/// host itself (so it may be private).
struct Target {
    host: String,
    port: u16,
    addr: Option<IpAddr>,
    exact: bool,
}

pub struct Webhooks {
    allow: Vec<AllowEntry>,
    secrets: HashMap<String, Vec<u8>>,
    default_secret: Option<Vec<u8>>,
    store: Arc<dyn TaskStore>,
    slots: Arc<Semaphore>,
    /// Tasks whose delivery this process is running (at most `max_pending`).
    delivering: Mutex<HashSet<String>>,
    max_pending: usize,
    timeout: Duration,
    retry_ms: u64,
    max_backoff: Duration,
}

impl Webhooks {
    /// From the config (already validated).
    pub fn new(cfg: &WebhooksConfig, keys: &[ApiKey], store: Arc<dyn TaskStore>) -> Self {
        let secrets = keys
            .iter()
            .filter_map(|k| {
                let s = secret_bytes(k.webhook_secret.as_deref()?).ok()?;
                Some((k.tenant.clone(), s))
            })
            .collect();
        Self {
            allow: cfg
                .allow_hosts
                .iter()
                .filter_map(|h| AllowEntry::parse(h).ok())
                .collect(),
            secrets,
            default_secret: cfg.secret.as_deref().and_then(|s| secret_bytes(s).ok()),
            store,
            slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            delivering: Mutex::new(HashSet::new()),
            max_pending: cfg.max_pending,
            timeout: Duration::from_millis(cfg.timeout_ms),
            retry_ms: cfg.retry_ms,
            max_backoff: Duration::from_millis(cfg.max_backoff_ms),
        }
    }

    fn secret(&self, tenant: &str) -> Option<&[u8]> {
        self.secrets
            .get(tenant)
            .or(self.default_secret.as_ref())
            .map(Vec::as_slice)
    }

    fn target(&self, url: &str) -> Result<(reqwest::Url, Target), String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("must be http:// or https://".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let port = u.port_or_known_default().unwrap_or(443);
        let host = u
            .host_str()
            .ok_or("has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_ascii_lowercase();
        let addr = host.parse::<IpAddr>().ok();
        let exact = self.allow.iter().any(|e| match e {
            AllowEntry::Host(h) => *h == host,
            AllowEntry::Net(..) => addr.is_some_and(|a| e.holds(a)),
            AllowEntry::Under(_) => false,
        });
        let under = addr.is_none()
            && self.allow.iter().any(|e| match e {
                AllowEntry::Under(suffix) => host.ends_with(suffix.as_str()),
                _ => false,
            });
        if !exact && !under {
            return Err(format!(
                "host '{host}' is not on webhooks.allow_hosts (private and link-local addresses must be listed by name or network)"
            ));
        }
        Ok((
            u,
            Target {
                host,
                port,
                addr,
                exact,
            },
        ))
    }

    /// Checks a submitted `callback_url` for the tenant: 400 naming the field when refused.
    pub fn check(&self, url: &str, tenant: &str) -> Result<(), GatewayError> {
        if url.len() > 2048 {
            return Err(GatewayError::invalid(
                "callback_url is longer than 2048 characters",
            ));
        }
        self.target(url)
            .map_err(|m| GatewayError::invalid(format!("callback_url {m}")))?;
        if self.secret(tenant).is_none() {
            return Err(GatewayError::invalid(format!(
                "callback_url: no webhook secret is configured for tenant '{tenant}' (webhooks.secret or auth.keys[].webhook_secret)"
            )));
        }
        Ok(())
    }

    /// Delivers the final state of `rec` to its callback, if it has one, in the background.
    pub fn notify(self: &Arc<Self>, rec: TaskRecord) {
        self.start(rec);
    }

    /// `notify`, answering whether a delivery started here.
    fn start(self: &Arc<Self>, rec: TaskRecord) -> bool {
        if rec.callback_url.is_none() || !rec.state.is_final() {
            return false;
        }
        {
            let mut delivering = self.delivering.lock().expect("webhooks lock");
            if delivering.contains(&rec.id) {
                return false;
            }
            if delivering.len() < self.max_pending {
                delivering.insert(rec.id.clone());
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let id = rec.id.clone();
                    this.deliver(rec).await;
                    this.delivering.lock().expect("webhooks lock").remove(&id);
                });
                return true;
            }
        }
        if self.store.keeps_outbox() {
            // Left in the outbox: a process with room claims it when this one's hold ends.
            task_metrics().webhook("deferred");
            return false;
        }
        task_metrics().webhook("dropped");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let status = WebhookStatus {
                state: "failed".into(),
                id: Self::delivery_id(&rec),
                attempts: 0,
                last_status: None,
                last_error: Some("too many deliveries pending (webhooks.max_pending)".into()),
                updated_at_ms: now_ms(),
            };
            let _ = this.store.set_webhook(&rec.id, &status).await;
        });
        false
    }

    /// Takes over the owed webhooks whose holder stopped renewing (as many as there is room
    /// for here), and delivers them. Answers how many it took.
    pub async fn resume(self: &Arc<Self>) -> usize {
        let room = self
            .max_pending
            .saturating_sub(self.delivering.lock().expect("webhooks lock").len())
            .min(1_000);
        let ids = match self.store.claim_webhooks(room).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "claiming owed webhooks failed");
                return 0;
            }
        };
        let mut taken = 0;
        for id in ids {
            match self.store.get(&id).await {
                // Ended since the claim read it: nothing is owed.
                Ok(Some(rec))
                    if rec
                        .webhook
                        .as_ref()
                        .is_some_and(|w| w.state != WEBHOOK_PENDING) => {}
                Ok(Some(rec)) => {
                    if self.start(rec) {
                        task_metrics().webhook("resumed");
                        taken += 1;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "reading a task owed a webhook failed")
                }
            }
        }
        taken
    }

    /// Resumes owed webhooks every [`RESUME_EVERY`] until `stop` (stores that keep an outbox).
    pub fn spawn_resumer(self: Arc<Self>, stop: CancellationToken) {
        if !self.store.keeps_outbox() {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RESUME_EVERY) => {}
                }
                let n = self.resume().await;
                if n > 0 {
                    tracing::info!(webhooks = n, "took over owed webhooks whose holder stopped");
                }
            }
        });
    }

    /// The `webhook-id`: the same for every try of one delivery, in any process.
    fn delivery_id(rec: &TaskRecord) -> String {
        format!("{}.{}", rec.id, rec.finished_at_ms.unwrap_or_default())
    }

    fn body(rec: &TaskRecord) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": format!("task.{}", rec.state.as_str()),
            "timestamp": rec.finished_at_ms.unwrap_or_else(now_ms),
            "data": super::view::TaskView::for_webhook(rec),
        }))
        .unwrap_or_default()
    }

    /// Tries until delivered, refused, or `retry_ms` after the task ended; a delivery taken
    /// over from another process goes on from the tries it recorded.
    async fn deliver(&self, rec: TaskRecord) {
        let url = rec.callback_url.clone().unwrap_or_default();
        let body = Self::body(&rec);
        let id = Self::delivery_id(&rec);
        let deadline_ms = rec.finished_at_ms.unwrap_or_else(now_ms) + self.retry_ms;
        let mut backoff = Duration::from_millis(500);
        let mut status = match rec.webhook {
            Some(s) if s.state == WEBHOOK_PENDING && s.id == id => s,
            _ => WebhookStatus {
                state: WEBHOOK_PENDING.into(),
                id: id.clone(),
                attempts: 0,
                last_status: None,
                last_error: None,
                updated_at_ms: now_ms(),
            },
        };
        loop {
            status.attempts += 1;
            let outcome = {
                let _slot = self.slots.acquire().await.expect("semaphore open");
                self.try_once(&url, &rec.tenant, &id, &body).await
            };
            status.updated_at_ms = now_ms();
            let retry = match outcome {
                Ok(code) if (200..300).contains(&code) => {
                    status.state = "delivered".into();
                    status.last_status = Some(code);
                    status.last_error = None;
                    task_metrics().webhook("delivered");
                    false
                }
                Ok(code) => {
                    status.last_status = Some(code);
                    status.last_error = Some(format!("answered {code}"));
                    true
                }
                Err(Refused(m)) => {
                    status.state = "failed".into();
                    status.last_error = Some(m);
                    task_metrics().webhook("refused");
                    false
                }
                Err(Failed(m)) => {
                    status.last_error = Some(m);
                    true
                }
            };
            if retry && now_ms() + backoff.as_millis() as u64 > deadline_ms {
                status.state = "failed".into();
                task_metrics().webhook("failed");
            } else if retry {
                task_metrics().webhook("retried");
            }
            let _ = self.store.set_webhook(&rec.id, &status).await;
            if !retry || status.state == "failed" {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    /// One try: resolves and checks the host, then POSTs to the address checked.
    async fn try_once(
        &self,
        url: &str,
        tenant: &str,
        id: &str,
        body: &[u8],
    ) -> Result<u16, TryError> {
        let (u, t) = self.target(url).map_err(Refused)?;
        let secret = self
            .secret(tenant)
            .ok_or_else(|| Refused(format!("no webhook secret for tenant '{tenant}'")))?;
        let addr = match t.addr {
            Some(a) => a,
            None => {
                let found: Vec<SocketAddr> = tokio::time::timeout(
                    self.timeout,
                    tokio::net::lookup_host((t.host.as_str(), t.port)),
                )
                .await
                .map_err(|_| Failed(format!("resolving {} timed out", t.host)))?
                .map_err(|e| Failed(format!("resolving {}: {e}", t.host)))?
                .collect();
                let first = found
                    .first()
                    .ok_or_else(|| Failed(format!("{} has no address", t.host)))?
                    .ip();
                // A name allowed by a wildcard must not lead inside: every address it has is
                // public, or held by a listed network.
                if let Some(inner) = found.iter().map(|a| a.ip()).find(|ip| {
                    !is_public(*ip)
                        && !t.exact
                        && !self
                            .allow
                            .iter()
                            .any(|e| matches!(e, AllowEntry::Net(..)) && e.holds(*ip))
                }) {
                    return Err(Refused(format!(
                        "{} resolves to {inner}, a private or link-local address not on webhooks.allow_hosts",
                        t.host
                    )));
                }
                first
            }
        };
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .resolve(&t.host, SocketAddr::new(addr, t.port))
            .build()
            .map_err(|e| Failed(e.to_string()))?;
        let ts = now_ms() / 1000;
        let resp = client
            .post(u)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign(secret, id, ts, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Failed(format!("{e}")))?;
        Ok(resp.status().as_u16())
    }
}

enum TryError {
    /// Not sent, and never will be (not allowed).
    Refused(String),
    /// Sent or not, worth another try.
    Failed(String),
}
use TryError::{Failed, Refused};

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(allow: &[&str]) -> Webhooks {
        let cfg = WebhooksConfig {
            allow_hosts: allow.iter().map(|s| s.to_string()).collect(),
            secret: Some("0123456789abcdef".into()),
            ..Default::default()
        };
        let store = Arc::new(super::super::memory::MemoryTaskStore::new(
            Duration::from_secs(60),
            10,
            1024,
        ));
        Webhooks::new(&cfg, &[], store)
    }

    #[test]
    fn the_allow_list_decides_and_private_addresses_must_be_named() {
        let h = hooks(&[
            "hooks.example.com",
            "*.partner.io",
            "127.0.0.1",
            "10.1.0.0/16",
        ]);
        let ok = |u: &str| h.check(u, "t").is_ok();
        assert!(ok("https://hooks.example.com/done"));
        assert!(ok("https://a.b.partner.io/x"));
        assert!(
            !ok("https://partner.io/x"),
            "the wildcard needs a subdomain"
        );
        assert!(!ok("https://evil.example.org/"));
        assert!(ok("http://127.0.0.1:9000/cb"), "listed exactly");
        assert!(!ok("http://127.0.0.2/cb"), "loopback not listed");
        assert!(!ok("http://169.254.169.254/latest/meta-data"), "link-local");
        assert!(!ok("http://[::1]/cb"));
        assert!(ok("http://10.1.2.3/cb"), "inside a listed network");
        assert!(!ok("http://10.2.0.1/cb"));
        assert!(!ok("ftp://hooks.example.com/"));
        assert!(!ok("https://user:pw@hooks.example.com/"));
        let e = h.check("https://evil.example.org/", "t").unwrap_err();
        assert!(e.to_string().contains("callback_url"), "{e}");
        assert!(hooks(&[]).check("https://hooks.example.com/", "t").is_err());
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let secret = secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(secret_bytes("short").is_err());
        assert!(secret_bytes("whsec_!!").is_err());
    }
}
