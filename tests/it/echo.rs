//! Turns end to end with the built-in echo agent: streams, queueing,
//! choices, interrupts, idempotent replay, resume, watchers, turns history.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Auth, TestApp, assert_error, eventually, names, text};

async fn app_with_loop() -> (TestApp, Auth, String) {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({"title": "echo"})).await;
    (app, bearer, id)
}

#[tokio::test]
async fn a_message_streams_its_turn_and_the_stream_ends_with_done() {
    let (app, bearer, id) = app_with_loop().await;
    let mut stream = app.send(&bearer, &id, "hello there world").await;
    let events = stream.until_end().await;
    stream.assert_closed().await;
    assert_eq!(events[0].name, "started", "{:?}", names(&events));
    assert_eq!(events[0].data["cold_start"], true);
    let turn_id = events[0].data["turn_id"].as_str().unwrap().to_owned();
    assert!(turn_id.starts_with("turn_"));
    assert_eq!(text(&events), "hello there world");
    let done = events.last().unwrap();
    assert_eq!(done.name, "done");
    assert_eq!(done.data["turn_id"], turn_id.as_str());
    assert!(done.data["usage"]["duration_ms"].is_u64(), "{}", done.data);
    // Every event of the turn carries its id, and seqs strictly increase.
    assert!(events.iter().all(|e| e.data["turn_id"] == turn_id.as_str()));
    let seqs: Vec<u64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The agent stays: the next turn is warm.
    let events = app.send(&bearer, &id, "again").await.until_end().await;
    assert_eq!(events[0].data["cold_start"], false);
    assert_eq!(text(&events), "again");
    let (_, detail) = app.get(&format!("/api/v1/loops/{id}"), &bearer).await;
    assert_eq!(detail["turn_count"], 2);
    assert_eq!(detail["busy"], false);
    assert_eq!(detail["current_turn"], Value::Null);
    let (_, health) = app.get("/healthz", &Auth::None).await;
    assert_eq!(health["live_agents"], 1);
}

#[tokio::test]
async fn thinking_tools_and_failures_map_to_their_events() {
    let (app, bearer, id) = app_with_loop().await;
    let events = app
        .send(&bearer, &id, "/think deep thoughts")
        .await
        .until_end()
        .await;
    assert_eq!(names(&events)[1], "thinking_delta");
    assert_eq!(text(&events), "deep thoughts");

    let events = app
        .send(&bearer, &id, "/tool listing")
        .await
        .until_end()
        .await;
    let call = events.iter().find(|e| e.name == "tool_call").unwrap();
    assert_eq!(call.data["tool"], "echo");
    assert_eq!(call.data["input_summary"], "listing");
    let result = events.iter().find(|e| e.name == "tool_result").unwrap();
    assert_eq!(result.data["tool_use_id"], call.data["tool_use_id"]);
    assert_eq!(result.data["ok"], true);

    let events = app
        .send(&bearer, &id, "/fail broken")
        .await
        .until_end()
        .await;
    assert_eq!(
        events
            .iter()
            .find(|e| e.name == "tool_result")
            .unwrap()
            .data["ok"],
        false
    );
    assert_eq!(events.last().unwrap().name, "done");

    let events = app
        .send(&bearer, &id, "/error the model is down")
        .await
        .until_end()
        .await;
    let err = events.last().unwrap();
    assert_eq!(err.name, "error");
    assert_eq!(err.data["code"], "agent_error");
    assert_eq!(err.data["message"], "the model is down");
}

