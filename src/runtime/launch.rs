//! Everything an agent process of a loop starts with: its workspace (made
//! on first use), environment and vault, conversation (new or resumed), and
//! under a sandbox its home and mounts.

use std::sync::Arc;

use super::Shared;
use super::agent_home;
use crate::agent::sandbox::Sandbox;
use crate::agent::{self, AgentProcess, AgentSpec, PermissionMode, Session};
use crate::store::LoopId;

/// Starts the loop's agent: a fresh conversation, or (unless `fresh`) the
/// loop's earlier one resumed. Returns the process and whether it resumes.
pub async fn start(
    shared: &Arc<Shared>,
    id: LoopId,
    fresh: bool,
) -> Result<(AgentProcess, bool), String> {
    let spec = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || spec(&shared, id, fresh))
            .await
            .map_err(|e| e.to_string())??
    };
    let resumed = matches!(spec.session, Session::Resume(_));
    let config = &shared.config;
    let process =
        agent::spawn(config.agent, &config.claude_bin, &config.sandbox, spec).map_err(|e| e.0)?;
    Ok((process, resumed))
}

fn spec(shared: &Shared, id: LoopId, fresh_session: bool) -> Result<AgentSpec, String> {
    let record = shared.loops.get(id).ok_or("the loop is gone")?;
    let loop_dir = shared.loops.work_dir(id);
    let workspace = loop_dir.join("workspace");
    let cwd = if workspace.is_dir() {
        workspace
    } else {
        super::workspace::prepare(&loop_dir, &shared.catalog, &record).map_err(|e| e.to_string())?
    };
    let config = &shared.config;
    let vault_path = shared.catalog.vault_path(&record.vault);
    let vault = if vault_path.is_file() {
        agent::env::read_vault(&vault_path)?
    } else {
        Vec::new()
    };
    agent::env::check_vault(&vault, &config.vault_allow_env)?;
    let session = match (&record.agent_session_id, fresh_session) {
        (Some(sid), false) => Session::Resume(sid.clone()),
        _ => {
            let sid = uuid::Uuid::new_v4().to_string();
            shared
                .loops
                .update(id, |r| r.agent_session_id = Some(sid.clone()))
                .map_err(|e| e.to_string())?;
            Session::New(sid)
        }
    };
    // One marker per agent process, not per loop: a stop still sweeping
    // after a crash must not reach the loop's next agent.
    let marker = format!("{}.{}", id.0, crate::ids::random_hex(4));
    let (home, mounts, cwd) = match config.sandbox {
        Sandbox::None => (None, Vec::new(), cwd),
        Sandbox::Bwrap(_) => {
            let repo = record.repo.as_ref().map(|r| shared.catalog.repo_path(r));
            let given = agent_home::sandboxed(&agent_home::Loop {
                data_dir: &config.data_dir,
                work_root: config.workspace_root.as_deref(),
                loop_dir: &loop_dir,
                workspace: &cwd,
                repo: repo.as_deref(),
                server_env: &config.agent_base_env,
                session: match &session {
                    Session::Resume(id) => Some(id),
                    Session::New(_) => None,
                },
            })?;
            (Some(given.home), given.mounts, given.workspace)
        }
    };
    let env = agent::env::build(
        config.agent_base_env.iter().cloned(),
        &config.agent_env,
        &vault,
        &marker,
        home.as_deref(),
    );
    let native = config.native_modes();
    Ok(AgentSpec {
        marker,
        cwd,
        env,
        session,
        mode: config.permission_mode.agent_side(native),
        allow_bypass: native.bypass && config.mode_allowed(PermissionMode::BypassPermissions),
        mounts,
    })
}
