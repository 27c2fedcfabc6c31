//! On a shared database, a request that changes a loop (a message, an
//! answer, an interrupt, an archive) is carried out by the node that runs
//! the loop's agent. A handler that finds the loop elsewhere answers
//! [`ApiError::Elsewhere`]; this layer then sends the same request to that
//! node (the caller's own credentials with it, so the owner checks them
//! itself) and streams its answer back, an SSE stream included. A request
//! that was already forwarded once is never forwarded again.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::MAX_BODY_BYTES;
use super::error::ApiError;
use crate::state::AppState;

/// Marks a request one node forwarded to another: the cluster's secret.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-loopd-forwarded");

/// Set on an [`ApiError::Elsewhere`] response: where to send the request.
#[derive(Clone, Debug)]
pub struct ForwardTo(pub String);

/// Headers that describe one hop, not the request. `Host` is kept: the
/// owner checks it (and a cookie request's `Origin` against it) as the
/// first node did.
const HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

pub async fn to_owner(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(secret) = state.node_secret.clone() else {
        return next.run(req).await;
    };
    if req.method() == Method::GET || !req.uri().path().starts_with("/api/v1/loops/") {
        return next.run(req).await;
    }
    let forwarded = req
        .headers()
        .get(&FORWARDED_BY)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), secret.as_bytes()));
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return ApiError::body_too_large().into_response();
    };
    let again = |next: Next| {
        let req = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
        async move {
            if forwarded {
                crate::runtime::cluster::SENT_HERE
                    .scope((), next.run(req))
                    .await
            } else {
                next.run(req).await
            }
        }
    };
    let mut response = again(next.clone()).await;
    // A node that cannot be reached was never given the request: it is
    // run here once more, that node avoided (a loop nobody runs is then
    // taken here, or sent to another node).
    let mut unreachable = None;
    loop {
        let Some(ForwardTo(node)) = response.extensions().get::<ForwardTo>().cloned() else {
            return response;
        };
        if forwarded || unreachable.as_ref() == Some(&node) {
            // Sent here by another node, which says it is not the owner
            // either (the loop moved meanwhile), or the owner is the node
            // that cannot be reached: the caller tries again.
            return response;
        }
        match send(&state, &secret, &parts, bytes.clone(), &node).await {
            Ok(answer) => return answer,
            Err(err) if err.is_connect() && unreachable.is_none() => {
                let err = err.without_url();
                tracing::warn!(node = %node, error = %err, "could not reach the loop's node; trying without it");
                state.runtime.node_unreachable(&node);
                unreachable = Some(node);
                response = again(next.clone()).await;
            }
            Err(err) => {
                let err = err.without_url();
                tracing::warn!(node = %node, error = %err, "could not forward a request to the loop's node");
                return response;
            }
        }
    }
}

/// Sends the request to `node` (the caller's credentials, the cluster's
/// secret) and streams its answer back.
async fn send(
    state: &AppState,
    secret: &str,
    parts: &axum::http::request::Parts,
    bytes: axum::body::Bytes,
    node: &str,
) -> Result<Response, reqwest::Error> {
    let mut url = node.to_owned();
    url.push_str(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if !HOP.contains(name) && name != FORWARDED_BY {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(secret) {
        headers.insert(FORWARDED_BY, v);
    }
    let answer = state
        .forwarder
        .request(parts.method.clone(), &url)
        .headers(headers)
        .body(bytes)
        .send()
        .await?;
    let mut out = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !HOP.contains(name) {
            out = out.header(name, value);
        }
    }
    Ok(out
        .body(Body::from_stream(answer.bytes_stream()))
        .unwrap_or_else(|e| ApiError::internal(e).into_response()))
}

/// Compares digests, so the time taken says nothing about the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    Sha256::digest(a) == Sha256::digest(b)
}
