//! A node among others on one database. Each live loop runs on one node,
//! recorded as a lease (owner, fencing generation, expiry) that its node
//! renews every third of the lease's time; a node that stops renewing
//! loses its loops to whichever live node is least loaded. Every node keeps
//! its copy of every loop's log up to date from the change feed, so any
//! node can serve reads and streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::log::{EventLog, Recovered};
use super::{Runtime, RuntimeError};
use crate::store::pg::Watermark;
use crate::store::{LoopId, Pg, StoreError, shared_log};

/// How often each node looks for leases that ran out, at the least; it
/// also wakes just after the next lease of another node is due to run out.
const TAKEOVER_SCAN: Duration = Duration::from_millis(500);

/// How long after a lease's expiry (by the database's clock) the scan that
/// takes it over wakes.
const TAKEOVER_MARGIN: Duration = Duration::from_millis(5);

tokio::task_local! {
    /// Set while this node serves a request another node forwarded here:
    /// that node chose this one for the loop (its owner, its home, or the
    /// roomiest), so a loop nobody runs is taken here, waiting for a slot
    /// if need be, rather than sent on (a forwarded request is never
    /// forwarded again).
    pub static SENT_HERE: ();
}

/// Unreachable nodes remembered at once, at most (the cluster's size is
/// far below it; past it, a node is simply not remembered).
const MAX_UNREACHABLE: usize = 1024;

/// A lease this node holds: its generation, and until when it surely
/// holds it by this node's clock (a lease's time after the last claim or
/// renewal was sent; the database counts from when it got it, later).
#[derive(Clone, Copy)]
struct Held {
    generation: i64,
    until: Instant,
}

/// How long before a held lease could run out this node stops its agent,
/// as a part of the lease's time: after two renewals in a row failed (they
/// come every third), so no other node can have taken it yet.
const SELF_FENCE: u32 = 4;

/// How often a starting node looks whether another process still reports
/// itself under its advertise URL.
const TWIN_POLL: Duration = Duration::from_millis(100);

/// How a loop's lease stands for this node.
pub enum Claim {
    /// This node holds it now. `restarted`: nobody held it before, or this
    /// node's name did in an earlier process (a restart): turns left
    /// unfinished end `server_restarted`, as on one node. Otherwise another
    /// node (or this very process, which had to let it go) left them: the
    /// running one ends `node_lost` and the queued ones run. `found`: what
    /// catching the copy up brought (its idempotency keys).
    Mine { restarted: bool, found: Recovered },
    /// Another node holds it: send the request there.
    Elsewhere(String),
}

pub struct Cluster {
    pub pg: Arc<Pg>,
    /// This node's advertise URL: its name in leases.
    pub me: String,
    pub ttl: Duration,
    /// Loops whose lease this node holds.
    held: Mutex<HashMap<LoopId, Held>>,
    /// The last generation this process took of each loop it ever held
    /// (one entry per loop, so bounded as loops are): a lease found under
    /// this node's name at that generation was let go by this process, not
    /// left by a restart.
    taken_here: Mutex<HashMap<LoopId, i64>>,
    /// Held while this node takes a lease and queues a command for the
    /// loop's task, and while a loop's task gives its lease back.
    pub claiming: tokio::sync::Mutex<()>,
    /// Nodes a forwarded request could not reach, and when: not sent a
    /// loop's work again for a lease's time (they are likely dead).
    unreachable: Mutex<HashMap<String, std::time::Instant>>,
    /// This process's id in `nodes` (another one under `me` is a second
    /// process with the same advertise URL), and how many times it
    /// reported itself.
    instance: String,
    beats: std::sync::atomic::AtomicU64,
}

