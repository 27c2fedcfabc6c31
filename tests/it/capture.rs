//! Records the real CLI's stdout for scripted prompts into
//! `tests/fixtures/claude/*.jsonl`, the input of the mapping's table tests.
//! Run by hand: `cargo test --test it capture -- --ignored`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::claude_cli::{agent_env, claude_bin};

/// Runs one CLI session: writes each step's line after the previous
/// `result` (or request), answering permission requests as told.
fn record(name: &str, prompts: &[&str], answer: impl Fn(&Value) -> Option<Value>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(crate::mock_anthropic::start());
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    // Exactly the command line loopd runs the CLI with.
    let spec = loopd::agent::AgentSpec {
        marker: "capture".into(),
        cwd: cwd.path().to_owned(),
        env: Vec::new(),
        session: loopd::agent::Session::New(uuid::Uuid::new_v4().to_string()),
        mode: loopd::agent::PermissionMode::Default,
        allow_bypass: false,
        mounts: Vec::new(),
    };
    let mut child = Command::new(claude_bin())
        .args(loopd::agent::claude::args(&spec))
        .current_dir(cwd.path())
        .env_clear()
        .envs(agent_env(&mock, home.path()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A blocked read cannot hang the recorder: the CLI is killed at the deadline.
    let pid = child.id();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    });
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let mut captured = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for prompt in prompts {
        let msg = json!({"type": "user", "message": {"role": "user", "content": prompt}});
        writeln!(stdin, "{msg}").unwrap();
        loop {
            assert!(Instant::now() < deadline, "capture {name} timed out");
            let line = lines.next().expect("the CLI ended early").unwrap();
            let parsed: Value = serde_json::from_str(&line).unwrap();
            let cwd_text = cwd.path().display().to_string();
            let home_text = home.path().display().to_string();
            captured.push(
                line.replace(&cwd_text, "<cwd>")
                    .replace(&home_text, "<home>"),
            );
            if parsed["type"] == "control_request"
                && parsed["request"]["subtype"] == "can_use_tool"
                && let Some(response) = answer(&parsed)
            {
                writeln!(stdin, "{response}").unwrap();
            }
            if parsed["type"] == "result" {
                break;
            }
        }
    }
    drop(stdin);
    let _ = child.wait();
    if std::env::var_os("CAPTURE_DUMP_REQUESTS").is_some() {
        let reqs = mock.api.requests.lock().unwrap().clone();
        std::fs::write(
            format!("/tmp/requests-{name}.json"),
            serde_json::to_string_pretty(&reqs).unwrap(),
        )
        .unwrap();
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.jsonl")),
        captured.join("\n") + "\n",
    )
    .unwrap();
}

fn allow(req: &Value) -> Option<Value> {
    Some(
        json!({"type": "control_response", "response": {"subtype": "success", "request_id": req["request_id"],
        "response": {"behavior": "allow", "updatedInput": req["request"]["input"]}}}),
    )
}

#[test]
#[ignore = "records fixtures; run by hand"]
fn capture() {
    record("text", &["hello there"], |_| None);
    if std::env::var_os("CAPTURE_ONLY_TEXT").is_some() {
        return;
    }
    record("thinking", &["[[think:Let me think about it.]]"], |_| None);
    record("bash_allowed", &["[[bash:echo captured > out.txt]]"], allow);
    record("bash_failing", &["[[bash:ls /definitely/not/here]]"], allow);
    record("bash_denied", &["[[bash:touch denied.txt]]"], |req| {
        Some(
            json!({"type": "control_response", "response": {"subtype": "success", "request_id": req["request_id"],
            "response": {"behavior": "deny", "message": "User said no"}}}),
        )
    });
    record("question", &["[[ask]]"], |req| {
        let mut input = req["request"]["input"].clone();
        input["answers"] =
            json!({"Which color do you prefer?": "Blue", "Which sizes do you need?": "S, L"});
        Some(
            json!({"type": "control_response", "response": {"subtype": "success", "request_id": req["request_id"],
            "response": {"behavior": "allow", "updatedInput": input}}}),
        )
    });
    record("api_error", &["[[fail]]"], |_| None);
    record("two_turns", &["first prompt", "[[history]]"], |_| None);
}
