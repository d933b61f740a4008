//! OpenAI's API over HTTP ([`crate::openai`]): `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models` and `/v1/models/{model}`, in OpenAI's JSON and, with `stream`, its
//! server-sent events (chunks, then `data: [DONE]`). Every error, the API key's included,
//! is OpenAI's error object with OpenAI's status, so OpenAI's clients work unchanged.

use std::{
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::stream;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{
    openai_batch,
    state::{Shared, read_body},
};
use crate::{
    api::span_of,
    auth::{Auth, Caller},
    call::Call,
    openai::{
        Generation,
        errors::OpenAiError,
        quota,
        reply::{self, Head, Kind, Whole},
        wire::LmRequest,
    },
};

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        let h = resp.headers_mut();
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        put(h, &self.headers);
        resp
    }
}

fn put(h: &mut HeaderMap, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

pub(super) fn routes(auth: Arc<Auth>) -> Router<Shared> {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/files", post(openai_batch::create_file))
        .route("/v1/files/{id}", get(openai_batch::get_file))
        .route("/v1/files/{id}/content", get(openai_batch::file_content))
        .route("/v1/batches", post(openai_batch::create_batch))
        .route("/v1/batches/{id}", get(openai_batch::get_batch))
        .route("/v1/batches/{id}/cancel", post(openai_batch::cancel_batch))
        .route_layer(middleware::from_fn_with_state(auth, authenticate))
}

/// As the API's own key check, with OpenAI's error (401 `invalid_api_key`, 429).
async fn authenticate(
    State(auth): State<Arc<Auth>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    super::state::admit(&auth, req, next, |e| OpenAiError::from(e).into_response()).await
}

/// When this process started, as the `created` of its models.
fn started() -> u64 {
    static AT: OnceLock<u64> = OnceLock::new();
    *AT.get_or_init(now)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": started(), "owned_by": "infergate"})
}

async fn models(State(s): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let data: Vec<Value> = s
        .features
        .openai
        .models_for(&caller.tenant)
        .iter()
        .map(|m| model_object(&m.name))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match s.features.openai.model(&caller.tenant, &name) {
        Ok(m) => Json(model_object(&m.name)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn chat(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(s, caller, headers, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(s, caller, headers, body, Kind::Text)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run(
    s: Shared,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Result<Response, OpenAiError> {
    let front = Arc::clone(&s.features.openai);
    let bytes = read_body(body, &headers, s.max_request_bytes).await?;
    let req = LmRequest::parse(&bytes)?;
    req.check_others()?;
    let model = front.model(&caller.tenant, &req.model)?;
    let prompts = match kind {
        Kind::Chat => vec![model.render(&req.chat_messages()?)?],
        Kind::Text => req.prompts()?,
    };
    let job = front.job(Arc::clone(&caller.tenant), model, &req, prompts)?;
    let streaming = job.sampling.stream;
    let usage_chunk = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let name = match kind {
        Kind::Chat => "http openai chat",
        Kind::Text => "http openai completions",
    };
    let span = span_of(name, "http", &req.model, &headers);
    let tenant = Arc::clone(&caller.tenant);
    let edge = |r: &mut crate::proto::inference::ModelInferRequest| {
        s.infer
            .at_edge(r, &headers, Some(&tenant), Call::sync(None))
    };
    let mut generation = front.start(job, edge).instrument(span.clone()).await?;
    let head = Head {
        kind,
        id: kind.new_id(),
        created: now(),
        model: req.model,
    };
    let standing = generation.standing;
    let mut resp = if streaming {
        events(head, generation, usage_chunk, span)
    } else {
        generation.collect().instrument(span).await?;
        let choices: Vec<Whole<'_>> = generation
            .choices
            .iter()
            .map(|c| Whole {
                index: c.index,
                text: &c.text,
                finish: c.finish,
            })
            .collect();
        Json(head.whole(&choices, generation.usage())).into_response()
    };
    if let Some(standing) = &standing {
        put(resp.headers_mut(), &quota::headers(standing));
    }
    Ok(resp)
}

/// The answer as server-sent events: for chat, each choice's role first; then its text
/// as it comes; a chunk with its finish reason; with `include_usage` a last chunk with
/// `usage` and no choices; then `[DONE]`. An error after the first event is a last
/// `data: {"error": ...}` event, as OpenAI sends one.
fn events(head: Head, generation: Generation, usage_chunk: bool, span: tracing::Span) -> Response {
    let null_usage = usage_chunk.then(|| Value::Null);
    let mut first = Vec::new();
    if head.kind == Kind::Chat {
        for c in &generation.choices {
            let part = head.part(c.index, Some(""), None, true);
            first.push(event(&head.chunk(vec![part], null_usage.clone())));
        }
    }
    enum Step {
        Go(Generation),
        Done,
    }
    let this = Arc::new(head);
    let body = stream::unfold(Step::Go(generation), move |step| {
        let this = Arc::clone(&this);
        let span = span.clone();
        let null_usage = null_usage.clone();
        async move {
            let Step::Go(mut g) = step else {
                return None;
            };
            let next = g.next().instrument(span).await;
            let out = match next {
                Some(Ok((index, piece))) => {
                    let mut text = String::new();
                    if !piece.text.is_empty() {
                        let part = this.part(index, Some(&piece.text), None, false);
                        text.push_str(&event(&this.chunk(vec![part], null_usage.clone())));
                    }
                    if let Some(why) = piece.finish {
                        let part = this.part(index, None, Some(why), false);
                        text.push_str(&event(&this.chunk(vec![part], null_usage.clone())));
                    }
                    (text, Step::Go(g))
                }
                Some(Err(e)) => (event(&e.body()), Step::Done),
                None => {
                    let mut text = String::new();
                    if usage_chunk {
                        let usage = reply::usage(g.usage());
                        text.push_str(&event(&this.chunk(vec![], Some(usage))));
                    }
                    text.push_str("data: [DONE]\n\n");
                    (text, Step::Done)
                }
            };
            Some((Ok::<_, std::io::Error>(out.0), out.1))
        }
    });
    let first = stream::iter(first.into_iter().map(Ok::<_, std::io::Error>));
    let mut resp = Body::from_stream(futures::StreamExt::chain(first, body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn event(v: &Value) -> String {
    format!("data: {v}\n\n")
}
