//! `/api/v1/me/tokens`: API tokens, managed from a web session (a token
//! may only rotate itself).

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Json, audit, blocking};
use crate::agent::PermissionMode;
use crate::http::auth::{Caller, SessionCaller, Via};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::{Grants, MAX_ROTATION_GRACE, Scope, TokenRecord};

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateTokenRequest {
    /// A name to recognise the token by (at most 100 characters).
    pub label: Option<String>,
    /// What the token may do; without, everything its user may.
    #[schema(value_type = Option<Vec<Scope>>)]
    pub scopes: Option<serde_json::Value>,
    /// When it stops working (RFC 3339); without, never.
    #[serde(alias = "expiresAt")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The most authority a turn it sends may run with (`plan` < `dontAsk`
    /// < `default` < `acceptEdits` < `auto` < `bypassPermissions`).
    #[serde(alias = "maxPermissionMode")]
    #[schema(value_type = Option<PermissionMode>)]
    pub max_permission_mode: Option<serde_json::Value>,
}

/// A new token: the plaintext is in this response only.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    #[schema(example = "tok_3f9a0c1b2d4e")]
    pub token_id: String,
    #[schema(example = "la_0123456789abcdef0123456789abcdef0123456789abcdef")]
    pub token: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub grants: GrantsInfo,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub token_id: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub grants: GrantsInfo,
}

/// A token's limits; a field absent is no limit.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantsInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<BTreeSet<Scope>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_permission_mode: Option<PermissionMode>,
}

impl From<Grants> for GrantsInfo {
    fn from(g: Grants) -> Self {
        Self {
            scopes: g.scopes,
            expires_at: g.expires_at,
            max_permission_mode: g.max_permission_mode,
        }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RotateTokenRequest {
    /// How long the old token keeps working (at most 7 days); default 0.
    #[serde(alias = "graceSeconds")]
    pub grace_seconds: Option<u64>,
}

impl CreateTokenRequest {
    /// The grants asked for, checked.
    fn grants(&self, state: &AppState) -> Result<Grants, ApiError> {
        let scopes = match &self.scopes {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => {
                let names = value.as_array().ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_scopes",
                        "`scopes` must be an array of scope names",
                    )
                })?;
                let mut scopes = BTreeSet::new();
                for name in names {
                    let scope = name
                        .as_str()
                        .ok_or_else(|| {
                            ApiError::bad_request("invalid_scopes", "a scope is a string")
                        })?
                        .parse::<Scope>()
                        .map_err(|msg| ApiError::bad_request("invalid_scopes", msg))?;
                    scopes.insert(scope);
                }
                if scopes.is_empty() {
                    return Err(ApiError::bad_request(
                        "invalid_scopes",
                        "`scopes` is empty: such a token could do nothing; leave it out for full rights",
                    ));
                }
                Some(scopes)
            }
        };
        let max_permission_mode =
            super::turns::requested_mode(&state.config, self.max_permission_mode.as_ref())?;
        Ok(Grants {
            scopes,
            expires_at: self.expires_at,
            max_permission_mode,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// Newest first.
    pub tokens: Vec<TokenInfo>,
}

impl From<TokenRecord> for TokenInfo {
    fn from(r: TokenRecord) -> Self {
        Self {
            token_id: r.token_id,
            label: r.label,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            grants: r.grants.into(),
        }
    }
}

impl CreatedToken {
    fn new(token: String, record: TokenRecord) -> Self {
        Self {
            token_id: record.token_id,
            token,
            label: record.label,
            created_at: record.created_at,
            grants: record.grants.into(),
        }
    }
}

const SESSION_ONLY: &str = "`session_required` when called with a Bearer token";

/// Create an API token.
#[utoipa::path(
    post, path = "/api/v1/me/tokens", tag = "tokens", security(("CookieAuth" = [])),
    request_body(content = CreateTokenRequest, description = "May be empty"),
    responses(
        (status = 201, body = CreatedToken),
        (status = 400, body = ErrorEnvelope, description = "`label_too_long`, `label_invalid`, `invalid_scopes`, `invalid_permission_mode`, `expires_at_in_past`, `invalid_json`"),
        (status = 403, body = ErrorEnvelope, description = "`permission_mode_forbidden`"),
        (status = 401, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope, description = SESSION_ONLY),
        (status = 429, body = ErrorEnvelope, description = "`too_many_tokens`"),
    )
)]
pub async fn create_token(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
    Json(body): Json<CreateTokenRequest>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    let grants = body.grants(&state)?;
    let accounts = state.accounts.clone();
    let max = state.config.limits.tokens_per_user;
    let user = caller.user_id.clone();
    let (token, record) = blocking(move || {
        Ok(accounts
            .tokens
            .create_within(&user, body.label, grants, max)?)
    })
    .await?;
    tracing::info!(user = %record.user, token_id = %record.token_id, "token created");
    let entry = audit::by(&caller, "token.created")
        .with("token_id", record.token_id.clone())
        .with(
            "grants",
            serde_json::to_value(&record.grants).unwrap_or_default(),
        );
    audit::record(&state, entry).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken::new(token, record)),
    ))
}

