//! What a sandboxed agent of one loop is given: its own home
//! (`loops/<uuid>/home/`, where Claude Code keeps transcripts and settings),
//! the credentials of the user running loopd read-only, its workspace, and
//! for a repo loop just enough of the repository to commit, with hooks and
//! config read-only. Everything else of the data directory is hidden.
//!
//! Nothing here trusts what an agent could have written: no mount comes
//! from a file in the workspace or home, and the directories bubblewrap
//! makes mount points in are made real (symlinks removed) before each
//! start, when no process of the loop is alive to race it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::agent::sandbox::Mount;

/// The loop's agent home, created if missing. A transcript of `session`
/// still in the server user's home (a loop from before sandboxing, or from
/// `--sandbox none`) moves into it, so the conversation resumes.
pub fn prepare(
    loop_dir: &Path,
    server_home: Option<&Path>,
    session: Option<&str>,
) -> Result<PathBuf, String> {
    let home = loop_dir.join("home");
    fs::create_dir_all(loop_dir).map_err(|e| format!("{}: {e}", loop_dir.display()))?;
    real_dir(&home)?;
    real_dir(&home.join(".claude"))?;
    // Claude Code registers live processes in `sessions/<pid>.json`. In a
    // PID namespace every agent is pid 2, so an entry left by a killed one
    // names the next one; no process of this loop is alive now, so every
    // entry is stale.
    let sessions = home.join(".claude/sessions");
    if fs::symlink_metadata(&sessions).is_ok_and(|m| m.is_dir()) {
        for entry in fs::read_dir(&sessions)
            .map_err(|e| format!("{}: {e}", sessions.display()))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    // The credentials' mount point: absent or a plain file, never a link.
    let credentials = home.join(".claude/.credentials.json");
    if fs::symlink_metadata(&credentials).is_ok_and(|m| !m.is_file()) {
        clear(&credentials)?;
    }
    if let (Some(server_home), Some(session)) = (server_home, session) {
        move_transcript(&server_home.join(".claude"), &home.join(".claude"), session)?;
    }
    Ok(home)
}

/// Moves `projects/<slug>/<session>.jsonl` (and its `<session>/` folder of
/// subagent transcripts) from one Claude config dir to another, unless the
/// target already has it.
fn move_transcript(from: &Path, to: &Path, session: &str) -> Result<(), String> {
    let file = format!("{session}.jsonl");
    let Ok(projects) = fs::read_dir(from.join("projects")) else {
        return Ok(());
    };
    for project in projects.flatten() {
        let src = project.path().join(&file);
        if !src.is_file() {
            continue;
        }
        let dest_dir = to.join("projects").join(project.file_name());
        real_dir(&to.join("projects"))?;
        real_dir(&dest_dir)?;
        if fs::symlink_metadata(dest_dir.join(&file)).is_ok() {
            return Ok(());
        }
        for name in [file.clone(), session.to_owned()] {
            let (src, dest) = (project.path().join(&name), dest_dir.join(&name));
            // Whatever the agent left at the destination (a link to follow,
            // most of all) goes first; nothing is written through it.
            clear(&dest)?;
            if src.exists() {
                move_path(&src, &dest)?;
            }
        }
        tracing::info!(session, "moved a conversation into its loop's agent home");
        return Ok(());
    }
    Ok(())
}

/// Makes `path` a real directory: whatever else is there (a symlink an
/// agent left, a file) is removed first.
fn real_dir(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => remove(path)?,
        Err(_) => {}
    }
    fs::create_dir(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn remove(path: &Path) -> Result<(), String> {
    fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Removes whatever is at `path` (a link itself, never its target; a real
/// directory with its contents).
fn clear(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            fs::remove_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        Ok(_) => remove(path),
        Err(_) => Ok(()),
    }
}

/// `rename`, or copy and remove across file systems.
fn move_path(src: &Path, dest: &Path) -> Result<(), String> {
    if fs::rename(src, dest).is_ok() {
        return Ok(());
    }
    copy_tree(src, dest).map_err(|e| format!("{} -> {}: {e}", src.display(), dest.display()))?;
    let removed = if src.is_dir() {
        fs::remove_dir_all(src)
    } else {
        fs::remove_file(src)
    };
    removed.map_err(|e| format!("{}: {e}", src.display()))
}

fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    if src.is_dir() {
        fs::create_dir_all(dest)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        fs::copy(src, dest).map(|_| ())
    }
}

/// One loop, as the runtime knows it (paths as configured).
pub struct Loop<'a> {
    pub data_dir: &'a Path,
    /// `--workspace-root`, where every loop's workspace and home are (when
    /// not in the data directory): hidden like the data directory.
    pub work_root: Option<&'a Path>,
    pub loop_dir: &'a Path,
    pub workspace: &'a Path,
    pub repo: Option<&'a Path>,
    /// The environment agents' environments are built from.
    pub server_env: &'a [(String, String)],
    /// The conversation it resumes (a new one has no transcript to move).
    pub session: Option<&'a str>,
}

/// What a sandboxed agent of a loop runs with, every path canonical (the
/// same inside the sandbox as outside).
pub struct Given {
    pub home: PathBuf,
    pub workspace: PathBuf,
    pub mounts: Vec<Mount>,
}

/// Prepares the loop's agent home (moving an older transcript into it) and
/// says what its sandboxed agent is given.
pub fn sandboxed(l: &Loop) -> Result<Given, String> {
    let real = |p: &Path| fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    let (data_dir, loop_dir, workspace) =
        (real(l.data_dir)?, real(l.loop_dir)?, real(l.workspace)?);
    let repo = l.repo.map(real).transpose()?;
    let work_root = l.work_root.map(real).transpose()?;
    let server_home = env_var(l.server_env, "HOME");
    let home = prepare(&loop_dir, server_home.as_deref(), l.session)?;
    let credentials = credentials(l.server_env);
    let mounts = mounts(&LoopPaths {
        data_dir: &data_dir,
        work_root: work_root.as_deref(),
        workspace: &workspace,
        home: &home,
        credentials: credentials.as_deref(),
        repo: repo.as_deref(),
    })?;
    Ok(Given {
        home,
        workspace,
        mounts,
    })
}

fn env_var(env: &[(String, String)], name: &str) -> Option<PathBuf> {
    env.iter()
        .find(|(key, _)| key == name)
        .map(|(_, v)| PathBuf::from(v))
}

/// The Claude Code credentials file of the user running loopd, if any.
pub fn credentials(server_env: &[(String, String)]) -> Option<PathBuf> {
    let dir = env_var(server_env, "CLAUDE_CONFIG_DIR")
        .or_else(|| env_var(server_env, "HOME").map(|h| h.join(".claude")))?;
    Some(dir.join(".credentials.json")).filter(|p| p.is_file())
}

/// Where the parts of one loop are, on the host.
pub struct LoopPaths<'a> {
    pub data_dir: &'a Path,
    pub work_root: Option<&'a Path>,
    pub workspace: &'a Path,
    pub home: &'a Path,
    pub credentials: Option<&'a Path>,
    /// The repository of a repo loop.
    pub repo: Option<&'a Path>,
}

