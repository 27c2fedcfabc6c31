//! Turns and their event streams: send a message (SSE of its turn), watch a
//! loop (SSE, resumable), answer a choice, interrupt, list turns.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::extract::Query;
use super::sse::{self, Scope};
use super::{Json, audit};
use crate::agent::PermissionMode;
use crate::agent::rules::{Behavior, Rule};
use crate::http::auth::{ChoicesWrite, MessagesWrite, OwnedLoop, Via};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::ids;
use crate::runtime::IdemKey;
use crate::runtime::choices::ChoiceAnswer;
use crate::runtime::events::{ChoiceKind, ChoiceSource, Event};
use crate::runtime::turns::{self, TurnPage, TurnQuery};
use crate::runtime::wire::frame_without_id;
use crate::state::AppState;

pub const MAX_CONTENT_BYTES: usize = 1024 * 1024;
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct SendMessageRequest {
    /// The message (at most 1 MiB).
    pub content: Option<String>,
    /// A permission mode for this turn only: `default`, `acceptEdits`,
    /// `bypassPermissions`, `plan`, `dontAsk` or `auto`.
    #[schema(value_type = Option<PermissionMode>)]
    pub permission_mode: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    pub turn_id: String,
    pub assistant_text_so_far: String,
    pub pending_choice_id: Option<String>,
    pub pending_choice: Option<Value>,
}

const STREAM_DOC: &str = "`event: <name>\\nid: <seq>\\ndata: <json>` frames: `queued`?, `started`, \
    `assistant_delta`, `thinking_delta`, `tool_call`, `tool_result`, `requires_choice`, `choice_resolved`, \
    then `done`, `interrupted` or `error`; `ping` every 15 s. Each frame is one `Event` (a `oneOf` of \
    every event object): its `event` is the frame's `event:` line, its `data` the frame's `data:` line";

/// Send a message; the response is the SSE stream of this message's turn.
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/messages", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("Idempotency-Key" = Option<String>, Header, description = "At most 256 characters; a retry with the same key and body replays the turn instead of sending again (24 h)"),
    ),
    request_body = SendMessageRequest,
    responses(
        (status = 200, content_type = "text/event-stream", body = Event, description = STREAM_DOC),
        (status = 400, body = ErrorEnvelope, description = "`missing_content`, `content_too_large`, `invalid_permission_mode`, `idempotency_key_too_long`, `loop_archived`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `permission_mode_forbidden`, `insufficient_scope`, `permission_mode_above_token`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
        (status = 409, body = ErrorEnvelope, description = "`idempotency_key_reused`"),
        (status = 429, body = ErrorEnvelope, description = "`queue_full`, `too_many_streams`, `too_many_requests`; `Retry-After` says when to try again"),
    )
)]
pub async fn send_message(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop<MessagesWrite>,
    headers: HeaderMap,
    Json(body): Json<SendMessageRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let content = match body.content {
        Some(c) if !c.trim().is_empty() => c,
        _ => {
            return Err(ApiError::bad_request(
                "missing_content",
                "`content` is required and cannot be empty",
            ));
        }
    };
    if content.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::bad_request(
            "content_too_large",
            "`content` is larger than 1 MiB",
        ));
    }
    let mode = requested_mode(&state.config, body.permission_mode.as_ref())?;
    // A token limited to some modes may not drive a turn above them, its
    // own mode or the loop's default alike.
    caller.require_mode(mode.unwrap_or(state.config.permission_mode))?;
    if record.archived {
        return Err(ApiError::bad_request(
            "loop_archived",
            "this loop is archived",
        ));
    }
    let idem = key.map(|key| IdemKey {
        key,
        body_hash: ids::sha256_hex(&json!([record.id.to_string(), content, mode]).to_string()),
    });
    // Before sending: a stream refused must not leave a message sent.
    let slot = state.guards.stream(&caller.user_id)?;
    let accepted = state
        .runtime
        .send(&caller.user_id, &record, content, mode, idem)
        .await?;
    if accepted.replayed {
        tracing::info!(loop_id = %record.id, turn_id = %accepted.turn_id, "idempotent replay");
    } else if let Some(mode) = mode
        && mode.authority() > state.config.permission_mode.authority()
    {
        let entry = audit::by(&caller, "turn.mode_raised")
            .with("loop_id", record.id.to_string())
            .with("turn_id", accepted.turn_id.clone())
            .with("mode", mode.as_str())
            .with("default_mode", state.config.permission_mode.as_str());
        audit::record(&state, entry).await;
    }
    let follower = accepted.log.follow(accepted.seq);
    let stream = sse::stream(
        None,
        follower,
        Scope::Turn(accepted.turn),
        state.streams.clone(),
        slot,
    );
    Ok(sse::response(stream))
}

