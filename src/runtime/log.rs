//! A loop's event log, `loops/<uuid>/events.jsonl`: every event gets the next
//! seq, is written to the file (a plain write, before any client sees it),
//! kept in a bounded in-memory ring, and announced. Readers pull by seq,
//! from the ring or, if they fell behind it, from the file: a slow reader
//! never slows the writer, and no event is ever skipped.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{Event, IdemRecord, StoredEvent, encode_into, frame_into};
use super::view::LogView;
use crate::store::StoreError;

mod shared;
pub use shared::Remote;

/// How many recent events stay in memory, and how many bytes of frames at most.
const RING_EVENTS: usize = 1024;
const RING_BYTES: usize = 512 * 1024;
/// Every this many seqs, remember the byte offset (to read old events quickly).
const SPARSE_EVERY: u64 = 256;
/// A log is synced at most this often; turns that end in between are made
/// durable together (a killed server loses nothing: they are written).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// An append buffer that grew past this (a huge event) is let go after use.
const KEEP_BUFFER: usize = 256 * 1024;

thread_local! {
    /// Each thread's append buffers (the lines of one write, one event's
    /// JSON): kept per thread, not per log, so a thousand loops cost nothing.
    static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>, Vec<Placed>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new()))
    };
}

/// Where an appended event went: its time, its line's offset, its frame's length.
type Placed = (Option<DateTime<Utc>>, u64, usize);
/// Most events handed to a reader at once.
const BATCH: usize = 512;
/// And at most about this many bytes of frames (always at least one event):
/// a follower holds one batch until its client has taken it, so a client
/// that never reads costs this much, not the whole log.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Frames read back from a log's file that are kept for other followers.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// File reads of all logs at once: each parses and encodes up to a batch
/// (an event of up to a few MiB), so many followers catching up at once
/// take turns instead of each holding its own copies.
static FILE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs a blocking read of log files in the pool of file reads (followers
/// catching up, `/turns` pages): many at once take turns.
pub async fn in_read_pool<R, E>(
    read: impl FnOnce() -> Result<R, E> + Send + 'static,
) -> Result<R, E>
where
    R: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let _turn = FILE_READS.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(read).await.map_err(|e| {
        E::from(StoreError::io(
            Path::new("log reader"),
            std::io::Error::other(e),
        ))
    })?
}

/// The first events of `events` that make a batch: at most [`BATCH`], and
/// at most [`BATCH_BYTES`] of frames unless the first alone is larger.
fn batch_of<'a, T: 'a>(
    events: impl Iterator<Item = &'a T>,
    frame: impl Fn(&T) -> &Bytes,
) -> impl Iterator<Item = &'a T> {
    let mut bytes = 0;
    events.take(BATCH).take_while(move |e| {
        let len = frame(e).len();
        let fits = bytes == 0 || bytes + len <= BATCH_BYTES;
        bytes += len;
        fits
    })
}

/// One event as readers get it: a ready SSE frame plus what filters need.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    /// When it was written (every event but deltas has it).
    pub at: Option<DateTime<Utc>>,
    /// Index of its turn in the log's view.
    pub turn: Option<usize>,
    pub terminal: bool,
    pub frame: Bytes,
    /// What `frame` is a slice of: the frames of the append that wrote it
    /// (or the frame itself).
    pub block: Bytes,
}

impl Entry {
    /// Where the frame starts within its block.
    pub fn offset_in_block(&self) -> usize {
        self.frame.as_ptr() as usize - self.block.as_ptr() as usize
    }
}

/// An event to append, with the idempotency record a `user_message` may carry.
pub struct Append {
    pub event: Event,
    pub idem: Option<IdemRecord>,
}

impl From<Event> for Append {
    fn from(event: Event) -> Self {
        Self { event, idem: None }
    }
}

/// What the recovery at open found, for the runtime's idempotency index.
#[derive(Debug, Default)]
pub struct Recovered {
    pub idem: Vec<(IdemRecord, String, u64, DateTime<Utc>)>,
    /// Turns that were unfinished and got `error server_restarted`.
    pub closed: usize,
}

struct State {
    file: File,
    /// False once this node's copy of a shared log failed a write: it is
    /// no longer written (the database has every event).
    copy_ok: bool,
    len: u64,
    view: LogView,
    ring: VecDeque<Entry>,
    ring_bytes: usize,
    sparse: Vec<(u64, u64)>,
}

