//! A loop's working directory, `loops/<uuid>/workspace/`: a `CLAUDE.md` made
//! from `templates/CLAUDE.md` and the selected profiles, and for a loop with
//! a `repo`, a `git worktree` of it on the branch `loop/<short id>`.
//!
//! loopd's own `git` runs with a built environment (never the server's) and
//! with the repository's hooks and fsmonitor off, so nothing a loop wrote
//! into a repository runs with loopd's authority.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::store::{Catalog, LoopRecord, StoreError};

/// The base instructions every loop's agent gets.
pub const TEMPLATE: &str = include_str!("../../templates/CLAUDE.md");

/// Creates the workspace (idempotent) and returns its path.
pub fn prepare(
    loop_dir: &Path,
    catalog: &Catalog,
    record: &LoopRecord,
) -> Result<PathBuf, StoreError> {
    let workspace = loop_dir.join("workspace");
    if let Some(repo) = &record.repo {
        if !workspace.exists() {
            add_worktree(&catalog.repo_path(repo), &workspace, record)?;
        }
    } else {
        std::fs::create_dir_all(&workspace).map_err(|e| StoreError::io(&workspace, e))?;
    }
    let mut text = TEMPLATE.trim_end().to_owned();
    for profile in &record.profiles {
        let path = catalog.profile_path(profile);
        let layer = std::fs::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
        text.push_str("\n\n");
        text.push_str(layer.trim_end());
    }
    text.push('\n');
    crate::store::write_atomic(&workspace.join("CLAUDE.md"), text.as_bytes())?;
    Ok(workspace)
}

/// `git -C dir` with a built environment and no hooks, fsmonitor, system
/// or global config.
pub fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("LANG", "C.UTF-8")
        .env("HOME", "/nonexistent")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ])
        .arg("-C")
        .arg(dir);
    cmd
}

fn add_worktree(repo: &Path, workspace: &Path, record: &LoopRecord) -> Result<(), StoreError> {
    let branch = format!("loop/{}", &record.id.0.simple().to_string()[..8]);
    let out = git(repo)
        .args(["worktree", "add", "-b", &branch])
        .arg(workspace)
        .output()
        .map_err(|e| StoreError::io(Path::new("git"), e))?;
    if !out.status.success() {
        return Err(StoreError::Invalid(
            "repo_not_found",
            format!(
                "could not make a worktree of repo `{}` on branch {branch}: {}",
                record.repo.as_deref().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // Which `.git/worktrees/<name>` is this loop's, read now, before any
    // agent ran: later the workspace's `.git` file is the agent's to rewrite.
    let pointer = workspace.join(".git");
    let text = std::fs::read_to_string(&pointer).map_err(|e| StoreError::io(&pointer, e))?;
    let name = Path::new(text.trim().trim_start_matches("gitdir: "))
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            StoreError::Invalid(
                "repo_not_found",
                format!("{}: no gitdir", pointer.display()),
            )
        })?;
    let record_path = worktree_record(workspace);
    crate::store::write_atomic(&record_path, name.as_bytes())?;
    Ok(())
}

/// Where loopd keeps the name of a loop's worktree admin dir: beside the
/// workspace, out of the agent's reach.
pub fn worktree_record(workspace: &Path) -> PathBuf {
    workspace.with_file_name("worktree")
}

/// The loop's worktree admin dir in `git_dir`, as loopd recorded it (never
/// from the workspace's `.git` file, which the agent may rewrite).
pub fn worktree_admin(git_dir: &Path, workspace: &Path) -> Result<PathBuf, String> {
    let record = worktree_record(workspace);
    let name =
        std::fs::read_to_string(&record).map_err(|e| format!("{}: {e}", record.display()))?;
    let name = name.trim();
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("{}: not a worktree name", record.display()));
    }
    let admin = git_dir.join("worktrees").join(name);
    if !std::fs::symlink_metadata(&admin).is_ok_and(|m| m.is_dir()) {
        return Err(format!(
            "{}: not a worktree of {}",
            admin.display(),
            git_dir.display()
        ));
    }
    Ok(admin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LoopStore, NewLoop};

    fn run_git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn layers_profiles_and_makes_a_worktree_on_its_own_branch() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("profiles/a")).unwrap();
        std::fs::write(root.join("profiles/a/CLAUDE.md"), "Layer A.\n").unwrap();
        std::fs::create_dir_all(root.join("profiles/b")).unwrap();
        std::fs::write(root.join("profiles/b/CLAUDE.md"), "Layer B.\n").unwrap();
        let repo = root.join("repos/app");
        std::fs::create_dir_all(&repo).unwrap();
        run_git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("README"), "hi\n").unwrap();
        run_git(&repo, &["add", "."]);
        run_git(&repo, &["commit", "-qm", "init"]);
        // A hook planted in the repository must not run when loopd checks out.
        let hook = repo.join(".git/hooks/post-checkout");
        let witness = root.join("hook-ran");
        std::fs::write(&hook, format!("#!/bin/sh\nenv > {}\n", witness.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

        let catalog = Catalog::new(root);
        let loops = LoopStore::open(root.join("loops")).unwrap();
        let record = loops
            .create(NewLoop {
                title: "t".into(),
                created_by: "u".into(),
                metadata: Default::default(),
                profiles: vec!["b".into(), "a".into()],
                vault: "default".into(),
                repo: Some("app".into()),
            })
            .unwrap();
        let ws = prepare(&loops.loop_dir(record.id), &catalog, &record).unwrap();
        let md = std::fs::read_to_string(ws.join("CLAUDE.md")).unwrap();
        assert!(md.starts_with(TEMPLATE.lines().next().unwrap()));
        let (b, a) = (md.find("Layer B.").unwrap(), md.find("Layer A.").unwrap());
        assert!(b < a, "profiles in the order given");
        assert_eq!(std::fs::read_to_string(ws.join("README")).unwrap(), "hi\n");
        let head = Command::new("git")
            .arg("-C")
            .arg(&ws)
            .args(["branch", "--show-current"])
            .output()
            .unwrap();
        let branch = String::from_utf8(head.stdout).unwrap();
        assert_eq!(
            branch.trim(),
            format!("loop/{}", &record.id.0.simple().to_string()[..8])
        );
        assert!(!witness.exists(), "the repository's hook ran");
        let admin = std::fs::read_to_string(worktree_record(&ws)).unwrap();
        assert!(
            repo.join(".git/worktrees")
                .join(&admin)
                .join("gitdir")
                .is_file(),
            "{admin}"
        );
        // Preparing again is harmless.
        prepare(&loops.loop_dir(record.id), &catalog, &record).unwrap();
    }
}
