//! Loops' event logs and leases in the shared database.
//!
//! A loop's events are chunks, one row per append `(loop_id, first_seq,
//! last_seq, lines)`: the lines exactly as the file backend writes them,
//! joined by newlines. Only the node holding a loop's lease writes
//! them, and every write names the lease's generation: the write updates
//! the lease row's `head` only where the generation still matches, so a
//! node that lost the lease (paused, partitioned, presumed dead) has its
//! writes refused, and the row lock orders a write against a takeover.
//! Each write is announced on `loopd_events` as `"<uuid> <last seq>"`,
//! followed for a small append by `"\n<first seq>\n<lines>"`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use super::pg::Pg;

pub const CHANNEL: &str = "loopd_events";

/// A lease as the database has it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Lease {
    pub loop_id: Uuid,
    pub owner: Option<String>,
    pub generation: i64,
    pub expires_at: Option<DateTime<Utc>>,
    /// The loop's last seq.
    pub head: i64,
}

/// What a claim found.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub generation: i64,
    pub head: i64,
    /// Who held it before, if anyone (this node itself after a restart).
    pub previous: Option<String>,
}

/// One append: events `first..=last` (`count` of them), their lines
/// joined by newlines, as one row.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub first: u64,
    pub count: usize,
    pub lines: &'a str,
}

impl Chunk<'_> {
    pub fn last(&self) -> i64 {
        self.first as i64 + self.count as i64 - 1
    }
}

/// Writes `chunk` under `generation`; refused with [`StoreError::Fenced`]
/// once the lease has moved on. One round trip (the group commit's way for
/// a batch on its own, and for telling a lost answer from a conflict).
pub async fn append(
    pool: &sqlx::PgPool,
    loop_id: Uuid,
    generation: i64,
    chunk: Chunk<'_>,
) -> Result<(), StoreError> {
    if chunk.count == 0 {
        return Ok(());
    }
    let written: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "WITH fence AS ( \
             UPDATE leases SET head = $4, version = nextval('changes') \
             WHERE loop_id = $1 AND generation = $2 RETURNING loop_id), \
         ins AS ( \
             INSERT INTO event_chunks (loop_id, first_seq, last_seq, lines) \
             SELECT f.loop_id, $3, $4, $5 FROM fence f RETURNING 1) \
         SELECT count(*) FROM ins, (SELECT pg_notify($6, $1::text || ' ' || $4::text) FROM fence) n",
    )
    .bind(loop_id)
    .bind(generation)
    .bind(chunk.first as i64)
    .bind(chunk.last())
    .bind(chunk.lines)
    .bind(CHANNEL)
    .fetch_one(pool)
    .await;
    let written = match written {
        Ok(n) => n,
        // Those seqs are taken. If by these very lines, an earlier try of
        // this write committed although its answer was lost: it is done.
        // Anything else there means another writer: stop writing.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            let there: Option<(i64, String)> = sqlx::query_as(
                "SELECT last_seq, lines FROM event_chunks WHERE loop_id = $1 AND first_seq = $2",
            )
            .bind(loop_id)
            .bind(chunk.first as i64)
            .fetch_optional(pool)
            .await?;
            return match there {
                Some((last, lines)) if last == chunk.last() && lines == chunk.lines => Ok(()),
                _ => Err(StoreError::Fenced(format!("loop_{loop_id}"))),
            };
        }
        Err(e) => return Err(e.into()),
    };
    if written != 1 {
        return Err(StoreError::Fenced(format!("loop_{loop_id}")));
    }
    Ok(())
}

/// The loop's last seq in the database (0 before any event).
pub async fn last_seq(pg: &Pg, loop_id: Uuid) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce((SELECT last_seq FROM event_chunks WHERE loop_id = $1 \
         ORDER BY first_seq DESC LIMIT 1), 0)",
    )
    .bind(loop_id)
    .fetch_one(pg.pool())
    .await?)
}

