//! `--metrics-bind`: `/metrics` parsed by a Prometheus text parser, with
//! values that follow what the server did.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{TestApp, eventually};
use crate::webhooks::{Receiver, subscribe};

/// The scrape, parsed.
async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = resp.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_follow_what_the_server_does() {
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", crate::pg::free_port())
        .parse()
        .unwrap();
    let app = TestApp::start_tweaked(|c| {
        c.metrics_bind = Some(metrics_addr);
        c.webhook_allow_private = true;
        c.limits.streams_per_user = 3;
    })
    .await;
    let before = scrape(metrics_addr).await;
    assert_eq!(value(&before, "loopd_loops", &[]), Some(0.0));
    assert_eq!(value(&before, "loopd_choices_waiting", &[]), Some(0.0));

    let bearer = app.bearer("alice").await;
    let receiver = Receiver::start(0).await;
    subscribe(&app, &bearer, &receiver.url(), &["done"]).await;
    let a = app.create_loop(&bearer, json!({})).await;
    let b = app.create_loop(&bearer, json!({})).await;
    app.send(&bearer, &a, "hello").await.until("done").await;
    // A choice left waiting, and a stream left open on it.
    let mut waiting = app.send(&bearer, &b, "/permission make deploy").await;
    waiting.until("requires_choice").await;
    // Streams over the cap: 429s.
    let _one = app.watch(&bearer, &a, None).await;
    let _two = app.watch(&bearer, &a, None).await;
    let refused = app
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/loops/{a}/events"),
            &bearer,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    receiver.until("done").await;

    eventually("the delivery counted", async || {
        value(
            &scrape(metrics_addr).await,
            "loopd_webhook_deliveries_total",
            &[("result", "delivered")],
        ) == Some(1.0)
    })
    .await;
    let now = scrape(metrics_addr).await;
    assert_eq!(value(&now, "loopd_loops", &[]), Some(2.0));
    assert_eq!(value(&now, "loopd_live_agents", &[]), Some(2.0));
    assert_eq!(
        value(&now, "loopd_turns_total", &[("outcome", "done")]),
        Some(1.0)
    );
    let events = value(&now, "loopd_events_appended_total", &[]).unwrap();
    assert!(events >= 7.0, "{events}");
    assert_eq!(value(&now, "loopd_open_streams", &[]), Some(3.0));
    assert_eq!(value(&now, "loopd_choices_waiting", &[]), Some(1.0));
    assert!(value(&now, "loopd_choice_oldest_wait_seconds", &[]).unwrap() > 0.0);
    assert_eq!(value(&now, "loopd_webhook_queue", &[]), Some(0.0));
    assert_eq!(
        value(
            &now,
            "loopd_rate_limited_total",
            &[("limit", "too_many_streams")]
        ),
        Some(1.0)
    );
    // Latency by route template, never by a loop's path.
    let created = value(
        &now,
        "loopd_request_duration_seconds",
        &[
            ("route", "/api/v1/loops"),
            ("method", "POST"),
            ("status", "201"),
        ],
    );
    assert_eq!(created, Some(2.0));
    assert!(
        now.samples
            .iter()
            .all(|s| !s.labels.values().any(|v| v.contains(&a)))
    );

    // Interrupted: counted as such; the choice no longer waits.
    app.post(&format!("/api/v1/loops/{b}/interrupt"), &bearer, json!({}))
        .await;
    waiting.until_end().await;
    let after = scrape(metrics_addr).await;
    assert_eq!(
        value(&after, "loopd_turns_total", &[("outcome", "interrupted")]),
        Some(1.0)
    );
    assert_eq!(value(&after, "loopd_choices_waiting", &[]), Some(0.0));
}
