//! A loop's workspace, read over the API: a directory's entries, a file's
//! bytes, a repo loop's diff. Read-only, and inside the workspace only:
//! every path is opened with `openat2(RESOLVE_BENEATH)` from the workspace
//! itself, so `..`, absolute paths and symlinks leading out are refused by
//! the kernel at the moment of opening (an agent swapping a directory for
//! a symlink meanwhile gains nothing).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use chrono::{DateTime, Utc};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

/// The most entries one listing gives (the first by name).
pub const MAX_ENTRIES: usize = 1000;
/// The most of a file one answer gives.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// The most of a diff one answer gives.
pub const MAX_DIFF_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("`{0}` is not a path inside the workspace (relative, without `..`)")]
    BadPath(String),
    #[error("`{0}` leads out of the workspace")]
    Outside(String),
    #[error("no `{0}` in the workspace")]
    NotFound(String),
    #[error("`{0}` is not a directory")]
    NotADirectory(String),
    #[error("`{0}` is not a regular file")]
    NotAFile(String),
    #[error("this loop has no repository")]
    NoRepo,
    #[error("{0}")]
    Io(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
    pub modified: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub struct FileBytes {
    pub size: u64,
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

/// Checks that `path` names something inside (relative, no `..`, no NUL);
/// `""` and `"."` are the workspace itself.
fn relative(path: &str) -> Result<&str, FileError> {
    let bad = || FileError::BadPath(path.to_owned());
    if path.starts_with('/') || path.contains('\0') {
        return Err(bad());
    }
    if path.split('/').any(|c| c == "..") {
        return Err(bad());
    }
    let trimmed = path.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "." } else { trimmed })
}

/// Opens `path` beneath the workspace (symlinks inside it are followed,
/// never out of it).
fn open_beneath(workspace: &Path, path: &str, flags: OFlag) -> Result<OwnedFd, FileError> {
    let rel = relative(path)?;
    let root = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FileError::Io(format!("the workspace: {e}")))?;
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root.as_fd(), rel, how).map_err(|e| match e {
        Errno::ENOENT => FileError::NotFound(path.to_owned()),
        Errno::EXDEV | Errno::ELOOP => FileError::Outside(path.to_owned()),
        Errno::ENOTDIR => FileError::NotADirectory(path.to_owned()),
        e => FileError::Io(format!("`{path}`: {e}")),
    })
}

fn kind(stat: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => "file",
        SFlag::S_IFDIR => "dir",
        SFlag::S_IFLNK => "symlink",
        _ => "other",
    }
}

fn modified(stat: &FileStat) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(stat.st_mtime, stat.st_mtime_nsec as u32)
}

