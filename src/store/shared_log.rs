//! Loops' event logs and leases in the shared database.
//!
//! A loop's events are rows `(loop_id, seq, line)`, the line exactly as the
//! file backend writes it. Only the node holding a loop's lease writes
//! them, and every write names the lease's generation: the write updates
//! the lease row's `head` only where the generation still matches, so a
//! node that lost the lease (paused, partitioned, presumed dead) has its
//! writes refused, and the row lock orders a write against a takeover.
//! Each write is announced on `loopd_events` as `"<uuid> <last seq>"`.

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

/// Writes events `first..` (their lines) under `generation`; refused with
/// [`StoreError::Fenced`] once the lease has moved on. One round trip (the
/// group commit's way for a batch on its own).
pub async fn append(
    pool: &sqlx::PgPool,
    loop_id: Uuid,
    generation: i64,
    first: u64,
    lines: &[&str],
) -> Result<(), StoreError> {
    let seqs: Vec<i64> = (0..lines.len() as i64).map(|i| first as i64 + i).collect();
    let last = first as i64 + lines.len() as i64 - 1;
    let written: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "WITH fence AS ( \
             UPDATE leases SET head = $4, version = nextval('changes') \
             WHERE loop_id = $1 AND generation = $2 RETURNING loop_id), \
         ins AS ( \
             INSERT INTO events (loop_id, seq, line) \
             SELECT f.loop_id, t.seq, t.line FROM fence f, unnest($3::bigint[], $5::text[]) AS t(seq, line) \
             RETURNING 1) \
         SELECT count(*) FROM ins, (SELECT pg_notify($6, $1::text || ' ' || $4::text) FROM fence) n",
    )
    .bind(loop_id)
    .bind(generation)
    .bind(&seqs)
    .bind(last)
    .bind(lines)
    .bind(CHANNEL)
    .fetch_one(pool)
    .await;
    let written = match written {
        Ok(n) => n,
        // Those seqs are taken. If by these very lines, an earlier try of
        // this write committed although its answer was lost: it is done.
        // Anything else there means another writer: stop writing.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            let there: Vec<String> = sqlx::query_scalar(
                "SELECT line FROM events WHERE loop_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
            )
            .bind(loop_id)
            .bind(first as i64)
            .bind(last)
            .fetch_all(pool)
            .await?;
            return if there.iter().map(String::as_str).eq(lines.iter().copied()) {
                Ok(())
            } else {
                Err(StoreError::Fenced(format!("loop_{loop_id}")))
            };
        }
        Err(e) => return Err(e.into()),
    };
    if written != lines.len() as i64 {
        return Err(StoreError::Fenced(format!("loop_{loop_id}")));
    }
    Ok(())
}

/// The loop's last seq in the database (0 before any event).
pub async fn last_seq(pg: &Pg, loop_id: Uuid) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM events WHERE loop_id = $1")
            .bind(loop_id)
            .fetch_one(pg.pool())
            .await?,
    )
}

/// Up to `limit` events after `after`, in seq order.
pub async fn read_after(
    pg: &Pg,
    loop_id: Uuid,
    after: u64,
    limit: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT seq, line FROM events WHERE loop_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(loop_id)
    .bind(after as i64)
    .bind(limit)
    .fetch_all(pg.pool())
    .await?)
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
        "UPDATE leases SET owner = $2, generation = generation + 1, \
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
