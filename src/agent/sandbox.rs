//! The agent's sandbox: every agent process (and all it starts) runs inside
//! bubblewrap with the system read-only, its own `/proc`, `/dev` and `/tmp`,
//! a new PID namespace, an unprivileged uid, and nothing of the data
//! directory but the mounts its loop is given ([`Mount`]).
//!
//! [`Sandbox::resolve`] probes bubblewrap once at start; the per-agent
//! command line is [`Sandbox::wrap`], a pure function of the probe, the
//! program and the mounts, so it is tested without spawning anything.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What `--sandbox` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// bubblewrap when it works on this machine, else none (with a warning).
    Auto,
    /// bubblewrap, or refuse to start.
    Bwrap,
    /// No sandbox: agents run as loopd's own user (with a warning).
    None,
}

/// The uid and gid an agent has inside its sandbox when loopd runs as root.
pub const SANDBOX_UID: u32 = 1000;

/// The sandbox in use, decided once at start.
#[derive(Debug, Clone)]
pub enum Sandbox {
    Bwrap(Bwrap),
    None,
}

/// A working bubblewrap and the parts of the host every sandbox sees.
#[derive(Debug, Clone)]
pub struct Bwrap {
    bin: PathBuf,
    /// `--ro-bind`/`--symlink` arguments for the system directories.
    system: Vec<String>,
    /// Paths under `/etc` that not everyone may read on the host: hidden
    /// inside (the agent's uid maps to loopd's, so it would own them).
    masked: Vec<(PathBuf, bool)>,
    /// Whether the agent gets a uid of its own (loopd runs as root).
    remap_uid: bool,
}

/// One path a loop's agent is given, at the same path inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    ReadOnly(PathBuf),
    ReadWrite(PathBuf),
    /// `src` on the host, read-only at `dest` inside.
    ReadOnlyAt {
        src: PathBuf,
        dest: PathBuf,
    },
    /// An empty read-only directory over whatever is there (e.g. the data
    /// directory, before the loop's own parts of it are bound back in).
    Empty(PathBuf),
}

/// System directories bound read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"];

impl Sandbox {
    /// Decides the sandbox for `mode`; returns it and a warning to show in the
    /// log and `/healthz`, or an error when `bwrap` was required and cannot work.
    pub fn resolve(mode: SandboxMode) -> Result<(Self, Option<String>), String> {
        match mode {
            SandboxMode::None => Ok((
                Self::None,
                Some(
                    "--sandbox none: agents run as loopd's own user and can read and change \
                     everything it can (the data directory, other loops, the server's environment)"
                        .to_owned(),
                ),
            )),
            SandboxMode::Bwrap => Bwrap::probe()
                .map(|b| (Self::Bwrap(b), None))
                .map_err(|why| {
                    format!(
                        "--sandbox bwrap: bubblewrap does not work on this machine: {why} \
                         (install the `bubblewrap` package, allow user namespaces, or choose \
                         --sandbox none knowing what it means)"
                    )
                }),
            SandboxMode::Auto => Ok(match Bwrap::probe() {
                Ok(b) => (Self::Bwrap(b), None),
                Err(why) => (
                    Self::None,
                    Some(format!(
                        "no sandbox: bubblewrap does not work on this machine ({why}); agents run \
                         as loopd's own user and can read everything it can. Install the \
                         `bubblewrap` package (see docs/security.md)"
                    )),
                ),
            }),
        }
    }

    /// `bwrap` or `none`, as `/healthz` says it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Bwrap(_) => "bwrap",
            Self::None => "none",
        }
    }

    /// Whether the agent process runs as root (then Claude Code refuses
    /// `bypassPermissions`, and loopd has to hold that mode itself).
    pub fn agent_is_root(&self) -> bool {
        match self {
            // As root, the agent gets a uid of its own (`remap_uid`).
            Self::Bwrap(_) => false,
            Self::None => nix::unistd::geteuid().is_root(),
        }
    }

    /// The command that runs `program args` in this sandbox with `mounts`
    /// and `cwd` (the environment is the caller's to set).
    pub fn command(
        &self,
        program: &Path,
        args: &[String],
        mounts: &[Mount],
        cwd: &Path,
    ) -> Command {
        match self {
            Self::None => {
                let mut cmd = Command::new(program);
                cmd.args(args).current_dir(cwd);
                cmd
            }
            Self::Bwrap(b) => {
                let program = fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
                let mut all = program_mounts(&program);
                all.extend_from_slice(mounts);
                let mut cmd = Command::new(&b.bin);
                cmd.args(b.wrap(&program, args, &all, cwd)).current_dir("/");
                cmd
            }
        }
    }
}

impl Bwrap {
    /// Finds `bwrap` and runs `true` in a sandbox like an agent's, once per
    /// process: the answer depends only on the machine and loopd's uid (a
    /// test process starts many servers).
    fn probe() -> Result<Self, String> {
        static PROBED: std::sync::OnceLock<Result<Bwrap, String>> = std::sync::OnceLock::new();
        PROBED.get_or_init(Self::probe_now).clone()
    }

