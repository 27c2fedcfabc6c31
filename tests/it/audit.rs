//! The audit trail: a line for each act, read by admins over HTTP and by
//! the operator with `loopd audit`; never a secret or message text.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Auth, PASSWORD, TestApp, assert_error, eventually};

/// `loopd audit ARGS` on the app's data directory (or its database).
fn loopd_audit(app: &TestApp, args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_loopd"));
    command
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(&app.dir)
        .env_remove("LOOPD_DATA_DIR");
    if let Some(url) = app.database_url() {
        command.env("LOOPD_DATABASE_URL", url);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn every_act_leaves_a_line_and_no_secret() {
    let app = TestApp::start_tweaked(|c| {
        c.permission_modes
            .push(loopd::agent::PermissionMode::AcceptEdits);
        c.webhook_allow_private = true;
    })
    .await;
    app.accounts().users.add("root", true, PASSWORD).unwrap();

    // A failed login, then the acts of a working day.
    let wrong = json!({"username": "alice", "password": "not it"});
    assert_eq!(
        app.post("/api/auth/login", &Auth::None, wrong).await.0,
        StatusCode::UNAUTHORIZED
    );
    let session = app.session("alice").await;
    let (_, created) = app
        .post("/api/v1/me/tokens", &session, json!({"label": "bot", "scopes": ["loops:read", "loops:write", "messages:write", "choices:write", "webhooks:write"]}))
        .await;
    let token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["tokenId"].as_str().unwrap().to_owned();
    let bot = Auth::Bearer(token.clone());
    let id = app.create_loop(&bot, json!({})).await;
    let mut stream = app
        .send_with(
            &bot,
            &id,
            json!({"content": "/permission make secret-thing", "permission_mode": "acceptEdits"}),
            None,
        )
        .await;
    let choice = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap().to_owned();
    app.choose(&bot, &id, &choice_id, json!({"allow": false}))
        .await;
    stream.until("done").await;
    let (_, hook) = app
        .post(
            "/api/v1/me/webhooks",
            &bot,
            json!({"url": "http://127.0.0.1:9/hook?key=hunter2", "events": ["done"]}),
        )
        .await;
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    let secret = hook["secret"].as_str().unwrap().to_owned();
    app.delete(&format!("/api/v1/me/webhooks/{hook_id}"), &bot)
        .await;
    app.delete(&format!("/api/v1/loops/{id}"), &bot).await;
    let (_, rotated) = app
        .post(
            &format!("/api/v1/me/tokens/{token_id}/rotate"),
            &session,
            json!({"grace_seconds": 60}),
        )
        .await;
    let new_id = rotated["tokenId"].as_str().unwrap().to_owned();
    app.delete(&format!("/api/v1/me/tokens/{new_id}"), &session)
        .await;

    // Only admins read it.
    eventually("root can log in", async || {
        let body = json!({"username": "root", "password": PASSWORD});
        app.post("/api/auth/login", &Auth::None, body).await.0 == StatusCode::OK
    })
    .await;
    let root = app.session("root").await;
    assert_error(
        &app.get("/api/v1/admin/audit", &session).await,
        403,
        "permission_error",
        "admin_required",
    );
    let (status, all) = app.get("/api/v1/admin/audit?user=alice", &root).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let data = all["data"].as_array().unwrap();
    let mut actions: Vec<&str> = data.iter().map(|e| e["action"].as_str().unwrap()).collect();
    actions.reverse(); // newest first on the wire
    assert_eq!(
        actions,
        [
            "login.failed",
            "login.succeeded",
            "token.created",
            "loop.created",
            "turn.mode_raised",
            "choice.answered",
            "webhook.created",
            "webhook.deleted",
            "loop.archived",
            "token.rotated",
            "token.revoked",
        ]
    );
    let find =
        |action: &str| -> Value { data.iter().find(|e| e["action"] == action).unwrap().clone() };
    assert_eq!(find("login.failed")["client"], "127.0.0.1");
    assert_eq!(find("login.succeeded")["client"], "127.0.0.1");
    let answered = find("choice.answered");
    assert_eq!(answered["details"]["how"], "denied");
    assert_eq!(answered["details"]["choice_id"], choice_id.as_str());
    assert_eq!(answered["details"]["via"], token_id.as_str());
    assert_eq!(find("turn.mode_raised")["details"]["mode"], "acceptEdits");
    assert_eq!(find("loop.created")["details"]["loop_id"], id.as_str());
    assert_eq!(find("webhook.created")["details"]["host"], "127.0.0.1");
    assert_eq!(
        find("token.rotated")["details"]["new_token_id"],
        new_id.as_str()
    );
    assert_eq!(find("token.created")["details"]["via"], "web session");

    // Never a password, a token, a cookie, a webhook secret or its URL's
    // query, or message text.
    let raw = all.to_string();
    let Auth::Cookie(cookie) = &session else {
        unreachable!()
    };
    for secret in [
        PASSWORD,
        "not it",
        &token,
        cookie,
        &secret,
        "hunter2",
        "secret-thing",
    ] {
        assert!(!raw.contains(secret), "the trail holds `{secret}`");
    }

    // Filters; the command line reads the same trail.
    let since = find("webhook.created")["at"].as_str().unwrap().to_owned();
    let (_, later) = app
        .get(
            &format!(
                "/api/v1/admin/audit?user=alice&since={}",
                since.replace('+', "%2B")
            ),
            &root,
        )
        .await;
    assert_eq!(later["data"].as_array().unwrap().len(), 5, "{later}");
    let (_, one) = app.get("/api/v1/admin/audit?limit=1", &root).await;
    assert_eq!(
        one["data"][0]["action"], "login.succeeded",
        "root's own login is the latest"
    );
    let lines = loopd_audit(&app, &["--user", "alice", "--json"]);
    let cli: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cli.len(), actions.len());
    assert_eq!(cli[0]["action"], "login.failed");
    let text = loopd_audit(&app, &["--user", "alice", "--since", &since]);
    let first: Vec<&str> = text.lines().next().unwrap().split('\t').collect();
    assert_eq!(&first[1..3], ["alice", "webhook.created"]);
    // The operator's own acts are there too, as `operator`.
    let out = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args(["token", "create", "--user", "bob", "--data-dir"])
        .arg(&app.dir)
        .envs(app.database_url().map(|u| ("LOOPD_DATABASE_URL", u)))
        .output()
        .unwrap();
    assert!(out.status.success());
    eventually("the operator's act in the trail", async || {
        let (_, got) = app.get("/api/v1/admin/audit?user=operator", &root).await;
        got["data"][0]["action"] == "token.created" && got["data"][0]["details"]["user"] == "bob"
    })
    .await;
    // A token with scopes cannot read it, even an admin's.
    let (scoped, _) = app.token(&root, json!({"scopes": ["loops:read"]})).await;
    assert_error(
        &app.get("/api/v1/admin/audit", &scoped).await,
        403,
        "permission_error",
        "insufficient_scope",
    );
}
