//! At most `--max-agents` agent processes at once. A loop holds a permit
//! while its agent lives; a loop that needs one when none is free asks the
//! least recently used idle loop to give its agent back, and waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::actor::Command;
use crate::store::LoopId;

pub struct Slots {
    permits: Arc<Semaphore>,
    max: usize,
    /// Loops whose agent lives but does nothing, with when they became idle.
    idle: Mutex<HashMap<LoopId, (Instant, mpsc::Sender<Command>)>>,
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

    pub fn set_idle(&self, id: LoopId, commands: mpsc::Sender<Command>) {
        self.idle
            .lock()
            .expect("slots poisoned")
            .insert(id, (Instant::now(), commands));
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
            oldest.and_then(|id| idle.remove(&id).map(|(_, tx)| (id, tx)))
        };
        match victim {
            Some((id, tx)) => {
                tracing::info!(loop_id = %id, "reclaiming the least recently used idle agent");
                tx.try_send(Command::Reclaim).is_ok()
            }
            None => false,
        }
    }
}
