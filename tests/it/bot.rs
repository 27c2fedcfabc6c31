//! `examples/bot.py` against the real server (echo agent): it streams the
//! reply, answers prompts typed on its stdin, and resumes with Last-Event-ID.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::json;

use crate::support::{Auth, TestApp};

/// A Python with httpx (installed with pip on first use).
fn python() -> &'static str {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let has = Command::new("python3")
            .args(["-c", "import httpx"])
            .status()
            .is_ok_and(|s| s.success());
        if !has {
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "httpx"])
                .status()
                .expect("python3 is needed to run examples/bot.py");
            assert!(ok.success(), "pip install httpx failed");
        }
    });
    "python3"
}

async fn run_bot(app: &TestApp, token: &str, loop_id: &str, args: &[&str], stdin: &str) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bot.py");
    let mut child = Command::new(python())
        .arg(script)
        .args([
            "--url",
            &format!("http://{}", app.addr),
            "--token",
            token,
            "--loop",
            loop_id,
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

async fn setup() -> (TestApp, String, String) {
    let app = TestApp::start().await;
    let Auth::Bearer(token) = app.bearer("alice").await else {
        unreachable!()
    };
    let loop_id = app
        .create_loop(&Auth::Bearer(token.clone()), json!({}))
        .await;
    (app, token, loop_id)
}

#[tokio::test]
async fn the_bot_streams_answers_a_prompt_and_resumes_after_a_drop() {
    let (app, token, loop_id) = setup().await;
    let out = run_bot(
        &app,
        &token,
        &loop_id,
        &["--drop-after", "2", "/permission deploy now"],
        "y\n",
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("reconnecting after event"), "{stderr}");
    assert!(
        stdout.contains("[Bash] wants to run: deploy now"),
        "{stdout}"
    );
    assert!(stdout.contains("Allowed: deploy now"), "{stdout}");
}

#[tokio::test]
async fn the_bot_answers_questions_from_the_terminal() {
    let (app, token, loop_id) = setup().await;
    let out = run_bot(&app, &token, &loop_id, &["/question"], "2\n1,3\n").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#""Which color do you prefer?":"Blue""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""Which sizes do you need?":"S, L""#),
        "{stdout}"
    );
}
