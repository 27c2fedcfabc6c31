//! Loops at run time: each loop's event log, the one actor task per live
//! loop that owns its agent, agent slots, and idempotent sends. HTTP
//! handlers use [`Runtime`]; they never touch an agent themselves.

pub mod actor;
pub mod agent_home;
pub mod choices;
pub mod error;
pub mod events;
pub mod idempotency;
mod launch;
pub mod log;
pub mod machine;
pub mod slots;
pub mod turns;
pub mod view;
pub mod wire;
pub mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::actor::{Actor, Command, Sent};
use self::choices::ChoiceAnswer;
use self::events::{ChoiceSource, IdemRecord};
use self::idempotency::{IdemIndex, InFlight, Lookup, Recorded};
use self::log::EventLog;
use self::machine::{Rules, StopReason};
use self::slots::Slots;
use crate::agent::PermissionMode;
use crate::budget::{Budget, Taken};
use crate::config::Config;
use crate::store::{Catalog, LoopId, LoopRecord, LoopStore, NewLoop, StoreError};

pub use self::error::RuntimeError;

/// How long an interrupted agent may take to end its turn before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for loops' tasks (agent stops included).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// Bound of each loop's command channel.
const COMMANDS: usize = 64;

/// What actors share.
pub struct Shared {
    pub config: Arc<Config>,
    /// Bytes of queued messages per user (a queued turn keeps its message
    /// in memory until it runs).
    pub queued: Arc<Budget<String>>,
    pub loops: Arc<LoopStore>,
    pub catalog: Arc<Catalog>,
    pub slots: Arc<Slots>,
    /// Idempotency keys seen (a loop's task records each as it logs the message).
    pub idem: Mutex<IdemIndex>,
    /// Every task a loop starts (its actor, agent stops, background writes):
    /// shutdown waits for all of them.
    pub tasks: TaskTracker,
    /// Fired when shutdown begins: background work that waits stops waiting.
    pub stopping: CancellationToken,
}

impl Shared {
    /// The rules every loop's machine follows.
    pub fn rules(&self) -> Rules {
        let config = &self.config;
        Rules {
            default_mode: config.permission_mode,
            native: config.native_modes(),
            max_queued: config.limits.queued_turns_per_loop,
            idle_timeout: config.idle_timeout,
            interrupt_grace: INTERRUPT_GRACE,
        }
    }
}

/// A loop's handles, together under one lock: its log and, while it is
/// live, its actor.
struct Handles {
    log: Arc<EventLog>,
    actor: Option<mpsc::Sender<Command>>,
}

pub struct Runtime {
    shared: Arc<Shared>,
    loops: Mutex<HashMap<LoopId, Handles>>,
    /// Sends with the same Idempotency-Key, one at a time (check, then record).
    in_flight: InFlight,
    /// Set once shutdown began: no new actor (and agent) starts after it.
    closing: std::sync::atomic::AtomicBool,
}

/// A message accepted (or found again by its key): where its turn is.
pub struct Accepted {
    pub log: Arc<EventLog>,
    pub turn: usize,
    pub turn_id: String,
    /// Seq of the turn's `user_message`.
    pub seq: u64,
    pub replayed: bool,
}

/// A request's idempotency: the key and the hash of what it asked.
pub struct IdemKey {
    pub key: String,
    pub body_hash: String,
}

impl Runtime {
    /// Opens every loop's log: unfinished turns left by a previous server are
    /// closed, and idempotency keys of the last 24 h are remembered.
    pub fn open(
        config: Arc<Config>,
        loops: Arc<LoopStore>,
        catalog: Arc<Catalog>,
    ) -> Result<Self, StoreError> {
        let keys_per_user = config.limits.idempotency_keys_per_user;
        let shared = Shared {
            idem: Mutex::new(IdemIndex::new(keys_per_user)),
            queued: Budget::new(config.limits.queued_bytes_per_user),
            slots: Arc::new(Slots::new(config.max_agents)),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            config,
            loops,
            catalog,
        };
        let runtime = Self {
            shared: Arc::new(shared),
            loops: Mutex::new(HashMap::new()),
            in_flight: InFlight::default(),
            closing: std::sync::atomic::AtomicBool::new(false),
        };
        let mut closed = 0;
        let mut handles = runtime.loops.lock().expect("loops poisoned");
        for id in runtime.shared.loops.ids() {
            let (log, n) = runtime.open_log(id)?;
            handles.insert(id, Handles { log, actor: None });
            closed += n;
        }
        drop(handles);
        if closed > 0 {
            tracing::info!(
                turns = closed,
                "closed turns the previous server left unfinished"
            );
        }
        Ok(runtime)
    }

    pub fn slots(&self) -> &Slots {
        &self.shared.slots
    }

