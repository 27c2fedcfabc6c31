//! Open choices: a bot that was not watching finds every prompt waiting for
//! it, per loop and across its loops, and each is gone once answered.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Auth, TestApp, assert_error};

#[tokio::test]
async fn pending_choices_are_listed_across_loops_and_gone_once_answered() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let a = app.create_loop(&bearer, json!({"title": "a"})).await;
    let b = app.create_loop(&bearer, json!({"title": "b"})).await;
    let quiet = app.create_loop(&bearer, json!({"title": "quiet"})).await;
    let (_, none) = app.get("/api/v1/choices?status=pending", &bearer).await;
    assert_eq!(none["data"], json!([]));

    // Two prompts, raised while nobody keeps a stream open.
    let mut on_a = app.send(&bearer, &a, "/permission make deploy").await;
    let asked_a = on_a.until("requires_choice").await.pop().unwrap();
    drop(on_a);
    let mut on_b = app.send(&bearer, &b, "/question").await;
    let asked_b = on_b.until("requires_choice").await.pop().unwrap();
    drop(on_b);

    let (status, all) = app.get("/api/v1/choices?status=pending", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{all}");
    // Oldest first, each with what answering it needs.
    assert_eq!(data[0]["loop_id"], a.as_str());
    assert_eq!(data[0]["choice_id"], asked_a.data["choice_id"]);
    assert_eq!(data[0]["turn_id"], asked_a.data["turn_id"]);
    assert_eq!(data[0]["kind"], "permission");
    assert_eq!(data[0]["payload"], asked_a.data["payload"]);
    assert!(data[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(data[1]["loop_id"], b.as_str());
    assert_eq!(data[1]["kind"], "question");
    assert_eq!(data[1]["choice_id"], asked_b.data["choice_id"]);
    // Without `status`, the same; per loop, only its own.
    assert_eq!(app.get("/api/v1/choices", &bearer).await.1, all);
    let (_, only_a) = app
        .get(
            &format!("/api/v1/loops/{a}/choices?status=pending"),
            &bearer,
        )
        .await;
    assert_eq!(only_a["data"].as_array().unwrap().len(), 1);
    assert_eq!(only_a["data"][0], data[0]);
    let (_, on_quiet) = app
        .get(&format!("/api/v1/loops/{quiet}/choices"), &bearer)
        .await;
    assert_eq!(on_quiet["data"], json!([]));

    // Answered from the listing alone: gone from it.
    let choice = data[0]["choice_id"].as_str().unwrap();
    let (status, _) = app
        .choose(&bearer, &a, choice, json!({"allow": true}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    crate::support::eventually("the answered choice to leave the list", async || {
        app.get("/api/v1/choices", &bearer).await.1["data"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    let (_, left) = app.get("/api/v1/choices", &bearer).await;
    assert_eq!(left["data"][0]["loop_id"], b.as_str());
    let (_, only_a) = app
        .get(&format!("/api/v1/loops/{a}/choices"), &bearer)
        .await;
    assert_eq!(only_a["data"], json!([]));

    // Nobody else sees them; a bad status is refused.
    let bob = app.bearer("bob").await;
    assert_eq!(app.get("/api/v1/choices", &bob).await.1["data"], json!([]));
    assert_error(
        &app.get(&format!("/api/v1/loops/{b}/choices"), &bob).await,
        403,
        "permission_error",
        "not_loop_owner",
    );
    assert_error(
        &app.get("/api/v1/choices?status=resolved", &bearer).await,
        400,
        "invalid_request_error",
        "invalid_query",
    );
    assert_error(
        &app.get("/api/v1/choices", &Auth::None).await,
        401,
        "authentication_error",
        "missing_credentials",
    );
}
