//! The routes file: TOML, one table per route.
//!
//! ```toml
//! [routes.classifier]
//! sticky_header = "x-user-id"       # optional: a header that keeps a caller on one arm, or
//! sticky_parameter = "user"          # a request parameter (the header wins when both are sent)
//! targets = [
//!   { model = "classifier_v1", weight = 90 },
//!   { model = "classifier_v2", version = "2", weight = 10 },
//! ]
//! fallback = { model = "classifier_small" }    # optional: while a target's circuit is open
//! slo_ms = 200                                  # optional: slower calls count as failures
//! breaker = { consecutive_failures = 5, error_rate = 0.5, window_s = 10, min_calls = 20,
//!             cooldown_ms = 5000, probes = 3 }  # optional, these are the defaults
//! shadow = { model = "classifier_v3", share = 0.1, max_in_flight = 64 }  # optional
//!
//! [cache.classifier]                 # a model or a route; deterministic models only
//! ttl_ms = 60000
//! shared = false                     # true: one entry for every tenant
//! max_entry_bytes = 1048576
//! ```

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use serde::Deserialize;

use crate::breaker::BreakerConfig;

use super::route::{Route, RouteTable, Shadow, Target};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot read the routes file {path}: {message}")]
    Read { path: String, message: String },
    #[error("routes file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid { field: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    routes: HashMap<String, RouteSpec>,
    /// Response caching, by model or route name.
    #[serde(default)]
    cache: HashMap<String, CacheSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSpec {
    ttl_ms: u64,
    /// One entry for every tenant: only for models whose answers are public.
    #[serde(default)]
    shared: bool,
    #[serde(default = "default_max_entry_bytes")]
    max_entry_bytes: usize,
}

