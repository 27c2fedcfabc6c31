//! The runtime's own guarantees: one log per loop whoever asks first, and a
//! shutdown that waits for every task a loop started.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use super::*;
use crate::store::{DataDir, NewLoop};

pub(crate) fn runtime(dir: &std::path::Path) -> Runtime {
    let data = DataDir::create(dir).unwrap();
    let config = Arc::new(Config::for_data_dir(dir));
    let loops = Arc::new(LoopStore::open(data.loops()).unwrap());
    let catalog = Arc::new(Catalog::new(data.root()));
    let place = |name: &str| crate::store::Place::File {
        path: data.root().join(name),
        lock: data.write_lock(),
    };
    let hooks = crate::store::webhooks::WebhookStore::open(
        place("webhooks.json"),
        place("webhook-outbox.json"),
    )
    .unwrap();
    let rules = crate::store::rules::RuleStore::open(place("rules.json")).unwrap();
    let audit = crate::store::audit::AuditLog::open_on(&crate::store::Backend::Files, &data);
    Runtime::open(
        config,
        loops,
        catalog,
        None,
        Arc::new(hooks),
        Arc::new(rules),
        Arc::new(audit),
    )
    .unwrap()
}

pub(crate) fn new_loop(runtime: &Runtime) -> LoopRecord {
    runtime
        .shared
        .loops
        .create(NewLoop {
            title: "t".into(),
            created_by: "alice".into(),
            metadata: BTreeMap::new(),
            profiles: Vec::new(),
            vault: "default".into(),
            repo: None,
        })
        .unwrap()
}

#[test]
fn every_first_caller_of_a_new_loop_gets_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(runtime(dir.path()));
    // Loops made after start: their logs open on first use, here by 8 at once.
    for _ in 0..50 {
        let id = new_loop(&runtime).id;
        let barrier = Arc::new(Barrier::new(8));
        let logs: Vec<Arc<EventLog>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (runtime, barrier) = (runtime.clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        runtime.log(id).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for log in &logs {
            assert!(Arc::ptr_eq(log, &logs[0]), "two logs for one loop");
        }
    }
}

#[tokio::test]
async fn shutdown_waits_for_every_task_a_loop_started() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    // As a background agent stop is: spawned, and slower than shutdown's own work.
    runtime.shared.tasks.spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        flag.store(true, Ordering::SeqCst);
    });
    runtime.shutdown().await;
    assert!(
        done.load(Ordering::SeqCst),
        "shutdown returned before a stop ended"
    );
}
