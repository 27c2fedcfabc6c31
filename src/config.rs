//! The server's settings, resolved from the command line and environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::Uri;

use crate::agent::sandbox::{Sandbox, SandboxMode};
use crate::agent::{AgentKind, NativeModes, PermissionMode};

#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub agent: AgentKind,
    /// What operators must know (shown in the log and `/healthz`): the echo
    /// agent runs although nobody asked for it, agents run without a sandbox.
    pub warnings: Vec<String>,
    pub claude_bin: PathBuf,
    /// Where agent processes run.
    pub sandbox: Sandbox,
    pub permission_mode: PermissionMode,
    /// The modes a turn may ask for (`--permission-modes`).
    pub permission_modes: Vec<PermissionMode>,
    /// Loader variables (`PATH`, `LD_*`, …) a vault may set anyway.
    pub vault_allow_env: Vec<String>,
    pub idle_timeout: Duration,
    pub max_agents: usize,
    /// `scheme://host[:port]` when `--public-url` was given.
    pub public_origin: Option<String>,
    /// Extra environment variable names passed through to agents.
    pub agent_env: Vec<String>,
    /// The environment agents' environments are built from (see
    /// `agent::env`): the server's own, read once at start.
    pub agent_base_env: Vec<(String, String)>,
}

impl Config {
    /// Settings for a server on `data_dir` with everything else at its default
    /// (the sandbox of `--sandbox auto`) and the echo agent (what tests and
    /// `Config::default`-style callers want).
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let (sandbox, warning) = Sandbox::resolve(SandboxMode::Auto).expect("auto never fails");
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8787)),
            data_dir: data_dir.into(),
            agent: AgentKind::Echo,
            warnings: warning.into_iter().collect(),
            claude_bin: PathBuf::from("claude"),
            permission_modes: default_permission_modes(&sandbox),
            sandbox,
            vault_allow_env: Vec::new(),
            permission_mode: PermissionMode::Default,
            idle_timeout: Duration::from_secs(1800),
            max_agents: DEFAULT_MAX_AGENTS,
            public_origin: None,
            agent_env: Vec::new(),
            agent_base_env: std::env::vars().collect(),
        }
    }

    /// Which prompt-skipping modes the agent runs itself (loopd holds the rest).
    pub fn native_modes(&self) -> NativeModes {
        NativeModes::of(self.agent, self.sandbox.agent_is_root())
    }

    /// Whether a turn may ask for `mode`.
    pub fn mode_allowed(&self, mode: PermissionMode) -> bool {
        self.permission_modes.contains(&mode)
    }

    /// Whether cookies must carry `Secure` (the server is reached over https).
    pub fn secure_cookies(&self) -> bool {
        self.public_origin
            .as_deref()
            .is_some_and(|o| o.starts_with("https://"))
    }
}

pub const DEFAULT_MAX_AGENTS: usize = 8;

/// `--permission-modes` when not given: every mode, but `bypassPermissions`
/// only inside a sandbox (without one it would let any token run anything
/// as loopd's user).
pub fn default_permission_modes(sandbox: &Sandbox) -> Vec<PermissionMode> {
    use clap::ValueEnum;
    PermissionMode::value_variants()
        .iter()
        .copied()
        .filter(|m| *m != PermissionMode::BypassPermissions || matches!(sandbox, Sandbox::Bwrap(_)))
        .collect()
}

/// `--data-dir`, else `$LOOPD_HOME`, else `~/.loopd`.
pub fn resolve_data_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    if let Some(home) = std::env::var_os("LOOPD_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).context(
        "cannot find a data directory: set --data-dir, LOOPD_DATA_DIR, LOOPD_HOME or HOME",
    )?;
    Ok(Path::new(&home).join(".loopd"))
}

/// The origin (`scheme://authority`) of a `--public-url`.
pub fn public_origin(url: &str) -> anyhow::Result<String> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("--public-url `{url}` is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        bail!("--public-url `{url}` needs a scheme and a host, e.g. https://loopd.example.com");
    };
    if scheme != "http" && scheme != "https" {
        bail!("--public-url `{url}` must be http or https");
    }
    Ok(format!(
        "{scheme}://{}",
        authority.as_str().to_ascii_lowercase()
    ))
}

/// `--agent` as given, else `claude` when its binary is found, else `echo`
/// with a warning. Returns the agent, the claude binary, and the warning.
pub fn resolve_agent(
    agent: Option<AgentKind>,
    claude_bin: Option<PathBuf>,
) -> (AgentKind, PathBuf, Option<String>) {
    let found = match &claude_bin {
        Some(path) => which::which(path).ok(),
        None => which::which("claude").ok(),
    };
    let bin = found
        .clone()
        .or(claude_bin)
        .unwrap_or_else(|| PathBuf::from("claude"));
    match agent {
        Some(kind) => (kind, bin, None),
        None if found.is_some() => (AgentKind::Claude, bin, None),
        None => (
            AgentKind::Echo,
            bin,
            Some(
                "the Claude Code CLI was not found (install it with `npm install -g @anthropic-ai/claude-code` \
                 or point --claude-bin at it); loops run the built-in echo development agent"
                    .to_owned(),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_origin_keeps_scheme_and_authority_only() {
        assert_eq!(
            public_origin("https://Loopd.Example.com/app/").unwrap(),
            "https://loopd.example.com"
        );
        assert_eq!(
            public_origin("http://10.0.0.5:8787").unwrap(),
            "http://10.0.0.5:8787"
        );
        assert!(public_origin("loopd.example.com").is_err());
        assert!(public_origin("ftp://x").is_err());
    }

    #[test]
    fn missing_claude_falls_back_to_echo_with_a_warning() {
        let (kind, _, warning) =
            resolve_agent(None, Some(PathBuf::from("/nonexistent/claude-binary")));
        assert_eq!(kind, AgentKind::Echo);
        assert!(warning.unwrap().contains("echo"));
        let (kind, _, warning) = resolve_agent(
            Some(AgentKind::Claude),
            Some(PathBuf::from("/nonexistent/claude-binary")),
        );
        assert_eq!(kind, AgentKind::Claude);
        assert!(warning.is_none());
    }
}
