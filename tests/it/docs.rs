//! `/healthz`, `/api/v1/openapi.json` and `/api/v1/docs`.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Auth, TestApp};

#[tokio::test]
async fn healthz_needs_no_auth_and_says_what_runs() {
    let app = TestApp::start().await;
    let (status, body) = app.get("/healthz", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptime_s"].is_u64());
    assert_eq!(body["agent"], "echo");
    assert_eq!(body["live_agents"], 0);
    assert_eq!(body["max_agents"], 8);
}

#[tokio::test]
async fn healthz_warns_when_the_echo_agent_stands_in_for_claude() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = loopd::Config::for_data_dir(tmp.path());
    let (agent, bin, warning) =
        loopd::config::resolve_agent(None, Some(std::path::PathBuf::from("/nonexistent/claude")));
    (config.agent, config.claude_bin) = (agent, bin);
    config.warnings = warning.into_iter().collect();
    let app = TestApp::start_with(config).await;
    let (_, body) = app.get("/healthz", &Auth::None).await;
    assert_eq!(body["agent"], "echo");
    assert!(
        body["warnings"][0].as_str().unwrap().contains("echo"),
        "{body}"
    );
}

#[tokio::test]
async fn openapi_document_is_3_1_with_both_schemes_and_every_path() {
    let app = TestApp::start().await;
    let (status, doc) = app.get("/api/v1/openapi.json", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["BearerAuth"]["scheme"], "bearer");
    assert_eq!(schemes["CookieAuth"]["in"], "cookie");
    assert_eq!(schemes["CookieAuth"]["name"], "loopd_session");
    let paths = doc["paths"].as_object().unwrap();
    let expect = [
        ("/api/v1/openapi.json", "get"),
        ("/api/v1/docs", "get"),
        ("/api/v1/me/tokens", "post"),
        ("/api/v1/me/tokens", "get"),
        ("/api/v1/me/tokens/{tokenId}", "delete"),
        ("/api/v1/loops", "post"),
        ("/api/v1/loops", "get"),
        ("/api/v1/loops/{id}", "get"),
        ("/api/v1/loops/{id}", "delete"),
        ("/api/v1/loops/{id}/messages", "post"),
        ("/api/v1/loops/{id}/events", "get"),
        ("/api/v1/loops/{id}/choices/{choiceId}", "post"),
        ("/api/v1/loops/{id}/interrupt", "post"),
        ("/api/v1/loops/{id}/turns", "get"),
        ("/api/auth/login", "post"),
        ("/api/auth/logout", "post"),
        ("/api/auth/me", "get"),
        ("/healthz", "get"),
    ];
    for (path, method) in expect {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let sse = &paths["/api/v1/loops/{id}/events"]["get"]["responses"]["200"]["content"];
    assert!(sse.get("text/event-stream").is_some(), "{sse}");
    // Schemas come from the handlers' own types.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Loop",
        "LoopDetail",
        "LoopList",
        "CreateLoopRequest",
        "ErrorEnvelope",
        "CreatedToken",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    let loop_props = schemas["Loop"]["properties"].as_object().unwrap();
    for field in [
        "id",
        "title",
        "created_at",
        "created_by",
        "archived",
        "archived_at",
        "metadata",
        "profiles",
        "vault",
        "repo",
    ] {
        assert!(loop_props.contains_key(field), "Loop.{field} missing");
    }
}

#[tokio::test]
async fn docs_page_is_served_from_the_binary_with_a_strict_policy() {
    let app = TestApp::start().await;
    let resp = app.http.get(app.url("/api/v1/docs")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("http"),
        "{csp}"
    );
    let html = resp.text().await.unwrap();
    assert!(
        html.contains(r#"<script src="/api/v1/docs/scalar.js">"#),
        "{html}"
    );
    assert!(
        !html.contains("cdn.") && !html.contains("https://"),
        "no remote assets"
    );
    // The embedded spec is the served one.
    let start = html.find("type=\"application/json\"").unwrap();
    let json_start = start + html[start..].find('>').unwrap() + 1;
    let json_end = json_start + html[json_start..].find("</script>").unwrap();
    let embedded: Value = serde_json::from_str(&html[json_start..json_end]).unwrap();
    let (_, served) = app.get("/api/v1/openapi.json", &Auth::None).await;
    assert_eq!(embedded, served);

    let js = app
        .http
        .get(app.url("/api/v1/docs/scalar.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(js.bytes().await.unwrap().len() > 1_000_000);
}

#[tokio::test]
async fn the_web_chat_is_served_from_the_binary_under_a_strict_policy() {
    let app = TestApp::start().await;
    let resp = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for rule in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(rule), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    let html = resp.text().await.unwrap();
    // Every script comes from a file of this origin; none is inline.
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=\"/").count(),
        "{html}"
    );
    assert!(
        !html.contains("https://") && !html.contains("http://"),
        "no remote origin"
    );
    for (path, kind) in [
        ("/app.js", "javascript"),
        ("/app.css", "css"),
        ("/vendor/marked.js", "javascript"),
        ("/vendor/purify.js", "javascript"),
        ("/favicon.svg", "svg"),
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(
            r.headers()["content-type"].to_str().unwrap().contains(kind),
            "{path}"
        );
    }
}
