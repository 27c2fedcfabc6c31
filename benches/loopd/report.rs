//! Runs the scenarios on both servers and prints the markdown tables.

use std::collections::HashMap;
use std::time::Duration;

use crate::client::{Kind, start, start_with};
use crate::scenarios::*;
/// Cold starts and paced latency, loopd without and with its sandbox.
async fn sandbox_cost(runs: usize) {
    println!("loopd --sandbox none vs --sandbox bwrap, {runs} run(s) each");
    println!("| figure | none | bwrap | bwrap − none |");
    println!("|---|---|---|---|");
    let mut results: HashMap<&str, Vec<Figures>> = HashMap::new();
    for _ in 0..runs {
        for mode in ["none", "bwrap"] {
            let s = start_with(Kind::Loopd, mode).await;
            let mut figures = cold_starts(&s).await;
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
    if only.as_deref() == Some("cluster") {
        return crate::cluster::run(runs, false).await;
    }
    if only.as_deref() == Some("takeover") {
        return crate::cluster::run(runs, true).await;
    }
    if only.as_deref() == Some("tool-output") {
        return tool_output().await;
    }
    let scenarios: &[(&str, &str)] = &[
        ("idle", "idle"),
        ("paced", "paced: 50 loops × 300 deltas at 100/s"),
        ("single", "single: 1 loop, 5 turns × 2000 deltas"),
        ("single-long", "single-long: 1 loop, 50 turns × 2000 deltas"),
        ("multi", "multi: 50 loops × 3 turns × 500 deltas"),
        (
            "fan-out",
            "fan-out: 1 loop × 100 watchers, 3 turns × 1000 deltas",
        ),
        (
            "watchers",
            "watchers: 10,000 idle streams on 100 loops, then a turn each",
        ),
    ];
    // --only a,b,c: those scenarios, in the order above.
    let only: Option<Vec<&str>> = only.as_deref().map(|o| o.split(',').collect());
    if let Some(only) = &only {
        for o in only {
            assert!(
                scenarios.iter().any(|(name, _)| name == o),
                "unknown scenario {o}"
            );
        }
    }
    let mut lagged: Vec<(&str, u64)> = Vec::new();
    println!(
        "loopd vs raw relay, {runs} run(s) each, {} cores",
        std::thread::available_parallelism().unwrap()
    );
    println!("| scenario | figure | relay | loopd | loopd / relay |");
    println!("|---|---|---|---|---|");
    for (scenario, label) in scenarios
        .iter()
        .filter(|(s, _)| only.as_ref().is_none_or(|o| o.contains(s)))
    {
        let mut lost = 0;
        let mut results: HashMap<Kind, Vec<Figures>> = HashMap::new();
        for _ in 0..runs {
            for kind in kinds() {
                let server = start(kind).await;
                let figures = match *scenario {
                    "idle" => idle(&server).await,
                    "paced" => paced(&server).await,
                    "single" => single(&server).await,
                    "single-long" => single_long(&server).await,
                    "multi" => multi(&server).await,
                    "fan-out" => fan_out(&server).await,
                    "watchers" => watchers(&server).await,
                    _ => unreachable!(),
                };
                results.entry(kind).or_default().push(figures);
                lost += server.lagged().await;
                drop(server);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let any = results.values().next().expect("one server ran");
        let names: Vec<&str> = any[0].iter().map(|(n, _)| *n).collect();
        for (i, name) in names.iter().enumerate() {
            let summary = |kind: Kind| {
                let Some(runs) = results.get(&kind) else {
                    return (f64::NAN, f64::NAN, f64::NAN);
                };
                let mut v: Vec<f64> = runs.iter().map(|f| f[i].1).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (r, rmin, rmax) = summary(Kind::Relay);
            let (l, lmin, lmax) = summary(Kind::Loopd);
            println!(
                "| {label} | {name} | {} ({}–{}) | {} ({}–{}) | {:.2} |",
                fmt(r),
                fmt(rmin),
                fmt(rmax),
                fmt(l),
                fmt(lmin),
                fmt(lmax),
                l / r
            );
        }
        lagged.push((scenario, lost));
    }
    // A lagging relay stream drops batches, which would flatter the relay.
    let lagged: Vec<String> = lagged.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!();
    println!(
        "relay batches lost to broadcast lag, all runs (must be 0): {}",
        lagged.join(", ")
    );
}

/// Both servers, or the one BENCH_SERVER names (`loopd` or `relay`, for
/// profiling runs; the table then has NaN in the other's column).
fn kinds() -> Vec<Kind> {
    match std::env::var("BENCH_SERVER").as_deref() {
        Ok("loopd") => vec![Kind::Loopd],
        Ok("relay") => vec![Kind::Relay],
        _ => vec![Kind::Relay, Kind::Loopd],
    }
}

pub fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// How much a turn's log grows with what its tool printed: 20 turns each of
/// tool outputs of 0 B to 1 MiB (an event keeps at most 16 KiB of it).
async fn tool_output() {
    let server = start(Kind::Loopd).await;
    let id = loops(&server, 1).await.pop().unwrap();
    let dir = server.data_dir().expect("a loopd of this bench").to_owned();
    let uuid = id.strip_prefix("loop_").unwrap().to_owned();
    let log = dir.join("loops").join(&uuid).join("events.jsonl");
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    println!("| tool output per turn | log growth per turn | of which the output |");
    println!("|---|---|---|");
    // The same turn without a tool, as the baseline.
    let base = {
        let before = size();
        for _ in 0..20 {
            server.turn(&id, 1, 0).await;
        }
        (size() - before) / 20
    };
    println!("| (no tool) | {base} B | |");
    for bytes in [1024usize, 16 * 1024, 64 * 1024, 1024 * 1024] {
        let before = size();
        for _ in 0..20 {
            server.tool_turn(&id, bytes).await;
        }
        let per = (size() - before) / 20;
        let kept = bytes.min(16 * 1024);
        println!("| {bytes} B | {per} B | {kept} B kept |");
    }
}
