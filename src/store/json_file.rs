//! One small collection shared by the server and the CLI, cached in memory.
//! On files: reloaded when another process replaced the file, changed under
//! an advisory lock and replaced atomically (temp file in the same
//! directory, fsync, rename). On Postgres: one JSON document per
//! collection, changed inside a transaction that locks its row, and
//! reloaded by every node when the change feed says it changed.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::types::Json;

use super::StoreError;
use super::pg::Pg;

/// The channel a changed document is announced on (payload: its name).
const CHANNEL: &str = "loopd_documents";

/// Identifies one version of a file: any atomic replace changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// Which version the cached value is: a file's stamp, or a row's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// The file (or row) does not exist.
    Missing,
    File(Stamp),
    Row(i64),
}

struct Cached<T> {
    value: Arc<T>,
    version: Version,
    /// A version that failed to parse, remembered so it is reported only once.
    bad: Option<Version>,
}

/// Where a collection lives.
pub enum Place {
    File { path: PathBuf, lock: PathBuf },
    Pg { pg: Arc<Pg>, name: &'static str },
}

pub struct JsonStore<T> {
    place: Place,
    cache: Arc<Mutex<Cached<T>>>,
    /// On Postgres: when a reader last went to the database itself.
    fetched: Mutex<Option<std::time::Instant>>,
}

/// A reader that misses something goes to the database at most this often
/// (a flood of unknown tokens costs a few queries a second, not one each).
const FETCH_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl<T> JsonStore<T>
where
    T: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static,
{
    /// Loads the file (a missing file is the empty default). A file that
    /// exists but cannot be parsed is an error naming it; it is left untouched.
    pub fn open(path: PathBuf, lock_path: PathBuf) -> Result<Self, StoreError> {
        Self::open_in(Place::File {
            path,
            lock: lock_path,
        })
    }

    /// Loads the collection from where it lives. On Postgres, the store then
    /// follows the change feed (a change by any node or the CLI is seen
    /// within [`super::pg::POLL_EVERY`], usually at once).
    pub fn open_in(place: Place) -> Result<Self, StoreError> {
        let (value, version) = match &place {
            Place::File { path, .. } => match load::<T>(path)? {
                Some((value, stamp)) => (value, Version::File(stamp)),
                None => (T::default(), Version::Missing),
            },
            Place::Pg { pg, name } => match pg.block(load_row::<T>(pg, name))? {
                Some((value, version)) => (value, Version::Row(version)),
                None => (T::default(), Version::Missing),
            },
        };
        let cache = Arc::new(Mutex::new(Cached {
            value: Arc::new(value),
            version,
            bad: None,
        }));
        if let Place::Pg { pg, name } = &place {
            // Weak: the database's list of watchers must not keep it alive.
            let (pg2, cache2, name) = (Arc::downgrade(pg), cache.clone(), *name);
            pg.watch(
                CHANNEL,
                Arc::new(move |payload: Option<String>| {
                    let (pg, cache) = (pg2.clone(), cache2.clone());
                    Box::pin(async move {
                        let Some(pg) = pg.upgrade() else { return };
                        if payload.as_deref().is_none_or(|p| p == name) {
                            refresh_row(&pg, name, &cache).await;
                        }
                    })
                }),
            );
        }
        Ok(Self {
            place,
            cache,
            fetched: Mutex::new(None),
        })
    }

    /// [`Self::read`], but on Postgres, when `lacks` says the copy lacks
    /// what the caller looks for (a token made on another node a moment
    /// ago), the document is fetched first: what any node wrote is there
    /// at once, not only when the change feed brings it.
    pub fn read_having(&self, lacks: impl Fn(&T) -> bool) -> Arc<T> {
        let value = self.read();
        let Place::Pg { pg, name } = &self.place else {
            return value;
        };
        if !lacks(&value) {
            return value;
        }
        {
            let mut fetched = self.fetched.lock().expect("fetched poisoned");
            let now = std::time::Instant::now();
            if fetched.is_some_and(|at| now.duration_since(at) < FETCH_AT_MOST_EVERY) {
                return value;
            }
            *fetched = Some(now);
        }
        pg.block(refresh_row(pg, name, &self.cache));
        self.read()
    }

    /// Where it lives, for messages.
    pub fn path(&self) -> PathBuf {
        match &self.place {
            Place::File { path, .. } => path.clone(),
            Place::Pg { name, .. } => PathBuf::from(format!("database document {name}")),
        }
    }

    /// The current contents. On files, reloaded first if another process
    /// changed the file (one `stat` when nothing changed); on Postgres, as
    /// the change feed last brought it. If a new version cannot be parsed,
    /// the last good contents keep being served and the problem is logged once.
    pub fn read(&self) -> Arc<T> {
        let Place::File { path, .. } = &self.place else {
            return self
                .cache
                .lock()
                .expect("store cache poisoned")
                .value
                .clone();
        };
        let current = match fs::metadata(path) {
            Ok(m) => Version::File(Stamp::of(&m)),
            Err(_) => Version::Missing,
        };
        let mut cache = self.cache.lock().expect("store cache poisoned");
        if current == cache.version || Some(current) == cache.bad {
            return cache.value.clone();
        }
        match load::<T>(path) {
            Ok(Some((value, stamp))) => {
                cache.value = Arc::new(value);
                cache.version = Version::File(stamp);
            }
            Ok(None) => {
                cache.value = Arc::new(T::default());
                cache.version = Version::Missing;
            }
            Err(err) => {
                tracing::error!(error = %err, "keeping the last good copy");
                cache.bad = Some(current);
            }
        }
        cache.value.clone()
    }

    /// Read-modify-write that never loses a concurrent writer's change (the
    /// CLI's, another node's): under the directory's write lock, or in a
    /// transaction holding the document's row. `change` sees the latest
    /// contents; if it returns `Err`, nothing is written.
    pub fn update<R, E>(&self, change: impl FnOnce(&mut T) -> Result<R, E> + Send) -> Result<R, E>
    where
        R: Send,
        E: From<StoreError> + Send,
    {
        match &self.place {
            Place::File { path, lock } => {
                let _guard = WriteLock::acquire(lock)?;
                let mut value = match load::<T>(path)? {
                    Some((value, _)) => value,
                    None => T::default(),
                };
                let out = change(&mut value)?;
                let mut bytes = serde_json::to_vec_pretty(&value).map_err(|e| {
                    StoreError::io(path, std::io::Error::new(ErrorKind::InvalidData, e))
                })?;
                bytes.push(b'\n');
                let stamp = write_stamped(path, &bytes)?;
                self.cached(value, Version::File(stamp));
                Ok(out)
            }
            Place::Pg { pg, name } => {
                let (value, version, out) = pg.block(update_row(pg, name, change))?;
                self.cached(value, Version::Row(version));
                Ok(out)
            }
        }
    }

    fn cached(&self, value: T, version: Version) {
        let mut cache = self.cache.lock().expect("store cache poisoned");
        cache.value = Arc::new(value);
        cache.version = version;
        cache.bad = None;
    }
}

/// A document and its version; `None` when there is none yet.
async fn load_row<T: DeserializeOwned>(
    pg: &Pg,
    name: &str,
) -> Result<Option<(T, i64)>, StoreError> {
    let row: Option<(serde_json::Value, i64)> =
        sqlx::query_as("SELECT body, version FROM documents WHERE name = $1")
            .bind(name)
            .fetch_optional(pg.pool())
            .await?;
    row.map(|(body, version)| {
        serde_json::from_value(body)
            .map(|value| (value, version))
            .map_err(|e| corrupt_row(name, &e))
    })
    .transpose()
}

fn corrupt_row(name: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        path: PathBuf::from(format!("database document {name}")),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}

/// Re-reads a document if its version changed (what the feed calls).
async fn refresh_row<T: DeserializeOwned + Send + Sync>(
    pg: &Pg,
    name: &str,
    cache: &Mutex<Cached<T>>,
) {
    let version: Result<Option<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM documents WHERE name = $1")
            .bind(name)
            .fetch_optional(pg.pool())
            .await;
    let current = match version {
        Ok(Some(v)) => Version::Row(v),
        Ok(None) => Version::Missing,
        Err(err) => {
            tracing::warn!(error = %err, document = name, "could not check for changes");
            return;
        }
    };
    {
        let cache = cache.lock().expect("store cache poisoned");
        if cache.version == current || cache.bad == Some(current) {
            return;
        }
    }
    match load_row::<T>(pg, name).await {
        Ok(Some((value, version))) => {
            let mut cache = cache.lock().expect("store cache poisoned");
            // Versions only grow: an update made here meanwhile is newer.
            if matches!(cache.version, Version::Row(held) if held >= version) {
                return;
            }
            cache.value = Arc::new(value);
            cache.version = Version::Row(version);
        }
        Ok(None) => {}
        Err(err) => {
            tracing::error!(error = %err, "keeping the last good copy");
            cache.lock().expect("store cache poisoned").bad = Some(current);
        }
    }
}

/// One read-modify-write of a document, in a transaction that holds its
/// row (other nodes' writers wait), announced on commit.
async fn update_row<T, R, E>(
    pg: &Pg,
    name: &str,
    change: impl FnOnce(&mut T) -> Result<R, E> + Send,
) -> Result<(T, i64, R), E>
where
    T: Serialize + DeserializeOwned + Default + Send,
    R: Send,
    E: From<StoreError> + Send,
{
    let db = |e: sqlx::Error| E::from(StoreError::Database(e));
    let mut tx = pg.pool().begin().await.map_err(db)?;
    let empty = serde_json::to_value(T::default()).expect("a default serializes");
    sqlx::query("INSERT INTO documents (name, body) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(Json(&empty))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let body: serde_json::Value =
        sqlx::query_scalar("SELECT body FROM documents WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    let mut value: T = serde_json::from_value(body).map_err(|e| E::from(corrupt_row(name, &e)))?;
    let out = change(&mut value)?;
    let version: i64 = sqlx::query_scalar(
        "UPDATE documents SET body = $2, version = nextval('changes') WHERE name = $1 \
         RETURNING version",
    )
    .bind(name)
    .bind(Json(&value))
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok((value, version, out))
}

/// Reads and parses a file; `None` when it does not exist.
fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<(T, Stamp)>, StoreError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    // The stamp of the very version we read, even if it is replaced right now.
    let stamp = Stamp::of(&file.metadata().map_err(|e| StoreError::io(path, e))?);
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| StoreError::io(path, e))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    Ok(Some((value, stamp)))
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory
/// (mode 0600), fsync, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_stamped(path, bytes).map(|_| ())
}

/// [`write_atomic`], returning the stamp of the new version.
fn write_stamped(path: &Path, bytes: &[u8]) -> Result<Stamp, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        crate::ids::random_hex(4)
    ));
    let result = (|| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        let stamp = Stamp::of(&file.metadata()?);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()?;
        Ok(stamp)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StoreError::io(path, e)
    })
}