impl State {
    /// Takes in one event just written at `offset`: the view, the sparse
    /// index and the ring; returns its turn.
    fn admit(
        &mut self,
        seq: u64,
        at: Option<DateTime<Utc>>,
        offset: u64,
        event: &Event,
        frame: Bytes,
        block: &Bytes,
    ) -> Option<usize> {
        if seq.is_multiple_of(SPARSE_EVERY) {
            self.sparse.push((seq, offset));
        }
        let turn = self.view.apply(seq, at, offset, event);
        self.ring_bytes += frame.len();
        self.ring.push_back(Entry {
            seq,
            at,
            turn,
            terminal: event.is_terminal(),
            frame,
            block: block.clone(),
        });
        turn
    }

    /// Lets the oldest events go once the ring is over its bounds.
    fn trim_ring(&mut self) {
        while self.ring.len() > RING_EVENTS || (self.ring_bytes > RING_BYTES && self.ring.len() > 1)
        {
            let old = self.ring.pop_front().expect("ring is not empty");
            self.ring_bytes -= old.frame.len();
        }
    }
}

/// Frames read back from the file, each with the offset just past it, and
/// their bytes.
#[derive(Default)]
struct ReadCache {
    entries: VecDeque<(Entry, u64)>,
    bytes: usize,
}

/// What a log tells of each batch this node writes.
type OnWrite = dyn Fn(&[Append]) + Send + Sync;

pub struct EventLog {
    path: PathBuf,
    /// On Postgres: the database is the log's record and this file is the
    /// node's copy of it (see [`shared`]).
    remote: Option<shared::Remote>,
    state: Mutex<State>,
    /// Frames read back from the file lately, shared by every follower
    /// catching up over the same stretch (bounded by [`CACHE_BYTES`]).
    read_cache: Mutex<ReadCache>,
    /// The last seq written (0 before any).
    announce: watch::Sender<u64>,
    /// A turn ended since the last sync began.
    unsynced: AtomicBool,
    /// A sync is running or waiting out [`SYNC_EVERY`].
    syncing: AtomicBool,
    /// Told of every batch of events this node writes (metrics count
    /// them; webhooks look for what is not a delta).
    on_write: std::sync::OnceLock<Box<OnWrite>>,
}

impl EventLog {
    /// Opens (or creates) a log: reads it once to rebuild its view, trims a
    /// torn last line (a crash mid-write), and closes every turn the previous
    /// server left unfinished with `error server_restarted`. A damaged line
    /// anywhere else is an error naming the file and line.
    pub fn open(path: PathBuf) -> Result<(Arc<Self>, Recovered), StoreError> {
        let (log, mut recovered) = Self::open_file(path, None)?;
        let unfinished = log.view(|v| v.unfinished());
        if !unfinished.is_empty() {
            recovered.closed = unfinished.len();
            log.append(&closing(unfinished, "server_restarted"))?;
            log.sync()?;
        }
        Ok((log, recovered))
    }