/// The events after `after` in seq order, from at most `chunks` appends
/// and about `bytes` of lines (one chunk at least), and whether more may
/// follow.
pub async fn read_after(
    pg: &Pg,
    loop_id: Uuid,
    after: u64,
    chunks: i64,
    bytes: i64,
) -> Result<(Vec<(i64, String)>, bool), StoreError> {
    // From the chunk holding `after + 1` on (the primary key's order),
    // none that ends at or before `after`, while the bytes before a chunk
    // stay under `bytes`.
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT first_seq, lines FROM ( \
             SELECT first_seq, lines, \
                 sum(octet_length(lines)) OVER (ORDER BY first_seq) - octet_length(lines) AS before \
             FROM event_chunks WHERE loop_id = $1 AND last_seq >= $2 AND first_seq >= \
                 coalesce((SELECT max(first_seq) FROM event_chunks \
                     WHERE loop_id = $1 AND first_seq <= $2), 0) \
             ORDER BY first_seq LIMIT $3) c \
         WHERE before < $4 ORDER BY first_seq",
    )
    .bind(loop_id)
    .bind(after as i64 + 1)
    .bind(chunks)
    .bind(bytes)
    .fetch_all(pg.pool())
    .await?;
    let read: usize = rows.iter().map(|(_, lines)| lines.len()).sum();
    let more = rows.len() as i64 == chunks || read as i64 >= bytes;
    let mut events = Vec::new();
    for (first, lines) in rows {
        events.extend(
            numbered(first, &lines)
                .filter(|(seq, _)| *seq > after as i64)
                .map(|(seq, line)| (seq, line.to_owned())),
        );
    }
    Ok((events, more))
}

/// A chunk's lines with their seqs.
pub fn numbered(first: i64, lines: &str) -> impl Iterator<Item = (i64, &str)> {
    lines
        .split('\n')
        .enumerate()
        .map(move |(i, line)| (first + i as i64, line))
}

/// Takes a loop's lease for `me` if nobody holds it, its holder let it
/// expire, or `me` held it (a restarted node): the generation goes up, so
/// whatever held it before can no longer write. `None` if another node
/// holds it.
pub async fn claim(
    pg: &Pg,
    loop_id: Uuid,
    me: &str,
    ttl: Duration,
) -> Result<Option<Claimed>, StoreError> {
    let mut tx = pg.pool().begin().await?;
    sqlx::query("INSERT INTO leases (loop_id) VALUES ($1) ON CONFLICT (loop_id) DO NOTHING")
        .bind(loop_id)
        .execute(&mut *tx)
        .await?;
    let (owner, expired): (Option<String>, bool) = sqlx::query_as(
        "SELECT owner, coalesce(expires_at < now(), true) FROM leases WHERE loop_id = $1 FOR UPDATE",
    )
    .bind(loop_id)
    .fetch_one(&mut *tx)
    .await?;
    if owner.as_deref().is_some_and(|o| o != me) && !expired {
        return Ok(None);
    }
    let (generation, head): (i64, i64) = sqlx::query_as(
        "UPDATE leases SET owner = $2, home = $2, generation = generation + 1, \
         expires_at = now() + make_interval(secs => $3), version = nextval('changes') \
         WHERE loop_id = $1 RETURNING generation, head",
    )
    .bind(loop_id)
    .bind(me)
    .bind(ttl.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Claimed {
        generation,
        head,
        previous: owner,
    }))
}

/// Renews the leases `me` holds (loop, generation); returns those still held.
pub async fn renew(
    pg: &Pg,
    me: &str,
    held: &[(Uuid, i64)],
    ttl: Duration,
) -> Result<Vec<Uuid>, StoreError> {
    let (ids, gens): (Vec<Uuid>, Vec<i64>) = held.iter().copied().unzip();
    Ok(sqlx::query_scalar(
        "UPDATE leases l SET expires_at = now() + make_interval(secs => $4) \
         FROM unnest($2::uuid[], $3::bigint[]) AS h(loop_id, generation) \
         WHERE l.loop_id = h.loop_id AND l.generation = h.generation AND l.owner = $1 \
         RETURNING l.loop_id",
    )
    .bind(me)
    .bind(&ids)
    .bind(&gens)
    .bind(ttl.as_secs_f64())
    .fetch_all(pg.pool())
    .await?)
}