/// The advisory lock that serializes writers across processes.
struct WriteLock(File);

impl WriteLock {
    fn acquire(path: &Path) -> Result<Self, StoreError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        file.lock().map_err(|e| StoreError::io(path, e))?;
        Ok(Self(file))
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type Map = BTreeMap<String, u32>;

    fn store(dir: &Path) -> JsonStore<Map> {
        JsonStore::open(dir.join("m.json"), dir.join(".lock")).unwrap()
    }

    #[test]
    fn missing_file_is_empty_and_update_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.read().is_empty());
        s.update(|m| {
            m.insert("a".into(), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        let on_disk: Map =
            serde_json::from_slice(&fs::read(dir.path().join("m.json")).unwrap()).unwrap();
        assert_eq!(on_disk["a"], 1);
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn sees_changes_made_by_another_writer() {
        let dir = tempfile::tempdir().unwrap();
        let server = store(dir.path());
        let cli = store(dir.path());
        assert!(server.read().is_empty());
        cli.update(|m| {
            m.insert("from_cli".into(), 7);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(server.read().get("from_cli"), Some(&7));
        // A writer that started from a stale cache still keeps the other's change.
        server
            .update(|m| {
                m.insert("from_server".into(), 8);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let seen = cli.read();
        assert_eq!(seen.get("from_cli"), Some(&7));
        assert_eq!(seen.get("from_server"), Some(&8));
    }

    #[test]
    fn a_failed_change_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let err = s.update(|m| {
            m.insert("x".into(), 1);
            Err::<(), _>(StoreError::Invalid("nope", "no".into()))
        });
        assert!(err.is_err());
        assert!(!dir.path().join("m.json").exists());
    }

    #[test]
    fn corrupt_file_is_reported_with_its_line_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        fs::write(&path, "{\n  \"a\": 1,\n  oops\n}\n").unwrap();
        let err = JsonStore::<Map>::open(path.clone(), dir.path().join(".lock"))
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("m.json") && msg.contains("line 3"), "{msg}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\n  \"a\": 1,\n  oops\n}\n"
        );
    }

    #[test]
    fn corrupted_while_running_keeps_last_good_copy_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.update(|m| {
            m.insert("a".into(), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        fs::write(dir.path().join("m.json"), "not json").unwrap();
        assert_eq!(s.read().get("a"), Some(&1));
        let err = s.update(|_| Ok::<_, StoreError>(())).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert_eq!(
            fs::read_to_string(dir.path().join("m.json")).unwrap(),
            "not json"
        );
    }
}