fn default_max_entry_bytes() -> usize {
    1 << 20
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    targets: Vec<TargetSpec>,
    #[serde(default)]
    sticky_parameter: Option<String>,
    #[serde(default)]
    sticky_header: Option<String>,
    #[serde(default)]
    fallback: Option<FallbackSpec>,
    #[serde(default)]
    slo_ms: Option<u64>,
    #[serde(default)]
    breaker: Option<BreakerSpec>,
    #[serde(default)]
    shadow: Option<ShadowSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowSpec {
    model: String,
    #[serde(default)]
    version: String,
    /// Share of the route's requests also sent to the shadow, 0.0..=1.0.
    share: f64,
    #[serde(default = "default_shadow_in_flight")]
    max_in_flight: usize,
}

fn default_shadow_in_flight() -> usize {
    64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackSpec {
    model: String,
    #[serde(default)]
    version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BreakerSpec {
    consecutive_failures: u32,
    error_rate: f64,
    window_s: u64,
    min_calls: u32,
    cooldown_ms: u64,
    probes: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        let d = BreakerConfig::default();
        Self {
            consecutive_failures: d.consecutive_failures,
            error_rate: d.error_rate,
            window_s: d.window.as_secs(),
            min_calls: d.min_calls,
            cooldown_ms: d.cooldown.as_millis() as u64,
            probes: d.probes,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    model: String,
    #[serde(default)]
    version: String,
    weight: u32,
}

/// The most targets one route may list.
const MAX_TARGETS: usize = 64;

pub fn read(path: &Path) -> Result<RouteTable, RouteError> {
    let text = std::fs::read_to_string(path).map_err(|e| RouteError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&text).map_err(|e| match e {
        RouteError::Parse { message, .. } => RouteError::Parse {
            path: path.display().to_string(),
            message,
        },
        other => other,
    })
}

pub fn parse(text: &str) -> Result<RouteTable, RouteError> {
    let file: File = toml::from_str(text).map_err(|e| RouteError::Parse {
        path: String::new(),
        message: e.to_string(),
    })?;
    let mut routes = HashMap::new();
    for (name, spec) in file.routes {
        let field = |what: &str| format!("routes.{name}.{what}");
        let bad = |what: &str, message: String| RouteError::Invalid {
            field: field(what),
            message,
        };
        if name.is_empty() || name.len() > 128 || name.contains('/') {
            return Err(bad("", "a route name is 1..=128 characters, no '/'".into()));
        }
        if spec.targets.is_empty() || spec.targets.len() > MAX_TARGETS {
            return Err(bad("targets", format!("list 1..={MAX_TARGETS} targets")));
        }
        let mut targets = Vec::with_capacity(spec.targets.len());
        for (i, t) in spec.targets.into_iter().enumerate() {
            if t.model.is_empty() {
                return Err(bad(&format!("targets[{i}].model"), "is empty".into()));
            }
            if t.weight > 1_000_000 {
                return Err(bad(
                    &format!("targets[{i}].weight"),
                    format!("{} is over 1000000", t.weight),
                ));
            }
            targets.push(Target {
                model: t.model,
                version: t.version,
                weight: t.weight,
            });
        }
        if targets.iter().all(|t| t.weight == 0) {
            return Err(bad(
                "targets",
                "at least one target needs a weight above 0".into(),
            ));
        }
        if spec.sticky_parameter.as_deref().is_some_and(str::is_empty) {
            return Err(bad("sticky_parameter", "is empty".into()));
        }
        let sticky_header = match spec.sticky_header {
            Some(h) => Some(
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| bad("sticky_header", format!("'{h}' is not a header name")))?,
            ),
            None => None,
        };
        let mut route = Route::new(name.clone(), targets, spec.sticky_parameter);
        route.sticky_header = sticky_header;
        if spec.fallback.is_some() || spec.slo_ms.is_some() || spec.breaker.is_some() {
            let fallback = match spec.fallback {
                Some(f) if f.model.is_empty() => {
                    return Err(bad("fallback.model", "is empty".into()));
                }
                Some(f) => Some(Target {
                    model: f.model,
                    version: f.version,
                    weight: 0,
                }),
                None => None,
            };
            if spec.slo_ms.is_some_and(|ms| !(1..=3_600_000).contains(&ms)) {
                return Err(bad("slo_ms", "is outside 1..=3600000".into()));
            }
            let b = spec.breaker.unwrap_or_default();
            let check = |what: &str, ok: bool, range: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(bad(
                        &format!("breaker.{what}"),
                        format!("is outside {range}"),
                    ))
                }
            };
            check(
                "consecutive_failures",
                (1..=10_000).contains(&b.consecutive_failures),
                "1..=10000",
            )?;
            check(
                "error_rate",
                b.error_rate > 0.0 && b.error_rate <= 1.0,
                "(0, 1]",
            )?;
            check("window_s", (1..=3_600).contains(&b.window_s), "1..=3600")?;
            check("min_calls", (1..=4_096).contains(&b.min_calls), "1..=4096")?;
            check(
                "cooldown_ms",
                (1..=3_600_000).contains(&b.cooldown_ms),
                "1..=3600000",
            )?;
            check("probes", (1..=1_000).contains(&b.probes), "1..=1000")?;
            route = route.guarded(
                fallback,
                spec.slo_ms.map(Duration::from_millis),
                BreakerConfig {
                    consecutive_failures: b.consecutive_failures,
                    error_rate: b.error_rate,
                    window: Duration::from_secs(b.window_s),
                    min_calls: b.min_calls,
                    cooldown: Duration::from_millis(b.cooldown_ms),
                    probes: b.probes,
                },
            );
        }
        if let Some(sh) = spec.shadow {
            if sh.model.is_empty() {
                return Err(bad("shadow.model", "is empty".into()));
            }
            if !(0.0..=1.0).contains(&sh.share) {
                return Err(bad(
                    "shadow.share",
                    format!("{} is outside 0.0..=1.0", sh.share),
                ));
            }
            if !(1..=10_000).contains(&sh.max_in_flight) {
                return Err(bad("shadow.max_in_flight", "is outside 1..=10000".into()));
            }
            let target = Target {
                model: sh.model,
                version: sh.version,
                weight: 0,
            };
            route = route.with_shadow(Shadow::new(target, sh.share, sh.max_in_flight));
        }
        routes.insert(name, Arc::new(route));
    }
    // A target is a model, never another route: one hop, no loops.
    for r in routes.values() {
        if let Some(t) = r
            .targets
            .iter()
            .chain(&r.fallback)
            .chain(r.shadow.as_ref().map(|s| &s.target))
            .find(|t| routes.contains_key(&t.model))
        {
            return Err(RouteError::Invalid {
                field: format!("routes.{}.targets", r.name),
                message: format!("'{}' is a route; targets are models", t.model),
            });
        }
    }
    let mut caches = HashMap::new();
    for (name, c) in file.cache {
        let bad = |what: &str, message: &str| RouteError::Invalid {
            field: format!("cache.{name}.{what}"),
            message: message.into(),
        };
        if !(1..=86_400_000).contains(&c.ttl_ms) {
            return Err(bad("ttl_ms", "is outside 1..=86400000"));
        }
        if !(1..=(256 << 20)).contains(&c.max_entry_bytes) {
            return Err(bad("max_entry_bytes", "is outside 1..=268435456"));
        }
        caches.insert(
            name,
            crate::cache::CachePolicy {
                ttl: Duration::from_millis(c.ttl_ms),
                shared: c.shared,
                max_entry_bytes: c.max_entry_bytes,
            },
        );
    }
    Ok(RouteTable { routes, caches })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_loads_and_bad_ones_name_the_setting() {
        let t = parse(
            "[routes.c]\nsticky_parameter = \"user\"\ntargets = [{model = \"a\", weight = 90}, {model = \"b\", version = \"2\", weight = 10}]\n",
        )
        .unwrap();
        let c = &t.routes["c"];
        assert_eq!(c.targets[1].label(), "b:2");
        assert_eq!(c.sticky_parameter.as_deref(), Some("user"));
        for (text, field) in [
            ("[routes.c]\ntargets = []", "routes.c.targets"),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = 0}]",
                "routes.c.targets",
            ),
            (
                "[routes.c]\ntargets = [{model = \"\", weight = 1}]",
                "routes.c.targets[0].model",
            ),
            (
                "[routes.c]\ntargets = [{model = \"d\", weight = 1}]\n[routes.d]\ntargets = [{model = \"a\", weight = 1}]",
                "routes.c.targets",
            ),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = 1, wieght = 2}]",
                "wieght",
            ),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = -1}]",
                "weight",
            ),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = 1}]\nbreaker = { probes = 0 }",
                "routes.c.breaker.probes",
            ),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = 1}]\nfallback = { model = \"\" }",
                "routes.c.fallback.model",
            ),
            (
                "[routes.c]\ntargets = [{model = \"a\", weight = 1}]\nsticky_header = \"x user\"",
                "routes.c.sticky_header",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
