//! The scenarios: each runs one load against one server and returns its figures.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::client::{Server, cpu_between, cpu_mark, find, read, usage};

pub fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

/// One scenario's figures for one server.
pub type Figures = Vec<(&'static str, f64)>;

pub async fn loops(s: &Server, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(s.new_loop(i).await);
    }
    // Warm up: every loop's agent is started, outside the measurement.
    let warm = ids.iter().map(|id| s.turn(id, 1, 0));
    futures_util::future::join_all(warm).await;
    ids
}

pub async fn paced(s: &Server) -> Figures {
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

/// Full speed: `n` loops at once, each `turns` turns of `k` deltas one after
/// another. Events are the deltas the client received; server CPU is the
/// server process's own user + system time over the measured window (its
/// fake agents, children of loopd and of the relay alike, are not counted).
async fn full_speed(s: &Server, n: usize, turns: usize, k: usize) -> Figures {
    let ids = loops(s, n).await;
    let cpu0 = cpu_mark(s.pid());
    let t = Instant::now();
    let runs = ids.iter().map(|id| async move {
        let mut got = 0;
        for _ in 0..turns {
            got += s.turn(id, k, 0).await.len();
        }
        got
    });
    let events: usize = futures_util::future::join_all(runs).await.into_iter().sum();
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_between(&cpu0, &cpu_mark(s.pid()));
    let rss = usage(s.pid()).1;
    vec![
        ("events/s", events as f64 / secs),
        ("server CPU per event (µs)", cpu * 1e6 / events as f64),
        ("server RSS (MB)", rss as f64 / 1e6),
        ("events received", events as f64),
    ]
}

/// 1 loop, 5 turns × 2000 deltas.
pub async fn single(s: &Server) -> Figures {
    full_speed(s, 1, 5, 2000).await
}

/// 1 loop, 50 turns × 2000 deltas.
pub async fn single_long(s: &Server) -> Figures {
    full_speed(s, 1, 50, 2000).await
}

/// 50 loops at once, 3 turns × 500 deltas each (BENCH_MULTI_TURNS turns,
/// for profiling runs).
pub async fn multi(s: &Server) -> Figures {
    let turns = std::env::var("BENCH_MULTI_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    full_speed(s, 50, turns, 500).await
}

pub async fn watchers(s: &Server) -> Figures {
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

pub async fn fan_out(s: &Server) -> Figures {
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

pub async fn idle(s: &Server) -> Figures {
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

/// Cold starts: 20 new loops one after another, from sending each loop's
/// first message (its agent process starts) to its first text delta.
pub async fn cold_starts(s: &Server) -> Figures {
    let mut cold = Vec::new();
    for i in 0..20 {
        let id = s.new_loop(i).await;
        let sent = Instant::now();
        let resp = s.send_turn(&id, 1, 0).await;
        cold.push(first_delta(resp, sent).await.as_micros() as u64);
    }
    cold.sort_unstable();
    vec![
        ("cold start to first event p50 (ms)", pct(&cold, 0.5) / 1e3),
        ("cold start to first event p90 (ms)", pct(&cold, 0.9) / 1e3),
    ]
}
