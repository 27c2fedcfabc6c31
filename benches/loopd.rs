//! loopd against a raw relay, as `docs/performance.md` describes.
//!
//! `cargo bench --bench loopd [-- --runs N] [-- --only SCENARIO]`
//! (`--only sandbox`: loopd without and with its sandbox, cold starts and
//! paced latency)
//!
//! One executable plays three parts:
//! - the **fake agent** (started with Claude Code's flags, `-p …`): on each
//!   user line it writes `system/init`, K `stream_event` text deltas whose
//!   text is the CLOCK_REALTIME nanoseconds taken just before the write, an
//!   `assistant` message and a `result`; K and the rate come from the
//!   message (`K=500 RATE=100`, rate 0 = full speed);
//! - the **raw relay** (`relay ADDR`): one fake agent per loop, each text
//!   delta line copied into an SSE frame: no auth, no parsing, no log;
//! - the **client**, which starts loopd (release build, the fake agent as
//!   its Claude binary) and the relay as separate processes, runs the same
//!   load against each, and prints the table.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("-p") {
        return fake_agent();
    }
    if args.get(1).map(String::as_str) == Some("relay") {
        return relay::serve(args[2].parse().expect("relay ADDR"));
    }
    let runs = flag(&args, "--runs").map_or(3, |v| v.parse().expect("--runs N"));
    let only = flag(&args, "--only");
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client::run(runs, only));
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The fake Claude Code CLI: stream-json shapes as the real one writes them.
fn fake_agent() {
    let sid = "5f1c2d3e-0000-4000-8000-000000000001";
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if !line.contains("\"type\":\"user\"") {
            continue; // control requests and the like
        }
        let k: usize = param(&line, "K=").unwrap_or(10);
        let rate: u64 = param(&line, "RATE=").unwrap_or(0);
        let _ = writeln!(
            out,
            r#"{{"type":"system","subtype":"init","cwd":"/w","session_id":"{sid}","tools":["Bash","Read","Write"],"mcp_servers":[],"model":"claude-fake","permissionMode":"default","apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","uuid":"00000000-0000-4000-8000-000000000000"}}"#
        );
        let _ = out.flush();
        let start = Instant::now();
        for i in 0..k {
            if let Some(gap) = 1_000_000_000u64.checked_div(rate) {
                let due = start + Duration::from_nanos(i as u64 * gap);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let stamp = now_ns();
            let _ = writeln!(
                out,
                r#"{{"type":"stream_event","event":{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{stamp} "}}}},"session_id":"{sid}","parent_tool_use_id":null,"uuid":"8b6f4f3e-2a1d-4c5b-9e8f-{i:012}"}}"#
            );
            let _ = out.flush();
        }
        let _ = writeln!(
            out,
            r#"{{"type":"assistant","message":{{"id":"msg_fake","type":"message","role":"assistant","model":"claude-fake","content":[{{"type":"text","text":"({k} deltas)"}}],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":10,"output_tokens":{k}}}}},"parent_tool_use_id":null,"session_id":"{sid}","uuid":"00000000-0000-4000-8000-000000000002"}}"#
        );
        let _ = writeln!(
            out,
            r#"{{"type":"result","subtype":"success","is_error":false,"duration_ms":{},"num_turns":1,"result":"done","stop_reason":"end_turn","session_id":"{sid}","total_cost_usd":0.0001,"usage":{{"input_tokens":10,"cache_read_input_tokens":0,"output_tokens":{k}}},"uuid":"00000000-0000-4000-8000-000000000003"}}"#,
            start.elapsed().as_millis()
        );
        let _ = out.flush();
    }
}

fn param<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The raw relay: the physical limit of "just piping bytes".
mod relay {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::{Path, State};
    use axum::response::Response;
    use axum::routing::{get, post};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::broadcast;

    struct Agent {
        stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
        lines: broadcast::Sender<Bytes>,
        _child: tokio::process::Child,
    }

    type Agents = Arc<Mutex<HashMap<String, Arc<Agent>>>>;

