//! `/api/v1/openapi.json` and `/api/v1/docs`: the generated OpenAPI document
//! and the Scalar reference, served from the binary (no CDN).

use std::sync::Arc;

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use utoipa::openapi::OpenApi;
use utoipa_scalar::Scalar;

use crate::state::AppState;

/// Scalar's standalone bundle (`@scalar/api-reference`, MIT), vendored.
const SCALAR_JS: &[u8] = include_bytes!("../../assets/scalar/standalone.js");

/// The spec goes in as a JSON data block and the configuration as an
/// attribute, so the page runs no inline script and loads nothing remote.
const SCALAR_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>loopd API reference</title>
</head>
<body>
  <script id="api-reference" type="application/json" data-configuration='{"withDefaultFonts":false,"showDeveloperTools":"never","agent":{"disabled":true}}'>$spec</script>
  <script src="/api/v1/docs/scalar.js"></script>
</body>
</html>
"#;

const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The OpenAPI document, serialized once, and the docs page made from it.
pub struct Rendered {
    json: String,
    html: String,
}

/// Renders the documents the docs handlers serve (a layer for the whole router).
pub fn rendered(openapi: OpenApi) -> Extension<Arc<Rendered>> {
    let json = openapi.to_json().expect("the OpenAPI document serializes");
    // `</` cannot appear in the JSON (it would end the data block early).
    debug_assert!(!json.contains("</"));
    let html = Scalar::new(openapi).custom_html(SCALAR_HTML).to_html();
    Extension(Arc::new(Rendered { json, html }))
}

/// The docs' static asset, which needs no OpenAPI entry of its own.
pub fn assets() -> Router<AppState> {
    Router::new().route("/api/v1/docs/scalar.js", get(scalar_js))
}

/// This API's OpenAPI 3.1 document; no authentication.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "meta", security(),
    responses((status = 200, content_type = "application/json", body = serde_json::Value))
)]
pub async fn openapi_json(Extension(docs): Extension<Arc<Rendered>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        docs.json.clone(),
    )
        .into_response()
}

/// The interactive API reference (Scalar); no authentication.
#[utoipa::path(
    get, path = "/api/v1/docs", tag = "meta", security(),
    responses((status = 200, content_type = "text/html", body = String))
)]
pub async fn docs_page(Extension(docs): Extension<Arc<Rendered>>) -> Response {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOCS_CSP),
        )],
        Html(docs.html.clone()),
    )
        .into_response()
}

async fn scalar_js() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            ),
        ],
        SCALAR_JS,
    )
        .into_response()
}
