//! Standing rules: `"remember"` makes the narrowest rule in Claude Code's
//! syntax; a later request it covers is answered by loopd at once (no
//! `requires_choice`), a different one is asked; with the echo agent and
//! with the real Claude Code CLI.

use reqwest::StatusCode;
use serde_json::json;

use crate::claude::Rig;
use crate::support::{Auth, TestApp, assert_error, names};

/// Sends `content` and answers its first prompt with `answer`; returns the
/// answer's body and the turn's events.
async fn ask_and_answer(
    app: &TestApp,
    auth: &Auth,
    loop_id: &str,
    content: &str,
    answer: serde_json::Value,
) -> (serde_json::Value, Vec<crate::support::Sse>) {
    let mut stream = app.send(auth, loop_id, content).await;
    let mut events = stream.until("requires_choice").await;
    let choice = events.last().unwrap().data["choice_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = app.choose(auth, loop_id, &choice, answer).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    events.extend(stream.until_end().await);
    (body, events)
}

#[tokio::test]
async fn a_remembered_answer_answers_the_same_request_and_not_another() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    let other = app.create_loop(&bearer, json!({})).await;

    let (answered, _) = ask_and_answer(
        &app,
        &bearer,
        &id,
        "/permission npm test",
        json!({"allow": true, "remember": "loop"}),
    )
    .await;
    let rule = &answered["rule"];
    assert_eq!(rule["rule"], "Bash(npm test)");
    assert_eq!(rule["behavior"], "allow");
    assert_eq!(rule["scope"], "loop");
    assert_eq!(rule["loop_id"], id.as_str());
    let rule_id = rule["id"].as_str().unwrap().to_owned();

    // The same request again: answered by the rule, nobody asked.
    let events = app
        .send(&bearer, &id, "/permission npm test")
        .await
        .until_end()
        .await;
    assert!(
        !names(&events).contains(&"requires_choice"),
        "{:?}",
        names(&events)
    );
    let resolved = events.iter().find(|e| e.name == "choice_resolved").unwrap();
    assert_eq!(resolved.data["source"], "rule");
    assert_eq!(resolved.data["rule_id"], rule_id.as_str());
    assert_eq!(resolved.data["rule"], "Bash(npm test)");
    assert_eq!(resolved.data["answer"]["allow"], true);
    assert!(crate::support::text(&events).contains("Allowed: npm test"));
    assert_eq!(events.last().unwrap().name, "done");

    // A different command is asked; the same one on another loop too.
    let mut stream = app.send(&bearer, &id, "/permission npm run build").await;
    stream.until("requires_choice").await;
    app.post(&format!("/api/v1/loops/{id}/interrupt"), &bearer, json!({}))
        .await;
    stream.until_end().await;
    let mut elsewhere = app.send(&bearer, &other, "/permission npm test").await;
    elsewhere.until("requires_choice").await;
    app.post(
        &format!("/api/v1/loops/{other}/interrupt"),
        &bearer,
        json!({}),
    )
    .await;
    elsewhere.until_end().await;

    // Listed on its loop; bob sees and removes nothing.
    let (_, listed) = app.get(&format!("/api/v1/loops/{id}/rules"), &bearer).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["id"], rule_id.as_str());
    let (_, none) = app
        .get(&format!("/api/v1/loops/{other}/rules"), &bearer)
        .await;
    assert_eq!(none["data"], json!([]));
    let bob = app.bearer("bob").await;
    assert_error(
        &app.delete(&format!("/api/v1/loops/{id}/rules/{rule_id}"), &bob)
            .await,
        403,
        "permission_error",
        "not_loop_owner",
    );
    assert_error(
        &app.delete(&format!("/api/v1/me/rules/{rule_id}"), &bob)
            .await,
        404,
        "not_found_error",
        "rule_not_found",
    );

    // Deleted, the request is asked again.
    let (status, _) = app
        .delete(&format!("/api/v1/loops/{id}/rules/{rule_id}"), &bearer)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut stream = app.send(&bearer, &id, "/permission npm test").await;
    stream.until("requires_choice").await;
}

#[tokio::test]
async fn always_rules_cover_every_loop_and_deny_rules_deny() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let a = app.create_loop(&bearer, json!({})).await;
    let b = app.create_loop(&bearer, json!({})).await;
    let (answered, _) = ask_and_answer(
        &app,
        &bearer,
        &a,
        "/permission rm -rf /",
        json!({"allow": false, "remember": "always"}),
    )
    .await;
    assert_eq!(answered["rule"]["behavior"], "deny");
    assert_eq!(answered["rule"]["scope"], "always");
    assert!(answered["rule"]["loop_id"].is_null());
    let (_, mine) = app.get("/api/v1/me/rules", &bearer).await;
    assert_eq!(mine["data"][0]["rule"], "Bash(rm -rf /)");

    // On another loop: denied at once, by the rule.
    let events = app
        .send(&bearer, &b, "/permission rm -rf /")
        .await
        .until_end()
        .await;
    assert!(!names(&events).contains(&"requires_choice"));
    let resolved = events.iter().find(|e| e.name == "choice_resolved").unwrap();
    assert_eq!(resolved.data["source"], "rule");
    assert_eq!(resolved.data["answer"]["allow"], false);
    assert!(
        crate::support::text(&events).contains("Denied"),
        "{events:?}"
    );

    // Bad `remember`s are refused before anything is answered.
    let mut stream = app.send(&bearer, &b, "/question").await;
    let q = stream.until("requires_choice").await.pop().unwrap();
    let q_id = q.data["choice_id"].as_str().unwrap();
    for body in [
        json!({"allow": true, "remember": "forever"}),
        json!({"answers": {"Which color?": "Blue"}, "remember": "loop"}),
    ] {
        let got = app.choose(&bearer, &b, q_id, body).await;
        assert_error(&got, 400, "invalid_request_error", "invalid_choice_payload");
    }
    // A token with loops:read reads rules but cannot delete them.
    let session = app.session("alice").await;
    let (reader, _) = app.token(&session, json!({"scopes": ["loops:read"]})).await;
    assert_eq!(app.get("/api/v1/me/rules", &reader).await.0, StatusCode::OK);
    let rule_id = mine["data"][0]["id"].as_str().unwrap();
    assert_error(
        &app.delete(&format!("/api/v1/me/rules/{rule_id}"), &reader)
            .await,
        403,
        "permission_error",
        "insufficient_scope",
    );
    let (status, _) = app
        .delete(&format!("/api/v1/me/rules/{rule_id}"), &bearer)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get("/api/v1/me/rules", &bearer).await.1["data"],
        json!([])
    );
}