#[tokio::test]
async fn permission_allow_and_deny() {
    let (app, bearer, id) = app_with_loop().await;
    let mut stream = app.send(&bearer, &id, "/permission rm -rf build").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    assert_eq!(asked.data["kind"], "permission");
    assert_eq!(asked.data["payload"]["tool"], "Bash");
    assert_eq!(asked.data["payload"]["input_summary"], "rm -rf build");
    assert_eq!(asked.data["payload"]["input"]["command"], "rm -rf build");
    let choice = asked.data["choice_id"].as_str().unwrap().to_owned();
    assert!(choice.starts_with("choice_"));

    // The loop reports the pending choice.
    let (_, detail) = app.get(&format!("/api/v1/loops/{id}"), &bearer).await;
    assert_eq!(detail["busy"], true);
    assert_eq!(detail["current_turn"]["pending_choice_id"], choice.as_str());

    // Wrong shapes first, then whether it is pending.
    let bad = app.choose(&bearer, &id, &choice, json!({})).await;
    assert_error(&bad, 400, "invalid_request_error", "invalid_choice_payload");
    let misfit = app
        .choose(&bearer, &id, &choice, json!({"answers": {"x": "y"}}))
        .await;
    assert_error(
        &misfit,
        400,
        "invalid_request_error",
        "invalid_choice_payload",
    );
    let unknown = app
        .choose(&bearer, &id, "choice_nope", json!({"allow": true}))
        .await;
    assert_error(&unknown, 404, "not_found_error", "choice_not_found");

    let (status, _) = app
        .choose(&bearer, &id, &choice, json!({"allow": true}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let rest = stream.until_end().await;
    let resolved = &rest[0];
    assert_eq!(resolved.name, "choice_resolved");
    assert_eq!(resolved.data["choice_id"], choice.as_str());
    assert_eq!(resolved.data["source"], "api");
    assert!(text(&rest).starts_with("Allowed"), "{}", text(&rest));
    assert!(names(&rest).contains(&"tool_call"));
    // Answered once; a second answer finds nothing pending.
    let again = app
        .choose(&bearer, &id, &choice, json!({"allow": true}))
        .await;
    assert_error(&again, 404, "not_found_error", "choice_not_found");

    let mut stream = app.send(&bearer, &id, "/permission deploy").await;
    let choice = stream.until("requires_choice").await.pop().unwrap().data["choice_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // From the web page, the source is `web`.
    let session = app.session("alice").await;
    let (status, _) = app
        .choose(&session, &id, &choice, json!({"allow": false}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let rest = stream.until_end().await;
    assert_eq!(rest[0].data["source"], "web");
    assert!(text(&rest).starts_with("Denied"), "{}", text(&rest));
    assert!(!names(&rest).contains(&"tool_call"));
}

#[tokio::test]
async fn question_answers_reach_the_agent() {
    let (app, bearer, id) = app_with_loop().await;
    let mut stream = app.send(&bearer, &id, "/question").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    assert_eq!(asked.data["kind"], "question");
    let questions = &asked.data["payload"]["questions"];
    assert_eq!(questions[0]["question"], "Which color do you prefer?");
    assert_eq!(
        questions[0]["options"][1],
        json!({"label": "Blue", "description": "Cool"})
    );
    assert_eq!(questions[1]["multi_select"], true);
    let choice = asked.data["choice_id"].as_str().unwrap();
    let answer = json!({"answers": {"Which color do you prefer?": "Blue", "Which sizes do you need?": ["S", "L"]}});
    let bad = app
        .choose(&bearer, &id, choice, json!({"allow": true}))
        .await;
    assert_error(&bad, 400, "invalid_request_error", "invalid_choice_payload");
    assert_eq!(
        app.choose(&bearer, &id, choice, answer).await.0,
        StatusCode::ACCEPTED
    );
    let said = text(&stream.until_end().await);
    assert!(
        said.contains(r#""Which color do you prefer?":"Blue""#),
        "{said}"
    );
    assert!(
        said.contains(r#""Which sizes do you need?":"S, L""#),
        "{said}"
    );
}

#[tokio::test]
async fn interrupt_withdraws_a_pending_choice() {
    let (app, bearer, id) = app_with_loop().await;
    let mut stream = app.send(&bearer, &id, "/permission ls").await;
    let choice = stream.until("requires_choice").await.pop().unwrap().data["choice_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.post(&format!("/api/v1/loops/{id}/interrupt"), &bearer, json!({}))
        .await;
    assert_eq!(stream.until_end().await.pop().unwrap().name, "interrupted");
    let late = app
        .choose(&bearer, &id, &choice, json!({"allow": true}))
        .await;
    assert_error(&late, 404, "not_found_error", "choice_not_found");
}

#[tokio::test]
async fn watchers_see_everything_and_a_late_one_gets_a_snapshot() {
    let (app, bearer, id) = app_with_loop().await;
    let mut w1 = app.watch(&bearer, &id, None).await;
    let mut w2 = app.watch(&bearer, &id, None).await;
    let mut stream = app.send(&bearer, &id, "/permission make").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = asked.data["choice_id"].as_str().unwrap().to_owned();

    // A watcher opened now learns the state of the running turn first.
    let mut late = app.watch(&bearer, &id, None).await;
    let snapshot = late.next().await.unwrap();
    assert_eq!(snapshot.name, "snapshot");
    assert_eq!(snapshot.id, None);
    assert_eq!(snapshot.data["turn_id"], asked.data["turn_id"]);
    assert_eq!(snapshot.data["pending_choice_id"], choice_id.as_str());
    assert_eq!(snapshot.data["pending_choice"]["kind"], "permission");
    assert_eq!(snapshot.data["pending_choice"]["payload"]["tool"], "Bash");

    app.choose(&bearer, &id, &choice_id, json!({"allow": true}))
        .await;
    stream.until_end().await;
    let a = w1.until("done").await;
    let b = w2.until("done").await;
    let ids =
        |events: &[crate::support::Sse]| events.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(a[0].name, "user_message");
    assert_eq!(a[0].data["content"], "/permission make");
    assert!(a[0].data["created_at"].is_string());
    let seqs = ids(&a);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: {seqs:?}"
    );
    let late_events = late.until("done").await;
    assert_eq!(late_events[0].name, "choice_resolved");
}

#[tokio::test]
async fn idempotency_key_replays_the_turn_and_refuses_another_body() {
    let (app, bearer, id) = app_with_loop().await;
    let body = json!({"content": "/hold go"});
    let mut first = app
        .send_with(&bearer, &id, body.clone(), Some("key-1"))
        .await;
    let started = first.next().await.unwrap();
    drop(first); // the connection drops mid-turn

    // A retry with the same key and body replays from the start, then follows live.
    let mut retry = app
        .send_with(&bearer, &id, body.clone(), Some("key-1"))
        .await;
    // The first event is the replayed one; then the turn is released and follows live.
    let replayed = retry.next().await.unwrap();
    app.release(&id, "go");
    let mut events = vec![replayed];
    events.extend(retry.until_end().await);
    assert_eq!(events[0].id, started.id);
    assert_eq!(events[0].data, started.data);
    assert_eq!(events.last().unwrap().name, "done");
    // Replaying a finished turn gives the same events again; nothing was sent twice.
    let again = app
        .send_with(&bearer, &id, body.clone(), Some("key-1"))
        .await
        .until_end()
        .await;
    let ids = |e: &[crate::support::Sse]| e.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&events));
    let (_, detail) = app.get(&format!("/api/v1/loops/{id}"), &bearer).await;
    assert_eq!(detail["turn_count"], 1);

    let conflict = app
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/loops/{id}/messages"),
            &bearer,
        )
        .header("idempotency-key", "key-1")
        .json(&json!({"content": "something else"}))
        .send()
        .await
        .unwrap();
    assert_error(
        &crate::support::read(conflict).await,
        409,
        "conflict_error",
        "idempotency_key_reused",
    );
    let long = app
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/loops/{id}/messages"),
            &bearer,
        )
        .header("idempotency-key", "k".repeat(257))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(
        &crate::support::read(long).await,
        400,
        "invalid_request_error",
        "idempotency_key_too_long",
    );
}

#[tokio::test]
async fn message_bodies_are_validated() {
    let (app, bearer, id) = app_with_loop().await;
    let path = format!("/api/v1/loops/{id}/messages");
    let check = async |body: Value, code: &str| {
        let got = app.post(&path, &bearer, body).await;
        assert_error(&got, 400, "invalid_request_error", code);
    };
    check(json!({}), "missing_content").await;
    check(json!({"content": "  "}), "missing_content").await;
    check(
        json!({"content": "x".repeat(1024 * 1024 + 1)}),
        "content_too_large",
    )
    .await;
    check(
        json!({"content": "hi", "permission_mode": "yolo"}),
        "invalid_permission_mode",
    )
    .await;
    app.delete(&format!("/api/v1/loops/{id}"), &bearer).await;
    check(json!({"content": "hi"}), "loop_archived").await;
}

#[tokio::test]
async fn held_permission_modes_answer_without_asking() {
    let (app, bearer, id) = app_with_loop().await;
    let body = json!({"content": "/permission touch x", "permission_mode": "bypassPermissions"});
    let events = app
        .send_with(&bearer, &id, body, None)
        .await
        .until_end()
        .await;
    assert!(
        !names(&events).contains(&"requires_choice"),
        "{:?}",
        names(&events)
    );
    assert!(text(&events).starts_with("Allowed"));
    let body = json!({"content": "/permission touch x", "permission_mode": "dontAsk"});
    let events = app
        .send_with(&bearer, &id, body, None)
        .await
        .until_end()
        .await;
    assert!(!names(&events).contains(&"requires_choice"));
    assert!(text(&events).starts_with("Denied"));
    // The mode was for that turn only.
    let mut stream = app.send(&bearer, &id, "/permission touch x").await;
    assert_eq!(
        stream.until("requires_choice").await.pop().unwrap().name,
        "requires_choice"
    );
}

#[tokio::test]
async fn turns_history_is_derived_from_the_log() {
    let (app, bearer, id) = app_with_loop().await;
    app.send(&bearer, &id, "first").await.until_end().await;
    let mut stream = app.send(&bearer, &id, "/permission ls").await;
    let choice = stream.until("requires_choice").await.pop().unwrap().data["choice_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.choose(&bearer, &id, &choice, json!({"allow": true}))
        .await;
    stream.until_end().await;
    app.send(&bearer, &id, "/think hmm").await.until_end().await;
    app.send(&bearer, &id, "/error nope")
        .await
        .until_end()
        .await;

    let (status, page) = app.get(&format!("/api/v1/loops/{id}/turns"), &bearer).await;
    assert_eq!(status, StatusCode::OK);
    let turns = page["data"].as_array().unwrap();
    assert_eq!(turns.len(), 4);
    assert_eq!(page["has_more"], false);
    assert_eq!(turns[0]["content"], "first");
    assert_eq!(turns[0]["assistant_text"], "first");
    assert_eq!(turns[0]["status"], "done");
    assert_eq!(turns[0]["origin"], "user");
    assert!(turns[0]["usage"]["duration_ms"].is_u64());
    for field in ["created_at", "started_at", "ended_at"] {
        assert!(turns[0][field].is_string(), "{field}: {}", turns[0]);
    }
    assert_eq!(turns[1]["choices"][0]["choice_id"], choice.as_str());
    assert_eq!(turns[1]["choices"][0]["answer"], json!({"allow": true}));
    assert_eq!(turns[1]["choices"][0]["source"], "api");
    assert_eq!(turns[1]["tool_calls"][0]["ok"], true);
    assert_eq!(turns[2]["thinking_text"], "The user wants me to say: hmm");
    assert_eq!(turns[3]["status"], "error");
    assert_eq!(
        turns[3]["error"],
        json!({"code": "agent_error", "message": "nope"})
    );

    let (_, newest) = app
        .get(&format!("/api/v1/loops/{id}/turns?limit=2"), &bearer)
        .await;
    assert_eq!(newest["data"][0]["turn_id"], turns[2]["turn_id"]);
    assert_eq!(newest["has_more"], true);
    let before = newest["first_id"].as_str().unwrap();
    let (_, older) = app
        .get(
            &format!("/api/v1/loops/{id}/turns?limit=2&before={before}"),
            &bearer,
        )
        .await;
    assert_eq!(older["data"][0]["turn_id"], turns[0]["turn_id"]);
    assert_eq!(older["has_more"], false);
    let after = older["last_id"].as_str().unwrap();
    let (_, newer) = app
        .get(
            &format!("/api/v1/loops/{id}/turns?limit=1&after={after}"),
            &bearer,
        )
        .await;
    assert_eq!(newer["data"][0]["turn_id"], turns[2]["turn_id"]);
    assert_eq!(newer["has_more"], true);
    let bad = app
        .get(
            &format!("/api/v1/loops/{id}/turns?before=turn_nope"),
            &bearer,
        )
        .await;
    assert_error(&bad, 400, "invalid_request_error", "invalid_cursor");
}

#[tokio::test]
async fn an_agent_crash_ends_the_turn_and_the_next_message_respawns() {
    let (app, bearer, id) = app_with_loop().await;
    let events = app.send(&bearer, &id, "/crash").await.until_end().await;
    let end = events.last().unwrap();
    assert_eq!(end.name, "error");
    assert_eq!(end.data["code"], "agent_crashed");
    let events = app
        .send(&bearer, &id, "alive again")
        .await
        .until_end()
        .await;
    assert_eq!(events[0].data["cold_start"], true);
    assert_eq!(text(&events), "alive again");
}

#[tokio::test]
async fn idle_agents_are_reclaimed_and_a_waiting_choice_is_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    crate::support::accounts(tmp.path())
        .users
        .add("alice", false, crate::support::PASSWORD)
        .unwrap();
    let mut config = loopd::Config::for_data_dir(tmp.path());
    config.idle_timeout = std::time::Duration::from_millis(500);
    let app = TestApp::start_with(config).await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &id, "hi").await.until_end().await;
    eventually("the idle agent to be reclaimed", async || {
        app.get("/healthz", &Auth::None).await.1["live_agents"] == 0
    })
    .await;
    let events = app.send(&bearer, &id, "back").await.until_end().await;
    assert_eq!(events[0].data["cold_start"], true);

    let mut stream = app.send(&bearer, &id, "/permission ls").await;
    stream.until("requires_choice").await;
    let end = stream.until_end().await.pop().unwrap();
    assert_eq!(end.data["code"], "sandbox_evicted");
}

#[tokio::test]
async fn max_agents_reclaims_the_least_recently_used_idle_agent_or_waits() {
    let tmp = tempfile::tempdir().unwrap();
    crate::support::accounts(tmp.path())
        .users
        .add("alice", false, crate::support::PASSWORD)
        .unwrap();
    let mut config = loopd::Config::for_data_dir(tmp.path());
    config.max_agents = 1;
    let app = TestApp::start_with(config).await;
    let bearer = app.bearer("alice").await;
    let a = app.create_loop(&bearer, json!({"title": "a"})).await;
    let b = app.create_loop(&bearer, json!({"title": "b"})).await;

    app.send(&bearer, &a, "a first").await.until_end().await;
    // A is idle with a live agent: B takes its slot.
    let events = app.send(&bearer, &b, "b first").await.until_end().await;
    assert_eq!(text(&events), "b first");
    assert_eq!(app.get("/healthz", &Auth::None).await.1["live_agents"], 1);

    // B is busy: A's turn waits for the slot (queued), then runs.
    let mut busy = app.send(&bearer, &b, "/hold go").await;
    busy.until("assistant_delta").await;
    let mut waiting = app.send(&bearer, &a, "a second").await;
    let first = waiting.next().await.unwrap();
    assert_eq!(first.name, "queued");
    app.release(&b, "go");
    busy.until_end().await;
    let events = waiting.until_end().await;
    assert_eq!(events[0].name, "started");
    assert_eq!(events[0].data["cold_start"], true);
    assert_eq!(text(&events), "a second");
}

#[tokio::test]
async fn a_restart_closes_the_running_turn_and_keeps_the_history() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &id, "before").await.until_end().await;
    let mut stream = app.send(&bearer, &id, "/hold never").await;
    stream.until("assistant_delta").await;
    let (dir, tmp) = app.stop().await;
    // The stream says why its turn ended, then closes with the server.
    let end = stream.until_end().await.pop().unwrap();
    assert_eq!(
        (end.name.as_str(), &end.data["code"]),
        ("error", &json!("server_restarted"))
    );
    stream.assert_closed().await;
    let app = TestApp::start_with(loopd::Config::for_data_dir(&dir)).await;
    let _keep = tmp;
    let (_, page) = app.get(&format!("/api/v1/loops/{id}/turns"), &bearer).await;
    let turns = page["data"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["status"], "done");
    assert_eq!(turns[1]["status"], "error");
    assert_eq!(turns[1]["error"]["code"], "server_restarted");
    let (_, detail) = app.get(&format!("/api/v1/loops/{id}"), &bearer).await;
    assert_eq!(detail["busy"], false);
    // Seqs go on where they were.
    let events = app.send(&bearer, &id, "after").await.until_end().await;
    assert_eq!(events[0].data["cold_start"], true);
    let mut all = app.watch(&bearer, &id, Some(0)).await;
    let mut seqs = vec![];
    for _ in 0..3 {
        seqs.extend(
            all.until("user_message")
                .await
                .iter()
                .map(|e| e.id.unwrap()),
        );
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[tokio::test]
async fn output_while_no_turn_runs_opens_an_agent_turn() {
    let (app, bearer, id) = app_with_loop().await;
    let mut watcher = app.watch(&bearer, &id, None).await;
    let mut stream = app.send(&bearer, &id, "/later 0.3 back on my own").await;
    stream.until_end().await;
    stream.assert_closed().await;
    watcher.until("done").await; // the user's turn
    let agent_turn = watcher.until("done").await;
    let started = &agent_turn[0];
    assert_eq!(started.name, "started");
    assert_eq!(started.data["origin"], "agent");
    assert_eq!(text(&agent_turn), "back on my own");
    let (_, page) = app.get(&format!("/api/v1/loops/{id}/turns"), &bearer).await;
    let turns = page["data"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["origin"], "agent");
    assert_eq!(turns[1]["content"], "");
    assert_eq!(turns[1]["assistant_text"], "back on my own");
    assert_eq!(turns[1]["status"], "done");
}

#[tokio::test]
async fn a_stalled_client_slows_no_one_and_still_gets_every_event() {
    let (app, bearer, id) = app_with_loop().await;
    // A watcher that does not read at all while a long turn streams.
    let stalled = app.watch(&bearer, &id, None).await;
    let words: String = (0..120_000).map(|i| format!("w{i} ")).collect();
    let started = std::time::Instant::now();
    let events = app
        .send(&bearer, &id, words.trim_end())
        .await
        .until_end()
        .await;
    let took = started.elapsed();
    assert_eq!(events.last().unwrap().name, "done");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.name == "assistant_delta")
            .count(),
        120_000
    );
    // The sender's stream finished without waiting for the stalled watcher.
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
    // The stalled watcher, read now, gets every event in order, none lost.
    let mut stalled = stalled;
    let all = stalled.until("done").await;
    let deltas = all.iter().filter(|e| e.name == "assistant_delta").count();
    assert_eq!(deltas, 120_000);
    let seqs: Vec<u64> = all.iter().map(|e| e.id.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[tokio::test]
async fn a_vault_cannot_set_loader_variables() {
    let (app, bearer, _) = app_with_loop().await;
    std::fs::create_dir_all(app.dir.join("vaults")).unwrap();
    std::fs::write(
        app.dir.join("vaults/evil.env"),
        "OK=1\nLD_PRELOAD=/tmp/x.so\n",
    )
    .unwrap();
    std::fs::write(app.dir.join("vaults/evil.users"), "alice\n").unwrap();
    let id = app.create_loop(&bearer, json!({"vault": "evil"})).await;
    let events = app.send(&bearer, &id, "hi").await.until_end().await;
    let end = events.last().unwrap();
    assert_eq!(end.name, "error");
    assert_eq!(end.data["code"], "agent_unavailable");
    assert!(
        end.data["message"].as_str().unwrap().contains("LD_PRELOAD"),
        "{}",
        end.data
    );
}
