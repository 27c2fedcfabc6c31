//! Webhooks against a real receiver on loopback: signatures checked with
//! the Standard Webhooks library, retries, delivery after a kill -9, the
//! address guard, and answering a prompt learned of only by webhook.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::support::{Auth, TestApp, assert_error, eventually};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver: records every request, answers 500 to the first
/// `fail_first`, then 200.
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), fail_first).await
    }

    pub async fn start_on(addr: SocketAddr, fail_first: usize) -> Self {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let failures = Arc::new(AtomicUsize::new(fail_first));
        let record = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (record, failures) = (record.clone(), failures.clone());
                async move {
                    record.lock().unwrap().push(Got { headers, body });
                    let fail = failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if fail {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, got, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until a request whose body's `type` is `kind` came; returns it.
    pub async fn until(&self, kind: &str) -> Got {
        eventually(&format!("a `{kind}` webhook"), async || {
            self.all().iter().any(|g| g.json()["type"] == kind)
        })
        .await;
        self.all()
            .into_iter()
            .find(|g| g.json()["type"] == kind)
            .unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks a request's signature as the Standard Webhooks library does.
pub fn verify(secret: &str, got: &Got) {
    let hook = standardwebhooks::Webhook::new(secret).unwrap();
    hook.verify(got.body.as_bytes(), &got.headers)
        .unwrap_or_else(|e| panic!("bad signature ({e:?}) on {}", got.body));
}

/// A webhook for `auth`'s user; returns its id and secret.
pub async fn subscribe(app: &TestApp, auth: &Auth, url: &str, events: &[&str]) -> (String, String) {
    let (status, hook) = app
        .post(
            "/api/v1/me/webhooks",
            auth,
            json!({"url": url, "events": events}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");
    (
        hook["id"].as_str().unwrap().to_owned(),
        hook["secret"].as_str().unwrap().to_owned(),
    )
}

fn allowing_private(c: &mut loopd::config::Config) {
    c.webhook_allow_private = true;
}

#[tokio::test]
async fn a_bot_learns_of_a_prompt_by_a_signed_webhook_and_answers_it() {
    let app = TestApp::start_tweaked(allowing_private).await;
    let bearer = app.bearer("alice").await;
    let receiver = Receiver::start(0).await;
    let (hook_id, secret) = subscribe(
        &app,
        &bearer,
        &receiver.url(),
        &["started", "requires_choice", "choice_resolved", "done"],
    )
    .await;
    assert!(secret.starts_with("whsec_"));
    let id = app.create_loop(&bearer, json!({})).await;

    // The bot sends and walks away: no stream is kept.
    let mut stream = app.send(&bearer, &id, "/permission make deploy").await;
    stream.until("requires_choice").await;
    drop(stream);

    let asked = receiver.until("requires_choice").await;
    verify(&secret, &asked);
    let body = asked.json();
    assert_eq!(body["loop_id"], id.as_str());
    assert!(body["turn_id"].as_str().unwrap().starts_with("turn_"));
    assert!(body["seq"].as_u64().unwrap() > 0);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(body["data"]["kind"], "permission");
    assert_eq!(body["data"]["payload"]["tool"], "Bash");
    let msg_id = asked.headers["webhook-id"].to_str().unwrap().to_owned();
    assert!(msg_id.starts_with("msg_"), "{msg_id}");
    assert!(
        asked.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .starts_with("v1,")
    );
    // Tampered, it does not verify.
    let mut forged = asked.clone();
    forged.body = forged.body.replace("make deploy", "rm -rf /");
    assert!(
        standardwebhooks::Webhook::new(&secret)
            .unwrap()
            .verify(forged.body.as_bytes(), &forged.headers)
            .is_err()
    );

    // Answered from the webhook's body alone.
    let choice = body["data"]["choice_id"].as_str().unwrap();
    let (status, _) = app
        .choose(&bearer, &id, choice, json!({"allow": true}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let resolved = receiver.until("choice_resolved").await;
    verify(&secret, &resolved);
    let done = receiver.until("done").await;
    verify(&secret, &done);
    assert_eq!(done.json()["turn_id"], body["turn_id"]);
    // Each once (sent side by side, so not always in order: `seq` says it).
    let mut kinds: Vec<(u64, String)> = receiver
        .all()
        .iter()
        .map(|g| {
            (
                g.json()["seq"].as_u64().unwrap(),
                g.json()["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    kinds.sort();
    let kinds: Vec<&str> = kinds.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["started", "requires_choice", "choice_resolved", "done"]
    );

    // The deliveries, as the bot can check them (once the sender has
    // recorded the answers it got).
    eventually("every delivery recorded", async || {
        let url = format!("/api/v1/me/webhooks/{hook_id}/deliveries");
        let (_, list) = app.get(&url, &bearer).await;
        list["data"]
            .as_array()
            .is_some_and(|d| d.len() == 4 && d.iter().all(|d| d["status"] == "delivered"))
    })
    .await;
    let (status, list) = app
        .get(
            &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
            &bearer,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 4, "{list}");
    assert!(data.iter().all(|d| d["status"] == "delivered"
        && d["response_code"] == 200
        && d["attempts"] == 1
        && d["next_retry_at"].is_null()));
    assert!(data.iter().any(|d| d["id"] == msg_id.as_str()));

    // Listing never shows the secret; another user sees nothing.
    let (_, hooks) = app.get("/api/v1/me/webhooks", &bearer).await;
    assert_eq!(hooks["data"][0]["id"], hook_id.as_str());
    assert!(hooks["data"][0].get("secret").is_none());
    let bob = app.bearer("bob").await;
    assert_eq!(
        app.get("/api/v1/me/webhooks", &bob).await.1["data"],
        json!([])
    );
    assert_error(
        &app.get(&format!("/api/v1/me/webhooks/{hook_id}/deliveries"), &bob)
            .await,
        404,
        "not_found_error",
        "webhook_not_found",
    );
    assert_error(
        &app.delete(&format!("/api/v1/me/webhooks/{hook_id}"), &bob)
            .await,
        404,
        "not_found_error",
        "webhook_not_found",
    );
    // Deleted, it is told nothing more.
    let (status, _) = app
        .delete(&format!("/api/v1/me/webhooks/{hook_id}"), &bearer)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    app.send(&bearer, &id, "after").await.until("done").await;
    let before = receiver.all().len();
    let mut again = app.send(&bearer, &id, "/permission ls").await;
    again.until("requires_choice").await;
    assert_eq!(receiver.all().len(), before);
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_the_same_event_a_third_time() {
    let app = TestApp::start_tweaked(allowing_private).await;
    let bearer = app.bearer("alice").await;
    let receiver = Receiver::start(2).await;
    let (hook_id, secret) = subscribe(&app, &bearer, &receiver.url(), &["done"]).await;
    let id = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &id, "hello").await.until("done").await;

    // 1 s and then 5 s later.
    eventually("three attempts", async || receiver.all().len() >= 3).await;
    let all = receiver.all();
    assert_eq!(all.len(), 3);
    let ids: Vec<_> = all
        .iter()
        .map(|g| g.headers["webhook-id"].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "one id for every attempt");
    assert!(all.iter().all(|g| g.body == all[0].body));
    for got in &all {
        verify(&secret, got);
    }
    eventually("the delivery recorded as delivered", async || {
        let (_, list) = app
            .get(
                &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
                &bearer,
            )
            .await;
        list["data"][0]["status"] == "delivered"
    })
    .await;
    let (_, list) = app
        .get(
            &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
            &bearer,
        )
        .await;
    assert_eq!(list["data"][0]["attempts"], 3);
    assert_eq!(list["data"][0]["response_code"], 200);
}

#[tokio::test]
async fn a_slow_receiver_holds_up_neither_a_turn_nor_another_receiver() {
    let app = TestApp::start_tweaked(allowing_private).await;
    let bearer = app.bearer("alice").await;
    // A receiver that takes the connection and never answers.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_url = format!("http://{}/hook", stuck.local_addr().unwrap());
    subscribe(&app, &bearer, &stuck_url, &["done"]).await;
    let fine = Receiver::start(0).await;
    subscribe(&app, &bearer, &fine.url(), &["done"]).await;
    let id = app.create_loop(&bearer, json!({})).await;
    for n in 0..3 {
        // Each turn ends as quickly as ever…
        app.send(&bearer, &id, &format!("turn {n}"))
            .await
            .until("done")
            .await;
    }
    // …and the working receiver hears of all three.
    eventually("three deliveries to the working receiver", async || {
        fine.all().len() == 3
    })
    .await;
    drop(stuck);
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/hook",
        "http://localhost:9/hook",
        "file:///etc/passwd",
        "not a url",
    ] {
        let got = app
            .post(
                "/api/v1/me/webhooks",
                &bearer,
                json!({"url": url, "events": ["done"]}),
            )
            .await;
        assert_error(&got, 400, "invalid_request_error", "webhook_url_invalid");
    }
    for (body, code) in [
        (
            json!({"url": "https://8.8.8.8/", "events": []}),
            "invalid_events",
        ),
        (
            json!({"url": "https://8.8.8.8/", "events": ["assistant_delta"]}),
            "invalid_events",
        ),
        (
            json!({"url": "https://8.8.8.8/", "events": ["done"], "loop_ids": ["loop_00000000000000000000000000000000"]}),
            "invalid_loop_ids",
        ),
        (json!({"events": ["done"]}), "invalid_body"),
    ] {
        let got = app.post("/api/v1/me/webhooks", &bearer, body).await;
        assert_error(&got, 400, "invalid_request_error", code);
    }
    // A token without webhooks:write cannot make one; nor one with
    // webhooks:write alone: a webhook tells what loops say.
    let session = app.session("alice").await;
    let mut tokens = Vec::new();
    for scope in ["loops:read", "webhooks:write"] {
        let (token, _) = app.token(&session, json!({"scopes": [scope]})).await;
        let body = json!({"url": "https://8.8.8.8/", "events": ["done"]});
        let got = app.post("/api/v1/me/webhooks", &token, body).await;
        assert_error(&got, 403, "permission_error", "insufficient_scope");
        tokens.push(token);
    }
    let writer = &tokens[1];
    assert_eq!(
        app.get("/api/v1/me/webhooks", writer).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_webhook_for_some_loops_hears_only_of_those() {
    let app = TestApp::start_tweaked(allowing_private).await;
    let bearer = app.bearer("alice").await;
    let receiver = Receiver::start(0).await;
    let watched = app.create_loop(&bearer, json!({})).await;
    let other = app.create_loop(&bearer, json!({})).await;
    let (status, _) = app
        .post(
            "/api/v1/me/webhooks",
            &bearer,
            json!({"url": receiver.url(), "events": ["done"], "loop_ids": [watched]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    app.send(&bearer, &other, "not this")
        .await
        .until("done")
        .await;
    app.send(&bearer, &watched, "this")
        .await
        .until("done")
        .await;
    let got = receiver.until("done").await;
    assert_eq!(got.json()["loop_id"], watched.as_str());
    // The other loop's turn came first and was never sent.
    app.send(&bearer, &watched, "and this")
        .await
        .until("done")
        .await;
    eventually("the second", async || receiver.all().len() == 2).await;
    assert!(
        receiver
            .all()
            .iter()
            .all(|g| g.json()["loop_id"] == watched.as_str())
    );
}

/// `loopd serve` as its own process on `dir`, so it can be killed.
fn serve(dir: &std::path::Path, port: u16) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_loopd"));
    command
        .args([
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--agent",
            "echo",
        ])
        .args(["--webhook-allow-private"])
        .env("LOOPD_DATA_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if crate::pg::on_postgres() {
        command.env("LOOPD_DATABASE_URL", crate::pg::database_for(dir));
    }
    command.spawn().unwrap()
}

#[tokio::test]
async fn deliveries_survive_a_kill_9_and_events_logged_before_it_are_found_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let accounts = crate::support::accounts(&dir);
    accounts
        .users
        .add("alice", false, "alice's password")
        .unwrap();
    let (token, _) = accounts
        .tokens
        .create("alice", None, Default::default())
        .unwrap();
    let bearer = Auth::Bearer(token);
    // The receiver is down for now: its port is known, nothing listens.
    let hook_addr: SocketAddr = format!("127.0.0.1:{}", crate::pg::free_port())
        .parse()
        .unwrap();
    let url = format!("http://{hook_addr}/hook");

    let port = crate::pg::free_port();
    let mut child = serve(&dir, port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let app = TestApp::external(addr, dir.clone()).await;
    let (hook_id, secret) = subscribe(&app, &bearer, &url, &["done", "error"]).await;
    let id = app.create_loop(&bearer, json!({})).await;
    // A turn that ends (`done`, sent and refused: nobody listens), and one
    // still running when the server is killed.
    app.send(&bearer, &id, "first").await.until("done").await;
    eventually("a failed first attempt", async || {
        let (_, list) = app
            .get(
                &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
                &bearer,
            )
            .await;
        list["data"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;
    let mut held = app.send(&bearer, &id, "/hold never").await;
    held.until("assistant_delta").await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(held);

    // Back up, with the receiver listening now.
    let receiver = Receiver::start_on(hook_addr, 0).await;
    let mut child = serve(&dir, port);
    let app = TestApp::external(addr, dir.clone()).await;
    // The pending `done`, retried; and the running turn's end, which the
    // restart wrote into the log (`server_restarted`), found there.
    let done = receiver.until("done").await;
    verify(&secret, &done);
    let error = receiver.until("error").await;
    verify(&secret, &error);
    assert_eq!(error.json()["data"]["code"], "server_restarted");
    assert_eq!(error.json()["loop_id"], id.as_str());
    eventually("both recorded as delivered", async || {
        let (_, list) = app
            .get(
                &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
                &bearer,
            )
            .await;
        let data = list["data"].as_array().cloned().unwrap_or_default();
        data.len() == 2 && data.iter().all(|d| d["status"] == "delivered")
    })
    .await;
    // Each event once at the receiver after the restart.
    let kinds: Vec<String> = receiver
        .all()
        .iter()
        .map(|g| g.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn the_python_receiver_of_the_docs_verifies_and_answers_a_prompt() {
    // The docs show the example file as it is.
    let root = env!("CARGO_MANIFEST_DIR");
    let script = std::fs::read_to_string(format!("{root}/examples/webhook_receiver.py")).unwrap();
    let doc = std::fs::read_to_string(format!("{root}/docs/webhooks.md")).unwrap();
    assert!(
        doc.contains(&script),
        "docs/webhooks.md must show examples/webhook_receiver.py as it is"
    );

    let app = TestApp::start_tweaked(allowing_private).await;
    let Auth::Bearer(token) = app.bearer("alice").await else {
        unreachable!()
    };
    let bearer = Auth::Bearer(token.clone());
    let port = crate::pg::free_port();
    let (_, secret) = subscribe(
        &app,
        &bearer,
        &format!("http://127.0.0.1:{port}/hook"),
        &["requires_choice", "choice_resolved", "done"],
    )
    .await;
    let mut receiver = tokio::process::Command::new("python3")
        .arg(format!("{root}/examples/webhook_receiver.py"))
        .args(["--port", &port.to_string(), "--approve"])
        .args([
            "--loopd",
            &format!("http://{}", app.addr),
            "--token",
            &token,
        ])
        .env("WEBHOOK_SECRET", &secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let hook_url = format!("http://127.0.0.1:{port}/hook");
    let http = reqwest::Client::new();
    eventually("the receiver to listen", async || {
        http.post(&hook_url).body("{}").send().await.is_ok()
    })
    .await;
    // A forged request is refused.
    let forged = http
        .post(&hook_url)
        .header("webhook-id", "msg_forged")
        .header(
            "webhook-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")
        .body(r#"{"type":"done"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);

    // A prompt nobody watches is allowed by the receiver alone.
    let id = app.create_loop(&bearer, json!({})).await;
    let stream = app.send(&bearer, &id, "/permission make deploy").await;
    drop(stream);
    let mut watch = app.watch(&bearer, &id, Some(0)).await;
    let events = watch.until("done").await;
    let resolved = events.iter().find(|e| e.name == "choice_resolved").unwrap();
    assert_eq!(
        resolved.data["answer"]["allow"], true,
        "{:?}",
        resolved.data
    );
    assert_eq!(resolved.data["source"], "api");

    // It printed each event once, verified.
    let stdout = receiver.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver printed in time")
            .unwrap()
            .expect("the receiver is running");
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["loop_id"], id.as_str());
        kinds.push(event["type"].as_str().unwrap().to_owned());
    }
    kinds.sort();
    assert_eq!(kinds, ["choice_resolved", "done", "requires_choice"]);
    receiver.kill().await.unwrap();
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let app = TestApp::start_tweaked(allowing_private).await;
    let bearer = app.bearer("alice").await;
    // The place a redirect would lead to, and a receiver that redirects there.
    let elsewhere = Receiver::start(0).await;
    let target = elsewhere.url();
    let redirector = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let target = target.clone();
            async move { axum::response::Redirect::temporary(&target) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, redirector).await.unwrap() });
    let (hook_id, _) = subscribe(&app, &bearer, &url, &["done"]).await;
    let id = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &id, "hello").await.until("done").await;

    eventually(
        "the redirect recorded as an answer that is not 2xx",
        async || {
            let (_, list) = app
                .get(
                    &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
                    &bearer,
                )
                .await;
            list["data"][0]["response_code"] == 307
        },
    )
    .await;
    let (_, list) = app
        .get(
            &format!("/api/v1/me/webhooks/{hook_id}/deliveries"),
            &bearer,
        )
        .await;
    assert_eq!(list["data"][0]["status"], "pending", "{list}");
    assert!(list["data"][0]["next_retry_at"].is_string());
    assert!(elsewhere.all().is_empty(), "the redirect was followed");
    server.abort();
}