    /// A place for a message among `user`'s queued ones (429 `queue_full`).
    fn reserve(&self, user: &str, content: &str) -> Result<Taken<String>, RuntimeError> {
        let queued = &self.shared.queued;
        queued.take(user.to_owned(), content.len()).ok_or_else(|| {
            RuntimeError::Full(
                "queue_full",
                format!(
                    "your loops already have {} bytes of messages waiting (--max-queued-bytes-per-user); \
                     send again when some have run",
                    queued.held(&user.to_owned())
                ),
                Duration::from_secs(1),
            )
        })
    }

    /// Opens a loop's log file, remembering the idempotency keys it holds.
    fn open_log(&self, id: LoopId) -> Result<(Arc<EventLog>, usize), StoreError> {
        let path = self.shared.loops.loop_dir(id).join("events.jsonl");
        let (log, recovered) = EventLog::open(path)?;
        let mut idem = self.shared.idem.lock().expect("idem poisoned");
        for (record, turn_id, seq, at) in recovered.idem {
            if Utc::now()
                .signed_duration_since(at)
                .to_std()
                .is_ok_and(|age| age < idempotency::WINDOW)
            {
                let recorded = Recorded {
                    body_hash: record.body_hash,
                    loop_id: id,
                    turn_id,
                    seq,
                    at,
                };
                idem.insert(&record.user, &record.key, recorded);
            }
        }
        Ok((log, recovered.closed))
    }

