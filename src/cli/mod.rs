//! The command line: `serve`, `user …` and `token …` (clap derive, an
//! environment variable for every flag).

mod audit;
mod manage;
mod migrate;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::sandbox::{Sandbox, SandboxMode};
use crate::agent::{AgentKind, PermissionMode};
use crate::config::{self, Config, ConnLimits, DEFAULT_MAX_AGENTS, Limits, Rate};

pub use audit::run_audit;
pub use manage::{CliStores, run_token, run_user};
pub use migrate::run_migrate;

#[derive(Debug, Parser)]
#[command(
    name = "loopd",
    version,
    about = "An HTTP+SSE server for long-lived AI agent conversations"
)]
pub struct Cli {
    /// The data directory [default: $LOOPD_HOME, else ~/.loopd]
    #[arg(long, global = true, env = "LOOPD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep users, tokens, sessions, loops and their event logs in this
    /// Postgres database (`postgres://user:pass@host/db`), shared by every
    /// node that names it; without it, everything lives in the data directory.
    #[arg(
        long,
        global = true,
        env = "LOOPD_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, global = true, env = "LOOPD_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, global = true, env = "LOOPD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Copy the data directory (users, tokens, sessions, loops and their
    /// logs) into the database of --database-url; what is there already is
    /// kept, so an interrupted copy is finished by running it again.
    Migrate,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Who did what: logins, tokens, webhooks, loops made and archived,
    /// choices answered, turns in a raised permission mode. Oldest first:
    /// at, user, action, client (or `-`), details (JSON, or `-`), tab-separated.
    Audit {
        /// Only this user's acts.
        #[arg(long)]
        user: Option<String>,
        /// Only acts at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only the latest N.
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LOOPD_BIND", default_value = "127.0.0.1:8787")]
    pub bind: SocketAddr,
    /// Agent behind loops [default: claude when its binary is found, else echo]
    #[arg(long, env = "LOOPD_AGENT", value_enum)]
    pub agent: Option<AgentKind>,
    /// The Claude Code binary [default: `claude` on PATH]
    #[arg(long, env = "LOOPD_CLAUDE_BIN")]
    pub claude_bin: Option<PathBuf>,
    /// Permission mode of every loop (a message may override it for its turn).
    #[arg(long, env = "LOOPD_PERMISSION_MODE", value_enum, default_value_t = PermissionMode::Default)]
    pub permission_mode: PermissionMode,
    /// Seconds an idle agent process lives before it is reclaimed.
    #[arg(long, env = "LOOPD_IDLE_TIMEOUT", default_value_t = 1800)]
    pub idle_timeout: u64,
    /// Most agent processes alive at once.
    #[arg(long, env = "LOOPD_MAX_AGENTS", default_value_t = DEFAULT_MAX_AGENTS)]
    pub max_agents: usize,
    /// The URL people reach the server at (its origin is the one cookie
    /// requests must come from; https makes cookies `Secure`).
    #[arg(long, env = "LOOPD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// More environment variable names to pass to agents (comma-separated).
    #[arg(long, env = "LOOPD_AGENT_ENV", value_delimiter = ',')]
    pub agent_env: Vec<String>,
    /// Where agents run: `bwrap` (bubblewrap, or refuse to start), `none`,
    /// or `auto` (bubblewrap when it works here, else none with a warning).
    #[arg(long, env = "LOOPD_SANDBOX", value_enum, default_value_t = SandboxMode::Auto)]
    pub sandbox: SandboxMode,
    /// The permission modes a turn may ask for (comma-separated) [default:
    /// all; `bypassPermissions` only with a sandbox unless listed here]
    #[arg(
        long,
        env = "LOOPD_PERMISSION_MODES",
        value_enum,
        value_delimiter = ','
    )]
    pub permission_modes: Vec<PermissionMode>,
    /// Loader variables (PATH, HOME, LD_*, NODE_OPTIONS, …) a vault may set
    /// anyway (comma-separated names).
    #[arg(long, env = "LOOPD_VAULT_ALLOW_ENV", value_delimiter = ',')]
    pub vault_allow_env: Vec<String>,
    /// More names the `Host` header may carry (comma-separated), besides the
    /// bind address, loopback names and --public-url's host.
    #[arg(long, env = "LOOPD_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Behind a reverse proxy: take the client address (for login throttles)
    /// from the last `X-Forwarded-For` entry, which the proxy appends.
    #[arg(long, env = "LOOPD_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
    /// Let webhooks target loopback, private and link-local addresses
    /// (refused by default: a user could otherwise make this server reach
    /// into its own network).
    #[arg(long, env = "LOOPD_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Serve Prometheus metrics at `/metrics` on this address (its own
    /// listener, without authentication: bind it where only your scraper
    /// reaches, e.g. 127.0.0.1:9187).
    #[arg(long, env = "LOOPD_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// With --database-url: the URL other nodes reach this one at
    /// (`http://10.0.0.5:8787`); defaults to `http://` and the bind address.
    #[arg(long, env = "LOOPD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// With --database-url: how long a loop stays this node's after its last
    /// renewal (renewed every third of it); a dead node's loops are taken over
    /// within milliseconds of its end.
    #[arg(long, env = "LOOPD_LEASE_TTL", default_value_t = 12)]
    pub lease_ttl: u64,
    /// Keep loops' workspaces and agent homes here instead of in the data
    /// directory: on storage every node mounts at this path, a loop taken
    /// over by another node keeps its files and its conversation.
    #[arg(long, env = "LOOPD_WORKSPACE_ROOT")]
    pub workspace_root: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The limits of `serve` (see docs/security.md).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Open connections at once, in total (SSE streams included).
    #[arg(long, env = "LOOPD_MAX_CONNECTIONS", default_value_t = ConnLimits::default().max_connections)]
    pub max_connections: usize,
    /// Open connections at once from one client address (IPv6: one /64).
    #[arg(long, env = "LOOPD_MAX_CONNECTIONS_PER_CLIENT", default_value_t = ConnLimits::default().max_per_client)]
    pub max_connections_per_client: usize,
    /// Seconds a client may take to send a request's headers, and a
    /// kept-alive connection may wait for its next request.
    #[arg(long, env = "LOOPD_HEADER_TIMEOUT", default_value_t = ConnLimits::default().header_timeout.as_secs())]
    pub header_timeout: u64,
    /// Seconds a request may take until its response starts (reading its
    /// body included; an SSE stream then lives as long as it needs).
    #[arg(long, env = "LOOPD_REQUEST_TIMEOUT", default_value_t = ConnLimits::default().request_timeout.as_secs())]
    pub request_timeout: u64,
    /// Largest request head (request line and headers), in bytes.
    #[arg(long, env = "LOOPD_MAX_HEADER_BYTES", default_value_t = ConnLimits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Password checks running at once [default: the number of cores]
    #[arg(long, env = "LOOPD_PASSWORD_CHECKS")]
    pub password_checks: Option<usize>,
    /// Login attempts per client address: BURST/PERIOD (then one per PERIOD).
    #[arg(long, env = "LOOPD_LOGIN_RATE_PER_CLIENT", default_value_t = Limits::default().login_per_client)]
    pub login_rate_per_client: Rate,
    /// Login attempts per username: BURST/PERIOD.
    #[arg(long, env = "LOOPD_LOGIN_RATE_PER_USER", default_value_t = Limits::default().login_per_user)]
    pub login_rate_per_user: Rate,
    /// Requests per API token or web session: BURST/PERIOD.
    #[arg(long, env = "LOOPD_REQUEST_RATE", default_value_t = Limits::default().requests_per_caller)]
    pub request_rate: Rate,
    /// Open SSE streams per user.
    #[arg(long, env = "LOOPD_MAX_STREAMS_PER_USER", default_value_t = Limits::default().streams_per_user)]
    pub max_streams_per_user: usize,
    /// Turns waiting behind the running one, per loop.
    #[arg(long, env = "LOOPD_MAX_QUEUED_TURNS", default_value_t = Limits::default().queued_turns_per_loop)]
    pub max_queued_turns: usize,
    /// Bytes of messages waiting to run, per user over all their loops.
    #[arg(long, env = "LOOPD_MAX_QUEUED_BYTES_PER_USER", default_value_t = Limits::default().queued_bytes_per_user)]
    pub max_queued_bytes_per_user: usize,
    /// Loops per user that are not archived.
    #[arg(long, env = "LOOPD_MAX_LOOPS_PER_USER", default_value_t = Limits::default().loops_per_user)]
    pub max_loops_per_user: usize,
    /// API tokens per user, made through the API (the CLI is not bounded).
    #[arg(long, env = "LOOPD_MAX_TOKENS_PER_USER", default_value_t = Limits::default().tokens_per_user)]
    pub max_tokens_per_user: usize,
    /// Idempotency keys remembered per user (the oldest is forgotten first).
    #[arg(long, env = "LOOPD_MAX_IDEMPOTENCY_KEYS_PER_USER", default_value_t = Limits::default().idempotency_keys_per_user)]
    pub max_idempotency_keys_per_user: usize,
}