    /// Opens the file and rebuilds the view from it, closing nothing.
    fn open_file(
        path: PathBuf,
        remote: Option<shared::Remote>,
    ) -> Result<(Arc<Self>, Recovered), StoreError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let mut view = LogView::new();
        let mut sparse = Vec::new();
        let mut recovered = Recovered::default();
        let mut offset = 0u64;
        {
            let mut reader = BufReader::new(&mut file);
            reader
                .seek(SeekFrom::Start(0))
                .map_err(|e| StoreError::io(&path, e))?;
            let mut line = Vec::new();
            let mut lineno = 0usize;
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| StoreError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                lineno += 1;
                let complete = line.ends_with(b"\n");
                let stored = match serde_json::from_slice::<StoredEvent>(&line) {
                    Ok(stored) if complete => Some(stored),
                    Err(e) if complete && !at_eof(&mut reader) => {
                        return Err(StoreError::Corrupt {
                            path: path.clone(),
                            line: lineno,
                            column: e.column(),
                            message: e.to_string(),
                        });
                    }
                    // A line cut short (or damaged) at the very end: a crash
                    // mid-write. No reader can have seen it, so it is dropped.
                    _ => {
                        tracing::warn!(path = %path.display(), line = lineno, "dropping a torn last line");
                        None
                    }
                };
                let Some(stored) = stored else { break };
                if stored.seq.is_multiple_of(SPARSE_EVERY) || sparse.is_empty() {
                    sparse.push((stored.seq, offset));
                }
                view.apply(stored.seq, stored.at, offset, &stored.event);
                if let (
                    Some(idem),
                    Event::UserMessage {
                        turn_id,
                        created_at,
                        ..
                    },
                ) = (&stored.idem, &stored.event)
                {
                    recovered.idem.push((
                        idem.clone(),
                        turn_id.to_string(),
                        stored.seq,
                        *created_at,
                    ));
                }
                offset += n as u64;
            }
        }
        file.set_len(offset).map_err(|e| StoreError::io(&path, e))?;

        // The ring starts empty: an idle loop costs next to nothing, and
        // readers of older events are served from the file.
        let last = view.next_seq - 1;
        let log = Arc::new(Self {
            path,
            remote,
            state: Mutex::new(State {
                file,
                copy_ok: true,
                len: offset,
                view,
                ring: VecDeque::new(),
                ring_bytes: 0,
                sparse,
            }),
            read_cache: Mutex::new(ReadCache::default()),
            announce: watch::Sender::new(last),
            unsynced: AtomicBool::new(false),
            syncing: AtomicBool::new(false),
            on_write: std::sync::OnceLock::new(),
        });
        Ok((log, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the view under the log's lock (keep `f` short).
    pub fn view<R>(&self, f: impl FnOnce(&LogView) -> R) -> R {
        f(&self.state.lock().expect("log poisoned").view)
    }

    /// Appends events in order with one write; returns the first one's
    /// (seq, turn) (a `user_message` opens its turn).
    /// Nothing changes unless the write succeeds: a failed write leaves the
    /// file, the view and the seqs as they were (and `items` to try again).
    pub fn append(&self, items: &[Append]) -> Result<(u64, Option<usize>), StoreError> {
        BUFFERS.with_borrow_mut(|(lines, scratch, placed)| {
            let appended = self.append_with(items, lines, scratch, placed);
            placed.clear();
            if placed.capacity() > KEEP_BUFFER / 32 {
                *placed = Vec::new();
            }
            // A huge event's buffers are not kept.
            for buffer in [lines, scratch] {
                buffer.clear();
                if buffer.capacity() > KEEP_BUFFER {
                    *buffer = Vec::new();
                }
            }
            appended
        })
    }

    fn append_with(
        &self,
        items: &[Append],
        lines: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        placed: &mut Vec<Placed>,
    ) -> Result<(u64, Option<usize>), StoreError> {
        if let Some(remote) = &self.remote {
            // From synchronous code: the same write, waited for.
            return remote.pg().block(self.append_async(items));
        }
        let guard = self.state.lock().expect("log poisoned");
        let (first, start_len) = (guard.view.next_seq, guard.len);
        let frames = encode_all(items, first, start_len, lines, scratch, placed);
        self.commit(guard, items, first, start_len, lines, placed, frames)
    }

    /// Appends as [`Self::append`] does, waiting for a shared log's
    /// database without holding a thread: the write joins every other
    /// loop's waiting writes in one statement ([`crate::store::group_commit`]).
    pub async fn append_async(&self, items: &[Append]) -> Result<(u64, Option<usize>), StoreError> {
        let Some(remote) = &self.remote else {
            return self.append(items);
        };
        // Writers one at a time; the state's lock is let go meanwhile
        // (readers keep reading).
        let _writing = remote.writing().await;
        let (first, start_len) = {
            let state = self.state.lock().expect("log poisoned");
            (state.view.next_seq, state.len)
        };
        let (mut lines, mut scratch, mut placed) = (Vec::new(), Vec::new(), Vec::new());
        let frames = encode_all(
            items,
            first,
            start_len,
            &mut lines,
            &mut scratch,
            &mut placed,
        );
        // The record first: once the database has them they are the log's,
        // whatever happens to this node's copy.
        remote.append(first, placed.len(), &lines).await?;
        let guard = self.state.lock().expect("log poisoned");
        debug_assert_eq!((guard.view.next_seq, guard.len), (first, start_len));
        self.commit(guard, items, first, start_len, &lines, &placed, frames)
    }

    /// Writes encoded events to the file and takes them in (view, ring),
    /// then announces them.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        mut guard: std::sync::MutexGuard<'_, State>,
        items: &[Append],
        first: u64,
        start_len: u64,
        lines: &[u8],
        placed: &[Placed],
        frames: BytesMut,
    ) -> Result<(u64, Option<usize>), StoreError> {
        let state = &mut *guard;
        let written = if state.copy_ok {
            state.file.write_all(lines)
        } else {
            Ok(())
        };
        let len = lines.len() as u64;
        if let Err(e) = written {
            // Put the file back as it was (a partial write is cut off).
            let _ = state.file.set_len(start_len);
            if self.remote.is_none() {
                return Err(StoreError::io(&self.path, e));
            }
            // The database took them: they are the log's. This node's copy
            // stops here (readers of older events still use it) and is
            // rebuilt from the database at the next start.
            tracing::error!(path = %self.path.display(), error = %e,
                "this node's copy of an event log cannot be written; restart the node to rebuild it");
            state.copy_ok = false;
        }
        let mut first_turn = None;
        // The frames stay slices of one block, so a stream can send a run of
        // them as one slice too.
        let block = frames.freeze();
        let mut at_byte = 0;
        for (i, (item, &(at, offset, frame_len))) in items.iter().zip(placed.iter()).enumerate() {
            let (seq, event) = (first + i as u64, &item.event);
            let frame = block.slice(at_byte..at_byte + frame_len);
            at_byte += frame_len;
            let turn = state.admit(seq, at, offset, event, frame, &block);
            if i == 0 {
                first_turn = turn;
            }
        }
        state.len += len;
        state.trim_ring();
        let last = state.view.next_seq - 1;
        drop(guard);
        self.announce.send_replace(last);
        if let Some(told) = self.on_write.get() {
            told(items);
        }
        Ok((first, first_turn))
    }

    /// Sets what to tell of every batch this node writes (once; later
    /// calls are ignored).
    pub fn on_write(&self, told: impl Fn(&[Append]) + Send + Sync + 'static) {
        let _ = self.on_write.set(Box::new(told));
    }

    /// Makes the turns that ended durable soon: at once if the log was not
    /// synced in the last [`SYNC_EVERY`], else when that is over (turns that
    /// end meanwhile share that one `fdatasync`). Runs on `tasks`; cut short
    /// (with a last sync) when `stopping` fires.
    pub fn sync_soon(self: &Arc<Self>, tasks: &TaskTracker, stopping: &CancellationToken) {
        if self.remote.is_some() {
            return; // the database made them durable as they were written
        }
        self.unsynced.store(true, Ordering::SeqCst);
        if self.syncing.swap(true, Ordering::SeqCst) {
            return; // the running syncer will see it
        }
        let (log, stopping) = (self.clone(), stopping.clone());
        tasks.spawn(async move {
            loop {
                while log.unsynced.swap(false, Ordering::SeqCst) {
                    let syncing = log.clone();
                    let synced = tokio::task::spawn_blocking(move || syncing.sync()).await;
                    if let Ok(Err(err)) = synced {
                        tracing::warn!(error = %err, "could not sync the event log");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(SYNC_EVERY) => {}
                        () = stopping.cancelled() => {}
                    }
                }
                log.syncing.store(false, Ordering::SeqCst);
                // A turn that ended just before the flag went down.
                if !log.unsynced.load(Ordering::SeqCst) || log.syncing.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }

    /// Makes what was written durable (call at turn boundaries, off the hot path).
    pub fn sync(&self) -> Result<(), StoreError> {
        let file = self
            .state
            .lock()
            .expect("log poisoned")
            .file
            .try_clone()
            .map_err(|e| StoreError::io(&self.path, e))?;
        file.sync_data().map_err(|e| StoreError::io(&self.path, e))
    }

    /// A reader of every event with a seq greater than `after`.
    pub fn follow(self: &Arc<Self>, after: u64) -> Follower {
        Follower {
            file_pos: None,
            log: self.clone(),
            next: after + 1,
            announced: self.announce.subscribe(),
        }
    }

    /// A reader positioned at the end, with what `f` makes of the view at
    /// that very point (so a snapshot and the events after it fit together).
    pub fn follow_from_now<R>(self: &Arc<Self>, f: impl FnOnce(&LogView) -> R) -> (R, Follower) {
        let state = self.state.lock().expect("log poisoned");
        let made = f(&state.view);
        let after = state.view.next_seq - 1;
        // Subscribed while holding the lock: no append can slip between.
        let announced = self.announce.subscribe();
        drop(state);
        (
            made,
            Follower {
                file_pos: None,
                log: self.clone(),
                next: after + 1,
                announced,
            },
        )
    }

    /// Events from `from` on that are still in the ring, or `None` if the
    /// ring starts later (the caller reads the file).
    fn read_ring(&self, from: u64) -> Option<Vec<Entry>> {
        let state = self.state.lock().expect("log poisoned");
        let first = state.ring.front().map_or(state.view.next_seq, |e| e.seq);
        if from < first {
            return None;
        }
        let skip = (from - first) as usize;
        let ring = state.ring.iter().skip(skip);
        Some(batch_of(ring, |e: &Entry| &e.frame).cloned().collect())
    }

    /// Events from `from` on that a follower read from the file lately,
    /// with the file offset just past the last.
    fn read_cached(&self, from: u64) -> Option<(Vec<Entry>, u64)> {
        let cache = self.read_cache.lock().expect("read cache poisoned");
        let first = cache.entries.front()?.0.seq;
        let start = usize::try_from(from.checked_sub(first)?).ok()?;
        let mut end = 0;
        let cached = cache.entries.iter().skip(start);
        let batch: Vec<Entry> = batch_of(cached, |(e, _): &(Entry, u64)| &e.frame)
            .map(|(e, past)| {
                end = *past;
                e.clone()
            })
            .collect();
        (!batch.is_empty()).then_some((batch, end))
    }

    /// Keeps what was just read for the next follower (consecutive seqs
    /// only), each event with the offset just past it.
    fn remember(&self, batch: &[(Entry, u64)]) {
        let Some((first, _)) = batch.first() else {
            return;
        };
        let mut cache = self.read_cache.lock().expect("read cache poisoned");
        if cache
            .entries
            .back()
            .is_none_or(|(prev, _)| first.seq != prev.seq + 1)
        {
            *cache = ReadCache::default();
        }
        for (entry, past) in batch {
            cache.bytes += entry.frame.len();
            cache.entries.push_back((entry.clone(), *past));
        }
        while cache.bytes > CACHE_BYTES && cache.entries.len() > 1 {
            let (old, _) = cache.entries.pop_front().expect("more than one");
            cache.bytes -= old.frame.len();
        }
    }

    /// Reads up to `BATCH` events (and about `BATCH_BYTES`) from the file,
    /// starting at seq `from`, from byte `at` when the caller knows where it
    /// is (else from the nearest sparse point). Returns each with the offset
    /// just past it.
    fn read_file(&self, from: u64, at: Option<u64>) -> Result<Vec<(Entry, u64)>, StoreError> {
        let start = at.unwrap_or_else(|| {
            let state = self.state.lock().expect("log poisoned");
            let idx = state.sparse.partition_point(|&(seq, _)| seq <= from);
            if idx == 0 { 0 } else { state.sparse[idx - 1].1 }
        });
        // As an append does: every frame into one block, which they share.
        let mut found = Vec::new();
        let mut frames = BytesMut::new();
        let mut scratch = Vec::new();
        self.scan_lines(start, |line, past| {
            // Lines before `from` are skipped by their seq alone.
            if line_seq(line).is_some_and(|seq| seq < from) {
                return Ok(true);
            }
            let stored = self.parse(line)?;
            if stored.seq >= from {
                let before = frames.len();
                frame_into(stored.seq, &stored.event, &mut scratch, &mut frames);
                found.push((stored, frames.len() - before, past));
            }
            Ok(found.len() < BATCH && frames.len() < BATCH_BYTES)
        })?;
        let block = frames.freeze();
        let state = self.state.lock().expect("log poisoned");
        let mut at_byte = 0;
        Ok(found
            .into_iter()
            .map(|(s, len, past)| {
                let entry = Entry {
                    seq: s.seq,
                    at: s.at,
                    turn: s.event.turn_id().and_then(|t| state.view.turn(t)),
                    terminal: s.event.is_terminal(),
                    frame: block.slice(at_byte..at_byte + len),
                    block: block.clone(),
                };
                at_byte += len;
                (entry, past)
            })
            .collect())
    }

    /// Hands every stored event from byte `offset` on to `take`, one at a
    /// time, until it returns false (for the tests).
    #[cfg(test)]
    pub fn scan_from_offset(
        &self,
        offset: u64,
        mut take: impl FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_lines(offset, |line, _| Ok(take(self.parse(line)?)))
    }

    /// [`Self::scan_from_offset`] up to byte `end` only (from
    /// [`Self::view_with_len`], so what is read matches that view).
    pub fn scan_from_offset_to(
        &self,
        offset: u64,
        end: u64,
        mut take: impl FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_lines_to(offset, end, |line, _| Ok(take(self.parse(line)?)))
    }

    /// A view of the log together with its length in bytes at that moment.
    pub fn view_with_len<R>(&self, f: impl FnOnce(&LogView, u64) -> R) -> R {
        let state = self.state.lock().expect("log poisoned");
        f(&state.view, state.len)
    }

    fn parse(&self, line: &[u8]) -> Result<StoredEvent, StoreError> {
        serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            line: 0,
            column: e.column(),
            message: e.to_string(),
        })
    }

    /// The raw lines from byte `start` up to what was written so far, each
    /// with the offset just past it, until `take` returns false.
    fn scan_lines(
        &self,
        start: u64,
        take: impl FnMut(&[u8], u64) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let end = self.state.lock().expect("log poisoned").len;
        self.scan_lines_to(start, end, take)
    }

    /// [`Self::scan_lines`] up to byte `end` (a length taken earlier).
    fn scan_lines_to(
        &self,
        start: u64,
        end: u64,
        mut take: impl FnMut(&[u8], u64) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut file = File::open(&self.path).map_err(|e| StoreError::io(&self.path, e))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| StoreError::io(&self.path, e))?;
        let mut reader = BufReader::new(file.take(end.saturating_sub(start)));
        let mut line = Vec::new();
        let mut pos = start;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| StoreError::io(&self.path, e))?;
            if n == 0 {
                return Ok(());
            }
            pos += n as u64;
            if !take(&line, pos)? {
                return Ok(());
            }
        }
    }
}

