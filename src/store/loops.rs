//! `loops/<uuid>/meta.json`: the loop resources, indexed in memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Pg, StoreError, write_atomic};
use crate::ids;

/// `loop_<uuid>`; the directory on disk is the bare uuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoopId(pub Uuid);

impl LoopId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for LoopId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for LoopId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loop_{}", self.0)
    }
}

impl FromStr for LoopId {
    type Err = ();
    /// Only the canonical form (`loop_` + lowercase hyphenated uuid) is an id.
    fn from_str(s: &str) -> Result<Self, ()> {
        let uuid = Uuid::parse_str(s.strip_prefix("loop_").ok_or(())?).map_err(|_| ())?;
        let id = Self(uuid);
        (id.to_string() == s).then_some(id).ok_or(())
    }
}

impl Serialize for LoopId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LoopId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom(format!("`{s}` is not a loop id")))
    }
}

/// A loop as stored in its `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopRecord {
    pub id: LoopId,
    pub title: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub archived: bool,
    pub archived_at: Option<DateTime<Utc>>,
    pub metadata: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub vault: String,
    pub repo: Option<String>,
    /// When a message last arrived (or creation): the list order.
    pub last_active_at: DateTime<Utc>,
    /// The agent's conversation id, for resuming after a reclaim or restart.
    #[serde(default)]
    pub agent_session_id: Option<String>,
}

impl LoopRecord {
    fn sort_key(&self) -> (DateTime<Utc>, LoopId) {
        (self.last_active_at, self.id)
    }
}

/// What a new loop is made from (already validated).
#[derive(Debug, Clone)]
pub struct NewLoop {
    pub title: String,
    pub created_by: String,
    pub metadata: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub vault: String,
    pub repo: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub limit: usize,
    /// Only loops whose title holds this (ignoring case).
    pub title_contains: Option<String>,
    pub after: Option<LoopId>,
    pub before: Option<LoopId>,
}

#[derive(Debug, Clone)]
pub struct LoopPage {
    /// Most recently active first.
    pub data: Vec<LoopRecord>,
    pub has_more: bool,
}

pub struct LoopStore {
    dir: PathBuf,
    /// Where records are kept: `meta.json` files, or the shared database
    /// (then `dir` holds only this node's workspaces and logs' copies).
    pg: Option<Arc<Pg>>,
    work_root: Option<PathBuf>,
    index: super::loops_pg::Index,
    versions: super::loops_pg::Versions,
    /// Serializes writers so `meta.json` always holds the newest version;
    /// also guards which loops' activity is not on disk yet.
    writer: Mutex<Touched>,
}

/// Activity recorded in memory and not yet in `meta.json`, and when each
/// loop's was last written.
#[derive(Default)]
struct Touched {
    written: HashMap<LoopId, std::time::Instant>,
    dirty: std::collections::HashSet<LoopId>,
}

