//! The turn contract every agent must keep, one set of scenarios run against
//! each: the built-in echo agent and the real Claude Code CLI (with the mock
//! model). A running turn is "held" until the test releases it (a file in
//! the loop's workspace), so no scenario races a timer.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::claude::Rig;
use crate::support::{Auth, Sse, SseStream, TestApp, eventually, text};

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Claude,
}

/// A server with one loop of `alice`'s, behind the agent of its kind.
struct Driver {
    kind: Kind,
    /// The Claude rig owns its app; the echo one is here.
    echo: Option<TestApp>,
    rig: Option<Rig>,
    bearer: Auth,
    loop_id: String,
}

/// The release a held turn waits for (a file in the loop's workspace).
const RELEASE: &str = "go";

impl Driver {
    async fn start(kind: Kind) -> Self {
        match kind {
            Kind::Echo => {
                let app = TestApp::start().await;
                let bearer = app.bearer("alice").await;
                let loop_id = app.create_loop(&bearer, json!({"title": "echo"})).await;
                Self {
                    kind,
                    echo: Some(app),
                    rig: None,
                    bearer,
                    loop_id,
                }
            }
            Kind::Claude => {
                let rig = Rig::start_with(|c| {
                    // The held turn's tool runs without a prompt.
                    c.permission_modes
                        .push(loopd::agent::PermissionMode::BypassPermissions);
                })
                .await;
                Self {
                    kind,
                    echo: None,
                    bearer: rig.bearer.clone(),
                    loop_id: rig.loop_id.clone(),
                    rig: Some(rig),
                }
            }
        }
    }

    fn app(&self) -> &TestApp {
        match (&self.echo, &self.rig) {
            (Some(app), _) => app,
            (None, Some(rig)) => &rig.app,
            (None, None) => unreachable!("a driver has an app"),
        }
    }

    /// A message and the text its turn answers with.
    fn say(&self, words: &str) -> (String, String) {
        match self.kind {
            Kind::Echo => (words.to_owned(), words.to_owned()),
            Kind::Claude => (words.to_owned(), format!("You said: {words}")),
        }
    }

    /// A message whose turn runs until [`Self::release`].
    fn held(&self) -> Value {
        match self.kind {
            Kind::Echo => json!({"content": format!("/hold {RELEASE}")}),
            Kind::Claude => json!({
                "content": format!("[[bash:until test -e {RELEASE}; do sleep 0.05; done]]"),
                "permission_mode": "bypassPermissions",
            }),
        }
    }

    /// Sends a held message and returns its stream once the turn really
    /// runs in the agent (the echo agent said it holds; Claude's tool runs).
    async fn hold(&self) -> SseStream {
        let mut stream = self.send_body(self.held(), None).await;
        match &self.rig {
            None => {
                stream.until("assistant_delta").await;
            }
            Some(rig) => {
                stream.until("tool_call").await;
                eventually("the held tool to run", async || {
                    rig.processes().iter().any(|c| c.contains("test -e"))
                })
                .await;
            }
        }
        stream
    }

    fn release(&self) {
        self.app().release(&self.loop_id, RELEASE);
    }

    async fn send(&self, content: &str) -> SseStream {
        self.app().send(&self.bearer, &self.loop_id, content).await
    }

    async fn send_body(&self, body: Value, key: Option<&str>) -> SseStream {
        self.app()
            .send_with(&self.bearer, &self.loop_id, body, key)
            .await
    }

    async fn post(&self, path: &str) -> (StatusCode, Value) {
        let path = format!("/api/v1/loops/{}{path}", self.loop_id);
        self.app().post(&path, &self.bearer, json!({})).await
    }

    /// The first event of `GET /events?after=SEQ`.
    async fn first_after(&self, seq: u64) -> Sse {
        let path = format!("/api/v1/loops/{}/events?after={seq}", self.loop_id);
        let resp = self
            .app()
            .request(reqwest::Method::GET, &path, &self.bearer)
            .send()
            .await
            .unwrap();
        SseStream::new(resp).next().await.unwrap()
    }

    async fn detail(&self) -> Value {
        let path = format!("/api/v1/loops/{}", self.loop_id);
        self.app().get(&path, &self.bearer).await.1
    }
}

fn ids(events: &[Sse]) -> Vec<u64> {
    events.iter().map(|e| e.id.unwrap()).collect()
}

/// Runs a scenario once per agent.
macro_rules! for_each_agent {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn echo() {
                super::$name(super::Kind::Echo).await
            }
            #[tokio::test]
            async fn claude() {
                super::$name(super::Kind::Claude).await
            }
        }
    )*};
}

for_each_agent!(
    messages_while_busy_queue_and_stream_only_their_own_turn,
    interrupt_ends_the_running_turn_and_the_next_message_works,
    watchers_and_last_event_id_see_every_event_once,
    an_idempotent_retry_replays_without_sending_again,
    archiving_ends_the_running_turn_and_frees_the_agent,
);

