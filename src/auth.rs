//! Who is calling, and may they call now: API keys mapped to tenants, and a token bucket per
//! tenant. Checked the same way on HTTP (axum middleware) and gRPC (tonic interceptor); the
//! caller's tenant then rides in the request's extensions.
//!
//! - Keys are kept only as SHA-256 digests; a presented key is hashed and compared with every
//!   digest in constant time (no early exit), so timing says nothing about near misses.
//! - No key, a wrong key: UNAUTHENTICATED / 401 with one message; keys are never logged.
//! - An empty bucket: RESOURCE_EXHAUSTED / 429 with `Retry-After` (seconds until a token).
//! - Probes and metrics (`/livez`, `/readyz`, `/metrics`, `/v2/health/*`, grpc.health.v1)
//!   need no key.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use base64::Engine;
use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};

use crate::{
    error::GatewayError,
    section::{ConfigError, Section, invalid},
};

/// The tenant of every caller when no API keys are configured.
pub const DEFAULT_TENANT: &str = "default";

/// The authenticated caller, in request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: Arc<str>,
    /// Tasks this tenant may have queued or running at once; 0 = unlimited.
    pub max_open_tasks: u64,
    /// May use the admin API (dead letters): a key marked `admin`, or any caller when no
    /// keys are configured (then nothing is private anyway).
    pub admin: bool,
}

impl Default for Caller {
    fn default() -> Self {
        Self {
            tenant: DEFAULT_TENANT.into(),
            max_open_tasks: 0,
            admin: true,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Tokens per second; 0 = unlimited.
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            tokens: burst,
            last: Instant::now(),
            rate,
            burst,
        }
    }

