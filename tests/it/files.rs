//! The workspace over the API: listing, reading, a repo loop's diff, and
//! every escape attempt refused (`..`, absolute paths, symlinks out,
//! encoded dots, other users).

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{TestApp, assert_error, git};

fn workspace(app: &TestApp, loop_id: &str) -> PathBuf {
    let uuid = loop_id.strip_prefix("loop_").unwrap();
    app.dir.join("loops").join(uuid).join("workspace")
}

#[tokio::test]
async fn the_owner_reads_the_workspace_and_nothing_outside_it() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &id, "hello").await.until("done").await;
    let ws = workspace(&app, &id);
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(ws.join("blob.bin"), [0u8, 159, 146, 150]).unwrap();
    std::fs::write(app.dir.join("users.json.secret"), "outside").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ws.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../../users.json", ws.join("users")).unwrap();
    std::os::unix::fs::symlink(&app.dir, ws.join("data")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", ws.join("main-link")).unwrap();

    let (status, root) = app.get(&format!("/api/v1/loops/{id}/files"), &bearer).await;
    assert_eq!(status, StatusCode::OK, "{root}");
    let names: Vec<(&str, &str)> = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert!(names.starts_with(&[("src", "dir")]), "{names:?}");
    for want in [
        ("CLAUDE.md", "file"),
        ("blob.bin", "file"),
        ("passwd", "symlink"),
        ("data", "symlink"),
    ] {
        assert!(names.contains(&want), "{want:?} in {names:?}");
    }
    let (_, src) = app
        .get(&format!("/api/v1/loops/{id}/files?path=src"), &bearer)
        .await;
    assert_eq!(src["entries"][0]["name"], "main.rs");
    assert_eq!(src["entries"][0]["size"], 13);

    let content = |path: &str| {
        let url = format!("/api/v1/loops/{id}/files/content?path={}", urlencode(path));
        let (app, bearer) = (&app, &bearer);
        async move { app.get(&url, bearer).await }
    };
    let (status, file) = content("src/main.rs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(file["content"], "fn main() {}\n");
    assert_eq!(file["encoding"], "utf-8");
    assert_eq!(file["mime"], "text/plain");
    assert_eq!(file["truncated"], false);
    assert_eq!(content("main-link").await.1["content"], "fn main() {}\n");
    let (_, blob) = content("blob.bin").await;
    assert_eq!(
        (blob["encoding"].as_str(), blob["content"].as_str()),
        (Some("base64"), Some("AJ+Slg=="))
    );

    // Every way out is refused.
    for (path, code) in [
        ("passwd", "path_outside_workspace"),
        ("users", "path_outside_workspace"),
        ("data/users.json", "path_outside_workspace"),
        ("../meta.json", "invalid_path"),
        ("src/../../meta.json", "invalid_path"),
        ("/etc/passwd", "invalid_path"),
    ] {
        let (status, body) = content(path).await;
        assert_ne!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(!body.to_string().contains("root:"), "{path}");
    }
    let (status, body) = app
        .get(
            &format!("/api/v1/loops/{id}/files/content?path=%2e%2e%2fmeta.json"),
            &bearer,
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_path"))
    );
    let (_, body) = app
        .get(&format!("/api/v1/loops/{id}/files?path=data"), &bearer)
        .await;
    assert_eq!(body["error"]["code"], "path_outside_workspace");
    assert_eq!(
        content("nope.txt").await.1["error"]["code"],
        "file_not_found"
    );
    assert_eq!(content("src").await.1["error"]["code"], "not_a_file");
    assert_error(
        &app.get(&format!("/api/v1/loops/{id}/diff"), &bearer).await,
        400,
        "invalid_request_error",
        "no_repo",
    );

    // Only the owner, and only with loops:read.
    let bob = app.bearer("bob").await;
    assert_error(
        &app.get(&format!("/api/v1/loops/{id}/files"), &bob).await,
        403,
        "permission_error",
        "not_loop_owner",
    );
    let session = app.session("alice").await;
    let (writer, _) = app
        .token(&session, json!({"scopes": ["messages:write"]}))
        .await;
    assert_error(
        &app.get(
            &format!("/api/v1/loops/{id}/files/content?path=src/main.rs"),
            &writer,
        )
        .await,
        403,
        "permission_error",
        "insufficient_scope",
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_repo_loop_shows_its_diff_and_an_agent_rewritten_git_pointer_is_not_followed() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let repo = app.dir.join("repos/app");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    git(&repo, &["add", "README.md"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let id = app.create_loop(&bearer, json!({"repo": "app"})).await;
    app.send(&bearer, &id, "hello").await.until("done").await;
    let ws = workspace(&app, &id);
    // What the agent did: a committed change, an uncommitted one, a new file.
    std::fs::write(ws.join("README.md"), "hello\nworld\n").unwrap();
    git(&ws, &["commit", "-q", "-am", "more"]);
    std::fs::write(ws.join("README.md"), "hello\nworld\nagain\n").unwrap();
    std::fs::write(ws.join("NEW.txt"), "new\n").unwrap();

    let (status, diff) = app.get(&format!("/api/v1/loops/{id}/diff"), &bearer).await;
    assert_eq!(status, StatusCode::OK, "{diff}");
    let text = diff["diff"].as_str().unwrap();
    assert!(text.contains("+world") && text.contains("+again"), "{text}");
    // loopd's own CLAUDE.md is new to git as well.
    assert_eq!(diff["untracked"], json!(["CLAUDE.md", "NEW.txt"]));
    assert_eq!(diff["base"].as_str().unwrap().len(), 40);

    // The agent points the workspace's `.git` at a repository of its own
    // whose config would run a command: loopd's git never reads it.
    let evil = ws.join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    git(&evil, &["init", "-q"]);
    let marker = app.dir.join("pwned");
    git(
        &evil,
        &[
            "config",
            "core.fsmonitor",
            &format!("touch {}", marker.display()),
        ],
    );
    git(
        &evil,
        &[
            "config",
            "diff.external",
            &format!("touch {}", marker.display()),
        ],
    );
    std::fs::write(
        ws.join(".git"),
        format!("gitdir: {}/.git\n", evil.display()),
    )
    .unwrap();
    let (status, again) = app.get(&format!("/api/v1/loops/{id}/diff"), &bearer).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert!(again["diff"].as_str().unwrap().contains("+again"));
    assert!(!marker.exists(), "loopd's git ran the agent's command");
}
