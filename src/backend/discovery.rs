//! Discovery: a Triton URL whose host is a name (a headless Service, say) stands for every
//! address the name resolves to, one endpoint each. Names are resolved again every
//! `triton.resolve_interval_ms`, and soon (at most once a second) after an endpoint fails; a
//! lookup that fails keeps the name's endpoints as they were, so a DNS outage never empties
//! the pool. IP URLs, and every URL with `resolve_interval_ms = 0`, are one endpoint each,
//! fixed for the life of the process.
//!
//! DNS is the default because it needs no cluster rights; EndpointSlices are not watched.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use http::Uri;
use tokio::sync::Notify;

use super::config::TritonConfig;
use crate::error::GatewayError;

/// The soonest a failure may ask for another lookup after the last one.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Where one endpoint connects, and the configured URL it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The URL connected to: the configured one, or its scheme and port on a resolved IP.
    pub url: String,
    /// The configured URL (its name, for a resolved address).
    pub origin: String,
    /// The name a TLS certificate must carry, when `url` holds a resolved IP.
    pub domain: Option<String>,
}

/// One configured URL.
#[derive(Debug)]
struct Target {
    url: String,
    scheme: String,
    /// A name to resolve; `None` for an IP, or when names are not resolved.
    name: Option<String>,
    port: u16,
}

/// What one round of lookups found.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Every address that is wanted now.
    pub addresses: Vec<Address>,
    /// Configured URLs whose lookup failed: their endpoints stay as they were.
    pub failed: Vec<String>,
}

pub struct Discovery {
    targets: Vec<Target>,
    /// Only when some URL holds a name to resolve.
    resolver: Option<TokioResolver>,
    interval: Duration,
    /// When the last lookup began.
    last: Mutex<Option<Instant>>,
    /// An endpoint failed: look again soon.
    soon: AtomicBool,
    wake: Notify,
}

