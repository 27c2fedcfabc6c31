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

#[tokio::test]
async fn the_web_chat_works_in_a_real_browser() {
    let browser = chromium();
    let modules = node_modules();
    let app = TestApp::start().await;
    let (bot_token, _) = app
        .accounts()
        .tokens
        .create("alice", Some("bot".into()), Default::default())
        .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("target/web-screenshots");
    let script = root.join("tests/web/chat.mjs");
    let url = format!("http://{}", app.addr);
    let data_dir = app.dir.clone();
    // A repository a loop can be made on (the diff step).
    let repo = data_dir.join("repos/app");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "README.md"],
        &["commit", "-q", "-m", "first"],
    ] {
        let ok = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap();
        assert!(ok.success(), "git {args:?}");
    }
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("NODE_PATH", modules)
            .env("LOOPD_URL", url)
            .env("LOOPD_USER", "alice")
            .env("LOOPD_PASSWORD", PASSWORD)
            .env("LOOPD_BOT_TOKEN", bot_token)
            .env("LOOPD_DATA_DIR", data_dir)
            .env("SHOTS_DIR", shots)
            .env("CHROMIUM", browser)
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
    assert!(stdout.contains("web chat: all"), "{stdout}");
}

#[tokio::test]
async fn with_claude_code_the_page_shows_what_a_tool_wrote() {
    let browser = chromium();
    let modules = node_modules();
    let rig = crate::claude::Rig::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/web/claude.mjs");
    let (url, loop_id) = (format!("http://{}", rig.app.addr), rig.loop_id.clone());
    let shots = root.join("target/web-screenshots");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("NODE_PATH", modules)
            .env("LOOPD_URL", url)
            .env("LOOPD_USER", "alice")
            .env("LOOPD_PASSWORD", PASSWORD)
            .env("LOOPD_LOOP", loop_id)
            .env("SHOTS_DIR", shots)
            .env("CHROMIUM", browser)
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
    assert!(stdout.contains("claude web chat: all"), "{stdout}");
    let written = std::fs::read_to_string(rig.workspace().join("from-claude.txt")).unwrap();
    assert_eq!(written.trim_end(), "written by the real CLI");
}
