//! A loop's log on Postgres: the database is the record, and the node keeps
//! a copy in the usual file, so readers here (streams, `/turns`) work as on
//! one node. The node holding the loop's lease writes through: each append
//! goes to the database first (one round trip, fenced by the lease's
//! generation), then to the copy. Every other node brings its copy up to
//! date when the change feed says the loop's head moved.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use bytes::BytesMut;
use uuid::Uuid;

use super::{EventLog, Recovered};
use crate::runtime::events::{StoredEvent, frame_into};
use crate::store::{Pg, StoreError, shared_log};

/// Appends (chunks), and bytes of their lines, read from the database at
/// once while catching up (a larger chunk comes on its own).
const CATCH_UP_CHUNKS: i64 = 64;
const CATCH_UP_BYTES: i64 = 4 << 20;

/// The database side of a shared log.
pub struct Remote {
    pg: Arc<Pg>,
    loop_id: Uuid,
    /// The lease generation this node writes under; 0 while it holds none.
    generation: AtomicI64,
    /// Held by whoever writes this node's copy (an append, a catch-up),
    /// also across the database's round trip.
    writer: tokio::sync::Mutex<()>,
    /// The highest head the change feed announced, and whether a catch-up
    /// task is on its way to it.
    wanted: AtomicU64,
    catching: AtomicBool,
    /// Woken when this node lets the lease go: an append waiting for the
    /// database gives up at once (its loop's agent must stop now, not when
    /// a slow database answers).
    let_go: tokio::sync::Notify,
}

impl Remote {
    /// Waits for this log's other writers (it guards writing, not reading).
    pub(super) async fn writing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    pub(super) fn pg(&self) -> &Pg {
        &self.pg
    }

    /// Writes the encoded `lines` (`count` events from `first`, each line
    /// ending in a newline) to the database under the lease, as one chunk.
    pub(super) async fn append(
        &self,
        first: u64,
        count: usize,
        lines: &[u8],
    ) -> Result<(), StoreError> {
        // Listening before the generation is read: a let-go after this
        // point wakes it.
        let let_go = self.let_go.notified();
        tokio::pin!(let_go);
        let_go.as_mut().enable();
        let generation = self.generation.load(Ordering::SeqCst);
        if generation == 0 {
            return Err(StoreError::Fenced(format!("loop_{}", self.loop_id)));
        }
        // The lines as the file has them, the last newline off (the
        // database joins a chunk's lines by newlines). They are JSON that
        // loopd encoded, so utf-8.
        let lines = lines.strip_suffix(b"\n").unwrap_or(lines);
        let lines = String::from_utf8_lossy(lines);
        let chunk = shared_log::Chunk {
            first,
            count,
            lines: &lines,
        };
        // With every other loop's appends waiting now: one round trip. If
        // the lease is let go meanwhile, the write may still land (the
        // database is the record; a later catch-up brings it here), but
        // nothing waits for it.
        tokio::select! {
            written = self.pg.group().append(self.loop_id, generation, chunk) => written,
            () = let_go => Err(StoreError::Fenced(format!("loop_{}", self.loop_id))),
        }
    }
}

impl EventLog {
    /// Opens this node's copy of a shared log and brings it up to date
    /// from the database. A copy that is ahead of the database (the data
    /// directory was used with another database) is thrown away and made
    /// again. Unfinished turns are left alone: closing them is for the
    /// node that takes the loop's lease.
    pub fn open_shared(
        path: PathBuf,
        pg: Arc<Pg>,
        loop_id: Uuid,
    ) -> Result<(Arc<Self>, Recovered), StoreError> {
        let (log, mut recovered) = Self::open_copy(path, pg.clone(), loop_id)?;
        let head = pg.block(shared_log::last_seq(&pg, loop_id))?;
        if log.last_seq() > head as u64 {
            // Kept aside, never deleted: it may be the only whole copy (a
            // `loopd migrate` that did not finish).
            let path = log.path.clone();
            let aside = path.with_extension(format!("jsonl.ahead-{}", crate::ids::random_hex(4)));
            tracing::warn!(path = %path.display(), aside = %aside.display(),
                "this node's copy of the log is ahead of the database; kept aside and made again (run `loopd migrate` again if the copy was cut short)");
            drop(log);
            std::fs::rename(&path, &aside).map_err(|e| StoreError::io(&path, e))?;
            return Self::open_shared(path, pg, loop_id);
        }
        let caught = pg.block(log.catch_up())?;
        recovered.idem.extend(caught.idem);
        Ok((log, recovered))
    }