/// The seq of a stored line, read from its start (`{"seq":N,…`) without
/// parsing the rest: how a reader skips what it does not want.
fn line_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Encodes events `first..` (their lines from file offset `start_len`)
/// into `lines`, and their frames into one block; `placed` says where each
/// went. Every line goes into one write, every frame into one buffer that
/// the frames then share: no allocation per event.
fn encode_all(
    items: &[Append],
    first: u64,
    start_len: u64,
    lines: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    placed: &mut Vec<Placed>,
) -> BytesMut {
    lines.clear();
    placed.clear();
    let mut frames = BytesMut::with_capacity(items.len() * 96);
    for (i, item) in items.iter().enumerate() {
        let seq = first + i as u64;
        let at = (!item.event.is_delta()).then(crate::ids::now);
        let offset = start_len + lines.len() as u64;
        let before = frames.len();
        let idem = item.idem.as_ref();
        encode_into(seq, at, idem, &item.event, scratch, lines, &mut frames);
        placed.push((at, offset, frames.len() - before));
    }
    frames
}

/// The events that close `turns` with an error `code`.
pub fn closing(turns: Vec<String>, code: &str) -> Vec<Append> {
    let message = match code {
        "node_lost" => {
            "the node running this turn stopped answering; another node took the loop over"
        }
        _ => "the server stopped while this turn was running",
    };
    turns
        .into_iter()
        .map(|turn_id| {
            Event::Error {
                turn_id: Some(turn_id.into()),
                code: code.into(),
                message: message.into(),
            }
            .into()
        })
        .collect()
}

