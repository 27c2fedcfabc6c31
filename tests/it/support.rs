//! `TestApp`: the real server on a loopback port over a temporary data
//! directory, plus small HTTP helpers that return status and JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loopd::Config;
use loopd::store::{Accounts, DataDir};
use reqwest::{Method, StatusCode, header};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestApp {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<TempDir>,
    shutdown: CancellationToken,
    /// The server's result, once it ended (it runs on a runtime of its own,
    /// as `loopd serve` does, on its own thread).
    server: Option<oneshot::Receiver<anyhow::Result<()>>>,
    pub http: reqwest::Client,
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Bearer(String),
    /// The `loopd_session` cookie value.
    Cookie(String),
}

impl TestApp {
    /// A server on a new data directory with users `alice` and `bob`
    /// (members, password [`PASSWORD`]).
    pub async fn start() -> Self {
        Self::start_tweaked(|_| {}).await
    }

    /// Like [`Self::start`], with the configuration changed by `tweak`.
    pub async fn start_tweaked(tweak: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let accounts = accounts(&dir);
        for name in ["alice", "bob"] {
            accounts.users.add(name, false, PASSWORD).unwrap();
        }
        let mut config = Config::for_data_dir(&dir);
        tweak(&mut config);
        let mut app = Self::start_with(config).await;
        app._tmp = Some(tmp);
        app
    }

    /// A server with this configuration (its data directory is not removed).
    /// With `LOOPD_TEST_BACKEND=postgres`, on the data directory's database.
    pub async fn start_with(config: Config) -> Self {
        Self::start_on(config, crate::pg::on_postgres()).await
    }

    /// A server on the data directory's files, whatever the suite runs on.
    pub async fn start_on_files(config: Config) -> Self {
        Self::start_on(config, false).await
    }