/// A permission mode a request names (`null` or absent: none): 400
/// `invalid_permission_mode` if it is not one, 403
/// `permission_mode_forbidden` if this server does not allow it.
pub(super) fn requested_mode(
    config: &crate::config::Config,
    value: Option<&Value>,
) -> Result<Option<PermissionMode>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let mode = serde_json::from_value::<PermissionMode>(value.clone()).map_err(|_| {
        ApiError::bad_request(
            "invalid_permission_mode",
            format!("{value} is not a permission mode (default, acceptEdits, bypassPermissions, plan, dontAsk, auto)"),
        )
    })?;
    if !config.mode_allowed(mode) {
        return Err(ApiError::forbidden(
            "permission_mode_forbidden",
            format!(
                "this server does not allow the permission mode `{}` (see --permission-modes)",
                mode.as_str()
            ),
        ));
    }
    Ok(Some(mode))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be visible ASCII",
        )
    })?;
    if key.chars().count() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::bad_request(
            "idempotency_key_too_long",
            "Idempotency-Key has at most 256 characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Replay every event with a greater seq first (like `Last-Event-ID`).
    pub after: Option<u64>,
}

/// Watch a loop's events without sending. Without a cursor, a running turn
/// is summed up in a `snapshot` first; with `Last-Event-ID` or `?after=SEQ`,
/// every later event is replayed from the log, then followed live.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/events", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "As `after` (what EventSource sends on reconnect)"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", body = Event, description = "`snapshot` (no id) first while a turn runs without a cursor; then every event, `user_message` included. Each frame is one `Event`: its `event` is the frame's `event:` line, its `data` the frame's `data:` line"),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`, `invalid_cursor`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope, description = "`too_many_streams`, `too_many_requests`; `Retry-After` says when to try again"),
    )
)]
pub async fn watch_events(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let slot = state.guards.stream(&caller.user_id)?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_cursor", "Last-Event-ID must be an event seq")
                })?,
        ),
        None => None,
    };
    let log = state.runtime.current_log(record.id).await?;
    let (first, follower) = match query.after.or(last_event_id) {
        Some(after) => (None, log.follow(after)),
        None => log.follow_from_now(|v| {
            v.current.as_ref().map(|cur| {
                let pending = cur.pending.as_ref();
                frame_without_id(
                    "snapshot",
                    &Snapshot {
                        turn_id: v.turns[cur.turn].turn_id.clone(),
                        assistant_text_so_far: cur.text.clone(),
                        pending_choice_id: pending.map(|p| p.choice_id.clone()),
                        pending_choice: pending
                            .map(|p| json!({"choice_id": p.choice_id, "kind": p.kind, "payload": p.payload})),
                    },
                )
            })
        }),
    };
    let stream = sse::stream(
        first,
        follower,
        Scope::Everything,
        state.streams.clone(),
        slot,
    );
    Ok(sse::response(stream))
}

