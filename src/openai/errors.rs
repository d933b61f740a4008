//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with OpenAI's
//! status codes, so OpenAI's clients raise the exception they would raise against OpenAI
//! (`BadRequestError`, `AuthenticationError`, `NotFoundError`, `RateLimitError`, …).
//! Every infergate error maps here once, from [`GatewayError`].

use serde_json::{Value, json};

use crate::error::GatewayError;

/// Boxed: it travels in every `Result` of the front, most of which are `Ok`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError(Box<Details>);

impl std::ops::Deref for OpenAiError {
    type Target = Details;
    fn deref(&self) -> &Details {
        &self.0
    }
}

impl std::ops::DerefMut for OpenAiError {
    fn deref_mut(&mut self) -> &mut Details {
        &mut self.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Details {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// More headers (a budget's `x-ratelimit-*`).
    pub headers: Vec<(&'static str, String)>,
}

impl OpenAiError {
    /// A bad request naming its field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self(Box::new(Details {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
            headers: Vec::new(),
        }))
    }

    pub fn model_not_found(model: &str) -> Self {
        Self(Box::new(Details {
            status: 404,
            kind: "invalid_request_error",
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
            headers: Vec::new(),
        }))
    }

    /// Over a tenant's budget; `kind` is `tokens` or `requests`, as OpenAI says it.
    pub fn rate_limited(kind: &'static str, message: String, retry_after: u64) -> Self {
        Self(Box::new(Details {
            status: 429,
            kind,
            message,
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            headers: Vec::new(),
        }))
    }

    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// The field a message of ours names first (`max_tokens: ...` → `max_tokens`).
fn param_of(message: &str) -> Option<String> {
    let (head, _) = message.split_once(':')?;
    let ok = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c));
    ok.then(|| head.to_string())
}

impl From<GatewayError> for OpenAiError {
    fn from(e: GatewayError) -> Self {
        let status = e.http_status().as_u16();
        let retry_after = e.retry_after();
        let message = e.to_string();
        let (kind, code, param) = match &e {
            GatewayError::ModelNotFound { .. } | GatewayError::ModelNotPlaced { .. } => {
                ("invalid_request_error", Some("model_not_found"), None)
            }
            GatewayError::Unauthenticated(_) => {
                ("invalid_request_error", Some("invalid_api_key"), None)
            }
            GatewayError::RateLimited { .. } => ("requests", Some("rate_limit_exceeded"), None),
            GatewayError::InvalidArgument(m) => ("invalid_request_error", None, param_of(m)),
            GatewayError::PayloadTooLarge(_) => ("invalid_request_error", None, None),
            _ if status == 429 => ("server_error", Some("overloaded"), None),
            _ if status < 500 => ("invalid_request_error", None, None),
            _ => ("server_error", None, None),
        };
        Self(Box::new(Details {
            status,
            kind,
            message,
            param,
            code,
            retry_after,
            headers: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_errors_take_openais_shape() {
        let e = OpenAiError::from(GatewayError::invalid("top_p: must be within 0..=1"));
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let body = e.body();
        assert_eq!(body["error"]["message"], "top_p: must be within 0..=1");
        assert!(body["error"]["code"].is_null());

        let e = OpenAiError::from(GatewayError::Unauthenticated(
            "the API key is not valid".into(),
        ));
        assert_eq!((e.status, e.code), (401, Some("invalid_api_key")));

        let e = OpenAiError::from(GatewayError::RateLimited {
            message: "slow down".into(),
            retry_after: 3,
        });
        assert_eq!((e.status, e.retry_after), (429, Some(3)));

        let e = OpenAiError::from(GatewayError::Unavailable("no Triton endpoint".into()));
        assert_eq!((e.status, e.kind), (503, "server_error"));
        // A message that does not start with a field names none.
        assert_eq!(param_of("unknown model 'x'"), None);
    }
}
