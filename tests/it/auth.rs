//! Login, logout, `me`, Bearer vs cookie, and the same-origin rule.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Auth, PASSWORD, TestApp, assert_error, session_from};

#[tokio::test]
async fn login_sets_a_hardened_cookie_and_me_reports_the_user() {
    let app = TestApp::start().await;
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["loopd_session=", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(part), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain http: {set_cookie}");
    let cookie = session_from(&resp).unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"user_id": "alice", "admin": false}));

    let me = app.get("/api/auth/me", &Auth::Cookie(cookie)).await;
    assert_eq!(
        me,
        (StatusCode::OK, json!({"user_id": "alice", "admin": false}))
    );
    let bearer = app.bearer("bob").await;
    assert_eq!(app.get("/api/auth/me", &bearer).await.1["user_id"], "bob");
}

#[tokio::test]
async fn wrong_credentials_and_bad_bodies_are_refused() {
    let app = TestApp::start().await;
    let login = |body| app.post("/api/auth/login", &Auth::None, body);
    let wrong = login(json!({"username": "alice", "password": "not it at all"})).await;
    assert_error(&wrong, 401, "authentication_error", "invalid_credentials");
    let unknown = login(json!({"username": "nobody", "password": PASSWORD})).await;
    assert_error(&unknown, 401, "authentication_error", "invalid_credentials");
    // Same message for both: no hint whether the user exists.
    assert_eq!(wrong.1, unknown.1);
    let missing = login(json!({"username": "alice"})).await;
    assert_error(&missing, 400, "invalid_request_error", "invalid_body");
    let resp = app
        .request(Method::POST, "/api/auth/login", &Auth::None)
        .body("{\"username\": ")
        .send()
        .await
        .unwrap();
    assert_error(
        &crate::support::read(resp).await,
        400,
        "invalid_request_error",
        "invalid_json",
    );
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_credentials() {
    let app = TestApp::start().await;
    let none = app.get("/api/v1/loops", &Auth::None).await;
    assert_error(&none, 401, "authentication_error", "missing_credentials");

    for header in [
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer la_123",
        "Token la_x",
    ] {
        let resp = app
            .http
            .get(app.url("/api/v1/loops"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        let got = crate::support::read(resp).await;
        assert_error(&got, 401, "authentication_error", "invalid_token");
    }
    let unknown = Auth::Bearer(format!("la_{}", "0".repeat(48)));
    assert_error(
        &app.get("/api/v1/loops", &unknown).await,
        401,
        "authentication_error",
        "invalid_token",
    );
    let stale_cookie = Auth::Cookie("f".repeat(64));
    assert_error(
        &app.get("/api/v1/loops", &stale_cookie).await,
        401,
        "authentication_error",
        "invalid_session",
    );
}

#[tokio::test]
async fn logout_ends_the_session() {
    let app = TestApp::start().await;
    let cookie = app.login("alice", PASSWORD).await;
    let session = Auth::Cookie(cookie);
    let resp = app
        .request(Method::POST, "/api/auth/logout", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_error(
        &app.get("/api/auth/me", &session).await,
        401,
        "authentication_error",
        "invalid_session",
    );
    // Logging out again (or without a session) is harmless.
    let again = app
        .call(Method::POST, "/api/auth/logout", &session, None)
        .await;
    assert_eq!(again.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn cross_origin_cookie_writes_are_refused_but_bearer_passes() {
    let app = TestApp::start().await;
    let session = app.session("alice").await;
    let bearer = app.bearer("alice").await;
    let create = |auth: &Auth, header: (&'static str, String)| {
        app.request(Method::POST, "/api/v1/loops", auth)
            .header(header.0, header.1)
            .json(&json!({"title": "x"}))
            .send()
    };
    let evil = ("origin", "http://evil.example".to_owned());
    let got = crate::support::read(create(&session, evil.clone()).await.unwrap()).await;
    assert_error(&got, 403, "permission_error", "cross_origin_request");
    let cross_site = ("sec-fetch-site", "cross-site".to_owned());
    let got = crate::support::read(create(&session, cross_site).await.unwrap()).await;
    assert_error(&got, 403, "permission_error", "cross_origin_request");

    // The very same request with a Bearer token passes: bots are exempt.
    assert_eq!(
        create(&bearer, evil).await.unwrap().status(),
        StatusCode::CREATED
    );
    // Our own origin passes with the cookie.
    let own = ("origin", format!("http://{}", app.addr));
    assert_eq!(
        create(&session, own).await.unwrap().status(),
        StatusCode::CREATED
    );
    let same = ("sec-fetch-site", "same-origin".to_owned());
    assert_eq!(
        create(&session, same).await.unwrap().status(),
        StatusCode::CREATED
    );
    // Reading is not changing state: a cross-origin GET with the cookie is allowed.
    let read = app
        .request(Method::GET, "/api/v1/loops", &session)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    // Login itself is protected from cross-site posts (login CSRF).
    let login = app
        .http
        .post(app.url("/api/auth/login"))
        .header("origin", "http://evil.example")
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_error(
        &crate::support::read(login).await,
        403,
        "permission_error",
        "cross_origin_request",
    );
}

#[tokio::test]
async fn public_url_sets_the_origin_and_secure_cookies() {
    let tmp = tempfile::tempdir().unwrap();
    crate::support::accounts(tmp.path())
        .users
        .add("alice", false, PASSWORD)
        .unwrap();
    let mut config = loopd::Config::for_data_dir(tmp.path());
    config.public_origin = Some("https://loopd.example.com".into());
    let app = TestApp::start_with(config).await;
    let resp = app
        .http
        .post(app.url("/api/auth/login"))
        .header("origin", "https://loopd.example.com")
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Secure")
    );
    let session = Auth::Cookie(session_from(&resp).unwrap());
    let own_host = app
        .request(Method::POST, "/api/v1/loops", &session)
        .header("origin", format!("http://{}", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(own_host.status(), StatusCode::FORBIDDEN);
}
