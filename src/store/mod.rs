//! Files on disk: the data directory's layout, atomic writes, and one store per file.
//!
//! `users.json`, `api-tokens.json` and `sessions.json` are shared with the CLI,
//! which may change them while the server runs: see [`json_file::JsonStore`].
//! Loops are the server's own (`loops/<uuid>/meta.json`).

pub mod audit;
mod catalog;
pub mod group_commit;
mod json_file;
mod loops;
mod loops_pg;
pub mod pg;
pub mod rules;
mod sessions;
pub mod shared_log;
pub mod throttles;
mod tokens;
mod users;
pub mod webhooks;

pub use catalog::{Catalog, DEFAULT_VAULT};
pub use json_file::{JsonStore, Place, write_atomic};
pub use loops::{LoopId, LoopPage, LoopRecord, LoopStore, NewLoop, PageRequest};
pub use pg::Pg;
pub use sessions::{SESSION_TTL, SessionRecord, SessionStore};
pub use tokens::{Grants, MAX_ROTATION_GRACE, Refused, Scope, TokenRecord, TokenStore};
pub use users::{CheckMemory, User, UserStore, no_such_user};

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `Retry-After` of a [`StoreError::Full`]: the caller must free one first.
pub const RETRY_AFTER_FREEING: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything that can go wrong in a store: I/O, a file that cannot be parsed,
/// and the domain errors (with the contract's error codes) the stores decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} cannot be parsed (line {line}, column {column}: {message}); loopd never \
         replaces a file it cannot read: fix it or move it away, then start again"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{1}")]
    NotFound(&'static str, String),
    #[error("{1}")]
    Invalid(&'static str, String),
    /// A caller holds as many of something as they may; when to ask again
    /// (`Retry-After`): after freeing one, which takes a person a while.
    #[error("{1}")]
    Full(&'static str, String, std::time::Duration),
    #[error("{1}")]
    Conflict(&'static str, String),
    /// The shared database refused or could not be reached.
    #[error("the database: {0}")]
    Database(#[from] sqlx::Error),
    /// This node no longer holds the loop's lease: another node took it over,
    /// and nothing this node writes into that loop's log is accepted.
    #[error("this node lost the lease of {0}")]
    Fenced(String),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The data directory and where each file lives in it.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Creates the directory (mode 0700) if it does not exist yet.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| StoreError::io(&root, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Only tighten a directory we own; never fail start-up over it.
            let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o700));
        }
        let root = fs::canonicalize(&root).map_err(|e| StoreError::io(&root, e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn users(&self) -> PathBuf {
        self.root.join("users.json")
    }
    pub fn tokens(&self) -> PathBuf {
        self.root.join("api-tokens.json")
    }
    pub fn sessions(&self) -> PathBuf {
        self.root.join("sessions.json")
    }
    pub fn loops(&self) -> PathBuf {
        self.root.join("loops")
    }
    pub fn webhooks(&self) -> PathBuf {
        self.root.join("webhooks.json")
    }
    pub fn webhook_outbox(&self) -> PathBuf {
        self.root.join("webhook-outbox.json")
    }
    /// Held (exclusively) by whoever changes one of the shared JSON files.
    pub fn write_lock(&self) -> PathBuf {
        self.root.join(".write.lock")
    }

    /// Takes the lock that makes `serve` the only server on this directory; it
    /// is released when the returned file is dropped (or the process dies).
    pub fn lock_for_serving(&self) -> Result<File, StoreError> {
        let path = self.root.join(".serve.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::Conflict(
                "data_dir_in_use",
                format!(
                    "another `loopd serve` is already using {}",
                    self.root.display()
                ),
            )),
            Err(fs::TryLockError::Error(e)) => Err(StoreError::io(&path, e)),
        }
    }
}

/// The three files about people, shared with the CLI.
pub struct Accounts {
    pub users: UserStore,
    pub tokens: TokenStore,
    pub sessions: SessionStore,
}

impl Accounts {
    pub fn open(dir: &DataDir) -> Result<Self, StoreError> {
        Ok(Self {
            users: UserStore::open(dir.users(), dir.write_lock())?,
            tokens: TokenStore::open(dir.tokens(), dir.write_lock())?,
            sessions: SessionStore::open(dir.sessions(), dir.write_lock())?,
        })
    }

    /// The same three, as documents in the shared database.
    pub fn open_pg(pg: &Arc<Pg>) -> Result<Self, StoreError> {
        let place = |name| Place::Pg {
            pg: pg.clone(),
            name,
        };
        Ok(Self {
            users: UserStore::open_in(place("users"))?,
            tokens: TokenStore::open_in(place("api-tokens"))?,
            sessions: SessionStore::open_in(place("sessions"))?,
        })
    }

    /// Opens them where `backend` keeps them.
    pub fn open_on(backend: &Backend, dir: &DataDir) -> Result<Self, StoreError> {
        match backend {
            Backend::Files => Self::open(dir),
            Backend::Postgres(pg) => Self::open_pg(pg),
        }
    }
}

impl rules::RuleStore {
    /// Opens the standing rules where `backend` keeps them.
    pub fn open_on(backend: &Backend, dir: &DataDir) -> Result<Self, StoreError> {
        Self::open(match backend {
            Backend::Files => Place::File {
                path: dir.root().join("rules.json"),
                lock: dir.write_lock(),
            },
            Backend::Postgres(pg) => Place::Pg {
                pg: pg.clone(),
                name: "rules",
            },
        })
    }
}

impl webhooks::WebhookStore {
    /// Opens the webhooks and their outbox where `backend` keeps them.
    pub fn open_on(backend: &Backend, dir: &DataDir) -> Result<Self, StoreError> {
        match backend {
            // Their own lock: sending webhooks never holds up a login.
            Backend::Files => Self::open(
                Place::File {
                    path: dir.webhooks(),
                    lock: dir.root().join(".webhooks.lock"),
                },
                Place::File {
                    path: dir.webhook_outbox(),
                    lock: dir.root().join(".webhooks.lock"),
                },
            ),
            Backend::Postgres(pg) => Self::open(
                Place::Pg {
                    pg: pg.clone(),
                    name: "webhooks",
                },
                Place::Pg {
                    pg: pg.clone(),
                    name: "webhook-outbox",
                },
            ),
        }
    }
}

/// Where the shared state lives: the data directory's files (one node), or
/// a Postgres database that several nodes share.
#[derive(Clone)]
pub enum Backend {
    Files,
    Postgres(Arc<Pg>),
}

/// Names of profiles, vaults, repos and users: one path segment, no dot first.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}
