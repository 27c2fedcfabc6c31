//! `GET /healthz`: liveness and what the server runs.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::agent::AgentKind;
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_s: u64,
    pub agent: AgentKind,
    /// Where agents run: `bwrap` or `none`.
    #[schema(example = "bwrap")]
    pub sandbox: &'static str,
    pub live_agents: usize,
    pub max_agents: usize,
    /// E.g. that the echo development agent is in use because Claude Code
    /// was not found, or that agents run without a sandbox.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Liveness; no authentication.
#[utoipa::path(
    get, path = "/healthz", tag = "meta", security(),
    responses((status = 200, body = Health))
)]
pub async fn healthz(State(state): State<AppState>) -> axum::Json<Health> {
    let config = &state.config;
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started_at.elapsed().as_secs(),
        agent: config.agent,
        sandbox: config.sandbox.name(),
        live_agents: state.runtime.slots().live(),
        max_agents: config.max_agents,
        warnings: config.warnings.clone(),
    })
}
