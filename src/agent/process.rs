//! Ending an agent and everything it started: its process group, then any
//! process still carrying the loop's marker in its environment (Claude Code's
//! Bash tool runs commands in their own session, beyond the group's reach).

use std::fs;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The environment variable whose value marks every process of one agent.
pub const MARKER_VAR: &str = "LOOP_SANDBOX_ID";

/// Signals a whole process group (ignoring one that is already gone).
pub fn signal_group(pgid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// Pids of live processes whose environment has `MARKER_VAR=marker`.
pub fn marked(marker: &str) -> Vec<i32> {
    let needle = format!("{MARKER_VAR}={marker}");
    find(|var| var == needle.as_bytes())
}

/// Pids of live processes of any agent of the loop `loop_uuid` (markers
/// are `<loop uuid>.<agent>`).
pub fn marked_loop(loop_uuid: &str) -> Vec<i32> {
    let prefix = format!("{MARKER_VAR}={loop_uuid}.");
    find(|var| var.starts_with(prefix.as_bytes()))
}

fn find(matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(&matches))
        })
        .collect()
}

/// Kills every process marked with `marker`, until none is left (a few
/// rounds, for processes forked meanwhile). A process in the middle of an
/// `exec` briefly has no readable environment, so one empty round is not
/// enough: it stops after two in a row. Returns how many were killed.
pub async fn sweep(marker: &str) -> usize {
    let mut killed = 0;
    let mut empty_rounds = 0;
    for _ in 0..6 {
        let pids = marked(marker);
        if pids.is_empty() {
            empty_rounds += 1;
            if empty_rounds == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        empty_rounds = 0;
        for pid in &pids {
            if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if killed > 0 {
        tracing::info!(killed, "swept processes an agent left behind");
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[tokio::test]
    async fn sweep_kills_marked_processes_that_left_the_group() {
        let marker = crate::ids::random_hex(8);
        // `setsid` puts the sleeper in a session of its own, like Claude Code's Bash tool.
        let mut child = Command::new("setsid")
            .args(["sleep", "30"])
            .env(MARKER_VAR, &marker)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while marked(&marker).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the sleeper never showed up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sweep(&marker).await >= 1);
        let _ = child.wait();
        assert!(marked(&marker).is_empty());
    }
}
