//! `sessions.json`: web login sessions, keyed by SHA-256 of the cookie value,
//! each with an expiry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, StoreError};
use crate::ids;

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionsFile {
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

pub struct SessionStore {
    file: JsonStore<SessionsFile>,
}

impl SessionStore {
    pub fn open(path: PathBuf, lock: PathBuf) -> Result<Self, StoreError> {
        Self::open_in(Place::File { path, lock })
    }

    /// Opens the collection wherever it lives (a file, or a database document).
    pub fn open_in(place: Place) -> Result<Self, StoreError> {
        Ok(Self {
            file: JsonStore::open_in(place)?,
        })
    }

    /// Starts a session; returns the cookie value (stored only as a hash).
    /// Expired sessions are dropped on the way.
    pub fn create(&self, user: &str) -> Result<String, StoreError> {
        let secret = ids::random_hex(32);
        let now = ids::now();
        let record = SessionRecord {
            user: user.to_owned(),
            created_at: now,
            expires_at: now + SESSION_TTL,
        };
        self.file.update(|f| {
            f.sessions.retain(|_, s| s.expires_at > now);
            f.sessions.insert(ids::sha256_hex(&secret), record);
            Ok::<_, StoreError>(())
        })?;
        Ok(secret)
    }

    /// The live session for a cookie value, if any.
    pub fn lookup(&self, secret: &str) -> Option<SessionRecord> {
        if secret.len() != 64 {
            return None;
        }
        let key = ids::sha256_hex(secret);
        let file = self.file.read_having(|f| !f.sessions.contains_key(&key));
        let record = file.sessions.get(&key)?;
        (record.expires_at > Utc::now()).then(|| record.clone())
    }

    /// Ends one session; ending an unknown one is not an error.
    pub fn delete(&self, secret: &str) -> Result<(), StoreError> {
        let hash = ids::sha256_hex(secret);
        if !self.file.read().sessions.contains_key(&hash) {
            return Ok(());
        }
        self.file.update(|f| {
            f.sessions.remove(&hash);
            Ok(())
        })
    }

    /// Ends every session of a user (password change, removal).
    pub fn delete_user(&self, user: &str) -> Result<usize, StoreError> {
        self.file.update(|f| {
            let before = f.sessions.len();
            f.sessions.retain(|_, s| s.user != user);
            Ok(before - f.sessions.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> SessionStore {
        SessionStore::open(dir.join("sessions.json"), dir.join(".lock")).unwrap()
    }

    #[test]
    fn create_lookup_delete() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path());
        let secret = sessions.create("alice").unwrap();
        assert_eq!(sessions.lookup(&secret).unwrap().user, "alice");
        assert!(sessions.lookup("nope").is_none());
        let raw = std::fs::read_to_string(dir.path().join("sessions.json")).unwrap();
        assert!(!raw.contains(&secret));
        sessions.delete(&secret).unwrap();
        assert!(sessions.lookup(&secret).is_none());
        sessions.delete(&secret).unwrap();
    }

    #[test]
    fn expired_sessions_do_not_authenticate_and_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path());
        let old = sessions.create("alice").unwrap();
        // Age the session on disk, as if 31 days had passed.
        sessions
            .file
            .update(|f| {
                for s in f.sessions.values_mut() {
                    s.expires_at = ids::now() - chrono::Duration::seconds(1);
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        assert!(sessions.lookup(&old).is_none());
        sessions.create("bob").unwrap();
        assert_eq!(sessions.file.read().sessions.len(), 1);
    }

    #[test]
    fn delete_user_ends_all_their_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path());
        let a1 = sessions.create("alice").unwrap();
        let a2 = sessions.create("alice").unwrap();
        let b = sessions.create("bob").unwrap();
        assert_eq!(sessions.delete_user("alice").unwrap(), 2);
        assert!(sessions.lookup(&a1).is_none() && sessions.lookup(&a2).is_none());
        assert!(sessions.lookup(&b).is_some());
    }
}
