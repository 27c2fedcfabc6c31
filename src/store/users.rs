//! `users.json`: accounts with argon2id password hashes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHasher};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, StoreError, valid_name};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsersFile {
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub admin: bool,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

/// A user as the rest of the server sees it (never the hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub admin: bool,
}

pub const MIN_PASSWORD_LEN: usize = 8;
const MAX_PASSWORD_LEN: usize = 1024;

pub struct UserStore {
    file: JsonStore<UsersFile>,
    /// Verified against when the user does not exist, so a login takes as long
    /// for an unknown name as for a wrong password.
    dummy_hash: OnceLock<String>,
}

impl UserStore {
    pub fn open(path: PathBuf, lock: PathBuf) -> Result<Self, StoreError> {
        Self::open_in(Place::File { path, lock })
    }

    /// Opens the collection wherever it lives (a file, or a database document).
    pub fn open_in(place: Place) -> Result<Self, StoreError> {
        Ok(Self {
            file: JsonStore::open_in(place)?,
            dummy_hash: OnceLock::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.file.read().users.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<User> {
        let file = self.file.read_having(|f| !f.users.contains_key(name));
        file.users.get(name).map(|r| User {
            name: name.to_owned(),
            admin: r.admin,
        })
    }

    /// All users, sorted by name.
    pub fn list(&self) -> Vec<User> {
        self.file
            .read()
            .users
            .iter()
            .map(|(name, r)| User {
                name: name.clone(),
                admin: r.admin,
            })
            .collect()
    }

    pub fn add(&self, name: &str, admin: bool, password: &str) -> Result<User, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Invalid(
                "invalid_username",
                format!(
                    "`{name}` is not a valid user name: use 1-64 letters, digits, `_`, `-` or `.`, not starting with `.`"
                ),
            ));
        }
        let password_hash = hash_password(checked(password)?)?;
        self.file.update(|f| {
            if f.users.contains_key(name) {
                return Err(StoreError::Conflict(
                    "user_exists",
                    format!("user `{name}` already exists"),
                ));
            }
            f.users.insert(
                name.to_owned(),
                UserRecord {
                    admin,
                    password_hash,
                    created_at: crate::ids::now(),
                },
            );
            Ok(User {
                name: name.to_owned(),
                admin,
            })
        })
    }

    pub fn set_password(&self, name: &str, password: &str) -> Result<(), StoreError> {
        let password_hash = hash_password(checked(password)?)?;
        self.file.update(|f| match f.users.get_mut(name) {
            Some(r) => {
                r.password_hash = password_hash;
                Ok(())
            }
            None => Err(no_such_user(name)),
        })
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.file.update(|f| match f.users.remove(name) {
            Some(_) => Ok(()),
            None => Err(no_such_user(name)),
        })
    }

    /// Computes the hash that unknown usernames are checked against, so the
    /// first such login takes as long as any other (call once at start).
    pub fn prepare_dummy_hash(&self) {
        self.dummy_hash();
    }

    fn dummy_hash(&self) -> &str {
        self.dummy_hash
            .get_or_init(|| hash_password("not anyone's password").unwrap_or_default())
    }

    /// The user, if the password is theirs. Slow on purpose (argon2id): call
    /// it from a blocking thread.
    pub fn verify(&self, name: &str, password: &str) -> Option<User> {
        self.verify_in(name, password, &mut CheckMemory::default())
    }

    /// [`Self::verify`] in `memory`, which is kept for the next check: a
    /// server checks passwords in a few such blocks, never allocating 19 MiB
    /// per login (freed blocks pile up in the allocator's per-thread arenas).
    pub fn verify_in(&self, name: &str, password: &str, memory: &mut CheckMemory) -> Option<User> {
        let users = self.file.read_having(|f| !f.users.contains_key(name));
        let record = users.users.get(name);
        let hash = record.map_or_else(|| self.dummy_hash(), |r| r.password_hash.as_str());
        let ok = check(hash, password.as_bytes(), memory);
        match record {
            Some(r) if ok => Some(User {
                name: name.to_owned(),
                admin: r.admin,
            }),
            _ => None,
        }
    }
}

/// The working memory of one password check, reused from check to check.
#[derive(Default)]
pub struct CheckMemory(Vec<argon2::Block>);

