//! `infergate.tasks.v1.TaskService`: the async task API over gRPC (logic in
//! [`crate::tasks::front`]). Watch polls the task store every `WATCH_POLL` and sends each change;
//! it ends after a final state, after `WATCH_LIMIT`, or when the client goes away.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    api::{header_text, traced},
    auth::{caller_of, tenant_of},
    error::GatewayError,
    proto::inference::ModelInferResponse,
    proto::tasks::{
        Attempt, CancelRequest, DeadLetter, DeadLetterFilter, DeadLetterList, DeadLetterSelection,
        GetRequest, PurgeResult, Refusal, ReplayResult, ResultChunk, StreamedResponse,
        SubmitRequest, Task, TaskError, TaskState as WireState, WatchRequest, WebhookDelivery,
        task_admin_server::TaskAdmin, task_service_server::TaskService,
    },
    tasks::{
        TaskRecord, TaskState,
        admin::Selection,
        dead::{DeadEntry, DeadFilter},
        follow::{Followed, RESPONSE_POLL},
        front::{Cancelled, TaskFront, TaskResult},
        result_url,
    },
    telemetry::trace::TraceHeaders,
};

/// Result chunks sent over gRPC are about this size: big enough to be cheap per message, well
/// under any client's message limit.
const CHUNK: usize = 1 << 20;

