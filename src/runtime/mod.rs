//! Loops at run time: each loop's event log, the one actor task per live
//! loop that owns its agent, agent slots, and idempotent sends. HTTP
//! handlers use [`Runtime`]; they never touch an agent themselves.

pub mod actor;
pub mod agent_home;
pub mod choices;
pub mod events;
pub mod idempotency;
pub mod log;
pub mod slots;
pub mod turns;
pub mod view;
pub mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use self::actor::{Actor, Command, Sent, StopReason};
use self::choices::ChoiceAnswer;
use self::events::{ChoiceSource, IdemRecord};
use crate::budget::{Budget, Taken};

use self::idempotency::{IdemIndex, Lookup, Recorded};
use self::log::EventLog;
use self::slots::Slots;
use crate::agent::PermissionMode;
use crate::config::Config;
use crate::error::ApiError;
use crate::store::{Catalog, LoopId, LoopRecord, LoopStore, StoreError};

/// What actors share.
pub struct Shared {
    pub config: Arc<Config>,
    /// Bytes of queued messages per user (a queued turn keeps its message
    /// in memory until it runs).
    pub queued: Arc<Budget<String>>,
    pub loops: Arc<LoopStore>,
    pub catalog: Arc<Catalog>,
    pub slots: Arc<Slots>,
}

pub struct Runtime {
    shared: Arc<Shared>,
    logs: Mutex<HashMap<LoopId, Arc<EventLog>>>,
    actors: Mutex<HashMap<LoopId, mpsc::Sender<Command>>>,
    idem: Mutex<IdemIndex>,
    /// Serializes sends that carry an Idempotency-Key (check, then record).
    idem_gate: tokio::sync::Mutex<()>,
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
    /// A place for a message among `user`'s queued ones (429 `queue_full`).
    fn reserve(&self, user: &str, content: &str) -> Result<Taken<String>, ApiError> {
        let queued = &self.shared.queued;
        queued.take(user.to_owned(), content.len()).ok_or_else(|| {
            ApiError::RateLimited(
                "queue_full",
                format!(
                    "your loops already have {} bytes of messages waiting (--max-queued-bytes-per-user); \
                     send again when some have run",
                    queued.held(&user.to_owned())
                ),
                std::time::Duration::from_secs(1),
            )
        })
    }

