//! The task API's one implementation, shared by HTTP and gRPC: check the request, create the
//! record (or find it by idempotency key), queue it, and read or cancel tasks.

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;

use super::{
    Change, RESERVED_PARAM_PREFIX, ResultStream, StoreError, StoredResult, TaskRecord, TaskState,
    new_task_id,
    outbox::{self, OnFailure, Queued},
    stored_result,
};
use crate::tasks::metrics::task_metrics;
use crate::{
    auth::Caller,
    error::GatewayError,
    infer::InferService,
    proto::inference::{ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice},
    queue::{QueueError, TaskMessage},
    telemetry::trace::TraceHeaders,
};

#[derive(Clone)]
pub struct TaskFront {
    pub tasks: super::parts::Tasks,
    pub infer: InferService,
}

/// A succeeded task's result: in the task store, or (over the claim-check size) kept
/// elsewhere, read by streaming it.
pub enum TaskResult {
    Inline(ModelInferResponse),
    Stored(StoredResult),
}

/// What a cancel found.
pub enum Cancelled {
    Done(Box<TaskRecord>),
    AlreadyFinal(TaskState),
    NotFound,
}

/// Why a task was not queued.
fn refused(e: QueueError) -> GatewayError {
    match e {
        QueueError::Full(n) => {
            GatewayError::Overloaded(format!("the task queue is full ({n} tasks waiting)"))
        }
        QueueError::Backend(m) => GatewayError::Unavailable(format!("broker unavailable: {m}")),
    }
}

pub(super) fn store_error(e: StoreError) -> GatewayError {
    match e {
        StoreError::Backend(m) => GatewayError::Unavailable(format!("task store unavailable: {m}")),
        // A task ends in milliseconds to seconds: a second is a fair first wait.
        e @ StoreError::QuotaExceeded { .. } => GatewayError::RateLimited {
            message: e.to_string(),
            retry_after: 1,
        },
        other => GatewayError::Internal(other.to_string()),
    }
}

/// The request's `priority` parameter (Triton's: 1 is highest, 0 default) as a broker priority
/// (0..=9, 9 highest; default 4).
fn broker_priority(req: &ModelInferRequest) -> u8 {
    let level = match req
        .parameters
        .get("priority")
        .and_then(|p| p.parameter_choice.clone())
    {
        Some(ParameterChoice::Int64Param(v)) if v > 0 => v as u64,
        Some(ParameterChoice::Uint64Param(v)) if v > 0 => v,
        _ => return 4,
    };
    9u64.saturating_sub(level - 1).min(9) as u8
}

impl TaskFront {
    /// Checks and queues a request. Returns the task and whether it was created now (false:
    /// an earlier task with the same idempotency key).
    /// A route's sticky header, carried in the request to where its arm is picked (at
    /// accept: a task runs on the target picked then).
    pub fn stick(&self, req: &mut ModelInferRequest, headers: &http::HeaderMap) {
        self.infer.routes().stick(req, headers);
    }

    pub async fn submit(
        &self,
        mut req: ModelInferRequest,
        idempotency_key: Option<String>,
        callback_url: Option<String>,
        incoming: TraceHeaders,
        caller: &Caller,
    ) -> Result<(TaskRecord, bool), GatewayError> {
        // Bad requests are refused now, not turned into failed tasks.
        if let Some(name) = req
            .parameters
            .keys()
            .find(|k| k.starts_with(RESERVED_PARAM_PREFIX))
        {
            return Err(GatewayError::invalid(format!(
                "parameter '{name}' is reserved for infergate"
            )));
        }
        self.infer.check(&mut req).await?;
        if let Some(k) = &idempotency_key
            && (k.is_empty() || k.len() > 256)
        {
            return Err(GatewayError::invalid(
                "the idempotency key must be 1..=256 characters",
            ));
        }
        if let Some(url) = &callback_url {
            self.tasks.webhooks.check(url, &caller.tenant)?;
        }
        let id = new_task_id();
        // The store keeps the message with the record until the broker holds it, and may
        // rewrite it (the claim check); what it kept is what is published.
        let mut msg = TaskMessage {
            task_id: id.clone(),
            model: req.model_name.clone(),
            priority: broker_priority(&req),
            payload: req.encode_to_vec().into(),
            trace: TraceHeaders::outgoing(&incoming),
        };
        let mut rec = TaskRecord::new(
            id.clone(),
            &caller.tenant,
            &req.model_name,
            &req.model_version,
            idempotency_key,
        );
        rec.callback_url = callback_url;
        let (rec, created) = self
            .tasks
            .store
            .create(rec, caller.max_open_tasks, Some(&mut msg))
            .await
            .map_err(store_error)?;
        if !created {
            // An earlier submission under this key whose publish was never confirmed (the
            // broker or store failed under it): queued now, with its own stored message.
            if let Some(earlier) = self
                .tasks
                .store
                .unpublished(&rec.id)
                .await
                .map_err(store_error)?
            {
                let queued = outbox::queue(
                    &*self.tasks.store,
                    &*self.tasks.broker,
                    self.tasks.broker_kind,
                    &earlier,
                    OnFailure::Keep,
                )
                .await;
                if let Queued::Withdrawn(e) | Queued::Kept(e) = queued {
                    return Err(refused(e));
                }
            }
            return Ok((rec, false));
        }
        task_metrics()
            .task_message_bytes
            .observe(msg.wire_size() as f64);
        match outbox::queue(
            &*self.tasks.store,
            &*self.tasks.broker,
            self.tasks.broker_kind,
            &msg,
            OnFailure::Withdraw,
        )
        .await
        {
            Queued::Yes => {}
            // The relay publishes a kept message later.
            Queued::Withdrawn(e) | Queued::Kept(e) => return Err(refused(e)),
        }
        task_metrics().task_state(TaskState::Queued.as_str());
        self.infer.activity().task_accepted();
        Ok((rec, true))
    }