/// A loop's activity is written to `meta.json` at most this often; in
/// between it is kept in memory (listings use it at once) and written by
/// [`LoopStore::flush_touches`].
pub const TOUCH_WRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl LoopStore {
    /// Loads every `loops/*/meta.json`. One that cannot be parsed is an error
    /// naming it; a directory without `meta.json` (a create cut short by a
    /// crash) is skipped with a warning.
    pub fn open(dir: PathBuf) -> Result<Self, StoreError> {
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let mut index = HashMap::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
            let name = entry.file_name();
            let Some(uuid) = name.to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            let meta = entry.path().join("meta.json");
            let bytes = match fs::read(&meta) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %entry.path().display(), "loop directory without meta.json, skipped");
                    continue;
                }
                Err(e) => return Err(StoreError::io(&meta, e)),
            };
            let record: LoopRecord =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: meta.clone(),
                    line: e.line(),
                    column: e.column(),
                    message: e.to_string(),
                })?;
            if record.id.0 != uuid {
                return Err(StoreError::Corrupt {
                    path: meta,
                    line: 1,
                    column: 1,
                    message: format!("its id {} does not match its directory", record.id),
                });
            }
            index.insert(record.id, record);
        }
        Ok(Self {
            dir,
            pg: None,
            work_root: None,
            index: Arc::new(RwLock::new(index)),
            versions: Default::default(),
            writer: Mutex::new(Touched::default()),
        })
    }

    /// Loop records in the shared database; `dir` is this node's own
    /// directory for the loops' workspaces. Follows the change feed, so a
    /// loop made or changed by any node is seen here.
    pub fn open_pg(dir: PathBuf, pg: Arc<Pg>) -> Result<Self, StoreError> {
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let (index, highest) = pg.block(super::loops_pg::load_all(&pg))?;
        let index = Arc::new(RwLock::new(index));
        let versions = super::loops_pg::Versions::default();
        super::loops_pg::follow(&pg, index.clone(), versions.clone(), highest);
        Ok(Self {
            dir,
            pg: Some(pg),
            work_root: None,
            index,
            versions,
            writer: Mutex::new(Touched::default()),
        })
    }

    /// Writes a record where records are kept (on Postgres, noting the
    /// version it got, so the change feed does not put an older one back).
    /// Writes a record's last activity: the whole `meta.json` on files; on
    /// the database only `last_active_at`, moved forward, so a copy of the
    /// record that is behind another node's change never writes over it.
    fn persist_activity(&self, record: &LoopRecord) -> Result<(), StoreError> {
        match &self.pg {
            None => write_meta(&self.meta_path(record.id), record),
            Some(pg) => {
                let moved =
                    pg.block(super::loops_pg::touch(pg, record.id, record.last_active_at))?;
                if let Some((fresh, version)) = moved {
                    // The record as it is now, other nodes' changes with it:
                    // the feed skips this version (and any before it).
                    self.take_fresh(fresh, version);
                }
                Ok(())
            }
        }
    }

    /// Puts a record just read from the database at `version` into the
    /// index, unless the feed brought a newer one meanwhile; activity this
    /// node noted but has not written yet stays. The feed never puts an
    /// older version back either. Returns the record as indexed.
    fn take_fresh(&self, mut record: LoopRecord, version: i64) -> LoopRecord {
        let mut index = self.index.write().expect("loop index poisoned");
        let mut versions = self.versions.lock().expect("versions poisoned");
        let known = versions.entry(record.id).or_insert(version);
        if *known > version
            && let Some(newer) = index.get(&record.id)
        {
            return newer.clone();
        }
        *known = version;
        if let Some(noted) = index.get(&record.id) {
            record.last_active_at = record.last_active_at.max(noted.last_active_at);
        }
        index.insert(record.id, record.clone());
        record
    }

    pub fn loop_dir(&self, id: LoopId) -> PathBuf {
        self.dir.join(id.0.to_string())
    }

    /// Where the loop's workspace and agent home are: under
    /// `--workspace-root` when given (storage several nodes may share),
    /// else in [`Self::loop_dir`].
    pub fn work_dir(&self, id: LoopId) -> PathBuf {
        match &self.work_root {
            Some(root) => root.join(id.0.to_string()),
            None => self.loop_dir(id),
        }
    }

    /// Keeps workspaces and agent homes under `root` instead.
    pub fn with_work_root(mut self, root: Option<PathBuf>) -> Self {
        self.work_root = root;
        self
    }

    fn meta_path(&self, id: LoopId) -> PathBuf {
        self.loop_dir(id).join("meta.json")
    }

    pub fn create(&self, new: NewLoop) -> Result<LoopRecord, StoreError> {
        self.create_within(new, usize::MAX)
    }

    /// Creates a loop unless its creator already has `max_active` loops
    /// that are not archived.
    pub fn create_within(&self, new: NewLoop, max_active: usize) -> Result<LoopRecord, StoreError> {
        let now = ids::now();
        let record = LoopRecord {
            id: LoopId::new(),
            title: new.title,
            created_at: now,
            created_by: new.created_by,
            archived: false,
            archived_at: None,
            metadata: new.metadata,
            profiles: new.profiles,
            vault: new.vault,
            repo: new.repo,
            last_active_at: now,
            agent_session_id: None,
        };
        let _w = self.writer.lock().expect("loop writer poisoned");
        let refused = match &self.pg {
            None => {
                let active = self
                    .index
                    .read()
                    .expect("loop index poisoned")
                    .values()
                    .filter(|r| r.created_by == record.created_by && !r.archived)
                    .count();
                (active >= max_active).then_some(active)
            }
            Some(pg) => match pg.block(super::loops_pg::insert_within(pg, &record, max_active))? {
                Ok(version) => {
                    self.versions
                        .lock()
                        .expect("versions poisoned")
                        .insert(record.id, version);
                    None
                }
                Err(active) => Some(active),
            },
        };
        if let Some(active) = refused {
            return Err(StoreError::Full(
                "too_many_loops",
                format!(
                    "you have {active} loops that are not archived, as many as one user may \
                     (--max-loops-per-user); archive some first"
                ),
                super::RETRY_AFTER_FREEING,
            ));
        }
        let dir = self.loop_dir(record.id);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        if self.pg.is_none() {
            write_meta(&self.meta_path(record.id), &record)?;
        }
        self.index
            .write()
            .expect("loop index poisoned")
            .insert(record.id, record.clone());
        Ok(record)
    }

    /// Every loop's id.
    pub fn ids(&self) -> Vec<LoopId> {
        self.index
            .read()
            .expect("loop index poisoned")
            .keys()
            .copied()
            .collect()
    }

    /// How many loops are not archived.
    pub fn count_active(&self) -> usize {
        let index = self.index.read().expect("loop index poisoned");
        index.values().filter(|r| !r.archived).count()
    }

    pub fn get(&self, id: LoopId) -> Option<LoopRecord> {
        self.index
            .read()
            .expect("loop index poisoned")
            .get(&id)
            .cloned()
    }

    /// Applies `change` to the loop, writes `meta.json`, and returns the new
    /// record; `None` if there is no such loop.
    pub fn update(
        &self,
        id: LoopId,
        change: impl FnOnce(&mut LoopRecord) + Send,
    ) -> Result<Option<LoopRecord>, StoreError> {
        let _w = self.writer.lock().expect("loop writer poisoned");
        if let Some(pg) = &self.pg {
            // Changed where the record is, under its row lock.
            let Some((record, version)) = pg.block(super::loops_pg::update(pg, id, change))? else {
                return Ok(None);
            };
            let record = self.take_fresh(record, version);
            return Ok(Some(record));
        }
        let Some(mut record) = self.get(id) else {
            return Ok(None);
        };
        let before = record.clone();
        change(&mut record);
        if record != before {
            write_meta(&self.meta_path(id), &record)?;
            self.index
                .write()
                .expect("loop index poisoned")
                .insert(id, record.clone());
        }
        Ok(Some(record))
    }

    /// Records activity on a loop (a message): at once in memory, on disk at
    /// most every [`TOUCH_WRITE_EVERY`] per loop, so a busy loop does not
    /// rewrite and fsync its `meta.json` for every message.
    pub fn touch(&self, id: LoopId, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut touched = self.writer.lock().expect("loop writer poisoned");
        let record = {
            let mut index = self.index.write().expect("loop index poisoned");
            let Some(record) = index.get_mut(&id) else {
                return Ok(());
            };
            record.last_active_at = at;
            record.clone()
        };
        let now = std::time::Instant::now();
        if touched
            .written
            .get(&id)
            .is_some_and(|w| now.duration_since(*w) < TOUCH_WRITE_EVERY)
        {
            touched.dirty.insert(id);
            return Ok(());
        }
        if let Err(err) = self.persist_activity(&record) {
            touched.dirty.insert(id); // the next flush tries again
            return Err(err);
        }
        touched.written.insert(id, now);
        touched.dirty.remove(&id);
        Ok(())
    }

    /// Writes the activity [`Self::touch`] kept in memory (periodically and at shutdown).
    /// One loop at a time, so other writers wait for one fsync at most; a
    /// loop whose write fails stays to be tried again.
    pub fn flush_touches(&self) -> Result<(), StoreError> {
        let dirty: Vec<LoopId> = {
            let touched = self.writer.lock().expect("loop writer poisoned");
            touched.dirty.iter().copied().collect()
        };
        let mut failed = None;
        for id in dirty {
            let mut touched = self.writer.lock().expect("loop writer poisoned");
            if !touched.dirty.contains(&id) {
                continue; // written meanwhile
            }
            let Some(record) = self.get(id) else {
                touched.dirty.remove(&id);
                continue;
            };
            match self.persist_activity(&record) {
                Ok(()) => {
                    touched.dirty.remove(&id);
                    touched.written.insert(id, std::time::Instant::now());
                }
                Err(err) => failed = Some(err),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Forgets a loop whose creation could not be completed, and its files.
    pub fn discard(&self, id: LoopId) {
        let mut w = self.writer.lock().expect("loop writer poisoned");
        w.written.remove(&id);
        w.dirty.remove(&id);
        self.index.write().expect("loop index poisoned").remove(&id);
        if let Some(pg) = &self.pg
            && let Err(err) = pg.block(super::loops_pg::delete(pg, id))
        {
            tracing::warn!(error = %err, loop_id = %id, "could not remove an unused loop record");
        }
        let _ = fs::remove_dir_all(self.loop_dir(id));
    }

    /// One page of a user's loops, most recently active first. `after` gives
    /// the loops just older than that loop, `before` those just newer (the
    /// nearest ones), both still newest first.
    pub fn list(
        &self,
        user: &str,
        include_archived: bool,
        page: &PageRequest,
    ) -> Result<LoopPage, StoreError> {
        let index = self.index.read().expect("loop index poisoned");
        let cursor_key = |id: Option<LoopId>| -> Result<_, StoreError> {
            id.map(|id| {
                index
                    .get(&id)
                    .filter(|r| r.created_by == user)
                    .map(LoopRecord::sort_key)
                    .ok_or_else(|| {
                        StoreError::Invalid(
                            "invalid_cursor",
                            format!("`{id}` is not one of your loops"),
                        )
                    })
            })
            .transpose()
        };
        let after = cursor_key(page.after)?;
        let before = cursor_key(page.before)?;
        let needle = page.title_contains.as_deref().map(str::to_lowercase);
        let mut mine: Vec<&LoopRecord> = index
            .values()
            .filter(|r| r.created_by == user && (include_archived || !r.archived))
            .filter(|r| {
                needle
                    .as_deref()
                    .is_none_or(|n| r.title.to_lowercase().contains(n))
            })
            .filter(|r| after.is_none_or(|k| r.sort_key() < k))
            .filter(|r| before.is_none_or(|k| r.sort_key() > k))
            .collect();
        mine.sort_unstable_by_key(|r| std::cmp::Reverse(r.sort_key()));
        let limit = page.limit.max(1);
        let has_more = mine.len() > limit;
        let window = if page.before.is_some() && page.after.is_none() {
            &mine[mine.len().saturating_sub(limit)..]
        } else {
            &mine[..mine.len().min(limit)]
        };
        Ok(LoopPage {
            data: window.iter().map(|r| (*r).clone()).collect(),
            has_more,
        })
    }
}

fn write_meta(path: &Path, record: &LoopRecord) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(record).expect("a loop record serializes");
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_kept_in_memory_between_writes_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoopStore::open(dir.path().to_owned()).unwrap();
        let id = store.create(new_loop("alice", "a")).unwrap().id;
        let on_disk = || {
            LoopStore::open(dir.path().to_owned())
                .unwrap()
                .get(id)
                .unwrap()
                .last_active_at
        };
        let t1 = Utc::now() + chrono::Duration::seconds(10);
        let t2 = t1 + chrono::Duration::seconds(10);
        store.touch(id, t1).unwrap();
        assert_eq!(on_disk(), t1, "the first touch is written");
        store.touch(id, t2).unwrap();
        assert_eq!(
            store.get(id).unwrap().last_active_at,
            t2,
            "in memory at once"
        );
        assert_eq!(on_disk(), t1, "not rewritten within the window");
        store.flush_touches().unwrap();
        assert_eq!(on_disk(), t2);
    }

    fn new_loop(user: &str, title: &str) -> NewLoop {
        NewLoop {
            title: title.into(),
            created_by: user.into(),
            metadata: BTreeMap::new(),
            profiles: vec![],
            vault: "default".into(),
            repo: None,
        }
    }

    fn titles(page: &LoopPage) -> Vec<&str> {
        page.data.iter().map(|r| r.title.as_str()).collect()
    }

    #[test]
    fn loop_ids_parse_only_in_canonical_form() {
        let id = LoopId::new();
        assert_eq!(id.to_string().parse::<LoopId>(), Ok(id));
        assert!(id.0.to_string().parse::<LoopId>().is_err());
        assert!(format!("loop_{}", id.0.simple()).parse::<LoopId>().is_err());
        assert!(id.to_string().to_uppercase().parse::<LoopId>().is_err());
    }

    #[test]
    fn create_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoopStore::open(dir.path().join("loops")).unwrap();
        let rec = store.create(new_loop("alice", "one")).unwrap();
        let archived = store
            .update(rec.id, |r| {
                r.archived = true;
                r.archived_at = Some(ids::now());
            })
            .unwrap()
            .unwrap();
        let reopened = LoopStore::open(dir.path().join("loops")).unwrap();
        assert_eq!(reopened.get(rec.id), Some(archived));
        assert!(store.update(LoopId::new(), |_| {}).unwrap().is_none());
    }

    #[test]
    fn corrupt_meta_stops_loading_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoopStore::open(dir.path().join("loops")).unwrap();
        let rec = store.create(new_loop("alice", "one")).unwrap();
        let meta = store.loop_dir(rec.id).join("meta.json");
        fs::write(&meta, "{\"id\": ").unwrap();
        let err = LoopStore::open(dir.path().join("loops")).err().unwrap();
        assert!(
            err.to_string().contains(&meta.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn pages_newest_first_with_cursors_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoopStore::open(dir.path().join("loops")).unwrap();
        let mut ids = vec![];
        for i in 0..5 {
            ids.push(
                store
                    .create(new_loop("alice", &format!("l{i}")))
                    .unwrap()
                    .id,
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        store.create(new_loop("bob", "bob's")).unwrap();
        let page = |after, before, limit| {
            store
                .list(
                    "alice",
                    false,
                    &PageRequest {
                        title_contains: None,
                        limit,
                        after,
                        before,
                    },
                )
                .unwrap()
        };
        let first = page(None, None, 2);
        assert_eq!(titles(&first), ["l4", "l3"]);
        assert!(first.has_more);
        let second = page(Some(ids[3]), None, 2);
        assert_eq!(titles(&second), ["l2", "l1"]);
        assert!(second.has_more);
        let last = page(Some(ids[1]), None, 2);
        assert_eq!(titles(&last), ["l0"]);
        assert!(!last.has_more);
        // before: the nearest newer ones, still newest first.
        let back = page(None, Some(ids[1]), 2);
        assert_eq!(titles(&back), ["l3", "l2"]);
        assert!(back.has_more);
        let top = page(None, Some(ids[3]), 2);
        assert_eq!(titles(&top), ["l4"]);
        assert!(!top.has_more);

        // Activity reorders; archived loops are hidden unless asked for.
        store
            .update(ids[0], |r| r.last_active_at = ids::now())
            .unwrap();
        store.update(ids[4], |r| r.archived = true).unwrap();
        assert_eq!(titles(&page(None, None, 10)), ["l0", "l3", "l2", "l1"]);
        let all = store
            .list(
                "alice",
                true,
                &PageRequest {
                    title_contains: None,
                    limit: 10,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(all.data.len(), 5);

        // Someone else's loop is no cursor.
        let bobs = store
            .list(
                "bob",
                false,
                &PageRequest {
                    title_contains: None,
                    limit: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        let err = store
            .list(
                "alice",
                false,
                &PageRequest {
                    title_contains: None,
                    limit: 1,
                    after: Some(bobs.data[0].id),
                    before: None,
                },
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid("invalid_cursor", _)));
    }
}
