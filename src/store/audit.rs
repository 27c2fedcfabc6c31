//! The audit trail: who did what. Logins (both ways, with the client
//! address), tokens made, rotated and revoked, webhooks made and deleted,
//! loops made and archived, every choice answered, every turn that asked
//! for more than the server's default permission mode. Never a password, a
//! token, a cookie or message text.
//!
//! On files, `audit.jsonl` in the data directory: one JSON line per act,
//! each appended in one write and synced, never rewritten. On Postgres, the
//! `audit` table, appended to only.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Backend, DataDir, Pg, StoreError};

/// One act.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// Who acted (for a failed login: the username tried; for the command
    /// line: `operator`).
    pub user: String,
    /// `login.succeeded`, `login.failed`, `token.created`, `token.rotated`,
    /// `token.revoked`, `webhook.created`, `webhook.deleted`,
    /// `loop.created`, `loop.archived`, `choice.answered`, `turn.mode_raised`.
    pub action: String,
    /// The client address, for acts over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// What the act was on and how (ids, never secrets or text).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl AuditEntry {
    pub fn new(user: &str, action: &str) -> Self {
        Self {
            at: crate::ids::now(),
            user: user.to_owned(),
            action: action.to_owned(),
            client: None,
            details: Map::new(),
        }
    }

    pub fn client(mut self, client: impl ToString) -> Self {
        self.client = Some(client.to_string());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// Which acts to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub user: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// The latest this many (of those matching).
    pub limit: Option<usize>,
}

impl AuditFilter {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.user.as_ref().is_none_or(|u| *u == e.user) && self.since.is_none_or(|t| e.at >= t)
    }
}

pub enum AuditLog {
    File {
        path: PathBuf,
        /// Appends from this process one at a time.
        writing: Mutex<()>,
    },
    Pg(Arc<Pg>),
}

impl AuditLog {
    pub fn open_on(backend: &Backend, dir: &DataDir) -> Self {
        match backend {
            Backend::Files => Self::File {
                path: dir.root().join("audit.jsonl"),
                writing: Mutex::new(()),
            },
            Backend::Postgres(pg) => Self::Pg(pg.clone()),
        }
    }

    /// Appends one act, durably (blocking).
    pub fn record(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        match self {
            Self::File { path, writing } => {
                let mut line = serde_json::to_vec(entry).expect("an audit entry serializes");
                line.push(b'\n');
                let _one = writing.lock().expect("audit lock poisoned");
                let mut options = OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path).map_err(|e| StoreError::io(path, e))?;
                file.write_all(&line).map_err(|e| StoreError::io(path, e))?;
                file.sync_data().map_err(|e| StoreError::io(path, e))
            }
            Self::Pg(pg) => pg.block(async {
                sqlx::query("INSERT INTO audit (at, user_name, entry) VALUES ($1, $2, $3)")
                    .bind(entry.at)
                    .bind(&entry.user)
                    .bind(sqlx::types::Json(entry))
                    .execute(pg.pool())
                    .await?;
                Ok(())
            }),
        }
    }

    /// The acts `filter` asks for, oldest first (blocking). A torn last
    /// line (a crash mid-write) is skipped; any other line that cannot be
    /// read is an error naming the file and line.
    pub fn read(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        match self {
            Self::File { path, .. } => {
                let file = match std::fs::File::open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(StoreError::io(path, e)),
                };
                let mut kept: VecDeque<AuditEntry> = VecDeque::new();
                let mut lines = BufReader::new(file).split(b'\n').enumerate().peekable();
                while let Some((n, line)) = lines.next() {
                    let line = line.map_err(|e| StoreError::io(path, e))?;
                    let entry: AuditEntry = match serde_json::from_slice(&line) {
                        Ok(e) => e,
                        Err(_) if lines.peek().is_none() => break,
                        Err(e) => {
                            return Err(StoreError::Corrupt {
                                path: path.clone(),
                                line: n + 1,
                                column: e.column(),
                                message: e.to_string(),
                            });
                        }
                    };
                    if filter.matches(&entry) {
                        kept.push_back(entry);
                        if kept.len() > limit {
                            kept.pop_front();
                        }
                    }
                }
                Ok(kept.into())
            }
            Self::Pg(pg) => pg.block(async {
                let rows: Vec<sqlx::types::Json<AuditEntry>> = sqlx::query_scalar(
                    "SELECT entry FROM (SELECT id, entry FROM audit \
                     WHERE ($1::text IS NULL OR user_name = $1) AND ($2::timestamptz IS NULL OR at >= $2) \
                     ORDER BY id DESC LIMIT $3) latest ORDER BY id",
                )
                .bind(&filter.user)
                .bind(filter.since)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(pg.pool())
                .await?;
                Ok(rows.into_iter().map(|r| r.0).collect())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acts_are_appended_and_read_back_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_on(&Backend::Files, &DataDir::create(dir.path()).unwrap());
        assert!(log.read(&AuditFilter::default()).unwrap().is_empty());
        let first = AuditEntry::new("alice", "login.succeeded").client("127.0.0.1");
        log.record(&first).unwrap();
        // The later acts a second on (explicit times: no race with a clock).
        let cut = first.at + chrono::Duration::seconds(1);
        for n in 0..3 {
            let mut entry = AuditEntry::new("bob", "loop.created").with("n", n);
            entry.at = cut;
            log.record(&entry).unwrap();
        }
        let all = log.read(&AuditFilter::default()).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], first);
        let bobs = AuditFilter {
            user: Some("bob".into()),
            limit: Some(2),
            ..Default::default()
        };
        let got = log.read(&bobs).unwrap();
        assert_eq!(
            got.iter()
                .map(|e| e.details["n"].clone())
                .collect::<Vec<_>>(),
            [1, 2]
        );
        let since = AuditFilter {
            since: Some(cut),
            ..Default::default()
        };
        assert_eq!(log.read(&since).unwrap().len(), 3);

        // A torn last line is skipped; a bad line before it is an error.
        let path = dir.path().join("audit.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"at\":").unwrap();
        assert_eq!(log.read(&AuditFilter::default()).unwrap().len(), 4);
        file.write_all(b"\n").unwrap();
        log.record(&AuditEntry::new("bob", "loop.archived"))
            .unwrap();
        assert!(matches!(
            log.read(&AuditFilter::default()),
            Err(StoreError::Corrupt { line: 5, .. })
        ));
    }
}
