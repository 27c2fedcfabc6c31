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
    /// With a shared database only: this node's advertise URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// With a shared database only: how many loops this node runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owned_loops: Option<usize>,
}

/// Liveness; no authentication.
#[utoipa::path(
    get, path = "/healthz", tag = "meta", security(),
    responses((status = 200, body = Health))
)]
pub async fn healthz(State(state): State<AppState>) -> axum::Json<Health> {
    let config = &state.config;
    let node = state.runtime.node();
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started_at.elapsed().as_secs(),
        agent: config.agent,
        sandbox: config.sandbox.name(),
        live_agents: state.runtime.slots().live(),
        max_agents: config.max_agents,
        warnings: config.warnings.clone(),
        node: node.as_ref().map(|(url, _)| url.clone()),
        owned_loops: node.map(|(_, owned)| owned),
    })
}
