//! Large payloads by reference (the claim check). A task whose encoded request is over
//! `tasks.claim_check_bytes` is written to a blob store and its broker message carries only a
//! reference; a result over the size is written there too, and the task store keeps a
//! reference in its place. Brokers and task stores never see the big bytes.
//!
//! The reference rides inside the protobuf the message or the store already carries: a
//! `ModelInferRequest` (or `ModelInferResponse`) with no tensors and the parameter
//! [`CLAIM_PARAM`] naming the blob. So no broker's wire format and no store's schema changed,
//! and a dead letter's message still replays. Clients may not set the parameter themselves.
//!
//! Blobs live under `tasks/<id>/`: `input`, and `result-<attempt>` (one per attempt, so a
//! fenced attempt's late result never overwrites the one that stands). The input goes once its
//! task succeeded; a sweep removes what no task needs any more: the blobs of
//! expired or purged tasks, inputs of finished tasks that are not dead letters, and results
//! the task does not point to. [`super::claim`] puts this around the task store and the
//! broker, so neither the task front nor the worker sees a blob.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload, path::Path as BlobPath};
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::{
    CLAIM_BYTES_PARAM, CLAIM_PARAM, TaskState, TaskStore, dead::DeadLetterStore, now_ms,
    stored_result,
};
use crate::proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
};
use crate::tasks::metrics::task_metrics;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    #[error("blob {key}: {why}")]
    Bad { key: String, why: String },
}

/// The blob store and the size from which payloads go to it.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    threshold: usize,
    /// What the store is, for logs (`file:///...`, `s3://bucket`), without credentials.
    pub describe: String,
}

fn input_key(id: &str) -> String {
    format!("tasks/{id}/input")
}

fn result_key(id: &str, attempt: u32) -> String {
    format!("tasks/{id}/result-{attempt}")
}

fn string_param(s: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.to_string())),
    }
}

fn param_str(p: &std::collections::HashMap<String, InferParameter>) -> Option<&str> {
    match p.get(CLAIM_PARAM)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s),
        _ => None,
    }
}

/// The part of an encoded request that says whether it is a stand-in: its parameters
/// (field 4 of `ModelInferRequest`). Decoding only this skips the tensors without copying.
#[derive(Clone, PartialEq, prost::Message)]
struct RequestParameters {
    #[prost(map = "string, message", tag = "4")]
    parameters: std::collections::HashMap<String, InferParameter>,
}

/// The blob an encoded request stands in for, if it is a stand-in.
pub fn claimed_key(encoded: &[u8]) -> Option<String> {
    let head = RequestParameters::decode(encoded).ok()?;
    param_str(&head.parameters).map(str::to_string)
}

