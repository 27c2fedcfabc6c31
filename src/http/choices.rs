//! Open choices: what a loop (or every loop of the caller) waits on now, so
//! a bot that restarts finds every prompt without replaying streams.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::extract::Query;
use crate::http::auth::{LoopsRead, OwnedLoop, Scoped};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::runtime::choices::OpenChoice;
use crate::runtime::events::ChoiceKind;
use crate::state::AppState;
use crate::store::{LoopId, PageRequest};

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChoicesQuery {
    /// `pending` (the default, and the only one): choices not yet answered.
    pub status: Option<String>,
}

impl ChoicesQuery {
    fn check(&self) -> Result<(), ApiError> {
        match self.status.as_deref() {
            None | Some("pending") => Ok(()),
            Some(other) => Err(ApiError::bad_request(
                "invalid_query",
                format!("`status` can only be `pending`, not `{other}`"),
            )),
        }
    }
}

/// A choice waiting for an answer (`POST /loops/{loop_id}/choices/{choice_id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Choice {
    #[schema(value_type = String, example = "loop_7d0c6c1e2b5f4c3a9e8d7b6a5f4e3d2c")]
    pub loop_id: String,
    pub turn_id: String,
    pub choice_id: String,
    pub kind: ChoiceKind,
    /// As in the `requires_choice` event.
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChoiceList {
    /// Oldest first.
    pub data: Vec<Choice>,
}

impl From<OpenChoice> for Choice {
    fn from(c: OpenChoice) -> Self {
        Self {
            loop_id: c.loop_id.to_string(),
            turn_id: c.turn_id,
            choice_id: c.choice_id,
            kind: c.kind,
            payload: c.payload,
            created_at: c.created_at,
        }
    }
}

async fn list(state: &AppState, loops: Vec<LoopId>) -> Result<axum::Json<ChoiceList>, ApiError> {
    let runtime = state.runtime.clone();
    // A loop's log may be opened for it (file reads): off the async threads.
    let open = super::blocking(move || Ok(runtime.open_choices(&loops)?)).await?;
    Ok(axum::Json(ChoiceList {
        data: open.into_iter().map(Choice::from).collect(),
    }))
}

/// The choices one loop waits on (at most one at a time).
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/choices", tag = "turns",
    params(("id" = String, Path, description = "`loop_…`"), ChoicesQuery),
    responses(
        (status = 200, body = ChoiceList),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
    )
)]
pub async fn loop_choices(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
    Query(query): Query<ChoicesQuery>,
) -> Result<axum::Json<ChoiceList>, ApiError> {
    query.check()?;
    // Brought up to the database first, as `GET /loops/{id}` is.
    state.runtime.current_log(record.id).await?;
    list(&state, vec![record.id]).await
}

/// The choices every one of your loops waits on, oldest first.
#[utoipa::path(
    get, path = "/api/v1/choices", tag = "turns",
    params(ChoicesQuery),
    responses(
        (status = 200, body = ChoiceList),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
    )
)]
pub async fn my_choices(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<LoopsRead>,
    Query(query): Query<ChoicesQuery>,
) -> Result<axum::Json<ChoiceList>, ApiError> {
    query.check()?;
    let all = PageRequest {
        title_contains: None,
        limit: usize::MAX,
        after: None,
        before: None,
    };
    // Archived loops have no agent, so nothing waits on them.
    let mine = state.loops.list(&caller.user_id, false, &all)?;
    let ids: Vec<LoopId> = mine.data.iter().map(|r| r.id).collect();
    list(&state, ids).await
}
