//! Request metrics (latency by route template, 429s by limit) and the
//! `/metrics` endpoint served on `--metrics-bind`.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// Set on a 429 answer: the limit's code, for counting.
#[derive(Debug, Clone, Copy)]
pub struct LimitedBy(pub &'static str);

/// Times a matched route's request until its response's head.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let metrics = state.runtime.metrics();
    let seconds = started.elapsed().as_secs_f64();
    metrics.request(&method, &route, response.status().as_u16(), seconds);
    if let Some(LimitedBy(code)) = response.extensions().get::<LimitedBy>() {
        metrics.rate_limited(code);
    }
    response
}

/// The router `--metrics-bind` serves: `GET /metrics` only, no auth (bind
/// it where only your Prometheus reaches).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state)
}

async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let runtime = state.runtime.clone();
    let guards = state.guards.clone();
    let text = tokio::task::spawn_blocking(move || {
        let mut now = runtime.metrics_now();
        now.streams = guards.open_streams() as i64;
        runtime.metrics().render(now)
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
