//! Appends of every loop a node holds, written together: each waiting
//! batch (a loop's events of one flush) joins the next statement, so many
//! busy loops cost one round trip, not one each. One statement checks each
//! loop's fencing generation, moves its head, inserts its rows and
//! announces it; a loop whose generation moved on gets
//! [`StoreError::Fenced`] and the others are written all the same.

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::StoreError;
use super::shared_log::{self, CHANNEL, Chunk};

/// Batches waiting for the writer, at most.
const WAITING: usize = 4096;
/// Statements in flight at once. A loop has at most one batch on its way
/// (its task waits for each), so statements never reorder a loop's events.
const IN_FLIGHT: usize = 2;
/// An append this small (bytes of lines) goes out inside its notification,
/// so other nodes take it in without a query (Postgres allows 8000).
const NOTIFY_LINES_BYTES: i64 = 7000;
/// Batches (rows) per statement, and bytes of lines, at most (a batch is
/// never split, so one alone may be larger).
const ROWS: usize = 1024;
const BYTES: usize = 8 << 20;

/// One loop's events of one flush.
pub struct Batch {
    pub loop_id: Uuid,
    pub generation: i64,
    pub first: u64,
    /// How many events, and their lines joined by newlines.
    pub count: usize,
    pub lines: String,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

impl Batch {
    fn chunk(&self) -> Chunk<'_> {
        Chunk {
            first: self.first,
            count: self.count,
            lines: &self.lines,
        }
    }
}

/// The writer's queue.
#[derive(Clone)]
pub struct GroupCommit(mpsc::Sender<Batch>);

impl GroupCommit {
    /// Starts the writer on `pool`; it ends when every sender is gone.
    pub fn start(pool: sqlx::PgPool) -> Self {
        let (tx, rx) = mpsc::channel(WAITING);
        tokio::spawn(write_all(pool, rx));
        Self(tx)
    }

    /// Writes one batch together with whatever else waits; its outcome.
    pub async fn append(
        &self,
        loop_id: Uuid,
        generation: i64,
        chunk: Chunk<'_>,
    ) -> Result<(), StoreError> {
        if chunk.count == 0 {
            return Ok(());
        }
        let (done, outcome) = oneshot::channel();
        let batch = Batch {
            loop_id,
            generation,
            first: chunk.first,
            count: chunk.count,
            lines: chunk.lines.to_owned(),
            done,
        };
        if self.0.send(batch).await.is_err() {
            return Err(StoreError::Database(sqlx::Error::PoolClosed));
        }
        outcome
            .await
            .unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed)))
    }
}

async fn write_all(pool: sqlx::PgPool, mut rx: mpsc::Receiver<Batch>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(batch) = rx.recv().await {
        // Whatever else is waiting once a statement may start goes with it.
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let mut bytes = batch.lines.len();
        let mut batches = vec![batch];
        while batches.len() < ROWS && bytes < BYTES {
            match rx.try_recv() {
                Ok(more) => {
                    bytes += more.lines.len();
                    batches.push(more);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            write(&pool, &mut batches).await;
            drop(slot);
        });
    }
}

/// One statement for all of `batches` (each answered); if it fails as a
/// whole (a key taken: an earlier try that committed), each on its own.
async fn write(pool: &sqlx::PgPool, batches: &mut Vec<Batch>) {
    // A loop twice in one statement would move its head twice: later
    // batches of the same loop wait for the next statement.
    let mut seen = std::collections::HashSet::new();
    let (now, later): (Vec<Batch>, Vec<Batch>) =
        batches.drain(..).partition(|b| seen.insert(b.loop_id));
    let ids: Vec<Uuid> = now.iter().map(|b| b.loop_id).collect();
    let gens: Vec<i64> = now.iter().map(|b| b.generation).collect();
    let firsts: Vec<i64> = now.iter().map(|b| b.first as i64).collect();
    let lasts: Vec<i64> = now.iter().map(|b| b.chunk().last()).collect();
    let lines: Vec<&str> = now.iter().map(|b| b.lines.as_str()).collect();
    let written: Result<Vec<Uuid>, sqlx::Error> = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) \
                 AS t(loop_id, generation, first_seq, last_seq, lines)), \
         fence AS ( \
             UPDATE leases l SET head = i.last_seq, version = nextval('changes') FROM input i \
             WHERE l.loop_id = i.loop_id AND l.generation = i.generation \
             RETURNING l.loop_id), \
         ins AS ( \
             INSERT INTO event_chunks (loop_id, first_seq, last_seq, lines) \
             SELECT i.loop_id, i.first_seq, i.last_seq, i.lines FROM input i JOIN fence f USING (loop_id) \
             RETURNING 1), \
         told AS ( \
             SELECT pg_notify($6, i.loop_id::text || ' ' || i.last_seq::text || \
                 CASE WHEN octet_length(i.lines) <= $7 \
                     THEN E'\\n' || i.first_seq::text || E'\\n' || i.lines ELSE '' END) \
             FROM input i JOIN fence f USING (loop_id)) \
         SELECT f.loop_id FROM fence f WHERE (SELECT count(*) FROM ins) >= 0 \
             AND (SELECT count(*) FROM told) >= 0",
    )
    .bind(&ids)
    .bind(&gens)
    .bind(&firsts)
    .bind(&lasts)
    .bind(&lines)
    .bind(CHANNEL)
    .bind(NOTIFY_LINES_BYTES)
    .fetch_all(pool)
    .await;
    match written {
        Ok(fenced_in) => {
            for b in now {
                let outcome = if fenced_in.contains(&b.loop_id) {
                    Ok(())
                } else {
                    Err(StoreError::Fenced(format!("loop_{}", b.loop_id)))
                };
                let _ = b.done.send(outcome);
            }
        }
        Err(_) => {
            // Each alone: the single write tells a lost answer from a
            // real conflict, and one bad batch fails only itself.
            for b in now {
                let outcome = shared_log::append(pool, b.loop_id, b.generation, b.chunk()).await;
                let _ = b.done.send(outcome);
            }
        }
    }
    batches.extend(later);
    if !batches.is_empty() {
        Box::pin(write(pool, batches)).await;
    }
}
