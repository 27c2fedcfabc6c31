//! Bytes of queued messages per user. A queued turn keeps its message in
//! memory until it runs, so what one user may have waiting, over all their
//! loops, is bounded; a [`Reservation`] holds a message's place and gives it
//! back when dropped (the turn started, failed or was archived).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct QueuedBytes {
    per_user: usize,
    users: Mutex<HashMap<String, usize>>,
}

/// The place of one queued message.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<QueuedBytes>,
    user: String,
    bytes: usize,
}

impl QueuedBytes {
    pub fn new(per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            users: Mutex::new(HashMap::new()),
        })
    }

    /// A place for `bytes` more of `user`'s queued messages, or `None` when
    /// they would be over their budget. A message bigger than the whole
    /// budget is still taken when nothing else of theirs waits.
    pub fn reserve(self: &Arc<Self>, user: &str, bytes: usize) -> Option<Reservation> {
        let mut users = self.users.lock().expect("queued bytes poisoned");
        let held = users.entry(user.to_owned()).or_insert(0);
        if *held > 0 && *held + bytes > self.per_user {
            return None;
        }
        *held += bytes;
        Some(Reservation {
            budget: self.clone(),
            user: user.to_owned(),
            bytes,
        })
    }

    pub fn held(&self, user: &str) -> usize {
        self.users
            .lock()
            .expect("queued bytes poisoned")
            .get(user)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut users = self.budget.users.lock().expect("queued bytes poisoned");
        if let Some(held) = users.get_mut(&self.user) {
            *held -= self.bytes;
            if *held == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_held_to_their_budget_and_gets_it_back() {
        let budget = QueuedBytes::new(100);
        let a = budget.reserve("alice", 60).unwrap();
        assert!(budget.reserve("alice", 50).is_none());
        let b = budget.reserve("bob", 90).unwrap();
        let c = budget.reserve("alice", 40).unwrap();
        drop(a);
        assert_eq!(budget.held("alice"), 40);
        drop((b, c));
        assert!(
            budget.users.lock().unwrap().is_empty(),
            "nothing outlives its reservations"
        );
        // One message over the whole budget still goes when nothing waits.
        let big = budget.reserve("carol", 500).unwrap();
        assert!(budget.reserve("carol", 1).is_none());
        drop(big);
    }
}
