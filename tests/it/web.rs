//! The web chat in a real browser: `tests/web/chat.mjs` drives Debian's
//! Chromium with Playwright against the real server (echo agent). Its
//! screenshots land in `target/web-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::claude_cli::node_modules;
use crate::support::{PASSWORD, TestApp};

/// Debian's Chromium, installed with apt on first use when missing (as root).
fn chromium() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
        if !bin.exists() {
            let ok = Command::new("sh")
                .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "the browser tests need Chromium: `apt-get install chromium` (or set CHROMIUM)");
        }
        bin
    })
    .clone()
}

/// Runs a browser script of `tests/web/` against the server at `addr` (as
/// alice) with `env`; asserts it passed and printed `done`.
async fn run_script(
    script: &str,
    addr: std::net::SocketAddr,
    env: Vec<(&'static str, String)>,
    done: &str,
) {
    let (browser, modules) = (chromium(), node_modules());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (script, shots) = (
        root.join("tests/web").join(script),
        root.join("target/web-screenshots"),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("NODE_PATH", modules)
            .env("LOOPD_URL", format!("http://{addr}"))
            .env("LOOPD_USER", "alice")
            .env("LOOPD_PASSWORD", PASSWORD)
            .env("SHOTS_DIR", shots)
            .env("CHROMIUM", browser)
            .envs(env)
            .output()
            .expect("node runs the browser test")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(done), "{stdout}");
}

#[tokio::test]
async fn the_web_chat_works_in_a_real_browser() {
    let app = TestApp::start().await;
    let (bot_token, _) = app
        .accounts()
        .tokens
        .create("alice", Some("bot".into()), Default::default())
        .unwrap();
    // A repository a loop can be made on (the diff step).
    let repo = app.dir.join("repos/app");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    crate::support::git(&repo, &["init", "-q", "-b", "main"]);
    crate::support::git(&repo, &["add", "README.md"]);
    crate::support::git(&repo, &["commit", "-q", "-m", "first"]);
    let env = vec![
        ("LOOPD_BOT_TOKEN", bot_token),
        ("LOOPD_DATA_DIR", app.dir.display().to_string()),
    ];
    run_script("chat.mjs", app.addr, env, "web chat: all").await;
}

#[tokio::test]
async fn with_claude_code_the_page_shows_what_a_tool_wrote() {
    let rig = crate::claude::Rig::start().await;
    let env = vec![("LOOPD_LOOP", rig.loop_id.clone())];
    run_script("claude.mjs", rig.app.addr, env, "claude web chat: all").await;
    let written = std::fs::read_to_string(rig.workspace().join("from-claude.txt")).unwrap();
    assert_eq!(written.trim_end(), "written by the real CLI");
}
