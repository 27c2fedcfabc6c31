//! `/api/v1/me/webhooks`: signed webhooks (Standard Webhooks), so a bot
//! learns of prompts and ended turns without holding a stream.

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Json, audit, blocking};
use crate::http::auth::{Scoped, WebhooksWrite};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::runtime::webhooks::guard;
use crate::state::AppState;
use crate::store::LoopId;
use crate::store::webhooks::{Delivery, DeliveryStatus, EVENTS, Webhook};

/// The longest webhook URL taken.
const MAX_URL_BYTES: usize = 2048;
/// The most loops one webhook may name.
const MAX_LOOP_IDS: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateWebhookRequest {
    /// Where to POST: http(s), not a private address (unless the server
    /// runs with `--webhook-allow-private`); redirects are not followed.
    pub url: String,
    /// Any of `started`, `requires_choice`, `choice_resolved`, `done`,
    /// `error`, `interrupted`.
    pub events: Vec<String>,
    /// Only these loops (yours); without, all your loops, new ones included.
    pub loop_ids: Option<Vec<String>>,
}

/// A webhook; `secret` (`whsec_…`) only in the answer that made it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookInfo {
    #[schema(example = "wh_3f9a0c1b2d4e5f60")]
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub loop_ids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl WebhookInfo {
    fn new(hook: Webhook, with_secret: bool) -> Self {
        Self {
            id: hook.id,
            url: hook.url,
            events: hook.events,
            loop_ids: hook.loop_ids,
            secret: with_secret.then_some(hook.secret),
            created_at: hook.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// Oldest first.
    pub data: Vec<WebhookInfo>,
}

/// One event's delivery to a webhook, and its latest attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryInfo {
    /// The `webhook-id` header it is sent with (the same at every attempt).
    pub id: String,
    #[serde(rename = "type")]
    pub event: String,
    pub loop_id: String,
    pub seq: u64,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The receiver's status code at the latest attempt, if it answered.
    pub response_code: Option<u16>,
    /// Why the latest attempt failed, when it did not get an answer.
    pub error: Option<String>,
    pub next_retry_at: Option<DateTime<Utc>>,
}

impl From<Delivery> for DeliveryInfo {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.msg_id,
            event: d.event,
            loop_id: d.loop_id,
            seq: d.seq,
            status: match d.status {
                DeliveryStatus::Pending => "pending",
                DeliveryStatus::Delivered => "delivered",
                DeliveryStatus::Failed => "failed",
            }
            .to_owned(),
            attempts: d.attempts,
            created_at: d.created_at,
            last_attempt_at: d.last_attempt_at,
            response_code: d.response_code,
            error: d.error,
            next_retry_at: d.next_at.filter(|_| d.status == DeliveryStatus::Pending),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first: those still waiting, and the latest that finished.
    pub data: Vec<DeliveryInfo>,
}

/// Checks a new webhook's fields; returns them as stored.
async fn validate(
    state: &AppState,
    user: &str,
    body: CreateWebhookRequest,
) -> Result<(String, Vec<String>, Option<Vec<String>>), ApiError> {
    if body.url.len() > MAX_URL_BYTES {
        return Err(ApiError::bad_request(
            "webhook_url_invalid",
            format!("`url` has at most {MAX_URL_BYTES} bytes"),
        ));
    }
    let url = guard::check_url(&body.url, state.config.webhook_allow_private)
        .await
        .map_err(|why| ApiError::bad_request("webhook_url_invalid", why))?;
    let mut events = BTreeSet::new();
    for name in &body.events {
        if !EVENTS.contains(&name.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_events",
                format!(
                    "`{name}` is not an event webhooks are told of ({})",
                    EVENTS.join(", ")
                ),
            ));
        }
        events.insert(name.clone());
    }
    if events.is_empty() {
        return Err(ApiError::bad_request("invalid_events", "`events` is empty"));
    }
    let loop_ids = match body.loop_ids {
        None => None,
        Some(ids) if ids.is_empty() || ids.len() > MAX_LOOP_IDS => {
            return Err(ApiError::bad_request(
                "invalid_loop_ids",
                format!("`loop_ids` names 1 to {MAX_LOOP_IDS} loops, or is left out for all"),
            ));
        }
        Some(ids) => {
            let mut mine = BTreeSet::new();
            for id in ids {
                let owned = id
                    .parse::<LoopId>()
                    .ok()
                    .and_then(|l| state.loops.get(l))
                    .is_some_and(|r| r.created_by == user);
                if !owned {
                    return Err(ApiError::bad_request(
                        "invalid_loop_ids",
                        format!("`{id}` is not one of your loops"),
                    ));
                }
                mine.insert(id);
            }
            Some(mine.into_iter().collect())
        }
    };
    Ok((url.to_string(), events.into_iter().collect(), loop_ids))
}