/// The mounts of a sandboxed agent, in order: the data directory emptied,
/// then the loop's own parts bound back in.
pub fn mounts(paths: &LoopPaths) -> Result<Vec<Mount>, String> {
    let mut out = vec![Mount::Empty(paths.data_dir.to_owned())];
    // Every other loop's workspace and home are under the root too.
    out.extend(paths.work_root.map(|root| Mount::Empty(root.to_owned())));
    out.extend([
        Mount::ReadWrite(paths.workspace.to_owned()),
        Mount::ReadWrite(paths.home.to_owned()),
    ]);
    if let Some(src) = paths.credentials {
        out.push(Mount::ReadOnlyAt {
            src: src.to_owned(),
            dest: paths.home.join(".claude/.credentials.json"),
        });
    }
    if let Some(repo) = paths.repo {
        out.extend(repo_mounts(repo, paths.workspace)?);
    }
    Ok(out)
}

/// A worktree's commits need the object store, its own admin dir and the
/// `loop/…` branches writable; the rest of `.git` (hooks, config, other
/// refs) stays read-only. The admin dir is the one loopd recorded when it
/// made the worktree; every path here lies in directories no agent can
/// write (`.git` itself is read-only to all of them).
fn repo_mounts(repo: &Path, workspace: &Path) -> Result<Vec<Mount>, String> {
    let git_dir = if repo.join(".git").is_dir() {
        repo.join(".git")
    } else {
        repo.to_owned()
    };
    let record = crate::runtime::workspace::worktree_record(workspace);
    if fs::symlink_metadata(&record).is_err() {
        record_old_worktree(&git_dir, workspace, &record)?;
    }
    let admin = crate::runtime::workspace::worktree_admin(&git_dir, workspace)?;
    let branches = git_dir.join("refs/heads/loop");
    let reflogs = git_dir.join("logs/refs/heads/loop");
    for dir in [&branches, &reflogs] {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            return Err(format!("{}: not a directory", dir.display()));
        }
    }
    Ok(vec![
        Mount::ReadOnly(git_dir.clone()),
        Mount::ReadWrite(git_dir.join("objects")),
        Mount::ReadWrite(admin),
        Mount::ReadWrite(branches),
        Mount::ReadWrite(reflogs),
    ])
}

