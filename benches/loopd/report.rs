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
