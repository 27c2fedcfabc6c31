//! The real `loopd` binary: first start, user and token commands (also
//! against a running server), errors, environment variables.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Auth, PASSWORD, TestApp};

fn loopd(dir: &Path, args: &[&str]) -> Output {
    loopd_with_stdin(dir, args, None)
}

fn loopd_with_stdin(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("LOOPD_DATA_DIR")
        .envs(database_env(dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// `loopd serve` (echo agent) on `port` over `dir`, with `env`; its stderr
/// arrives line by line on the receiver.
fn serve(
    dir: &Path,
    port: u16,
    env: &[(&str, &str)],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args([
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--agent",
            "echo",
        ])
        .env("LOOPD_DATA_DIR", dir)
        .envs(database_env(dir))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// On Postgres runs: the data directory's database, for the binary.
fn database_env(dir: &Path) -> Vec<(&'static str, String)> {
    crate::pg::on_postgres()
        .then(|| ("LOOPD_DATABASE_URL", crate::pg::database_for(dir)))
        .into_iter()
        .collect()
}

/// `auth` is refused with `code` (see [`crate::support::seen_by_server`]).
async fn until_refused(app: &TestApp, auth: &Auth, code: &str) {
    crate::support::seen_by_server(code, async || {
        let got = app.get("/api/auth/me", auth).await;
        got.0 == StatusCode::UNAUTHORIZED && got.1["error"]["code"] == code
    })
    .await;
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    assert!(out.stdout.is_empty(), "errors go to stderr only");
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[tokio::test]
async fn first_start_creates_admin_and_prints_the_password_once() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut child, rx) = serve(tmp.path(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut url, mut user, mut password) = (None, None, None);
    while password.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("no password printed");
        let field = |name: &str| line.trim().strip_prefix(name).map(|v| v.trim().to_owned());
        url = url.or(field("open:"));
        user = user.or(field("username:"));
        password = password.or(field("password:"));
    }
    assert_eq!(url.unwrap(), format!("http://127.0.0.1:{port}/"));
    assert_eq!(user.as_deref(), Some("admin"));
    let password = password.unwrap();

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut logged_in = None;
    while logged_in.is_none() && Instant::now() < deadline {
        if let Ok(resp) = http
            .post(format!("{base}/api/auth/login"))
            .json(&json!({"username": "admin", "password": password}))
            .send()
            .await
        {
            logged_in = Some(resp.json::<Value>().await.unwrap());
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        logged_in.unwrap(),
        json!({"user_id": "admin", "admin": true})
    );

    // SIGTERM: a graceful, successful exit.
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The second start creates nobody and prints no password.
    let listed = stdout(&loopd(tmp.path(), &["user", "list"]));
    assert_eq!(listed, "admin\tadmin\n");
}

#[tokio::test]
async fn a_corrupt_file_makes_serve_exit_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("api-tokens.json");
    // On a shared database: a document that does not parse as what it holds.
    let database = crate::pg::on_postgres().then(|| crate::pg::database_for(tmp.path()));
    match &database {
        None => std::fs::write(&path, "{ nope").unwrap(),
        Some(url) => crate::pg::set_document(url, "api-tokens", json!({"tokens": 5})),
    }
    let out = loopd(
        tmp.path(),
        &["serve", "--bind", "127.0.0.1:0", "--agent", "echo"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let Some(url) = database else {
        assert!(
            err.contains(&path.display().to_string()) && err.contains("line 1"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ nope");
        return;
    };
    assert!(err.contains("database document api-tokens"), "{err}");
    let (left, _) = crate::pg::document(&url, "api-tokens").unwrap();
    assert_eq!(left, json!({"tokens": 5}), "left as it was");
}

#[test]
fn user_commands_and_their_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let generated = stdout(&loopd(dir, &["user", "add", "root", "--admin"]));
    let generated = generated.trim_end();
    assert!(
        generated.len() >= 16 && !generated.contains(char::is_whitespace),
        "{generated}"
    );
    let added = loopd_with_stdin(
        dir,
        &["user", "add", "carol", "--password-stdin"],
        Some("carol's password\n"),
    );
    assert_eq!(stdout(&added), "", "a given password is not echoed");

    assert_eq!(
        stdout(&loopd(dir, &["user", "list"])),
        "carol\tmember\nroot\tadmin\n"
    );
    let json: Value =
        serde_json::from_str(&stdout(&loopd(dir, &["user", "list", "--json"]))).unwrap();
    assert_eq!(
        json,
        json!([{"name": "carol", "admin": false}, {"name": "root", "admin": true}])
    );

    let accounts = crate::support::accounts(dir);
    assert!(accounts.users.verify("root", generated).is_some());
    assert!(accounts.users.verify("carol", "carol's password").is_some());

    let err = failed(&loopd(dir, &["user", "add", "carol"]));
    assert!(err.contains("already exists"), "{err}");
    let err = failed(&loopd_with_stdin(
        dir,
        &["user", "add", "dave", "--password-stdin"],
        Some("short\n"),
    ));
    assert!(err.contains("password"), "{err}");
    let err = failed(&loopd(dir, &["user", "add", "bad\tname"]));
    assert!(err.contains("not a valid user name"), "{err}");
    let err = failed(&loopd(dir, &["user", "remove", "nobody"]));
    assert!(err.contains("no user `nobody`"), "{err}");

    let new = loopd_with_stdin(
        dir,
        &["user", "passwd", "carol", "--password-stdin"],
        Some("another password\n"),
    );
    assert_eq!(stdout(&new), "");
    // Opened again, as a new process would.
    let accounts = crate::support::accounts(dir);
    assert!(accounts.users.verify("carol", "another password").is_some());
    stdout(&loopd(dir, &["user", "remove", "carol"]));
    assert_eq!(stdout(&loopd(dir, &["user", "list"])), "root\tadmin\n");
}

#[test]
fn token_commands_and_their_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    stdout(&loopd(dir, &["user", "add", "ci"]));
    let token = stdout(&loopd(
        dir,
        &["token", "create", "--user", "ci", "--label", "nightly"],
    ));
    let token = token.trim_end();
    assert!(token.starts_with("la_") && token.len() == 51, "{token}");
    stdout(&loopd(dir, &["token", "create", "--user", "ci"]));

    let listed = stdout(&loopd(dir, &["token", "list", "--user", "ci"]));
    let rows: Vec<Vec<&str>> = listed.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.len() == 4 && r[0].starts_with("tok_") && r[3] == "-"),
        "{listed}"
    );
    assert_eq!(rows[0][1], "-", "newest first, no label");
    assert_eq!(rows[1][1], "nightly");
    let json: Value = serde_json::from_str(&stdout(&loopd(
        dir,
        &["token", "list", "--user", "ci", "--json"],
    )))
    .unwrap();
    assert_eq!(json[1]["label"], "nightly");
    assert!(json[1]["tokenId"].as_str().unwrap().starts_with("tok_"));

    stdout(&loopd(
        dir,
        &["token", "revoke", "--user", "ci", rows[1][0]],
    ));
    assert_eq!(
        stdout(&loopd(dir, &["token", "list", "--user", "ci"]))
            .lines()
            .count(),
        1
    );
    let err = failed(&loopd(
        dir,
        &["token", "revoke", "--user", "ci", rows[1][0]],
    ));
    assert!(err.contains("no token"), "{err}");
    let err = failed(&loopd(dir, &["token", "create", "--user", "ghost"]));
    assert!(err.contains("no user `ghost`"), "{err}");

    // Limits, and rotation with a grace.
    let scoped = stdout(&loopd(
        dir,
        &[
            "token",
            "create",
            "--user",
            "ci",
            "--label",
            "reader",
            "--scope",
            "loops:read",
            "--scope",
            "choices:write",
            "--expires-at",
            "2999-01-01T00:00:00Z",
            "--max-permission-mode",
            "plan",
        ],
    ));
    let err = failed(&loopd(
        dir,
        &["token", "create", "--user", "ci", "--scope", "loops:admin"],
    ));
    assert!(err.contains("`loops:admin` is not a scope"), "{err}");
    let json: Value = serde_json::from_str(&stdout(&loopd(
        dir,
        &["token", "list", "--user", "ci", "--json"],
    )))
    .unwrap();
    let reader = &json[0];
    assert_eq!(reader["label"], "reader");
    assert_eq!(reader["scopes"], json!(["loops:read", "choices:write"]));
    assert_eq!(reader["maxPermissionMode"], "plan");
    assert_eq!(reader["expiresAt"], "2999-01-01T00:00:00Z");
    let id = reader["tokenId"].as_str().unwrap().to_owned();
    let rotated = stdout(&loopd(
        dir,
        &["token", "rotate", "--user", "ci", &id, "--grace", "60"],
    ));
    assert!(rotated.trim().starts_with("la_") && rotated != scoped);
    let accounts = crate::support::accounts(dir);
    let new = accounts.tokens.authenticate(rotated.trim()).unwrap();
    assert_eq!(new.grants.scopes.unwrap().len(), 2);
    let old = accounts.tokens.authenticate(scoped.trim()).unwrap();
    assert!(old.grants.expires_at.unwrap() < chrono::Utc::now() + chrono::Duration::seconds(61));
}

#[tokio::test]
async fn cli_changes_reach_the_running_server_at_once() {
    let app = TestApp::start().await;
    let dir = app.dir.clone();

    // A token made with the CLI works at once…
    let token = stdout(&loopd(&dir, &["token", "create", "--user", "alice"]))
        .trim()
        .to_owned();
    let bearer = Auth::Bearer(token);
    crate::support::seen_by_server("the CLI's token", async || {
        app.get("/api/auth/me", &bearer).await.1["user_id"] == "alice"
    })
    .await;
    // …shows up in the web listing, and stops working when revoked with the CLI.
    let session = app.session("alice").await;
    let (_, list) = app.get("/api/v1/me/tokens", &session).await;
    let id = list["tokens"][0]["tokenId"].as_str().unwrap().to_owned();
    stdout(&loopd(&dir, &["token", "revoke", "--user", "alice", &id]));
    until_refused(&app, &bearer, "invalid_token").await;

    // A token made in the web is seen by the CLI.
    let (status, _) = app
        .post("/api/v1/me/tokens", &session, json!({"label": "web"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(stdout(&loopd(&dir, &["token", "list", "--user", "alice"])).contains("\tweb\t"));

    // A user added with the CLI can log in; a new password ends old sessions.
    loopd_with_stdin(
        &dir,
        &["user", "add", "dave", "--password-stdin"],
        Some("dave's password\n"),
    );
    crate::support::seen_by_server("dave can log in", async || {
        let body = json!({"username": "dave", "password": "dave's password"});
        app.post("/api/auth/login", &Auth::None, body).await.0 == StatusCode::OK
    })
    .await;
    let dave = Auth::Cookie(app.login("dave", "dave's password").await);
    assert_eq!(app.get("/api/auth/me", &dave).await.0, StatusCode::OK);
    stdout(&loopd_with_stdin(
        &dir,
        &["user", "passwd", "dave", "--password-stdin"],
        Some("dave's new password\n"),
    ));
    until_refused(&app, &dave, "invalid_session").await;

    // Removing a user ends their tokens and sessions.
    let bob_bearer = app.bearer("bob").await;
    let bob_session = Auth::Cookie(app.login("bob", PASSWORD).await);
    stdout(&loopd(&dir, &["user", "remove", "bob"]));
    until_refused(&app, &bob_bearer, "invalid_token").await;
    until_refused(&app, &bob_session, "invalid_session").await;
}

#[test]
fn every_flag_has_an_environment_variable() {
    let help = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for var in [
        "LOOPD_BIND",
        "LOOPD_DATA_DIR",
        "LOOPD_AGENT",
        "LOOPD_CLAUDE_BIN",
        "LOOPD_PERMISSION_MODE",
        "LOOPD_IDLE_TIMEOUT",
        "LOOPD_MAX_AGENTS",
        "LOOPD_PUBLIC_URL",
        "LOOPD_AGENT_ENV",
        "LOOPD_SANDBOX",
        "LOOPD_PERMISSION_MODES",
        "LOOPD_VAULT_ALLOW_ENV",
        "LOOPD_LOG",
        "LOOPD_DATABASE_URL",
        "LOOPD_ADVERTISE_URL",
        "LOOPD_LEASE_TTL",
        "LOOPD_WORKSPACE_ROOT",
    ] {
        assert!(help.contains(var), "{var} missing from `serve --help`");
    }
    // LOOPD_DATA_DIR really selects the directory.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args(["user", "add", "erin"])
        .env("LOOPD_DATA_DIR", tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(tmp.path().join("users.json").exists());
}

#[test]
fn sandbox_bwrap_refuses_to_start_where_bubblewrap_cannot_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--agent",
            "echo",
            "--sandbox",
            "bwrap",
        ])
        .env("LOOPD_DATA_DIR", tmp.path())
        .env("PATH", tmp.path().join("no-bin"))
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("--sandbox bwrap") && err.contains("bubblewrap"),
        "{err}"
    );
}

#[tokio::test]
async fn sandbox_none_runs_but_warns_in_the_log_and_healthz() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut child, rx) = serve(
        tmp.path(),
        port,
        &[("LOOPD_SANDBOX", "none"), ("LOOPD_LOG_FORMAT", "json")],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut warned = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the server never said it listens");
        warned |= line.contains(r#""level":"WARN""#) && line.contains("--sandbox none");
        if line.contains("loopd listening") {
            assert!(line.contains(r#""sandbox":"none""#), "{line}");
            break;
        }
    }
    assert!(warned, "no warning in the log");
    let health: Value = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sandbox"], "none");
    assert!(
        health["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("--sandbox none")),
        "{health}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