    fn probe_now() -> Result<Self, String> {
        let bin = which::which("bwrap").map_err(|_| "`bwrap` is not on PATH".to_owned())?;
        let remap_uid = nix::unistd::geteuid().is_root();
        let mut system = Vec::new();
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = fs::read_link(path).map_err(|e| format!("{dir}: {e}"))?;
                    system.extend([
                        "--symlink".into(),
                        target.display().to_string(),
                        (*dir).into(),
                    ]);
                }
                Ok(_) => system.extend(["--ro-bind".into(), (*dir).into(), (*dir).into()]),
                Err(_) => {}
            }
        }
        // /etc/resolv.conf may point into /run, which is not bound.
        if let Ok(target) = fs::canonicalize("/etc/resolv.conf")
            && !target.starts_with("/etc")
            && !target.starts_with("/usr")
        {
            let t = target.display().to_string();
            system.extend(["--ro-bind".into(), t.clone(), t]);
        }
        let bwrap = Self {
            bin,
            system,
            masked: unreadable_to_others(Path::new("/etc")),
            remap_uid,
        };
        let out = Command::new(&bwrap.bin)
            .args(bwrap.wrap(Path::new("/bin/true"), &[], &[], Path::new("/")))
            .current_dir("/")
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", bwrap.bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "a test sandbox failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(bwrap)
    }

    /// The bwrap arguments for one agent.
    fn wrap(&self, program: &Path, args: &[String], mounts: &[Mount], cwd: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--share-net",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "loopd-agent",
        ]
        .map(str::to_owned)
        .to_vec();
        // Its own user namespace, and no further ones inside it (they would
        // open more of the kernel to the agent).
        a.extend(["--unshare-user".into(), "--disable-userns".into()]);
        if self.remap_uid {
            let id = SANDBOX_UID.to_string();
            a.extend(["--uid".into(), id.clone(), "--gid".into(), id]);
        }
        a.extend(self.system.iter().cloned());
        for (path, dir) in &self.masked {
            let p = path.display().to_string();
            if *dir {
                a.extend(["--tmpfs".into(), p]);
            } else {
                a.extend(["--ro-bind".into(), "/dev/null".into(), p]);
            }
        }
        a.extend(
            [
                "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp",
                "--tmpfs", "/run",
            ]
            .map(str::to_owned),
        );
        for mount in mounts {
            let (flag, src, dest) = match mount {
                Mount::ReadOnly(p) => ("--ro-bind", p, p),
                Mount::ReadWrite(p) => ("--bind", p, p),
                Mount::ReadOnlyAt { src, dest } => ("--ro-bind", src, dest),
                Mount::Empty(p) => {
                    a.extend(["--tmpfs".into(), p.display().to_string()]);
                    continue;
                }
            };
            a.extend([
                flag.into(),
                src.display().to_string(),
                dest.display().to_string(),
            ]);
        }
        // Read-only once every mount point inside has been made.
        for mount in mounts {
            if let Mount::Empty(p) = mount {
                a.extend(["--remount-ro".into(), p.display().to_string()]);
            }
        }
        a.extend(["--chdir".into(), cwd.display().to_string(), "--".into()]);
        a.push(program.display().to_string());
        a.extend(args.iter().cloned());
        a
    }
}

/// What the agent's own program needs beyond the system: the `node_modules`
/// it was installed in (npm), else the file alone (the native installer's
/// single binary); nothing when it is under a system directory.
fn program_mounts(program: &Path) -> Vec<Mount> {
    if SYSTEM_DIRS.iter().any(|d| program.starts_with(d)) {
        return Vec::new();
    }
    let path = program
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "node_modules"))
        .unwrap_or(program);
    vec![Mount::ReadOnly(path.to_owned())]
}