/// A loop from before loopd recorded its worktree: the one admin dir in
/// `.git/worktrees/` (a directory no agent can write) whose `gitdir` names
/// this workspace. Two claimants (one lies) are refused, not guessed at.
fn record_old_worktree(git_dir: &Path, workspace: &Path, record: &Path) -> Result<(), String> {
    let want = workspace.join(".git");
    let entries = fs::read_dir(git_dir.join("worktrees"))
        .map_err(|e| format!("{}: {e}", git_dir.display()))?;
    let names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            let gitdir = e.path().join("gitdir");
            fs::symlink_metadata(&gitdir).is_ok_and(|m| m.is_file())
                && fs::read_to_string(&gitdir).is_ok_and(|t| Path::new(t.trim()) == want)
        })
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    match names.as_slice() {
        [name] => crate::store::write_atomic(record, name.as_bytes()).map_err(|e| e.to_string()),
        [] => Err(format!(
            "{}: no worktree of {} names it",
            workspace.display(),
            git_dir.display()
        )),
        _ => Err(format!(
            "{}: several worktrees claim it: {names:?}",
            workspace.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_transcript_moves_into_the_loops_home() {
        let tmp = tempfile::tempdir().unwrap();
        let server_home = tmp.path().join("root");
        let project = server_home.join(".claude/projects/-d-loops-1-workspace");
        fs::create_dir_all(project.join("s1/subagents")).unwrap();
        fs::write(project.join("s1.jsonl"), "{}\n").unwrap();
        fs::write(project.join("other.jsonl"), "{}\n").unwrap();
        let loop_dir = tmp.path().join("loop");
        let home = prepare(&loop_dir, Some(&server_home), Some("s1")).unwrap();
        let moved = home.join(".claude/projects/-d-loops-1-workspace");
        assert_eq!(fs::read_to_string(moved.join("s1.jsonl")).unwrap(), "{}\n");
        assert!(moved.join("s1/subagents").is_dir());
        assert!(!project.join("s1.jsonl").exists());
        assert!(
            project.join("other.jsonl").exists(),
            "other conversations stay"
        );
        // Again: nothing to move, nothing lost.
        prepare(&loop_dir, Some(&server_home), Some("s1")).unwrap();
        assert!(moved.join("s1.jsonl").is_file());
    }

    #[test]
    fn links_an_agent_left_in_its_home_are_removed_before_a_start() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let loop_dir = tmp.path().join("loop");
        fs::create_dir_all(loop_dir.join("home/.claude")).unwrap();
        std::os::unix::fs::symlink(
            outside.join("planted"),
            loop_dir.join("home/.claude/.credentials.json"),
        )
        .unwrap();
        prepare(&loop_dir, None, None).unwrap();
        assert!(fs::symlink_metadata(loop_dir.join("home/.claude/.credentials.json")).is_err());
        // `.claude` itself a link: replaced by a real directory.
        fs::remove_dir_all(loop_dir.join("home/.claude")).unwrap();
        std::os::unix::fs::symlink(&outside, loop_dir.join("home/.claude")).unwrap();
        let server_home = tmp.path().join("root");
        fs::create_dir_all(server_home.join(".claude/projects/p")).unwrap();
        fs::write(server_home.join(".claude/projects/p/s1.jsonl"), "{}").unwrap();
        prepare(&loop_dir, Some(&server_home), Some("s1")).unwrap();
        assert!(
            fs::symlink_metadata(loop_dir.join("home/.claude"))
                .unwrap()
                .is_dir()
        );
        assert!(loop_dir.join("home/.claude/projects/p/s1.jsonl").is_file());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing was written through a link"
        );
    }

    #[test]
    fn a_repo_loop_gets_objects_its_worktree_and_loop_branches_writable() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repos/app");
        let admin = repo.join(".git/worktrees/workspace2");
        fs::create_dir_all(&admin).unwrap();
        let ws = tmp.path().join("loops/1/workspace");
        fs::create_dir_all(&ws).unwrap();
        fs::write(
            crate::runtime::workspace::worktree_record(&ws),
            "workspace2",
        )
        .unwrap();
        // What the agent wrote into its workspace plays no part.
        fs::write(ws.join(".git"), "gitdir: /etc\n").unwrap();
        let home = tmp.path().join("loops/1/home");
        let got = mounts(&LoopPaths {
            data_dir: tmp.path(),
            work_root: None,
            workspace: &ws,
            home: &home,
            credentials: Some(Path::new("/root/.claude/.credentials.json")),
            repo: Some(&repo),
        })
        .unwrap();
        let git = repo.join(".git");
        assert_eq!(
            got,
            vec![
                Mount::Empty(tmp.path().to_owned()),
                Mount::ReadWrite(ws.clone()),
                Mount::ReadWrite(home.clone()),
                Mount::ReadOnlyAt {
                    src: "/root/.claude/.credentials.json".into(),
                    dest: home.join(".claude/.credentials.json"),
                },
                Mount::ReadOnly(git.clone()),
                Mount::ReadWrite(git.join("objects")),
                Mount::ReadWrite(admin.clone()),
                Mount::ReadWrite(git.join("refs/heads/loop")),
                Mount::ReadWrite(git.join("logs/refs/heads/loop")),
            ]
        );
        // A loop from before the record: found once by the admin dir that
        // names it, and recorded; two claimants are refused.
        let record = crate::runtime::workspace::worktree_record(&ws);
        fs::remove_file(&record).unwrap();
        fs::write(
            admin.join("gitdir"),
            format!("{}\n", ws.join(".git").display()),
        )
        .unwrap();
        let paths = LoopPaths {
            data_dir: tmp.path(),
            work_root: None,
            workspace: &ws,
            home: &home,
            credentials: None,
            repo: Some(&repo),
        };
        assert!(
            mounts(&paths)
                .unwrap()
                .contains(&Mount::ReadWrite(admin.clone()))
        );
        assert_eq!(fs::read_to_string(&record).unwrap(), "workspace2");
        fs::remove_file(&record).unwrap();
        let liar = repo.join(".git/worktrees/workspace7");
        fs::create_dir_all(&liar).unwrap();
        fs::write(
            liar.join("gitdir"),
            format!("{}\n", ws.join(".git").display()),
        )
        .unwrap();
        assert!(mounts(&paths).is_err());
        fs::remove_dir_all(&liar).unwrap();
        // A record that names no worktree of this repo gets nothing of it.
        for bad in ["", "..", "../../x", "workspace9"] {
            fs::write(&record, bad).unwrap();
            assert!(mounts(&paths).is_err(), "{bad:?}");
        }
        fs::create_dir_all(repo.join(".git/worktrees")).unwrap();
        std::os::unix::fs::symlink(&admin, repo.join(".git/worktrees/link")).unwrap();
        fs::write(&record, "link").unwrap();
        assert!(mounts(&paths).is_err(), "a symlinked admin dir");
    }
}
