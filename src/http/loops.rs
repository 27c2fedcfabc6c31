//! `/api/v1/loops`: create, list, read and archive loops.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::Query;
use super::{Json, audit};
use crate::http::auth::{Caller, LoopsRead, LoopsWrite, OwnedLoop, Scoped};
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::{LoopId, LoopRecord, NewLoop, PageRequest};

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateLoopRequest {
    /// At most 200 characters; "untitled" when absent or blank.
    pub title: Option<String>,
    /// String → string pairs, at most 16 KB serialized.
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
    /// Names of `profiles/<name>/CLAUDE.md` layers, in order.
    pub profiles: Option<Vec<String>>,
    /// A `vaults/<name>.env`; "default" when absent (which need not exist).
    pub vault: Option<String>,
    /// A git repository under `repos/` to work on.
    pub repo: Option<String>,
}

/// A loop: one long-lived conversation with an agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Loop {
    #[schema(example = "loop_0b7e4a4e-7a55-4a8c-9d7e-0f4b1f2a9c11")]
    pub id: String,
    pub title: String,
    pub created_at: DateTime<Utc>,
    /// The owner's user id.
    pub created_by: String,
    pub archived: bool,
    pub archived_at: Option<DateTime<Utc>>,
    pub metadata: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub vault: String,
    pub repo: Option<String>,
    /// When the last message arrived (creation time before that); lists are in this order.
    pub last_active_at: DateTime<Utc>,
    /// **(beyond)** In lists: a turn is running. Left out, never null (a
    /// single loop's `busy` is always there).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = bool, required = false)]
    pub busy: Option<bool>,
    /// **(beyond)** In lists: the choice the loop waits on, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, required = false)]
    pub pending_choice_id: Option<String>,
}

/// A loop with what its runtime is doing now.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoopDetail {
    #[serde(flatten)]
    pub resource: Loop,
    /// A turn is running.
    pub busy: bool,
    /// Messages waiting behind the running turn.
    pub queue_depth: usize,
    /// Turns so far.
    pub turn_count: u64,
    pub current_turn: Option<CurrentTurn>,
    /// With a shared database only: the advertise URL of the node running
    /// the loop's agent, or null when no node runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable = true)]
    pub node: Option<Option<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentTurn {
    pub turn_id: String,
    pub started_at: DateTime<Utc>,
    pub pending_choice_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoopList {
    /// Most recently active first.
    pub data: Vec<Loop>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// More loops lie beyond this page in the direction it was read.
    pub has_more: bool,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListLoopsQuery {
    /// 1–100 (clamped); default 20.
    pub limit: Option<usize>,
    /// A loop id: the loops just older than it.
    pub after: Option<String>,
    /// A loop id: the loops just newer than it.
    pub before: Option<String>,
    /// `true` includes archived loops.
    pub archived: Option<bool>,
    /// **(beyond)** Only loops whose title holds this, ignoring case.
    pub q: Option<String>,
}

impl From<LoopRecord> for Loop {
    fn from(r: LoopRecord) -> Self {
        Self {
            id: r.id.to_string(),
            title: r.title,
            created_at: r.created_at,
            created_by: r.created_by,
            archived: r.archived,
            archived_at: r.archived_at,
            metadata: r.metadata,
            profiles: r.profiles,
            vault: r.vault,
            repo: r.repo,
            last_active_at: r.last_active_at,
            busy: None,
            pending_choice_id: None,
        }
    }
}

fn validate(
    state: &AppState,
    caller: &Caller,
    body: CreateLoopRequest,
) -> Result<NewLoop, ApiError> {
    let title = match body.title.as_deref().map(str::trim) {
        None | Some("") => "untitled".to_owned(),
        Some(t) if t.chars().count() > MAX_TITLE_CHARS => {
            return Err(ApiError::bad_request(
                "title_too_long",
                format!("a title has at most {MAX_TITLE_CHARS} characters"),
            ));
        }
        Some(t) => t.to_owned(),
    };
    let metadata: BTreeMap<String, String> = match body.metadata {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(value) => serde_json::from_value(value).map_err(|_| {
            ApiError::bad_request(
                "metadata_invalid",
                "metadata must be an object whose values are all strings",
            )
        })?,
    };
    let size = serde_json::to_vec(&metadata).map_or(usize::MAX, |v| v.len());
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::bad_request(
            "metadata_too_large",
            format!("metadata is {size} bytes serialized; the limit is {MAX_METADATA_BYTES}"),
        ));
    }
    let profiles = body.profiles.unwrap_or_default();
    state.catalog.check_profiles(&profiles)?;
    let vault = body
        .vault
        .unwrap_or_else(|| crate::store::DEFAULT_VAULT.to_owned());
    state
        .catalog
        .check_vault(&vault, &caller.user_id, caller.admin)?;
    if let Some(repo) = &body.repo {
        state.catalog.check_repo(repo)?;
    }
    Ok(NewLoop {
        title,
        created_by: caller.user_id.clone(),
        metadata,
        profiles,
        vault,
        repo: body.repo,
    })
}