    /// Opens this node's copy as it is on disk, without asking the database
    /// anything (for a loop first seen while the server runs: the copy is
    /// brought up to date by [`Self::catch_up`] afterwards).
    pub fn open_copy(
        path: PathBuf,
        pg: Arc<Pg>,
        loop_id: Uuid,
    ) -> Result<(Arc<Self>, Recovered), StoreError> {
        let remote = || Remote {
            pg: pg.clone(),
            loop_id,
            generation: AtomicI64::new(0),
            writer: tokio::sync::Mutex::new(()),
            wanted: AtomicU64::new(0),
            catching: AtomicBool::new(false),
            let_go: tokio::sync::Notify::new(),
        };
        Self::open_file(path, Some(remote()))
    }

    /// The database side, when the log is shared.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The loop's last seq as this node has it.
    pub fn last_seq(&self) -> u64 {
        self.view(|v| v.next_seq - 1)
    }

    /// Writes from now on go out under lease `generation` (this node just
    /// took the lease, and caught up first).
    pub fn hold(&self, generation: i64) {
        if let Some(remote) = &self.remote {
            remote.generation.store(generation, Ordering::SeqCst);
        }
    }

    /// This node gave up (or lost) the lease: it writes nothing more.
    /// Returns the generation it held, if any.
    pub fn let_go(&self) -> Option<i64> {
        let remote = self.remote.as_ref()?;
        let held = remote.generation.swap(0, Ordering::SeqCst);
        remote.let_go.notify_waiters();
        (held != 0).then_some(held)
    }

