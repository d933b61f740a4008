//! One error type for the request path, mapped once to a gRPC status and once to an HTTP
//! response, so both protocols always agree on what a failure means.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("unknown model '{model}'{}", version_suffix(.version))]
    ModelNotFound { model: String, version: String },
    /// Triton knows no such model on any of infergate's endpoints (their repository index).
    #[error("{}", not_placed(.model, .version, *.endpoints))]
    ModelNotPlaced {
        model: String,
        version: String,
        endpoints: usize,
    },
    /// The request is malformed; the message names the offending field.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such task, or another tenant's (a tenant never learns which).
    #[error("task '{0}' not found")]
    TaskNotFound(String),
    /// The task reached a final state (`succeeded`, `failed`, `cancelled`) before the change.
    #[error("task '{id}' is already {state} and cannot be cancelled")]
    TaskFinal { id: String, state: &'static str },
    /// Anything else the caller may not see or that is not there (a dead letter; the admin
    /// API for a caller that is not an admin).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Overloaded(String),
    /// The tenant's request rate is used up; `retry_after` in whole seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// No valid API key (the message never repeats what was presented).
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Something the protocol allows that infergate does not do (a compression it lacks).
    #[error("{0}")]
    Unimplemented(String),
    /// Triton answered with an error: its code and message are passed on unchanged.
    #[error("{message}")]
    Backend { code: tonic::Code, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// With one endpoint, as Triton itself would say it.
fn not_placed(model: &str, version: &str, endpoints: usize) -> String {
    match endpoints {
        1 => format!("unknown model '{model}'{}", version_suffix(version)),
        n => format!(
            "model '{model}'{} is ready on none of the {n} Triton endpoints",
            version_suffix(version)
        ),
    }
}

fn version_suffix(version: &str) -> String {
    if version.is_empty() {
        String::new()
    } else {
        format!(" version '{version}'")
    }
}

impl GatewayError {
    /// True when the model's server, not the request, failed: what a route's circuit
    /// breaker counts against its target.
    pub fn is_target_fault(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::DeadlineExceeded(_)
                | Self::Backend { .. }
                | Self::Internal(_)
        )
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::ModelNotFound { .. } | Self::ModelNotPlaced { .. } => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::TaskNotFound(_) | Self::NotFound(_) => Code::NotFound,
            Self::TaskFinal { .. } => Code::FailedPrecondition,
            Self::PayloadTooLarge(_) | Self::Overloaded(_) | Self::RateLimited { .. } => {
                Code::ResourceExhausted
            }
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Backend { code, .. } => *code,
            Self::Internal(_) => Code::Internal,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            // A conflict with the task's state, not a malformed request.
            Self::TaskFinal { .. } => StatusCode::CONFLICT,
            other => http_status_for(other.grpc_code()),
        }
    }

    /// A short stable name, used as a log field and metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ModelNotFound { .. } | Self::ModelNotPlaced { .. } => "model_not_found",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::TaskNotFound(_) => "task_not_found",
            Self::NotFound(_) => "not_found",
            Self::TaskFinal { .. } => "task_final",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Overloaded(_) => "overloaded",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Unavailable(_) => "unavailable",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Unimplemented(_) => "unimplemented",
            Self::Backend { .. } => "backend",
            Self::Internal(_) => "internal",
        }
    }

    /// Wraps a status from Triton. Transport failures become `Unavailable` so callers see
    /// one code for "Triton cannot be reached", whatever the cause.
    pub fn from_backend(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown if is_transport(&status) => {
                Self::Unavailable(format!("Triton unreachable: {}", status.message()))
            }
            tonic::Code::DeadlineExceeded => {
                Self::DeadlineExceeded(format!("Triton call: {}", status.message()))
            }
            code => Self::Backend {
                code,
                message: status.message().to_string(),
            },
        }
    }
}

/// Whether Triton could not be reached, from the code or from the error behind the status:
/// tonic reports some failed connections as UNKNOWN with the transport's error attached.
fn is_transport(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::Unavailable {
        return true;
    }
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let lost = e.is::<tonic::transport::Error>()
            || e.is::<std::io::Error>()
            || e.downcast_ref::<h2::Error>()
                .is_some_and(|h| h.is_io() || h.is_go_away());
        if lost {
            return true;
        }
        cause = e.source();
    }
    false
}

