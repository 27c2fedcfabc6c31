//! `api-tokens.json`: Bearer tokens, keyed by SHA-256 of the plaintext, which
//! is never stored. `lastUsedAt` is kept in memory and written in batches.
//! A token may be limited ([`Grants`]): to some scopes, until a time, and to
//! permission modes up to one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, StoreError};
use crate::agent::PermissionMode;
use crate::ids;

pub const TOKEN_PREFIX: &str = "la_";
pub const MAX_LABEL_CHARS: usize = 100;
/// The longest grace a rotated token may keep working for.
pub const MAX_ROTATION_GRACE: chrono::Duration = chrono::Duration::days(7);
/// How long an expired token stays listed before it is forgotten.
const EXPIRED_KEPT: chrono::Duration = chrono::Duration::days(30);

/// What a token may be used for. A token without scopes may do everything
/// its user may (as every token before scopes existed).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Scope {
    /// List and read loops, their turns, events, choices and rules.
    #[serde(rename = "loops:read")]
    LoopsRead,
    /// Create and archive loops.
    #[serde(rename = "loops:write")]
    LoopsWrite,
    /// Send messages and interrupt turns.
    #[serde(rename = "messages:write")]
    MessagesWrite,
    /// Answer choices and permission prompts, and remove standing rules.
    #[serde(rename = "choices:write")]
    ChoicesWrite,
    /// Create, list and delete webhooks.
    #[serde(rename = "webhooks:write")]
    WebhooksWrite,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Self::LoopsRead,
        Self::LoopsWrite,
        Self::MessagesWrite,
        Self::ChoicesWrite,
        Self::WebhooksWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoopsRead => "loops:read",
            Self::LoopsWrite => "loops:write",
            Self::MessagesWrite => "messages:write",
            Self::ChoicesWrite => "choices:write",
            Self::WebhooksWrite => "webhooks:write",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|x| x.as_str()).collect();
                format!("`{s}` is not a scope ({})", names.join(", "))
            })
    }
}

/// The limits of one token; the default is none (full rights, no expiry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Grants {
    /// `None`: every scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<BTreeSet<Scope>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The most authority a turn driven with this token may run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_permission_mode: Option<PermissionMode>,
}

