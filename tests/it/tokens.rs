//! `/api/v1/me/tokens`: cookie-only management, per-user visibility,
//! revocation at once, lastUsedAt.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Auth, TestApp, assert_error, seen_by_server};

#[tokio::test]
async fn create_list_use_and_revoke() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;

    let (status, created) = app
        .post("/api/v1/me/tokens", &session, json!({"label": "slack bot"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["tokenId"].as_str().unwrap().to_owned();
    assert!(token.starts_with("la_") && token.len() == 51, "{created}");
    assert!(
        token_id.starts_with("tok_") && token_id.len() == 16,
        "{created}"
    );
    assert_eq!(created["label"], "slack bot");
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));

    // An empty body is `{}`: a token without a label.
    let resp = app
        .request(reqwest::Method::POST, "/api/v1/me/tokens", &session)
        .send()
        .await
        .unwrap();
    let (status, unlabelled) = crate::support::read(resp).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(unlabelled["label"], serde_json::Value::Null);

    let (_, list) = app.get("/api/v1/me/tokens", &session).await;
    let tokens = list["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    // Newest first, never the plaintext, no lastUsedAt before first use.
    assert_eq!(tokens[0]["tokenId"], unlabelled["tokenId"]);
    assert_eq!(tokens[1]["tokenId"], token_id.as_str());
    assert!(tokens[1].get("token").is_none());
    assert!(tokens[1].get("lastUsedAt").is_none());

    let bearer = Auth::Bearer(token.clone());
    assert_eq!(app.get("/api/v1/loops", &bearer).await.0, StatusCode::OK);
    let (_, list) = app.get("/api/v1/me/tokens", &session).await;
    assert!(list["tokens"][1]["lastUsedAt"].as_str().is_some(), "{list}");

    let (status, _) = app
        .delete(&format!("/api/v1/me/tokens/{token_id}"), &session)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_error(
        &app.get("/api/v1/loops", &bearer).await,
        401,
        "authentication_error",
        "invalid_token",
    );
    assert_error(
        &app.delete(&format!("/api/v1/me/tokens/{token_id}"), &session)
            .await,
        404,
        "not_found_error",
        "token_not_found",
    );
}

#[tokio::test]
async fn a_bot_cannot_mint_or_manage_tokens() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    for got in [
        app.post("/api/v1/me/tokens", &bearer, json!({})).await,
        app.get("/api/v1/me/tokens", &bearer).await,
        app.delete("/api/v1/me/tokens/tok_000000000000", &bearer)
            .await,
    ] {
        assert_error(&got, 401, "authentication_error", "session_required");
    }
    assert_error(
        &app.get("/api/v1/me/tokens", &Auth::None).await,
        401,
        "authentication_error",
        "missing_credentials",
    );
}

#[tokio::test]
async fn users_cannot_see_or_revoke_each_others_tokens() {
    let app = TestApp::start().await;
    let alice = app.session("alice").await;
    let bob = app.session("bob").await;
    let (_, created) = app.post("/api/v1/me/tokens", &alice, json!({})).await;
    let id = created["tokenId"].as_str().unwrap();
    let (_, bobs) = app.get("/api/v1/me/tokens", &bob).await;
    assert_eq!(bobs["tokens"], json!([]));
    assert_error(
        &app.delete(&format!("/api/v1/me/tokens/{id}"), &bob).await,
        404,
        "not_found_error",
        "token_not_found",
    );
    let (_, list) = app.get("/api/v1/me/tokens", &alice).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn labels_are_checked() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let long = app
        .post(
            "/api/v1/me/tokens",
            &session,
            json!({"label": "x".repeat(101)}),
        )
        .await;
    assert_error(&long, 400, "invalid_request_error", "label_too_long");
    let control = app
        .post("/api/v1/me/tokens", &session, json!({"label": "a\tb"}))
        .await;
    assert_error(&control, 400, "invalid_request_error", "label_invalid");
    let wrong_type = app
        .post("/api/v1/me/tokens", &session, json!({"label": 5}))
        .await;
    assert_error(&wrong_type, 400, "invalid_request_error", "invalid_body");
}

#[tokio::test]
async fn last_used_is_written_to_disk_on_shutdown_without_rewriting_per_request() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    // The file's bytes, or the database document's version.
    let stored = |dir: &std::path::Path| match crate::pg::on_postgres() {
        false => {
            let raw = std::fs::read(dir.join("api-tokens.json")).unwrap();
            (
                serde_json::from_slice::<serde_json::Value>(&raw).unwrap(),
                raw.len() as i64,
            )
        }
        true => crate::pg::document(&crate::pg::database_for(dir), "api-tokens").unwrap(),
    };
    let before = stored(&app.dir);
    for _ in 0..5 {
        assert_eq!(app.get("/api/v1/loops", &bearer).await.0, StatusCode::OK);
    }
    assert_eq!(stored(&app.dir), before, "a request rewrote the tokens");
    let (dir, _tmp) = app.stop().await;
    let (file, _) = stored(&dir);
    let record = file["tokens"].as_object().unwrap().values().next().unwrap();
    assert!(record["last_used_at"].is_string(), "{file}");
}

#[tokio::test]
async fn tokens_changed_by_another_process_take_effect_at_once() {
    let app = TestApp::start().await;
    // The CLI opens the same files from another process; here, another handle.
    let cli = app.accounts();
    let (plaintext, record) = cli
        .tokens
        .create("alice", Some("cli".into()), Default::default())
        .unwrap();
    let bearer = Auth::Bearer(plaintext);
    seen_by_server("the new token", async || {
        let (status, me) = app.get("/api/auth/me", &bearer).await;
        (status, me["user_id"].as_str()) == (StatusCode::OK, Some("alice"))
    })
    .await;
    cli.tokens.revoke("alice", &record.token_id).unwrap();
    // On files the very next request already fails; on a shared database
    // within a second.
    seen_by_server("the revocation", async || {
        let (status, body) = app.get("/api/auth/me", &bearer).await;
        status == StatusCode::UNAUTHORIZED && body["error"]["code"] == "invalid_token"
    })
    .await;
}