const VALIDATION: &str = "`title_too_long`, `metadata_invalid`, `metadata_too_large`, \
    `profile_not_found`, `duplicate_profile`, `vault_not_found`, `repo_not_found`, `invalid_json`, `invalid_body`";

/// Create a loop.
#[utoipa::path(
    post, path = "/api/v1/loops", tag = "loops",
    request_body(content = CreateLoopRequest, description = "Every field is optional; an empty body is `{}`"),
    responses(
        (status = 201, body = Loop),
        (status = 400, body = ErrorEnvelope, description = VALIDATION),
        (status = 401, body = ErrorEnvelope),
        (status = 413, body = ErrorEnvelope, description = "`body_too_large`"),
        (status = 429, body = ErrorEnvelope, description = "`too_many_loops`, `too_many_requests`"),
    )
)]
pub async fn create_loop(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<LoopsWrite>,
    Json(body): Json<CreateLoopRequest>,
) -> Result<(StatusCode, axum::Json<Loop>), ApiError> {
    let new = validate(&state, &caller, body)?;
    let record = state.runtime.create(new).await?;
    let entry = audit::by(&caller, "loop.created").with("loop_id", record.id.to_string());
    audit::record(&state, entry).await;
    Ok((StatusCode::CREATED, axum::Json(record.into())))
}

/// List your loops, most recently active first.
#[utoipa::path(
    get, path = "/api/v1/loops", tag = "loops",
    params(ListLoopsQuery),
    responses(
        (status = 200, body = LoopList),
        (status = 400, body = ErrorEnvelope, description = "`invalid_query`, `invalid_cursor`"),
        (status = 401, body = ErrorEnvelope),
    )
)]
pub async fn list_loops(
    State(state): State<AppState>,
    Scoped(caller, _): Scoped<LoopsRead>,
    Query(query): Query<ListLoopsQuery>,
) -> Result<axum::Json<LoopList>, ApiError> {
    let cursor = |value: Option<String>| {
        value
            .map(|v| {
                v.parse::<LoopId>().map_err(|()| {
                    ApiError::bad_request("invalid_cursor", format!("`{v}` is not a loop id"))
                })
            })
            .transpose()
    };
    let title_contains = match query.q.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(q) if q.chars().count() > MAX_TITLE_CHARS => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`q` has at most {MAX_TITLE_CHARS} characters"),
            ));
        }
        Some(q) => Some(q.to_owned()),
    };
    let page = PageRequest {
        title_contains,
        limit: query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        after: cursor(query.after)?,
        before: cursor(query.before)?,
    };
    let include_archived = query.archived.unwrap_or(false);
    let page = state.loops.list(&caller.user_id, include_archived, &page)?;
    let mut data: Vec<Loop> = Vec::with_capacity(page.data.len());
    for record in page.data {
        let (busy, pending) = state.runtime.log(record.id)?.view(|v| {
            let pending = v.current.as_ref().and_then(|c| c.pending.as_ref());
            (v.busy(), pending.map(|p| p.choice_id.clone()))
        });
        data.push(Loop {
            busy: Some(busy),
            pending_choice_id: pending,
            ..record.into()
        });
    }
    Ok(axum::Json(LoopList {
        first_id: data.first().map(|l| l.id.clone()),
        last_id: data.last().map(|l| l.id.clone()),
        has_more: page.has_more,
        data,
    }))
}

/// Read a loop, with its runtime state.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}", tag = "loops",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 200, body = LoopDetail),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
    )
)]
pub async fn get_loop(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
) -> Result<axum::Json<LoopDetail>, ApiError> {
    let log = state.runtime.current_log(record.id).await?;
    let node = state.runtime.node_running(record.id).await?;
    let (busy, queue_depth, turn_count, current_turn) = log.view(|v| {
        let current = v.current.as_ref().map(|cur| CurrentTurn {
            turn_id: v.turns[cur.turn].turn_id.clone(),
            started_at: cur.started_at,
            pending_choice_id: cur.pending.as_ref().map(|p| p.choice_id.clone()),
        });
        (v.busy(), v.queue.len(), v.turns.len() as u64, current)
    });
    Ok(axum::Json(LoopDetail {
        resource: record.into(),
        busy,
        queue_depth,
        turn_count,
        current_turn,
        node,
    }))
}

/// Archive a loop: its agent stops, its data stays. Idempotent.
#[utoipa::path(
    delete, path = "/api/v1/loops/{id}", tag = "loops",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 204, description = "Archived (or already was)"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
    )
)]
pub async fn archive_loop(
    State(state): State<AppState>,
    OwnedLoop { caller, record, .. }: OwnedLoop<LoopsWrite>,
) -> Result<StatusCode, ApiError> {
    state.runtime.archive(&record).await?;
    if !record.archived {
        let entry = audit::by(&caller, "loop.archived").with("loop_id", record.id.to_string());
        audit::record(&state, entry).await;
    }
    Ok(StatusCode::NO_CONTENT)
}