    /// The loop's handles, its log opened on first use (loops made since
    /// start). Opened under the lock, so every caller gets the same log.
    fn handles<R>(&self, id: LoopId, f: impl FnOnce(&mut Handles) -> R) -> Result<R, StoreError> {
        let mut loops = self.loops.lock().expect("loops poisoned");
        let handles = match loops.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (log, _) = self.open_log(id)?;
                e.insert(Handles { log, actor: None })
            }
        };
        Ok(f(handles))
    }

    /// The loop's event log.
    pub fn log(&self, id: LoopId) -> Result<Arc<EventLog>, StoreError> {
        self.handles(id, |h| h.log.clone())
    }

    /// Makes a loop: its record (within the user's cap) and its workspace.
    pub async fn create(&self, new: NewLoop) -> Result<LoopRecord, RuntimeError> {
        let (loops, catalog) = (self.shared.loops.clone(), self.shared.catalog.clone());
        let max = self.shared.config.limits.loops_per_user;
        let record = tokio::task::spawn_blocking(move || {
            let record = loops.create_within(new, max)?;
            if let Err(err) = workspace::prepare(&loops.loop_dir(record.id), &catalog, &record) {
                loops.discard(record.id);
                return Err(RuntimeError::from(err));
            }
            Ok(record)
        })
        .await
        .map_err(|e| RuntimeError::Internal(e.to_string()))??;
        tracing::info!(loop_id = %record.id, user = %record.created_by, "loop created");
        Ok(record)
    }

    /// Archives a loop: marks its record, then stops its actor and agent
    /// (the agent's tools with it); a queued turn ends with `loop_archived`.
    pub async fn archive(&self, record: &LoopRecord) -> Result<(), RuntimeError> {
        if !record.archived {
            let loops = self.shared.loops.clone();
            let id = record.id;
            tokio::task::spawn_blocking(move || {
                loops.update(id, |r| {
                    if !r.archived {
                        r.archived = true;
                        r.archived_at = Some(crate::ids::now());
                    }
                })
            })
            .await
            .map_err(|e| RuntimeError::Internal(e.to_string()))??;
            tracing::info!(loop_id = %record.id, "loop archived");
        }
        let tx = self.handles(record.id, |h| h.actor.take())?;
        if let Some(tx) = tx {
            // On its own task: a request that gives up waiting cannot leave
            // the loop's task without its stop.
            let stopping = self.shared.tasks.spawn(async move {
                let (reply, done) = oneshot::channel();
                let stop = Command::Stop {
                    reason: StopReason::Archived,
                    reply,
                };
                if tx.send(stop).await.is_ok() {
                    let _ = done.await;
                }
            });
            let _ = stopping.await;
        }
        Ok(())
    }

    /// The loop's actor, started if it is not running.
    fn actor(&self, id: LoopId) -> Result<mpsc::Sender<Command>, RuntimeError> {
        let shared = &self.shared;
        let closing = &self.closing;
        self.handles(id, |h| {
            if closing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(RuntimeError::Stopping);
            }
            if let Some(tx) = h.actor.as_ref().filter(|tx| !tx.is_closed()) {
                return Ok(tx.clone());
            }
            let (tx, rx) = mpsc::channel(COMMANDS);
            let actor = Actor::new(id, shared.clone(), h.log.clone(), rx, tx.downgrade());
            shared.tasks.spawn(actor.run());
            h.actor = Some(tx.clone());
            Ok(tx)
        })?
    }

    async fn ask<T>(
        &self,
        id: LoopId,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        self.actor(id)?
            .send(make(reply))
            .await
            .map_err(|_| RuntimeError::Internal("the loop's task is gone".into()))?;
        answer
            .await
            .map_err(|_| RuntimeError::Internal("the loop's task dropped a reply".into()))
    }

    /// Sends a message to a loop. With a key: the same key and body find the
    /// earlier turn again (nothing is sent); another body is a conflict.
    pub async fn send(
        &self,
        user: &str,
        record: &LoopRecord,
        content: String,
        mode: Option<PermissionMode>,
        idem: Option<IdemKey>,
    ) -> Result<Accepted, RuntimeError> {
        let log = self.log(record.id)?;
        let Some(idem) = idem else {
            let reserved = self.reserve(user, &content)?;
            let sent = self
                .ask(record.id, |reply| Command::Send {
                    content,
                    mode,
                    idem: None,
                    reserved,
                    reply,
                })
                .await??;
            return Ok(accepted(log, sent, false));
        };
        let _one_at_a_time = self.in_flight.enter(user, &idem.key).await;
        let found = self.shared.idem.lock().expect("idem poisoned").lookup(
            user,
            &idem.key,
            &idem.body_hash,
            Utc::now(),
        );
        match found {
            Lookup::Replay(r) => {
                let log = self.log(r.loop_id)?;
                let turn = log.view(|v| v.turn(&r.turn_id)).ok_or_else(|| {
                    RuntimeError::Internal("an idempotent turn is missing from its log".into())
                })?;
                return Ok(Accepted {
                    log,
                    turn,
                    turn_id: r.turn_id,
                    seq: r.seq,
                    replayed: true,
                });
            }
            Lookup::Conflict => {
                return Err(RuntimeError::Conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request in the last 24 hours"
                        .into(),
                ));
            }
            Lookup::New => {}
        }
        let stored = IdemRecord {
            user: user.to_owned(),
            key: idem.key.clone(),
            body_hash: idem.body_hash.clone(),
        };
        let reserved = self.reserve(user, &content)?;
        let sent = self
            .ask(record.id, |reply| Command::Send {
                content,
                mode,
                idem: Some(stored),
                reserved,
                reply,
            })
            .await??;
        // The loop's task recorded the key as it logged the message.
        Ok(accepted(log, sent, false))
    }

    pub async fn answer(
        &self,
        id: LoopId,
        choice_id: String,
        answer: ChoiceAnswer,
        source: ChoiceSource,
    ) -> Result<(), RuntimeError> {
        // Shape against kind first, even for a choice no longer pending.
        let known = self
            .log(id)?
            .view(|v| v.choices.get(&choice_id).map(|c| c.1));
        if known.is_some_and(|kind| !answer.fits(kind)) {
            return Err(RuntimeError::invalid(
                "invalid_choice_payload",
                "this answer's shape does not fit the choice's kind",
            ));
        }
        self.ask(id, |reply| Command::Answer {
            choice_id,
            answer,
            source,
            reply,
        })
        .await?
    }

    pub async fn interrupt(&self, id: LoopId) -> Result<Option<String>, RuntimeError> {
        let (busy, live) = self.handles(id, |h| (h.log.view(|v| v.busy()), h.actor.is_some()))?;
        if !busy && !live {
            return Ok(None);
        }
        self.ask(id, |reply| Command::Interrupt { reply }).await
    }

    /// Stops every actor and agent; turns still running end with
    /// `server_restarted`.
    pub async fn shutdown(&self) {
        let actors: Vec<_> = {
            let mut loops = self.loops.lock().expect("loops poisoned");
            self.closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            loops.values_mut().filter_map(|h| h.actor.take()).collect()
        };
        for tx in actors {
            let (reply, _done) = oneshot::channel();
            let _ = tx
                .send(Command::Stop {
                    reason: StopReason::Shutdown,
                    reply,
                })
                .await;
        }
        // Every actor, agent stop and sweep, and background write.
        self.shared.stopping.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.shared.tasks.len(),
                "loop tasks still running after {SHUTDOWN_WAIT:?}; stopping without them"
            );
        }
        self.flush_touches().await;
    }

    /// Writes loop activity kept in memory to `meta.json` (every 30 s and at shutdown).
    pub async fn flush_touches(&self) {
        let loops = self.shared.loops.clone();
        match tokio::task::spawn_blocking(move || loops.flush_touches()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "could not record loop activity"),
            Err(err) => tracing::warn!(error = %err, "recording loop activity panicked"),
        }
    }
}

fn accepted(log: Arc<EventLog>, sent: Sent, replayed: bool) -> Accepted {
    Accepted {
        log,
        turn: sent.turn,
        turn_id: sent.turn_id,
        seq: sent.seq,
        replayed,
    }
}

#[cfg(test)]
mod tests;