/// A directory's entries: directories first, then by name; at most
/// [`MAX_ENTRIES`] (`true`: there were more). A symlink is listed as one,
/// never followed.
pub fn list(workspace: &Path, path: &str) -> Result<(Vec<DirEntry>, bool), FileError> {
    let fd = open_beneath(workspace, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let stat_fd = fd.try_clone().map_err(|e| FileError::Io(e.to_string()))?;
    let dir = nix::dir::Dir::from_fd(fd).map_err(|e| FileError::Io(e.to_string()))?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| FileError::Io(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let stat = fstatat(
            stat_fd.as_fd(),
            entry.file_name(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        let (kind, size, modified) = match &stat {
            Ok(s) => (kind(s), s.st_size as u64, modified(s)),
            Err(_) => ("other", 0, None),
        };
        entries.push(DirEntry {
            name,
            kind,
            size,
            modified,
        });
    }
    entries.sort_by(|a, b| ((a.kind != "dir"), &a.name).cmp(&((b.kind != "dir"), &b.name)));
    let more = entries.len() > MAX_ENTRIES;
    entries.truncate(MAX_ENTRIES);
    Ok((entries, more))
}

/// A regular file's first [`MAX_FILE_BYTES`] (`truncated`: it is longer).
pub fn read(workspace: &Path, path: &str) -> Result<FileBytes, FileError> {
    let fd = open_beneath(workspace, path, OFlag::O_RDONLY)?;
    let stat = fstat(fd.as_fd()).map_err(|e| FileError::Io(e.to_string()))?;
    if kind(&stat) != "file" {
        return Err(FileError::NotAFile(path.to_owned()));
    }
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::Io(format!("`{path}`: {e}")))?;
    let truncated = bytes.len() > MAX_FILE_BYTES;
    bytes.truncate(MAX_FILE_BYTES);
    Ok(FileBytes {
        size: stat.st_size as u64,
        bytes,
        truncated,
    })
}

/// A file's type from its name and first bytes: `text/…` for text (UTF-8
/// without NUL), `application/octet-stream` otherwise.
pub fn mime(path: &str, bytes: &[u8]) -> &'static str {
    let text = !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok();
    if !text {
        return "application/octet-stream";
    }
    match path.rsplit('.').next().unwrap_or_default() {
        "md" | "markdown" => "text/markdown",
        "json" => "application/json",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" | "mjs" | "ts" => "text/javascript",
        "svg" => "image/svg+xml",
        _ => "text/plain",
    }
}

/// A repo loop's changes against the commit its branch started from:
/// committed and not, as a unified diff (at most [`MAX_DIFF_BYTES`]), and
/// the files git does not track yet.
pub struct Diff {
    pub base: String,
    pub diff: String,
    pub truncated: bool,
    pub untracked: Vec<String>,
}

/// Runs git on the loop's worktree with the repository's own git dirs
/// named explicitly: the workspace's `.git` file and the worktree's
/// `commondir` are the agent's to rewrite, and are never followed.
pub fn diff(repo: &Path, workspace: &Path) -> Result<Diff, FileError> {
    let git_dir = if repo.join(".git").is_dir() {
        repo.join(".git")
    } else {
        repo.to_owned()
    };
    let admin = super::workspace::worktree_admin(&git_dir, workspace).map_err(FileError::Io)?;
    let git = |args: &[&str]| -> Result<Vec<u8>, FileError> {
        let out = super::workspace::git(workspace)
            .env("GIT_DIR", &admin)
            .env("GIT_COMMON_DIR", &git_dir)
            .env("GIT_WORK_TREE", workspace)
            .env("GIT_ATTR_NOSYSTEM", "1")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .args(args)
            .output()
            .map_err(|e| FileError::Io(format!("git: {e}")))?;
        if !out.status.success() {
            return Err(FileError::Io(format!(
                "git {}: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    };
    // The commit the loop's branch left the repository's HEAD at.
    let head = {
        let out = super::workspace::git(repo)
            .env("GIT_DIR", &git_dir)
            .args(["rev-parse", "HEAD"])
            .output()
            .map_err(|e| FileError::Io(format!("git: {e}")))?;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let base = String::from_utf8_lossy(&git(&["merge-base", "HEAD", &head])?)
        .trim()
        .to_owned();
    let mut diff = git(&[
        "diff",
        "--no-ext-diff",
        "--no-textconv",
        "--no-color",
        &base,
    ])?;
    let truncated = diff.len() > MAX_DIFF_BYTES;
    diff.truncate(MAX_DIFF_BYTES);
    let untracked = git(&["ls-files", "--others", "--exclude-standard", "-z"])?
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .take(MAX_ENTRIES)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Ok(Diff {
        base,
        diff: String::from_utf8_lossy(&diff).into_owned(),
        truncated,
        untracked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside() {
        for ok in ["", ".", "a", "a/b.txt", "a/", "./a"] {
            assert!(relative(ok).is_ok(), "{ok}");
        }
        for bad in ["/etc/passwd", "..", "a/../../x", "a/..", "a\0b"] {
            assert!(matches!(relative(bad), Err(FileError::BadPath(_))), "{bad}");
        }
    }

    #[test]
    fn symlinks_out_are_refused_by_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::write(ws.join("sub/in.txt"), "inside").unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), ws.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../secret", ws.join("rel-link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), ws.join("dir-link")).unwrap();
        std::os::unix::fs::symlink("sub/in.txt", ws.join("inner-link")).unwrap();
        assert_eq!(read(&ws, "sub/in.txt").unwrap().bytes, b"inside");
        assert_eq!(read(&ws, "inner-link").unwrap().bytes, b"inside");
        for out in ["abs-link", "rel-link", "dir-link/secret"] {
            assert!(
                matches!(read(&ws, out), Err(FileError::Outside(_))),
                "{out}"
            );
        }
        assert!(matches!(list(&ws, "dir-link"), Err(FileError::Outside(_))));
        let (entries, more) = list(&ws, "").unwrap();
        assert!(!more);
        let names: Vec<(&str, &str)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            names,
            [
                ("sub", "dir"),
                ("abs-link", "symlink"),
                ("dir-link", "symlink"),
                ("inner-link", "symlink"),
                ("rel-link", "symlink"),
            ]
        );
        assert!(matches!(read(&ws, "sub"), Err(FileError::NotAFile(_))));
        assert!(matches!(
            list(&ws, "sub/in.txt"),
            Err(FileError::NotADirectory(_))
        ));
        assert!(matches!(read(&ws, "nope"), Err(FileError::NotFound(_))));
    }

    #[test]
    fn big_files_are_cut_and_types_told() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big.txt"), vec![b'x'; MAX_FILE_BYTES + 10]).unwrap();
        let got = read(dir.path(), "big.txt").unwrap();
        assert!(got.truncated && got.bytes.len() == MAX_FILE_BYTES);
        assert_eq!(got.size, MAX_FILE_BYTES as u64 + 10);
        assert_eq!(mime("a.rs", b"fn main() {}"), "text/plain");
        assert_eq!(mime("a.md", b"# hi"), "text/markdown");
        assert_eq!(mime("a.png", b"\x89PNG\0"), "application/octet-stream");
    }
}
