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
    let mut doc = serde_json::to_value(&openapi).expect("the OpenAPI document serializes");
    name_events(&mut doc);
    let json = doc.to_string();
    // `</` cannot appear in the JSON (it would end the data block early).
    debug_assert!(!json.contains("</"));
    let html = Scalar::new(doc).custom_html(SCALAR_HTML).to_html();
    Extension(Arc::new(Rendered { json, html }))
}

/// Gives every event of the stream its own named schemas: `Event` becomes a
/// `oneOf` of `<Name>Event` (`{"event": "<name>", "data": <Name>Data}`) with
/// a discriminator on `event`, so client generators make one type per event
/// instead of clashing anonymous ones.
fn name_events(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(Value::Array(variants)) = schemas
        .get_mut("Event")
        .and_then(|e| e.get_mut("oneOf"))
        .map(Value::take)
    else {
        return;
    };
    let (mut refs, mut mapping, mut named) = (Vec::new(), serde_json::Map::new(), Vec::new());
    for mut variant in variants {
        let Some(name) = variant
            .pointer("/properties/event/enum/0")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            refs.push(variant);
            continue;
        };
        let camel: String = name
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        if let Some(data) = variant.pointer_mut("/properties/data").map(Value::take) {
            named.push((format!("{camel}Data"), data));
            variant["properties"]["data"] =
                json!({"$ref": format!("#/components/schemas/{camel}Data")});
        }
        let at = format!("#/components/schemas/{camel}Event");
        mapping.insert(name, json!(at));
        refs.push(json!({"$ref": at}));
        named.push((format!("{camel}Event"), variant));
    }
    for (name, schema) in named {
        schemas.insert(name, schema);
    }
    schemas.insert(
        "Event".into(),
        json!({
            "description": "One event of a loop's stream: `event` is the SSE frame's `event:` line, `data` its `data:` line.",
            "oneOf": refs,
            "discriminator": {"propertyName": "event", "mapping": mapping},
        }),
    );
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
