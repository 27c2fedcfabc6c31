//! Standing permission rules: those of one loop
//! (`/api/v1/loops/{id}/rules`) and those for all of a user's loops
//! (`/api/v1/me/rules`). Made by answering a permission with `"remember"`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{audit, blocking};
use crate::agent::rules::Behavior;
use crate::http::auth::{ChoicesWrite, LoopsRead, OwnedLoop, Scoped};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::LoopId;
use crate::store::rules::RuleRecord;

/// A standing rule.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleInfo {
    #[schema(example = "rule_3f9a0c1b2d4e5f60")]
    pub id: String,
    /// In Claude Code's syntax.
    #[schema(example = "Bash(npm test)")]
    pub rule: String,
    pub behavior: Behavior,
    /// `loop` (this loop only) or `always` (every loop of the user).
    pub scope: String,
    pub loop_id: Option<String>,
    /// The answer that made it.
    pub choice_id: String,
    pub created_at: DateTime<Utc>,
}

impl From<RuleRecord> for RuleInfo {
    fn from(r: RuleRecord) -> Self {
        Self {
            id: r.id,
            rule: r.rule.display(),
            behavior: r.behavior,
            scope: if r.loop_id.is_some() {
                "loop"
            } else {
                "always"
            }
            .into(),
            loop_id: r.loop_id,
            choice_id: r.choice_id,
            created_at: r.created_at,
        }
    }
}

impl RuleInfo {
    pub fn into_json(self) -> Value {
        serde_json::to_value(self).expect("a rule serializes")
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    /// Oldest first.
    pub data: Vec<RuleInfo>,
}

fn listed(rules: Vec<RuleRecord>) -> axum::Json<RuleList> {
    axum::Json(RuleList {
        data: rules.into_iter().map(RuleInfo::from).collect(),
    })
}

async fn delete(
    state: &AppState,
    caller: &crate::http::auth::Caller,
    on: Option<LoopId>,
    rule_id: String,
) -> Result<StatusCode, ApiError> {
    let (rules, user, id) = (state.rules.clone(), caller.user_id.clone(), rule_id.clone());
    blocking(move || Ok(rules.delete(&user, on, &id)?)).await?;
    let entry = audit::by(caller, "rule.deleted").with("rule_id", rule_id);
    audit::record(state, entry).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A loop's own standing rules.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/rules", tag = "rules",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 200, body = RuleList),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
    )
)]
pub async fn loop_rules(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop<LoopsRead>,
) -> axum::Json<RuleList> {
    listed(state.rules.list(&caller.user_id, Some(record.id)))
}

/// Delete one of a loop's standing rules; its requests are asked again.
#[utoipa::path(
    delete, path = "/api/v1/loops/{id}/rules/{ruleId}", tag = "rules",
    params(("id" = String, Path, description = "`loop_…`"), ("ruleId" = String, Path, description = "`rule_…`")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`, `rule_not_found`"),
    )
)]
pub async fn delete_loop_rule(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop<ChoicesWrite>,
    Path((_id, rule_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(&state, &caller, Some(record.id), rule_id).await
}

/// Your standing rules for every loop (`"remember": "always"`).
#[utoipa::path(
    get, path = "/api/v1/me/rules", tag = "rules",
    responses(
        (status = 200, body = RuleList),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
    )
)]
pub async fn my_rules(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<LoopsRead>,
) -> axum::Json<RuleList> {
    listed(state.rules.list(&caller.user_id, None))
}

/// Delete one of your rules for every loop.
#[utoipa::path(
    delete, path = "/api/v1/me/rules/{ruleId}", tag = "rules",
    params(("ruleId" = String, Path, description = "`rule_…`")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`rule_not_found`"),
    )
)]
pub async fn delete_my_rule(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<ChoicesWrite>,
    Path(rule_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete(&state, &caller, None, rule_id).await
}