impl LimitArgs {
    fn resolve(self) -> anyhow::Result<(ConnLimits, Limits)> {
        for (name, value) in [
            ("--max-connections", self.max_connections),
            (
                "--max-connections-per-client",
                self.max_connections_per_client,
            ),
            ("--max-streams-per-user", self.max_streams_per_user),
            ("--max-loops-per-user", self.max_loops_per_user),
            ("--max-tokens-per-user", self.max_tokens_per_user),
            (
                "--max-idempotency-keys-per-user",
                self.max_idempotency_keys_per_user,
            ),
            ("--header-timeout", self.header_timeout as usize),
            ("--request-timeout", self.request_timeout as usize),
        ] {
            anyhow::ensure!(value >= 1, "{name} must be at least 1");
        }
        anyhow::ensure!(
            self.max_header_bytes >= 1024,
            "--max-header-bytes must be at least 1024"
        );
        let defaults = Limits::default();
        let password_checks = self.password_checks.unwrap_or(defaults.password_checks);
        anyhow::ensure!(password_checks >= 1, "--password-checks must be at least 1");
        Ok((
            ConnLimits {
                max_connections: self.max_connections,
                max_per_client: self.max_connections_per_client,
                header_timeout: std::time::Duration::from_secs(self.header_timeout),
                max_header_bytes: self.max_header_bytes,
                request_timeout: std::time::Duration::from_secs(self.request_timeout),
            },
            Limits {
                password_checks,
                password_wait: defaults.password_wait,
                login_per_client: self.login_rate_per_client,
                login_per_user: self.login_rate_per_user,
                requests_per_caller: self.request_rate,
                streams_per_user: self.max_streams_per_user,
                queued_turns_per_loop: self.max_queued_turns,
                queued_bytes_per_user: self.max_queued_bytes_per_user,
                loops_per_user: self.max_loops_per_user,
                tokens_per_user: self.max_tokens_per_user,
                idempotency_keys_per_user: self.max_idempotency_keys_per_user,
            },
        ))
    }
}

