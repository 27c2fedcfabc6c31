//! A capped amount per key, taken and given back: open streams per user,
//! queued message bytes per user, open connections per client address (and
//! in total, under the key `()`). A [`Taken`] holds its share and gives it
//! back when dropped, and a key's entry lives only while something of it is
//! taken, so the map is bounded by what is held.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Budget<K: Hash + Eq + Clone> {
    cap: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// A share of a budget, given back on drop.
#[derive(Debug)]
pub struct Taken<K: Hash + Eq + Clone> {
    budget: Arc<Budget<K>>,
    key: K,
    amount: usize,
}

impl<K: Hash + Eq + Clone> Budget<K> {
    /// At most `cap` per key.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// `amount` more for `key`, or `None` when that would pass the cap. One
    /// amount larger than the whole cap is still taken when the key holds
    /// nothing (a message bigger than the budget can wait alone).
    pub fn take(self: &Arc<Self>, key: K, amount: usize) -> Option<Taken<K>> {
        let mut held = self.held.lock().expect("budget poisoned");
        let mine = held.entry(key.clone()).or_insert(0);
        if *mine > 0 && *mine + amount > self.cap || self.cap == 0 {
            if *mine == 0 {
                held.remove(&key);
            }
            return None;
        }
        *mine += amount;
        Some(Taken {
            budget: self.clone(),
            key,
            amount,
        })
    }

    /// What `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .expect("budget poisoned")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// What all keys hold together.
    pub fn total(&self) -> usize {
        self.held.lock().expect("budget poisoned").values().sum()
    }

    #[cfg(test)]
    /// Whether nothing at all is held.
    pub fn is_empty(&self) -> bool {
        self.held.lock().expect("budget poisoned").is_empty()
    }
}

impl<K: Hash + Eq + Clone> Drop for Taken<K> {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().expect("budget poisoned");
        if let Some(mine) = held.get_mut(&self.key) {
            *mine -= self.amount;
            if *mine == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_to_its_cap_and_gets_it_back() {
        let budget = Budget::new(100);
        let a = budget.take("alice", 60).unwrap();
        assert!(budget.take("alice", 50).is_none());
        let b = budget.take("bob", 90).unwrap();
        let c = budget.take("alice", 40).unwrap();
        drop(a);
        assert_eq!(budget.held(&"alice"), 40);
        drop((b, c));
        assert!(budget.is_empty(), "nothing outlives what was taken");
        // One amount over the whole cap still goes when nothing is held.
        let big = budget.take("carol", 500).unwrap();
        assert!(budget.take("carol", 1).is_none());
        drop(big);
        assert!(budget.is_empty(), "a refusal leaves no entry behind");
    }

    #[test]
    fn counting_by_one_refuses_exactly_at_the_cap() {
        let budget = Budget::new(2);
        let one = budget.take((), 1).unwrap();
        let _two = budget.take((), 1).unwrap();
        assert!(budget.take((), 1).is_none());
        drop(one);
        assert!(budget.take((), 1).is_some());
    }
}
