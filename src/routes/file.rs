//! The routes file: TOML, one table per route.
//!
//! ```toml
//! [routes.classifier]
//! sticky_parameter = "user"          # optional: a request parameter that keeps a caller on one arm
//! targets = [
//!   { model = "classifier_v1", weight = 90 },
//!   { model = "classifier_v2", version = "2", weight = 10 },
//! ]
//! ```

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;

use super::route::{Route, RouteTable, Target};

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    targets: Vec<TargetSpec>,
    #[serde(default)]
    sticky_parameter: Option<String>,
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
        routes.insert(
            name.clone(),
            Arc::new(Route::new(name, targets, spec.sticky_parameter)),
        );
    }
    // A target is a model, never another route: one hop, no loops.
    for r in routes.values() {
        if let Some(t) = r.targets.iter().find(|t| routes.contains_key(&t.model)) {
            return Err(RouteError::Invalid {
                field: format!("routes.{}.targets", r.name),
                message: format!("'{}' is a route; targets are models", t.model),
            });
        }
    }
    Ok(RouteTable { routes })
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
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
