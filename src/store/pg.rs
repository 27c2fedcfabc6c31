//! The Postgres backend's connection: the pool, the embedded migrations, a
//! bridge for the stores' synchronous writers, and the change feed that
//! keeps every node's in-memory copies fresh (`LISTEN/NOTIFY` to wake up,
//! a poll every half second so a lost notification never strands a change).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::StoreError;

/// How often every watcher re-reads what changed, notification or not.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Connections per node.
const POOL_SIZE: u32 = 16;

/// Called with a notification's payload, or `None` on each poll and after
/// the listener reconnected (then: look at everything).
pub type OnChange = Arc<dyn Fn(Option<String>) -> BoxFuture<'static, ()> + Send + Sync>;

/// The database, shared by every store of one process.
pub struct Pg {
    pool: PgPool,
    /// Loops' appends, written together.
    group: super::group_commit::GroupCommit,
    url: String,
    runtime: tokio::runtime::Handle,
    watchers: Mutex<Vec<(&'static str, OnChange)>>,
}

impl Pg {
    /// Connects and brings the schema up to date (migrations are embedded
    /// in the binary and versioned; running them again is a no-op).
    pub async fn connect(url: &str) -> Result<Arc<Self>, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))?;
        Ok(Arc::new(Self {
            group: super::group_commit::GroupCommit::start(pool.clone()),
            pool,
            url: url.to_owned(),
            runtime: tokio::runtime::Handle::current(),
            watchers: Mutex::new(Vec::new()),
        }))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where loops' appends go to be written together.
    pub fn group(&self) -> &super::group_commit::GroupCommit {
        &self.group
    }

    /// Runs `work` to completion from synchronous code: a blocking-pool
    /// thread or a runtime worker (its other tasks moved away first), the
    /// CLI, or a single-threaded runtime (on a thread of its own). The
    /// stores' writers are synchronous because the file backend is; on
    /// Postgres they wait here for the round trip.
    pub fn block<F>(&self, work: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(work))
            }
            Ok(_) => std::thread::scope(|s| {
                s.spawn(|| self.runtime.block_on(work))
                    .join()
                    .expect("a database call panicked")
            }),
            Err(_) => self.runtime.block_on(work),
        }
    }

    /// Asks for `on_change` on every notification on `channel` (and every
    /// poll). Register before [`Self::start_feed`].
    pub fn watch(&self, channel: &'static str, on_change: OnChange) {
        self.watchers
            .lock()
            .expect("watchers poisoned")
            .push((channel, on_change));
    }

    /// Starts the change feed on `tasks`, until `stopping` fires: the
    /// listener, and apart from it the poll (which goes on while the
    /// listener cannot connect).
    pub fn start_feed(self: &Arc<Self>, tasks: &TaskTracker, stopping: &CancellationToken) {
        let (pg, stop) = (self.clone(), stopping.clone());
        tasks.spawn(async move {
            let watchers = pg.watchers.lock().expect("watchers poisoned").clone();
            let mut poll = tokio::time::interval(POLL_EVERY);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = poll.tick() => notify_all(&watchers, None).await,
                }
            }
        });
        let (pg, stopping) = (self.clone(), stopping.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = stopping.cancelled() => return,
                    ended = pg.feed_once() => {
                        if let Err(err) = ended {
                            tracing::warn!(error = %err, "the database's change feed broke; reconnecting");
                        }
                        tokio::select! {
                            () = stopping.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    }

    /// Listens until the connection breaks.
    async fn feed_once(&self) -> Result<(), StoreError> {
        let watchers = self.watchers.lock().expect("watchers poisoned").clone();
        let mut listener = PgListener::connect(&self.url).await?;
        let mut channels: Vec<&str> = watchers.iter().map(|(c, _)| *c).collect();
        channels.dedup();
        listener.listen_all(channels).await?;
        // Whatever changed while nobody listened.
        notify_all(&watchers, None).await;
        loop {
            match listener.try_recv().await? {
                Some(n) => {
                    for (channel, on_change) in &watchers {
                        if *channel == n.channel() {
                            on_change(Some(n.payload().to_owned())).await;
                        }
                    }
                }
                // The connection was lost (and is re-made by the listener):
                // notifications in between are gone, so look at everything.
                None => notify_all(&watchers, None).await,
            }
        }
    }
}

async fn notify_all(watchers: &[(&'static str, OnChange)], payload: Option<String>) {
    for (_, on_change) in watchers {
        on_change(payload.clone()).await;
    }
}

/// A version watermark that lags by a few seconds: rows are versioned from
/// one sequence, and a transaction that took its number earlier may commit
/// later than one with a higher number, so "newer than the highest seen"
/// would miss it. Re-reading a few seconds' worth costs little.
#[derive(Default)]
pub struct Watermark {
    seen: Vec<(std::time::Instant, i64)>,
}

impl Watermark {
    const LAG: Duration = Duration::from_secs(5);

    /// Versions above this may be new: the highest seen at least
    /// [`Self::LAG`] ago (0 until something is that old, so a transaction
    /// in flight when the node started is not missed either).
    pub fn floor(&self) -> i64 {
        self.floor_at(std::time::Instant::now())
    }

    fn floor_at(&self, now: std::time::Instant) -> i64 {
        self.seen
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= Self::LAG)
            .map_or(0, |(_, v)| *v)
    }

    /// Records the highest version just seen.
    pub fn saw(&mut self, highest: i64) {
        self.saw_at(highest, std::time::Instant::now());
    }

    fn saw_at(&mut self, highest: i64, now: std::time::Instant) {
        let highest = highest.max(self.seen.last().map_or(0, |(_, v)| *v));
        self.seen.push((now, highest));
        // Only the newest entry older than LAG is needed, and what came after.
        while self.seen.len() > 1 && now.duration_since(self.seen[1].0) >= Self::LAG {
            self.seen.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Watermark;
    use std::time::{Duration, Instant};

    #[test]
    fn the_floor_lags_what_was_seen_by_five_seconds() {
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut w = Watermark::default();
        assert_eq!(w.floor_at(t0), 0, "nothing seen");
        w.saw_at(10, at(0.0));
        assert_eq!(
            w.floor_at(at(0.0)),
            0,
            "seen just now: everything may still be new"
        );
        assert_eq!(w.floor_at(at(4.9)), 0);
        assert_eq!(w.floor_at(at(5.0)), 10);
        w.saw_at(20, at(3.0));
        assert_eq!(w.floor_at(at(6.0)), 10, "20 is only 3 s old");
        assert_eq!(w.floor_at(at(8.0)), 20);
        // A poll that found less never lowers it.
        w.saw_at(5, at(9.0));
        assert_eq!(w.floor_at(at(14.0)), 20);
    }

    #[test]
    fn it_keeps_a_few_entries_however_often_it_is_fed() {
        let t0 = Instant::now();
        let mut w = Watermark::default();
        for i in 0..1200 {
            w.saw_at(i, t0 + Duration::from_millis(500 * i as u64));
        }
        assert!(w.seen.len() <= 12, "{}", w.seen.len());
        let end = t0 + Duration::from_millis(500 * 1199);
        assert_eq!(w.floor_at(end), 1189);
    }
}
