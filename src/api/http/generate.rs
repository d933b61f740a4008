//! Triton's generate extension over HTTP: `/generate` answers one JSON object,
//! `/generate_stream` answers server-sent events, one per response (see
//! [`crate::streams::generate`] for the JSON). A decoupled model's request goes to Triton on
//! its own stream ([`crate::streams`]); another model's is one unary call, batched as any.
//!
//! Unlike Triton, an error before the first event is an ordinary JSON error with its status
//! (Triton sends it as an event under a 400); an error after it is a last event
//! `{"error": "..."}`. A client that disconnects drops the body, which cancels the request
//! in Triton.

use axum::{
    Extension,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{StreamExt, stream};
use serde_json::{Value, json};

use super::state::{Params, Shared, model_and_version, read_body, timeout_header};
use tracing::Instrument;

use crate::{
    api::{observed, observed_open},
    auth::Caller,
    call::{Call, Deadline},
    error::GatewayError,
    proto::inference::{ModelInferRequest, ModelStreamInferResponse},
    streams::{Responses, generate},
    telemetry::trace,
};

/// What a generate call starts with: the request and how it runs.
enum Started {
    /// Boxed: the open stream is large beside a JSON value.
    Stream(Box<Responses>),
    Unary(Value),
}

async fn start(
    s: &Shared,
    m: &str,
    v: &str,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Started, GatewayError> {
    let bytes = read_body(body, headers, s.max_request_bytes).await?;
    let info = s.infer.model_info(m, v).await?;
    let mut req: ModelInferRequest = generate::request(&bytes, &info, m, v)?;
    let deadline = timeout_header(headers)?.and_then(Deadline::after);
    let call = s.infer.at_edge(
        &mut req,
        headers,
        Some(&caller.tenant),
        Call::sync(deadline),
    );
    if s.features.streams.is_decoupled(&req).await {
        return Ok(Started::Stream(Box::new(
            s.features.streams.open(req, deadline, None).await?,
        )));
    }
    let resp = s.infer.infer(req, call).await?;
    Ok(Started::Unary(
        generate::response(&resp)?.unwrap_or_else(|| json!({})),
    ))
}

/// One response's JSON; `None` for the empty final response. Triton's error in band is the
/// stream's error.
fn response_json(resp: ModelStreamInferResponse) -> Result<Option<Value>, GatewayError> {
    if let Some(e) = crate::streams::triton_error(&resp) {
        return Err(e);
    }
    match resp.infer_response {
        Some(r) => generate::response(&r),
        None => Ok(None),
    }
}

#[utoipa::path(
    post,
    path = "/v2/models/{model}/generate",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    request_body(content = Object, description = "the model's inputs by name, with optional `id` and `parameters`"),
    responses(
        (status = 200, description = "the model's outputs by name, `model_name`, `model_version`", body = Object),
        (status = 400, description = "malformed request, or a model that gave other than one response", body = super::schema::ErrorBody),
        (status = 401, description = "no valid API key", body = super::schema::ErrorBody),
        (status = 404, description = "unknown model", body = super::schema::ErrorBody),
        (status = 429, description = "over a rate, quota or stream limit; see Retry-After", body = super::schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = super::schema::ErrorBody),
    ),
)]
pub(super) async fn generate(
    State(s): State<Shared>,
    Path(p): Params,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    let work = async {
        let mut responses = match start(&s, &m, &v, &caller, &headers, body).await? {
            Started::Unary(one) => return Ok(axum::Json(one).into_response()),
            Started::Stream(responses) => responses,
        };
        // A second response is refused (dropping the rest cancels them in Triton).
        match (
            first_event(&mut responses).await?,
            first_event(&mut responses).await?,
        ) {
            (Some(only), None) => Ok(axum::Json(only).into_response()),
            _ => Err(not_one(responses.model())),
        }
    };
    observed("http generate", "http", &m, &headers, work).await
}

fn not_one(model: &str) -> GatewayError {
    GatewayError::invalid(format!(
        "generate expects model '{model}' to give exactly 1 response; use generate_stream for a model that gives any number"
    ))
}

#[utoipa::path(
    post,
    path = "/v2/models/{model}/generate_stream",
    tag = "inference",
    params(("model" = String, Path, description = "model name")),
    request_body(content = Object, description = "as /generate"),
    responses(
        (status = 200, description = "server-sent events, `data: {...}` per response (as /generate's answer), or a last `data: {\"error\": ...}`", content_type = "text/event-stream"),
        (status = 400, description = "malformed request; the message names the field", body = super::schema::ErrorBody),
        (status = 401, description = "no valid API key", body = super::schema::ErrorBody),
        (status = 404, description = "unknown model", body = super::schema::ErrorBody),
        (status = 429, description = "over a rate, quota or stream limit; see Retry-After", body = super::schema::ErrorBody),
        (status = 503, description = "no Triton endpoint answers", body = super::schema::ErrorBody),
    ),
)]
pub(super) async fn generate_stream(
    State(s): State<Shared>,
    Path(p): Params,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let (m, v) = model_and_version(p);
    let (started, span) = observed_open(
        "http generate_stream",
        "http",
        &m,
        &headers,
        start(&s, &m, &v, &caller, &headers, body),
    )
    .await;
    let started = started?;
    let events: Body = match started {
        Started::Unary(one) => Body::from(event(&one)),
        Started::Stream(mut responses) => {
            // The status follows the first response, as Triton's does: an error there is an
            // ordinary error answer.
            let first = first_event(&mut responses).instrument(span.clone()).await?;
            if first.is_some() {
                trace::add_event(&span, "response", 0);
            }
            // The span lives as long as the body: one span per stream, an event per response.
            let rest = stream::unfold(Some((responses, span, 1u64)), |state| async move {
                let (mut responses, span, n) = state?;
                let next = match first_event(&mut responses).instrument(span.clone()).await {
                    Ok(Some(v)) => {
                        trace::add_event(&span, "response", n);
                        (event(&v), Some((responses, span, n + 1)))
                    }
                    Ok(None) => return None,
                    Err(e) => {
                        trace::record_error(&span, &e);
                        (error_event(&e), None)
                    }
                };
                Some((Ok::<_, std::io::Error>(next.0), next.1))
            });
            let first = first.map(|v| Ok(event(&v)));
            Body::from_stream(stream::iter(first).chain(rest))
        }
    };
    let mut out = events.into_response();
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(out)
}

/// The next response that has outputs (the empty final one has none); `None` at the end.
async fn first_event(responses: &mut Responses) -> Result<Option<Value>, GatewayError> {
    while let Some(next) = responses.next().await {
        if let Some(v) = response_json(next?)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn event(v: &Value) -> Bytes {
    let mut b = b"data: ".to_vec();
    // A Value always serialises; one line, as SSE needs.
    serde_json::to_writer(&mut b, v).expect("JSON value");
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

fn error_event(e: &GatewayError) -> Bytes {
    event(&json!({ "error": e.to_string() }))
}
