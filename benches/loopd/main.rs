//! loopd against a raw relay, as `docs/performance.md` describes: argument dispatch.
//!
//! `cargo bench --bench loopd [-- --runs N] [-- --only SCENARIO]`
//! (`--only sandbox`: loopd without and with its sandbox, cold starts and
//! paced latency; `--only cluster`: loopd on Postgres against loopd on
//! files, a watcher on another node, and how long a takeover takes;
//! `--only takeover`: only the last)
//!
//! One executable plays three parts, chosen by its first argument:
//! - `-p …` (Claude Code's flags): the **fake agent**, [`fake_agent`];
//! - `relay ADDR`: the **raw relay**, [`relay`];
//! - anything else: the **client** ([`client`], [`scenarios`], [`report`]),
//!   which starts loopd (release build, this executable as its Claude
//!   binary) and the relay as separate processes, runs the same load
//!   against each, and prints the table.

mod client;
mod cluster;
mod fake_agent;
/// The tests' throwaway Postgres server (initdb, postgres), reused.
#[allow(dead_code)]
#[path = "../../tests/it/pg.rs"]
mod pg;
mod relay;
mod report;
mod scenarios;

use std::time::{SystemTime, UNIX_EPOCH};

/// For `pg`: every server the benches start on a database is on Postgres.
pub const ON_POSTGRES: bool = true;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("-p") {
        return fake_agent::run();
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
    rt.block_on(report::run(runs, only));
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

/// CLOCK_REALTIME in nanoseconds: the fake agent's stamps and the client's
/// receive times.
fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
