//! The load client's handle on a server under test (loopd or the relay):
//! starting it, its requests, reading its SSE streams, and its CPU and RSS.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::now_ns;

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

pub async fn start(kind: Kind) -> Server {
    start_with(kind, "auto").await
}

/// Starts a server; loopd with `--sandbox sandbox`.
pub async fn start_with(kind: Kind, sandbox: &str) -> Server {
    start_node(kind, sandbox, None, &[]).await
}

/// Starts loopd on the Postgres database `database` (with `args` more).
pub async fn start_on(database: &str, args: &[&str]) -> Server {
    start_node(Kind::Loopd, "auto", Some(database), args).await
}

async fn start_node(kind: Kind, sandbox: &str, database: Option<&str>, args: &[&str]) -> Server {
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
    let port = crate::pg::free_port();
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
            let accounts = match database {
                None => loopd::store::Accounts::open(
                    &loopd::store::DataDir::create(dir.path()).unwrap(),
                )
                .unwrap(),
                Some(url) => crate::pg::accounts(url),
            };
            let token = match accounts.users.get("bench") {
                // Another node of the same database made it.
                Some(_) => crate::cluster::token(),
                None => {
                    accounts
                        .users
                        .add("bench", false, "bench password")
                        .unwrap();
                    let (token, _) = accounts
                        .tokens
                        .create("bench", None, Default::default())
                        .unwrap();
                    crate::cluster::remember_token(&token);
                    token
                }
            };
            // BENCH_LOOPD_WRAP="valgrind --tool=callgrind": loopd under a tool.
            let wrap = std::env::var("BENCH_LOOPD_WRAP").unwrap_or_default();
            let mut wrap = wrap.split_whitespace();
            let mut cmd = match wrap.next() {
                Some(tool) => {
                    let mut cmd = Command::new(tool);
                    cmd.args(wrap).arg(env!("CARGO_BIN_EXE_loopd"));
                    cmd
                }
                None => Command::new(env!("CARGO_BIN_EXE_loopd")),
            };
            let child = cmd
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
                .args(args)
                .envs(database.map(|url| ("LOOPD_DATABASE_URL", url)))
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
    /// kill -9: the node vanishes without a word.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

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

    /// Sends a turn of `k` deltas at `rate` per second (0: full speed); its stream.
    pub async fn send_turn(&self, loop_id: &str, k: usize, rate: u64) -> reqwest::Response {
        let text = format!("K={k} RATE={rate}");
        let req = self.req(reqwest::Method::POST, &format!("/loops/{loop_id}/messages"));
        let req = match self.kind {
            Kind::Relay => req.body(text),
            Kind::Loopd => req.body(format!(r#"{{"content":"{text}"}}"#)),
        };
        req.send().await.unwrap()
    }

    /// Sends a turn whose agent first runs a tool printing `bytes`, and
    /// reads its stream to the end.
    pub async fn tool_turn(&self, loop_id: &str, bytes: usize) {
        let text = format!("K=1 RATE=0 TOOL={bytes}");
        let req = self.req(reqwest::Method::POST, &format!("/loops/{loop_id}/messages"));
        let resp = req
            .body(format!(r#"{{"content":"{text}"}}"#))
            .send()
            .await
            .unwrap();
        resp.bytes().await.unwrap();
    }

    /// The data directory of a loopd this bench started.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|d| d.path())
    }

    /// Sends a turn and reads its stream to the end: delta stamps' added latencies (ns).
    pub async fn turn(&self, loop_id: &str, k: usize, rate: u64) -> Vec<u64> {
        read(self.send_turn(loop_id, k, rate).await, true).await
    }

    /// The relay's count of batches lost by lagging streams (0 for loopd,
    /// which streams from its log and loses nothing).
    pub async fn lagged(&self) -> u64 {
        if self.kind == Kind::Loopd {
            return 0;
        }
        let r = self.http.get(format!("{}/lagged", self.base)).send().await;
        r.unwrap().text().await.unwrap().parse().unwrap()
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
        // Frames are consumed by a cursor and the buffer shifted once per
        // chunk: draining per frame made this quadratic in the chunk size,
        // so the server that batched more (bigger chunks) looked slower.
        let mut start = 0;
        while let Some(len) = find(&buf[start..], b"\n\n") {
            let frame = &buf[start..start + len];
            start += len + 2;
            if let Some(at) = find(frame, b"\"text\":\"") {
                let digits = &frame[at + 8..];
                let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
                if let Ok(stamp) = std::str::from_utf8(&digits[..len]).unwrap().parse::<u128>() {
                    lat.push(now.saturating_sub(stamp) as u64);
                }
            }
            let is_end = frame.starts_with(b"event: done") || frame.starts_with(b"event: error");
            if is_end && to_end {
                return lat;
            }
        }
        buf.drain(..start);
    }
    lat
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A process's CPU time so far, to the nanosecond: per live thread, its
/// time on a CPU (`/proc/PID/task/TID/schedstat`, user + system); and the
/// tick-grained total from [`usage`], for threads that exit meanwhile.
pub struct CpuMark {
    threads: std::collections::HashMap<u32, u64>,
    ticks: f64,
}

pub fn cpu_mark(pid: u32) -> CpuMark {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(tid) = task.file_name().to_string_lossy().parse() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // exited just now
        };
        threads.insert(tid, stat.split(' ').next().unwrap().parse().unwrap());
    }
    CpuMark {
        threads,
        ticks: usage(pid).0,
    }
}

/// The server process's own CPU seconds (user + system, its children not
/// counted) between two marks: to the nanosecond when every thread of the
/// first mark still runs, else from clock ticks (10 ms grain).
pub fn cpu_between(a: &CpuMark, b: &CpuMark) -> f64 {
    if a.threads.keys().all(|tid| b.threads.contains_key(tid)) {
        let ns: u64 = b
            .threads
            .iter()
            .map(|(tid, ns)| ns - a.threads.get(tid).copied().unwrap_or(0))
            .sum();
        ns as f64 / 1e9
    } else {
        eprintln!("a server thread exited while measured: CPU from clock ticks");
        b.ticks - a.ticks
    }
}

/// (CPU seconds, RSS bytes) of a process: utime + stime of the process
/// itself (`/proc/PID/stat` fields 14 and 15, in clock ticks of 10 ms), not
/// of its children (cutime, cstime), so fake agents never count.
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