/// Regroups a stream of byte pieces (a blob store's, often a few KiB) into chunks of about
/// [`CHUNK`] bytes.
fn rechunk(
    pieces: crate::tasks::ResultStream,
) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    futures::stream::unfold((pieces, false), |(mut pieces, done)| async move {
        if done {
            return None;
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            match pieces.next().await {
                Some(Ok(b)) => {
                    buf.extend_from_slice(&b);
                    if buf.len() >= CHUNK {
                        return Some((Ok(buf.freeze()), (pieces, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (pieces, true))),
                None if buf.is_empty() => return None,
                None => return Some((Ok(buf.freeze()), (pieces, true))),
            }
        }
    })
}

const WATCH_POLL: Duration = Duration::from_millis(100);
/// A watch is bounded: clients that need longer watch again.
const WATCH_LIMIT: Duration = Duration::from_secs(3600);

pub struct GrpcTasks {
    front: TaskFront,
}

impl GrpcTasks {
    pub fn new(front: TaskFront) -> Self {
        Self { front }
    }
}

fn wire_state(s: TaskState) -> WireState {
    match s {
        TaskState::Queued => WireState::Queued,
        TaskState::Running => WireState::Running,
        TaskState::Succeeded => WireState::Succeeded,
        TaskState::Failed => WireState::Failed,
        TaskState::Cancelled => WireState::Cancelled,
        TaskState::Expired => WireState::Expired,
    }
}

fn to_wire(rec: &TaskRecord, result: Option<TaskResult>, replayed: bool) -> Task {
    let (response, result_url, result_bytes) = match result {
        Some(TaskResult::Inline(r)) => (Some(r), String::new(), 0),
        Some(TaskResult::Stored(s)) => (None, result_url(&rec.id), s.bytes),
        None => (None, String::new(), 0),
    };
    Task {
        result_url,
        result_bytes,
        webhook: rec.webhook.as_ref().map(|w| WebhookDelivery {
            state: w.state.clone(),
            id: w.id.clone(),
            attempts: w.attempts,
            last_status: w.last_status.map_or(0, u32::from),
            last_error: w.last_error.clone().unwrap_or_default(),
            updated_at_ms: w.updated_at_ms,
        }),
        id: rec.id.clone(),
        model: rec.model.clone(),
        version: rec.version.clone(),
        state: wire_state(rec.state) as i32,
        attempts: rec.attempts,
        queued_at_ms: rec.queued_at_ms,
        started_at_ms: rec.started_at_ms.unwrap_or(0),
        finished_at_ms: rec.finished_at_ms.unwrap_or(0),
        error: rec.error.as_ref().map(|e| TaskError {
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        response,
        replayed,
        streamed: None,
        history: rec
            .history
            .iter()
            .map(|a| Attempt {
                attempt: a.attempt,
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                outcome: a.outcome.clone(),
                error: a.error_code.as_ref().map(|code| TaskError {
                    code: code.clone(),
                    message: a.error_message.clone().unwrap_or_default(),
                }),
            })
            .collect(),
    }
}

fn not_found(id: &str) -> Status {
    GatewayError::TaskNotFound(id.to_string()).into()
}

#[tonic::async_trait]
impl TaskService for GrpcTasks {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<Task>, Status> {
        let (md, ext, r) = req.into_parts();
        let caller = caller_of(&ext);
        let headers = md.into_headers();
        let mut infer = r
            .request
            .ok_or_else(|| GatewayError::InvalidArgument("field 'request' is missing".into()))?;
        self.front.stick(&mut infer, &headers);
        let key = Some(r.idempotency_key).filter(|k| !k.is_empty());
        let callback = Some(r.callback_url).filter(|u| !u.is_empty());
        let incoming = TraceHeaders {
            traceparent: header_text(&headers, "traceparent"),
            tracestate: header_text(&headers, "tracestate"),
        };
        let model = infer.model_name.clone();
        let (rec, created) = traced(
            "grpc TaskService/Submit",
            "grpc",
            &model,
            &headers,
            self.front.submit(infer, key, callback, incoming, &caller),
        )
        .await?;
        Ok(Response::new(to_wire(&rec, None, !created)))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Task>, Status> {
        let tenant = tenant_of(req.extensions());
        let id = req.into_inner().id;
        match self.front.get(&id, &tenant).await? {
            Some((rec, resp)) => Ok(Response::new(to_wire(&rec, resp, false))),
            None => Err(not_found(&id)),
        }
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<Task>, Status> {
        let tenant = tenant_of(req.extensions());
        let id = req.into_inner().id;
        match self.front.cancel(&id, &tenant).await? {
            Cancelled::Done(rec) => Ok(Response::new(to_wire(&rec, None, false))),
            Cancelled::NotFound => Err(not_found(&id)),
            Cancelled::AlreadyFinal(s) => Err(GatewayError::TaskFinal {
                id,
                state: s.as_str(),
            }
            .into()),
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<Task, Status>> + Send>>;
    type GetResultStream = Pin<Box<dyn Stream<Item = Result<ResultChunk, Status>> + Send>>;

    async fn get_result(
        &self,
        req: Request<GetRequest>,
    ) -> Result<Response<Self::GetResultStream>, Status> {
        let tenant = tenant_of(req.extensions());
        let id = req.into_inner().id;
        let Some((total, chunks)) = self.front.result_stream(&id, &tenant).await? else {
            return Err(GatewayError::NotFound(format!(
                "task {id} has no result (unknown, not yours, or not succeeded)"
            ))
            .into());
        };
        let mut first = true;
        let out = rechunk(chunks).map(move |c| {
            let total_bytes = if std::mem::take(&mut first) { total } else { 0 };
            c.map(|data| ResultChunk { data, total_bytes })
                .map_err(|e| GatewayError::Unavailable(format!("reading the result: {e}")).into())
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = tenant_of(req.extensions());
        let WatchRequest { id, responses } = req.into_inner();
        if responses {
            return Ok(Response::new(Box::pin(self.watch_responses(&id, &tenant))));
        }
        let Some((first, resp)) = self.front.get(&id, &tenant).await? else {
            return Err(not_found(&id));
        };
        let front = self.front.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut last = (first.state, first.attempts);
            if tx.send(Ok(to_wire(&first, resp, false))).await.is_err() || first.state.is_final() {
                return;
            }
            while started.elapsed() < WATCH_LIMIT {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                }
                let now = match front.get(&id, &tenant).await {
                    Ok(Some(v)) => v,
                    Ok(None) => {
                        let _ = tx.send(Err(not_found(&id))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if (now.0.state, now.0.attempts) != last {
                    last = (now.0.state, now.0.attempts);
                    let done = now.0.state.is_final();
                    if tx.send(Ok(to_wire(&now.0, now.1, false))).await.is_err() || done {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl GrpcTasks {
    /// Watch with `responses`: the task's states and a decoupled model's responses, polled
    /// more often than states alone, since each response is worth seeing at once.
    fn watch_responses(
        &self,
        id: &str,
        tenant: &str,
    ) -> impl Stream<Item = Result<Task, Status>> + Send + 'static {
        let task_id = id.to_string();
        self.front
            .follow(id, tenant, RESPONSE_POLL, WATCH_LIMIT)
            .map(move |item| match item? {
                Followed::State(rec) => Ok(to_wire(&rec, None, false)),
                Followed::Response {
                    index,
                    attempt,
                    response,
                } => {
                    let response = ModelInferResponse::decode(response).map_err(|e| {
                        GatewayError::Internal(format!("a kept response does not decode: {e}"))
                    })?;
                    Ok(Task {
                        id: task_id.clone(),
                        streamed: Some(StreamedResponse {
                            index,
                            attempt,
                            response: Some(response),
                        }),
                        ..Default::default()
                    })
                }
            })
    }
}

/// `infergate.tasks.v1.TaskAdmin`: dead letters over gRPC (logic in [`crate::tasks::admin`]).
pub struct GrpcTaskAdmin {
    front: TaskFront,
}

impl GrpcTaskAdmin {
    pub fn new(front: TaskFront) -> Self {
        Self { front }
    }
}

fn filter_of(f: Option<DeadLetterFilter>) -> DeadFilter {
    let f = f.unwrap_or_default();
    let text = |s: String| Some(s).filter(|s| !s.is_empty());
    let num = |n: u64| Some(n).filter(|n| *n > 0);
    DeadFilter {
        model: text(f.model),
        tenant: text(f.tenant),
        since_ms: num(f.since_ms),
        until_ms: num(f.until_ms),
        limit: num(u64::from(f.limit)).map(|n| n as usize),
    }
}

fn dead_wire(e: &DeadEntry) -> DeadLetter {
    DeadLetter {
        task: Some(to_wire(&e.record, None, false)),
        tenant: e.record.tenant.clone(),
        reason: e.reason.clone(),
        dead_at_ms: e.dead_at_ms,
        payload_bytes: e.payload_bytes,
    }
}

fn selection_of(s: DeadLetterSelection) -> Selection {
    let f = filter_of(s.filter);
    Selection {
        ids: s.ids,
        model: f.model,
        tenant: f.tenant,
        since_ms: f.since_ms,
        until_ms: f.until_ms,
        limit: f.limit,
        all: s.all,
    }
}

#[tonic::async_trait]
impl TaskAdmin for GrpcTaskAdmin {
    async fn list_dead_letters(
        &self,
        req: Request<DeadLetterFilter>,
    ) -> Result<Response<DeadLetterList>, Status> {
        let caller = caller_of(req.extensions());
        let filter = filter_of(Some(req.into_inner()));
        let (list, depth) = self.front.dead_letters(&caller, &filter).await?;
        Ok(Response::new(DeadLetterList {
            depth: depth.depth,
            dropped: depth.dropped,
            dead_letters: list.iter().map(dead_wire).collect(),
        }))
    }

    async fn get_dead_letter(
        &self,
        req: Request<GetRequest>,
    ) -> Result<Response<DeadLetter>, Status> {
        let caller = caller_of(req.extensions());
        let id = req.into_inner().id;
        let e = self.front.dead_letter(&caller, &id).await?;
        Ok(Response::new(dead_wire(&e)))
    }

    async fn replay_dead_letters(
        &self,
        req: Request<DeadLetterSelection>,
    ) -> Result<Response<ReplayResult>, Status> {
        let caller = caller_of(req.extensions());
        let out = self
            .front
            .replay(&caller, &selection_of(req.into_inner()))
            .await?;
        Ok(Response::new(ReplayResult {
            replayed: out.replayed,
            refused: out
                .refused
                .into_iter()
                .map(|r| Refusal {
                    id: r.id,
                    reason: r.reason,
                })
                .collect(),
        }))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<DeadLetterSelection>,
    ) -> Result<Response<PurgeResult>, Status> {
        let caller = caller_of(req.extensions());
        let purged = self
            .front
            .purge(&caller, &selection_of(req.into_inner()))
            .await?;
        Ok(Response::new(PurgeResult { purged }))
    }
}
