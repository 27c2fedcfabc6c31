//! Loops at run time: each loop's event log, the one actor task per live
//! loop that owns its agent, agent slots, and idempotent sends. HTTP
//! handlers use [`Runtime`]; they never touch an agent themselves.

pub mod actor;
pub mod agent_home;
pub mod choices;
pub mod cluster;
pub mod error;
pub mod events;
pub mod files;
pub mod idempotency;
mod launch;
pub mod log;
pub mod machine;
pub mod slots;
pub mod turns;
pub mod view;
pub mod webhooks;
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
use self::cluster::{Claim, Cluster};
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
    /// With a shared database: this node's leases among the others'.
    pub cluster: Option<Arc<Cluster>>,
    /// Webhooks: what is still to be found in the logs and sent.
    pub hooks: Arc<webhooks::Webhooks>,
    /// Standing permission rules.
    pub rules: Arc<crate::store::rules::RuleStore>,
    /// Who did what (a standing rule answering, say).
    pub audit: Arc<crate::store::audit::AuditLog>,
    pub metrics: Arc<crate::metrics::Metrics>,
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
impl Handles {
    fn new(log: Arc<EventLog>) -> Self {
        Self {
            log,
            actor: None,
            retire: CancellationToken::new(),
        }
    }
}

struct Handles {
    log: Arc<EventLog>,
    actor: Option<mpsc::Sender<Command>>,
    /// Retires that task (it was given this node's lease, now let go).
    retire: CancellationToken,
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
        cluster: Option<Arc<Cluster>>,
        hooks: Arc<crate::store::webhooks::WebhookStore>,
        rules: Arc<crate::store::rules::RuleStore>,
        audit: Arc<crate::store::audit::AuditLog>,
    ) -> Result<Self, StoreError> {
        let keys_per_user = config.limits.idempotency_keys_per_user;
        let node = cluster
            .as_ref()
            .map_or_else(|| "local".to_owned(), |c| c.me.clone());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let hooks = Arc::new(webhooks::Webhooks::new(
            hooks,
            node,
            config.webhook_allow_private,
            metrics.clone(),
        ));
        let shared = Shared {
            metrics,
            hooks,
            rules,
            audit,
            idem: Mutex::new(IdemIndex::new(keys_per_user)),
            queued: Budget::new(config.limits.queued_bytes_per_user),
            slots: Arc::new(Slots::new(config.max_agents)),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            config,
            loops,
            catalog,
            cluster,
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
            let (log, n) = runtime.open_log(id, true)?;
            handles.insert(id, Handles::new(log));
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

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// The gauges a scrape reads (besides open streams, which HTTP knows).
    pub fn metrics_now(&self) -> crate::metrics::Now {
        let ids = self.shared.loops.ids();
        let open = self.open_choices(&ids).unwrap_or_default();
        let oldest = open
            .iter()
            .map(|c| (Utc::now() - c.created_at).as_seconds_f64())
            .fold(0.0, f64::max);
        crate::metrics::Now {
            live_agents: self.shared.slots.live() as i64,
            loops: self.shared.loops.count_active() as i64,
            streams: 0,
            choices_waiting: open.len() as i64,
            oldest_choice_seconds: oldest,
            webhook_queue: self.shared.hooks.store.pending() as i64,
        }
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
    /// On a shared database: this node's copy, brought up to date.
    /// `at_start`: on a shared database, the copy is checked against the
    /// database and caught up now (else by the caller, without the lock).
    fn open_log(&self, id: LoopId, at_start: bool) -> Result<(Arc<EventLog>, usize), StoreError> {
        let dir = self.shared.loops.loop_dir(id);
        let path = dir.join("events.jsonl");
        let (log, recovered) = match &self.shared.cluster {
            None => EventLog::open(path)?,
            Some(cluster) => {
                std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
                if at_start {
                    EventLog::open_shared(path, cluster.pg.clone(), id.0)?
                } else {
                    EventLog::open_copy(path, cluster.pg.clone(), id.0)?
                }
            }
        };
        self.remember_keys(id, recovered.idem);
        let hooks = Arc::downgrade(&self.shared.hooks);
        let metrics = self.shared.metrics.clone();
        log.on_write(move |items| {
            metrics.appended(items.iter().map(|a| &a.event));
            if items.iter().any(|a| !a.event.is_delta())
                && let Some(hooks) = hooks.upgrade()
            {
                hooks.poke(id);
            }
        });
        Ok((log, recovered.closed))
    }

    /// Remembers the idempotency keys of messages found in a loop's log
    /// (those of the last 24 h).
    fn remember_keys(
        &self,
        id: LoopId,
        found: Vec<(IdemRecord, String, u64, chrono::DateTime<Utc>)>,
    ) {
        let mut idem = self.shared.idem.lock().expect("idem poisoned");
        for (record, turn_id, seq, at) in found {
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
    }

    /// The loop's handles, its log opened on first use (loops made since
    /// start). Opened under the lock, so every caller gets the same log.
    fn handles<R>(&self, id: LoopId, f: impl FnOnce(&mut Handles) -> R) -> Result<R, StoreError> {
        let mut loops = self.loops.lock().expect("loops poisoned");
        let handles = match loops.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (log, _) = self.open_log(id, false)?;
                e.insert(Handles::new(log))
            }
        };
        Ok(f(handles))
    }

    /// The loop's event log (on a shared database: this node's copy as it is).
    pub fn log(&self, id: LoopId) -> Result<Arc<EventLog>, StoreError> {
        self.handles(id, |h| h.log.clone())
    }

    /// The loop's event log, on a shared database brought up to what the
    /// database has first (one round trip), so a read on any node sees
    /// what any node wrote before it.
    pub async fn current_log(&self, id: LoopId) -> Result<Arc<EventLog>, StoreError> {
        let log = self.log(id)?;
        if log.remote().is_some() && log.held().is_none() {
            let found = log.catch_up().await?;
            self.remember_keys(id, found.idem);
        }
        Ok(log)
    }

    /// Makes a loop: its record (within the user's cap) and its workspace.
    pub async fn create(&self, new: NewLoop) -> Result<LoopRecord, RuntimeError> {
        let (loops, catalog) = (self.shared.loops.clone(), self.shared.catalog.clone());
        let max = self.shared.config.limits.loops_per_user;
        let record = tokio::task::spawn_blocking(move || {
            let record = loops.create_within(new, max)?;
            if let Err(err) = workspace::prepare(&loops.work_dir(record.id), &catalog, &record) {
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
        if let Some(cluster) = &self.shared.cluster
            && self.log(record.id)?.held().is_none()
            && let Some(Some(owner)) = self.node_running(record.id).await?
            && owner != cluster.me
        {
            // Its agent runs there: that node stops it.
            return Err(RuntimeError::Elsewhere(owner));
        }
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
            h.retire = CancellationToken::new();
            let retired = h.retire.clone();
            let actor = Actor::new(
                id,
                shared.clone(),
                h.log.clone(),
                rx,
                tx.downgrade(),
                retired,
            );
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
        let command = make(reply);
        let Some(cluster) = &self.shared.cluster else {
            self.actor(id)?
                .send(command)
                .await
                .map_err(|_| RuntimeError::Internal("the loop's task is gone".into()))?;
            return answer
                .await
                .map_err(|_| RuntimeError::Internal("the loop's task dropped a reply".into()));
        };
        // The lease is checked (or taken) and the command queued under the
        // node's claim lock: a loop's task gives its lease back under the
        // same lock, and only with no command waiting, so a command never
        // reaches a task that just let the lease go.
        let claimed = cluster.claiming.lock().await;
        self.claim_locked(cluster, id, true).await?;
        let tx = self.actor(id)?;
        let queued = match tx.try_send(command) {
            Ok(()) => Ok(()),
            // A full queue is not given back: wait outside the lock.
            Err(mpsc::error::TrySendError::Full(command)) => {
                drop(claimed);
                tx.send(command).await.map_err(|_| ())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        queued.map_err(|()| RuntimeError::Internal("the loop's task is gone".into()))?;
        answer
            .await
            .map_err(|_| RuntimeError::Internal("the loop's task dropped a reply".into()))
    }

    /// On a shared database, makes sure this node holds the loop's lease
    /// before its task may write: taken if free (turns a previous holder
    /// left are settled first), or the request belongs to the node that
    /// holds it ([`RuntimeError::Elsewhere`]).
    /// Call holding `cluster.claiming`: one claim at a time on this node,
    /// so two requests for a loop nobody holds do not both take it (and
    /// both settle its turns). `placing`: a request that may be sent to a
    /// better node (the loop's home, or one with room); a takeover, chosen
    /// for this node already, is not.
    async fn claim_locked(
        &self,
        cluster: &Cluster,
        id: LoopId,
        placing: bool,
    ) -> Result<(), RuntimeError> {
        let log = self.log(id)?;
        if log.held().is_some() {
            return Ok(());
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RuntimeError::Stopping);
        }
        // Sent here by another node: it runs here.
        let placing = placing && cluster::SENT_HERE.try_with(|_| ()).is_err();
        // The loop's workspace is on another live node with room: it runs
        // there, so an idle loop does not lose its files by moving.
        if placing && let Some(home) = cluster.home_elsewhere(id).await? {
            return Err(RuntimeError::Elsewhere(home));
        }
        // Every agent slot here is taken: a node with room runs it (else it
        // waits for a slot here, as on one node).
        if placing
            && self.shared.slots.live() >= self.shared.config.max_agents
            && let Some(node) = cluster.roomier_node().await?
        {
            return Err(RuntimeError::Elsewhere(node));
        }
        match cluster.claim(id, &log).await? {
            Claim::Elsewhere(owner) => Err(RuntimeError::Elsewhere(owner)),
            Claim::Mine { restarted, found } => {
                self.remember_keys(id, found.idem);
                self.settle(id, &log, restarted).await
            }
        }
    }

    /// Deals with the turns the lease's previous holder left unfinished:
    /// after this node's own restart they end `server_restarted` (as on
    /// one node); taken from a node that died, the running one ends
    /// `node_lost` and the waiting ones run here.
    async fn settle(
        &self,
        id: LoopId,
        log: &Arc<EventLog>,
        restarted: bool,
    ) -> Result<(), RuntimeError> {
        let (running, waiting, end) = log.view_with_len(|v, end| {
            let running = v.current.as_ref().map(|c| v.turns[c.turn].turn_id.clone());
            let waiting: Vec<(String, u64)> = v
                .queue
                .iter()
                .map(|&t| (v.turns[t].turn_id.clone(), v.turns[t].offset))
                .collect();
            (running, waiting, end)
        });
        if restarted || self.shared.loops.get(id).is_none_or(|r| r.archived) {
            let all: Vec<String> = running
                .into_iter()
                .chain(waiting.into_iter().map(|(t, _)| t))
                .collect();
            if !all.is_empty() {
                log.append_async(&log::closing(all, "server_restarted"))
                    .await?;
            }
            return Ok(());
        }
        if let Some(turn) = running {
            log.append_async(&log::closing(vec![turn], "node_lost"))
                .await?;
        }
        if waiting.is_empty() {
            return Ok(());
        }
        let mut turns = Vec::with_capacity(waiting.len());
        for (turn_id, offset) in waiting {
            let mut content = None;
            log.scan_from_offset_to(offset, end, |stored| {
                if let events::Event::UserMessage { content: c, .. } = stored.event {
                    content = Some(c);
                    return false;
                }
                true
            })?;
            turns.push((turn_id, content.unwrap_or_default()));
        }
        let owner = self
            .shared
            .loops
            .get(id)
            .map(|r| r.created_by)
            .unwrap_or_default();
        let mut queued = Vec::with_capacity(turns.len());
        for (turn_id, content) in turns {
            // Their bytes count again; past the budget they run anyway (they
            // were accepted once).
            let reserved = self
                .shared
                .queued
                .take(owner.clone(), content.len())
                .or_else(|| self.shared.queued.take(owner.clone(), 0))
                .ok_or_else(|| RuntimeError::Internal("no room to requeue a turn".into()))?;
            queued.push((turn_id, content, reserved));
        }
        // Not awaited: this runs under the claim lock, which a loop's task
        // may be waiting for.
        self.actor(id)?
            .try_send(Command::Requeue { turns: queued })
            .map_err(|_| RuntimeError::Internal("the loop's task cannot take its turns".into()))
    }

    /// Takes over a loop from a node that died: its lease, and its turns.
    async fn resume_here(&self, id: LoopId) -> Result<(), RuntimeError> {
        let Some(cluster) = &self.shared.cluster else {
            return Ok(());
        };
        let _claimed = cluster.claiming.lock().await;
        self.claim_locked(cluster, id, false).await?;
        self.let_go_if_idle_locked(cluster, id).await;
        Ok(())
    }

    /// Gives back a lease this node took for nothing (no task runs the
    /// loop: nothing was waiting, or a request needed only to look).
    async fn let_go_if_idle(&self, id: LoopId) {
        if let Some(cluster) = &self.shared.cluster {
            let _claimed = cluster.claiming.lock().await;
            self.let_go_if_idle_locked(cluster, id).await;
        }
    }

    /// [`Self::let_go_if_idle`], holding `cluster.claiming`.
    async fn let_go_if_idle_locked(&self, cluster: &Cluster, id: LoopId) {
        let Ok(log) = self.log(id) else { return };
        let live = self
            .handles(id, |h| h.actor.as_ref().is_some_and(|tx| !tx.is_closed()))
            .unwrap_or(true);
        if !live {
            // The loop is free again, for any node.
            cluster.release(id, &log).await;
        }
    }

    /// This node lost the loop's lease: its task stops at once, writing
    /// nothing more.
    /// Only if this node still holds it under `generation` (it may have
    /// been let go and taken again since); returns whether it did. Never
    /// waits: the loop's write in flight gives up at once, and its task is
    /// retired (it writes, sends and starts nothing more, answers what it
    /// had queued `loop_moving`, and ends); the next command starts a new
    /// task.
    fn lost(&self, id: LoopId, generation: i64) -> bool {
        let let_go = self.handles(id, |h| {
            let held = h.log.let_go_if(generation);
            if held {
                h.retire.cancel();
                h.actor = None;
            }
            held
        });
        if !matches!(let_go, Ok(true)) {
            return false;
        }
        if let Some(cluster) = &self.shared.cluster {
            cluster.forget(id);
        }
        true
    }

    /// On a shared database: the node running the loop's agent, if any,
    /// as the database has it now.
    pub async fn node_running(&self, id: LoopId) -> Result<Option<Option<String>>, RuntimeError> {
        let Some(cluster) = &self.shared.cluster else {
            return Ok(None);
        };
        let lease = crate::store::shared_log::lease(&cluster.pg, id.0).await?;
        let now = Utc::now();
        Ok(Some(lease.and_then(|l| {
            l.owner.filter(|_| l.expires_at.is_some_and(|at| at > now))
        })))
    }

    /// A request for `node` could not connect to it: it gets no loop's
    /// work from this node for a while.
    pub fn node_unreachable(&self, node: &str) {
        if let Some(cluster) = &self.shared.cluster {
            cluster.unreachable(node);
        }
    }

    /// This node's name and how many loops it runs, on a shared database.
    pub fn node(&self) -> Option<(String, usize)> {
        let cluster = self.shared.cluster.as_ref()?;
        Some((cluster.me.clone(), cluster.owned()))
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
        let log = self.current_log(record.id).await?;
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
        // On a shared database the key is looked up once this node holds
        // the loop: its copy has caught up with what the last holder wrote,
        // keys included (a message whose write was given up when the lease
        // went may have landed all the same).
        if let Some(cluster) = &self.shared.cluster
            && log.held().is_none()
        {
            let _claimed = cluster.claiming.lock().await;
            self.claim_locked(cluster, record.id, true).await?;
        }
        let found = self.shared.idem.lock().expect("idem poisoned").lookup(
            user,
            &idem.key,
            &idem.body_hash,
            Utc::now(),
        );
        match found {
            Lookup::Replay(r) => {
                self.let_go_if_idle(record.id).await;
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
                self.let_go_if_idle(record.id).await;
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
        let reserved = match self.reserve(user, &content) {
            Ok(reserved) => reserved,
            Err(err) => {
                self.let_go_if_idle(record.id).await;
                return Err(err);
            }
        };
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
        if let Some(cluster) = &self.shared.cluster {
            let logs: Vec<Arc<EventLog>> = {
                let loops = self.loops.lock().expect("loops poisoned");
                loops.values().map(|h| h.log.clone()).collect()
            };
            for log in logs {
                log.let_go();
            }
            cluster.release_all().await;
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
