//! The agents behind loops. The runtime speaks to every agent through one
//! interface: it sends [`AgentInput`]s and receives [`AgentOutput`]s over
//! bounded channels, and stops it through its [`AgentHandle`].
//!
//! - `claude`: the Claude Code CLI as a child process ([`claude`]), whose
//!   stream-json lines [`mapping::map_line_into`] turns into [`AgentEvent`]s;
//! - `echo`: a built-in deterministic development agent ([`echo`]).

pub mod claude;
pub mod echo;
pub mod env;
pub mod mapping;
pub mod process;
pub mod rules;
pub mod sandbox;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use utoipa::ToSchema;

/// Which agent runs behind every loop of this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// The Claude Code CLI, one child process per live loop.
    Claude,
    /// The built-in deterministic development agent.
    Echo,
}

/// Claude Code's permission modes, as named on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
pub enum PermissionMode {
    #[serde(rename = "default")]
    #[value(name = "default")]
    Default,
    #[serde(rename = "acceptEdits")]
    #[value(name = "acceptEdits")]
    AcceptEdits,
    #[serde(rename = "bypassPermissions")]
    #[value(name = "bypassPermissions")]
    BypassPermissions,
    #[serde(rename = "plan")]
    #[value(name = "plan")]
    Plan,
    #[serde(rename = "dontAsk")]
    #[value(name = "dontAsk")]
    DontAsk,
    #[serde(rename = "auto")]
    #[value(name = "auto")]
    Auto,
}

impl PermissionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AcceptEdits => "acceptEdits",
            Self::BypassPermissions => "bypassPermissions",
            Self::Plan => "plan",
            Self::DontAsk => "dontAsk",
            Self::Auto => "auto",
        }
    }

    /// How much the agent may do without asking, for comparing modes
    /// (a token's `max_permission_mode`): plan, then dontAsk (denies what
    /// it would ask), default, acceptEdits, auto, bypassPermissions.
    pub fn authority(self) -> u8 {
        match self {
            Self::Plan => 0,
            Self::DontAsk => 1,
            Self::Default => 2,
            Self::AcceptEdits => 3,
            Self::Auto => 4,
            Self::BypassPermissions => 5,
        }
    }

    /// How loopd answers permission requests in this mode when the agent
    /// cannot run it itself: allow or deny at once, with no prompt.
    pub fn held_answer(self, native: NativeModes) -> Option<bool> {
        match self {
            Self::BypassPermissions if !native.bypass => Some(true),
            Self::DontAsk if !native.dont_ask => Some(false),
            _ => None,
        }
    }

    /// The mode the agent process itself runs in for this mode.
    pub fn agent_side(self, native: NativeModes) -> Self {
        if self.held_answer(native).is_some() {
            Self::Default
        } else {
            self
        }
    }
}

/// Which of the modes that skip prompts an agent runs itself; loopd holds
/// the others (answers their permission requests at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeModes {
    pub bypass: bool,
    pub dont_ask: bool,
}

impl NativeModes {
    /// Claude Code runs both, but refuses `bypassPermissions` as root; the
    /// echo agent runs neither.
    pub fn of(kind: AgentKind, agent_is_root: bool) -> Self {
        match kind {
            AgentKind::Claude => Self {
                bypass: !agent_is_root,
                dont_ask: true,
            },
            AgentKind::Echo => Self {
                bypass: false,
                dont_ask: false,
            },
        }
    }
}

/// Token counts, cost and duration as the agent reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// How a conversation starts: fresh with a known id, or resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    New(String),
    Resume(String),
}

impl Session {
    pub fn id(&self) -> &str {
        match self {
            Self::New(id) | Self::Resume(id) => id,
        }
    }
}

/// Everything an agent process is started with.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Marks every process of this agent (see [`process::sweep`]).
    pub marker: String,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub session: Session,
    /// The mode the agent process starts in (already [`PermissionMode::agent_side`]).
    pub mode: PermissionMode,
    /// Whether a turn may switch the agent to `bypassPermissions` later.
    pub allow_bypass: bool,
    /// What of the host the agent sees, when it runs in a sandbox.
    pub mounts: Vec<sandbox::Mount>,
}