impl Cluster {
    pub fn new(pg: Arc<Pg>, me: String, ttl: Duration) -> Self {
        Self {
            pg,
            me,
            ttl,
            held: Mutex::new(HashMap::new()),
            taken_here: Mutex::new(HashMap::new()),
            claiming: tokio::sync::Mutex::new(()),
            unreachable: Mutex::new(HashMap::new()),
            instance: crate::ids::random_hex(8),
            beats: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Refuses to start a second process under an advertise URL another
    /// live loopd uses: they would take each other's leases as their own.
    /// Asked only when a node reported itself under that URL within a
    /// lease (a clean shutdown takes its report away): then its report is
    /// watched for half a lease (it comes every third). A new report is a
    /// live process; none is a node that died (a restart after a crash,
    /// which so starts half a lease later).
    pub async fn refuse_a_twin(&self) -> Result<(), StoreError> {
        let report = || async {
            sqlx::query_scalar::<_, DateTime<Utc>>(
                "SELECT seen_at FROM nodes WHERE url = $1 \
                 AND seen_at > now() - make_interval(secs => $2)",
            )
            .bind(&self.me)
            .bind(self.ttl.as_secs_f64())
            .fetch_optional(self.pg.pool())
            .await
        };
        let Some(seen) = report().await? else {
            return Ok(());
        };
        tracing::info!(node = %self.me, "a node reported itself under this advertise URL lately; making sure it is gone");
        let until = Instant::now() + self.ttl / 2;
        while Instant::now() < until {
            tokio::time::sleep(TWIN_POLL).await;
            if report().await?.is_some_and(|again| again != seen) {
                return Err(StoreError::Conflict(
                    "duplicate_node",
                    format!(
                        "another loopd is running with --advertise-url {}: give each node its own \
                         advertise URL (nodes with one name would take each other's loops)",
                        self.me
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where a loop nobody runs should go instead of here: the node that
    /// last ran it (its workspace and conversation are there, unless the
    /// workspace root is shared), while that node is alive and has room.
    /// Alive: it reported itself within a lease (it does every third),
    /// and no request found it unreachable lately.
    pub async fn home_elsewhere(&self, id: LoopId) -> Result<Option<String>, StoreError> {
        let home = shared_log::live_home(&self.pg, id.0, &self.me, self.ttl).await?;
        Ok(home.filter(|home| self.reachable(home)))
    }

    /// Whether no forwarded request found `node` unreachable lately.
    fn reachable(&self, node: &str) -> bool {
        let mut unreachable = self.unreachable.lock().expect("unreachable poisoned");
        unreachable.retain(|_, at| at.elapsed() < self.ttl);
        !unreachable.contains_key(node)
    }

    /// A forwarded request could not connect to `node`: it gets no new
    /// loops from this node for a lease's time. Bounded by the nodes that
    /// report themselves (anything else is never sent work).
    pub fn unreachable(&self, node: &str) {
        let mut unreachable = self.unreachable.lock().expect("unreachable poisoned");
        unreachable.retain(|_, at| at.elapsed() < self.ttl);
        if unreachable.len() < MAX_UNREACHABLE {
            unreachable.insert(node.to_owned(), std::time::Instant::now());
        }
    }

    /// Takes the loop's lease unless a live node holds it. After a take,
    /// this node's copy of the log is brought up to the database's head
    /// before anything is written under the new generation.
    pub async fn claim(&self, id: LoopId, log: &Arc<EventLog>) -> Result<Claim, RuntimeError> {
        let asked = Instant::now();
        let Some(claimed) = shared_log::claim(&self.pg, id.0, &self.me, self.ttl).await? else {
            let owner = shared_log::lease(&self.pg, id.0)
                .await?
                .and_then(|l| l.owner)
                .ok_or_else(|| RuntimeError::Internal("a lease vanished while claimed".into()))?;
            return Ok(Claim::Elsewhere(owner));
        };
        let caught = log.catch_up().await;
        let found = match caught {
            Ok(found) if log.last_seq() >= claimed.head as u64 => found,
            outcome => {
                // The copy could not be brought up to date: do not write, and
                // leave the lease as it was found.
                let previous = claimed.previous.as_deref();
                let _ = shared_log::give_back(&self.pg, id.0, claimed.generation, previous).await;
                outcome?;
                return Err(RuntimeError::Internal(format!(
                    "this node's copy of {id}'s log stops at {} but the database has {}",
                    log.last_seq(),
                    claimed.head
                )));
            }
        };
        log.hold(claimed.generation);
        let held = Held {
            generation: claimed.generation,
            until: asked + self.ttl,
        };
        self.held.lock().expect("held poisoned").insert(id, held);
        tracing::info!(loop_id = %id, generation = claimed.generation, previous = ?claimed.previous, "took the loop's lease");
        let before = self
            .taken_here
            .lock()
            .expect("taken_here poisoned")
            .insert(id, claimed.generation);
        let let_go_here = before == Some(claimed.generation - 1);
        let restarted = match &claimed.previous {
            None => true,
            Some(previous) => *previous == self.me && !let_go_here,
        };
        Ok(Claim::Mine { restarted, found })
    }

    /// Gives the loop's lease back (its agent stopped, nothing waits).
    pub async fn release(&self, id: LoopId, log: &EventLog) {
        let Some(generation) = log.let_go() else {
            return;
        };
        self.held.lock().expect("held poisoned").remove(&id);
        if let Err(err) = shared_log::release(&self.pg, id.0, generation).await {
            // It expires on its own.
            tracing::warn!(loop_id = %id, error = %err, "could not give a lease back");
        }
    }

    /// Forgets a lease this node lost (another node holds it now).
    pub fn forget(&self, id: LoopId) {
        self.held.lock().expect("held poisoned").remove(&id);
    }

    /// Gives back every lease this node holds (at shutdown, once its
    /// loops' tasks have stopped): another node may take them at once.
    pub async fn release_all(&self) {
        let held: Vec<(LoopId, Held)> = self.held.lock().expect("held poisoned").drain().collect();
        for (id, Held { generation, .. }) in held {
            if let Err(err) = shared_log::release(&self.pg, id.0, generation).await {
                tracing::warn!(loop_id = %id, error = %err, "could not give a lease back");
            }
        }
        self.leave().await;
    }

    /// How many loops this node runs.
    pub fn owned(&self) -> usize {
        self.held.lock().expect("held poisoned").len()
    }

    /// Whether this node holds the loop's lease.
    fn holds(&self, id: LoopId) -> bool {
        self.held.lock().expect("held poisoned").contains_key(&id)
    }

    /// Renews every lease held; returns the loops whose lease was lost,
    /// with the generation that was.
    async fn renew(&self) -> Result<Vec<(LoopId, i64)>, StoreError> {
        let held: Vec<(Uuid, i64)> = {
            let held = self.held.lock().expect("held poisoned");
            held.iter().map(|(id, h)| (id.0, h.generation)).collect()
        };
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let asked = Instant::now();
        let kept = shared_log::renew(&self.pg, &self.me, &held, self.ttl).await?;
        {
            let mut mine = self.held.lock().expect("held poisoned");
            for id in &kept {
                if let Some(h) = mine.get_mut(&LoopId(*id)) {
                    h.until = h.until.max(asked + self.ttl);
                }
            }
        }
        Ok(held
            .into_iter()
            .filter(|(id, _)| !kept.contains(id))
            .map(|(id, generation)| (LoopId(id), generation))
            .collect())
    }

    /// Loops whose lease this node can no longer be sure to hold (its
    /// renewals failed, the database unreachable or too slow): their agents
    /// must stop before another node may take them over.
    fn unsure(&self) -> Vec<(LoopId, i64)> {
        let margin = self.ttl / SELF_FENCE;
        let now = Instant::now();
        let held = self.held.lock().expect("held poisoned");
        held.iter()
            .filter(|(_, h)| h.until.saturating_duration_since(now) <= margin)
            .map(|(id, h)| (*id, h.generation))
            .collect()
    }

    /// Says this node is alive and how loaded it is. Another process's id
    /// found there after this one's first report is a second process with
    /// the same advertise URL: said loudly, at every report.
    async fn heartbeat(&self, max_agents: usize) -> Result<(), StoreError> {
        let before: Option<Option<String>> = sqlx::query_scalar(
            "WITH old AS (SELECT instance FROM nodes WHERE url = $1), \
             up AS (INSERT INTO nodes (url, seen_at, owned, max_agents, instance) \
                 VALUES ($1, now(), $2, $3, $4) ON CONFLICT (url) DO UPDATE \
                 SET seen_at = now(), owned = $2, max_agents = $3, instance = $4 RETURNING 1) \
             SELECT old.instance FROM old, up",
        )
        .bind(&self.me)
        .bind(self.owned() as i32)
        .bind(max_agents as i32)
        .bind(&self.instance)
        .fetch_optional(self.pg.pool())
        .await?;
        let first = self.beats.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if !first && before.flatten().is_some_and(|other| other != self.instance) {
            tracing::error!(node = %self.me, "another loopd process reports itself with this node's --advertise-url: the two take each other's loops; stop one and give each node its own URL");
        }
        Ok(())
    }

    /// Takes this node out of `nodes` (at shutdown): a restart under the
    /// same URL need not ask whether it still runs.
    async fn leave(&self) {
        let left = sqlx::query("DELETE FROM nodes WHERE url = $1 AND instance = $2")
            .bind(&self.me)
            .bind(&self.instance)
            .execute(self.pg.pool())
            .await;
        if let Err(err) = left {
            tracing::warn!(error = %err, "could not take this node out of the nodes table");
        }
    }

    /// Another live node with room for an agent, the least loaded first
    /// (for a loop nobody runs, when this node has none left).
    /// Nodes found unreachable lately are passed over.
    pub async fn roomier_node(&self) -> Result<Option<String>, StoreError> {
        let roomier: Vec<String> = sqlx::query_scalar(
            "SELECT url FROM nodes WHERE url <> $1 AND seen_at > now() - make_interval(secs => $2) \
             AND owned < max_agents ORDER BY owned::float / greatest(max_agents, 1), url LIMIT 16",
        )
        .bind(&self.me)
        .bind(self.ttl.as_secs_f64())
        .fetch_all(self.pg.pool())
        .await?;
        Ok(roomier.into_iter().find(|node| self.reachable(node)))
    }

    /// Whether this node should take over a dead node's loops now: it is
    /// the least loaded live node, or the lease has been dead so long that
    /// the preferred node must be gone too.
    async fn my_turn_to_take_over(&self, overdue: bool) -> Result<bool, StoreError> {
        if overdue {
            return Ok(true);
        }
        let best: Option<String> = sqlx::query_scalar(
            "SELECT url FROM nodes WHERE seen_at > now() - make_interval(secs => $1) \
             ORDER BY owned::float / greatest(max_agents, 1), url LIMIT 1",
        )
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(self.pg.pool())
        .await?;
        Ok(best.is_none_or(|b| b == self.me))
    }
}

impl Runtime {
    /// Starts what makes this node one of many: the change feed that keeps
    /// logs current, lease renewal, the heartbeat, and taking
    /// over the loops of nodes that died.
    pub fn start_cluster(self: &Arc<Self>) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        let me = Arc::downgrade(self);
        let watermark = Arc::new(Mutex::new(Watermark::default()));
        cluster.pg.watch(
            shared_log::CHANNEL,
            Arc::new(move |payload: Option<String>| {
                let (me, watermark) = (me.clone(), watermark.clone());
                Box::pin(async move {
                    let Some(runtime) = me.upgrade() else { return };
                    runtime.follow_change(payload, &watermark).await;
                })
            }),
        );
        cluster
            .pg
            .start_feed(&self.shared.tasks, &self.shared.stopping);
        // Renewals on their own task: a slow takeover never delays them.
        let keeper = cluster.clone();
        self.every(keeper.ttl / 3, move |runtime| {
            let keeper = keeper.clone();
            async move { runtime.keep_leases(&keeper).await }
        });
        // Leases this node cannot renew are let go of before they can run
        // out: no loop's agent runs on two nodes at once.
        let fence = cluster.clone();
        self.every(fence.ttl / (SELF_FENCE * 3), move |runtime| {
            let fence = fence.clone();
            async move {
                for (id, generation) in fence.unsure() {
                    tracing::warn!(loop_id = %id, "could not renew the loop's lease in time; stopping its agent here before another node may take it");
                    runtime.lost(id, generation);
                }
            }
        });
        // Dead nodes' leases are looked for just after the next one runs
        // out, and twice a second in any case: a takeover comes within a few
        // milliseconds of the lease's end.
        self.repeat(move |runtime| {
            let cluster = cluster.clone();
            async move {
                match runtime.take_over(&cluster).await {
                    Ok(Some(next)) => (next + TAKEOVER_MARGIN).min(TAKEOVER_SCAN),
                    Ok(None) => TAKEOVER_SCAN,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not take over a dead node's loops");
                        TAKEOVER_SCAN
                    }
                }
            }
        });
    }

    /// Runs `work` every `period` on a tracked task, until shutdown (or the
    /// runtime is gone); a late round delays the next, never doubles up.
    fn every<F, Fut>(self: &Arc<Self>, period: Duration, work: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        self.repeat(move |runtime| {
            let (started, round) = (tokio::time::Instant::now(), work(runtime));
            async move {
                round.await;
                period.saturating_sub(started.elapsed())
            }
        });
    }

    /// Runs `work` on a tracked task, then again after the wait it returns,
    /// until shutdown (or the runtime is gone).
    fn repeat<F, Fut>(self: &Arc<Self>, work: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Duration> + Send,
    {
        let (me, stopping) = (Arc::downgrade(self), self.shared.stopping.clone());
        self.shared.tasks.spawn(async move {
            let mut wait = Duration::ZERO;
            loop {
                tokio::select! {
                    () = stopping.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let Some(runtime) = me.upgrade() else { return };
                wait = work(runtime).await;
            }
        });
    }

    /// One round of lease keeping: renew, give up what was lost, say we are
    /// alive.
    async fn keep_leases(self: &Arc<Self>, cluster: &Cluster) {
        match cluster.renew().await {
            Ok(lost) => {
                for (id, generation) in lost {
                    if self.lost(id, generation) {
                        tracing::warn!(loop_id = %id, "lost the loop's lease to another node; stopping its agent here");
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not renew leases"),
        }
        if let Err(err) = cluster.heartbeat(self.shared.config.max_agents).await {
            tracing::warn!(error = %err, "could not report this node");
        }
    }

    /// Claims loops whose node stopped renewing their lease and that have
    /// work left (a turn running or waiting): the running turn ends with
    /// `node_lost`, the waiting ones run here. Returns how long until
    /// another node's lease runs out next, if any is held.
    async fn take_over(
        self: &Arc<Self>,
        cluster: &Cluster,
    ) -> Result<Option<Duration>, RuntimeError> {
        let (expired, next) = shared_log::expired(&cluster.pg, &cluster.me).await?;
        for lease in expired {
            let id = LoopId(lease.loop_id);
            if cluster.holds(id) {
                continue; // ours, renewed on the next round
            }
            let Some(record) = self.shared.loops.get(id) else {
                continue;
            };
            let log = self.log(id)?;
            let found = match log.catch_up().await {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(loop_id = %id, error = %err, "could not read a dead node's loop");
                    continue;
                }
            };
            self.remember_keys(id, found.idem);
            let unfinished = log.view(|v| !v.unfinished().is_empty());
            if record.archived || !unfinished {
                // Nothing to carry on: the lease is cleared (and its
                // generation moved on, so its holder, if only paused, can
                // write nothing when it wakes) rather than scanned forever.
                shared_log::release(&cluster.pg, lease.loop_id, lease.generation).await?;
                continue;
            }
            let overdue = lease.expires_at.is_some_and(|at| {
                chrono::Utc::now() - at
                    > chrono::Duration::from_std(cluster.ttl).unwrap_or_default()
            });
            if !cluster.my_turn_to_take_over(overdue).await? {
                continue;
            }
            tracing::warn!(loop_id = %id, node = ?lease.owner, "taking over a loop from a node that stopped answering");
            if let Err(err) = self.resume_here(id).await {
                tracing::warn!(loop_id = %id, error = %err, "could not take the loop over");
            }
        }
        Ok(next)
    }

    /// What the change feed says: a loop's head moved (catch its copy up),
    /// or, on a poll, every lease that changed lately (their heads).
    async fn follow_change(
        self: &Arc<Self>,
        payload: Option<String>,
        watermark: &Mutex<Watermark>,
    ) {
        let Some(cluster) = self.shared.cluster.as_ref() else {
            return;
        };
        if let Some(payload) = payload {
            let Some(Announcement { id, head, rows }) = parse_announcement(&payload) else {
                return;
            };
            if !rows.is_empty()
                && self.shared.loops.get(id).is_some()
                && let Ok(log) = self.log(id)
                && let Some(found) = log.apply_announced(&rows)
            {
                self.remember_keys(id, found.idem);
                if log.last_seq() >= head {
                    return;
                }
            }
            self.catch_up_to(id, head).await;
            return;
        }
        let floor = watermark.lock().expect("watermark").floor();
        let (leases, highest) = match shared_log::changed_since(&cluster.pg, floor).await {
            Ok(changed) => changed,
            Err(err) => {
                tracing::warn!(error = %err, "could not read changed leases");
                return;
            }
        };
        watermark.lock().expect("watermark").saw(highest);
        for lease in leases {
            let id = LoopId(lease.loop_id);
            self.catch_up_to(id, lease.head as u64).await;
        }
    }

    /// Brings this node's copy of a loop's log up to `head`, if it is
    /// behind, in the background (the feed goes on at once).
    async fn catch_up_to(self: &Arc<Self>, id: LoopId, head: u64) {
        if self.shared.loops.get(id).is_none() {
            return; // made by another node a moment ago: seen on the next poll
        }
        let Ok(log) = self.log(id) else { return };
        let me = Arc::downgrade(self);
        log.catch_up_soon(head, &self.shared.tasks, move |found| {
            if let Some(runtime) = me.upgrade() {
                runtime.remember_keys(id, found.idem);
            }
        });
    }
}

/// What an append's notification says: `"<uuid> <head>"`, then for a small
/// append `"\n<first seq>\n<lines>"` (the chunk as it was written).
#[derive(Debug, PartialEq)]
struct Announcement {
    id: LoopId,
    head: u64,
    /// The chunk's events (seq, line), when it came along.
    rows: Vec<(i64, String)>,
}

fn parse_announcement(payload: &str) -> Option<Announcement> {
    let (top, chunk) = match payload.split_once('\n') {
        Some((top, chunk)) => (top, Some(chunk)),
        None => (payload, None),
    };
    let (id, head) = top.split_once(' ')?;
    let (id, head) = (LoopId(Uuid::parse_str(id).ok()?), head.parse::<u64>().ok()?);
    let rows = chunk
        .and_then(|chunk| {
            let (first, lines) = chunk.split_once('\n')?;
            let first: i64 = first.parse().ok()?;
            let rows: Vec<(i64, String)> = shared_log::numbered(first, lines)
                .map(|(seq, line)| (seq, line.to_owned()))
                .collect();
            // Only a whole chunk that ends at the head is used.
            (rows.last()?.0 as u64 == head).then_some(rows)
        })
        .unwrap_or_default();
    Some(Announcement { id, head, rows })
}

#[cfg(test)]
mod announcement_tests {
    use super::*;

    #[test]
    fn announcements_parse_as_written() {
        let id = "6f1c6a52-6a3e-4a47-9d7e-2f4ad8c0a111";
        let announced = |head, rows: &[(i64, &str)]| {
            Some(Announcement {
                id: LoopId(Uuid::parse_str(id).unwrap()),
                head,
                rows: rows.iter().map(|(s, l)| (*s, l.to_string())).collect(),
            })
        };
        let cases = [
            (format!("{id} 7"), announced(7, &[])),
            (
                format!("{id} 9\n8\n{{\"seq\":8}}\n{{\"seq\":9}}"),
                announced(9, &[(8, "{\"seq\":8}"), (9, "{\"seq\":9}")]),
            ),
            (
                format!("{id} 5\n5\n{{\"seq\":5}}"),
                announced(5, &[(5, "{\"seq\":5}")]),
            ),
            // A chunk that does not end at the head is not used (caught up by query).
            (format!("{id} 9\n5\n{{}}"), announced(9, &[])),
            (format!("{id} 9\nx\n{{}}"), announced(9, &[])),
            (format!("{id} x"), None),
            ("nonsense".into(), None),
        ];
        for (payload, want) in cases {
            assert_eq!(parse_announcement(&payload), want, "{payload}");
        }
    }
}
