//! The Claude Code CLI as a child process, in stream-json mode with the stdio
//! permission-prompt protocol. One task writes stdin (only valid JSON lines,
//! from the runtime's inputs), one reads stdout (lines capped in length)
//! through [`super::mapping`], one keeps the last lines of stderr for crash
//! reports. The child runs in its own process group with a built environment.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::mapping::{MapState, map_line_into};
use super::process::{signal_group, sweep};
use super::sandbox::Sandbox;
use super::{
    AgentHandle, AgentInput, AgentOutput, AgentProcess, AgentSpec, CHANNEL, Decision, Session,
    SpawnError,
};

/// Longest stdout line read (a tool result can carry a whole file).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// stderr lines kept for the crash message.
const STDERR_LINES: usize = 20;
/// How long a graceful exit may take before SIGTERM, and SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// The command line for a spec (without the binary).
pub fn args(spec: &AgentSpec) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
        "--permission-prompt-tool",
        "stdio",
        "--permission-mode",
        spec.mode.as_str(),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if spec.allow_bypass {
        args.push("--allow-dangerously-skip-permissions".to_owned());
    }
    match &spec.session {
        Session::New(id) => args.extend(["--session-id".to_owned(), id.clone()]),
        Session::Resume(id) => args.extend(["--resume".to_owned(), id.clone()]),
    }
    args
}

/// Starts the CLI in `sandbox`. Call it from a runtime worker thread, not a
/// blocking-pool one: bubblewrap's `--die-with-parent` follows the thread
/// that spawned it, and blocking threads exit when idle.
pub fn spawn(bin: &Path, sandbox: &Sandbox, spec: AgentSpec) -> Result<AgentProcess, SpawnError> {
    // Found here, not by the sandbox (which would only fail after starting).
    let bin = which::which(bin).map_err(|_| not_found(bin))?;
    let mut child = Command::from(sandbox.command(&bin, &args(&spec), &spec.mounts, &spec.cwd))
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                not_found(&bin)
            } else {
                SpawnError(format!("could not start `{}`: {e}", bin.display()))
            }
        })?;
    let pid = child
        .id()
        .ok_or_else(|| SpawnError("the agent exited at once".into()))?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let (input_tx, input_rx) = mpsc::channel(CHANNEL);
    let (output_tx, output_rx) = mpsc::channel(CHANNEL);
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));

    tokio::spawn(write_stdin(stdin, input_rx));
    tokio::spawn(keep_stderr(stderr, stderr_tail.clone()));
    tokio::spawn(read_stdout(stdout, output_tx, stderr_tail));
    tracing::info!(pid, session = %spec.session.id(), "claude agent started");
    Ok(AgentProcess {
        input: input_tx,
        output: output_rx,
        handle: AgentHandle::Claude(Box::new(ClaudeHandle {
            child,
            pgid: pid,
            marker: spec.marker,
        })),
    })
}

fn not_found(bin: &Path) -> SpawnError {
    SpawnError(format!(
        "the Claude Code CLI was not found at `{}`: install it with \
         `npm install -g @anthropic-ai/claude-code` (and set ANTHROPIC_API_KEY or log in \
         with `claude`), or point --claude-bin / LOOPD_CLAUDE_BIN at it",
        bin.display()
    ))
}

/// The stdin line for an input: always one valid JSON object.
pub fn input_line(input: &AgentInput, request_no: u64) -> Value {
    match input {
        AgentInput::User(text) => json!({
            "type": "user",
            "message": {"role": "user", "content": text},
            "parent_tool_use_id": null,
            "session_id": "",
        }),
        AgentInput::Answer {
            request_id,
            decision,
        } => {
            let response = match decision {
                Decision::Allow { updated_input } => {
                    json!({"behavior": "allow", "updatedInput": updated_input})
                }
                Decision::Deny { message } => json!({"behavior": "deny", "message": message}),
            };
            json!({"type": "control_response", "response": {
                "subtype": "success", "request_id": request_id, "response": response,
            }})
        }
        AgentInput::Interrupt => json!({
            "type": "control_request",
            "request_id": format!("loopd_{request_no}"),
            "request": {"subtype": "interrupt"},
        }),
        AgentInput::SetMode(mode) => json!({
            "type": "control_request",
            "request_id": format!("loopd_{request_no}"),
            "request": {"subtype": "set_permission_mode", "mode": mode.as_str()},
        }),
    }
}

async fn write_stdin(mut stdin: ChildStdin, mut inputs: mpsc::Receiver<AgentInput>) {
    let mut request_no = 0;
    while let Some(input) = inputs.recv().await {
        request_no += 1;
        let mut line =
            serde_json::to_vec(&input_line(&input, request_no)).expect("JSON serializes");
        line.push(b'\n');
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
    // Dropping stdin closes it: between turns, Claude Code then exits.
}

async fn keep_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(target: "loopd::agent::stderr", "{line}");
        let mut tail = tail.lock().expect("stderr tail poisoned");
        tail.push_back(line.chars().take(500).collect());
        if tail.len() > STDERR_LINES {
            tail.pop_front();
        }
    }
}