/// What the runtime tells an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentInput {
    User(String),
    Answer {
        request_id: String,
        decision: Decision,
    },
    Interrupt,
    SetMode(PermissionMode),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allow, running the tool with this input (the original, or with answers).
    Allow {
        updated_input: Value,
    },
    Deny {
        message: String,
    },
}

/// The most of a tool's output an event carries (cut on a character
/// boundary; `truncated` says so).
pub const MAX_TOOL_OUTPUT: usize = 16 * 1024;

/// `text` cut to at most `max` bytes on a character boundary, and whether
/// it was cut.
pub fn capped(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    (text, true)
}

/// What an agent reports, already in loopd's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// A turn began in the agent (Claude Code's `system/init`).
    Init {
        session_id: String,
    },
    TextDelta(String),
    ThinkingDelta(String),
    ToolCall {
        tool_use_id: String,
        tool: String,
        input_summary: Option<String>,
        /// The tool's whole input, as the agent gave it.
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        ok: bool,
        /// What the tool returned, as text, at most [`MAX_TOOL_OUTPUT`].
        output: Option<String>,
        /// The output was longer and was cut there.
        truncated: bool,
    },
    /// The agent asks before using a tool (`AskUserQuestion` included).
    PermissionRequest {
        request_id: String,
        tool: String,
        input: Value,
        title: Option<String>,
    },
    /// The agent withdrew a request (it was interrupted).
    RequestCancelled {
        request_id: String,
    },
    /// The answer to a control request loopd sent.
    ControlResponse {
        request_id: String,
        error: Option<String>,
    },
    TurnEnd(TurnEnd),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TurnEnd {
    Success {
        usage: Usage,
    },
    /// The agent reported failure (API errors included).
    Failed {
        message: String,
        usage: Usage,
    },
    /// The turn was cut short (interrupt, or a deny that interrupts).
    Aborted {
        usage: Usage,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentOutput {
    /// What one read of the agent's output held, in order.
    Events(Vec<AgentEvent>),
    /// The agent is gone; `reason` says how (exit status, last stderr lines).
    Exited { reason: String },
}

/// A running agent: its channels and what stops it.
pub struct AgentProcess {
    pub input: mpsc::Sender<AgentInput>,
    pub output: mpsc::Receiver<AgentOutput>,
    pub handle: AgentHandle,
}

/// Stops an agent and everything it started.
pub enum AgentHandle {
    Claude(Box<claude::ClaudeHandle>),
    Echo(tokio::task::JoinHandle<()>),
}

impl AgentHandle {
    /// Ends the agent and every process it started, then reaps it. The input
    /// channel should be dropped first (a graceful exit for Claude Code).
    pub async fn stop(self) {
        match self {
            Self::Claude(handle) => (*handle).stop().await,
            Self::Echo(task) => task.abort(),
        }
    }

    /// Ends the agent and every process it started at once (SIGKILL, no
    /// grace: its loop is no longer this node's to run), then reaps it.
    pub async fn kill(self) {
        match self {
            Self::Claude(handle) => (*handle).kill().await,
            Self::Echo(task) => task.abort(),
        }
    }
}

/// Bound of the channels between the runtime and an agent.
pub const CHANNEL: usize = 1024;

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpawnError(pub String);

/// Starts an agent of this kind (a process: inside `sandbox`).
pub fn spawn(
    kind: AgentKind,
    claude_bin: &std::path::Path,
    sandbox: &sandbox::Sandbox,
    spec: AgentSpec,
) -> Result<AgentProcess, SpawnError> {
    match kind {
        AgentKind::Claude => claude::spawn(claude_bin, sandbox, spec),
        AgentKind::Echo => Ok(echo::spawn(spec)),
    }
}
