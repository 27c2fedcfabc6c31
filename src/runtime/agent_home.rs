//! What a sandboxed agent of one loop is given: its own home
//! (`loops/<uuid>/home/`, where Claude Code keeps transcripts and settings),
//! the credentials of the user running loopd read-only, its workspace, and
//! for a repo loop just enough of the repository to commit, with hooks and
//! config read-only. Everything else of the data directory is hidden.

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
    fs::create_dir_all(home.join(".claude")).map_err(|e| format!("{}: {e}", home.display()))?;
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
        if dest_dir.join(&file).exists() {
            return Ok(());
        }
        fs::create_dir_all(&dest_dir).map_err(|e| format!("{}: {e}", dest_dir.display()))?;
        for name in [file.clone(), session.to_owned()] {
            let (src, dest) = (project.path().join(&name), dest_dir.join(&name));
            if src.exists() {
                move_path(&src, &dest)?;
            }
        }
        tracing::info!(session, "moved a conversation into its loop's agent home");
        return Ok(());
    }
    Ok(())
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

/// The Claude Code credentials file of the user running loopd, if any.
pub fn credentials(server_env: &[(String, String)]) -> Option<PathBuf> {
    let var = |k: &str| {
        server_env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| PathBuf::from(v))
    };
    let dir = var("CLAUDE_CONFIG_DIR").or_else(|| var("HOME").map(|h| h.join(".claude")))?;
    Some(dir.join(".credentials.json")).filter(|p| p.is_file())
}

/// Where the parts of one loop are, on the host.
pub struct LoopPaths<'a> {
    pub data_dir: &'a Path,
    pub workspace: &'a Path,
    pub home: &'a Path,
    pub credentials: Option<&'a Path>,
    /// The repository of a repo loop.
    pub repo: Option<&'a Path>,
}

/// The mounts of a sandboxed agent, in order: the data directory emptied,
/// then the loop's own parts bound back in.
pub fn mounts(paths: &LoopPaths) -> Result<Vec<Mount>, String> {
    let mut out = vec![
        Mount::Empty(paths.data_dir.to_owned()),
        Mount::ReadWrite(paths.workspace.to_owned()),
        Mount::ReadWrite(paths.home.to_owned()),
    ];
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
/// refs) stays read-only.
fn repo_mounts(repo: &Path, workspace: &Path) -> Result<Vec<Mount>, String> {
    let git_dir = if repo.join(".git").is_dir() {
        repo.join(".git")
    } else {
        repo.to_owned()
    };
    let pointer = fs::read_to_string(workspace.join(".git"))
        .map_err(|e| format!("{}: {e}", workspace.join(".git").display()))?;
    let admin = pointer
        .trim()
        .strip_prefix("gitdir: ")
        .map(PathBuf::from)
        .filter(|p| {
            p.starts_with(git_dir.join("worktrees"))
                && !p.components().any(|c| c.as_os_str() == "..")
        })
        // Both ends must agree: the admin dir names this workspace back (a
        // loop can rewrite its own `.git` file, not another loop's admin dir).
        .filter(|admin| {
            fs::read_to_string(admin.join("gitdir"))
                .is_ok_and(|back| Path::new(back.trim()) == workspace.join(".git"))
        })
        .ok_or_else(|| {
            format!(
                "{}: not a worktree of {}",
                workspace.display(),
                repo.display()
            )
        })?;
    let branches = git_dir.join("refs/heads/loop");
    let reflogs = git_dir.join("logs/refs/heads/loop");
    for dir in [&branches, &reflogs] {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(vec![
        Mount::ReadOnly(git_dir.clone()),
        Mount::ReadWrite(git_dir.join("objects")),
        Mount::ReadWrite(admin),
        Mount::ReadWrite(branches),
        Mount::ReadWrite(reflogs),
    ])
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
    fn a_repo_loop_gets_objects_its_worktree_and_loop_branches_writable() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repos/app");
        let admin = repo.join(".git/worktrees/workspace2");
        fs::create_dir_all(&admin).unwrap();
        let ws = tmp.path().join("loops/1/workspace");
        fs::create_dir_all(&ws).unwrap();
        fs::write(
            admin.join("gitdir"),
            format!("{}\n", ws.join(".git").display()),
        )
        .unwrap();
        fs::write(ws.join(".git"), format!("gitdir: {}\n", admin.display())).unwrap();
        let home = tmp.path().join("loops/1/home");
        let got = mounts(&LoopPaths {
            data_dir: tmp.path(),
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
        // A workspace whose `.git` points elsewhere gets nothing of the repo:
        // outside the repo, or another loop's worktree.
        let other = repo.join(".git/worktrees/workspace3");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("gitdir"), "/d/loops/2/workspace/.git\n").unwrap();
        let paths = LoopPaths {
            data_dir: tmp.path(),
            workspace: &ws,
            home: &home,
            credentials: None,
            repo: Some(&repo),
        };
        for target in [
            "/etc".into(),
            other.display().to_string(),
            format!("{}/../../x", admin.display()),
        ] {
            fs::write(ws.join(".git"), format!("gitdir: {target}\n")).unwrap();
            assert!(mounts(&paths).is_err(), "{target}");
        }
    }
}