impl Grants {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.contains(&scope))
    }

    /// Whether a turn in `mode` stays within the token's limit.
    pub fn allows_mode(&self, mode: PermissionMode) -> bool {
        self.max_permission_mode
            .is_none_or(|max| mode.authority() <= max.authority())
    }

    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Why a Bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Malformed, never issued, or revoked.
    Unknown,
    /// Its `expires_at` (or a rotation's grace) has passed.
    Expired,
}

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
    #[serde(default, flatten)]
    pub grants: Grants,
    /// Set once the token was rotated: the id of the token that replaced
    /// it. A rotated token cannot be rotated again (else one leaked token
    /// could mint many during its grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
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
        grants: Grants,
    ) -> Result<(String, TokenRecord), StoreError> {
        self.create_within(user, label, grants, usize::MAX)
    }

    /// Creates a token unless `user` already has `max` live ones.
    pub fn create_within(
        &self,
        user: &str,
        label: Option<String>,
        grants: Grants,
        max: usize,
    ) -> Result<(String, TokenRecord), StoreError> {
        if let Some(label) = &label {
            check_label(label)?;
        }
        let now = ids::now();
        if grants.expired(now) {
            return Err(StoreError::Invalid(
                "expires_at_in_past",
                "`expires_at` must be in the future".into(),
            ));
        }
        let (plaintext, hash) = new_plaintext();
        let record = TokenRecord {
            token_id: new_token_id(),
            user: user.to_owned(),
            label,
            created_at: now,
            last_used_at: None,
            grants,
            rotated_to: None,
        };
        self.file.update(|f| {
            forget_long_expired(f, now);
            let held = f
                .tokens
                .values()
                .filter(|t| t.user == user && !t.grants.expired(now))
                .count();
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

    /// Replaces a token with a new one of the same label and grants; the
    /// old one keeps working for `grace` (at most [`MAX_ROTATION_GRACE`]),
    /// never past its own expiry. Returns the new plaintext and record.
    pub fn rotate(
        &self,
        user: &str,
        token_id: &str,
        grace: chrono::Duration,
        max: usize,
    ) -> Result<(String, TokenRecord), StoreError> {
        let now = ids::now();
        let (plaintext, hash) = new_plaintext();
        let grace = grace.clamp(chrono::Duration::zero(), MAX_ROTATION_GRACE);
        self.file.update(|f| {
            // The old one retires: the others must leave room for the new.
            let others = f
                .tokens
                .values()
                .filter(|t| t.user == user && t.token_id != token_id && !t.grants.expired(now))
                .count();
            if others >= max {
                return Err(StoreError::Full(
                    "too_many_tokens",
                    format!("you have {others} other API tokens, as many as one user may; revoke one first"),
                    super::RETRY_AFTER_FREEING,
                ));
            }
            let old = f
                .tokens
                .values_mut()
                .find(|r| r.user == user && r.token_id == token_id && !r.grants.expired(now))
                .ok_or_else(|| no_token(token_id))?;
            if let Some(new) = &old.rotated_to {
                return Err(StoreError::Conflict(
                    "token_rotated",
                    format!("`{token_id}` was already rotated (to `{new}`); rotate that one"),
                ));
            }
            let record = TokenRecord {
                token_id: new_token_id(),
                created_at: now,
                last_used_at: None,
                rotated_to: None,
                ..old.clone()
            };
            old.rotated_to = Some(record.token_id.clone());
            let retire = now + grace;
            old.grants.expires_at = Some(old.grants.expires_at.map_or(retire, |at| at.min(retire)));
            f.tokens.insert(hash, record.clone());
            Ok((plaintext, record))
        })
    }

    /// The token's record if `plaintext` is a live token, and notes the use.
    /// Malformed strings are rejected before hashing.
    pub fn authenticate(&self, plaintext: &str) -> Result<TokenRecord, Refused> {
        if !well_formed(plaintext) {
            return Err(Refused::Unknown);
        }
        let hash = ids::sha256_hex(plaintext);
        let file = self.file.read_having(|f| !f.tokens.contains_key(&hash));
        let record = file.tokens.get(&hash).cloned().ok_or(Refused::Unknown)?;
        let now = ids::now();
        if record.grants.expired(now) {
            return Err(Refused::Expired);
        }
        self.pending_use
            .lock()
            .expect("pending_use poisoned")
            .insert(hash, now);
        Ok(record)
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
                .ok_or_else(|| no_token(token_id))?;
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

fn no_token(token_id: &str) -> StoreError {
    StoreError::NotFound(
        "token_not_found",
        format!("no token `{token_id}` for this user (or it has expired)"),
    )
}

/// A new plaintext token and its hash.
fn new_plaintext() -> (String, String) {
    let plaintext = format!("{TOKEN_PREFIX}{}", ids::random_hex(24));
    let hash = ids::sha256_hex(&plaintext);
    (plaintext, hash)
}

fn new_token_id() -> String {
    format!("tok_{}", ids::random_hex(6))
}

/// Drops tokens that expired more than [`EXPIRED_KEPT`] ago.
fn forget_long_expired(f: &mut TokensFile, now: DateTime<Utc>) {
    f.tokens
        .retain(|_, r| r.grants.expires_at.is_none_or(|at| at + EXPIRED_KEPT > now));
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
        let (plain, rec) = tokens
            .create("alice", Some("ci".into()), Grants::default())
            .unwrap();
        assert!(plain.starts_with("la_") && plain.len() == 51, "{plain}");
        assert!(rec.token_id.starts_with("tok_") && rec.token_id.len() == 16);
        assert_eq!(tokens.authenticate(&plain).unwrap().user, "alice");

        // Only the hash is on disk.
        let raw = std::fs::read_to_string(dir.path().join("api-tokens.json")).unwrap();
        assert!(!raw.contains(&plain) && raw.contains(&ids::sha256_hex(&plain)));

        assert_eq!(tokens.authenticate("la_nothex"), Err(Refused::Unknown));
        assert_eq!(
            tokens.authenticate(&plain.to_uppercase()),
            Err(Refused::Unknown)
        );
        assert!(matches!(
            tokens.revoke("bob", &rec.token_id),
            Err(StoreError::NotFound("token_not_found", _))
        ));
        tokens.revoke("alice", &rec.token_id).unwrap();
        assert_eq!(tokens.authenticate(&plain), Err(Refused::Unknown));
    }

    #[test]
    fn last_used_is_shown_at_once_and_written_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let (plain, _) = tokens.create("alice", None, Grants::default()).unwrap();
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
        let (plain, rec) = server.create("alice", None, Grants::default()).unwrap();
        server.authenticate(&plain).unwrap();
        cli.revoke("alice", &rec.token_id).unwrap();
        assert_eq!(server.flush_last_used().unwrap(), 0);
        assert_eq!(server.authenticate(&plain), Err(Refused::Unknown));
    }

    #[test]
    fn grants_survive_a_reopen_and_limit_what_a_token_may_do() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let grants = Grants {
            scopes: Some([Scope::LoopsRead].into()),
            expires_at: Some(ids::now() + chrono::Duration::hours(1)),
            max_permission_mode: Some(PermissionMode::Default),
        };
        let (plain, _) = tokens.create("alice", None, grants.clone()).unwrap();
        let got = open(dir.path()).authenticate(&plain).unwrap();
        assert_eq!(got.grants, grants);
        assert!(got.grants.allows(Scope::LoopsRead));
        assert!(!got.grants.allows(Scope::MessagesWrite));
        assert!(got.grants.allows_mode(PermissionMode::Plan));
        assert!(!got.grants.allows_mode(PermissionMode::AcceptEdits));
        assert!(!got.grants.allows_mode(PermissionMode::BypassPermissions));
        // A token from before grants existed has them all.
        let full = Grants::default();
        assert!(Scope::ALL.iter().all(|s| full.allows(*s)));
        assert!(full.allows_mode(PermissionMode::BypassPermissions));
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let past = Grants {
            expires_at: Some(ids::now() - chrono::Duration::seconds(1)),
            ..Grants::default()
        };
        assert!(matches!(
            tokens.create("alice", None, past),
            Err(StoreError::Invalid("expires_at_in_past", _))
        ));
        let soon = Grants {
            expires_at: Some(ids::now() + chrono::Duration::milliseconds(30)),
            ..Grants::default()
        };
        let (plain, _) = tokens.create("alice", None, soon).unwrap();
        assert!(tokens.authenticate(&plain).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(40));
        assert_eq!(tokens.authenticate(&plain), Err(Refused::Expired));
        // An expired token no longer counts against the limit.
        tokens
            .create_within("alice", None, Grants::default(), 1)
            .unwrap();
    }

    #[test]
    fn rotation_keeps_the_grants_and_retires_the_old_token_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let grants = Grants {
            scopes: Some([Scope::ChoicesWrite].into()),
            ..Grants::default()
        };
        let (old_plain, old) = tokens
            .create("alice", Some("bot".into()), grants.clone())
            .unwrap();
        assert!(matches!(
            tokens.rotate("bob", &old.token_id, chrono::Duration::zero(), 10),
            Err(StoreError::NotFound("token_not_found", _))
        ));
        let (new_plain, new) = tokens
            .rotate("alice", &old.token_id, chrono::Duration::hours(1), 10)
            .unwrap();
        // Once rotated, never again (even within its grace).
        assert!(matches!(
            tokens.rotate("alice", &old.token_id, chrono::Duration::hours(1), 10),
            Err(StoreError::Conflict("token_rotated", _))
        ));
        // Rotation keeps to the per-user limit.
        assert!(matches!(
            tokens.rotate("alice", &new_id_of(&tokens), chrono::Duration::zero(), 1),
            Err(StoreError::Full("too_many_tokens", ..))
        ));
        assert_ne!(new.token_id, old.token_id);
        assert_eq!((new.label.as_deref(), &new.grants), (Some("bot"), &grants));
        assert!(tokens.authenticate(&old_plain).is_ok(), "within its grace");
        assert!(tokens.authenticate(&new_plain).is_ok());
        // Rotating the new one with no grace retires it at once.
        let (newest, _) = tokens
            .rotate("alice", &new.token_id, chrono::Duration::zero(), 10)
            .unwrap();
        assert_eq!(tokens.authenticate(&new_plain), Err(Refused::Expired));
        assert!(tokens.authenticate(&newest).is_ok());
        // A retired token cannot be rotated again.
        assert!(
            tokens
                .rotate("alice", &new.token_id, chrono::Duration::zero(), 10)
                .is_err()
        );
    }

    /// The newest token of alice.
    fn new_id_of(tokens: &TokenStore) -> String {
        tokens.list("alice")[0].token_id.clone()
    }

    #[test]
    fn list_is_newest_first_and_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = open(dir.path());
        let (_, a) = tokens
            .create("alice", Some("a".into()), Grants::default())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (_, b) = tokens
            .create("alice", Some("b".into()), Grants::default())
            .unwrap();
        tokens.create("bob", None, Grants::default()).unwrap();
        let ids: Vec<_> = tokens
            .list("alice")
            .into_iter()
            .map(|t| t.token_id)
            .collect();
        assert_eq!(ids, vec![b.token_id, a.token_id]);
        assert!(matches!(
            tokens.create("alice", Some("tab\there".into()), Grants::default()),
            Err(StoreError::Invalid("label_invalid", _))
        ));
        assert_eq!(tokens.revoke_all("alice").unwrap(), 2);
        assert!(tokens.list("alice").is_empty());
        assert_eq!(tokens.list("bob").len(), 1);
    }
}
