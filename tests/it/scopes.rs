//! Scoped tokens: each scope refuses what it must and allows what it
//! should; `max_permission_mode`, expiry and rotation.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Auth, TestApp, assert_error, eventually, read};

/// What every scope guards: (scope, method, path, body), on loop `id`
/// (with a running choice `choice`).
fn acts(id: &str) -> Vec<(&'static str, Method, String, Option<Value>)> {
    vec![
        ("loops:read", Method::GET, "/api/v1/loops".into(), None),
        (
            "loops:read",
            Method::GET,
            format!("/api/v1/loops/{id}"),
            None,
        ),
        (
            "loops:read",
            Method::GET,
            format!("/api/v1/loops/{id}/turns"),
            None,
        ),
        (
            "loops:write",
            Method::POST,
            "/api/v1/loops".into(),
            Some(json!({})),
        ),
        (
            "messages:write",
            Method::POST,
            format!("/api/v1/loops/{id}/interrupt"),
            Some(json!({})),
        ),
        (
            "choices:write",
            Method::POST,
            format!("/api/v1/loops/{id}/choices/ch_nonexistent"),
            Some(json!({"allow": true})),
        ),
    ]
}

#[tokio::test]
async fn each_scope_refuses_what_it_must_and_allows_what_it_should() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let id = app.create_loop(&session, json!({})).await;
    for scope in [
        "loops:read",
        "loops:write",
        "messages:write",
        "choices:write",
        "webhooks:write",
    ] {
        let (bearer, _) = app.token(&session, json!({"scopes": [scope]})).await;
        for (needs, method, path, body) in acts(&id) {
            let mut req = app.request(method.clone(), &path, &bearer);
            if let Some(body) = &body {
                req = req.json(body);
            }
            let got = read(req.send().await.unwrap()).await;
            if needs == scope {
                // Allowed: whatever the act answers, never a scope refusal
                // (the choice does not exist: 404).
                assert!(
                    got.0.is_success() || got.1["error"]["code"] == "choice_not_found",
                    "{scope}: {method} {path}: {got:?}"
                );
            } else {
                assert_error(&got, 403, "permission_error", "insufficient_scope");
            }
        }
        // Sending a message (an SSE answer) needs messages:write.
        let resp = app
            .request(
                Method::POST,
                &format!("/api/v1/loops/{id}/messages"),
                &bearer,
            )
            .json(&json!({"content": "hi"}))
            .send()
            .await
            .unwrap();
        if scope == "messages:write" {
            assert_eq!(resp.status(), StatusCode::OK);
            drop(resp);
        } else {
            assert_error(
                &read(resp).await,
                403,
                "permission_error",
                "insufficient_scope",
            );
        }
        // Watching needs loops:read.
        let resp = app
            .request(Method::GET, &format!("/api/v1/loops/{id}/events"), &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().is_success(), scope == "loops:read", "{scope}");
        drop(resp);
        // Any token may say who it is.
        assert_eq!(app.get("/api/auth/me", &bearer).await.0, StatusCode::OK);
    }
    // No scopes at all: every right, as before scopes existed.
    let full = app.bearer("alice").await;
    for (_, method, path, body) in acts(&id) {
        let mut req = app.request(method.clone(), &path, &full);
        if let Some(body) = &body {
            req = req.json(body);
        }
        let got = read(req.send().await.unwrap()).await;
        assert_ne!(
            got.1["error"]["code"], "insufficient_scope",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn bad_grants_are_refused_clearly() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    for (body, code) in [
        (json!({"scopes": ["loops:admin"]}), "invalid_scopes"),
        (json!({"scopes": []}), "invalid_scopes"),
        (json!({"scopes": "loops:read"}), "invalid_scopes"),
        (
            json!({"max_permission_mode": "godMode"}),
            "invalid_permission_mode",
        ),
        (
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at_in_past",
        ),
    ] {
        let got = app.post("/api/v1/me/tokens", &session, body.clone()).await;
        assert_error(&got, 400, "invalid_request_error", code);
    }
    let (status, created) = app
        .post(
            "/api/v1/me/tokens",
            &session,
            json!({"scopes": ["loops:read", "choices:write"], "expires_at": "2999-01-01T00:00:00Z", "max_permission_mode": "default"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["scopes"], json!(["loops:read", "choices:write"]));
    assert_eq!(created["expiresAt"], "2999-01-01T00:00:00Z");
    assert_eq!(created["maxPermissionMode"], "default");
    let (_, list) = app.get("/api/v1/me/tokens", &session).await;
    assert_eq!(list["tokens"][0]["scopes"], created["scopes"]);
}

#[tokio::test]
async fn a_token_may_not_drive_a_turn_above_its_permission_mode() {
    let app = TestApp::start_tweaked(|c| {
        c.permission_modes
            .push(loopd::agent::PermissionMode::AcceptEdits);
        c.permission_modes.push(loopd::agent::PermissionMode::Plan);
    })
    .await;
    let session = app.session("alice").await;
    let id = app.create_loop(&session, json!({})).await;
    let (bearer, _) = app
        .token(&session, json!({"max_permission_mode": "plan"}))
        .await;
    // The server's default mode (`default`) is above `plan`.
    let resp = app
        .request(
            Method::POST,
            &format!("/api/v1/loops/{id}/messages"),
            &bearer,
        )
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_error(
        &read(resp).await,
        403,
        "permission_error",
        "permission_mode_above_token",
    );
    let resp = app
        .request(
            Method::POST,
            &format!("/api/v1/loops/{id}/messages"),
            &bearer,
        )
        .json(&json!({"content": "hi", "permission_mode": "acceptEdits"}))
        .send()
        .await
        .unwrap();
    assert_error(
        &read(resp).await,
        403,
        "permission_error",
        "permission_mode_above_token",
    );
    let mut stream = app
        .send_with(
            &bearer,
            &id,
            json!({"content": "hi", "permission_mode": "plan"}),
            None,
        )
        .await;
    stream.until("done").await;
}

#[tokio::test]
async fn an_expired_token_is_refused_as_expired() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    let (bearer, _) = app.token(&session, json!({"expires_at": soon})).await;
    assert_eq!(app.get("/api/v1/loops", &bearer).await.0, StatusCode::OK);
    eventually("the token to expire", async || {
        app.get("/api/v1/loops", &bearer).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_error(
        &app.get("/api/v1/loops", &bearer).await,
        401,
        "authentication_error",
        "token_expired",
    );
}

#[tokio::test]
async fn rotation_hands_out_a_new_token_and_retires_the_old_after_its_grace() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let (old, old_id) = app
        .token(&session, json!({"scopes": ["loops:read"], "label": "bot"}))
        .await;
    let (other, other_id) = app.token(&session, json!({})).await;

    // A token may rotate itself, not another.
    let got = app
        .post(
            &format!("/api/v1/me/tokens/{other_id}/rotate"),
            &old,
            json!({}),
        )
        .await;
    assert_error(&got, 403, "permission_error", "not_this_token");
    let got = app
        .post(
            &format!("/api/v1/me/tokens/{old_id}/rotate"),
            &old,
            json!({"grace_seconds": 999_999_999}),
        )
        .await;
    assert_error(&got, 400, "invalid_request_error", "grace_too_long");

    let (status, rotated) = app
        .post(
            &format!("/api/v1/me/tokens/{old_id}/rotate"),
            &old,
            json!({"grace_seconds": 3600}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    assert_eq!(rotated["label"], "bot");
    assert_eq!(rotated["scopes"], json!(["loops:read"]));
    let new = Auth::Bearer(rotated["token"].as_str().unwrap().to_owned());
    let new_id = rotated["tokenId"].as_str().unwrap().to_owned();
    // Both work during the grace.
    assert_eq!(app.get("/api/v1/loops", &old).await.0, StatusCode::OK);
    assert_eq!(app.get("/api/v1/loops", &new).await.0, StatusCode::OK);

    // From the web session, with no grace: the new one is retired at once.
    let (status, newest) = app
        .post(
            &format!("/api/v1/me/tokens/{new_id}/rotate"),
            &session,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_error(
        &app.get("/api/v1/loops", &new).await,
        401,
        "authentication_error",
        "token_expired",
    );
    let newest = Auth::Bearer(newest["token"].as_str().unwrap().to_owned());
    assert_eq!(app.get("/api/v1/loops", &newest).await.0, StatusCode::OK);
    // A retired token cannot be rotated again.
    let got = app
        .post(
            &format!("/api/v1/me/tokens/{new_id}/rotate"),
            &session,
            json!({}),
        )
        .await;
    assert_error(&got, 404, "not_found_error", "token_not_found");
    drop(other);
}