/// Lets a lease go (the loop has nothing running here any more). The
/// generation moves on, so nothing more is written under the old one.
pub async fn release(pg: &Pg, loop_id: Uuid, generation: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE leases SET owner = NULL, expires_at = NULL, generation = generation + 1, \
         version = nextval('changes') WHERE loop_id = $1 AND generation = $2",
    )
    .bind(loop_id)
    .bind(generation)
    .execute(pg.pool())
    .await?;
    Ok(())
}

/// The node that last ran the loop's agent (where its workspace is), if
/// it is not `me`, reported itself within `alive`, and has room for an
/// agent (by its last report; the caller passes over nodes it found
/// unreachable).
pub async fn live_home(
    pg: &Pg,
    loop_id: Uuid,
    me: &str,
    alive: Duration,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT l.home FROM leases l JOIN nodes n ON n.url = l.home \
         WHERE l.loop_id = $1 AND l.home <> $2 \
         AND n.seen_at > now() - make_interval(secs => $3) AND n.owned < n.max_agents",
    )
    .bind(loop_id)
    .bind(me)
    .bind(alive.as_secs_f64())
    .fetch_optional(pg.pool())
    .await?)
}

/// Undoes a claim that could not be used (this node's copy could not be
/// brought up to date): the lease goes back to whoever held it before,
/// expired, so a takeover is tried again and its next holder settles the
/// loop as that holder left it. The generation stays moved on.
pub async fn give_back(
    pg: &Pg,
    loop_id: Uuid,
    generation: i64,
    previous: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE leases SET owner = $3, \
         expires_at = CASE WHEN $3::text IS NULL THEN NULL ELSE now() END, \
         version = nextval('changes') WHERE loop_id = $1 AND generation = $2",
    )
    .bind(loop_id)
    .bind(generation)
    .bind(previous)
    .execute(pg.pool())
    .await?;
    Ok(())
}

/// One loop's lease, if it ever had one.
pub async fn lease(pg: &Pg, loop_id: Uuid) -> Result<Option<Lease>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT loop_id, owner, generation, expires_at, head FROM leases WHERE loop_id = $1",
    )
    .bind(loop_id)
    .fetch_optional(pg.pool())
    .await?)
}

/// A lease with the version of its last change.
#[derive(sqlx::FromRow)]
struct Versioned {
    #[sqlx(flatten)]
    lease: Lease,
    version: i64,
}

/// Leases changed since `floor` (a version), with the highest version.
pub async fn changed_since(pg: &Pg, floor: i64) -> Result<(Vec<Lease>, i64), StoreError> {
    let rows: Vec<Versioned> = sqlx::query_as(
        "SELECT loop_id, owner, generation, expires_at, head, version FROM leases WHERE version > $1",
    )
    .bind(floor)
    .fetch_all(pg.pool())
    .await?;
    let highest = rows.iter().map(|r| r.version).max().unwrap_or(floor);
    Ok((rows.into_iter().map(|r| r.lease).collect(), highest))
}

/// Leases whose holder stopped renewing them, and how long until the next
/// lease held by another node than `me` runs out (by the database's clock,
/// so the nodes' clocks need not agree).
pub async fn expired(pg: &Pg, me: &str) -> Result<(Vec<Lease>, Option<Duration>), StoreError> {
    let expired = sqlx::query_as(
        "SELECT loop_id, owner, generation, expires_at, head FROM leases \
         WHERE owner IS NOT NULL AND expires_at < now()",
    )
    .fetch_all(pg.pool())
    .await?;
    let next: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(expires_at) - now())::float8 FROM leases \
         WHERE owner IS NOT NULL AND owner <> $1 AND expires_at >= now()",
    )
    .bind(me)
    .fetch_one(pg.pool())
    .await?;
    Ok((
        expired,
        next.map(|secs| Duration::from_secs_f64(secs.max(0.0))),
    ))
}