impl ServeArgs {
    pub fn into_config(
        self,
        data_dir: PathBuf,
        database_url: Option<String>,
    ) -> anyhow::Result<Config> {
        let cluster = database_url
            .map(|url| config::Cluster::resolve(url, self.advertise_url, self.bind, self.lease_ttl))
            .transpose()?;
        let (agent, claude_bin, agent_warning) = config::resolve_agent(self.agent, self.claude_bin);
        anyhow::ensure!(self.max_agents >= 1, "--max-agents must be at least 1");
        let (sandbox, sandbox_warning) =
            Sandbox::resolve(self.sandbox).map_err(anyhow::Error::msg)?;
        let permission_modes = if self.permission_modes.is_empty() {
            config::default_permission_modes(&sandbox)
        } else {
            self.permission_modes
        };
        anyhow::ensure!(
            permission_modes.contains(&self.permission_mode),
            "--permission-mode {} is not among --permission-modes",
            self.permission_mode.as_str()
        );
        let (connections, limits) = self.limits.resolve()?;
        Ok(Config {
            allowed_hosts: self.allowed_hosts,
            trust_forwarded_for: self.trust_forwarded_for,
            webhook_allow_private: self.webhook_allow_private,
            metrics_bind: self.metrics_bind,
            connections,
            limits,
            bind: self.bind,
            data_dir,
            agent,
            warnings: agent_warning.into_iter().chain(sandbox_warning).collect(),
            claude_bin,
            sandbox,
            permission_modes,
            vault_allow_env: self.vault_allow_env,
            permission_mode: self.permission_mode,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            max_agents: self.max_agents,
            public_origin: self
                .public_url
                .as_deref()
                .map(config::public_origin)
                .transpose()?,
            agent_env: self.agent_env,
            agent_base_env: std::env::vars().collect(),
            cluster,
            workspace_root: self
                .workspace_root
                .map(|root| {
                    std::fs::create_dir_all(&root)
                        .and_then(|()| std::fs::canonicalize(&root))
                        .with_context(|| format!("--workspace-root {}", root.display()))
                })
                .transpose()?,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user; without --password-stdin a password is generated and printed alone on stdout.
    Add {
        name: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users: name, then `admin` or `member`, tab-separated.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password (and end their web sessions); without
    /// --password-stdin a password is generated and printed alone on stdout.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user, their API tokens and their web sessions (their loops stay on disk).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token; the plaintext is printed alone on stdout, once.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        label: Option<String>,
        /// Limit the token to this scope (repeat for more): loops:read,
        /// loops:write, messages:write, choices:write, webhooks:write.
        /// Without, it may do everything its user may.
        #[arg(long = "scope", value_parser = parse_scope)]
        scopes: Vec<crate::store::Scope>,
        /// When the token stops working (RFC 3339).
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// The most authority a turn it sends may run with.
        #[arg(long, value_enum)]
        max_permission_mode: Option<crate::agent::PermissionMode>,
    },
    /// Replace a token with a new one (same label and limits), printed alone
    /// on stdout; the old one keeps working for --grace seconds.
    Rotate {
        #[arg(long)]
        user: String,
        token_id: String,
        #[arg(long, default_value_t = 0)]
        grace: u64,
    },
    /// List a user's tokens: tokenId, label, createdAt, lastUsedAt (or `-`), tab-separated.
    List {
        #[arg(long)]
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token.
    Revoke {
        #[arg(long)]
        user: String,
        token_id: String,
    },
}

fn parse_scope(s: &str) -> Result<crate::store::Scope, String> {
    s.parse()
}
