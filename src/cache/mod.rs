//! The response cache: opt-in per model or route (`[cache.NAME]` in the routes file), for
//! deterministic models. An answer is kept under a SHA-256 of everything that decides it (the
//! name called, version, inputs with their bytes, outputs asked for, parameters) and of the
//! caller's tenant unless the entry is declared shared; for a TTL, in memory bounded in bytes,
//! least recently used first out, or in Redis, shared by every front end. A hit is marked in the answer (the response parameter
//! `infergate_cache`, and the HTTP header `infergate-cache`) and counted.

pub mod config;
pub mod memory;
pub mod metrics;
pub mod redis;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::call::TenantId;
use crate::proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
};

pub use memory::{Key, MemoryCache};
pub use redis::RedisCache;

/// Where answers are kept.
pub enum Store {
    Memory(MemoryCache),
    Redis(RedisCache),
}

impl Store {
    /// The answer kept under `key`; a store that fails is a miss, counted.
    pub async fn get(&self, key: &Key) -> Option<Arc<ModelInferResponse>> {
        match self {
            Self::Memory(m) => m.get(key, Instant::now()),
            Self::Redis(r) => match r.get(key).await {
                Ok(found) => found.map(Arc::new),
                Err(e) => {
                    failed("lookup", &e);
                    None
                }
            },
        }
    }

    /// Keeps `resp` (`bytes` encoded) under `key` for `ttl`.
    pub async fn put(&self, key: Key, resp: ModelInferResponse, bytes: usize, ttl: Duration) {
        let m = metrics::metrics();
        match self {
            Self::Memory(c) => {
                let evicted = c.put(key, Arc::new(resp), bytes, Instant::now() + ttl);
                m.evictions.inc_by(evicted);
                m.bytes.set(c.usage().0 as i64);
            }
            Self::Redis(r) => {
                if let Err(e) = r.put(&key, &resp, ttl).await {
                    failed("store", &e);
                }
            }
        }
    }
}

fn failed(what: &'static str, err: &str) {
    metrics::metrics().error(what);
    tracing::debug!(error = %err, "response cache {what} failed (Redis)");
}

/// How one model or route is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// One entry for every tenant (a public model); otherwise each tenant has its own.
    pub shared: bool,
    /// Larger answers are not kept.
    pub max_entry_bytes: usize,
}

/// The response parameter that marks an answer from the cache.
pub const HIT_PARAMETER: &str = "infergate_cache";

/// Request parameters that do not change an answer: left out of the key.
const NOT_IN_KEY: [&str; 4] = [
    "timeout",
    "priority",
    "sequence_id",
    crate::call::STICKY_CARRIER,
];

fn params(h: &mut Sha256, p: &std::collections::HashMap<String, InferParameter>) {
    let mut keys: Vec<&String> = p
        .keys()
        .filter(|k| !NOT_IN_KEY.contains(&k.as_str()))
        .collect();
    keys.sort();
    h.update((keys.len() as u64).to_le_bytes());
    for k in keys {
        field(h, k.as_bytes());
        field(h, &p[k].encode_to_vec());
    }
}

/// A length-prefixed field, so that no two different requests give the same byte stream.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The key of a request as called (`req.model_name` is the model or route name the caller
/// used), for `tenant` (`None`: a shared entry).
pub fn key(req: &ModelInferRequest, tenant: Option<&TenantId>) -> Key {
    let mut h = Sha256::new();
    field(&mut h, tenant.map_or(&[][..], |t| &t.0[..]));
    h.update([u8::from(tenant.is_some())]);
    field(&mut h, req.model_name.as_bytes());
    field(&mut h, req.model_version.as_bytes());
    params(&mut h, &req.parameters);
    h.update((req.inputs.len() as u64).to_le_bytes());
    for i in &req.inputs {
        field(&mut h, i.name.as_bytes());
        field(&mut h, i.datatype.as_bytes());
        let shape: Vec<u8> = i.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        field(&mut h, &shape);
        params(&mut h, &i.parameters);
        field(
            &mut h,
            &i.contents
                .as_ref()
                .map(Message::encode_to_vec)
                .unwrap_or_default(),
        );
    }
    h.update((req.outputs.len() as u64).to_le_bytes());
    for o in &req.outputs {
        field(&mut h, o.name.as_bytes());
        params(&mut h, &o.parameters);
    }
    h.update((req.raw_input_contents.len() as u64).to_le_bytes());
    for raw in &req.raw_input_contents {
        field(&mut h, raw);
    }
    h.finalize().into()
}

/// Marks an answer as served from the cache.
pub fn mark_hit(resp: &mut ModelInferResponse) {
    resp.parameters.insert(
        HIT_PARAMETER.into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("hit".into())),
        },
    );
}

pub fn is_hit(resp: &ModelInferResponse) -> bool {
    resp.parameters.contains_key(HIT_PARAMETER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(x: u8) -> ModelInferRequest {
        let mut r = ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![vec![x; 8].into()],
            ..Default::default()
        };
        r.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(i64::from(x))),
            },
        );
        r
    }

    #[test]
    fn keys_follow_what_decides_an_answer() {
        let (a, b) = (TenantId::of("a"), TenantId::of("b"));
        let (a, b) = (Some(&a), Some(&b));
        assert_eq!(key(&req(1), a), key(&req(1), a));
        assert_ne!(key(&req(1), a), key(&req(2), a), "input bytes");
        assert_ne!(key(&req(1), a), key(&req(1), b), "tenant");
        assert_ne!(
            key(&req(1), a),
            key(&req(1), None),
            "shared is its own space"
        );
        let mut r = req(1);
        r.id = "another id".into();
        if let Some(p) = r.parameters.get_mut("timeout") {
            p.parameter_choice = Some(ParameterChoice::Int64Param(99));
        }
        assert_eq!(key(&r, a), key(&req(1), a), "id and timeout do not count");
        r.model_version = "2".into();
        assert_ne!(key(&r, a), key(&req(1), a), "version");
    }
}
