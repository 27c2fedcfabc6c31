//! Who is calling: a Bearer token or a session cookie resolve to one
//! [`Caller`]; cookie requests that change state must come from our origin;
//! [`Scoped`] is a caller whose token has a scope; [`OwnedLoop`] is the
//! caller's own loop named in the path.

use std::marker::PhantomData;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use cookie::Cookie;

use crate::agent::PermissionMode;
use crate::http::error::ApiError;
use crate::state::AppState;
use crate::store::{Grants, LoopId, LoopRecord, Refused, SESSION_TTL, Scope};

pub const SESSION_COOKIE: &str = "loopd_session";

/// An authenticated user, whichever way they authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub admin: bool,
    pub via: Via,
    /// The token's id (`None` for a session).
    pub token_id: Option<String>,
    /// What the token may do; a session may do everything.
    pub grants: Grants,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Token,
    Session,
}

impl Caller {
    /// 403 `insufficient_scope` unless the caller may act with `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.grants.allows(scope) {
            return Ok(());
        }
        Err(ApiError::forbidden(
            "insufficient_scope",
            format!("this API token lacks the scope `{}`", scope.as_str()),
        ))
    }

    /// 403 `permission_mode_above_token` if the caller's token may not run
    /// a turn in `mode`.
    pub fn require_mode(&self, mode: PermissionMode) -> Result<(), ApiError> {
        if self.grants.allows_mode(mode) {
            return Ok(());
        }
        let max = self
            .grants
            .max_permission_mode
            .map_or("", PermissionMode::as_str);
        Err(ApiError::forbidden(
            "permission_mode_above_token",
            format!(
                "this API token may run turns in modes up to `{max}`, not `{}`",
                mode.as_str()
            ),
        ))
    }
}

/// A scope, as a type, for [`Scoped`] and [`OwnedLoop`].
pub trait NeedScope: Send + Sync + 'static {
    const SCOPE: Scope;
}

macro_rules! scopes {
    ($($name:ident),*) => {$(
        #[doc = concat!("Needs `", stringify!($name), "`.")]
        pub struct $name;
        impl NeedScope for $name {
            const SCOPE: Scope = Scope::$name;
        }
    )*};
}
scopes!(
    LoopsRead,
    LoopsWrite,
    MessagesWrite,
    ChoicesWrite,
    WebhooksWrite
);

/// A caller whose credentials carry the scope `S` (403
/// `insufficient_scope` if not).
pub struct Scoped<S: NeedScope>(pub Caller, pub PhantomData<S>);

impl<S: NeedScope> FromRequestParts<AppState> for Scoped<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(S::SCOPE)?;
        Ok(Self(caller, PhantomData))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let accounts = &state.accounts;
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let token = value.to_str().ok().and_then(bearer).ok_or_else(|| {
                ApiError::unauthorized(
                    "invalid_token",
                    "the Authorization header must be `Bearer la_<48 hex>`",
                )
            })?;
            let unknown =
                || ApiError::unauthorized("invalid_token", "unknown or revoked API token");
            let record = accounts
                .tokens
                .authenticate(token)
                .map_err(|why| match why {
                    Refused::Unknown => unknown(),
                    Refused::Expired => ApiError::unauthorized(
                        "token_expired",
                        "this API token has expired (or was rotated and its grace is over)",
                    ),
                })?;
            let user = accounts.users.get(&record.user).ok_or_else(unknown)?;
            state.guards.request(token)?;
            return Ok(Self {
                user_id: user.name,
                admin: user.admin,
                via: Via::Token,
                token_id: Some(record.token_id),
                grants: record.grants,
            });
        }
        if let Some(secret) = session_cookie(&parts.headers) {
            let user = accounts
                .sessions
                .lookup(&secret)
                .and_then(|s| accounts.users.get(&s.user))
                .ok_or_else(|| {
                    ApiError::unauthorized(
                        "invalid_session",
                        "your session has expired or ended; log in again",
                    )
                })?;
            if !is_safe(&parts.method) {
                check_same_origin(&parts.headers, state.config.public_origin.as_deref())?;
            }
            state.guards.request(&secret)?;
            return Ok(Self {
                user_id: user.name,
                admin: user.admin,
                via: Via::Session,
                token_id: None,
                grants: Grants::default(),
            });
        }
        Err(ApiError::unauthorized(
            "missing_credentials",
            "send `Authorization: Bearer la_…` or log in at /api/auth/login",
        ))
    }
}

/// A caller who logged in with the web session cookie; Bearer tokens are
/// refused (a bot cannot mint tokens).
#[derive(Debug, Clone)]
pub struct SessionCaller(pub Caller);

impl FromRequestParts<AppState> for SessionCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.via != Via::Session {
            // 401, as loopat answers (and so every bot written for it expects).
            return Err(ApiError::unauthorized(
                "session_required",
                "API tokens are managed from a logged-in web session, not with a Bearer token",
            ));
        }
        Ok(Self(caller))
    }
}