#[tokio::test]
async fn with_claude_code_a_rule_runs_the_same_command_again_unasked() {
    let rig = Rig::start().await;
    let (answered, first) = ask_and_answer(
        &rig.app,
        &rig.bearer,
        &rig.loop_id,
        "[[bash:touch ruled.txt]]",
        json!({"allow": true, "remember": "loop"}),
    )
    .await;
    assert_eq!(answered["rule"]["rule"], "Bash(touch ruled.txt)");
    assert_eq!(first.last().unwrap().name, "done", "{first:?}");
    std::fs::remove_file(rig.workspace().join("ruled.txt")).unwrap();

    // The same command in a later turn runs without a prompt: the file is back.
    let events = rig.turn("[[bash:touch ruled.txt]]").await;
    assert!(
        !names(&events).contains(&"requires_choice"),
        "{:?}",
        names(&events)
    );
    let resolved = events.iter().find(|e| e.name == "choice_resolved").unwrap();
    assert_eq!(resolved.data["source"], "rule");
    assert_eq!(resolved.data["rule_id"], answered["rule"]["id"]);
    let result = events.iter().find(|e| e.name == "tool_result").unwrap();
    assert_eq!(result.data["ok"], true);
    assert!(rig.workspace().join("ruled.txt").exists());
    assert_eq!(events.last().unwrap().name, "done");

    // A different command is asked.
    let mut stream = rig.send("[[bash:touch other.txt]]").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    assert_eq!(asked.data["payload"]["input"]["command"], "touch other.txt");
    let choice = asked.data["choice_id"].as_str().unwrap();
    rig.app
        .choose(&rig.bearer, &rig.loop_id, choice, json!({"allow": false}))
        .await;
    stream.until_end().await;
    assert!(!rig.workspace().join("other.txt").exists());
}

#[tokio::test]
async fn rules_too_broad_or_for_every_loop_from_a_scoped_token_are_refused() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let (bot, _) = app
        .token(
            &session,
            json!({"scopes": ["loops:read", "loops:write", "messages:write", "choices:write"]}),
        )
        .await;
    let id = app.create_loop(&bot, json!({})).await;
    let mut stream = app.send(&bot, &id, "/permission npm test").await;
    let choice = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap();
    // A rule for every loop outlives a limited token: refused, and the
    // choice still waits.
    let got = app
        .choose(
            &bot,
            &id,
            choice_id,
            json!({"allow": true, "remember": "always"}),
        )
        .await;
    assert_error(&got, 403, "permission_error", "insufficient_scope");
    let (status, answered) = app
        .choose(
            &bot,
            &id,
            choice_id,
            json!({"allow": true, "remember": "loop"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answered}");
    stream.until_end().await;

    // A request with no command to pin a rule to is never remembered.
    let mut stream = app.send(&bot, &id, "/permission").await;
    let choice = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap();
    let got = app
        .choose(
            &bot,
            &id,
            choice_id,
            json!({"allow": true, "remember": "loop"}),
        )
        .await;
    assert_error(&got, 400, "invalid_request_error", "rule_too_broad");
    assert_eq!(
        app.get(&format!("/api/v1/loops/{id}/rules"), &bot).await.1["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_removed_users_rules_and_webhooks_go_with_them() {
    let app = TestApp::start_tweaked(|c| c.webhook_allow_private = true).await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    ask_and_answer(
        &app,
        &bearer,
        &id,
        "/permission npm test",
        json!({"allow": true, "remember": "always"}),
    )
    .await;
    app.post(
        "/api/v1/me/webhooks",
        &bearer,
        json!({"url": "http://127.0.0.1:9/hook", "events": ["done"]}),
    )
    .await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopd"))
            .args(args)
            .arg("--data-dir")
            .arg(&app.dir)
            .envs(app.database_url().map(|u| ("LOOPD_DATABASE_URL", u)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["user", "remove", "alice"]);
    // A new alice inherits nothing.
    app.accounts()
        .users
        .add("alice", false, crate::support::PASSWORD)
        .unwrap();
    crate::support::eventually("the new alice can log in", async || {
        let body = json!({"username": "alice", "password": crate::support::PASSWORD});
        app.post("/api/auth/login", &Auth::None, body).await.0 == StatusCode::OK
    })
    .await;
    let again = app.bearer("alice").await;
    crate::support::eventually("nothing of the old alice", async || {
        app.get("/api/v1/me/rules", &again).await.1["data"] == json!([])
            && app.get("/api/v1/me/webhooks", &again).await.1["data"] == json!([])
    })
    .await;
}
