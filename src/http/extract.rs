//! Extractors whose rejections use the API's error envelope.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::http::error::ApiError;

/// A JSON request body. Invalid JSON is 400 `invalid_json` (never read as
/// `{}`); an empty body is `{}`, which fits endpoints whose fields are all
/// optional; a body of the wrong shape is 400 `invalid_body`; over 2 MiB is
/// 413 `body_too_large`. The Content-Type is not checked, so `curl -d` works.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large()
            } else {
                ApiError::bad_request("invalid_body", rejection.body_text())
            }
        })?;
        let body: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        // Syntax first (without building anything), so a broken body is
        // always `invalid_json`, even where a type error would come earlier.
        // JSON is UTF-8; skipping a value does not check that, so check here.
        std::str::from_utf8(body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not UTF-8: {e}"))
        })?;
        serde_json::from_slice::<IgnoredAny>(body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        })?;
        serde_json::from_slice(body)
            .map(Json)
            .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))
    }
}

/// A query string; a malformed one is 400 `invalid_query`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}
