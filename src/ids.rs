//! Random identifiers and secrets, their hashes, and timestamps.

use chrono::{DateTime, SubsecRound, Utc};
use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};

/// `n` random bytes from the thread-local CSPRNG (ChaCha, seeded by the OS), as lowercase hex.
pub fn random_hex(n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    rand::thread_rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// A random alphanumeric password that is easy to copy from a terminal.
pub fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// SHA-256 of a secret as lowercase hex: how tokens and session cookies are stored.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Now, in UTC, to the millisecond (so values survive a JSON round trip unchanged).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}