impl Discovery {
    pub fn new(cfg: &TritonConfig) -> Result<Self, GatewayError> {
        let targets = cfg
            .urls
            .iter()
            .map(|u| target(u, cfg.resolve_interval_ms > 0))
            .collect::<Result<Vec<_>, _>>()?;
        let resolver = if targets.iter().any(|t| t.name.is_some()) {
            Some(resolver(cfg.dns_server.as_deref())?)
        } else {
            None
        };
        Ok(Self {
            targets,
            resolver,
            interval: Duration::from_millis(cfg.resolve_interval_ms),
            last: Mutex::new(None),
            soon: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// True when some URL is a name that is resolved again and again.
    pub fn resolves(&self) -> bool {
        self.resolver.is_some()
    }

    /// The addresses known without a lookup: IP URLs, and names that are not resolved.
    pub fn fixed(&self) -> Vec<Address> {
        self.targets
            .iter()
            .filter(|t| t.name.is_none())
            .map(|t| Address {
                url: t.url.clone(),
                origin: t.url.clone(),
                domain: None,
            })
            .collect()
    }

    /// An endpoint failed (a refused connection, a failed probe): its pod may be gone, so
    /// the names are looked up again soon rather than at the next interval.
    pub fn soon(&self) {
        if self.resolver.is_some() && !self.soon.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// When the next lookup is due (`None`: never).
    pub fn next_at(&self) -> Option<Instant> {
        self.resolver.as_ref()?;
        let Some(last) = *self.last.lock().expect("discovery lock") else {
            return Some(Instant::now());
        };
        let gap = if self.soon.load(Ordering::Relaxed) {
            MIN_GAP.min(self.interval)
        } else {
            self.interval
        };
        Some(last + gap)
    }

    /// Waits until [`Discovery::soon`] is called.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Looks every name up once (all at once, each bounded by the resolver's timeout).
    pub async fn resolve(&self) -> Resolved {
        let Some(resolver) = &self.resolver else {
            return Resolved {
                addresses: self.fixed(),
                failed: Vec::new(),
            };
        };
        *self.last.lock().expect("discovery lock") = Some(Instant::now());
        self.soon.store(false, Ordering::Relaxed);
        let lookups = self.targets.iter().map(|t| async move {
            let Some(name) = &t.name else {
                return (t, Ok(Vec::new()));
            };
            let ips = match resolver.lookup_ip(name.as_str()).await {
                Ok(found) => Ok(found.iter().collect::<Vec<IpAddr>>()),
                // The name is there with no address (every pod gone): no endpoints.
                Err(e) if e.is_no_records_found() => Ok(Vec::new()),
                Err(e) => Err(e),
            };
            (t, ips)
        });
        let mut out = Resolved {
            addresses: self.fixed(),
            failed: Vec::new(),
        };
        for (t, ips) in futures::future::join_all(lookups).await {
            let Some(name) = &t.name else { continue };
            match ips {
                Ok(mut ips) => {
                    ips.sort();
                    ips.dedup();
                    out.addresses.extend(ips.into_iter().map(|ip| Address {
                        url: format!("{}://{}", t.scheme, SocketAddr::new(ip, t.port)),
                        origin: t.url.clone(),
                        domain: Some(name.clone()),
                    }));
                }
                Err(e) => {
                    super::metrics::metrics().resolve_failures.inc();
                    tracing::warn!(url = %t.url, error = %e, "Triton name not resolved; its endpoints are kept");
                    out.failed.push(t.url.clone());
                }
            }
        }
        out
    }
}

/// A configured URL, with the name to resolve when it holds one and `resolve` is on.
fn target(url: &str, resolve: bool) -> Result<Target, GatewayError> {
    let bad = |why: &str| GatewayError::Internal(format!("triton url '{url}': {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| bad("no scheme"))?
        .to_string();
    let auth = uri.authority().ok_or_else(|| bad("no host"))?;
    let port = auth
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let name = (resolve && host.parse::<IpAddr>().is_err()).then(|| host.to_string());
    Ok(Target {
        url: url.to_string(),
        scheme,
        name,
        port,
    })
}

/// A resolver that asks `server` (`ip:port`), or the system's DNS. Nothing is cached: each
/// round asks again, so a pod that left is seen at the next round, whatever the record's TTL.
/// IPv4 first: a dual-stack pod is one endpoint, not two.
fn resolver(server: Option<&str>) -> Result<TokioResolver, GatewayError> {
    let failed = |e: &dyn std::fmt::Display| {
        GatewayError::Internal(format!("triton: no DNS resolver ({e})"))
    };
    let mut builder = match server {
        Some(addr) => {
            let addr: SocketAddr = addr.parse().map_err(|e| failed(&e))?;
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            ns.connections = vec![udp, tcp];
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| failed(&e))?,
    };
    let opts = builder.options_mut();
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    builder.build().map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_are_resolved_and_only_when_resolving_is_on() {
        let t = target("http://triton.ns.svc:8001", true).unwrap();
        assert_eq!((t.name.as_deref(), t.port), (Some("triton.ns.svc"), 8001));
        assert!(
            target("http://triton.ns.svc:8001", false)
                .unwrap()
                .name
                .is_none()
        );
        assert!(target("http://10.1.2.3:8001", true).unwrap().name.is_none());
        assert!(target("http://[::1]:8001", true).unwrap().name.is_none());
        let t = target("https://triton", true).unwrap();
        assert_eq!((t.scheme.as_str(), t.port), ("https", 443));
        assert!(target("not a url", true).is_err());
    }

    #[tokio::test]
    async fn ip_urls_need_no_resolver_and_are_fixed() {
        let cfg = TritonConfig {
            urls: vec!["http://127.0.0.1:1".into(), "http://triton:2".into()],
            resolve_interval_ms: 0,
            ..Default::default()
        };
        let d = Discovery::new(&cfg).unwrap();
        assert!(!d.resolves());
        assert_eq!(d.next_at(), None);
        let urls: Vec<_> = d
            .resolve()
            .await
            .addresses
            .into_iter()
            .map(|a| a.url)
            .collect();
        assert_eq!(urls, ["http://127.0.0.1:1", "http://triton:2"]);
    }

    #[tokio::test]
    async fn a_failure_brings_the_next_lookup_forward_but_not_under_a_second() {
        let cfg = TritonConfig {
            urls: vec!["http://triton.invalid:1".into()],
            resolve_interval_ms: 60_000,
            // Nothing answers here: the lookup fails, which keeps the endpoints.
            dns_server: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let d = Discovery::new(&cfg).unwrap();
        assert!(d.next_at().unwrap() <= Instant::now(), "due at start");
        *d.last.lock().unwrap() = Some(Instant::now());
        let at = d.next_at().unwrap();
        assert!(at > Instant::now() + Duration::from_secs(59));
        d.soon();
        let at = d.next_at().unwrap();
        assert!(at <= Instant::now() + MIN_GAP && at > Instant::now() + MIN_GAP / 2);
    }
}
