//! The audit trail over HTTP: recording an act (from the handlers that do
//! them) and `GET /api/v1/admin/audit` for admins.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use super::extract::Query;
use crate::http::auth::Caller;
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::audit::{AuditEntry, AuditFilter};

/// An act of `caller`: who, and with what (`"via"`: a token's id, or
/// `"web session"`).
pub fn by(caller: &Caller, action: &str) -> AuditEntry {
    let via = caller.token_id.as_deref().unwrap_or("web session");
    AuditEntry::new(&caller.user_id, action).with("via", via)
}

/// The most acts one answer lists.
const MAX_LIMIT: usize = 1000;

/// Records an act, durably, before the handler answers. A trail that
/// cannot be written is logged as an error, and the act stands.
pub async fn record(state: &AppState, entry: AuditEntry) {
    let audit = state.audit.clone();
    let action = entry.action.clone();
    let written = tokio::task::spawn_blocking(move || audit.record(&entry)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::error!(error = %err, %action, "could not write the audit trail"),
        Err(err) => tracing::error!(error = %err, %action, "could not write the audit trail"),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only this user's acts.
    pub user: Option<String>,
    /// Only acts at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// 1–1000 (clamped); default 100: the latest ones.
    pub limit: Option<usize>,
}

/// Who did what, newest first (admins only).
#[utoipa::path(
    get, path = "/api/v1/admin/audit", tag = "admin",
    params(AuditQuery),
    responses(
        (status = 200, body = Value, description = r#"`{"data": [{"at","user","action","client"?,"details"?}]}`, newest first"#),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`admin_required`; `insufficient_scope` for a token with scopes"),
    )
)]
pub async fn read_audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<AuditQuery>,
) -> Result<axum::Json<Value>, ApiError> {
    if !caller.admin {
        return Err(ApiError::forbidden(
            "admin_required",
            "the audit trail is for admins",
        ));
    }
    if caller.grants.scopes.is_some() {
        return Err(ApiError::forbidden(
            "insufficient_scope",
            "a token with scopes cannot read the audit trail; use a session or a token without scopes",
        ));
    }
    let filter = AuditFilter {
        user: query.user,
        since: query.since,
        limit: Some(query.limit.unwrap_or(100).clamp(1, MAX_LIMIT)),
    };
    let audit = state.audit.clone();
    let mut found = super::blocking(move || Ok(audit.read(&filter)?)).await?;
    found.reverse();
    Ok(axum::Json(serde_json::json!({ "data": found })))
}