/// Whether `password` matches the PHC string `hash`, computed in `memory`.
fn check(hash: &str, password: &[u8], memory: &mut CheckMemory) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (
        argon2::Params::try_from(&parsed),
        argon2::Algorithm::try_from(parsed.algorithm),
    ) else {
        return false;
    };
    let Ok(version) = parsed
        .version
        .map_or(Ok(argon2::Version::V0x13), argon2::Version::try_from)
    else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.0.len() < blocks {
        memory.0.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt,
        &mut out,
        &mut memory.0[..blocks],
    );
    // `Output`'s comparison is constant time.
    hashed.is_ok() && argon2::password_hash::Output::new(&out).is_ok_and(|out| out == expected)
}

pub fn no_such_user(name: &str) -> StoreError {
    StoreError::NotFound("user_not_found", format!("no user `{name}`"))
}

fn checked(password: &str) -> Result<&str, StoreError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN || password.len() > MAX_PASSWORD_LEN {
        return Err(StoreError::Invalid(
            "invalid_password",
            format!("a password needs {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters"),
        ));
    }
    Ok(password)
}

fn hash_password(password: &str) -> Result<String, StoreError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| {
            StoreError::io(
                std::path::Path::new("argon2"),
                std::io::Error::other(e.to_string()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> UserStore {
        UserStore::open(dir.join("users.json"), dir.join(".lock")).unwrap()
    }

    #[test]
    fn one_memory_serves_check_after_check() {
        let dir = tempfile::tempdir().unwrap();
        let users =
            UserStore::open(dir.path().join("users.json"), dir.path().join(".lock")).unwrap();
        users.add("alice", false, "correct horse").unwrap();
        let mut memory = CheckMemory::default();
        for _ in 0..3 {
            assert!(
                users
                    .verify_in("alice", "correct horse", &mut memory)
                    .is_some()
            );
            assert!(
                users
                    .verify_in("alice", "correct hors", &mut memory)
                    .is_none()
            );
            assert!(
                users
                    .verify_in("nobody", "correct horse", &mut memory)
                    .is_none()
            );
        }
        assert_eq!(
            memory.0.len(),
            argon2::Params::default().block_count(),
            "allocated once, at the size a check needs"
        );
    }

    #[test]
    fn an_unknown_username_costs_a_whole_check() {
        let dir = tempfile::tempdir().unwrap();
        let users =
            UserStore::open(dir.path().join("users.json"), dir.path().join(".lock")).unwrap();
        users.prepare_dummy_hash();
        // argon2 really ran against the dummy hash: it filled its memory.
        let mut memory = CheckMemory::default();
        assert!(users.verify_in("nobody", "anything", &mut memory).is_none());
        assert_eq!(memory.0.len(), argon2::Params::default().block_count());
    }

    #[test]
    fn add_verify_passwd_remove() {
        let dir = tempfile::tempdir().unwrap();
        let users = open(dir.path());
        assert!(users.is_empty());
        users.add("alice", true, "correct horse").unwrap();
        assert!(users.verify("alice", "correct horse").unwrap().admin);
        assert!(users.verify("alice", "wrong password").is_none());
        assert!(users.verify("nobody", "correct horse").is_none());

        users.set_password("alice", "battery staple").unwrap();
        assert!(users.verify("alice", "correct horse").is_none());
        assert!(users.verify("alice", "battery staple").is_some());

        // Stored as argon2id, never in plain text.
        let raw = std::fs::read_to_string(dir.path().join("users.json")).unwrap();
        assert!(raw.contains("$argon2id$") && !raw.contains("battery staple"));

        users.remove("alice").unwrap();
        assert!(users.get("alice").is_none());
        assert!(matches!(
            users.remove("alice"),
            Err(StoreError::NotFound("user_not_found", _))
        ));
    }

    #[test]
    fn rejects_duplicates_bad_names_and_short_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let users = open(dir.path());
        users.add("bob", false, "12345678").unwrap();
        assert!(matches!(
            users.add("bob", false, "12345678"),
            Err(StoreError::Conflict("user_exists", _))
        ));
        assert!(matches!(
            users.add("bad name", false, "12345678"),
            Err(StoreError::Invalid("invalid_username", _))
        ));
        assert!(matches!(
            users.add("carol", false, "short"),
            Err(StoreError::Invalid("invalid_password", _))
        ));
        assert_eq!(users.list().len(), 1);
    }
}
