//! Every limit against the real server: it is hit, it answers its
//! documented envelope (429 with `Retry-After`, or 4xx), and normal traffic
//! goes through afterwards. Limits are set low here so a test reaches them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use loopd::config::Rate;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

use crate::support::{Auth, PASSWORD, TestApp, assert_error, eventually, read};

fn rate(burst: u32, ms: u64) -> Rate {
    Rate {
        burst,
        period: Duration::from_millis(ms),
    }
}

async fn login_as(
    app: &TestApp,
    user: &str,
    password: &str,
    from: &str,
) -> (StatusCode, Value, Option<u64>) {
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .header("x-forwarded-for", from)
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let (status, body) = read(resp).await;
    (status, body, retry)
}

#[tokio::test]
async fn logins_are_throttled_per_address_and_per_username_and_a_right_password_gets_in_after() {
    let app = TestApp::start_tweaked(|c| {
        c.trust_forwarded_for = true;
        c.limits.login_per_client = rate(5, 300);
        c.limits.login_per_user = rate(3, 300);
    })
    .await;
    // One address guessing alice: three tries, then 429 with Retry-After.
    for _ in 0..3 {
        let (status, body, _) = login_as(&app, "alice", "wrong password!", "10.0.0.1").await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, body, retry) = login_as(&app, "alice", PASSWORD, "10.0.0.1").await;
    assert_error(
        &(status, body),
        429,
        "rate_limit_error",
        "too_many_login_attempts",
    );
    assert!(retry.is_some_and(|s| s >= 1), "{retry:?}");
    // The address has one try left of its own five, then it is throttled for anyone.
    assert_eq!(
        login_as(&app, "bob", "wrong password!", "10.0.0.1").await.0,
        401
    );
    let (status, body, _) = login_as(&app, "bob", PASSWORD, "10.0.0.1").await;
    assert_error(
        &(status, body),
        429,
        "rate_limit_error",
        "too_many_login_attempts",
    );
    // The guessing locked out only the guesser: alice, from her own address, gets in.
    assert_eq!(login_as(&app, "alice", PASSWORD, "10.0.0.3").await.0, 200);
    // And after the wait, the right password gets through from the first address too.
    eventually("alice to be let in", async || {
        login_as(&app, "alice", PASSWORD, "10.0.0.1").await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn requests_for_another_host_are_refused_before_routing() {
    let app = TestApp::start_tweaked(|c| c.allowed_hosts = vec!["loopd.internal".into()]).await;
    let with_host = |host: &'static str| {
        app.http
            .post(app.url("/api/auth/login"))
            .header(header::HOST, host)
            .header(header::ORIGIN, format!("http://{host}"))
            .json(&json!({"username": "alice", "password": PASSWORD}))
    };
    // A page on evil.example that resolves to us (DNS rebinding) gets nothing.
    let resp = with_host("evil.example:8787").send().await.unwrap();
    assert!(crate::support::session_from(&resp).is_none());
    let got = read(resp).await;
    assert_error(&got, 400, "invalid_request_error", "host_not_allowed");
    let got = read(
        app.http
            .get(app.url("/healthz"))
            .header(header::HOST, "evil.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, 400, "invalid_request_error", "host_not_allowed");
    // Names that are ours pass: loopback, and --allowed-hosts.
    for host in ["localhost:8787", "loopd.internal"] {
        let resp = with_host(host).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{host}");
    }
}

#[tokio::test]
async fn each_token_and_session_has_a_request_rate() {
    let app = TestApp::start_tweaked(|c| c.limits.requests_per_caller = rate(5, 200)).await;
    let alice = app.bearer("alice").await;
    let other = app.bearer("alice").await;
    for _ in 0..5 {
        assert_eq!(app.get("/api/v1/loops", &alice).await.0, 200);
    }
    let resp = app
        .request(Method::GET, "/api/v1/loops", &alice)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    assert_error(
        &read(resp).await,
        429,
        "rate_limit_error",
        "too_many_requests",
    );
    assert_eq!(
        app.get("/api/v1/loops", &other).await.0,
        200,
        "another token has its own rate"
    );
    eventually("the token to be served again", async || {
        app.get("/api/v1/loops", &alice).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_open_streams() {
    let app = TestApp::start_tweaked(|c| c.limits.streams_per_user = 2).await;
    let alice = app.bearer("alice").await;
    let bob = app.bearer("bob").await;
    let id = app.create_loop(&alice, json!({})).await;
    let one = app.watch(&alice, &id, None).await;
    let _two = app.watch(&alice, &id, None).await;
    let path = format!("/api/v1/loops/{id}/events");
    assert_error(
        &app.get(&path, &alice).await,
        429,
        "rate_limit_error",
        "too_many_streams",
    );
    // Sending a message opens a stream too: refused, and nothing was sent.
    let got = app
        .post(
            &format!("/api/v1/loops/{id}/messages"),
            &alice,
            json!({"content": "hi"}),
        )
        .await;
    assert_error(&got, 429, "rate_limit_error", "too_many_streams");
    assert_eq!(
        app.get(&format!("/api/v1/loops/{id}"), &alice).await.1["turn_count"],
        0
    );
    // Bob is not affected.
    let bobs = app.create_loop(&bob, json!({})).await;
    app.watch(&bob, &bobs, None).await;
    drop(one);
    eventually("a place to free up", async || {
        let resp = app
            .request(Method::GET, &path, &alice)
            .send()
            .await
            .unwrap();
        resp.status() == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn a_loop_takes_a_bounded_number_of_queued_turns() {
    let app = TestApp::start_tweaked(|c| c.limits.queued_turns_per_loop = 1).await;
    let alice = app.bearer("alice").await;
    let id = app.create_loop(&alice, json!({})).await;
    let mut running = app.send(&alice, &id, "/hold never").await;
    running.until("assistant_delta").await;
    let mut queued = app.send(&alice, &id, "second").await;
    assert_eq!(queued.until("queued").await.pop().unwrap().name, "queued");
    let got = app
        .post(
            &format!("/api/v1/loops/{id}/messages"),
            &alice,
            json!({"content": "third"}),
        )
        .await;
    assert_error(&got, 429, "rate_limit_error", "queue_full");
    // Once the queue moves, a message is taken again.
    app.post(&format!("/api/v1/loops/{id}/interrupt"), &alice, json!({}))
        .await;
    assert_eq!(running.until_end().await.pop().unwrap().name, "interrupted");
    assert_eq!(queued.until_end().await.pop().unwrap().name, "done");
    let events = app.send(&alice, &id, "fourth").await.until_end().await;
    assert_eq!(events.last().unwrap().name, "done");
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_queued_bytes_over_all_loops() {
    let app = TestApp::start_tweaked(|c| c.limits.queued_bytes_per_user = 1000).await;
    let alice = app.bearer("alice").await;
    let (one, two) = (
        app.create_loop(&alice, json!({})).await,
        app.create_loop(&alice, json!({})).await,
    );
    let mut runs = Vec::new();
    for id in [&one, &two] {
        let mut running = app.send(&alice, id, "/hold never").await;
        running.until("assistant_delta").await;
        runs.push(running);
    }
    let mut waiting = app.send(&alice, &one, &"a".repeat(600)).await;
    waiting.until("queued").await;
    let got = app
        .post(
            &format!("/api/v1/loops/{two}/messages"),
            &alice,
            json!({"content": "b".repeat(600)}),
        )
        .await;
    assert_error(&got, 429, "rate_limit_error", "queue_full");
    // Bob has a budget of his own.
    let bob = app.bearer("bob").await;
    let bobs = app.create_loop(&bob, json!({})).await;
    assert_eq!(
        app.send(&bob, &bobs, &"c".repeat(600))
            .await
            .until_end()
            .await
            .pop()
            .unwrap()
            .name,
        "done"
    );
    // Once the waiting turn runs, its bytes are free again.
    app.post(&format!("/api/v1/loops/{one}/interrupt"), &alice, json!({}))
        .await;
    assert_eq!(waiting.until_end().await.pop().unwrap().name, "done");
    let mut again = app.send(&alice, &two, &"b".repeat(600)).await;
    again.until("queued").await;
    for id in [&one, &two] {
        app.delete(&format!("/api/v1/loops/{id}"), &alice).await;
    }
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_tokens() {
    let app = TestApp::start_tweaked(|c| c.limits.tokens_per_user = 2).await;
    let session = app.session("alice").await;
    for _ in 0..2 {
        assert_eq!(
            app.post("/api/v1/me/tokens", &session, json!({})).await.0,
            201
        );
    }
    let got = app.post("/api/v1/me/tokens", &session, json!({})).await;
    assert_error(&got, 429, "rate_limit_error", "too_many_tokens");
    let bob = app.session("bob").await;
    assert_eq!(app.post("/api/v1/me/tokens", &bob, json!({})).await.0, 201);
    // Revoking one makes room again.
    let (_, list) = app.get("/api/v1/me/tokens", &session).await;
    let id = list["tokens"][0]["tokenId"].as_str().unwrap().to_owned();
    app.delete(&format!("/api/v1/me/tokens/{id}"), &session)
        .await;
    assert_eq!(
        app.post("/api/v1/me/tokens", &session, json!({})).await.0,
        201
    );
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_loops_that_are_not_archived() {
    let app = TestApp::start_tweaked(|c| c.limits.loops_per_user = 2).await;
    let alice = app.bearer("alice").await;
    let first = app.create_loop(&alice, json!({})).await;
    app.create_loop(&alice, json!({})).await;
    let refused = app
        .request(reqwest::Method::POST, "/api/v1/loops", &alice)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    // Asking again makes sense only once one is archived: a minute, not a second.
    assert_eq!(refused.headers()[header::RETRY_AFTER], "60");
    let got = read(refused).await;
    assert_error(&got, 429, "rate_limit_error", "too_many_loops");
    let bob = app.bearer("bob").await;
    app.create_loop(&bob, json!({})).await;
    app.delete(&format!("/api/v1/loops/{first}"), &alice).await;
    app.create_loop(&alice, json!({})).await;
}

/// Reads from a raw connection until the server closes it; returns what it sent.
fn read_to_close(tcp: &mut TcpStream) -> String {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&out).into_owned();
            }
            Err(e) => panic!(
                "the server kept the connection open: {e}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_streams_are_not() {
    let app =
        TestApp::start_tweaked(|c| c.connections.header_timeout = Duration::from_secs(1)).await;
    let addr = app.addr;
    // Half-sent headers, and a kept-alive connection gone silent after a response.
    let (half, idle) = tokio::task::spawn_blocking(move || {
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .unwrap();
        let half = read_to_close(&mut half);
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let idle = read_to_close(&mut idle);
        (half, idle)
    })
    .await
    .unwrap();
    assert!(!half.contains("200 OK"), "{half}");
    assert!(idle.starts_with("HTTP/1.1 200 OK"), "{idle}");
    // An SSE stream outlives the header timeout: it is long-lived on purpose.
    let alice = app.bearer("alice").await;
    let id = app.create_loop(&alice, json!({})).await;
    let mut watch = app.watch(&alice, &id, None).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    app.send(&alice, &id, "still there").await.until_end().await;
    assert_eq!(watch.until("done").await.pop().unwrap().name, "done");
}

#[tokio::test]
async fn a_request_whose_body_never_comes_ends_with_408() {
    let app =
        TestApp::start_tweaked(|c| c.connections.request_timeout = Duration::from_secs(1)).await;
    let alice = app.bearer("alice").await;
    let Auth::Bearer(token) = alice else {
        unreachable!()
    };
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /api/v1/loops HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{"
        );
        tcp.write_all(head.as_bytes()).unwrap();
        read_to_close(&mut tcp)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let app = TestApp::start_tweaked(|c| c.connections.max_header_bytes = 8 * 1024).await;
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let padding = "a".repeat(20 * 1024);
        let request =
            format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nx-padding: {padding}\r\n\r\n");
        // The server may stop reading (and close) before all of it is sent.
        let _ = tcp.write_all(request.as_bytes());
        read_to_close(&mut tcp)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(app.get("/healthz", &Auth::None).await.0, 200);
}

#[tokio::test]
async fn one_client_has_a_bounded_number_of_connections() {
    let app = TestApp::start_tweaked(|c| c.connections.max_per_client = 3).await;
    let addr = app.addr;
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The server admits connections in accept order; the three are in once
    // a fourth is refused.
    let refused = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut extra = TcpStream::connect(addr).unwrap();
            let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            let answer = read_to_close(&mut extra);
            if answer.starts_with("HTTP/1.1 429") {
                return answer;
            }
            assert!(Instant::now() < deadline, "never refused: {answer}");
        }
    })
    .await
    .unwrap();
    assert!(
        refused.contains("\"code\":\"too_many_connections\""),
        "{refused}"
    );
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    drop(held);
    eventually("a connection to be taken again", async || {
        reqwest::Client::new()
            .get(app.url("/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn a_replay_of_big_events_is_served_whole_in_bounded_batches() {
    let app = TestApp::start().await;
    let alice = app.bearer("alice").await;
    let id = app.create_loop(&alice, json!({})).await;
    let word = "x".repeat(600 * 1024);
    for _ in 0..4 {
        let events = app.send(&alice, &id, &word).await.until_end().await;
        assert_eq!(events.last().unwrap().name, "done");
    }
    let last = app
        .get(&format!("/api/v1/loops/{id}/turns"), &alice)
        .await
        .1["last_seq"]
        .as_u64()
        .unwrap();
    let mut replay = app.watch(&alice, &id, Some(0)).await;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&last) {
        seqs.push(replay.next().await.unwrap().id.unwrap());
    }
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in order"
    );

    // /turns: 4 turns of ~1.2 MB each do not fit one page of 4 MiB; the
    // cursor brings the rest.
    let (_, page) = app
        .get(&format!("/api/v1/loops/{id}/turns?limit=20"), &alice)
        .await;
    let got = page["data"].as_array().unwrap().len();
    assert!((1..4).contains(&got), "{got} turns in one page");
    assert_eq!(page["has_more"], true);
    // Going back page by page gives every turn once.
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["turn_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut all = ids(&page);
    let mut page = page;
    while page["has_more"] == true {
        let first = page["first_id"].as_str().unwrap().to_owned();
        page = app
            .get(
                &format!("/api/v1/loops/{id}/turns?limit=20&before={first}"),
                &alice,
            )
            .await
            .1;
        let older = ids(&page);
        assert!(!older.is_empty(), "a page with more has turns");
        all.splice(0..0, older);
    }
    let unique: std::collections::HashSet<&String> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (4, 4), "{all:?}");
}
