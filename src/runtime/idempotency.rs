//! `Idempotency-Key`: per user and key, which turn a request made, for 24 h.
//! Rebuilt at start from the `user_message` lines that carry the key, so a
//! retry after a restart still replays instead of sending twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::LoopId;

pub const WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub body_hash: String,
    pub loop_id: LoopId,
    pub turn_id: String,
    /// Seq of the turn's `user_message`.
    pub seq: u64,
    pub at: DateTime<Utc>,
}

/// Keys per user, each user bounded on their own: one user's keys never
/// push out another's. Eviction is O(1): keys leave in the order they came.
#[derive(Debug)]
pub struct IdemIndex {
    per_user: usize,
    users: HashMap<String, UserKeys>,
}

#[derive(Debug, Default)]
struct UserKeys {
    map: HashMap<String, Recorded>,
    /// Keys in insertion order, with the time they were recorded at (a key
    /// recorded again appears twice; the stale place is skipped).
    order: VecDeque<(String, DateTime<Utc>)>,
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
    /// An index that remembers at most `per_user` keys for each user.
    pub fn new(per_user: usize) -> Self {
        Self {
            per_user: per_user.max(1),
            users: HashMap::new(),
        }
    }

    pub fn lookup(&self, user: &str, key: &str, body_hash: &str, now: DateTime<Utc>) -> Lookup {
        match self.users.get(user).and_then(|u| u.map.get(key)) {
            Some(r) if fresh(r, now) && r.body_hash == body_hash => Lookup::Replay(r.clone()),
            Some(r) if fresh(r, now) => Lookup::Conflict,
            _ => Lookup::New,
        }
    }

    pub fn insert(&mut self, user: &str, key: &str, recorded: Recorded) {
        let keys = self.users.entry(user.to_owned()).or_default();
        let now = Utc::now();
        while keys.map.len() >= self.per_user
            || keys
                .order
                .front()
                .is_some_and(|(_, at)| !fresh_at(*at, now))
        {
            let Some((oldest, at)) = keys.order.pop_front() else {
                break;
            };
            if keys.map.get(&oldest).is_some_and(|r| r.at == at) {
                keys.map.remove(&oldest);
            }
        }
        keys.order.push_back((key.to_owned(), recorded.at));
        keys.map.insert(key.to_owned(), recorded);
        // Stale places of keys recorded again are dropped when they reach
        // the front; never let them outgrow the live keys.
        if keys.order.len() > 2 * self.per_user {
            let map = &keys.map;
            keys.order
                .retain(|(k, at)| map.get(k).is_some_and(|r| r.at == *at));
        }
    }

    #[cfg(test)]
    /// Keys remembered, over all users.
    pub fn len(&self) -> usize {
        self.users.values().map(|u| u.map.len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.users.values().all(|u| u.map.is_empty())
    }
}

fn fresh_at(at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    now.signed_duration_since(at)
        .to_std()
        .map_or(true, |age| age < WINDOW)
}

fn fresh(r: &Recorded, now: DateTime<Utc>) -> bool {
    fresh_at(r.at, now)
}

/// A user and one of their idempotency keys.
type UserKey = (String, String);

/// Requests in flight per (user, key): a second send with the same key
/// waits for the first to be recorded; other keys never wait. An entry
/// lives only while someone holds or waits for it.
#[derive(Default)]
pub struct InFlight {
    keys: std::sync::Mutex<HashMap<UserKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// One send's turn with its key; the next one's when dropped.
pub struct KeyTurn<'a> {
    in_flight: &'a InFlight,
    key: UserKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl InFlight {
    pub async fn enter(&self, user: &str, key: &str) -> KeyTurn<'_> {
        // Made first, so it is dropped last: a wait given up (the request
        // gone) still removes an entry nobody else needs.
        let mut turn = KeyTurn {
            in_flight: self,
            key: (user.to_owned(), key.to_owned()),
            guard: None,
        };
        let lock = self
            .keys
            .lock()
            .expect("in-flight keys poisoned")
            .entry(turn.key.clone())
            .or_default()
            .clone();
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    #[cfg(test)]
    /// How many keys have a send in flight (or waiting).
    pub fn keys_in_flight(&self) -> usize {
        self.keys.lock().expect("in-flight keys poisoned").len()
    }
}

impl Drop for KeyTurn<'_> {
    fn drop(&mut self) {
        let mut keys = self.in_flight.keys.lock().expect("in-flight keys poisoned");
        drop(self.guard.take());
        // Only the map's own reference left: nobody waits for this key.
        if keys
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            keys.remove(&self.key);
        }
    }
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
        let mut idx = IdemIndex::new(10);
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
    fn each_user_is_bounded_on_their_own_oldest_first() {
        let mut idx = IdemIndex::new(100);
        idx.insert("bob", "bobs", rec("h", Utc::now()));
        for i in 0..1000 {
            idx.insert("mallory", &format!("k{i}"), rec("h", Utc::now()));
        }
        assert_eq!(idx.len(), 101);
        assert!(
            matches!(
                idx.lookup("bob", "bobs", "h", Utc::now()),
                Lookup::Replay(_)
            ),
            "another user's flood evicts nothing of bob's"
        );
        assert_eq!(idx.lookup("mallory", "k899", "h", Utc::now()), Lookup::New);
        assert!(matches!(
            idx.lookup("mallory", "k900", "h", Utc::now()),
            Lookup::Replay(_)
        ));
        // A key recorded again keeps its newest entry; stale places do not pile up.
        for _ in 0..1000 {
            idx.insert("bob", "same", rec("h", Utc::now()));
        }
        assert!(idx.users["bob"].order.len() <= 200);
        assert!(matches!(
            idx.lookup("bob", "bobs", "h", Utc::now()),
            Lookup::Replay(_)
        ));
        // Expired keys leave first.
        let mut idx = IdemIndex::new(100);
        idx.insert(
            "u",
            "old",
            rec("h", Utc::now() - chrono::Duration::hours(30)),
        );
        idx.insert("u", "new", rec("h", Utc::now()));
        assert_eq!(idx.len(), 1);
    }

    #[tokio::test]
    async fn one_send_at_a_time_per_key_and_none_across_keys() {
        let in_flight = InFlight::default();
        let first = in_flight.enter("alice", "k").await;
        // Another key, or another user's same key, does not wait.
        let other = tokio::time::timeout(Duration::from_secs(5), in_flight.enter("alice", "j"))
            .await
            .expect("another key does not wait");
        let bob = tokio::time::timeout(Duration::from_secs(5), in_flight.enter("bob", "k"))
            .await
            .expect("another user does not wait");
        drop((other, bob));
        // The same key waits until the first is done.
        let mut second = Box::pin(in_flight.enter("alice", "k"));
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        drop(first);
        let second = second.await;
        assert_eq!(in_flight.keys_in_flight(), 1);
        // A wait given up leaves nothing behind either.
        let mut third = Box::pin(in_flight.enter("alice", "k"));
        assert!(futures_util::poll!(third.as_mut()).is_pending());
        drop(second);
        drop(third);
        assert_eq!(in_flight.keys_in_flight(), 0, "a cancelled wait cleaned up");
        let second = in_flight.enter("alice", "k").await;
        drop(second);
        assert_eq!(in_flight.keys_in_flight(), 0, "no entry outlives its sends");
    }
}