fn at_eof(reader: &mut BufReader<&mut File>) -> bool {
    reader.fill_buf().map(|b| b.is_empty()).unwrap_or(true)
}

/// Reads a log in seq order from a starting point, waiting for new events.
pub struct Follower {
    log: Arc<EventLog>,
    next: u64,
    /// Where in the file event `.0` starts, when known: the next file read
    /// goes on from there instead of re-reading from a sparse point.
    file_pos: Option<(u64, u64)>,
    announced: watch::Receiver<u64>,
}

impl Follower {
    /// The next events (at least one), waiting until there are some.
    pub async fn next_batch(&mut self) -> Result<Vec<Entry>, StoreError> {
        loop {
            // Marked seen before looking, so an append after the look wakes us.
            let last = *self.announced.borrow_and_update();
            if self.next <= last {
                let batch = match self.log.read_ring(self.next) {
                    Some(batch) => batch,
                    None => self.read_file().await?,
                };
                if let Some(last) = batch.last() {
                    self.next = last.seq + 1;
                    return Ok(batch);
                }
            }
            if self.announced.changed().await.is_err() {
                // The log is gone (its loop was dropped); nothing more will come.
                return Ok(Vec::new());
            }
        }
    }

    /// The next batch from the file: shared with other followers when one
    /// of them just read it, else read under the global file-read pool.
    async fn read_file(&mut self) -> Result<Vec<Entry>, StoreError> {
        let from = self.next;
        let at = self
            .file_pos
            .filter(|(seq, _)| *seq == from)
            .map(|(_, at)| at);
        let (batch, end) = match self.log.read_cached(from) {
            Some(cached) => cached,
            None => {
                let log = self.log.clone();
                in_read_pool(move || {
                    // Another follower may have read it while this one waited.
                    if let Some(cached) = log.read_cached(from) {
                        return Ok::<_, StoreError>(cached);
                    }
                    let read = log.read_file(from, at)?;
                    log.remember(&read);
                    let end = read.last().map_or(0, |(_, end)| *end);
                    Ok((read.into_iter().map(|(e, _)| e).collect(), end))
                })
                .await?
            }
        };
        self.file_pos = batch.last().map(|e| (e.seq + 1, end));
        Ok(batch)
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// The seq this reader will return next.
    pub fn position(&self) -> u64 {
        self.next
    }
}

/// Events to append, for the runtime's tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Append;
    use crate::runtime::events::Event;