async fn messages_while_busy_queue_and_stream_only_their_own_turn(kind: Kind) {
    let d = Driver::start(kind).await;
    let mut first = d.hold().await;
    let (second_says, second_answer) = d.say("the second one");
    let (third_says, third_answer) = d.say("the third one");
    let mut second = d.send(&second_says).await;
    let mut third = d.send(&third_says).await;
    let queued = second.next().await.unwrap();
    assert_eq!(
        (queued.name.as_str(), &queued.data["position"]),
        ("queued", &json!(1))
    );
    let third_queued = third.next().await.unwrap();
    assert_eq!(third_queued.data["position"], 2);
    assert_eq!(d.detail().await["queue_depth"], 2);

    d.release();
    assert_eq!(first.until_end().await.pop().unwrap().name, "done");
    first.assert_closed().await;
    // Each message reached the agent as a turn of its own, in order.
    for (mut stream, answer, turn) in [
        (second, second_answer, &queued.data["turn_id"]),
        (third, third_answer, &third_queued.data["turn_id"]),
    ] {
        let events = stream.until_end().await;
        assert_eq!(text(&events), answer);
        assert_eq!(events.last().unwrap().name, "done");
        assert!(events.iter().all(|e| &e.data["turn_id"] == turn));
    }
    assert_eq!(d.detail().await["busy"], false);
    if let Some(rig) = &d.rig {
        // Each reached the model as its own prompt, after the one before ended:
        // the held turn's prompt and tool result, then one call each.
        assert_eq!(rig.mock.model_calls().len(), 4);
    }
}

async fn interrupt_ends_the_running_turn_and_the_next_message_works(kind: Kind) {
    let d = Driver::start(kind).await;
    let mut stream = d.hold().await;
    let (status, body) = d.post("/interrupt").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let end = stream.until_end().await.pop().unwrap();
    assert_eq!(end.name, "interrupted");
    assert_eq!(end.data["turn_id"], body["turn_id"]);
    stream.assert_closed().await;
    // Nothing runs now: interrupting again does nothing.
    assert_eq!(d.post("/interrupt").await.1["turn_id"], Value::Null);
    let (says, answer) = d.say("still here");
    let events = d.send(&says).await.until_end().await;
    assert_eq!(events[0].data["cold_start"], false, "the agent lived on");
    assert_eq!(text(&events), answer);
}

async fn watchers_and_last_event_id_see_every_event_once(kind: Kind) {
    let d = Driver::start(kind).await;
    let app = d.app();
    let mut w1 = app.watch(&d.bearer, &d.loop_id, None).await;
    let mut w2 = app.watch(&d.bearer, &d.loop_id, None).await;
    let mut stream = d.send_body(d.held(), None).await;
    let early = w1.until("started").await;
    let cut = early.last().unwrap().id.unwrap();
    drop(w1); // a client goes away mid-turn
    d.release();
    let own = stream.until_end().await;
    let (says, _) = d.say("one more");
    d.send(&says).await.until_end().await;

    let all = [w2.until("done").await, w2.until("done").await].concat();
    let mut resumed = app.watch(&d.bearer, &d.loop_id, Some(cut)).await;
    let after = [resumed.until("done").await, resumed.until("done").await].concat();
    let mut joined = ids(&early);
    joined.extend(ids(&after));
    assert_eq!(joined, ids(&all), "resume joins without gap or duplicate");
    let want: Vec<u64> = (ids(&all)[0]..).take(all.len()).collect();
    assert_eq!(ids(&all), want, "seqs have no gap");
    // The sender's own stream is the turn without its user_message.
    assert_eq!(ids(&own), ids(&all)[1..own.len() + 1]);
    // `?after=` resumes the same way, and must be a seq.
    let bad = format!("/api/v1/loops/{}/events?after=nope", d.loop_id);
    assert_eq!(app.get(&bad, &d.bearer).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(d.first_after(cut).await.id, Some(cut + 1));
    assert_eq!(d.first_after(0).await.id, Some(1));
}

async fn an_idempotent_retry_replays_without_sending_again(kind: Kind) {
    let d = Driver::start(kind).await;
    let mut first = d.send_body(d.held(), Some("retry-7")).await;
    let started = first.until("started").await.pop().unwrap();
    drop(first); // the connection drops mid-turn
    let mut retry = d.send_body(d.held(), Some("retry-7")).await;
    let replayed = retry.next().await.unwrap();
    assert_eq!((replayed.id, &replayed.data), (started.id, &started.data));
    d.release();
    let mut events = vec![replayed];
    events.extend(retry.until_end().await);
    assert_eq!(events.last().unwrap().name, "done");
    // Replaying a finished turn gives the same events again.
    let again = d
        .send_body(d.held(), Some("retry-7"))
        .await
        .until_end()
        .await;
    assert_eq!(ids(&again), ids(&events));
    assert_eq!(
        d.detail().await["turn_count"],
        1,
        "the message was sent once"
    );
    if let Some(rig) = &d.rig {
        assert_eq!(
            rig.mock.model_calls().len(),
            2,
            "one prompt, one tool result"
        );
    }
}

async fn archiving_ends_the_running_turn_and_frees_the_agent(kind: Kind) {
    let d = Driver::start(kind).await;
    let mut stream = d.hold().await;
    let (status, _) = d
        .app()
        .delete(&format!("/api/v1/loops/{}", d.loop_id), &d.bearer)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stream.until_end().await.pop().unwrap().name, "interrupted");
    let (_, health) = d.app().get("/healthz", &Auth::None).await;
    assert_eq!(health["live_agents"], 0);
    if let Some(rig) = &d.rig {
        assert!(
            rig.processes().is_empty(),
            "left behind: {:?}",
            rig.processes()
        );
    }
}