    /// The task and, once it succeeded, its response. Another tenant's task is `None`, as
    /// if it did not exist.
    pub async fn get(
        &self,
        id: &str,
        tenant: &str,
    ) -> Result<Option<(TaskRecord, Option<TaskResult>)>, GatewayError> {
        let Some((rec, result)) = self
            .tasks
            .store
            .get_with_result(id)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        if rec.tenant != tenant {
            return Ok(None);
        }
        let resp = result
            .filter(|_| rec.state == TaskState::Succeeded)
            .and_then(|b| ModelInferResponse::decode(b).ok())
            .map(|r| match stored_result(&r) {
                Some(s) => TaskResult::Stored(s),
                None => TaskResult::Inline(r),
            });
        Ok(Some((rec, resp)))
    }

    /// A decoupled model's responses kept with the task, from index `from` (at most `max`),
    /// with the task as it is now; `None` for no such task (or another tenant's).
    pub async fn responses(
        &self,
        id: &str,
        tenant: &str,
        from: usize,
        max: usize,
    ) -> Result<Option<(TaskRecord, super::Kept)>, GatewayError> {
        // The record first: a response kept after it was read shows on the next read, and a
        // final record read first means every response is in the list.
        let Some(rec) = self.tasks.store.get(id).await.map_err(store_error)? else {
            return Ok(None);
        };
        if rec.tenant != tenant {
            return Ok(None);
        }
        let kept = self
            .tasks
            .store
            .responses(id, from, max)
            .await
            .map_err(store_error)?
            .unwrap_or_default();
        Ok(Some((rec, kept)))
    }

    /// A succeeded task's encoded result as a stream (from where the claim check kept it,
    /// never whole in memory), with its length. `None`: no such task for this tenant, or
    /// no result (yet).
    pub async fn result_stream(
        &self,
        id: &str,
        tenant: &str,
    ) -> Result<Option<(u64, ResultStream)>, GatewayError> {
        let Some((_, Some(result))) = self.get(id, tenant).await? else {
            return Ok(None);
        };
        match result {
            TaskResult::Inline(r) => {
                let b = Bytes::from(r.encode_to_vec());
                Ok(Some((
                    b.len() as u64,
                    futures::stream::iter([Ok(b)]).boxed(),
                )))
            }
            TaskResult::Stored(s) => {
                let stream = self
                    .tasks
                    .store
                    .open_result(&s)
                    .await
                    .map_err(store_error)?;
                Ok(Some((s.bytes, stream)))
            }
        }
    }

    pub async fn cancel(&self, id: &str, tenant: &str) -> Result<Cancelled, GatewayError> {
        // The tenant never changes, so checking it before the transition is enough.
        match self.tasks.store.get(id).await.map_err(store_error)? {
            Some(rec) if rec.tenant == tenant => {}
            _ => return Ok(Cancelled::NotFound),
        }
        match self
            .tasks
            .store
            .transition(id, TaskState::Cancelled, Change::default())
            .await
        {
            Ok(rec) => {
                task_metrics().task_state(TaskState::Cancelled.as_str());
                self.tasks.webhooks.notify(rec.clone());
                Ok(Cancelled::Done(Box::new(rec)))
            }
            Err(StoreError::NotFound(_)) => Ok(Cancelled::NotFound),
            Err(StoreError::Conflict { from, .. }) => Ok(Cancelled::AlreadyFinal(from)),
            Err(e) => Err(store_error(e)),
        }
    }
}