    async fn start_on(mut config: Config, postgres: bool) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        if postgres && config.cluster.is_none() {
            config.cluster = Some(loopd::config::Cluster {
                database_url: crate::pg::database_for(&config.data_dir),
                advertise_url: format!("http://{addr}"),
                lease_ttl: Duration::from_secs(12),
            });
        }
        let dir = config.data_dir.clone();
        let shutdown = CancellationToken::new();
        let (done, server) = oneshot::channel();
        let stop = shutdown.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let result = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loopd::run(config, listener, stop).await
            });
            let _ = done.send(result);
        });
        let app = Self {
            addr,
            dir,
            _tmp: None,
            shutdown,
            server: Some(server),
            http: reqwest::Client::new(),
        };
        app.wait_until_healthy().await;
        app
    }

    /// A server that runs as its own process (a node of a cluster test):
    /// the helpers work on it; stopping it is the caller's.
    pub async fn external(addr: SocketAddr, dir: PathBuf) -> Self {
        let app = Self {
            addr,
            dir,
            _tmp: None,
            shutdown: CancellationToken::new(),
            server: None,
            http: reqwest::Client::new(),
        };
        app.wait_until_healthy().await;
        app
    }

    async fn wait_until_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server gracefully; returns the data directory's owner so a
    /// test can start another server on it.
    pub async fn stop(mut self) -> (PathBuf, Option<TempDir>) {
        self.shutdown.cancel();
        let result = self
            .server
            .take()
            .unwrap()
            .await
            .expect("the server's thread ended");
        result.expect("server ended with an error");
        (self.dir.clone(), self._tmp.take())
    }

    /// Releases an echo agent's `/hold NAME` on loop `loop_id`.
    pub fn release(&self, loop_id: &str, name: &str) {
        let uuid = loop_id.strip_prefix("loop_").unwrap();
        let workspace = self.dir.join("loops").join(uuid).join("workspace");
        std::fs::write(workspace.join(name), "").unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The accounts as another process (the CLI) would open them.
    pub fn accounts(&self) -> Accounts {
        accounts(&self.dir)
    }

    /// The database the server keeps its state in, on Postgres runs.
    pub fn database_url(&self) -> Option<String> {
        crate::pg::on_postgres().then(|| crate::pg::database_for(&self.dir))
    }

    pub fn request(&self, method: Method, path: &str, auth: &Auth) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match auth {
            Auth::None => req,
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::Cookie(c) => req.header(header::COOKIE, format!("loopd_session={c}")),
        }
    }

    /// Sends a request with an optional JSON body; returns status and JSON body
    /// (`Value::Null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.request(method, path, auth);
        if let Some(body) = body {
            req = req.json(&body);
        }
        read(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> (StatusCode, Value) {
        self.call(Method::GET, path, auth, None).await
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, auth, Some(body)).await
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, auth, None).await
    }

    /// Logs in; returns the session cookie value.
    pub async fn login(&self, user: &str, password: &str) -> String {
        let resp = self
            .http
            .post(self.url("/api/auth/login"))
            .json(&serde_json::json!({"username": user, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "login as {user}");
        session_from(&resp).expect("login sets the session cookie")
    }

    /// A session for `user` (password [`PASSWORD`]).
    pub async fn session(&self, user: &str) -> Auth {
        Auth::Cookie(self.login(user, PASSWORD).await)
    }

    /// A fresh API token for `user`, made through the API with their session.
    pub async fn bearer(&self, user: &str) -> Auth {
        let session = self.session(user).await;
        self.token(&session, serde_json::json!({"label": "test"}))
            .await
            .0
    }

    /// A token made with `session` and `body` (its limits); the token and its id.
    pub async fn token(&self, session: &Auth, body: Value) -> (Auth, String) {
        let (status, created) = self.post("/api/v1/me/tokens", session, body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        (
            Auth::Bearer(created["token"].as_str().unwrap().to_owned()),
            created["tokenId"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a loop; returns its id.
    pub async fn create_loop(&self, auth: &Auth, body: Value) -> String {
        let (status, body) = self.post("/api/v1/loops", auth, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The accounts of data directory `dir` (on Postgres runs: its database).
pub fn accounts(dir: &Path) -> Accounts {
    if crate::pg::on_postgres() {
        return crate::pg::accounts(&crate::pg::database_for(dir));
    }
    Accounts::open(&DataDir::create(dir).unwrap()).unwrap()
}

pub async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

/// The `loopd_session` value a response sets, if any.
pub fn session_from(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("loopd_session="))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// Asserts an error response: status, envelope type and code.
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: u16, kind: &str, code: &str) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// One server-sent event as a client sees it.
#[derive(Debug, Clone)]
pub struct Sse {
    pub name: String,
    pub id: Option<u64>,
    pub data: Value,
}

/// Reads SSE frames from a streaming response (pings are skipped).
pub struct SseStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    pub raw: String,
}

pub const TERMINAL: [&str; 3] = ["done", "interrupted", "error"];

impl SseStream {
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), StatusCode::OK, "expected a stream");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            resp,
            buf: Vec::new(),
            raw: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended. Panics after 20 s.
    pub async fn next(&mut self) -> Option<Sse> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(frame).unwrap();
                self.raw.push_str(&text);
                let (mut name, mut id, mut data) = (String::new(), None, String::new());
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if name == "ping" {
                    continue;
                }
                return Some(Sse {
                    name,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => panic!("stream failed: {e}"),
                Err(_) => panic!("no event within 20 s; so far:\n{}", self.raw),
            }
        }
    }

    /// Events up to and including the first named `name`.
    pub async fn until(&mut self, name: &str) -> Vec<Sse> {
        let mut out = Vec::new();
        loop {
            let event = self
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended before `{name}`:\n{}", self.raw));
            let found = event.name == name;
            out.push(event);
            if found {
                return out;
            }
        }
    }

    /// Events up to and including the end of a turn.
    pub async fn until_end(&mut self) -> Vec<Sse> {
        let mut out = Vec::new();
        loop {
            let event = self
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended before the turn did:\n{}", self.raw));
            let end = TERMINAL.contains(&event.name.as_str());
            out.push(event);
            if end {
                return out;
            }
        }
    }

    /// Asserts the server closes the stream next.
    pub async fn assert_closed(&mut self) {
        if let Some(event) = self.next().await {
            panic!("expected the stream to end, got {event:?}");
        }
    }
}

/// The names of a list of events.
pub fn names(events: &[Sse]) -> Vec<&str> {
    events.iter().map(|e| e.name.as_str()).collect()
}

/// The seqs and names of a list of events (what two watchers must agree on).
pub fn seqs(events: &[Sse]) -> Vec<(Option<u64>, String)> {
    events.iter().map(|e| (e.id, e.name.clone())).collect()
}

/// The choice id of the last `requires_choice` among `events`.
pub fn choice_id(events: &[Sse]) -> String {
    let asked = events
        .iter()
        .rfind(|e| e.name == "requires_choice")
        .unwrap_or_else(|| panic!("no requires_choice in {:?}", names(events)));
    asked.data["choice_id"].as_str().unwrap().to_owned()
}

/// The assistant text in a list of events.
pub fn text(events: &[Sse]) -> String {
    events
        .iter()
        .filter(|e| e.name == "assistant_delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect()
}

impl TestApp {
    /// Sends a message; returns its turn's stream.
    pub async fn send(&self, auth: &Auth, loop_id: &str, content: &str) -> SseStream {
        self.send_with(auth, loop_id, serde_json::json!({"content": content}), None)
            .await
    }

    pub async fn send_with(
        &self,
        auth: &Auth,
        loop_id: &str,
        body: Value,
        key: Option<&str>,
    ) -> SseStream {
        let mut req = self
            .request(
                Method::POST,
                &format!("/api/v1/loops/{loop_id}/messages"),
                auth,
            )
            .json(&body);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        SseStream::new(req.send().await.unwrap())
    }

    /// Opens `GET /events`, optionally resuming after a seq (`Last-Event-ID`).
    pub async fn watch(&self, auth: &Auth, loop_id: &str, last_event_id: Option<u64>) -> SseStream {
        let mut req = self.request(
            Method::GET,
            &format!("/api/v1/loops/{loop_id}/events"),
            auth,
        );
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        SseStream::new(req.send().await.unwrap())
    }

    /// Answers a choice; returns the status and body.
    pub async fn choose(
        &self,
        auth: &Auth,
        loop_id: &str,
        choice_id: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        self.post(
            &format!("/api/v1/loops/{loop_id}/choices/{choice_id}"),
            auth,
            body,
        )
        .await
    }
}

/// Polls `check` until it returns true or 20 s pass.
/// A change made by another process (the CLI, another node) as the server
/// sees it: on files at once (checked once), on a shared database once the
/// change feed brought it (within a second; waited for).
pub async fn seen_by_server(what: &str, mut check: impl AsyncFnMut() -> bool) {
    if crate::pg::on_postgres() {
        eventually(what, check).await;
    } else {
        assert!(check().await, "not at once: {what}");
    }
}

pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `git -C dir ARGS` with an author and committer set; asserts it worked.
pub fn git(dir: &Path, args: &[&str]) {
    let ok = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .unwrap();
    assert!(ok.success(), "git {args:?}");
}