/// Files and directories under `root` that others may not read, as
/// (path, is a directory). Symlinks are not followed; a hidden directory
/// is not descended into.
fn unreadable_to_others(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = meta.file_type();
            if ft.is_symlink() {
                continue;
            }
            let mode = meta.mode();
            if ft.is_dir() {
                if mode & 0o005 != 0o005 {
                    out.push((path, true));
                } else {
                    stack.push(path);
                }
            } else if ft.is_file() && mode & 0o004 == 0 {
                out.push((path, false));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bwrap(remap_uid: bool) -> Bwrap {
        Bwrap {
            bin: "/usr/bin/bwrap".into(),
            system: vec!["--ro-bind".into(), "/usr".into(), "/usr".into()],
            masked: vec![
                ("/etc/shadow".into(), false),
                ("/etc/ssl/private".into(), true),
            ],
            remap_uid,
        }
    }

    fn pos(args: &[String], window: &[&str]) -> usize {
        args.windows(window.len())
            .position(|w| w == window)
            .unwrap_or_else(|| panic!("{window:?} not in {args:?}"))
    }

    #[test]
    fn an_agent_gets_fresh_namespaces_its_mounts_and_nothing_else() {
        let mounts = [
            Mount::Empty("/d".into()),
            Mount::ReadWrite("/d/loops/1/workspace".into()),
            Mount::ReadOnly("/d/repos/app/.git".into()),
            Mount::ReadWrite("/d/repos/app/.git/objects".into()),
            Mount::ReadOnlyAt {
                src: "/root/.claude/.credentials.json".into(),
                dest: "/d/loops/1/home/.claude/.credentials.json".into(),
            },
        ];
        let a = bwrap(true).wrap(
            Path::new("/opt/claude"),
            &["-p".into()],
            &mounts,
            Path::new("/d/loops/1/workspace"),
        );
        for flag in [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--share-net",
        ] {
            assert!(a.contains(&flag.to_owned()), "{flag}");
        }
        pos(&a, &["--uid", "1000", "--gid", "1000"]);
        pos(&a, &["--ro-bind", "/dev/null", "/etc/shadow"]);
        pos(&a, &["--tmpfs", "/etc/ssl/private"]);
        pos(&a, &["--proc", "/proc"]);
        pos(&a, &["--tmpfs", "/tmp"]);
        let hidden = pos(&a, &["--tmpfs", "/d"]);
        let ws = pos(
            &a,
            &["--bind", "/d/loops/1/workspace", "/d/loops/1/workspace"],
        );
        assert!(
            hidden < ws,
            "the data directory is emptied before the loop's parts come back"
        );
        let ro = pos(&a, &["--remount-ro", "/d"]);
        assert!(
            ro > pos(&a, &["--ro-bind", "/root/.claude/.credentials.json"]),
            "and read-only after them"
        );
        let git = pos(&a, &["--ro-bind", "/d/repos/app/.git", "/d/repos/app/.git"]);
        let objects = pos(
            &a,
            &[
                "--bind",
                "/d/repos/app/.git/objects",
                "/d/repos/app/.git/objects",
            ],
        );
        assert!(
            ws < git && git < objects,
            "mounts keep their order: rw inside ro"
        );
        pos(
            &a,
            &[
                "--ro-bind",
                "/root/.claude/.credentials.json",
                "/d/loops/1/home/.claude/.credentials.json",
            ],
        );
        // Masks come after /etc is bound, so they hide what it showed.
        assert!(
            pos(&a, &["--ro-bind", "/usr", "/usr"]) < pos(&a, &["--tmpfs", "/etc/ssl/private"])
        );
        let end = pos(
            &a,
            &["--chdir", "/d/loops/1/workspace", "--", "/opt/claude", "-p"],
        );
        assert_eq!(end + 5, a.len(), "the program and its arguments come last");
        assert!(ro < end);
        assert!(
            !bwrap(false)
                .wrap(Path::new("/x"), &[], &[], Path::new("/"))
                .contains(&"--uid".to_owned())
        );
    }

    /// Whether a process with this exact command line runs on the host.
    fn running(cmdline: &str) -> bool {
        fs::read_dir("/proc").unwrap().flatten().any(|e| {
            fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline)
        })
    }

    /// Needs a working bubblewrap (CI installs it): no sweep, no marker,
    /// only the PID namespace ends a process that left the agent's session.
    #[test]
    fn no_process_outlives_its_sandbox_by_construction() {
        let (sandbox, warning) =
            Sandbox::resolve(SandboxMode::Bwrap).expect("bubblewrap works here");
        assert!(warning.is_none());
        let tmp = tempfile::tempdir().unwrap();
        let script = "setsid nohup sleep 4711 >/dev/null 2>&1 & exec sleep 4712";
        let mut child = sandbox
            .command(
                Path::new("/bin/sh"),
                &["-c".into(), script.into()],
                &[Mount::ReadWrite(tmp.path().to_owned())],
                tmp.path(),
            )
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(running("sleep 4711") && running("sleep 4712")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the sleepers never ran"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL to bwrap alone
        child.wait().unwrap();
        while running("sleep 4711") || running("sleep 4712") {
            assert!(
                std::time::Instant::now() < deadline,
                "a process outlived its sandbox"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn the_program_brings_its_node_modules_or_its_directory() {
        assert_eq!(
            program_mounts(Path::new(
                "/w/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
            )),
            vec![Mount::ReadOnly("/w/node_modules".into())]
        );
        assert_eq!(
            program_mounts(Path::new("/home/u/.local/share/claude/versions/2.1/claude")),
            vec![Mount::ReadOnly(
                "/home/u/.local/share/claude/versions/2.1/claude".into()
            )]
        );
        assert!(program_mounts(Path::new("/usr/local/bin/claude")).is_empty());
    }

    #[test]
    fn files_others_cannot_read_are_found_and_symlinks_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("public"), "x").unwrap();
        fs::write(root.join("secret"), "x").unwrap();
        fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::create_dir(root.join("private")).unwrap();
        fs::write(root.join("private/key"), "x").unwrap();
        fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(root.join("open")).unwrap();
        fs::write(root.join("open/inner"), "x").unwrap();
        fs::set_permissions(root.join("open/inner"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(root.join("secret"), root.join("link")).unwrap();
        assert_eq!(
            unreadable_to_others(root),
            vec![
                (root.join("open/inner"), false),
                (root.join("private"), true),
                (root.join("secret"), false),
            ]
        );
    }
}
