//! `Idempotency-Key`: per user and key, which turn a request made, for 24 h.
//! Rebuilt at start from the `user_message` lines that carry the key, so a
//! retry after a restart still replays instead of sending twice.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::LoopId;

pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// At most this many keys are remembered; the oldest go first.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub body_hash: String,
    pub loop_id: LoopId,
    pub turn_id: String,
    /// Seq of the turn's `user_message`.
    pub seq: u64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub struct IdemIndex {
    map: HashMap<(String, String), Recorded>,
}

/// What a request with a key finds.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    New,
    Replay(Recorded),
    /// Same key, another body.
    Conflict,
}

impl IdemIndex {
    pub fn lookup(&self, user: &str, key: &str, body_hash: &str, now: DateTime<Utc>) -> Lookup {
        match self.map.get(&(user.to_owned(), key.to_owned())) {
            Some(r) if fresh(r, now) && r.body_hash == body_hash => Lookup::Replay(r.clone()),
            Some(r) if fresh(r, now) => Lookup::Conflict,
            _ => Lookup::New,
        }
    }

    pub fn insert(&mut self, user: &str, key: &str, recorded: Recorded) {
        if self.map.len() >= MAX_KEYS {
            let now = Utc::now();
            self.map.retain(|_, r| fresh(r, now));
            while self.map.len() >= MAX_KEYS {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, r)| r.at)
                    .map(|(k, _)| k.clone())
                    .expect("the map is not empty");
                self.map.remove(&oldest);
            }
        }
        self.map.insert((user.to_owned(), key.to_owned()), recorded);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn fresh(r: &Recorded, now: DateTime<Utc>) -> bool {
    now.signed_duration_since(r.at)
        .to_std()
        .map_or(true, |age| age < WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(hash: &str, at: DateTime<Utc>) -> Recorded {
        Recorded {
            body_hash: hash.into(),
            loop_id: LoopId::new(),
            turn_id: "turn_1".into(),
            seq: 3,
            at,
        }
    }

    #[test]
    fn replays_same_body_refuses_another_and_forgets_after_a_day() {
        let now = Utc::now();
        let mut idx = IdemIndex::default();
        assert_eq!(idx.lookup("alice", "k", "h1", now), Lookup::New);
        idx.insert("alice", "k", rec("h1", now));
        assert!(matches!(idx.lookup("alice", "k", "h1", now), Lookup::Replay(r) if r.seq == 3));
        assert_eq!(idx.lookup("alice", "k", "h2", now), Lookup::Conflict);
        assert_eq!(
            idx.lookup("bob", "k", "h1", now),
            Lookup::New,
            "keys are per user"
        );
        let tomorrow = now + chrono::Duration::hours(25);
        assert_eq!(idx.lookup("alice", "k", "h2", tomorrow), Lookup::New);
    }

    #[test]
    fn memory_is_bounded() {
        let mut idx = IdemIndex::default();
        let old = Utc::now() - chrono::Duration::hours(1);
        idx.insert("u", "oldest", rec("h", old));
        for i in 0..MAX_KEYS {
            idx.insert("u", &format!("k{i}"), rec("h", Utc::now()));
        }
        assert_eq!(idx.len(), MAX_KEYS);
        assert_eq!(idx.lookup("u", "oldest", "h", Utc::now()), Lookup::New);
    }
}
