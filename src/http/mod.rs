//! The HTTP surface: the router table, the OpenAPI document, and one small
//! module per resource.

mod audit;
pub mod auth;
mod choices;
mod docs;
pub mod error;
mod extract;
mod files;
pub mod forward;
mod health;
pub mod limits;
mod loops;
pub mod metrics;
mod rules;
pub mod serve;
mod session;
mod sse;
mod tokens;
mod turns;
mod web;
mod webhooks;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Request, header};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::error::ApiError;
use crate::state::AppState;

pub use extract::Json;

/// A whole request body may be at most this large (413 `body_too_large`).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "loopd",
        description = "Create and drive long-lived AI agent conversations (loops) over HTTP and SSE. \
            Bots authenticate with `Authorization: Bearer la_…`; the web chat with the `loopd_session` cookie.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecuritySchemes),
    security(("BearerAuth" = []), ("CookieAuth" = [])),
    tags(
        (name = "loops", description = "Create, list, read and archive loops"),
        (name = "turns", description = "Send messages and follow the event stream"),
        (name = "tokens", description = "API tokens (web session only)"),
        (name = "webhooks", description = "Signed webhooks: be told of prompts and ended turns instead of watching"),
        (name = "auth", description = "Web login with a session cookie"),
        (name = "files", description = "A loop's workspace, read-only: files and the repo's diff"),
        (name = "rules", description = "Standing permission rules (answer with \"remember\")"),
        (name = "admin", description = "For admins: the audit trail"),
        (name = "meta", description = "Health and documentation"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "BearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("la_<48 hex>")
                    .description(Some(
                        "An API token, created in the web settings or with `loopd token create`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "CookieAuth",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::http::auth::SESSION_COOKIE,
                "Set by POST /api/auth/login.",
            ))),
        );
    }
}

/// The whole application: every route, the error fallbacks and the layers.
pub fn router(state: AppState) -> Router {
    let (routes, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(session::login))
        .routes(routes!(session::logout))
        .routes(routes!(session::me))
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(tokens::rotate_token))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::delete_webhook))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(loops::create_loop, loops::list_loops))
        .routes(routes!(loops::get_loop, loops::archive_loop))
        .routes(routes!(turns::send_message))
        .routes(routes!(turns::watch_events))
        .routes(routes!(turns::answer_choice))
        .routes(routes!(choices::loop_choices))
        .routes(routes!(choices::my_choices))
        .routes(routes!(files::list_files))
        .routes(routes!(files::file_content))
        .routes(routes!(files::repo_diff))
        .routes(routes!(rules::loop_rules))
        .routes(routes!(rules::delete_loop_rule))
        .routes(routes!(rules::my_rules))
        .routes(routes!(rules::delete_my_rule))
        .routes(routes!(turns::interrupt))
        .routes(routes!(turns::list_turns))
        .routes(routes!(audit::read_audit))
        .routes(routes!(docs::openapi_json))
        .routes(routes!(docs::docs_page))
        .split_for_parts();

    routes
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .merge(docs::assets())
        .merge(web::router())
        .fallback(|| async { ApiError::not_found("route_not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed(
                "method_not_allowed",
                "this endpoint does not take that method".into(),
            )
        })
        .layer(docs::rendered(openapi))
        .layer(axum::middleware::from_fn_with_state(state.clone(), forward::to_owner))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("same-origin"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::deadline))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::check_host))
        .layer(
            TraceLayer::new_for_http()
                // The path only: no query string, no headers (tokens, cookies).
                .make_span_with(|req: &Request<_>| {
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

/// Runs blocking store work (file I/O, fsync, argon2) off the async threads.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}