    pub fn said(t: &str, content: &str) -> Append {
        Event::UserMessage {
            turn_id: t.into(),
            content: content.into(),
            created_at: chrono::Utc::now(),
        }
        .into()
    }

    pub fn user(t: &str) -> Append {
        said(t, "hi")
    }

    pub fn started(t: &str) -> Append {
        Event::Started {
            turn_id: t.into(),
            cold_start: false,
            origin: None,
            history_lost: false,
        }
        .into()
    }

    pub fn delta(t: &str, text: &str) -> Append {
        Event::AssistantDelta {
            turn_id: t.into(),
            text: text.into(),
        }
        .into()
    }

    pub fn done(t: &str) -> Append {
        Event::Done {
            turn_id: t.into(),
            usage: None,
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_write_changes_nothing_and_the_next_one_continues_the_seqs() {
        use super::fixtures::said;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (log, _) = EventLog::open(path.clone()).unwrap();
        log.append(&[said("t1", "one")]).unwrap();
        let writable = {
            let mut state = log.state.lock().unwrap();
            let read_only = File::open(&path).unwrap();
            std::mem::replace(&mut state.file, read_only)
        };
        assert!(log.append(&[said("t2", "lost")]).is_err());
        assert_eq!(log.view(|v| (v.next_seq, v.turns.len())), (2, 1));
        log.state.lock().unwrap().file = writable;
        let written = log.append(&[said("t3", "three")]).unwrap();
        assert_eq!(written, (2, Some(1)), "no seq was skipped");
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 2);
        assert!(!lines.contains("lost"));
    }

    use super::*;

    use super::fixtures::{delta, started, user};

    #[test]
    fn a_lines_seq_is_read_from_its_start() {
        assert_eq!(
            line_seq(br#"{"seq":42,"at":null,"event":"done"}"#),
            Some(42)
        );
        assert_eq!(line_seq(br#"{"seq":7}"#), Some(7));
        assert_eq!(line_seq(br#"{"at":1,"seq":7}"#), None);
        assert_eq!(line_seq(b"garbage"), None);
    }

    #[test]
    fn a_read_from_a_known_offset_equals_one_from_the_sparse_index() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(dir.path().join("events.jsonl")).unwrap();
        let mut items = vec![user("t1"), started("t1")];
        items.extend((0..600).map(|i| delta("t1", &format!("d{i}"))));
        log.append(&items).unwrap();
        let from_index = log.read_file(1, None).unwrap();
        let (last, end) = from_index.last().unwrap().clone();
        let next_by_index = log.read_file(last.seq + 1, None).unwrap();
        let next_by_offset = log.read_file(last.seq + 1, Some(end)).unwrap();
        let seqs = |b: &[(Entry, u64)]| {
            b.iter()
                .map(|(e, at)| (e.seq, *at, e.frame.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&next_by_index), seqs(&next_by_offset));
        assert_eq!(next_by_offset[0].0.seq, last.seq + 1);
    }

    #[tokio::test]
    async fn batches_are_bounded_by_bytes_and_followers_share_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (log, _) = EventLog::open(path.clone()).unwrap();
        let big = "x".repeat(100 * 1024);
        let mut items = vec![user("t1"), started("t1")];
        items.extend((0..40).map(|_| delta("t1", &big)));
        log.append(&items).unwrap();
        // The ring holds the newest events only: the start is read from the file.
        assert!(log.read_ring(1).is_none());
        let (mut a, mut b) = (log.follow(0), log.follow(0));
        // The second follower gets the very frames the first one read (no
        // copy, no second read) while the cache has them.
        let first_a = a.next_batch().await.unwrap();
        let first_b = b.next_batch().await.unwrap();
        assert_eq!(first_a[0].seq, first_b[0].seq);
        assert_eq!(first_a[0].frame.as_ptr(), first_b[0].frame.as_ptr());
        let mut seen = first_a.len();
        while seen < 42 {
            let batch = a.next_batch().await.unwrap();
            let bytes: usize = batch.iter().map(|e| e.frame.len()).sum();
            assert!(
                batch.len() == 1 || bytes <= BATCH_BYTES + big.len(),
                "{} events, {bytes} bytes",
                batch.len()
            );
            seen += batch.len();
        }
        let cache = log.read_cache.lock().unwrap();
        let cached: usize = cache.entries.iter().map(|(e, _)| e.frame.len()).sum();
        assert_eq!(cached, cache.bytes, "the running count is the sum");
        assert!(cached <= CACHE_BYTES + big.len(), "{cached}");
    }

    #[test]
    fn seqs_are_consecutive_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (log, _) = EventLog::open(path.clone()).unwrap();
        let got = log
            .append(&[user("t1"), started("t1"), delta("t1", "a")])
            .unwrap();
        assert_eq!(got, (1, Some(0)));
        assert_eq!(
            log.view(|v| v.next_seq),
            4,
            "the three took seqs 1, 2 and 3"
        );
        log.append(&[Event::Done {
            turn_id: "t1".into(),
            usage: None,
        }
        .into()])
            .unwrap();
        drop(log);
        let (log, rec) = EventLog::open(path).unwrap();
        assert_eq!(rec.closed, 0);
        assert_eq!(log.view(|v| v.next_seq), 5);
        assert_eq!(log.append(&[user("t2")]).unwrap().0, 5);
    }

    #[test]
    fn unfinished_turns_are_closed_at_open_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (log, _) = EventLog::open(path.clone()).unwrap();
        log.append(&[user("t1"), started("t1"), delta("t1", "a"), user("t2")])
            .unwrap();
        drop(log);
        // A crash in the middle of a write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":5,\"event\":\"assistant_del")
            .unwrap();
        drop(f);
        let (log, rec) = EventLog::open(path.clone()).unwrap();
        assert_eq!(rec.closed, 2);
        assert!(log.view(|v| v.unfinished().is_empty() && !v.busy()));
        let mut all = Vec::new();
        log.scan_from_offset(0, |e| {
            all.push(e);
            true
        })
        .unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(all[4].seq, 5);
        assert!(matches!(&all[4].event, Event::Error { code, .. } if code == "server_restarted"));
        assert!(matches!(&all[5].event, Event::Error { turn_id: Some(t), .. } if t == "t2"));
    }

    #[test]
    fn a_damaged_line_in_the_middle_stops_with_its_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (log, _) = EventLog::open(path.clone()).unwrap();
        log.append(&[user("t1"), started("t1")]).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let broken = format!("garbage\n{text}");
        std::fs::write(&path, &broken).unwrap();
        let err = EventLog::open(path.clone()).err().unwrap();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
    }

    #[tokio::test]
    async fn a_follower_sees_every_event_once_even_far_behind_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(dir.path().join("events.jsonl")).unwrap();
        log.append(&[user("t"), started("t")]).unwrap();
        let mut late = log.follow(0);
        let total = RING_EVENTS as u64 * 3;
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..total {
                    log.append(&[delta("t", &format!("{i} "))]).unwrap();
                    if i % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.append(&[Event::Done {
                    turn_id: "t".into(),
                    usage: None,
                }
                .into()])
                    .unwrap();
            })
        };
        writer.await.unwrap();
        let mut seqs = vec![];
        loop {
            let batch = late.next_batch().await.unwrap();
            let done = batch.iter().any(|e| e.terminal);
            seqs.extend(batch.iter().map(|e| e.seq));
            if done {
                break;
            }
        }
        let want: Vec<u64> = (1..=total + 3).collect();
        assert_eq!(seqs, want);
    }

    #[tokio::test]
    async fn follow_from_now_pairs_the_view_with_what_comes_after() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(dir.path().join("events.jsonl")).unwrap();
        log.append(&[user("t"), started("t"), delta("t", "so far")])
            .unwrap();
        let (text, mut follower) =
            log.follow_from_now(|v| v.current.as_ref().unwrap().text.clone());
        assert_eq!(text, "so far");
        log.append(&[delta("t", " more")]).unwrap();
        let batch = follower.next_batch().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].seq, 4);
    }
}
