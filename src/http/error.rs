//! The one API error type and its JSON envelope `{"error":{"type","code","message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error an HTTP handler or extractor can return. Each client variant
/// carries the contract's `code` and a human message; `Internal` carries the
/// cause, which is logged once and never sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("{1}")]
    Unauthorized(&'static str, String),
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("{1}")]
    NotFound(&'static str, String),
    #[error("{1}")]
    MethodNotAllowed(&'static str, String),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{1}")]
    PayloadTooLarge(&'static str, String),
    /// 429, with when to try again (`Retry-After`).
    #[error("{1}")]
    RateLimited(&'static str, String, std::time::Duration),
    /// 408: the request took longer than the server waits for one.
    #[error("{1}")]
    Timeout(&'static str, String),
    /// 503: the server cannot take this now (it is shutting down).
    #[error("{1}")]
    Unavailable(&'static str, String),
    /// On a shared database: the loop runs on the node at this URL. The
    /// forwarding layer carries the request there; if it cannot, a 503.
    #[error("this loop runs on another node")]
    Elsewhere(String),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `authentication_error`, `permission_error`, `invalid_request_error`,
    /// `not_found_error`, `conflict_error`, `rate_limit_error`, `internal_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// A stable machine-readable code, e.g. `loop_not_found`.
    pub code: &'static str,
    /// A human-readable explanation.
    pub message: String,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest(code, message.into())
    }
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unauthorized(code, message.into())
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden(code, message.into())
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound(code, message.into())
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict(code, message.into())
    }
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self::Internal(cause.into())
    }
    pub fn body_too_large() -> Self {
        Self::PayloadTooLarge(
            "body_too_large",
            "the request body is larger than 2 MiB".into(),
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(..) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(..) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(..) => StatusCode::FORBIDDEN,
            Self::NotFound(..) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(..) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout(..) => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable(..) | Self::Elsewhere(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope as sent on the wire (also used inside SSE `error` events).
    pub fn envelope(&self) -> ErrorEnvelope {
        let (kind, code, message) = match self {
            Self::BadRequest(c, m)
            | Self::PayloadTooLarge(c, m)
            | Self::MethodNotAllowed(c, m)
            | Self::Timeout(c, m) => ("invalid_request_error", *c, m.clone()),
            Self::Unauthorized(c, m) => ("authentication_error", *c, m.clone()),
            Self::Forbidden(c, m) => ("permission_error", *c, m.clone()),
            Self::NotFound(c, m) => ("not_found_error", *c, m.clone()),
            Self::Conflict(c, m) => ("conflict_error", *c, m.clone()),
            Self::RateLimited(c, m, _) => ("rate_limit_error", *c, m.clone()),
            Self::Unavailable(c, m) => ("unavailable_error", *c, m.clone()),
            Self::Elsewhere(_) => (
                "unavailable_error",
                "loop_moving",
                "this loop is run by another node that cannot be reached now; try again".to_owned(),
            ),
            Self::Internal(_) => (
                "internal_error",
                "internal_error",
                "internal server error; the server log has the details".to_owned(),
            ),
        };
        ErrorEnvelope {
            error: ErrorDetail {
                kind,
                code,
                message,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            // The one place a 500 is logged; the client only learns that it happened.
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let mut response = (self.status(), axum::Json(self.envelope())).into_response();
        if matches!(self, Self::Unavailable(..)) {
            // Worth asking again in a moment (another node, or this one
            // restarted, takes it).
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if let Self::Elsewhere(node) = &self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
                .extensions_mut()
                .insert(crate::http::forward::ForwardTo(node.clone()));
        }
        if let Self::RateLimited(code, _, wait) = &self {
            response
                .extensions_mut()
                .insert(crate::http::metrics::LimitedBy(code));
            // Whole seconds, rounded up: never "0", which invites a hot retry.
            let secs = wait.as_millis().div_ceil(1000).max(1);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs as u64),
            );
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        match err {
            E::NotFound(code, msg) => Self::NotFound(code, msg),
            E::Invalid(code, msg) => Self::BadRequest(code, msg),
            E::Conflict(code, msg) => Self::Conflict(code, msg),
            E::Full(code, msg, wait) => Self::RateLimited(code, msg, wait),
            other => Self::Internal(other.into()),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(err: tokio::task::JoinError) -> Self {
        Self::Internal(err.into())
    }
}

impl From<crate::runtime::RuntimeError> for ApiError {
    fn from(err: crate::runtime::RuntimeError) -> Self {
        use crate::runtime::RuntimeError as E;
        match err {
            E::Invalid(code, msg) => Self::BadRequest(code, msg),
            E::NotFound(code, msg) => Self::NotFound(code, msg),
            E::Conflict(code, msg) => Self::Conflict(code, msg),
            E::Full(code, msg, wait) => Self::RateLimited(code, msg, wait),
            E::Stopping => Self::Unavailable("server_stopping", err.to_string()),
            E::Elsewhere(node) => Self::Elsewhere(node),
            E::Moving => Self::Unavailable("loop_moving", err.to_string()),
            E::Store(err) => err.into(),
            E::Internal(cause) => Self::Internal(anyhow::anyhow!(cause)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_moved_mid_request_says_so_and_when_to_try_again() {
        let err = ApiError::from(crate::runtime::RuntimeError::Moving);
        assert_eq!(err.envelope().error.code, "loop_moving");
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        for (wait_ms, want) in [
            (0, "1"),
            (200, "1"),
            (1000, "1"),
            (1500, "2"),
            (60_000, "60"),
        ] {
            let wait = std::time::Duration::from_millis(wait_ms);
            let response = ApiError::RateLimited("x", "y".into(), wait).into_response();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                response.headers()[axum::http::header::RETRY_AFTER],
                want,
                "{wait_ms} ms"
            );
        }
    }
}