/// Create a webhook.
#[utoipa::path(
    post, path = "/api/v1/me/webhooks", tag = "webhooks",
    request_body = CreateWebhookRequest,
    responses(
        (status = 201, body = WebhookInfo, description = "With its `secret`, shown this once"),
        (status = 400, body = ErrorEnvelope, description = "`webhook_url_invalid`, `invalid_events`, `invalid_loop_ids`, `invalid_json`, `invalid_body`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope` (making one needs `webhooks:write` and `loops:read`)"),
        (status = 429, body = ErrorEnvelope, description = "`too_many_webhooks`"),
    )
)]
pub async fn create_webhook(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<WebhooksWrite>,
    Json(body): Json<CreateWebhookRequest>,
) -> Result<(StatusCode, axum::Json<WebhookInfo>), ApiError> {
    // A webhook sends what the loops say (tool inputs included): reading
    // them is needed too.
    caller.require(crate::store::Scope::LoopsRead)?;
    let (url, events, loop_ids) = validate(&state, &caller.user_id, body).await?;
    let store = state.webhooks.clone();
    let user = caller.user_id.clone();
    let hook = blocking(move || Ok(store.create(&user, url, events, loop_ids)?)).await?;
    tracing::info!(user = %caller.user_id, webhook_id = %hook.id, "webhook created");
    // The host only: a URL may carry credentials.
    let host = reqwest::Url::parse(&hook.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned));
    let entry = audit::by(&caller, "webhook.created")
        .with("webhook_id", hook.id.clone())
        .with("host", host)
        .with("events", hook.events.clone());
    audit::record(&state, entry).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(WebhookInfo::new(hook, true)),
    ))
}

/// List your webhooks (without their secrets).
#[utoipa::path(
    get, path = "/api/v1/me/webhooks", tag = "webhooks",
    responses(
        (status = 200, body = WebhookList),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
    )
)]
pub async fn list_webhooks(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<WebhooksWrite>,
) -> axum::Json<WebhookList> {
    let hooks = state.webhooks.list(&caller.user_id);
    axum::Json(WebhookList {
        data: hooks
            .into_iter()
            .map(|h| WebhookInfo::new(h, false))
            .collect(),
    })
}

/// Delete a webhook; what it had still to deliver is dropped with it.
#[utoipa::path(
    delete, path = "/api/v1/me/webhooks/{webhookId}", tag = "webhooks",
    params(("webhookId" = String, Path, description = "`wh_…`")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`webhook_not_found`"),
    )
)]
pub async fn delete_webhook(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<WebhooksWrite>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let store = state.webhooks.clone();
    let user = caller.user_id.clone();
    let gone = id.clone();
    blocking(move || Ok(store.delete(&user, &gone)?)).await?;
    tracing::info!(user = %caller.user_id, webhook_id = %id, "webhook deleted");
    let entry = audit::by(&caller, "webhook.deleted").with("webhook_id", id);
    audit::record(&state, entry).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook's recent deliveries: status, response code, when, next retry.
#[utoipa::path(
    get, path = "/api/v1/me/webhooks/{webhookId}/deliveries", tag = "webhooks",
    params(("webhookId" = String, Path, description = "`wh_…`")),
    responses(
        (status = 200, body = DeliveryList),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`webhook_not_found`"),
    )
)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<WebhooksWrite>,
    Path(id): Path<String>,
) -> Result<axum::Json<DeliveryList>, ApiError> {
    let hook = state.webhooks.get(&caller.user_id, &id)?;
    let found = state.webhooks.deliveries(&hook.id);
    Ok(axum::Json(DeliveryList {
        data: found.into_iter().map(DeliveryInfo::from).collect(),
    }))
}