/// Answer a pending permission (`{"allow": bool}`) or question
/// (`{"answers": {"<question>": "<label>" | ["<label>", …]}}`).
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/choices/{choiceId}", tag = "turns",
    params(
        ("id" = String, Path, description = "`loop_…`"),
        ("choiceId" = String, Path, description = "`choice_…`"),
    ),
    request_body(content = Value, description = r#"`{"allow": true}` / `{"allow": false, "message"?: "why"}` / `{"answers": {"Which color?": "Blue"}}`"#),
    responses(
        (status = 202, body = Value, description = "Accepted; the stream says `choice_resolved`"),
        (status = 400, body = ErrorEnvelope, description = "`invalid_choice_payload`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope, description = "`choice_not_found`, `loop_not_found`"),
    )
)]
pub async fn answer_choice(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop<ChoicesWrite>,
    Path((_id, choice_id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let answer = ChoiceAnswer::parse(&body)?;
    let pending = {
        let runtime = state.runtime.clone();
        let id = record.id;
        super::blocking(move || Ok(runtime.open_choices(&[id])?))
            .await?
            .into_iter()
            .find(|c| c.choice_id == choice_id)
    };
    if let (Some(pending), ChoiceAnswer::Allow { allow: true, .. }) = (&pending, &answer)
        && pending.payload["tool"] == "ExitPlanMode"
    {
        // Leaving plan mode runs the turn on in the loop's mode.
        caller.require_mode(state.config.permission_mode)?;
    }
    let remember = remembered(&caller, pending.as_ref(), &body, &answer)?;
    let source = match caller.via {
        Via::Session => ChoiceSource::Web,
        Via::Token => ChoiceSource::Api,
    };
    let how = match &answer {
        ChoiceAnswer::Allow { allow: true, .. } => "allowed",
        ChoiceAnswer::Allow { allow: false, .. } => "denied",
        _ => "answered",
    };
    // The rule first, so requests waiting behind this one are covered by it.
    let made = match remember {
        None => None,
        Some((scope, behavior, rule)) => {
            let rules = state.rules.clone();
            let (user, loop_id, choice) = (caller.user_id.clone(), record.id, choice_id.clone());
            Some(
                super::blocking(move || {
                    let on = (scope == "loop").then_some(loop_id);
                    Ok(rules.add(&user, on, behavior, rule, &choice)?)
                })
                .await?,
            )
        }
    };
    let answered = state
        .runtime
        .answer(record.id, choice_id.clone(), answer, source)
        .await;
    if let Err(err) = answered {
        if let Some(made) = &made {
            // Not answered (no longer pending): no rule either.
            let (rules, user, id) = (state.rules.clone(), caller.user_id.clone(), made.id.clone());
            let on = made.loop_id.as_ref().map(|_| record.id);
            let _ = super::blocking(move || Ok(rules.delete(&user, on, &id)?)).await;
        }
        return Err(err.into());
    }
    let mut entry = audit::by(&caller, "choice.answered")
        .with("loop_id", record.id.to_string())
        .with("choice_id", choice_id.clone())
        .with("how", how);
    let mut body = json!({"choice_id": choice_id});
    if let Some(made) = made {
        entry = entry
            .with("rule_id", made.id.clone())
            .with("rule", made.rule.display());
        body["rule"] = super::rules::RuleInfo::from(made).into_json();
    }
    audit::record(&state, entry).await;
    Ok((StatusCode::ACCEPTED, axum::Json(body)))
}

/// The standing rule an answer asks to keep (`"remember": "loop"` or
/// `"always"`): the narrowest rule covering the pending permission.
fn remembered(
    caller: &crate::http::auth::Caller,
    pending: Option<&crate::runtime::choices::OpenChoice>,
    body: &Value,
    answer: &ChoiceAnswer,
) -> Result<Option<(&'static str, Behavior, Rule)>, ApiError> {
    let scope = match body.get("remember") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s == "loop" => "loop",
        Some(Value::String(s)) if s == "always" => "always",
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_choice_payload",
                format!("`remember` is \"loop\" or \"always\", not {other}"),
            ));
        }
    };
    let ChoiceAnswer::Allow { allow, .. } = answer else {
        return Err(ApiError::bad_request(
            "invalid_choice_payload",
            "`remember` goes with a permission's `allow`, not with answers to questions",
        ));
    };
    if scope == "always" && caller.grants.scopes.is_some() {
        // A rule for every loop outlives the token: not for a limited one.
        return Err(ApiError::forbidden(
            "insufficient_scope",
            "a token with scopes may remember an answer for its loop only; `always` needs a web session or a token without scopes",
        ));
    }
    let Some(pending) = pending.filter(|p| p.kind == ChoiceKind::Permission) else {
        return Ok(None); // not a pending permission: answering says what it is
    };
    let tool = pending.payload["tool"].as_str().unwrap_or_default();
    let rule = Rule::narrowest(tool, &pending.payload["input"]).map_err(|why| {
        ApiError::bad_request(
            "rule_too_broad",
            format!("this request cannot be remembered ({why}): a rule for it would cover much more; answer it without `remember`"),
        )
    })?;
    let behavior = if *allow {
        Behavior::Allow
    } else {
        Behavior::Deny
    };
    Ok(Some((scope, behavior, rule)))
}

/// Interrupt the running turn; its streams end with `interrupted`.
#[utoipa::path(
    post, path = "/api/v1/loops/{id}/interrupt", tag = "turns",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 202, body = Value, description = r#"`{"turn_id": "turn_…"}`, or `null` when no turn was running"#),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
    )
)]
pub async fn interrupt(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop<MessagesWrite>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let turn_id = state.runtime.interrupt(record.id).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"turn_id": turn_id})),
    ))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TurnsQuery {
    /// 1–100 (clamped); default 20.
    pub limit: Option<usize>,
    /// `turn_…`: the turns just before it.
    pub before: Option<String>,
    /// `turn_…`: the turns just after it.
    pub after: Option<String>,
}

/// The conversation as turns: the newest `limit`, oldest first.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/turns", tag = "turns",
    params(("id" = String, Path, description = "`loop_…`"), TurnsQuery),
    responses(
        (status = 200, body = TurnPage),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`, `invalid_cursor`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
    )
)]
pub async fn list_turns(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
    Query(query): Query<TurnsQuery>,
) -> Result<axum::Json<TurnPage>, ApiError> {
    let log = state.runtime.current_log(record.id).await?;
    let query = TurnQuery {
        limit: query.limit.unwrap_or(20).clamp(1, 100),
        before: query.before,
        after: query.after,
    };
    Ok(axum::Json(turns::page(log, query).await?))
}