async fn read_stdout(
    mut stdout: tokio::process::ChildStdout,
    output: mpsc::Sender<AgentOutput>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut state = MapState::default();
    // Past a line longer than MAX_LINE: drop bytes until its end.
    let mut skipping = false;
    loop {
        match stdout.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading agent output");
                break;
            }
        }
        // Every complete line read so far is mapped in place and handed over
        // in one batch: one channel send (one wake-up of the loop's task) per
        // read, and no copy of any line.
        let mut batch = Vec::with_capacity(64);
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &buf) {
            if skipping {
                skipping = false;
            } else {
                map_line_into(&mut state, &buf[start..end], &mut batch);
            }
            start = end + 1;
        }
        let _ = buf.split_to(start);
        if buf.len() > MAX_LINE {
            tracing::warn!("skipped an agent output line longer than {MAX_LINE} bytes");
            buf.clear();
            skipping = true;
        }
        if !batch.is_empty() && output.send(AgentOutput::Events(batch)).await.is_err() {
            return;
        }
    }
    // Give stderr a moment to deliver the last words of a crash.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tail: Vec<String> = stderr_tail
        .lock()
        .expect("stderr tail poisoned")
        .iter()
        .cloned()
        .collect();
    let reason = if tail.is_empty() {
        "the Claude Code process exited".to_owned()
    } else {
        format!("the Claude Code process exited: {}", tail.join(" | "))
    };
    let _ = output.send(AgentOutput::Exited { reason }).await;
}

async fn exited(child: &mut Child, wait: Duration) -> bool {
    tokio::time::timeout(wait, child.wait()).await.is_ok()
}

/// Owns the child: stopping ends its group and sweeps what left it.
pub struct ClaudeHandle {
    child: Child,
    pgid: u32,
    marker: String,
}

impl ClaudeHandle {
    /// Waits for a graceful exit (stdin closed), then SIGTERM, then SIGKILL
    /// the group; sweeps marked leftovers; always reaps the child.
    pub async fn stop(mut self) {
        if !exited(&mut self.child, GRACE).await {
            signal_group(self.pgid, Signal::SIGTERM);
            if !exited(&mut self.child, GRACE).await {
                signal_group(self.pgid, Signal::SIGKILL);
                let _ = self.child.wait().await;
            }
        }
        // Whatever stayed in the group, and whatever left it.
        signal_group(self.pgid, Signal::SIGKILL);
        sweep(&self.marker).await;
        tracing::info!(pid = self.pgid, "claude agent stopped");
    }

    /// SIGKILL the group at once, reap, sweep.
    pub async fn kill(mut self) {
        signal_group(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait().await;
        sweep(&self.marker).await;
        tracing::info!(pid = self.pgid, "claude agent killed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::PermissionMode;

    fn spec(session: Session, mode: PermissionMode) -> AgentSpec {
        AgentSpec {
            marker: "m".into(),
            cwd: "/tmp".into(),
            env: vec![],
            session,
            mode,
            allow_bypass: false,
            mounts: vec![],
        }
    }

    #[test]
    fn command_line_starts_or_resumes_in_the_mode_given() {
        let a = args(&spec(
            Session::New("s1".into()),
            PermissionMode::AcceptEdits,
        ));
        assert!(a.windows(2).any(|w| w == ["--session-id", "s1"]));
        assert!(
            a.windows(2)
                .any(|w| w == ["--permission-mode", "acceptEdits"])
        );
        assert!(
            a.windows(2)
                .any(|w| w == ["--permission-prompt-tool", "stdio"])
        );
        assert!(a.contains(&"--include-partial-messages".to_owned()));
        assert!(!a.contains(&"--allow-dangerously-skip-permissions".to_owned()));
        let mut resumed = spec(Session::Resume("s1".into()), PermissionMode::Default);
        resumed.allow_bypass = true;
        let b = args(&resumed);
        assert!(b.windows(2).any(|w| w == ["--resume", "s1"]));
        assert!(b.windows(2).any(|w| w == ["--permission-mode", "default"]));
        assert!(b.contains(&"--allow-dangerously-skip-permissions".to_owned()));
    }

    #[test]
    fn every_input_is_one_line_of_valid_json() {
        let inputs = [
            AgentInput::User("line one\nline two \"quoted\"".into()),
            AgentInput::Answer {
                request_id: "r1".into(),
                decision: Decision::Allow {
                    updated_input: json!({"command": "ls"}),
                },
            },
            AgentInput::Answer {
                request_id: "r2".into(),
                decision: Decision::Deny {
                    message: "no".into(),
                },
            },
            AgentInput::Interrupt,
            AgentInput::SetMode(PermissionMode::Plan),
        ];
        for (i, input) in inputs.iter().enumerate() {
            let text = serde_json::to_string(&input_line(input, i as u64)).unwrap();
            assert!(!text.contains('\n'));
            let back: Value = serde_json::from_str(&text).unwrap();
            assert!(back["type"].is_string());
        }
        let allow = input_line(&inputs[1], 0);
        assert_eq!(
            allow["response"]["response"]["updatedInput"],
            json!({"command": "ls"})
        );
        assert_eq!(allow["response"]["request_id"], "r1");
        assert_eq!(
            input_line(&inputs[0], 0)["message"]["content"],
            "line one\nline two \"quoted\""
        );
    }
}
