//! loopd under abuse, all at once, with its default limits:
//!
//! - 200 clients (each from its own loopback address, so no per-address
//!   throttle saves the server) flooding `POST /api/auth/login` with bad
//!   passwords for random usernames;
//! - 5,000 idle connections from 10 other addresses, reopened whenever the
//!   server closes them;
//! - 200 `GET /events?after=0` replays of a loop whose log holds 150 MB
//!   (75 turns of a 1 MiB message and its 1 MiB echo) that never read;
//!
//! while a normal bot, from 127.0.0.1, runs echo turns and lists its loops.
//! Reported: the bot's turns completed, its `GET /loops` latency, loopd's
//! peak RSS. `cargo bench --bench stress [-- --seconds N]`

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map_or(30, |v| v.parse().expect("--seconds N"));
    raise_nofile();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(Duration::from_secs(seconds)));
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn connect_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((src, 0)))?;
    socket.connect(to).await
}

async fn run(duration: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let accounts =
        loopd::store::Accounts::open(&loopd::store::DataDir::create(dir.path()).unwrap()).unwrap();
    accounts.users.add("bot", false, "bot password 1").unwrap();
    accounts
        .users
        .add("mallory", false, "mallory password")
        .unwrap();
    let (bot_token, _) = accounts
        .tokens
        .create("bot", None, Default::default())
        .unwrap();
    let (evil_token, _) = accounts
        .tokens
        .create("mallory", None, Default::default())
        .unwrap();
    drop(accounts);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopd"))
        .args(["serve", "--agent", "echo", "--bind", &addr.to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .env("LOOPD_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "loopd did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let api = |path: &str| format!("{base}/api/v1{path}");
    let create = |token: &str| {
        let req = http.post(api("/loops")).bearer_auth(token).body("{}");
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };

    // The big log: 75 turns of 1 MiB in, 1 MiB echoed.
    let big = create(&evil_token).await;
    let word = "x".repeat(1024 * 1024 - 64);
    let body = serde_json::json!({ "content": word }).to_string();
    let t = Instant::now();
    for _ in 0..75 {
        let resp = http
            .post(api(&format!("/loops/{big}/messages")))
            .bearer_auth(&evil_token)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let log = std::fs::metadata(
        dir.path()
            .join("loops")
            .join(big.trim_start_matches("loop_"))
            .join("events.jsonl"),
    )
    .unwrap()
    .len();
    println!(
        "log: {:.0} MB written in {:.1} s",
        log as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let rss_before = status_kb(pid, "VmRSS:");

    let stop = Instant::now() + duration;
    let logins = Arc::new(AtomicUsize::new(0));
    let login_codes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        u16,
        usize,
    >::new()));
    let idle_open = Arc::new(AtomicUsize::new(0));
    let idle_peak = Arc::new(AtomicUsize::new(0));
    let mut attack = tokio::task::JoinSet::new();
    // STRESS_ONLY=logins|idle|replays runs one attack alone (to find what costs).
    let only = std::env::var("STRESS_ONLY").ok();
    let on = |part: &str| only.as_deref().is_none_or(|o| o == part);
    // 200 login flooders, each from its own address 127.0.1.x.
    for i in (0..200u32).filter(|_| on("logins")) {
        let (logins, codes) = (logins.clone(), login_codes.clone());
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([
                127,
                0,
                1 + (i / 250) as u8,
                (i % 250 + 1) as u8,
            ]))
            .build()
            .unwrap();
        let url = format!("{base}/api/auth/login");
        attack.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                n += 1;
                let body = serde_json::json!({"username": format!("u{i}x{n}"), "password": "wrong password"});
                if let Ok(resp) = client.post(&url).json(&body).send().await {
                    *codes.lock().unwrap().entry(resp.status().as_u16()).or_default() += 1;
                    let _ = resp.bytes().await;
                }
                logins.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // 5,000 idle connections from 127.0.2.1–10 (500 each), reopened when closed.
    for i in (0..5000u32).filter(|_| on("idle")) {
        let (open, idle_peak) = (idle_open.clone(), idle_peak.clone());
        let src = [127, 0, 2, (i / 500 + 1) as u8];
        attack.spawn(async move {
            while Instant::now() < stop {
                let Ok(mut tcp) = connect_from(src, target).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                idle_peak.fetch_max(now, Ordering::Relaxed);
                let mut buf = [0u8; 512];
                let left = stop.saturating_duration_since(Instant::now());
                let _ = tokio::time::timeout(left, tcp.read(&mut buf)).await;
                open.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
    // 200 replays of the big log that never read, from 127.0.3.1: all from
    // the start, or (STRESS_SPREAD=1) each from another event, so that no
    // two share what they hold.
    let spread = std::env::var_os("STRESS_SPREAD").is_some();
    for i in (0..200).filter(|_| on("replays")) {
        let after = if spread { i } else { 0 };
        let request = format!(
            "GET /api/v1/loops/{big}/events?after={after} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {evil_token}\r\n\r\n"
        );
        attack.spawn(async move {
            let Ok(mut tcp) = connect_from([127, 0, 3, 1], target).await else {
                return;
            };
            let _ = tcp.write_all(request.as_bytes()).await;
            tokio::time::sleep(stop.saturating_duration_since(Instant::now())).await;
            drop(tcp);
        });
    }

    // The normal bot, from 127.0.0.1: echo turns and listing, all along.
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            while Instant::now() < stop {
                peak.fetch_max(status_kb(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // let the attack ramp up
    let bot_loop = create(&bot_token).await;
    let (mut turns, mut turns_ok, mut list_ms) = (0, 0, Vec::new());
    while Instant::now() < stop {
        let t = Instant::now();
        let resp = http
            .get(api("/loops?limit=10"))
            .bearer_auth(&bot_token)
            .send()
            .await;
        let ok = matches!(&resp, Ok(r) if r.status() == 200);
        if let Ok(r) = resp {
            let _ = r.bytes().await;
        }
        list_ms.push(if ok {
            t.elapsed().as_secs_f64() * 1e3
        } else {
            f64::INFINITY
        });
        turns += 1;
        let resp = http
            .post(api(&format!("/loops/{bot_loop}/messages")))
            .bearer_auth(&bot_token)
            .body(r#"{"content":"hello from the bot"}"#)
            .send()
            .await;
        if let Ok(r) = resp
            && r.status() == 200
            && String::from_utf8_lossy(&r.bytes().await.unwrap_or_default()).contains("event: done")
        {
            turns_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_at_end = idle_peak.load(Ordering::Relaxed);
    attack.abort_all();
    while attack.join_next().await.is_some() {}
    sampler.await.unwrap();
    let hwm = status_kb(pid, "VmHWM:");
    let alive = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();

    list_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| list_ms[((list_ms.len() as f64 - 1.0) * p).round() as usize];
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| attack duration | {} s | |", duration.as_secs());
    println!(
        "| login attempts (status: count) | {} ({:?}) | |",
        logins.load(Ordering::Relaxed),
        login_codes.lock().unwrap()
    );
    println!("| idle connections open at once (peak) | {idle_at_end} | 5,000 attempted |");
    println!(
        "| loopd RSS before the attack | {:.0} MB | |",
        rss_before as f64 / 1e3
    );
    println!(
        "| loopd peak RSS (sampled / VmHWM) | {:.0} MB / {:.0} MB | ≤ 300 MB |",
        peak.load(Ordering::Relaxed) as f64 / 1e3,
        hwm as f64 / 1e3
    );
    println!("| bot turns completed | {turns_ok} / {turns} | all |");
    println!(
        "| bot GET /loops p50 / p99 / max | {:.1} / {:.1} / {:.1} ms | p99 ≤ 100 ms |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("| loopd answering after | {alive} | true |");
}
