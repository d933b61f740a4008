//! Model load and unload on every endpoint at once. Triton answers each for itself; the
//! fleet's answer lists every endpoint's outcome, so a partial failure is visible, and is an
//! error (the first failure's code) as soon as one endpoint failed.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::FleetConfig;
use crate::{
    auth::Caller,
    backend::triton::TritonPool,
    error::GatewayError,
    proto::inference::{
        ModelReadyRequest, ModelRepositoryParameter, RepositoryModelLoadRequest,
        RepositoryModelUnloadRequest,
    },
};

/// How often a loaded model's readiness is asked until it answers ready.
const READY_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Load,
    Unload,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Unload => "unload",
        }
    }
}

/// What one load or unload did on each endpoint, in the pool's order.
#[derive(Debug)]
pub struct Outcome {
    pub model: String,
    pub action: Action,
    pub endpoints: Vec<(String, Result<(), GatewayError>)>,
}

impl Outcome {
    /// `None` when every endpoint succeeded; otherwise one error with the first failure's
    /// code, naming each endpoint that failed and how many did.
    pub fn error(&self) -> Option<GatewayError> {
        let failed: Vec<_> = self
            .endpoints
            .iter()
            .filter_map(|(url, r)| r.as_ref().err().map(|e| (url, e)))
            .collect();
        let (_, first) = failed.first()?;
        let each: Vec<String> = failed
            .iter()
            .map(|(url, e)| format!("{url}: {e}"))
            .collect();
        Some(GatewayError::Backend {
            code: first.grpc_code(),
            message: format!(
                "{} of model '{}' failed on {} of {} Triton endpoints ({})",
                self.action.name(),
                self.model,
                failed.len(),
                self.endpoints.len(),
                each.join("; ")
            ),
        })
    }

    /// Each endpoint's outcome, for the HTTP answer.
    pub fn endpoints_json(&self) -> Value {
        Value::Array(
            self.endpoints
                .iter()
                .map(|(url, r)| match r {
                    Ok(()) => json!({ "endpoint": url, "ok": true }),
                    Err(e) => json!({
                        "endpoint": url,
                        "ok": false,
                        "code": crate::error::code_name(e.grpc_code()),
                        "error": e.to_string(),
                    }),
                })
                .collect(),
        )
    }
}

#[derive(Clone)]
pub struct Fleet {
    pool: Arc<TritonPool>,
    cfg: FleetConfig,
}

impl Fleet {
    pub fn new(pool: Arc<TritonPool>, cfg: &FleetConfig) -> Self {
        Self {
            pool,
            cfg: cfg.clone(),
        }
    }

    /// Loads or unloads `model` (from `repository`, empty for any) on every endpoint at
    /// once, each within `fleet.control_timeout_ms`. Only an admin caller may: others are
    /// answered NOT_FOUND, as for the admin API.
    pub async fn control(
        &self,
        caller: &Caller,
        action: Action,
        repository: &str,
        model: &str,
        parameters: HashMap<String, ModelRepositoryParameter>,
    ) -> Result<Outcome, GatewayError> {
        if !caller.admin {
            return Err(GatewayError::NotFound(
                "model control needs an admin key".into(),
            ));
        }
        if model.is_empty() {
            return Err(GatewayError::invalid("model_name is empty"));
        }
        let timeout = Duration::from_millis(self.cfg.control_timeout_ms);
        let (repo, name, params) = (repository.to_string(), model.to_string(), parameters);
        let endpoints = match action {
            Action::Load => {
                self.pool
                    .on_each(
                        timeout,
                        |mut c, req| {
                            let name = name.clone();
                            async move {
                                c.repository_model_load(req).await?;
                                // Triton may answer the load a moment before the model
                                // answers as ready (404 on its ready route, seen on this
                                // host): the fleet's answer means ready everywhere.
                                loop {
                                    let ready = c
                                        .model_ready(ModelReadyRequest {
                                            name: name.clone(),
                                            version: String::new(),
                                        })
                                        .await?;
                                    if ready.into_inner().ready {
                                        return Ok(());
                                    }
                                    tokio::time::sleep(READY_POLL).await;
                                }
                            }
                        },
                        || RepositoryModelLoadRequest {
                            repository_name: repo.clone(),
                            model_name: name.clone(),
                            parameters: params.clone(),
                        },
                    )
                    .await
            }
            Action::Unload => self
                .pool
                .on_each(
                    timeout,
                    |mut c, req| async move { c.repository_model_unload(req).await.map(|_| ()) },
                    || RepositoryModelUnloadRequest {
                        repository_name: repo.clone(),
                        model_name: name.clone(),
                        parameters: params.clone(),
                    },
                )
                .await,
        };
        // Calls follow the change at once, not at the next probe.
        self.pool.read_placement().await;
        for (url, r) in &endpoints {
            match r {
                Ok(()) => {
                    tracing::info!(endpoint = %url, model, action = action.name(), "model control")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %url, model, action = action.name(), error = %e, "model control failed")
                }
            }
        }
        Ok(Outcome {
            model: model.to_string(),
            action,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_endpoint_makes_the_answer_an_error_that_names_it() {
        let mut o = Outcome {
            model: "m".into(),
            action: Action::Load,
            endpoints: vec![
                ("http://a:8001".into(), Ok(())),
                ("http://b:8001".into(), Ok(())),
            ],
        };
        assert!(o.error().is_none());
        o.endpoints[1].1 = Err(GatewayError::Backend {
            code: tonic::Code::InvalidArgument,
            message: "failed to load 'm'".into(),
        });
        let e = o.error().unwrap();
        assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument);
        let msg = e.to_string();
        assert!(msg.contains("failed on 1 of 2"), "{msg}");
        assert!(msg.contains("http://b:8001: failed to load 'm'"), "{msg}");
        assert!(!msg.contains("http://a:8001"), "{msg}");
        let each = o.endpoints_json();
        assert_eq!(each[0]["ok"], true);
        assert_eq!(each[1]["ok"], false);
        assert_eq!(each[1]["code"], "INVALID_ARGUMENT");
    }
}
