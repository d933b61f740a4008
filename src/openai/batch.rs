//! OpenAI's Batch API over infergate's durable tasks.
//!
//! - `/v1/files` keeps a JSONL upload in the blob store (`tasks.blob_store`), with a small JSON
//!   description beside it.
//! - `/v1/batches` checks every line as the live endpoint would (model, fields, template) and
//!   submits each as a task on the Triton model, its idempotency key `<batch>/<line>`, so the
//!   broker, retries, dead letters and webhooks apply as to any task, and a worker killed
//!   mid-batch loses no line. The batch's record (its lines' task ids) is a blob too.
//! - `GET` reads the tasks' states; once every line ended it writes the output file (one
//!   answer per succeeded line, in OpenAI's batch output format) and the error file.
//! - Cancel cancels the lines' tasks; those already running or done finish as they would.

use std::collections::HashSet;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    OpenAi, Usage,
    errors::OpenAiError,
    generate::{self, Choice, Sampling, Source},
    reply::{Head, Kind, Whole},
    wire::LmRequest,
};
use crate::{
    auth::Caller,
    error::GatewayError,
    proto::inference::ModelInferResponse,
    tasks::{
        TaskState,
        blobs::Blobs,
        front::{Cancelled, TaskFront},
    },
    telemetry::trace::TraceHeaders,
};

/// Lines submitted or read at once.
const IN_FLIGHT: usize = 16;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn not_found(what: &str, id: &str) -> OpenAiError {
    let mut e = OpenAiError::invalid(what, format!("No such {what}: '{id}'"));
    e.status = 404;
    e
}

fn blob_error(e: impl std::fmt::Display) -> OpenAiError {
    GatewayError::Unavailable(format!("blob store: {e}")).into()
}

/// A file's description, kept beside its content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: String,
    pub tenant: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
}

impl FileMeta {
    pub fn object(&self) -> Value {
        json!({
            "id": self.id, "object": "file", "bytes": self.bytes,
            "created_at": self.created_at, "filename": self.filename,
            "purpose": self.purpose, "status": "processed", "status_details": null,
        })
    }
}

/// One line of a batch: its task and what its answer needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    pub custom_id: String,
    pub task: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub max_tokens: u32,
    pub stops: Vec<String>,
    /// Why the line's task could not be submitted (no task then): it ends as failed, in the
    /// error file, rather than failing the batch after other lines were queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// A line's submission error, in OpenAI's error shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    pub tenant: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// `in_progress`, `cancelling`, `completed`, `cancelled`.
    pub status: String,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub completed: u64,
    pub failed: u64,
    pub metadata: Value,
    pub lines: Vec<Line>,
}

impl BatchRecord {
    pub fn object(&self) -> Value {
        json!({
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": null,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "in_progress_at": self.in_progress_at, "expires_at": self.created_at + 86_400,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at,
            "failed_at": null, "expired_at": null, "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.lines.len(), "completed": self.completed, "failed": self.failed,
            },
            "metadata": self.metadata,
        })
    }

    fn ended(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "cancelled")
    }
}

fn file_key(id: &str) -> String {
    format!("openai/files/{id}")
}

fn meta_key(id: &str) -> String {
    format!("openai/files/{id}.json")
}

fn batch_key(id: &str) -> String {
    format!("openai/batches/{id}.json")
}

/// The Batch API of one request: the front, the task side and its blob store.
pub struct Batches<'a> {
    pub openai: &'a OpenAi,
    pub tasks: &'a TaskFront,
    pub blobs: &'a Blobs,
}

