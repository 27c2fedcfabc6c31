//! `/api/v1/me/tokens`: API tokens, managed from a web session only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Json, blocking};
use crate::http::auth::SessionCaller;
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::TokenRecord;

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateTokenRequest {
    /// A name to recognise the token by (at most 100 characters).
    pub label: Option<String>,
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
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub token_id: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
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
        (status = 400, body = ErrorEnvelope, description = "`label_too_long`, `label_invalid`, `invalid_json`"),
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
    let accounts = state.accounts.clone();
    let max = state.config.limits.tokens_per_user;
    let (token, record) = blocking(move || {
        Ok(accounts
            .tokens
            .create_within(&caller.user_id, body.label, max)?)
    })
    .await?;
    tracing::info!(user = %record.user, token_id = %record.token_id, "token created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            token_id: record.token_id,
            token,
            label: record.label,
            created_at: record.created_at,
        }),
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
    blocking(move || Ok(accounts.tokens.revoke(&caller.user_id, &token_id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}
