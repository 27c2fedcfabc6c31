//! Turns and their event streams: `messages`, `events`, `choices`,
//! `interrupt` and `turns` of a loop. They check who is calling and whose
//! loop it is, then answer 501 until the loop runtime that runs agents exists.

use axum::extract::{Path, State};

use super::loops::owned_loop;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;

fn not_yet(state: &AppState, caller: &Caller, id: &str) -> ApiError {
    match owned_loop(state, caller, id) {
        Err(err) => err,
        Ok(_) => ApiError::NotImplemented(
            "not_implemented",
            "this server cannot run agent turns yet".into(),
        ),
    }
}

/// Send a message; the response is the SSE stream of this message's turn.
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/messages", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("Idempotency-Key" = Option<String>, Header, description = "At most 256 characters; a retry with the same key and body replays the turn"),
    ),
    request_body(content = serde_json::Value, description = r#"`{"content": "…", "permission_mode"?: "default"|"acceptEdits"|…}`"#),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "`queued`?, `started`, …, then `done`, `interrupted` or `error`"),
        (status = 400, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 501, body = ErrorEnvelope, description = "`not_implemented`"),
    )
)]
pub async fn send_message(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiError {
    not_yet(&state, &caller, &id)
}

/// Watch a loop's events without sending; resume with `Last-Event-ID` or `?after=SEQ`.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/events", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("after" = Option<u64>, Query, description = "Replay events with a greater seq first"),
        ("Last-Event-ID" = Option<u64>, Header, description = "As `after`"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "`snapshot` first while a turn runs, then every event"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 501, body = ErrorEnvelope, description = "`not_implemented`"),
    )
)]
pub async fn watch_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiError {
    not_yet(&state, &caller, &id)
}

/// Answer a pending permission or question choice.
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/choices/{choiceId}", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("choiceId" = String, Path, description = "`choice_…`"),
    ),
    request_body(content = serde_json::Value, description = r#"`{"allow": bool}` or `{"answers": {question: label}}`"#),
    responses(
        (status = 202, description = "Accepted"),
        (status = 400, body = ErrorEnvelope, description = "`invalid_choice_payload`"),
        (status = 404, body = ErrorEnvelope, description = "`choice_not_found`"),
        (status = 501, body = ErrorEnvelope, description = "`not_implemented`"),
    )
)]
pub async fn answer_choice(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, _choice)): Path<(String, String)>,
) -> ApiError {
    not_yet(&state, &caller, &id)
}

/// Interrupt the running turn.
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/interrupt", tag = "turns",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 202, description = "Accepted"),
        (status = 404, body = ErrorEnvelope),
        (status = 501, body = ErrorEnvelope, description = "`not_implemented`"),
    )
)]
pub async fn interrupt(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiError {
    not_yet(&state, &caller, &id)
}

/// The conversation as turns, newest `limit` in chronological order.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/turns", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("limit" = Option<usize>, Query, description = "1–100, default 20"),
        ("before" = Option<String>, Query, description = "`turn_…`: page back"),
        ("after" = Option<String>, Query, description = "`turn_…`: page forward"),
    ),
    responses(
        (status = 200, body = serde_json::Value, description = r#"`{"data","first_id","last_id","has_more"}`"#),
        (status = 404, body = ErrorEnvelope),
        (status = 501, body = ErrorEnvelope, description = "`not_implemented`"),
    )
)]
pub async fn list_turns(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiError {
    not_yet(&state, &caller, &id)
}