/// Replace a token with a new one of the same label and limits; the old
/// one keeps working for `grace_seconds`, then is refused as
/// `token_expired`. From a web session, or with the very token rotated.
#[utoipa::path(
    post, path = "/api/v1/me/tokens/{tokenId}/rotate", tag = "tokens",
    params(("tokenId" = String, Path, description = "`tok_…`")),
    request_body(content = RotateTokenRequest, description = "May be empty"),
    responses(
        (status = 201, body = CreatedToken, description = "The new token; its plaintext is in this response only"),
        (status = 400, body = ErrorEnvelope, description = "`grace_too_long`, `invalid_json`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_this_token`: a token may rotate only itself"),
        (status = 404, body = ErrorEnvelope, description = "`token_not_found`"),
        (status = 409, body = ErrorEnvelope, description = "`token_rotated`: it was rotated already"),
        (status = 429, body = ErrorEnvelope, description = "`too_many_tokens`"),
    )
)]
pub async fn rotate_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(token_id): Path<String>,
    Json(body): Json<RotateTokenRequest>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    if caller.via == Via::Token && caller.token_id.as_deref() != Some(token_id.as_str()) {
        return Err(ApiError::forbidden(
            "not_this_token",
            "an API token may rotate only itself; manage other tokens from a web session",
        ));
    }
    let grace = body.grace_seconds.unwrap_or(0);
    if grace > MAX_ROTATION_GRACE.num_seconds() as u64 {
        return Err(ApiError::bad_request(
            "grace_too_long",
            format!(
                "`grace_seconds` is at most {}",
                MAX_ROTATION_GRACE.num_seconds()
            ),
        ));
    }
    let accounts = state.accounts.clone();
    let user = caller.user_id.clone();
    let rotated = token_id.clone();
    let max = state.config.limits.tokens_per_user;
    let (token, record) = blocking(move || {
        Ok(accounts.tokens.rotate(
            &user,
            &token_id,
            chrono::Duration::seconds(grace as i64),
            max,
        )?)
    })
    .await?;
    tracing::info!(user = %record.user, token_id = %record.token_id, "token rotated");
    let entry = audit::by(&caller, "token.rotated")
        .with("token_id", rotated)
        .with("new_token_id", record.token_id.clone())
        .with("grace_seconds", grace);
    audit::record(&state, entry).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken::new(token, record)),
    ))
}

/// List your API tokens, newest first.
#[utoipa::path(
    get, path = "/api/v1/me/tokens", tag = "tokens", security(("CookieAuth" = [])),
    responses(
        (status = 200, body = TokenList),
        (status = 401, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope, description = SESSION_ONLY),
    )
)]
pub async fn list_tokens(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
) -> axum::Json<TokenList> {
    let tokens = state.accounts.tokens.list(&caller.user_id);
    axum::Json(TokenList {
        tokens: tokens.into_iter().map(TokenInfo::from).collect(),
    })
}

/// Revoke one of your API tokens; it stops working at once.
#[utoipa::path(
    delete, path = "/api/v1/me/tokens/{tokenId}", tag = "tokens", security(("CookieAuth" = [])),
    params(("tokenId" = String, Path, description = "`tok_…`")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope, description = SESSION_ONLY),
        (status = 404, body = ErrorEnvelope, description = "`token_not_found`"),
    )
)]
pub async fn revoke_token(
    State(state): State<AppState>,
    SessionCaller(caller): SessionCaller,
    Path(token_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let accounts = state.accounts.clone();
    let (user, id) = (caller.user_id.clone(), token_id.clone());
    blocking(move || Ok(accounts.tokens.revoke(&user, &id)?)).await?;
    let entry = audit::by(&caller, "token.revoked").with("token_id", token_id);
    audit::record(&state, entry).await;
    Ok(StatusCode::NO_CONTENT)
}