/// The caller and the loop named by the path's `{id}`: 404
/// `loop_not_found` if there is no such loop, 403 `not_loop_owner` if it is
/// someone else's (after authentication: a stranger learns nothing), 403
/// `insufficient_scope` if the caller's token lacks `S`.
pub struct OwnedLoop<S: NeedScope = LoopsRead> {
    pub caller: Caller,
    pub record: LoopRecord,
    pub scope: PhantomData<S>,
}

impl<S: NeedScope> FromRequestParts<AppState> for OwnedLoop<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Scoped(caller, _) = Scoped::<S>::from_request_parts(parts, state).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("no path parameters: {e}")))?;
        let id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("the route has no `{{id}}`")))?;
        let not_found = || ApiError::not_found("loop_not_found", format!("no loop `{id}`"));
        let loop_id: LoopId = id.parse().map_err(|()| not_found())?;
        let record = state.loops.get(loop_id).ok_or_else(not_found)?;
        if record.created_by != caller.user_id {
            return Err(ApiError::forbidden(
                "not_loop_owner",
                format!("loop `{id}` belongs to another user"),
            ));
        }
        Ok(Self {
            caller,
            record,
            scope: PhantomData,
        })
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The value of our session cookie, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == SESSION_COOKIE)
        .map(|c| c.value().to_owned())
}

/// Refuses requests a browser sent on behalf of another site. Requests with
/// neither `Origin` nor `Sec-Fetch-Site` (curl, bots) pass. Without
/// `--public-url`, the origin's host must be the `Host` the request was sent to.
pub fn check_same_origin(headers: &HeaderMap, public_origin: Option<&str>) -> Result<(), ApiError> {
    let refuse = || {
        ApiError::forbidden(
            "cross_origin_request",
            "cookie-authenticated requests that change state must come from this server's own pages",
        )
    };
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.to_str(), Ok("same-origin" | "none"))
    {
        return Err(refuse());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| refuse())?.to_ascii_lowercase();
    let ok = match public_origin {
        Some(expected) => origin == expected,
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_ascii_lowercase);
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            host.is_some() && origin_host == host.as_deref()
        }
    };
    if ok { Ok(()) } else { Err(refuse()) }
}

/// The `Set-Cookie` value that logs a browser in (or out, with `None`).
pub fn set_session_cookie(secret: Option<&str>, secure: bool) -> String {
    let max_age = match secret {
        Some(_) => cookie::time::Duration::seconds(SESSION_TTL.as_secs() as i64),
        None => cookie::time::Duration::ZERO,
    };
    Cookie::build((SESSION_COOKIE, secret.unwrap_or("").to_owned()))
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .path("/")
        .secure(secure)
        .max_age(max_age)
        .build()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            let name = axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn same_origin_rule() {
        let host = ("host", "127.0.0.1:8787");
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, bool);
        let table: &[Case] = &[
            (&[host], None, true),
            (&[host, ("origin", "http://127.0.0.1:8787")], None, true),
            (&[host, ("origin", "https://127.0.0.1:8787")], None, true),
            (&[host, ("origin", "http://evil.example")], None, false),
            (&[host, ("origin", "null")], None, false),
            (&[("origin", "http://127.0.0.1:8787")], None, false),
            (&[host, ("sec-fetch-site", "same-origin")], None, true),
            (&[host, ("sec-fetch-site", "none")], None, true),
            (&[host, ("sec-fetch-site", "cross-site")], None, false),
            (&[host, ("sec-fetch-site", "same-site")], None, false),
            (
                &[host, ("origin", "https://loopd.example.com")],
                Some("https://loopd.example.com"),
                true,
            ),
            (
                &[host, ("origin", "http://127.0.0.1:8787")],
                Some("https://loopd.example.com"),
                false,
            ),
        ];
        for (pairs, public, ok) in table {
            let got = check_same_origin(&headers(pairs), *public).is_ok();
            assert_eq!(got, *ok, "{pairs:?} with {public:?}");
        }
    }

    #[test]
    fn reads_our_cookie_among_others() {
        let h = headers(&[("cookie", "a=1; loopd_session=abc; b=2")]);
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        assert!(session_cookie(&headers(&[("cookie", "a=1")])).is_none());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer la_x"), Some("la_x"));
        assert_eq!(bearer("bearer la_x"), Some("la_x"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn cookie_attributes() {
        let c = set_session_cookie(Some("s3cret"), true);
        for part in [
            "loopd_session=s3cret",
            "HttpOnly",
            "SameSite=Lax",
            "Path=/",
            "Secure",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_session_cookie(Some("x"), false).contains("Secure"));
        assert!(set_session_cookie(None, false).contains("Max-Age=0"));
    }
}