impl Blobs {
    /// Opens the store a URL names: `file:///abs/dir` (created if missing; a local disk or a
    /// mounted volume), `memory:///` (in process, for one machine and tests), or
    /// `s3://bucket[/prefix]`, configured by the usual `AWS_*` variables (`AWS_ENDPOINT` and
    /// `AWS_ALLOW_HTTP=true` for an S3-compatible server such as MinIO).
    pub fn open(url: &str, threshold: usize) -> Result<Self, String> {
        let store: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(format!(
                    "{url}: a file:// blob store needs an absolute path"
                ));
            }
            std::fs::create_dir_all(dir).map_err(|e| format!("{url}: {e}"))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| format!("{url}: {e}"))?,
            )
        } else if url.starts_with("memory:") {
            Arc::new(object_store::memory::InMemory::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(|e| format!("{url}: {e}"))?;
            // The builder takes the bucket from the URL and ignores its path: the prefix is
            // applied here.
            match rest.split_once('/').map(|(_, p)| p.trim_matches('/')) {
                Some(prefix) if !prefix.is_empty() => {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
                }
                _ => Arc::new(s3),
            }
        } else {
            return Err(format!(
                "{url}: a blob store is file:///dir, memory:/// or s3://bucket"
            ));
        };
        Ok(Self {
            store,
            threshold,
            describe: url.to_string(),
        })
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        let n = bytes.len() as u64;
        let out = self
            .store
            .put(&BlobPath::from(key), PutPayload::from_bytes(bytes))
            .await;
        task_metrics().blob_op("put", out.is_ok(), n);
        out.map(drop).map_err(BlobError::from)
    }

    pub async fn read(&self, key: &str) -> Result<Bytes, BlobError> {
        let out = async { self.store.get(&BlobPath::from(key)).await?.bytes().await }.await;
        let n = out.as_ref().map_or(0, |b| b.len() as u64);
        task_metrics().blob_op("get", out.is_ok(), n);
        out.map_err(BlobError::from)
    }

    /// Removes a blob; one already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.store.delete(&BlobPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                task_metrics().blob_op("delete", true, 0);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The broker payload for task `id`'s encoded request for `model`: the request itself
    /// when small, else a stand-in naming the blob it was written to. `None`: small.
    pub async fn check_in_request(
        &self,
        id: &str,
        model: &str,
        encoded: &Bytes,
    ) -> Result<Option<Bytes>, BlobError> {
        if encoded.len() <= self.threshold {
            return Ok(None);
        }
        let key = input_key(id);
        self.put(&key, encoded.clone()).await?;
        let stand_in = ModelInferRequest {
            model_name: model.to_string(),
            parameters: [(CLAIM_PARAM.to_string(), string_param(&key))].into(),
            ..Default::default()
        };
        Ok(Some(stand_in.encode_to_vec().into()))
    }

    /// The encoded request a stand-in names (`key`), read back from the blob store. Only
    /// task `id`'s own input is read, whatever the stand-in says.
    pub async fn check_out_request(&self, id: &str, key: &str) -> Result<Bytes, BlobError> {
        let own = input_key(id);
        if key != own {
            return Err(BlobError::Bad {
                key: own,
                why: "the message names another task's blob".into(),
            });
        }
        self.read(&own).await
    }

    /// What the task store keeps for attempt `attempt`'s encoded response: `None` when it
    /// is small (kept as it is), else a stand-in naming the blob it was written to, and
    /// that blob's key.
    pub async fn check_in_result(
        &self,
        id: &str,
        attempt: u32,
        encoded: &Bytes,
    ) -> Result<Option<(Bytes, String)>, BlobError> {
        if encoded.len() <= self.threshold {
            return Ok(None);
        }
        let key = result_key(id, attempt);
        let size = encoded.len() as i64;
        self.put(&key, encoded.clone()).await?;
        let stand_in = ModelInferResponse {
            parameters: [
                (CLAIM_PARAM.to_string(), string_param(&key)),
                (
                    CLAIM_BYTES_PARAM.to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(size)),
                    },
                ),
            ]
            .into(),
            ..Default::default()
        };
        Ok(Some((stand_in.encode_to_vec().into(), key)))
    }

    /// A stored result's bytes as a stream of chunks, never whole in memory.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>> + Send + use<>, BlobError>
    {
        let got = self.store.get(&BlobPath::from(key)).await?;
        task_metrics().blob_op("stream", true, got.meta.size);
        Ok(got.into_stream())
    }

    /// The input blob of task `id` is no longer needed (its task succeeded).
    pub async fn drop_input(&self, id: &str) {
        if let Err(e) = self.delete(&input_key(id)).await {
            tracing::warn!(task = %id, error = %e, "removing a task's input blob failed; the sweep will");
        }
    }

    /// One pass over the blobs at least `min_age` old: removes each that no task needs (see
    /// [`needed`]). Answers (looked at, removed). At most `limit` blobs are looked at.
    pub async fn sweep(
        &self,
        store: &dyn TaskStore,
        dead: &dyn DeadLetterStore,
        min_age: Duration,
        limit: usize,
    ) -> Result<(usize, usize), BlobError> {
        let cutoff = now_ms().saturating_sub(min_age.as_millis() as u64);
        let prefix = BlobPath::from("tasks");
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .take(limit)
            .try_collect()
            .await?;
        let (mut looked, mut removed) = (0, 0);
        for meta in metas {
            if meta.last_modified.timestamp_millis() as u64 > cutoff {
                continue;
            }
            looked += 1;
            let key = meta.location.to_string();
            let Some((id, name)) = key
                .strip_prefix("tasks/")
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            // Dead letters first, then the record: a replay requeues the record before it
            // removes the dead letter, so one of the two reads always sees the task alive.
            let buried = match dead.get(id).await {
                Ok(d) => d.is_some(),
                Err(_) => continue,
            };
            let task = match store.get_with_result(id).await {
                Ok(t) => t,
                Err(_) => continue,
            };
            let state = task.as_ref().map(|(r, _)| r.state);
            // A submit writes its input before it creates the record, and some stores keep
            // whole seconds only: an input whose task is not in the store yet is a submit in
            // progress until it is IN_FLIGHT_GRACE old, not an orphan.
            let written = meta.last_modified.timestamp_millis().max(0) as u64;
            if name == "input"
                && state.is_none()
                && !buried
                && written + IN_FLIGHT_GRACE.as_millis() as u64 > now_ms()
            {
                continue;
            }
            let pointed = task
                .as_ref()
                .and_then(|(_, res)| res.clone())
                .and_then(|b| ModelInferResponse::decode(b).ok())
                .and_then(|r| stored_result(&r))
                .map(|s| s.key);
            if !needed(name, &key, state, pointed.as_deref(), buried)
                && self.delete(&key).await.is_ok()
            {
                removed += 1;
            }
        }
        Ok((looked, removed))
    }

    /// Sweeps every `every` until `stop`, blobs at least `min_age` old.
    pub fn spawn_sweeper(
        self: Arc<Self>,
        store: Arc<dyn TaskStore>,
        dead: Arc<dyn DeadLetterStore>,
        every: Duration,
        min_age: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match self.sweep(&*store, &*dead, min_age, SWEEP_LIMIT).await {
                    Ok((_, 0)) => {}
                    Ok((looked, removed)) => {
                        tracing::info!(looked, removed, "blob sweep removed blobs no task needs")
                    }
                    Err(e) => tracing::warn!(error = %e, "blob sweep failed"),
                }
            }
        })
    }
}

