//! `api-tokens.json`: Bearer tokens, keyed by SHA-256 of the plaintext, which
//! is never stored. `lastUsedAt` is kept in memory and written in batches.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, StoreError};
use crate::ids;

pub const TOKEN_PREFIX: &str = "la_";
pub const MAX_LABEL_CHARS: usize = 100;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokensFile {
    /// SHA-256 (hex) of the plaintext → the token.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: String,
    pub user: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

pub struct TokenStore {
    file: JsonStore<TokensFile>,
    /// hash → when it was last used, not yet written to the file.
    pending_use: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl TokenStore {
    pub fn open(path: PathBuf, lock: PathBuf) -> Result<Self, StoreError> {
        Self::open_in(Place::File { path, lock })
    }

    /// Opens the collection wherever it lives (a file, or a database document).
    pub fn open_in(place: Place) -> Result<Self, StoreError> {
        Ok(Self {
            file: JsonStore::open_in(place)?,
            pending_use: Mutex::new(HashMap::new()),
        })
    }

    /// Creates a token; returns the plaintext (shown once) and the record.
    pub fn create(
        &self,
        user: &str,
        label: Option<String>,
    ) -> Result<(String, TokenRecord), StoreError> {
        self.create_within(user, label, usize::MAX)
    }

    /// Creates a token unless `user` already has `max` of them.
    pub fn create_within(
        &self,
        user: &str,
        label: Option<String>,
        max: usize,
    ) -> Result<(String, TokenRecord), StoreError> {
        if let Some(label) = &label {
            check_label(label)?;
        }
        let plaintext = format!("{TOKEN_PREFIX}{}", ids::random_hex(24));
        let record = TokenRecord {
            token_id: format!("tok_{}", ids::random_hex(6)),
            user: user.to_owned(),
            label,
            created_at: ids::now(),
            last_used_at: None,
        };
        let hash = ids::sha256_hex(&plaintext);
        self.file.update(|f| {
            let held = f.tokens.values().filter(|t| t.user == user).count();
            if held >= max {
                return Err(StoreError::Full(
                    "too_many_tokens",
                    format!(
                        "you have {held} API tokens, as many as one user may (--max-tokens-per-user); revoke one first"
                    ),
                    super::RETRY_AFTER_FREEING,
                ));
            }
            f.tokens.insert(hash, record.clone());
            Ok::<_, StoreError>(())
        })?;
        Ok((plaintext, record))
    }

    /// The token's record if `plaintext` is a live token, and notes the use.
    /// Malformed strings are rejected before hashing.
    pub fn authenticate(&self, plaintext: &str) -> Option<TokenRecord> {
        if !well_formed(plaintext) {
            return None;
        }
        let hash = ids::sha256_hex(plaintext);
        let file = self.file.read_having(|f| !f.tokens.contains_key(&hash));
        let record = file.tokens.get(&hash).cloned()?;
        self.pending_use
            .lock()
            .expect("pending_use poisoned")
            .insert(hash, ids::now());
        Some(record)
    }

    /// The user's tokens, newest first, with uses not yet written merged in.
    pub fn list(&self, user: &str) -> Vec<TokenRecord> {
        let file = self.file.read();
        let pending = self.pending_use.lock().expect("pending_use poisoned");
        let mut out: Vec<TokenRecord> = file
            .tokens
            .iter()
            .filter(|(_, r)| r.user == user)
            .map(|(hash, r)| {
                let mut r = r.clone();
                if let Some(at) = pending.get(hash) {
                    r.last_used_at = r.last_used_at.max(Some(*at));
                }
                r
            })
            .collect();
        out.sort_by(|a, b| (b.created_at, &b.token_id).cmp(&(a.created_at, &a.token_id)));
        out
    }

    pub fn revoke(&self, user: &str, token_id: &str) -> Result<(), StoreError> {
        self.file.update(|f| {
            let hash = f
                .tokens
                .iter()
                .find(|(_, r)| r.user == user && r.token_id == token_id)
                .map(|(h, _)| h.clone())
                .ok_or_else(|| {
                    StoreError::NotFound(
                        "token_not_found",
                        format!("no token `{token_id}` for this user"),
                    )
                })?;
            f.tokens.remove(&hash);
            Ok(())
        })
    }

    /// Removes every token of a user (when the user is removed).
    pub fn revoke_all(&self, user: &str) -> Result<usize, StoreError> {
        self.file.update(|f| {
            let before = f.tokens.len();
            f.tokens.retain(|_, r| r.user != user);
            Ok(before - f.tokens.len())
        })
    }

    /// Writes the uses noted since the last flush, in one locked update.
    /// Tokens revoked meanwhile (e.g. by the CLI) stay revoked.
    pub fn flush_last_used(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *self.pending_use.lock().expect("pending_use poisoned"));
        if pending.is_empty() {
            return Ok(0);
        }
        let result = self.file.update(|f| {
            let mut n = 0;
            for (hash, at) in &pending {
                if let Some(r) = f.tokens.get_mut(hash) {
                    r.last_used_at = r.last_used_at.max(Some(*at));
                    n += 1;
                }
            }
            Ok(n)
        });
        if result.is_err() {
            // Keep them for the next try, without overwriting newer uses.
            let mut now = self.pending_use.lock().expect("pending_use poisoned");
            for (hash, at) in pending {
                now.entry(hash).or_insert(at);
            }
        }
        result
    }
}

fn well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == 48 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn check_label(label: &str) -> Result<(), StoreError> {
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(StoreError::Invalid(
            "label_too_long",
            format!("a token label has at most {MAX_LABEL_CHARS} characters"),
        ));
    }
    if label.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "label_invalid",
            "a token label cannot contain control characters (tabs, newlines)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> TokenStore {
        TokenStore::open(dir.join("api-tokens.json"), dir.join(".lock")).unwrap()
    }

    #[test]
    fn create_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let (plain, rec) = tokens.create("alice", Some("ci".into())).unwrap();
        assert!(plain.starts_with("la_") && plain.len() == 51, "{plain}");
        assert!(rec.token_id.starts_with("tok_") && rec.token_id.len() == 16);
        assert_eq!(tokens.authenticate(&plain).unwrap().user, "alice");

        // Only the hash is on disk.
        let raw = std::fs::read_to_string(dir.path().join("api-tokens.json")).unwrap();
        assert!(!raw.contains(&plain) && raw.contains(&ids::sha256_hex(&plain)));

        assert!(tokens.authenticate("la_nothex").is_none());
        assert!(tokens.authenticate(&plain.to_uppercase()).is_none());
        assert!(matches!(
            tokens.revoke("bob", &rec.token_id),
            Err(StoreError::NotFound("token_not_found", _))
        ));
        tokens.revoke("alice", &rec.token_id).unwrap();
        assert!(tokens.authenticate(&plain).is_none());
    }

    #[test]
    fn last_used_is_shown_at_once_and_written_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let (plain, _) = tokens.create("alice", None).unwrap();
        let written = std::fs::read(dir.path().join("api-tokens.json")).unwrap();
        tokens.authenticate(&plain).unwrap();
        // Using a token does not rewrite the file…
        assert_eq!(
            std::fs::read(dir.path().join("api-tokens.json")).unwrap(),
            written
        );
        // …but the listing shows it already.
        assert!(tokens.list("alice")[0].last_used_at.is_some());
        assert_eq!(tokens.flush_last_used().unwrap(), 1);
        let reopened = open(dir.path());
        assert!(reopened.list("alice")[0].last_used_at.is_some());
        assert_eq!(tokens.flush_last_used().unwrap(), 0);
    }

    #[test]
    fn flush_does_not_resurrect_a_token_revoked_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let server = open(dir.path());
        let cli = open(dir.path());
        let (plain, rec) = server.create("alice", None).unwrap();
        server.authenticate(&plain).unwrap();
        cli.revoke("alice", &rec.token_id).unwrap();
        assert_eq!(server.flush_last_used().unwrap(), 0);
        assert!(server.authenticate(&plain).is_none());
    }

    #[test]
    fn list_is_newest_first_and_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let (_, a) = tokens.create("alice", Some("a".into())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (_, b) = tokens.create("alice", Some("b".into())).unwrap();
        tokens.create("bob", None).unwrap();
        let ids: Vec<_> = tokens
            .list("alice")
            .into_iter()
            .map(|t| t.token_id)
            .collect();
        assert_eq!(ids, vec![b.token_id, a.token_id]);
        assert!(matches!(
            tokens.create("alice", Some("tab\there".into())),
            Err(StoreError::Invalid("label_invalid", _))
        ));
        assert_eq!(tokens.revoke_all("alice").unwrap(), 2);
        assert!(tokens.list("alice").is_empty());
        assert_eq!(tokens.list("bob").len(), 1);
    }
}
