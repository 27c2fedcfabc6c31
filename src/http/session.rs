//! `/api/auth/*`: web login with a session cookie.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit;
use super::limits::ClientAddr;
use super::{Json, blocking};
use crate::http::auth::{Caller, check_same_origin, session_cookie, set_session_cookie};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::audit::AuditEntry;

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// Who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub user_id: String,
    pub admin: bool,
}

/// Log in; sets the `loopd_session` cookie.
#[utoipa::path(
    post, path = "/api/auth/login", tag = "auth", security(),
    request_body = LoginRequest,
    responses(
        (status = 200, body = Me, description = "Logged in; `Set-Cookie: loopd_session=…`"),
        (status = 401, body = ErrorEnvelope, description = "`invalid_credentials`"),
        (status = 403, body = ErrorEnvelope, description = "`cross_origin_request`"),
        (status = 429, body = ErrorEnvelope, description = "`too_many_login_attempts` (per address or username) or `login_busy`; `Retry-After` says when"),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<LoginRequest>,
) -> Result<impl IntoResponse, ApiError> {
    check_same_origin(&headers, state.config.public_origin.as_deref())?;
    let shown = super::limits::shown_username(&body.username);
    let mut slot = match state.guards.login(client, &body.username).await {
        Ok(slot) => slot,
        Err(err) => {
            // Debug only: a throttled flood must not fill the log (each
            // failed check above it is logged, and those are throttled).
            tracing::debug!(username = ?shown, %client, "login refused: throttled");
            return Err(err);
        }
    };
    let accounts = state.accounts.clone();
    let verified = blocking(move || {
        // The slot is held while the password is checked: at most
        // --password-checks argon2 runs at once, each in its slot's memory.
        let Some(user) = accounts
            .users
            .verify_in(&body.username, &body.password, slot.memory())
        else {
            return Ok(None);
        };
        let secret = accounts.sessions.create(&user.name)?;
        Ok(Some((user, secret)))
    })
    .await?;
    let Some((user, secret)) = verified else {
        tracing::warn!(username = ?shown, %client, "login failed");
        audit::record(
            &state,
            AuditEntry::new(&shown, "login.failed").client(client),
        )
        .await;
        return Err(ApiError::unauthorized(
            "invalid_credentials",
            "wrong username or password",
        ));
    };
    tracing::info!(user = %user.name, %client, "logged in");
    audit::record(
        &state,
        AuditEntry::new(&user.name, "login.succeeded").client(client),
    )
    .await;
    let cookie = set_session_cookie(Some(&secret), state.config.secure_cookies());
    Ok((
        AppendHeaders([(header::SET_COOKIE, cookie)]),
        axum::Json(Me {
            user_id: user.name,
            admin: user.admin,
        }),
    ))
}

/// Log out: ends the session and clears the cookie. Always 204.
#[utoipa::path(
    post, path = "/api/auth/logout", tag = "auth", security(),
    responses(
        (status = 204, description = "Logged out"),
        (status = 403, body = ErrorEnvelope, description = "`cross_origin_request`"),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    check_same_origin(&headers, state.config.public_origin.as_deref())?;
    if let Some(secret) = session_cookie(&headers) {
        let accounts = state.accounts.clone();
        blocking(move || Ok(accounts.sessions.delete(&secret)?)).await?;
    }
    let cookie = set_session_cookie(None, state.config.secure_cookies());
    Ok((
        StatusCode::NO_CONTENT,
        AppendHeaders([(header::SET_COOKIE, cookie)]),
    ))
}

/// The logged-in user (cookie or Bearer).
#[utoipa::path(
    get, path = "/api/auth/me", tag = "auth",
    responses(
        (status = 200, body = Me),
        (status = 401, body = ErrorEnvelope),
    )
)]
pub async fn me(caller: Caller) -> axum::Json<Me> {
    axum::Json(Me {
        user_id: caller.user_id,
        admin: caller.admin,
    })
}