    /// Opens every loop's log: unfinished turns left by a previous server are
    /// closed, and idempotency keys of the last 24 h are remembered.
    pub fn open(shared: Shared) -> Result<Self, StoreError> {
        let keys_per_user = shared.config.limits.idempotency_keys_per_user;
        let runtime = Self {
            shared: Arc::new(shared),
            logs: Mutex::new(HashMap::new()),
            actors: Mutex::new(HashMap::new()),
            idem: Mutex::new(IdemIndex::new(keys_per_user)),
            idem_gate: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
        };
        let mut closed = 0;
        for id in runtime.shared.loops.ids() {
            closed += runtime.open_log(id)?;
        }
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

    fn open_log(&self, id: LoopId) -> Result<usize, StoreError> {
        let path = self.shared.loops.loop_dir(id).join("events.jsonl");
        let (log, recovered) = EventLog::open(path)?;
        let mut idem = self.idem.lock().expect("idem poisoned");
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
        self.logs.lock().expect("logs poisoned").insert(id, log);
        Ok(recovered.closed)
    }

    /// The loop's event log (opened on first use for loops made since start).
    pub fn log(&self, id: LoopId) -> Result<Arc<EventLog>, StoreError> {
        if let Some(log) = self.logs.lock().expect("logs poisoned").get(&id) {
            return Ok(log.clone());
        }
        self.open_log(id)?;
        Ok(self.logs.lock().expect("logs poisoned")[&id].clone())
    }

    /// The loop's actor, started if it is not running.
    fn actor(&self, id: LoopId) -> Result<mpsc::Sender<Command>, ApiError> {
        let log = self.log(id)?;
        let mut actors = self.actors.lock().expect("actors poisoned");
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::Unavailable(
                "server_stopping",
                "the server is shutting down".into(),
            ));
        }
        if let Some(tx) = actors.get(&id).filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel(64);
        let actor = Actor::new(id, self.shared.clone(), log, rx, tx.clone());
        tokio::spawn(actor.run());
        actors.insert(id, tx.clone());
        Ok(tx)
    }

    async fn ask<T>(
        &self,
        id: LoopId,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.actor(id)?
            .send(make(reply))
            .await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the loop's task is gone")))?;
        answer
            .await
            .map_err(|_| ApiError::internal(anyhow::anyhow!("the loop's task dropped a reply")))
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
    ) -> Result<Accepted, ApiError> {
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
        let _gate = self.idem_gate.lock().await;
        let found = self.idem.lock().expect("idem poisoned").lookup(
            user,
            &idem.key,
            &idem.body_hash,
            Utc::now(),
        );
        match found {
            Lookup::Replay(r) => {
                let log = self.log(r.loop_id)?;
                let turn = log.view(|v| v.turn(&r.turn_id)).ok_or_else(|| {
                    ApiError::internal(anyhow::anyhow!(
                        "an idempotent turn is missing from its log"
                    ))
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
                return Err(ApiError::conflict(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request in the last 24 hours",
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
        let recorded = Recorded {
            body_hash: idem.body_hash,
            loop_id: record.id,
            turn_id: sent.turn_id.clone(),
            seq: sent.seq,
            at: Utc::now(),
        };
        self.idem
            .lock()
            .expect("idem poisoned")
            .insert(user, &idem.key, recorded);
        Ok(accepted(log, sent, false))
    }

    pub async fn answer(
        &self,
        id: LoopId,
        choice_id: String,
        answer: ChoiceAnswer,
        source: ChoiceSource,
    ) -> Result<(), ApiError> {
        // Shape against kind first, even for a choice no longer pending.
        let known = self
            .log(id)?
            .view(|v| v.choices.get(&choice_id).map(|c| c.1));
        let fits = |kind| {
            matches!(
                (kind, &answer),
                (events::ChoiceKind::Permission, ChoiceAnswer::Allow { .. })
                    | (events::ChoiceKind::Question, ChoiceAnswer::Answers(_))
            )
        };
        if known.is_some_and(|kind| !fits(kind)) {
            return Err(ApiError::bad_request(
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

    pub async fn interrupt(&self, id: LoopId) -> Result<Option<String>, ApiError> {
        if !self.log(id)?.view(|v| v.busy()) && !self.has_actor(id) {
            return Ok(None);
        }
        self.ask(id, |reply| Command::Interrupt { reply }).await
    }

    fn has_actor(&self, id: LoopId) -> bool {
        self.actors
            .lock()
            .expect("actors poisoned")
            .contains_key(&id)
    }

    /// Stops a loop's actor and agent (archive).
    pub async fn archive(&self, id: LoopId) {
        let tx = self.actors.lock().expect("actors poisoned").remove(&id);
        if let Some(tx) = tx {
            let (reply, done) = oneshot::channel();
            if tx
                .send(Command::Stop {
                    reason: StopReason::Archived,
                    reply,
                })
                .await
                .is_ok()
            {
                let _ = done.await;
            }
        }
    }

    /// Stops every actor and agent; turns still running end with
    /// `server_restarted`.
    pub async fn shutdown(&self) {
        let actors: Vec<_> = {
            let mut actors = self.actors.lock().expect("actors poisoned");
            self.closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            actors.drain().collect()
        };
        let mut waits = Vec::new();
        for (_, tx) in actors {
            let (reply, done) = oneshot::channel();
            if tx
                .send(Command::Stop {
                    reason: StopReason::Shutdown,
                    reply,
                })
                .await
                .is_ok()
            {
                waits.push(done);
            }
        }
        for done in waits {
            let _ = done.await;
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
