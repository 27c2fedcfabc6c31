//! Restarts keep everything; a corrupt file stops start-up and is left
//! alone; one server per data directory.

use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{Auth, TestApp, assert_error};

#[tokio::test]
async fn a_restart_keeps_users_tokens_sessions_and_loops() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let bearer = app.bearer("alice").await;
    let live = app
        .create_loop(&bearer, json!({"title": "live", "metadata": {"k": "v"}}))
        .await;
    let gone = app.create_loop(&bearer, json!({"title": "gone"})).await;
    app.delete(&format!("/api/v1/loops/{gone}"), &bearer).await;
    let (_, before) = app.get("/api/v1/loops?archived=true", &bearer).await;

    let (dir, tmp) = app.stop().await;
    let app = TestApp::start_with(loopd::Config::for_data_dir(&dir)).await;
    let _keep = tmp;

    assert_eq!(
        app.get("/api/auth/me", &session).await.1["user_id"],
        "alice"
    );
    let (status, after) = app.get("/api/v1/loops?archived=true", &bearer).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after, before);
    let (_, got) = app.get(&format!("/api/v1/loops/{live}"), &bearer).await;
    assert_eq!(got["metadata"], json!({"k": "v"}));
    // The other user can still log in with their password.
    let bob = app.session("bob").await;
    assert_eq!(app.get("/api/auth/me", &bob).await.1["user_id"], "bob");
}

#[tokio::test]
async fn a_corrupt_token_file_refuses_start_up_and_is_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("api-tokens.json");
    let corrupt = b"{\n  \"tokens\": {\n    \"abc\": {\"token_id\": \n";
    std::fs::write(&path, corrupt).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = loopd::run(
        loopd::Config::for_data_dir(tmp.path()),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 4"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), corrupt);
    // Nothing else was created in its place either.
    assert!(!tmp.path().join("users.json").exists());
}

#[tokio::test]
async fn a_corrupt_loop_meta_refuses_start_up() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    let (dir, _tmp) = app.stop().await;
    let meta = dir
        .join("loops")
        .join(id.strip_prefix("loop_").unwrap())
        .join("meta.json");
    std::fs::write(&meta, "{").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = loopd::run(
        loopd::Config::for_data_dir(&dir),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains(&meta.display().to_string()),
        "{err:#}"
    );
    assert_eq!(std::fs::read_to_string(&meta).unwrap(), "{");
}

#[tokio::test]
async fn only_one_server_per_data_directory() {
    let app = TestApp::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = loopd::run(
        loopd::Config::for_data_dir(&app.dir),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("already using"), "{err:#}");
    // The first server is unaffected.
    let got = app.get("/api/v1/loops", &Auth::None).await;
    assert_error(&got, 401, "authentication_error", "missing_credentials");
}