    pub fn serve(addr: SocketAddr) {
        raise_nofile();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let agents: Agents = Arc::default();
            let app = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/loops/{id}/messages", post(message))
                .route("/loops/{id}/events", get(events))
                .with_state(agents);
            use axum::serve::ListenerExt;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).await.unwrap();
        });
    }

    fn agent(agents: &Agents, id: &str) -> Arc<Agent> {
        let mut map = agents.lock().unwrap();
        map.entry(id.to_owned())
            .or_insert_with(|| {
                let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
                    .arg("-p")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let stdout = child.stdout.take().unwrap();
                let (lines, _) = broadcast::channel(4096);
                let tx = lines.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        let frame = if line.contains("\"text_delta\"") {
                            format!("event: delta\ndata: {line}\n\n")
                        } else if line.starts_with("{\"type\":\"result\"") {
                            "event: done\ndata: {}\n\n".to_owned()
                        } else {
                            continue;
                        };
                        let _ = tx.send(Bytes::from(frame));
                    }
                });
                Arc::new(Agent {
                    stdin: tokio::sync::Mutex::new(child.stdin.take().unwrap()),
                    lines,
                    _child: child,
                })
            })
            .clone()
    }

    fn sse(mut rx: broadcast::Receiver<Bytes>, until_done: bool) -> Response {
        let body = async_stream::stream! {
            loop {
                match rx.recv().await {
                    Ok(frame) => {
                        let done = frame.starts_with(b"event: done");
                        yield Ok::<_, std::convert::Infallible>(frame);
                        if done && until_done { break; }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        };
        let mut r = Response::new(Body::from_stream(body));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        r
    }

    async fn message(
        State(agents): State<Agents>,
        Path(id): Path<String>,
        body: String,
    ) -> Response {
        let agent = agent(&agents, &id);
        let rx = agent.lines.subscribe();
        let line = format!(
            "{{\"type\":\"user\",\"message\":{{\"role\":\"user\",\"content\":\"{body}\"}}}}\n"
        );
        agent
            .stdin
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .unwrap();
        sse(rx, true)
    }

    async fn events(State(agents): State<Agents>, Path(id): Path<String>) -> Response {
        sse(agent(&agents, &id).lines.subscribe(), false)
    }
}

/// The load client.
mod client {
    use super::*;
    use futures_util::StreamExt;

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub enum Kind {
        Relay,
        Loopd,
    }

    pub struct Server {
        pub kind: Kind,
        pub base: String,
        child: Child,
        token: Option<String>,
        _dir: Option<tempfile::TempDir>,
        http: reqwest::Client,
        external_pid: Option<u32>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    pub async fn start(kind: Kind) -> Server {
        start_with(kind, "auto").await
    }

    /// Starts a server; loopd with `--sandbox sandbox`.
    pub async fn start_with(kind: Kind, sandbox: &str) -> Server {
        // BENCH_LOOPD_EXTERNAL=ADDR,TOKEN,PID: measure a loopd started by hand
        // (e.g. under a heap profiler) instead of starting one.
        if let (Kind::Loopd, Ok(ext)) = (kind, std::env::var("BENCH_LOOPD_EXTERNAL")) {
            let parts: Vec<&str> = ext.split(',').collect();
            let child = Command::new("sleep").arg("100000").spawn().unwrap();
            let http = reqwest::Client::builder().http1_only().build().unwrap();
            return Server {
                kind,
                base: format!("http://{}", parts[0]),
                child,
                token: Some(parts[1].to_owned()),
                _dir: None,
                http,
                external_pid: parts[2].parse().ok(),
            };
        }
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let exe = std::env::current_exe().unwrap();
        let (child, token, dir) = match kind {
            Kind::Relay => (
                Command::new(&exe).args(["relay", &addr]).spawn().unwrap(),
                None,
                None,
            ),
            Kind::Loopd => {
                let dir = tempfile::tempdir().unwrap();
                let accounts = loopd::store::Accounts::open(
                    &loopd::store::DataDir::create(dir.path()).unwrap(),
                )
                .unwrap();
                accounts
                    .users
                    .add("bench", false, "bench password")
                    .unwrap();
                let (token, _) = accounts.tokens.create("bench", None).unwrap();
                let child = Command::new(env!("CARGO_BIN_EXE_loopd"))
                    .args([
                        "serve",
                        "--bind",
                        &addr,
                        "--agent",
                        "claude",
                        "--max-agents",
                        "500",
                        "--sandbox",
                        sandbox,
                        // Capacity, not abuse: one client opens 10,000 streams.
                        "--max-streams-per-user",
                        "100000",
                        "--max-connections-per-client",
                        "100000",
                        "--request-rate",
                        "100000/1ms",
                    ])
                    .arg("--claude-bin")
                    .arg(&exe)
                    .arg("--data-dir")
                    .arg(dir.path())
                    .env("LOOPD_LOG", "warn")
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                (child, Some(token), Some(dir))
            }
        };
        let http = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        let server = Server {
            kind,
            base: format!("http://{addr}"),
            child,
            token,
            _dir: dir,
            http,
            external_pid: None,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while server
            .http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "{kind:?} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    impl Server {
        pub fn pid(&self) -> u32 {
            self.external_pid.unwrap_or_else(|| self.child.id())
        }

        fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
            let prefix = if self.kind == Kind::Loopd {
                "/api/v1"
            } else {
                ""
            };
            let req = self
                .http
                .request(method, format!("{}{prefix}{path}", self.base));
            match &self.token {
                Some(t) => req.bearer_auth(t),
                None => req,
            }
        }

        pub async fn new_loop(&self, n: usize) -> String {
            match self.kind {
                Kind::Relay => format!("l{n}"),
                Kind::Loopd => {
                    let r = self
                        .req(reqwest::Method::POST, "/loops")
                        .body("{}")
                        .send()
                        .await
                        .unwrap();
                    r.json::<serde_json::Value>().await.unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                }
            }
        }

        /// Sends a turn and reads its stream to the end: delta stamps' added latencies (ns).
        pub async fn turn(&self, loop_id: &str, k: usize, rate: u64) -> Vec<u64> {
            let text = format!("K={k} RATE={rate}");
            let req = self.req(reqwest::Method::POST, &format!("/loops/{loop_id}/messages"));
            let req = match self.kind {
                Kind::Relay => req.body(text),
                Kind::Loopd => req.body(format!(r#"{{"content":"{text}"}}"#)),
            };
            read(req.send().await.unwrap(), true).await
        }

        pub async fn watch(&self, loop_id: &str) -> reqwest::Response {
            let r = self
                .req(reqwest::Method::GET, &format!("/loops/{loop_id}/events"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r
        }
    }

    /// Reads an SSE response; returns the added latency of every delta. With
    /// `to_end`, stops at the end of the turn.
    pub async fn read(resp: reqwest::Response, to_end: bool) -> Vec<u64> {
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut lat = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            let now = now_ns();
            buf.extend_from_slice(&chunk);
            while let Some(end) = find(&buf, b"\n\n") {
                let frame = &buf[..end];
                if let Some(at) = find(frame, b"\"text\":\"") {
                    let digits = &frame[at + 8..];
                    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
                    if let Ok(stamp) = std::str::from_utf8(&digits[..len]).unwrap().parse::<u128>()
                    {
                        lat.push(now.saturating_sub(stamp) as u64);
                    }
                }
                let is_end =
                    frame.starts_with(b"event: done") || frame.starts_with(b"event: error");
                buf.drain(..end + 2);
                if is_end && to_end {
                    return lat;
                }
            }
        }
        lat
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// (CPU seconds, RSS bytes) of a process.
    pub fn usage(pid: u32) -> (f64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (ticks / 100.0, rss_kb * 1024)
    }

    fn pct(sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64
    }

    /// One scenario's figures for one server.
    pub type Figures = Vec<(&'static str, f64)>;

    async fn loops(s: &Server, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(s.new_loop(i).await);
        }
        // Warm up: every loop's agent is started, outside the measurement.
        let warm = ids.iter().map(|id| s.turn(id, 1, 0));
        futures_util::future::join_all(warm).await;
        ids
    }

    async fn paced(s: &Server) -> Figures {
        let ids = loops(s, 50).await;
        let runs = ids.iter().map(|id| s.turn(id, 300, 100));
        let mut lat: Vec<u64> = futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect();
        lat.sort_unstable();
        vec![
            ("added latency p50 (µs)", pct(&lat, 0.5) / 1e3),
            ("added latency p99 (µs)", pct(&lat, 0.99) / 1e3),
            ("added latency p99.9 (µs)", pct(&lat, 0.999) / 1e3),
            ("deltas received", lat.len() as f64),
        ]
    }

    async fn single(s: &Server) -> Figures {
        let ids = loops(s, 1).await;
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..5 {
            n += s.turn(&ids[0], 2000, 0).await.len();
        }
        vec![("events/s", n as f64 / t.elapsed().as_secs_f64())]
    }

    async fn multi(s: &Server) -> Figures {
        let ids = loops(s, 50).await;
        let (cpu0, _) = usage(s.pid());
        let t = Instant::now();
        let runs = ids.iter().map(|id| async move {
            let mut lat = Vec::new();
            for _ in 0..3 {
                lat.extend(s.turn(id, 500, 0).await);
            }
            lat
        });
        let lat: Vec<Vec<u64>> = futures_util::future::join_all(runs).await;
        let secs = t.elapsed().as_secs_f64();
        let (cpu1, rss) = usage(s.pid());
        let n: usize = lat.iter().map(Vec::len).sum();
        vec![
            ("events/s", n as f64 / secs),
            ("server CPU per event (µs)", (cpu1 - cpu0) * 1e6 / n as f64),
            ("server RSS (MB)", rss as f64 / 1e6),
        ]
    }

    async fn watchers(s: &Server) -> Figures {
        let ids = loops(s, 100).await;
        let (_, rss0) = usage(s.pid());
        let t = Instant::now();
        let opens = (0..watchers_n()).map(|i| s.watch(&ids[i % 100]));
        let streams: Vec<reqwest::Response> = futures_util::future::join_all(opens).await;
        let open_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, rss1) = usage(s.pid());
        eprintln!(
            "{:?}: {} streams open, {:.1} KB RSS each",
            s.kind,
            watchers_n(),
            (rss1.saturating_sub(rss0)) as f64 / watchers_n() as f64 / 1e3
        );
        let readers: Vec<_> = streams
            .into_iter()
            .map(|r| tokio::spawn(read(r, true)))
            .collect();
        let turns = ids.iter().map(|id| s.turn(id, 20, 0));
        futures_util::future::join_all(turns).await;
        let mut complete = 0;
        for r in readers {
            if tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .is_ok_and(|got| got.unwrap().len() == 20)
            {
                complete += 1;
            }
        }
        vec![
            ("seconds to open 10,000", open_s),
            (
                "RSS per stream (KB)",
                (rss1.saturating_sub(rss0)) as f64 / 10_000.0 / 1e3,
            ),
            ("watchers with every event", complete as f64),
        ]
    }

    /// 10,000, or BENCH_WATCHERS (for profiling runs).
    fn watchers_n() -> usize {
        std::env::var("BENCH_WATCHERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000)
    }

    async fn fan_out(s: &Server) -> Figures {
        let ids = loops(s, 1).await;
        let streams = futures_util::future::join_all((0..100).map(|_| s.watch(&ids[0]))).await;
        let readers: Vec<_> = streams
            .into_iter()
            .map(|r| {
                tokio::spawn(async move {
                    let mut stream = r.bytes_stream();
                    let mut deltas = 0usize;
                    let mut dones = 0;
                    let mut tail = Vec::new();
                    while let Some(Ok(chunk)) = stream.next().await {
                        tail.extend_from_slice(&chunk);
                        let text = String::from_utf8_lossy(&tail);
                        deltas += text.matches("\"text\":\"").count();
                        dones += text.matches("event: done").count();
                        let keep = tail.len().saturating_sub(32);
                        tail.drain(..keep);
                        if dones >= 3 {
                            break;
                        }
                    }
                    deltas
                })
            })
            .collect();
        let t = Instant::now();
        for _ in 0..3 {
            s.turn(&ids[0], 1000, 0).await;
        }
        let mut n = 0;
        for r in readers {
            n += r.await.unwrap();
        }
        vec![("watchers' events/s", n as f64 / t.elapsed().as_secs_f64())]
    }

    async fn idle(s: &Server) -> Figures {
        tokio::time::sleep(Duration::from_millis(500)).await;
        vec![("RSS (MB)", usage(s.pid()).1 as f64 / 1e6)]
    }

    /// Reads a turn's stream: the time from `sent` to its first text delta.
    async fn first_delta(resp: reqwest::Response, sent: Instant) -> Duration {
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut first = None;
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.unwrap());
            if first.is_none() && find(&buf, b"event: assistant_delta").is_some() {
                first = Some(sent.elapsed());
            }
            if find(&buf, b"event: done").is_some() {
                break;
            }
        }
        first.expect("the turn streamed no text")
    }

    /// Cold starts (a new loop's first turn: the agent process starts) and
    /// paced latency, loopd without and with its sandbox.
    async fn sandbox_cost(runs: usize) {
        println!("loopd --sandbox none vs --sandbox bwrap, {runs} run(s) each");
        println!("| figure | none | bwrap | bwrap − none |");
        println!("|---|---|---|---|");
        let mut results: HashMap<&str, Vec<Figures>> = HashMap::new();
        for _ in 0..runs {
            for mode in ["none", "bwrap"] {
                let s = start_with(Kind::Loopd, mode).await;
                let mut cold = Vec::new();
                for i in 0..20 {
                    let id = s.new_loop(i).await;
                    let req = s
                        .req(reqwest::Method::POST, &format!("/loops/{id}/messages"))
                        .body(r#"{"content":"K=1 RATE=0"}"#);
                    let sent = Instant::now();
                    let resp = req.send().await.unwrap();
                    cold.push(first_delta(resp, sent).await.as_micros() as u64);
                }
                cold.sort_unstable();
                let mut figures = vec![
                    ("cold start to first event p50 (ms)", pct(&cold, 0.5) / 1e3),
                    ("cold start to first event p90 (ms)", pct(&cold, 0.9) / 1e3),
                ];
                drop(s);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let s = start_with(Kind::Loopd, mode).await;
                figures.extend(paced(&s).await);
                results.entry(mode).or_default().push(figures);
                drop(s);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let names: Vec<&str> = results["none"][0].iter().map(|(n, _)| *n).collect();
        for (i, name) in names.iter().enumerate() {
            let median = |mode: &str| {
                let mut v: Vec<f64> = results[mode].iter().map(|f| f[i].1).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (n, nmin, nmax) = median("none");
            let (b, bmin, bmax) = median("bwrap");
            println!(
                "| {name} | {} ({}–{}) | {} ({}–{}) | {} |",
                fmt(n),
                fmt(nmin),
                fmt(nmax),
                fmt(b),
                fmt(bmin),
                fmt(bmax),
                fmt(b - n)
            );
        }
    }

    pub async fn run(runs: usize, only: Option<String>) {
        if only.as_deref() == Some("sandbox") {
            return sandbox_cost(runs).await;
        }
        let scenarios: &[&str] = &["idle", "paced", "single", "multi", "fan-out", "watchers"];
        println!(
            "loopd vs raw relay, {runs} run(s) each, {} cores",
            std::thread::available_parallelism().unwrap()
        );
        println!("| scenario | figure | raw relay | loopd | loopd / relay |");
        println!("|---|---|---|---|---|");
        for scenario in scenarios
            .iter()
            .filter(|s| only.as_deref().is_none_or(|o| o == **s))
        {
            let mut results: HashMap<Kind, Vec<Figures>> = HashMap::new();
            for _ in 0..runs {
                for kind in [Kind::Relay, Kind::Loopd] {
                    let server = start(kind).await;
                    let figures = match *scenario {
                        "idle" => idle(&server).await,
                        "paced" => paced(&server).await,
                        "single" => single(&server).await,
                        "multi" => multi(&server).await,
                        "fan-out" => fan_out(&server).await,
                        "watchers" => watchers(&server).await,
                        _ => unreachable!(),
                    };
                    results.entry(kind).or_default().push(figures);
                    drop(server);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            let names: Vec<&str> = results[&Kind::Loopd][0].iter().map(|(n, _)| *n).collect();
            for (i, name) in names.iter().enumerate() {
                let summary = |kind: Kind| {
                    let mut v: Vec<f64> = results[&kind].iter().map(|f| f[i].1).collect();
                    v.sort_by(f64::total_cmp);
                    (v[v.len() / 2], v[0], v[v.len() - 1])
                };
                let (r, rmin, rmax) = summary(Kind::Relay);
                let (l, lmin, lmax) = summary(Kind::Loopd);
                println!(
                    "| {scenario} | {name} | {} ({}–{}) | {} ({}–{}) | {:.2} |",
                    fmt(r),
                    fmt(rmin),
                    fmt(rmax),
                    fmt(l),
                    fmt(lmin),
                    fmt(lmax),
                    l / r
                );
            }
        }
    }

    fn fmt(v: f64) -> String {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    }
}