    /// Lets the lease go only if this node holds it under `generation`;
    /// whether it did.
    pub fn let_go_if(&self, generation: i64) -> bool {
        let Some(remote) = self.remote.as_ref() else {
            return false;
        };
        let held = remote
            .generation
            .compare_exchange(generation, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if held {
            remote.let_go.notify_waiters();
        }
        held && generation != 0
    }

    /// The generation this node writes under, if it holds the lease.
    pub fn held(&self) -> Option<i64> {
        let held = self.remote.as_ref()?.generation.load(Ordering::SeqCst);
        (held != 0).then_some(held)
    }

    /// Brings this node's copy up to the database's head (nothing to do
    /// while this node holds the lease: it wrote them). Returns the
    /// idempotency records of the messages it found.
    pub async fn catch_up(self: &Arc<Self>) -> Result<Recovered, StoreError> {
        let mut found = Recovered::default();
        let Some(remote) = &self.remote else {
            return Ok(found);
        };
        loop {
            if self.held().is_some() {
                return Ok(found);
            }
            let after = self.last_seq();
            let (rows, full) = shared_log::read_after(
                &remote.pg,
                remote.loop_id,
                after,
                CATCH_UP_CHUNKS,
                CATCH_UP_BYTES,
            )
            .await?;
            if rows.is_empty() {
                return Ok(found);
            }
            let log = self.clone();
            let applied = tokio::task::spawn_blocking(move || log.apply_stored(&rows))
                .await
                .map_err(|e| StoreError::io(&self.path, std::io::Error::other(e)))??;
            found.idem.extend(applied.idem);
            if !full {
                return Ok(found);
            }
        }
    }

    /// Brings the copy up to `head` soon, on a task of `tasks`: the change
    /// feed never waits for a catch-up, and the announcements that come
    /// while one runs are served by it (one query for many appends).
    /// `found` gets what each round brought.
    pub fn catch_up_soon(
        self: &Arc<Self>,
        head: u64,
        tasks: &tokio_util::task::TaskTracker,
        found: impl Fn(Recovered) + Send + 'static,
    ) {
        let Some(remote) = &self.remote else { return };
        remote.wanted.fetch_max(head, Ordering::SeqCst);
        if self.last_seq() >= head || remote.catching.swap(true, Ordering::SeqCst) {
            return;
        }
        let log = self.clone();
        tasks.spawn(async move {
            let remote = log.remote.as_ref().expect("a shared log");
            loop {
                match log.catch_up().await {
                    Ok(got) => found(got),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not bring a log's copy up to date")
                    }
                }
                remote.catching.store(false, Ordering::SeqCst);
                // An announcement that came just before the flag went down.
                let behind = log.last_seq() < remote.wanted.load(Ordering::SeqCst);
                if !behind || log.held().is_some() || remote.catching.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// Takes in events another node wrote, in seq order from the next one
    /// this copy lacks (rows it already has are skipped; a gap stops).
    fn apply_stored(&self, rows: &[(i64, String)]) -> Result<Recovered, StoreError> {
        // (On a blocking thread: catch-ups run there.)
        let _writing = self.remote.as_ref().map(|r| r.writer.blocking_lock());
        self.apply_stored_locked(rows)
    }

    /// Takes in events that came with their announcement (small appends
    /// carry their lines in the notification): no query when they follow
    /// on from this copy. Returns false when they could not be used here
    /// and now (the caller catches up by query instead).
    pub fn apply_announced(&self, rows: &[(i64, String)]) -> Option<Recovered> {
        let remote = self.remote.as_ref()?;
        if self.held().is_some() || rows.first()?.0 as u64 != self.last_seq() + 1 {
            return None;
        }
        // Another writer of this copy (a catch-up) is busy: leave it to it.
        let _writing = remote.writer.try_lock().ok()?;
        self.apply_stored_locked(rows).ok()
    }

    /// [`Self::apply_stored`], the copy's writer lock already held.
    fn apply_stored_locked(&self, rows: &[(i64, String)]) -> Result<Recovered, StoreError> {
        let mut guard = self.state.lock().expect("log poisoned");
        let state = &mut *guard;
        let mut expected = state.view.next_seq;
        let mut parsed = Vec::with_capacity(rows.len());
        let mut lines = Vec::new();
        let mut frames = BytesMut::new();
        let mut scratch = Vec::new();
        for (seq, line) in rows {
            let seq = *seq as u64;
            if seq < expected {
                continue;
            }
            if seq > expected {
                break;
            }
            let stored: StoredEvent =
                serde_json::from_str(line).map_err(|e| StoreError::Corrupt {
                    path: PathBuf::from(format!("database events of loop_{}", self.loop_uuid())),
                    line: seq as usize,
                    column: e.column(),
                    message: e.to_string(),
                })?;
            let offset = state.len + lines.len() as u64;
            let before = frames.len();
            frame_into(seq, &stored.event, &mut scratch, &mut frames);
            lines.extend_from_slice(line.as_bytes());
            lines.push(b'\n');
            parsed.push((stored, offset, frames.len() - before));
            expected += 1;
        }
        let mut found = Recovered::default();
        if parsed.is_empty() {
            return Ok(found);
        }
        if state.copy_ok {
            use std::io::Write;
            if let Err(e) = state.file.write_all(&lines) {
                let _ = state.file.set_len(state.len);
                tracing::error!(path = %self.path.display(), error = %e,
                    "this node's copy of an event log cannot be written; restart the node to rebuild it");
                state.copy_ok = false;
            }
        }
        let block = frames.freeze();
        let mut at_byte = 0;
        for (stored, offset, len) in parsed {
            let frame = block.slice(at_byte..at_byte + len);
            at_byte += len;
            state.admit(stored.seq, stored.at, offset, &stored.event, frame, &block);
            if let (
                Some(idem),
                crate::runtime::events::Event::UserMessage {
                    turn_id,
                    created_at,
                    ..
                },
            ) = (stored.idem, &stored.event)
            {
                found
                    .idem
                    .push((idem, turn_id.to_string(), stored.seq, *created_at));
            }
        }
        state.len += lines.len() as u64;
        state.trim_ring();
        let last = state.view.next_seq - 1;
        drop(guard);
        self.announce.send_replace(last);
        Ok(found)
    }

    fn loop_uuid(&self) -> Uuid {
        self.remote.as_ref().map_or(Uuid::nil(), |r| r.loop_id)
    }
}
