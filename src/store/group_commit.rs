//! Appends of every loop a node holds, written together: each waiting
//! batch (a loop's events of one flush) joins the next statement, so many
//! busy loops cost one round trip, not one each. One statement checks each
//! loop's fencing generation, moves its head, inserts its rows and
//! announces it; a loop whose generation moved on gets
//! [`StoreError::Fenced`] and the others are written all the same.

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::StoreError;
use super::shared_log::{self, CHANNEL};

/// Batches waiting for the writer, at most.
const WAITING: usize = 4096;
/// Statements in flight at once. A loop has at most one batch on its way
/// (its task waits for each), so statements never reorder a loop's events.
const IN_FLIGHT: usize = 2;
/// An append this small (bytes of lines) goes out inside its notification,
/// so other nodes take it in without a query (Postgres allows 8000).
const NOTIFY_ROWS_BYTES: i64 = 7000;
/// Rows per statement, at most (a batch is never split).
const ROWS: usize = 8192;

/// One loop's events of one flush.
pub struct Batch {
    pub loop_id: Uuid,
    pub generation: i64,
    pub first: u64,
    pub lines: Vec<String>,
    pub done: oneshot::Sender<Result<(), StoreError>>,
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
        first: u64,
        lines: Vec<String>,
    ) -> Result<(), StoreError> {
        let (done, outcome) = oneshot::channel();
        let batch = Batch {
            loop_id,
            generation,
            first,
            lines,
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
        let mut rows = batch.lines.len();
        let mut batches = vec![batch];
        while rows < ROWS {
            match rx.try_recv() {
                Ok(more) => {
                    rows += more.lines.len();
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
    let mut ids = Vec::new();
    let mut gens = Vec::new();
    let mut seqs = Vec::new();
    let mut lines = Vec::new();
    for b in &now {
        for (i, line) in b.lines.iter().enumerate() {
            ids.push(b.loop_id);
            gens.push(b.generation);
            seqs.push((b.first + i as u64) as i64);
            lines.push(line.as_str());
        }
    }
    let written: Result<Vec<Uuid>, sqlx::Error> = sqlx::query_scalar(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[]) \
                 AS t(loop_id, generation, seq, line)), \
         heads AS ( \
             SELECT loop_id, generation, max(seq) AS head FROM input GROUP BY loop_id, generation), \
         fence AS ( \
             UPDATE leases l SET head = h.head, version = nextval('changes') FROM heads h \
             WHERE l.loop_id = h.loop_id AND l.generation = h.generation \
             RETURNING l.loop_id, l.head), \
         ins AS ( \
             INSERT INTO events (loop_id, seq, line) \
             SELECT i.loop_id, i.seq, i.line FROM input i JOIN fence f ON f.loop_id = i.loop_id \
             RETURNING 1), \
         sizes AS ( \
             SELECT loop_id, sum(octet_length(line) + 22) AS bytes, \
                 string_agg(seq::text || ' ' || line, E'\\n' ORDER BY seq) AS rows \
             FROM input GROUP BY loop_id), \
         told AS ( \
             SELECT pg_notify($5, f.loop_id::text || ' ' || f.head::text || \
                 CASE WHEN s.bytes <= $6 THEN E'\\n' || s.rows ELSE '' END) \
             FROM fence f JOIN sizes s ON s.loop_id = f.loop_id) \
         SELECT f.loop_id FROM fence f WHERE (SELECT count(*) FROM ins) >= 0 \
             AND (SELECT count(*) FROM told) >= 0",
    )
    .bind(&ids)
    .bind(&gens)
    .bind(&seqs)
    .bind(&lines)
    .bind(CHANNEL)
    .bind(NOTIFY_ROWS_BYTES)
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
                let lines: Vec<&str> = b.lines.iter().map(String::as_str).collect();
                let outcome =
                    shared_log::append(pool, b.loop_id, b.generation, b.first, &lines).await;
                let _ = b.done.send(outcome);
            }
        }
    }
    batches.extend(later);
    if !batches.is_empty() {
        Box::pin(write(pool, batches)).await;
    }
}
