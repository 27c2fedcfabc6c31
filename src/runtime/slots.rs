//! At most `--max-agents` agent processes at once. A loop holds a permit
//! while its agent lives; a loop that needs one when none is free asks the
//! least recently used idle loop to give its agent back, and waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::LoopId;

/// Asks an idle loop to give its agent back; whether the loop took the ask.
pub type Reclaimer = Box<dyn Fn() -> bool + Send>;

pub struct Slots {
    permits: Arc<Semaphore>,
    max: usize,
    /// Loops whose agent lives but does nothing, with when they became idle.
    idle: Mutex<HashMap<LoopId, (Instant, Reclaimer)>>,
}

impl Slots {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn live(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits for a permit (cancel-safe: dropping the future gives up the place).
    pub async fn acquire(self: Arc<Self>) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }

    pub fn set_idle(&self, id: LoopId, reclaim: Reclaimer) {
        self.idle
            .lock()
            .expect("slots poisoned")
            .insert(id, (Instant::now(), reclaim));
    }

    pub fn set_busy(&self, id: LoopId) {
        self.idle.lock().expect("slots poisoned").remove(&id);
    }

    /// Asks the least recently used idle loop (other than `except`) to give
    /// its agent back. Returns whether one was asked.
    pub fn reclaim_one(&self, except: LoopId) -> bool {
        let victim = {
            let mut idle = self.idle.lock().expect("slots poisoned");
            let oldest = idle
                .iter()
                .filter(|(id, _)| **id != except)
                .min_by_key(|(_, (since, _))| *since)
                .map(|(id, _)| *id);
            oldest.and_then(|id| idle.remove(&id).map(|(_, reclaim)| (id, reclaim)))
        };
        match victim {
            Some((id, reclaim)) => {
                tracing::info!(loop_id = %id, "reclaiming the least recently used idle agent");
                reclaim()
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(asked: &Arc<AtomicUsize>) -> Reclaimer {
        let asked = asked.clone();
        Box::new(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            true
        })
    }

    #[test]
    fn the_least_recently_idle_other_loop_is_asked_once() {
        let slots = Slots::new(2);
        let (a, b) = (LoopId(uuid::Uuid::new_v4()), LoopId(uuid::Uuid::new_v4()));
        let (asked_a, asked_b) = (Arc::default(), Arc::default());
        slots.set_idle(a, counting(&asked_a));
        slots.set_idle(b, counting(&asked_b));
        // Never itself; the oldest other one, and each only once.
        assert!(slots.reclaim_one(b));
        assert_eq!(asked_a.load(Ordering::SeqCst), 1);
        assert!(!slots.reclaim_one(b));
        assert!(slots.reclaim_one(a));
        assert_eq!(asked_b.load(Ordering::SeqCst), 1);
        assert!(!slots.reclaim_one(a));
        // A loop that became busy is not asked.
        slots.set_idle(a, counting(&asked_a));
        slots.set_busy(a);
        assert!(!slots.reclaim_one(b));
    }

    #[test]
    fn permits_count_live_agents() {
        let slots = Slots::new(1);
        let permit = slots.try_acquire().expect("one is free");
        assert_eq!(slots.live(), 1);
        assert!(slots.try_acquire().is_none());
        drop(permit);
        assert_eq!(slots.live(), 0);
    }
}
