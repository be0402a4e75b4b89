//! [`ApiError`]: the pipeline's error, a failure answered to the client in the terms of
//! OpenAI's error model (an HTTP status, `type`, `param`, `code`, a message). The HTTP API
//! turns it into a response with the body `{"error": {"message", "type", "param", "code"}}`
//! (`api::error`); the relay server turns it into a stream `Error` frame (`swarm::serve`).

use axum::http::StatusCode;
use serde_json::json;

use crate::engine::EngineError;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A lowercase sentence that says what went wrong and what to do.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for a field the node does not support.
    pub fn unsupported(param: &str, why: &str) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(
                param,
                format!("`{param}` is not supported by this node: {why}"),
            )
        }
    }

    /// 404 for an unknown model.
    pub fn unknown_model(model: &str, served: &[&str]) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model `{model}` does not exist on this node; it serves {}",
                    served.join(", ")
                ),
            )
        }
    }

    /// 400 for a prompt that does not fit the context.
    pub fn context_length(message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
            ..ApiError::bad_request(message)
        }
    }

    /// 429 with Retry-After.
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(2),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503 when a part of the node is not available.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: a failure inside the node, never caused by the request's content.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Busy { .. } => ApiError::busy(e.to_string()),
            EngineError::Stopped => ApiError::unavailable(e.to_string()),
        }
    }
}