/// gRPC's own name for a code (`INVALID_ARGUMENT`), as task records and docs write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP status that stands for a gRPC code (the usual gRPC↔HTTP correspondence).
pub fn http_status_for(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::BAD_REQUEST,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Seconds a client should wait before retrying an overloaded request.
pub const RETRY_AFTER_SECS: u64 = 1;

impl GatewayError {
    /// Failures that say more about Triton's state (down, shutting down, overloaded, a model
    /// not loaded yet) than about the request: worth a retry after a pause.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Unavailable(_)
            | Self::DeadlineExceeded(_)
            | Self::Overloaded(_)
            | Self::RateLimited { .. }
            | Self::ModelNotFound { .. }
            | Self::ModelNotPlaced { .. } => true,
            Self::Backend { code, .. } => matches!(
                code,
                Code::Unavailable | Code::NotFound | Code::ResourceExhausted | Code::Aborted
            ),
            _ => false,
        }
    }

    /// The `Retry-After` to send, for refusals that a later retry can pass.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded(_) => Some(RETRY_AFTER_SECS),
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(err: GatewayError) -> Self {
        let mut status = tonic::Status::new(err.grpc_code(), err.to_string());
        if let Some(secs) = err.retry_after() {
            status
                .metadata_mut()
                .insert("retry-after", tonic::metadata::MetadataValue::from(secs));
        }
        status
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        // Triton's HTTP API reports errors as {"error": "..."}; clients parse that shape.
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut resp = (self.http_status(), body).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if matches!(self, GatewayError::Unauthenticated(_)) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_known_by_their_cause_not_their_words() {
        let refused = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert_eq!(refused.code(), tonic::Code::Unknown);
        assert!(matches!(
            GatewayError::from_backend(refused),
            GatewayError::Unavailable(_)
        ));
        // Words alone decide nothing: Triton's own message stays Triton's error.
        let said = tonic::Status::unknown("connection to the model's worker failed");
        assert!(matches!(
            GatewayError::from_backend(said),
            GatewayError::Backend {
                code: tonic::Code::Unknown,
                ..
            }
        ));
        assert!(matches!(
            GatewayError::from_backend(tonic::Status::unavailable("down")),
            GatewayError::Unavailable(_)
        ));
    }

    #[test]
    fn code_names_are_grpc_s_own() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Aborted), "ABORTED");
        assert_eq!(
            code_name(GatewayError::PayloadTooLarge("x".into()).grpc_code()),
            "RESOURCE_EXHAUSTED"
        );
    }

    #[test]
    fn each_error_maps_to_the_documented_codes() {
        let cases = [
            (
                GatewayError::ModelNotFound {
                    model: "m".into(),
                    version: String::new(),
                },
                tonic::Code::NotFound,
                404,
            ),
            (
                GatewayError::ModelNotPlaced {
                    model: "m".into(),
                    version: "2".into(),
                    endpoints: 3,
                },
                tonic::Code::NotFound,
                404,
            ),
            (
                GatewayError::invalid("x"),
                tonic::Code::InvalidArgument,
                400,
            ),
            (
                GatewayError::PayloadTooLarge("x".into()),
                tonic::Code::ResourceExhausted,
                413,
            ),
            (
                GatewayError::Overloaded("x".into()),
                tonic::Code::ResourceExhausted,
                429,
            ),
            (
                GatewayError::Unavailable("x".into()),
                tonic::Code::Unavailable,
                503,
            ),
            (
                GatewayError::DeadlineExceeded("x".into()),
                tonic::Code::DeadlineExceeded,
                504,
            ),
        ];
        for (err, code, http) in cases {
            assert_eq!(err.grpc_code(), code, "{err:?}");
            assert_eq!(err.http_status().as_u16(), http, "{err:?}");
        }
    }

    #[test]
    fn backend_errors_keep_trition_code_and_message() {
        let err = GatewayError::from_backend(tonic::Status::invalid_argument("bad dims"));
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        assert_eq!(err.to_string(), "bad dims");
        let err = GatewayError::from_backend(tonic::Status::unavailable("tcp connect error"));
        assert!(matches!(err, GatewayError::Unavailable(_)));
    }

    #[test]
    fn not_found_names_model_and_version() {
        let err = GatewayError::ModelNotFound {
            model: "nope".into(),
            version: "3".into(),
        };
        assert_eq!(err.to_string(), "unknown model 'nope' version '3'");
    }
}