impl Batches<'_> {
    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, OpenAiError> {
        match self.blobs.read(key).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| GatewayError::Internal(format!("{key}: {e}")).into()),
            Err(crate::tasks::blobs::BlobError::Store(object_store::Error::NotFound {
                ..
            })) => Ok(None),
            Err(e) => Err(blob_error(e)),
        }
    }

    async fn write_json(&self, key: &str, v: &impl Serialize) -> Result<(), OpenAiError> {
        let bytes = serde_json::to_vec(v).map_err(|e| GatewayError::Internal(e.to_string()))?;
        self.blobs.put(key, bytes.into()).await.map_err(blob_error)
    }

    async fn put_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: Bytes,
    ) -> Result<FileMeta, OpenAiError> {
        let meta = FileMeta {
            id: format!("file-{}", uuid::Uuid::new_v4().simple()),
            tenant: tenant.to_string(),
            bytes: content.len() as u64,
            created_at: now(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
        };
        self.blobs
            .put(&file_key(&meta.id), content)
            .await
            .map_err(blob_error)?;
        self.write_json(&meta_key(&meta.id), &meta).await?;
        Ok(meta)
    }

    /// Keeps an upload (`purpose` must be `batch`).
    pub async fn upload(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: Bytes,
    ) -> Result<FileMeta, OpenAiError> {
        if purpose != "batch" {
            return Err(OpenAiError::invalid(
                "purpose",
                format!("purpose: only 'batch' files are kept, not '{purpose}'"),
            ));
        }
        self.put_file(tenant, filename, purpose, content).await
    }

    /// A file of this tenant (another tenant's is as unknown as none).
    pub async fn file(&self, tenant: &str, id: &str) -> Result<FileMeta, OpenAiError> {
        match self.read_json::<FileMeta>(&meta_key(id)).await? {
            Some(m) if m.tenant == tenant => Ok(m),
            _ => Err(not_found("file", id)),
        }
    }

    pub async fn content(&self, tenant: &str, id: &str) -> Result<Bytes, OpenAiError> {
        self.file(tenant, id).await?;
        self.blobs.read(&file_key(id)).await.map_err(blob_error)
    }

    /// Checks every line of the input file as the live endpoint would, then submits each as
    /// a task. A bad line refuses the whole batch, naming the line.
    pub async fn create(&self, caller: &Caller, body: &[u8]) -> Result<BatchRecord, OpenAiError> {
        #[derive(Deserialize)]
        struct Create {
            input_file_id: String,
            endpoint: String,
            #[serde(default = "window")]
            completion_window: String,
            #[serde(default)]
            metadata: Value,
        }
        fn window() -> String {
            "24h".into()
        }
        let c: Create = serde_json::from_slice(body)
            .map_err(|e| OpenAiError::invalid("body", format!("malformed request body: {e}")))?;
        let kind = Kind::from_path(&c.endpoint).ok_or_else(|| {
            OpenAiError::invalid(
                "endpoint",
                "endpoint: must be /v1/chat/completions or /v1/completions",
            )
        })?;
        if c.completion_window != "24h" {
            return Err(OpenAiError::invalid(
                "completion_window",
                "completion_window: must be 24h",
            ));
        }
        let input = self.content(&caller.tenant, &c.input_file_id).await?;
        let text = std::str::from_utf8(&input)
            .map_err(|_| OpenAiError::invalid("input_file_id", "the input file is not UTF-8"))?;
        let id = format!("batch_{}", uuid::Uuid::new_v4().simple());
        let mut planned = Vec::new();
        let mut seen = HashSet::new();
        for (i, raw) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if planned.len() as u64 >= self.openai.cfg.max_batch_lines {
                return Err(OpenAiError::invalid(
                    "input_file_id",
                    format!(
                        "the input file has more than {} lines (openai.max_batch_lines)",
                        self.openai.cfg.max_batch_lines
                    ),
                ));
            }
            let at = |e: OpenAiError| {
                OpenAiError::invalid("input_file_id", format!("line {}: {}", i + 1, e.message))
            };
            let (line, req) = self
                .plan(caller, kind, &c.endpoint, raw)
                .await
                .map_err(at)?;
            if !seen.insert(line.custom_id.clone()) {
                return Err(at(OpenAiError::invalid(
                    "custom_id",
                    format!("custom_id '{}' is used twice", line.custom_id),
                )));
            }
            planned.push((format!("{id}/{i}"), line, req));
        }
        if planned.is_empty() {
            return Err(OpenAiError::invalid(
                "input_file_id",
                "the input file has no lines",
            ));
        }
        // Every line is submitted even when one fails (a broker or store failing midway):
        // a line already queued runs, so the batch must name it. A failed submission is that
        // line's error; only a batch none of whose lines was queued is refused.
        let lines: Vec<(Line, Option<OpenAiError>)> = futures::stream::iter(planned)
            .map(|(key, mut line, req)| async move {
                let submitted = self
                    .tasks
                    .submit(req, Some(key), None, TraceHeaders::default(), caller)
                    .await;
                match submitted {
                    Ok((rec, _)) => {
                        line.task = rec.id;
                        (line, None)
                    }
                    Err(e) => {
                        let e = OpenAiError::from(e);
                        line.refused = Some(Refusal {
                            code: e.code.unwrap_or(e.kind).to_string(),
                            message: e.message.clone(),
                        });
                        (line, Some(e))
                    }
                }
            })
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        if lines.iter().all(|(_, e)| e.is_some()) {
            let (_, first) = lines.into_iter().next().expect("a batch has lines");
            return Err(first.expect("every line failed"));
        }
        let lines: Vec<Line> = lines.into_iter().map(|(l, _)| l).collect();
        let at = now();
        let rec = BatchRecord {
            id,
            tenant: caller.tenant.to_string(),
            endpoint: c.endpoint,
            input_file_id: c.input_file_id,
            completion_window: c.completion_window,
            status: "in_progress".into(),
            created_at: at,
            in_progress_at: Some(at),
            finalizing_at: None,
            completed_at: None,
            cancelling_at: None,
            cancelled_at: None,
            output_file_id: None,
            error_file_id: None,
            completed: 0,
            failed: 0,
            metadata: c.metadata,
            lines,
        };
        self.write_json(&batch_key(&rec.id), &rec).await?;
        Ok(rec)
    }

    /// One input line as its task's request (the model answers once: `stream` false).
    async fn plan(
        &self,
        caller: &Caller,
        kind: Kind,
        endpoint: &str,
        raw: &str,
    ) -> Result<(Line, crate::proto::inference::ModelInferRequest), OpenAiError> {
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| OpenAiError::invalid("line", format!("malformed JSON: {e}")))?;
        let custom_id = v["custom_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OpenAiError::invalid("custom_id", "custom_id: required"))?;
        if v["method"].as_str() != Some("POST") || v["url"].as_str() != Some(endpoint) {
            return Err(OpenAiError::invalid(
                "url",
                format!("method and url must be POST {endpoint}"),
            ));
        }
        let body = serde_json::to_vec(&v["body"]).unwrap_or_default();
        let req = LmRequest::parse(&body)?;
        req.check_others()?;
        if req.stream == Some(true) || req.n.is_some_and(|n| n != 1) {
            return Err(OpenAiError::invalid(
                "body",
                "a batch line takes no stream and one choice (n = 1)",
            ));
        }
        let model = self.openai.model(&caller.tenant, &req.model)?;
        let prompts = match kind {
            Kind::Chat => vec![model.render(&req.chat_messages()?)?],
            Kind::Text => req.prompts()?,
        };
        if prompts.len() != 1 {
            return Err(OpenAiError::invalid(
                "prompt",
                "a batch line takes one prompt",
            ));
        }
        let mut job = self
            .openai
            .job(caller.tenant.clone(), model.clone(), &req, prompts)?;
        job.sampling.stream = false;
        let info = self.openai.infer.model_info(&model.target, "").await?;
        let triton = generate::triton_request(&model, &info, &job.prompts[0], &job.sampling, 0)?;
        let line = Line {
            custom_id: custom_id.to_string(),
            task: String::new(),
            model: model.name.clone(),
            prompt_tokens: model.count(&job.prompts[0])?,
            max_tokens: job.sampling.max_tokens,
            stops: job.sampling.stops.clone(),
            refused: None,
        };
        Ok((line, triton))
    }

    async fn record(&self, tenant: &str, id: &str) -> Result<BatchRecord, OpenAiError> {
        match self.read_json::<BatchRecord>(&batch_key(id)).await? {
            Some(r) if r.tenant == tenant => Ok(r),
            _ => Err(not_found("batch", id)),
        }
    }

    /// The batch as it stands; the first look after every line ended writes its files.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<BatchRecord, OpenAiError> {
        let mut rec = self.record(tenant, id).await?;
        if rec.ended() {
            return Ok(rec);
        }
        // Only the lines not seen final yet are read. Owned items: a stream over borrowed
        // lines is not Send for every lifetime.
        let mut states = self.openai.settled.get(id, rec.lines.len());
        let open: Vec<(usize, Option<String>)> = rec
            .lines
            .iter()
            .enumerate()
            .filter(|(i, _)| states[*i].is_none())
            .map(|(i, l)| (i, l.refused.is_none().then(|| l.task.clone())))
            .collect();
        let read: Vec<(usize, Option<TaskState>)> = futures::stream::iter(open)
            .map(|(i, task)| async move {
                let Some(task) = task else {
                    return Ok((i, Some(TaskState::Failed)));
                };
                let got = self.tasks.get(&task, tenant).await?;
                // A task gone from the store (expired) ended too.
                let state = got.map_or(TaskState::Expired, |(r, _)| r.state);
                Ok::<_, OpenAiError>((i, state.is_final().then_some(state)))
            })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await?;
        for (i, state) in read {
            states[i] = state;
        }
        let count = |f: &dyn Fn(TaskState) -> bool| {
            states.iter().flatten().filter(|s| f(**s)).count() as u64
        };
        rec.completed = count(&|s| s == TaskState::Succeeded);
        rec.failed = count(&|s| s != TaskState::Succeeded);
        if states.iter().all(Option::is_some) {
            self.finish(&mut rec, &states).await?;
            self.write_json(&batch_key(id), &rec).await?;
            self.openai.settled.forget(id);
        } else {
            self.openai.settled.put(id, states);
        }
        Ok(rec)
    }

    /// Cancels the lines not yet ended; the batch is `cancelled` once every line ended.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<BatchRecord, OpenAiError> {
        let mut rec = self.record(tenant, id).await?;
        if rec.ended() || rec.status == "cancelling" {
            return self.get(tenant, id).await;
        }
        rec.status = "cancelling".into();
        rec.cancelling_at = Some(now());
        self.write_json(&batch_key(id), &rec).await?;
        let tasks: Vec<String> = rec
            .lines
            .iter()
            .filter(|l| l.refused.is_none())
            .map(|l| l.task.clone())
            .collect();
        futures::stream::iter(tasks)
            .map(|task| async move {
                match self.tasks.cancel(&task, tenant).await? {
                    Cancelled::Done(_) | Cancelled::AlreadyFinal(_) | Cancelled::NotFound => Ok(()),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await
            .map_err(|e: GatewayError| OpenAiError::from(e))?;
        self.get(tenant, id).await
    }

    /// Writes the output file (answers) and the error file (failures), and ends the batch.
    async fn finish(
        &self,
        rec: &mut BatchRecord,
        states: &[Option<TaskState>],
    ) -> Result<(), OpenAiError> {
        rec.finalizing_at = Some(now());
        let kind = Kind::from_path(&rec.endpoint).unwrap_or(Kind::Chat);
        let owner = rec.tenant.clone();
        let items: Vec<(Line, Option<TaskState>)> = rec
            .lines
            .iter()
            .cloned()
            .zip(states.iter().copied())
            .collect();
        let tenant = owner.as_str();
        let outcomes: Vec<(bool, Value)> = futures::stream::iter(items)
            .map(|(line, state)| async move { self.outcome(tenant, kind, &line, state).await })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await?;
        let (mut out, mut err) = (String::new(), String::new());
        for (ok, v) in outcomes {
            let file = if ok { &mut out } else { &mut err };
            file.push_str(&v.to_string());
            file.push('\n');
        }
        let name = |what: &str| format!("{}_{what}.jsonl", rec.id);
        if !out.is_empty() {
            let f = self
                .put_file(tenant, &name("output"), "batch_output", out.into())
                .await?;
            rec.output_file_id = Some(f.id);
        }
        if !err.is_empty() {
            let f = self
                .put_file(tenant, &name("error"), "batch_output", err.into())
                .await?;
            rec.error_file_id = Some(f.id);
        }
        let at = Some(now());
        if rec.status == "cancelling" {
            rec.status = "cancelled".into();
            rec.cancelled_at = at;
        } else {
            rec.status = "completed".into();
            rec.completed_at = at;
        }
        Ok(())
    }

    /// One line's output: `(true, answer)` or `(false, error)`, in OpenAI's batch format.
    async fn outcome(
        &self,
        tenant: &str,
        kind: Kind,
        line: &Line,
        state: Option<TaskState>,
    ) -> Result<(bool, Value), OpenAiError> {
        let entry = |response: Value, error: Value| {
            json!({
                "id": format!("batch_req_{}", if line.task.is_empty() { &line.custom_id } else { &line.task }),
                "custom_id": line.custom_id,
                "response": response,
                "error": error,
            })
        };
        let failed = |code: &str, message: String| {
            Ok((
                false,
                entry(Value::Null, json!({"code": code, "message": message})),
            ))
        };
        match state {
            Some(TaskState::Succeeded) => {}
            Some(TaskState::Cancelled) => {
                return failed(
                    "batch_cancelled",
                    "the batch was cancelled before this line ran".into(),
                );
            }
            Some(TaskState::Failed) if let Some(r) = &line.refused => {
                return failed(&r.code, format!("not submitted: {}", r.message));
            }
            Some(TaskState::Failed) => {
                let (rec, _) = self
                    .tasks
                    .get(&line.task, tenant)
                    .await?
                    .ok_or_else(|| not_found("task", &line.task))?;
                return match rec.error {
                    Some(e) => failed(&e.code, e.message),
                    None => failed("failed", "the line's task failed".into()),
                };
            }
            other => {
                let state = other.map_or("open", |s| s.as_str());
                return failed("batch_expired", format!("the line's task is {state}"));
            }
        }
        let (_, kept) = self
            .tasks
            .responses(&line.task, tenant, 0, 1_000_000)
            .await?
            .ok_or_else(|| not_found("task", &line.task))?;
        let mut texts = std::collections::VecDeque::new();
        for raw in kept.responses {
            let resp = ModelInferResponse::decode(raw)
                .map_err(|e| GatewayError::Internal(format!("a kept response: {e}")))?;
            texts.extend(generate::text_of(&resp)?);
        }
        let model = self.openai.model(tenant, &line.model)?;
        let sampling = Sampling {
            max_tokens: line.max_tokens,
            stops: line.stops.clone(),
            ..Default::default()
        };
        let mut choice = Choice::new(0, Source::Given(texts), &sampling);
        while let Some(piece) = choice.next(&model).await {
            piece?;
        }
        let head = Head {
            kind,
            id: kind.new_id(),
            created: now(),
            model: line.model.clone(),
        };
        let usage = Usage {
            prompt_tokens: line.prompt_tokens,
            completion_tokens: model.count(&choice.text)?,
        };
        let body = head.whole(
            &[Whole {
                index: 0,
                text: &choice.text,
                finish: choice.finish,
            }],
            usage,
        );
        let response = json!({"status_code": 200, "request_id": line.task, "body": body});
        Ok((true, entry(response, Value::Null)))
    }
}
