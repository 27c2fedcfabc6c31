//! `--only cluster`: loopd on Postgres. Full speed on one node, Postgres
//! against files in the same run; paced latency for a watcher on another
//! node than the agent's (and, for reference, on the agent's own node);
//! and how long it takes until a killed node's running turn is closed
//! `node_lost` by another node.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::client::{Kind, Server, find, read, start, start_on};
use crate::report::fmt;
use crate::scenarios::{Figures, loops, multi};

static TOKEN: Mutex<Option<String>> = Mutex::new(None);

/// The bench user's token, for the second node of a database.
pub fn token() -> String {
    TOKEN
        .lock()
        .unwrap()
        .clone()
        .expect("the first node made it")
}

pub fn remember_token(token: &str) {
    *TOKEN.lock().unwrap() = Some(token.to_owned());
}

/// A percentile in µs (the samples are ns).
fn pct(sorted: &[u64], p: f64) -> f64 {
    crate::scenarios::pct(sorted, p) / 1e3
}

/// 50 loops driven on `a` at 100 deltas/s, 300 each: the added latency of
/// every delta as a watcher on `watch_on` receives it.
async fn paced_across(a: &Server, watch_on: &Server) -> Figures {
    let ids = loops(a, 50).await;
    let runs = ids.iter().map(|id| async move {
        let watcher = watch_on.watch(id).await;
        let reading = tokio::spawn(read(watcher, true));
        // The turn's own stream is read too (as its sender would).
        let sent = a.send_turn(id, 300, 100).await;
        let own = tokio::spawn(read(sent, true));
        let lat = reading.await.unwrap();
        own.await.unwrap();
        lat
    });
    let mut lat: Vec<u64> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    lat.sort_unstable();
    vec![
        ("added latency p50 (µs)", pct(&lat, 0.5)),
        ("added latency p99 (µs)", pct(&lat, 0.99)),
        ("added latency p99.9 (µs)", pct(&lat, 0.999)),
        ("deltas received", lat.len() as f64),
    ]
}

/// Seconds from kill -9 of the node running a turn to the `node_lost`
/// error on a watcher of another node, how much of that came after the
/// lease ran out, and from the kill on to the next turn's end there.
async fn takeover(database: &str, ttl: &str) -> (f64, f64, f64) {
    let mut a = start_on(database, &["--lease-ttl", ttl]).await;
    let b = start_on(database, &["--lease-ttl", ttl]).await;
    let id = loops(&a, 1).await.pop().unwrap();
    let slow = a.send_turn(&id, 100_000, 10).await;
    let mut watcher = b.watch(&id).await.bytes_stream();
    // Until the slow turn streams.
    let mut seen = Vec::new();
    while find(&seen, b"assistant_delta").is_none() {
        seen.extend_from_slice(&watcher.next().await.unwrap().unwrap());
    }
    let uuid: uuid::Uuid = id.strip_prefix("loop_").unwrap().parse().unwrap();
    let killed = Instant::now();
    let left = crate::pg::lease_left(database, uuid);
    a.kill9();
    drop(slow);
    let mut buf = Vec::new();
    while find(&buf, b"node_lost").is_none() {
        buf.extend_from_slice(&watcher.next().await.expect("the watcher ended").unwrap());
    }
    let lost = killed.elapsed().as_secs_f64();
    let next = b.send_turn(&id, 1, 0).await;
    read(next, true).await;
    (lost, lost - left, killed.elapsed().as_secs_f64())
}

/// The cluster figures; `takeover_only` skips the throughput and latency
/// runs (`--only takeover`).
pub async fn run(runs: usize, takeover_only: bool) {
    let pg = crate::pg::server();
    println!("loopd on Postgres, {runs} run(s) each, median (min–max)");
    println!("| figure | value |");
    println!("|---|---|");
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let add = |rows: &mut Vec<(String, Vec<f64>)>, name: String, v: f64| match rows
        .iter_mut()
        .find(|(n, _)| *n == name)
    {
        Some((_, vs)) => vs.push(v),
        None => rows.push((name, vec![v])),
    };
    for _ in 0..runs {
        if !takeover_only {
            throughput_and_latency(pg, &mut rows, add).await;
        }

        for ttl in ["12", "3"] {
            let (lost, late, next) = takeover(&pg.new_database(), ttl).await;
            add(
                &mut rows,
                format!("takeover, lease {ttl} s: kill -9 to node_lost (s)"),
                lost,
            );
            add(
                &mut rows,
                format!("takeover, lease {ttl} s: lease's end to node_lost (s)"),
                late,
            );
            add(
                &mut rows,
                format!("takeover, lease {ttl} s: kill -9 to the next turn's end (s)"),
                next,
            );
        }
    }
    for (name, mut vs) in rows {
        vs.sort_by(f64::total_cmp);
        println!(
            "| {name} | {} ({}–{}) |",
            fmt(vs[vs.len() / 2]),
            fmt(vs[0]),
            fmt(vs[vs.len() - 1])
        );
    }
}

/// One run of full speed on files and on Postgres, and paced latency with a
/// watcher on the agent's node and on another.
async fn throughput_and_latency(
    pg: &crate::pg::PgServer,
    rows: &mut Vec<(String, Vec<f64>)>,
    add: impl Fn(&mut Vec<(String, Vec<f64>)>, String, f64),
) {
    let files = start(Kind::Loopd).await;
    let on_files = multi(&files).await;
    drop(files);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let database = pg.new_database();
    let node = start_on(&database, &[]).await;
    let on_pg = multi(&node).await;
    drop(node);
    for ((name, f), (_, p)) in on_files.iter().zip(&on_pg) {
        add(rows, format!("multi, files: {name}"), *f);
        add(rows, format!("multi, Postgres: {name}"), *p);
    }
    add(
        rows,
        "multi: Postgres / files events/s".into(),
        on_pg[0].1 / on_files[0].1,
    );

    // Paced, a watcher on the agent's node and on another node.
    let database = pg.new_database();
    let a = start_on(&database, &[]).await;
    let b = start_on(&database, &[]).await;
    for (name, v) in paced_across(&a, &a).await {
        add(
            rows,
            format!("paced, watcher on the agent's node: {name}"),
            v,
        );
    }
    for (name, v) in paced_across(&a, &b).await {
        add(rows, format!("paced, watcher on another node: {name}"), v);
    }
    drop((a, b));
}
