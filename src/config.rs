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
    /// Extra names the `Host` header may carry (`--allowed-hosts`).
    pub allowed_hosts: Vec<String>,
    /// Take the client address from the last `X-Forwarded-For` entry.
    pub trust_forwarded_for: bool,
    pub connections: ConnLimits,
    pub limits: Limits,
    /// With `--database-url`: the database and this node's place among others.
    pub cluster: Option<Cluster>,
    /// `--workspace-root`: loops' workspaces and agent homes live here
    /// (storage all nodes share) instead of in the data directory.
    pub workspace_root: Option<PathBuf>,
    /// `--webhook-allow-private`: webhooks may target loopback, private
    /// and link-local addresses.
    pub webhook_allow_private: bool,
    /// `--metrics-bind`: where `/metrics` is served, if anywhere.
    pub metrics_bind: Option<SocketAddr>,
}

/// A node sharing one Postgres database with others.
#[derive(Clone)]
pub struct Cluster {
    /// Never logged: it may hold a password.
    pub database_url: String,
    /// What other nodes reach this one at, and its name in leases.
    pub advertise_url: String,
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("advertise_url", &self.advertise_url)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn resolve(
        database_url: String,
        advertise_url: Option<String>,
        bind: SocketAddr,
        lease_ttl: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            database_url.starts_with("postgres://") || database_url.starts_with("postgresql://"),
            "--database-url must be a postgres:// URL"
        );
        anyhow::ensure!(lease_ttl >= 3, "--lease-ttl must be at least 3 seconds");
        let advertise_url = match advertise_url {
            Some(url) => {
                let uri: Uri = url
                    .parse()
                    .with_context(|| format!("--advertise-url `{url}` is not a URL"))?;
                anyhow::ensure!(
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some(),
                    "--advertise-url must be an http:// or https:// URL with a host"
                );
                url.trim_end_matches('/').to_owned()
            }
            None => {
                anyhow::ensure!(
                    !bind.ip().is_unspecified(),
                    "--bind {bind} is every address: say which one other nodes reach this one at with --advertise-url"
                );
                format!("http://{bind}")
            }
        };
        Ok(Self {
            database_url,
            advertise_url,
            lease_ttl: Duration::from_secs(lease_ttl),
        })
    }
}

/// Bounds on connections (see `http::serve`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections at once, in total (SSE streams included).
    pub max_connections: usize,
    /// Open connections at once from one client address (an IPv6 /64).
    pub max_per_client: usize,
    /// How long a client may take to send a request's headers, and how long
    /// a kept-alive connection may wait for its next request.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// How long a request may take until its response starts (its body
    /// read included; an SSE stream's life is not counted).
    pub request_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_per_client: 1024,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What one caller may pile up. Every bound is generous: a normal bot never
/// meets one; a flood does.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Password checks (argon2, 19 MiB each) running at once.
    pub password_checks: usize,
    /// How long a login waits for a password check before 429.
    pub password_wait: Duration,
    /// Login attempts per client address: burst, then one per period.
    pub login_per_client: Rate,
    /// Login attempts per username: burst, then one per period.
    pub login_per_user: Rate,
    /// Requests per API token or web session: burst, then one per period.
    pub requests_per_caller: Rate,
    /// Open SSE streams per user.
    pub streams_per_user: usize,
    /// Turns waiting behind the running one, per loop.
    pub queued_turns_per_loop: usize,
    /// Bytes of messages waiting to run, per user over all their loops.
    pub queued_bytes_per_user: usize,
    /// Loops per user that are not archived.
    pub loops_per_user: usize,
    /// API tokens per user (made through the API; the CLI is not bounded).
    pub tokens_per_user: usize,
    /// Idempotency keys remembered per user (the oldest goes first).
    pub idempotency_keys_per_user: usize,
}

/// `burst` at once, then one more every `period`. Written `BURST/PERIOD`,
/// e.g. `20/3s`, `600/50ms`, `10/1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub period: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not BURST/PERIOD (e.g. 20/3s, 600/50ms, 10/1m)");
        let (burst, period) = text.split_once('/').ok_or_else(bad)?;
        let burst: u32 = burst.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let (digits, unit) = period.split_at(
            period
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(period.len()),
        );
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let period = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            _ => return Err(bad()),
        };
        if burst == 0 || period.is_zero() {
            return Err(format!(
                "`{text}`: the burst and the period must be above zero"
            ));
        }
        Ok(Self { burst, period })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.period.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}/{}s", self.burst, ms / 1000)
        } else {
            write!(f, "{}/{ms}ms", self.burst)
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            password_checks: std::thread::available_parallelism().map_or(2, |n| n.get()),
            password_wait: Duration::from_secs(1),
            login_per_client: Rate {
                burst: 20,
                period: Duration::from_secs(3),
            },
            login_per_user: Rate {
                burst: 10,
                period: Duration::from_secs(6),
            },
            requests_per_caller: Rate {
                burst: 600,
                period: Duration::from_millis(50),
            },
            streams_per_user: 256,
            queued_turns_per_loop: 64,
            queued_bytes_per_user: 64 * 1024 * 1024,
            loops_per_user: 10_000,
            tokens_per_user: 100,
            idempotency_keys_per_user: 10_000,
        }
    }
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
            allowed_hosts: Vec::new(),
            trust_forwarded_for: false,
            connections: ConnLimits::default(),
            limits: Limits::default(),
            cluster: None,
            workspace_root: None,
            webhook_allow_private: false,
            metrics_bind: None,
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
    fn default_rates_are_written_as_they_are_read() {
        // The CLI's defaults are these rates, shown and parsed back as text.
        let d = Limits::default();
        for rate in [d.login_per_client, d.login_per_user, d.requests_per_caller] {
            assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate), "{rate}");
        }
        assert_eq!(d.login_per_client.to_string(), "20/3s");
        assert_eq!(d.requests_per_caller.to_string(), "600/50ms");
    }

    #[test]
    fn rates_read_as_burst_over_period() {
        let rate = |s: &str| s.parse::<Rate>();
        assert_eq!(
            rate("20/3s"),
            Ok(Rate {
                burst: 20,
                period: Duration::from_secs(3)
            })
        );
        assert_eq!(
            rate("600/50ms"),
            Ok(Rate {
                burst: 600,
                period: Duration::from_millis(50)
            })
        );
        assert_eq!(
            rate("10/1m"),
            Ok(Rate {
                burst: 10,
                period: Duration::from_secs(60)
            })
        );
        for bad in ["20", "x/3s", "20/3h", "0/1s", "5/0s", "20/s"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
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