/// Blobs one sweep looks at; the next sweep goes on.
const SWEEP_LIMIT: usize = 10_000;

/// How long an input blob whose task is not in the store is taken for a submit still in
/// progress (the input is written before the record; S3 dates a multipart object from its
/// start, some servers to the second) rather than an orphan: longer than any submit. An
/// orphan (the record refused and the blob's removal failed) goes 10 minutes after it was
/// written, as does the input of a task that expired before it ran.
pub const IN_FLIGHT_GRACE: Duration = Duration::from_secs(600);

/// Whether blob `name` (`input` or `result-<n>`, full key `key`) of a task is still needed,
/// given the task's state (`None`: expired or never stored), the result key its record points
/// to, and whether it is a dead letter. An input is needed until the task finishes, and while
/// it is a dead letter (a replay sends it again); a result while the task points to it.
pub fn needed(
    name: &str,
    key: &str,
    state: Option<TaskState>,
    pointed: Option<&str>,
    buried: bool,
) -> bool {
    if name == "input" {
        buried || state.is_some_and(|s| !s.is_final())
    } else if name.starts_with("result-") {
        // A running attempt writes its result before the record says so.
        state == Some(TaskState::Running)
            || (state == Some(TaskState::Succeeded) && pointed == Some(key))
    } else {
        // Not ours to judge: left alone.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_sweep_keeps() {
        use TaskState::*;
        let k = "tasks/a/result-2";
        assert!(needed("input", "tasks/a/input", Some(Queued), None, false));
        assert!(needed("input", "tasks/a/input", Some(Running), None, false));
        assert!(!needed(
            "input",
            "tasks/a/input",
            Some(Succeeded),
            None,
            false
        ));
        assert!(
            needed("input", "tasks/a/input", Some(Failed), None, true),
            "a dead letter may be replayed"
        );
        assert!(
            needed("input", "tasks/a/input", None, None, true),
            "dead letters outlive records"
        );
        assert!(
            !needed("input", "tasks/a/input", None, None, false),
            "expired"
        );
        assert!(needed("result-2", k, Some(Succeeded), Some(k), false));
        assert!(
            !needed(
                "result-1",
                "tasks/a/result-1",
                Some(Succeeded),
                Some(k),
                false
            ),
            "a fenced attempt's result"
        );
        assert!(!needed("result-2", k, None, None, false), "expired");
        assert!(
            needed("result-2", k, Some(Running), None, false),
            "an attempt writes its result before the record says so"
        );
        assert!(needed("other", "tasks/a/other", None, None, false));
    }

    #[tokio::test]
    async fn small_payloads_stay_inline_and_big_ones_round_trip() {
        let blobs = Blobs::open("memory:///", 1024).unwrap();
        let small: Bytes = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        }
        .encode_to_vec()
        .into();
        assert_eq!(
            blobs.check_in_request("t1", "m", &small).await.unwrap(),
            None
        );
        assert_eq!(claimed_key(&small), None);

        let big: Bytes = ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![Bytes::from(vec![7u8; 4096])],
            ..Default::default()
        }
        .encode_to_vec()
        .into();
        let msg = blobs
            .check_in_request("t2", "m", &big)
            .await
            .unwrap()
            .unwrap();
        assert!(
            msg.len() < 200,
            "the message carries a reference: {} bytes",
            msg.len()
        );
        assert_eq!(
            ModelInferRequest::decode(msg.clone()).unwrap().model_name,
            "m"
        );
        let key = claimed_key(&msg).unwrap();
        assert_eq!(
            claimed_key(&big),
            None,
            "a request with tensors is no stand-in"
        );
        assert_eq!(blobs.check_out_request("t2", &key).await.unwrap(), big);
        assert!(
            matches!(
                blobs.check_out_request("t1", &key).await,
                Err(BlobError::Bad { .. })
            ),
            "a stand-in naming another task's blob is refused"
        );

        let resp: Bytes = ModelInferResponse {
            model_name: "m".into(),
            raw_output_contents: vec![Bytes::from(vec![1u8; 4096])],
            ..Default::default()
        }
        .encode_to_vec()
        .into();
        let (kept, key) = blobs
            .check_in_result("t2", 3, &resp)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key, "tasks/t2/result-3");
        let stored = stored_result(&ModelInferResponse::decode(kept).unwrap()).unwrap();
        assert_eq!(stored.bytes, resp.len() as u64);
        let streamed: Vec<Bytes> = blobs
            .stream(&stored.key)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(streamed.concat(), resp.to_vec());
        blobs.drop_input("t2").await;
        assert!(blobs.read("tasks/t2/input").await.is_err());
    }
}
