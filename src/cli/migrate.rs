//! `loopd migrate`: copies a data directory's state into a Postgres
//! database, for moving one node onto a shared database. Nothing already in
//! the database is overwritten, so a copy that was interrupted is finished
//! by running it again (and a second run changes nothing).

use std::io::{BufRead, BufReader, Write};

use anyhow::Context;
use sqlx::types::Json;

use crate::store::{DataDir, LoopStore, Pg, shared_log};

/// Events per chunk (one row, one statement), and bytes of lines: at most,
/// though one larger event makes a chunk on its own.
const BATCH: usize = 1000;
const BATCH_BYTES: usize = 1 << 20;

/// What one run copied.
#[derive(Debug, Default)]
struct Copied {
    documents: usize,
    loops: usize,
    events: u64,
}

pub async fn run_migrate(dir: &DataDir, pg: &Pg, out: &mut impl Write) -> anyhow::Result<()> {
    // No server may write the directory meanwhile.
    let _serving = dir.lock_for_serving()?;
    let mut copied = Copied::default();
    for (name, path) in [
        ("users", dir.users()),
        ("api-tokens", dir.tokens()),
        ("sessions", dir.sessions()),
        ("webhooks", dir.webhooks()),
        ("webhook-outbox", dir.webhook_outbox()),
    ] {
        let Ok(bytes) = std::fs::read(&path) else {
            continue; // never made: nothing to copy
        };
        let body: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} cannot be parsed", path.display()))?;
        let done = sqlx::query(
            "INSERT INTO documents (name, body) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(Json(body))
        .execute(pg.pool())
        .await?;
        copied.documents += done.rows_affected() as usize;
    }
    let loops = {
        let path = dir.loops();
        tokio::task::spawn_blocking(move || LoopStore::open(path)).await??
    };
    for id in loops.ids() {
        let record = loops.get(id).context("a loop vanished while copying")?;
        let done = sqlx::query(
            "INSERT INTO loops (id, created_by, record) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.0)
        .bind(&record.created_by)
        .bind(Json(&record))
        .execute(pg.pool())
        .await?;
        copied.loops += done.rows_affected() as usize;
        let log = loops.loop_dir(id).join("events.jsonl");
        copied.events += copy_log(pg, id.0, &log).await?;
    }
    writeln!(
        out,
        "copied {} documents, {} loops and {} events into the database",
        copied.documents, copied.loops, copied.events
    )?;
    Ok(())
}

/// Copies one loop's events (those after the database's last one for the
/// loop, so a run cut short goes on where it stopped) and sets its head.
/// They go in as chunks of up to `BATCH` consecutive events.
async fn copy_log(pg: &Pg, loop_id: uuid::Uuid, path: &std::path::Path) -> anyhow::Result<u64> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let there = shared_log::last_seq(pg, loop_id).await?;
    let mut chunk = Pending::default();
    let (mut copied, mut head) = (0, there);
    // A line that is not an event: fine as the last (a crash mid-write
    // tore it, and it was never an event), damage anywhere else.
    let mut torn = None;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(at) = torn {
            anyhow::bail!("{} line {at}: not an event", path.display());
        }
        let Some(seq) = seq_of(&line) else {
            torn = Some(n + 1);
            continue;
        };
        if seq <= head {
            continue;
        }
        if seq != head + 1 {
            anyhow::bail!(
                "{} line {}: event {seq} follows event {head}",
                path.display(),
                n + 1
            );
        }
        head = seq;
        chunk.push(seq, &line);
        if chunk.count == BATCH || chunk.lines.len() >= BATCH_BYTES {
            copied += chunk.insert(pg, loop_id).await?;
        }
    }
    copied += chunk.insert(pg, loop_id).await?;
    sqlx::query(
        "INSERT INTO leases (loop_id, head) VALUES ($1, $2) \
         ON CONFLICT (loop_id) DO UPDATE SET head = greatest(leases.head, $2)",
    )
    .bind(loop_id)
    .bind(head)
    .execute(pg.pool())
    .await?;
    Ok(copied)
}

/// Consecutive events waiting to go in as one chunk.
#[derive(Default)]
struct Pending {
    first: i64,
    count: usize,
    lines: String,
}

impl Pending {
    fn push(&mut self, seq: i64, line: &str) {
        if self.count == 0 {
            self.first = seq;
        } else {
            self.lines.push('\n');
        }
        self.lines.push_str(line);
        self.count += 1;
    }

    /// Writes the chunk (if any) and starts a new one; how many events.
    async fn insert(&mut self, pg: &Pg, loop_id: uuid::Uuid) -> anyhow::Result<u64> {
        if self.count == 0 {
            return Ok(0);
        }
        let done = sqlx::query(
            "INSERT INTO event_chunks (loop_id, first_seq, last_seq, lines) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (loop_id, first_seq) DO NOTHING",
        )
        .bind(loop_id)
        .bind(self.first)
        .bind(self.first + self.count as i64 - 1)
        .bind(&self.lines)
        .execute(pg.pool())
        .await?;
        let copied = if done.rows_affected() == 1 {
            self.count as u64
        } else {
            0
        };
        *self = Self::default();
        Ok(copied)
    }
}

/// The seq of a stored line, if it is a whole event.
fn seq_of(line: &str) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value.get("seq")?.as_i64()
}
