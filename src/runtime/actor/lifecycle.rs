//! The actor's agent process: starting it (with the loop's workspace,
//! environment and conversation), starting afresh when a conversation
//! cannot be resumed, and stopping it with everything it started.

use tokio::sync::OwnedSemaphorePermit;

use super::{Actor, Live};
use crate::agent::sandbox::Sandbox;
use crate::agent::{self, AgentInput, AgentSpec, PermissionMode, Session};
use crate::runtime::agent_home;
use crate::runtime::events::Event;

impl Actor {
    /// Starts the agent for the first queued turn. On failure that turn ends
    /// with `agent_unavailable` and `false` is returned.
    pub(super) async fn spawn_agent(&mut self, permit: OwnedSemaphorePermit) -> bool {
        match self.launch(permit, false).await {
            Ok(()) => true,
            Err(message) => {
                self.fail_first_queued("agent_unavailable", message);
                false
            }
        }
    }

    /// Starts an agent process holding `permit`: a fresh conversation, or
    /// (unless `fresh`) the loop's earlier one resumed.
    async fn launch(&mut self, permit: OwnedSemaphorePermit, fresh: bool) -> Result<(), String> {
        let spec = self.prepare_spec(fresh).await?;
        let session = spec.session.clone();
        let mode = spec.mode;
        let config = &self.shared.config;
        let process = agent::spawn(config.agent, &config.claude_bin, &config.sandbox, spec)
            .map_err(|e| e.0)?;
        self.agent = Some(Live {
            input: process.input,
            output: process.output,
            handle: process.handle,
            permit,
            mode,
            session,
            fresh: true,
        });
        Ok(())
    }

    /// Everything the agent starts with: workspace, environment, session.
    async fn prepare_spec(&mut self, fresh_session: bool) -> Result<AgentSpec, String> {
        let shared = self.shared.clone();
        let id = self.id;
        tokio::task::spawn_blocking(move || {
            let record = shared.loops.get(id).ok_or("the loop is gone")?;
            let loop_dir = shared.loops.loop_dir(id);
            let workspace = loop_dir.join("workspace");
            let cwd = if workspace.is_dir() {
                workspace
            } else {
                crate::runtime::workspace::prepare(&loop_dir, &shared.catalog, &record)
                    .map_err(|e| e.to_string())?
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
            // One marker per agent process, not per loop: a stop still
            // sweeping after a crash must not reach the loop's next agent.
            let marker = format!("{}.{}", id.0, crate::ids::random_hex(4));
            let (home, mounts, cwd) = match config.sandbox {
                Sandbox::None => (None, Vec::new(), cwd),
                Sandbox::Bwrap(_) => {
                    let repo = record.repo.as_ref().map(|r| shared.catalog.repo_path(r));
                    let given = agent_home::sandboxed(&agent_home::Loop {
                        data_dir: &config.data_dir,
                        loop_dir: &loop_dir,
                        workspace: &cwd,
                        repo: repo.as_deref(),
                        server_env: &config.agent_base_env,
                        session: session.id(),
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
                allow_bypass: native.bypass
                    && config.mode_allowed(PermissionMode::BypassPermissions),
                mounts,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// A cold turn on a resumed conversation that failed before it began:
    /// the conversation could not be resumed.
    pub(super) fn resume_failed(&self, message: &str) -> bool {
        let resumed = matches!(
            self.agent.as_ref().map(|a| &a.session),
            Some(Session::Resume(_))
        );
        let turn = self.turn.as_ref();
        resumed
            && turn.is_some_and(|t| t.cold && !t.started && t.content.is_some())
            && (message.is_empty() || message.contains("No conversation found"))
    }

    /// Starts a fresh conversation for the running turn and sends its
    /// message again; its `started` will say `history_lost`.
    pub(super) async fn restart_fresh(&mut self) {
        tracing::warn!(loop_id = %self.id, "the conversation could not be resumed; starting a fresh one");
        let Some(permit) = self.stop_agent_keep_permit().await else {
            return;
        };
        let mut turn = self.turn.take().expect("a turn runs");
        if let Err(message) = self.launch(permit, true).await {
            self.emit(Event::Error {
                turn_id: Some(turn.turn_id),
                code: "agent_unavailable".into(),
                message: format!(
                    "the conversation could not be resumed, and a fresh one could not be started: {message}"
                ),
            });
            return;
        }
        let live = self.agent.as_mut().expect("just started");
        live.fresh = false;
        let native = self.shared.config.native_modes();
        if turn.mode.agent_side(native) != live.mode {
            live.mode = turn.mode.agent_side(native);
            let _ = live.input.try_send(AgentInput::SetMode(live.mode));
        }
        let content = turn.content.clone().unwrap_or_default();
        let _ = live.input.try_send(AgentInput::User(content));
        turn.history_lost = true;
        self.turn = Some(turn);
    }

    /// Ends the agent process and everything it started. `wait`: return only
    /// once it is gone (otherwise it ends in the background).
    pub(super) async fn stop_agent(&mut self, wait: bool) {
        self.shared.slots.set_busy(self.id);
        let Some(live) = self.agent.take() else {
            return;
        };
        let Live {
            input,
            handle,
            permit,
            ..
        } = live;
        drop(input); // closes the agent's stdin
        let ending = async move {
            handle.stop().await;
            drop(permit);
        };
        if wait {
            ending.await;
        } else {
            tokio::spawn(ending);
        }
    }

    /// Like [`Self::stop_agent`] with waiting, but keeps the slot for a new start.
    async fn stop_agent_keep_permit(&mut self) -> Option<OwnedSemaphorePermit> {
        let Live {
            input,
            handle,
            permit,
            ..
        } = self.agent.take()?;
        drop(input);
        handle.stop().await;
        Some(permit)
    }
}
