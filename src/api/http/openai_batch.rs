//! OpenAI's Files and Batch API over HTTP ([`crate::openai::batch`]): `POST /v1/files`
//! (multipart, as OpenAI's clients upload), `GET /v1/files/{id}` and `/content`,
//! `POST /v1/batches`, `GET /v1/batches/{id}` and `POST /v1/batches/{id}/cancel`. They need
//! the task side and a blob store (`tasks.blob_store`); without them they answer 501.

use axum::{
    Extension, Json,
    body::Body,
    extract::{Multipart, Path, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};

use super::state::{Shared, read_body};
use crate::{
    auth::Caller,
    error::GatewayError,
    openai::{batch::Batches, errors::OpenAiError},
};

fn batches(s: &Shared) -> Result<Batches<'_>, OpenAiError> {
    let tasks = s.tasks.as_ref().ok_or_else(|| {
        GatewayError::Unimplemented("the Batch API needs the task side (tasks.broker)".into())
    })?;
    let blobs = tasks.tasks.blobs.as_deref().ok_or_else(|| {
        GatewayError::Unimplemented(
            "the Batch API keeps its files in tasks.blob_store, which is not set".into(),
        )
    })?;
    Ok(Batches {
        openai: &s.features.openai,
        tasks,
        blobs,
    })
}

fn answer(r: Result<serde_json::Value, OpenAiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn bad_form(e: impl std::fmt::Display) -> OpenAiError {
    OpenAiError::invalid("file", format!("malformed multipart body: {e}"))
}

/// `purpose` and `file` from a multipart upload, the file at most `openai.max_file_bytes`.
async fn upload(
    s: &Shared,
    caller: &Caller,
    mut form: Multipart,
) -> Result<serde_json::Value, OpenAiError> {
    let b = batches(s)?;
    let limit = s.features.openai.config().max_file_bytes;
    let (mut purpose, mut file) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                let mut e = OpenAiError::invalid(
                    "file",
                    format!("file: larger than {limit} bytes (openai.max_file_bytes)"),
                );
                e.status = 413;
                return Err(e);
            }
            bytes.extend_from_slice(&chunk);
        }
        match name.as_str() {
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).into_owned()),
            "file" => file = Some((filename, bytes)),
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| OpenAiError::invalid("purpose", "purpose: required"))?;
    let (filename, bytes) = file.ok_or_else(|| OpenAiError::invalid("file", "file: required"))?;
    let meta = b
        .upload(&caller.tenant, &filename, &purpose, bytes.into())
        .await?;
    Ok(meta.object())
}

pub(super) async fn create_file(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    form: Multipart,
) -> Response {
    answer(upload(&s, &caller, form).await)
}

pub(super) async fn get_file(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let r = async { Ok(batches(&s)?.file(&caller.tenant, &id).await?.object()) };
    answer(r.await)
}

pub(super) async fn file_content(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match async { batches(&s)?.content(&caller.tenant, &id).await }.await {
        Ok(bytes) => {
            let mut resp = Body::from(bytes).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jsonl"),
            );
            resp
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn create_batch(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(body, &headers, s.max_request_bytes).await?;
        Ok(batches(&s)?.create(&caller, &bytes).await?.object())
    };
    answer(r.await)
}

pub(super) async fn get_batch(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let r = async { Ok(batches(&s)?.get(&caller.tenant, &id).await?.object()) };
    answer(r.await)
}

pub(super) async fn cancel_batch(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let r = async { Ok(batches(&s)?.cancel(&caller.tenant, &id).await?.object()) };
    answer(r.await)
}