    /// Takes a token, or says how many whole seconds until one is there.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

struct Tenant {
    caller: Caller,
    bucket: Mutex<Bucket>,
}

pub struct Auth {
    /// (SHA-256 of the key, index into `tenants`, admin key).
    keys: Vec<([u8; 32], usize, bool)>,
    tenants: Vec<Tenant>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a request presents: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    if let Some(v) = get("authorization") {
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    get("x-api-key").map(str::trim)
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Arc<Self> {
        let burst = |b: Option<u32>| b.unwrap_or(cfg.burst).max(1);
        let mut tenants: Vec<Tenant> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut keys = Vec::new();
        if cfg.keys.is_empty() {
            tenants.push(Tenant {
                caller: Caller {
                    tenant: DEFAULT_TENANT.into(),
                    max_open_tasks: cfg.max_open_tasks,
                    admin: true,
                },
                bucket: Mutex::new(Bucket::new(cfg.rate_per_s, burst(None))),
            });
        }
        for k in &cfg.keys {
            let i = *index.entry(k.tenant.clone()).or_insert_with(|| {
                tenants.push(Tenant {
                    caller: Caller {
                        tenant: k.tenant.as_str().into(),
                        max_open_tasks: k.max_open_tasks.unwrap_or(cfg.max_open_tasks),
                        admin: false,
                    },
                    bucket: Mutex::new(Bucket::new(
                        k.rate_per_s.unwrap_or(cfg.rate_per_s),
                        burst(k.burst),
                    )),
                });
                tenants.len() - 1
            });
            keys.push((digest(&k.key), i, k.admin));
        }
        Arc::new(Self { keys, tenants })
    }

    /// True when calls need a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Authenticates a request by its headers (HTTP headers or gRPC metadata, through `get`)
    /// and takes a token from its tenant's bucket.
    pub fn admit<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> Result<Caller, GatewayError> {
        let (tenant, admin) = if self.required() {
            let key = presented(get).filter(|k| !k.is_empty()).ok_or_else(|| {
                GatewayError::Unauthenticated(
                    "an API key is required (Authorization: Bearer <key> or x-api-key)".into(),
                )
            })?;
            let d = digest(key);
            let mut found = None;
            for (k, i, admin) in &self.keys {
                if same(k, &d) {
                    found = Some((*i, *admin));
                }
            }
            let (i, admin) = found
                .ok_or_else(|| GatewayError::Unauthenticated("the API key is not valid".into()))?;
            (&self.tenants[i], admin)
        } else {
            (&self.tenants[0], true)
        };
        let taken = tenant
            .bucket
            .lock()
            .expect("bucket lock")
            .take(Instant::now());
        taken.map_err(|secs| GatewayError::RateLimited {
            message: format!(
                "tenant '{}' is over its request rate; retry in {secs} s",
                tenant.caller.tenant
            ),
            retry_after: secs,
        })?;
        let mut caller = tenant.caller.clone();
        caller.admin = admin;
        Ok(caller)
    }

    /// [`Auth::admit`] for HTTP headers.
    pub fn admit_http(&self, headers: &http::HeaderMap) -> Result<Caller, GatewayError> {
        self.admit(|name| headers.get(name).and_then(|v| v.to_str().ok()))
    }
}

/// The caller of a request that went through the auth layer (the default tenant otherwise).
pub fn caller_of(ext: &http::Extensions) -> Caller {
    ext.get::<Caller>().cloned().unwrap_or_default()
}

/// The tenant of a request that went through the auth layer (the default tenant otherwise).
pub fn tenant_of(ext: &http::Extensions) -> Arc<str> {
    caller_of(ext).tenant
}

/// The gRPC interceptor: admits the call or refuses it with the mapped status.
pub fn interceptor(
    auth: Arc<Auth>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        let caller = {
            let md = req.metadata();
            auth.admit(|name| md.get(name).and_then(|v| v.to_str().ok()))?
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The bytes of a webhook signing secret (a tenant's own, or the default): `whsec_<base64>` decoded, or the text itself (16+ bytes either way).
pub fn secret_bytes(s: &str) -> Result<Vec<u8>, String> {
    let bytes = match s.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("is not valid base64 after whsec_: {e}"))?,
        None => s.as_bytes().to_vec(),
    };
    if bytes.len() < 16 {
        return Err("must hold at least 16 bytes".into());
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// [auth] (files only)

/// Who may call and how much. With no `keys`, calls need no key and all belong to the tenant
/// `default`. Keep keys in a Secret-mounted config file (`--config main.toml,keys.toml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<ApiKey>,
    /// Requests per second per tenant (token bucket refill); 0 = unlimited.
    pub rate_per_s: f64,
    /// Bucket size per tenant: requests that may arrive at once.
    pub burst: u32,
    /// Tasks a tenant may have queued or running at once; 0 = unlimited.
    pub max_open_tasks: u64,
}

/// One API key, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
    /// Overrides `auth.rate_per_s` for this key's tenant.
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    /// Overrides `auth.max_open_tasks` for this key's tenant.
    pub max_open_tasks: Option<u64>,
    /// This key may use the admin API (dead letters of every tenant).
    pub admin: bool,
    /// Signs this tenant's completion webhooks (`whsec_<base64>` or 16+ characters);
    /// overrides `webhooks.secret`. Keys of one tenant should carry the same.
    pub webhook_secret: Option<String>,
}

/// Keys never reach logs, even through a debug print of the config.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("key", &"<redacted>")
            .field("tenant", &self.tenant)
            .field("rate_per_s", &self.rate_per_s)
            .field("burst", &self.burst)
            .field("max_open_tasks", &self.max_open_tasks)
            .field("admin", &self.admin)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Section for AuthConfig {
    fn redact(&mut self) {
        for k in &mut self.keys {
            k.key = "<redacted>".into();
            if k.webhook_secret.is_some() {
                k.webhook_secret = Some("<redacted>".into());
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let rate_ok = |r: f64| r.is_finite() && (0.0..=1e7).contains(&r);
        if !rate_ok(self.rate_per_s) {
            return Err(invalid("auth.rate_per_s", "must be 0 (unlimited) ..= 1e7"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let bad = |m: &str| invalid("auth.keys", format!("key #{}: {m}", i + 1));
            if k.key.len() < 16 || !k.key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("must be at least 16 visible ASCII characters"));
            }
            if k.tenant.trim().is_empty() || k.tenant.len() > 128 {
                return Err(bad("tenant must be 1..=128 characters"));
            }
            if k.rate_per_s.is_some_and(|r| !rate_ok(r)) {
                return Err(bad("rate_per_s must be 0 (unlimited) ..= 1e7"));
            }
            if !seen.insert(&k.key) {
                return Err(bad("the same key is listed twice"));
            }
            if let Some(secret) = &k.webhook_secret
                && let Err(m) = secret_bytes(secret)
            {
                return Err(bad(&format!("webhook_secret {m}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ApiKey;
    use super::*;

    fn cfg(rate: f64, burst: u32) -> AuthConfig {
        AuthConfig {
            keys: vec![
                ApiKey {
                    key: "alpha-key-0123456789".into(),
                    tenant: "a".into(),
                    ..Default::default()
                },
                ApiKey {
                    key: "beta-key-0123456789".into(),
                    tenant: "b".into(),
                    rate_per_s: Some(0.0),
                    ..Default::default()
                },
            ],
            rate_per_s: rate,
            burst,
            max_open_tasks: 0,
        }
    }

    fn with<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    #[test]
    fn keys_map_to_tenants_by_either_header() {
        let auth = Auth::new(&cfg(0.0, 1));
        let a = auth
            .admit(with(&[("authorization", "Bearer alpha-key-0123456789")]))
            .unwrap();
        assert_eq!(&*a.tenant, "a");
        let b = auth
            .admit(with(&[("x-api-key", "beta-key-0123456789")]))
            .unwrap();
        assert_eq!(&*b.tenant, "b");
        for bad in [
            vec![],
            vec![("authorization", "Bearer alpha-key-012345678")],
            vec![("authorization", "Basic alpha-key-0123456789")],
            vec![("x-api-key", "")],
        ] {
            let err = auth.admit(with(&bad)).unwrap_err();
            assert_eq!(err.grpc_code(), tonic::Code::Unauthenticated, "{bad:?}");
            assert!(!err.to_string().contains("alpha"), "no key echoed: {err}");
        }
    }

    #[test]
    fn without_keys_everyone_is_the_default_tenant() {
        let auth = Auth::new(&AuthConfig::default());
        assert!(!auth.required());
        assert_eq!(&*auth.admit(with(&[])).unwrap().tenant, DEFAULT_TENANT);
    }

    #[test]
    fn each_tenant_has_its_own_bucket() {
        let auth = Auth::new(&cfg(2.0, 3));
        let a = [("x-api-key", "alpha-key-0123456789")];
        for _ in 0..3 {
            auth.admit(with(&a)).unwrap();
        }
        let err = auth.admit(with(&a)).unwrap_err();
        assert_eq!(err.grpc_code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.retry_after(), Some(1));
        // Tenant b has no limit (rate 0), whatever a did.
        for _ in 0..100 {
            auth.admit(with(&[("x-api-key", "beta-key-0123456789")]))
                .unwrap();
        }
    }

    #[test]
    fn buckets_refill_at_the_rate() {
        let mut b = Bucket::new(10.0, 2);
        let t0 = Instant::now();
        assert!(b.take(t0).is_ok() && b.take(t0).is_ok());
        assert_eq!(b.take(t0), Err(1));
        assert!(b.take(t0 + Duration::from_millis(110)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(110)).is_err());
        let mut slow = Bucket::new(0.2, 1);
        assert!(slow.take(t0).is_ok());
        assert_eq!(slow.take(t0), Err(5));
    }
}
