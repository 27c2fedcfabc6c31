//! One JSON file shared by the server and the CLI: cached in memory, reloaded
//! when another process replaced it, changed under an advisory lock and
//! replaced atomically (temp file in the same directory, fsync, rename).

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

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

struct Cached<T> {
    value: Arc<T>,
    /// The version `value` was read from; `None` when the file does not exist.
    stamp: Option<Stamp>,
    /// A version that failed to parse, remembered so it is reported only once.
    bad: Option<Stamp>,
}

pub struct JsonStore<T> {
    path: PathBuf,
    lock_path: PathBuf,
    cache: Mutex<Cached<T>>,
}

impl<T> JsonStore<T>
where
    T: Serialize + DeserializeOwned + Default + Clone,
{
    /// Loads the file (a missing file is the empty default). A file that
    /// exists but cannot be parsed is an error naming it; it is left untouched.
    pub fn open(path: PathBuf, lock_path: PathBuf) -> Result<Self, StoreError> {
        let (value, stamp) = match load::<T>(&path)? {
            Some((value, stamp)) => (value, Some(stamp)),
            None => (T::default(), None),
        };
        Ok(Self {
            path,
            lock_path,
            cache: Mutex::new(Cached {
                value: Arc::new(value),
                stamp,
                bad: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current contents, reloaded first if another process changed the file.
    /// Costs one `stat` when nothing changed. If the new version cannot be
    /// parsed, the last good contents keep being served and the problem is
    /// logged once.
    pub fn read(&self) -> Arc<T> {
        let current = fs::metadata(&self.path).ok().map(|m| Stamp::of(&m));
        let mut cache = self.cache.lock().expect("store cache poisoned");
        if current == cache.stamp || (current.is_some() && current == cache.bad) {
            return cache.value.clone();
        }
        match load::<T>(&self.path) {
            Ok(Some((value, stamp))) => {
                cache.value = Arc::new(value);
                cache.stamp = Some(stamp);
            }
            Ok(None) => {
                cache.value = Arc::new(T::default());
                cache.stamp = None;
            }
            Err(err) => {
                tracing::error!(error = %err, "keeping the last good copy");
                cache.bad = current;
            }
        }
        cache.value.clone()
    }

    /// Read-modify-write under the directory's write lock, so the CLI and the
    /// server never lose each other's changes. `change` sees the file as it is
    /// on disk now; if it returns `Err`, nothing is written.
    pub fn update<R, E>(&self, change: impl FnOnce(&mut T) -> Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        let _guard = WriteLock::acquire(&self.lock_path)?;
        let mut value = match load::<T>(&self.path)? {
            Some((value, _)) => value,
            None => T::default(),
        };
        let out = change(&mut value)?;
        let mut bytes = serde_json::to_vec_pretty(&value).map_err(|e| {
            StoreError::io(&self.path, std::io::Error::new(ErrorKind::InvalidData, e))
        })?;
        bytes.push(b'\n');
        let stamp = write_stamped(&self.path, &bytes)?;
        let mut cache = self.cache.lock().expect("store cache poisoned");
        cache.value = Arc::new(value);
        cache.stamp = Some(stamp);
        cache.bad = None;
        Ok(out)
    }
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
