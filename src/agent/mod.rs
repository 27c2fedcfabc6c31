//! The agents behind loops: which kinds exist and the permission modes they
//! understand. (The drivers themselves plug in here.)

use serde::{Deserialize, Serialize};
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
