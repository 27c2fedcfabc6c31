//! The web chat at `/`: a small single-page app embedded in the binary
//! (from `templates/web/` and the vendored `assets/web/vendor/`). It uses
//! the very same `/api/v1` as bots, with the session cookie. No inline
//! script, no remote origin.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

const INDEX: &str = include_str!("../../templates/web/index.html");
const APP_JS: &str = include_str!("../../templates/web/app.js");
const APP_CSS: &str = include_str!("../../templates/web/app.css");
const FAVICON: &str = include_str!("../../templates/web/favicon.svg");
const MARKED_JS: &str = include_str!("../../assets/web/vendor/marked.js");
const PURIFY_JS: &str = include_str!("../../assets/web/vendor/purify.js");
const HIGHLIGHT_JS: &str = include_str!("../../assets/web/vendor/highlight.js");
const HIGHLIGHT_CSS: &str = include_str!("../../assets/web/vendor/highlight.css");

/// Scripts and styles from this origin only; the API from this origin only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX, true) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS, false) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS, false) }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON, false) }),
        )
        .route(
            "/favicon.ico",
            get(|| async { asset("image/svg+xml", FAVICON, false) }),
        )
        .route(
            "/vendor/marked.js",
            get(|| async { asset("text/javascript; charset=utf-8", MARKED_JS, false) }),
        )
        .route(
            "/vendor/purify.js",
            get(|| async { asset("text/javascript; charset=utf-8", PURIFY_JS, false) }),
        )
        .route(
            "/vendor/highlight.js",
            get(|| async { asset("text/javascript; charset=utf-8", HIGHLIGHT_JS, false) }),
        )
        .route(
            "/vendor/highlight.css",
            get(|| async { asset("text/css; charset=utf-8", HIGHLIGHT_CSS, false) }),
        )
}

fn asset(content_type: &'static str, body: &'static str, page: bool) -> Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // The page and its code change with the binary: always revalidate.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response();
    if page {
        response.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    response
}
