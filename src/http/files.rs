//! `/api/v1/loops/{id}/files…` and `/diff`: the loop's workspace, read-only,
//! for its owner. See [`crate::runtime::files`] for how paths are kept
//! inside.

use axum::extract::State;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::blocking;
use super::extract::Query;
use crate::http::auth::OwnedLoop;
use crate::http::error::{ApiError, ErrorEnvelope};
use crate::runtime::files::{self, FileError};
use crate::state::AppState;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Relative to the workspace; empty (the default) is the workspace.
    pub path: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` (never followed in a listing) or `other`.
    pub kind: String,
    pub size: u64,
    pub modified: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Listing {
    pub path: String,
    /// Directories first, then by name; at most 1000.
    pub entries: Vec<FileEntry>,
    /// There were more than 1000.
    pub truncated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileContent {
    pub path: String,
    /// The whole file's size in bytes.
    pub size: u64,
    /// `text/plain`, `text/markdown`, … for UTF-8 text; else
    /// `application/octet-stream`.
    pub mime: String,
    /// `utf-8` (`content` is the text) or `base64`.
    pub encoding: String,
    pub content: String,
    /// Only the first 1 MiB is here.
    pub truncated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RepoDiff {
    /// The commit the loop's branch started from.
    pub base: String,
    /// A unified diff of the workspace against `base` (committed or not), at most 1 MiB.
    pub diff: String,
    pub truncated: bool,
    /// Files git does not track yet (not in `diff`).
    pub untracked: Vec<String>,
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        let message = e.to_string();
        match e {
            FileError::BadPath(_) => ApiError::bad_request("invalid_path", message),
            FileError::Outside(_) => ApiError::forbidden("path_outside_workspace", message),
            FileError::NotFound(_) => ApiError::not_found("file_not_found", message),
            FileError::NotADirectory(_) => ApiError::bad_request("not_a_directory", message),
            FileError::NotAFile(_) => ApiError::bad_request("not_a_file", message),
            FileError::NoRepo => ApiError::bad_request("no_repo", message),
            FileError::Io(why) => ApiError::internal(anyhow::anyhow!(why)),
        }
    }
}

const PATH_ERRORS: &str = "`invalid_path` (absolute, `..`), `not_a_directory` / `not_a_file`";

/// List a directory of the loop's workspace.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/files", tag = "files",
    params(("id" = String, Path, description = "`loop_…`"), PathQuery),
    responses(
        (status = 200, body = Listing),
        (status = 400, body = ErrorEnvelope, description = PATH_ERRORS),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`, `path_outside_workspace` (a symlink leading out)"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`, `file_not_found`"),
    )
)]
pub async fn list_files(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
    Query(query): Query<PathQuery>,
) -> Result<axum::Json<Listing>, ApiError> {
    let workspace = state.loops.work_dir(record.id).join("workspace");
    let path = query.path.unwrap_or_default();
    let shown = path.clone();
    let (entries, truncated) = blocking(move || {
        if !workspace.is_dir() {
            return Ok((Vec::new(), false)); // no agent ran yet
        }
        Ok(files::list(&workspace, &path)?)
    })
    .await?;
    Ok(axum::Json(Listing {
        path: shown,
        entries: entries
            .into_iter()
            .map(|e| FileEntry {
                name: e.name,
                kind: e.kind.to_owned(),
                size: e.size,
                modified: e.modified,
            })
            .collect(),
        truncated,
    }))
}

/// Read a file of the loop's workspace (the first 1 MiB), with its type.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/files/content", tag = "files",
    params(("id" = String, Path, description = "`loop_…`"), PathQuery),
    responses(
        (status = 200, body = FileContent),
        (status = 400, body = ErrorEnvelope, description = PATH_ERRORS),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`, `path_outside_workspace` (a symlink leading out)"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`, `file_not_found`"),
    )
)]
pub async fn file_content(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
    Query(query): Query<PathQuery>,
) -> Result<axum::Json<FileContent>, ApiError> {
    let workspace = state.loops.work_dir(record.id).join("workspace");
    let path = query.path.unwrap_or_default();
    let shown = path.clone();
    let got = blocking(move || Ok(files::read(&workspace, &path)?)).await?;
    let mime = files::mime(&shown, &got.bytes);
    let (encoding, content) = match String::from_utf8(got.bytes) {
        Ok(text) if mime != "application/octet-stream" => ("utf-8", text),
        Ok(text) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(text),
        ),
        Err(e) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
        ),
    };
    Ok(axum::Json(FileContent {
        path: shown,
        size: got.size,
        mime: mime.to_owned(),
        encoding: encoding.to_owned(),
        content,
        truncated: got.truncated,
    }))
}

/// A repo loop's changes against the commit its branch started from.
#[utoipa::path(
    get, path = "/api/v1/loops/{id}/diff", tag = "files",
    params(("id" = String, Path, description = "`loop_…`")),
    responses(
        (status = 200, body = RepoDiff),
        (status = 400, body = ErrorEnvelope, description = "`no_repo`: the loop was made without `repo`"),
        (status = 401, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope, description = "`not_loop_owner`, `insufficient_scope`"),
        (status = 404, body = ErrorEnvelope, description = "`loop_not_found`"),
    )
)]
pub async fn repo_diff(
    State(state): State<AppState>,
    OwnedLoop { record, .. }: OwnedLoop,
) -> Result<axum::Json<RepoDiff>, ApiError> {
    let repo = record
        .repo
        .as_deref()
        .map(|r| state.catalog.repo_path(r))
        .ok_or_else(|| ApiError::from(FileError::NoRepo))?;
    let workspace = state.loops.work_dir(record.id).join("workspace");
    let got = blocking(move || Ok(files::diff(&repo, &workspace)?)).await?;
    Ok(axum::Json(RepoDiff {
        base: got.base,
        diff: got.diff,
        truncated: got.truncated,
        untracked: got.untracked,
    }))
}
