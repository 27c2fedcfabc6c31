//! Loop records in the shared database: what `meta.json` holds on files,
//! one row per loop, announced on `loopd_loops` when it changes so every
//! node's in-memory index follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;
use super::loops::{LoopId, LoopRecord};
use super::pg::{Pg, Watermark};

const CHANNEL: &str = "loopd_loops";

pub type Index = Arc<RwLock<HashMap<LoopId, LoopRecord>>>;

/// The version of each record as this node last wrote or read it: the
/// feed never puts back an older one (a poll that read a row just before
/// this node's own update committed). Changed only under the index's
/// write lock.
pub type Versions = Arc<Mutex<HashMap<LoopId, i64>>>;

/// Every loop record, and the highest version among them.
pub async fn load_all(pg: &Pg) -> Result<(HashMap<LoopId, LoopRecord>, i64), StoreError> {
    let rows: Vec<(Json<LoopRecord>, i64)> = sqlx::query_as("SELECT record, version FROM loops")
        .fetch_all(pg.pool())
        .await?;
    let highest = rows.iter().map(|(_, v)| *v).max().unwrap_or(0);
    Ok((
        rows.into_iter().map(|(Json(r), _)| (r.id, r)).collect(),
        highest,
    ))
}

/// Changes a record inside a transaction holding its row: `change` sees
/// the record as the database has it now, so what another node changed
/// meanwhile (an archive, a title, the agent's session) is never written
/// over. `None`: no such loop. With the record its version (as read, when
/// `change` changed nothing and nothing was written).
pub async fn update(
    pg: &Pg,
    id: LoopId,
    change: impl FnOnce(&mut LoopRecord) + Send,
) -> Result<Option<(LoopRecord, i64)>, StoreError> {
    let mut tx = pg.pool().begin().await?;
    let found: Option<(Json<LoopRecord>, i64)> =
        sqlx::query_as("SELECT record, version FROM loops WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((Json(mut record), version)) = found else {
        return Ok(None);
    };
    let before = record.clone();
    change(&mut record);
    if record == before {
        return Ok(Some((record, version)));
    }
    let version: i64 = sqlx::query_scalar(
        "WITH up AS (UPDATE loops SET record = $2, version = nextval('changes') WHERE id = $1 \
             RETURNING version), \
         told AS (SELECT pg_notify($3, $1::text) FROM up) \
         SELECT up.version FROM up, told",
    )
    .bind(id.0)
    .bind(Json(&record))
    .bind(CHANNEL)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((record, version)))
}

/// Moves a loop's last activity forward to `at` (never back), touching
/// nothing else of the record; when it moved, the record as it is now (it
/// may hold another node's change this node has not heard of yet) and its
/// version.
pub async fn touch(
    pg: &Pg,
    id: LoopId,
    at: DateTime<Utc>,
) -> Result<Option<(LoopRecord, i64)>, StoreError> {
    let at = Json(at);
    let moved: Option<(Json<LoopRecord>, i64)> = sqlx::query_as(
        "WITH up AS (UPDATE loops SET record = jsonb_set(record, '{last_active_at}', $2), \
             version = nextval('changes') \
             WHERE id = $1 AND (record->>'last_active_at')::timestamptz < ($2 #>> '{}')::timestamptz \
             RETURNING record, version), \
         told AS (SELECT pg_notify($3, $1::text) FROM up) \
         SELECT up.record, up.version FROM up, told",
    )
    .bind(id.0)
    .bind(at)
    .bind(CHANNEL)
    .fetch_optional(pg.pool())
    .await?;
    Ok(moved.map(|(Json(record), version)| (record, version)))
}

/// Writes a new record unless its creator already has `max_active` loops
/// that are not archived, counted across every node: creators are taken
/// one at a time (a transaction-scoped advisory lock on the name).
/// Returns how many they have when refused.
pub async fn insert_within(
    pg: &Pg,
    record: &LoopRecord,
    max_active: usize,
) -> Result<Result<i64, usize>, StoreError> {
    let mut tx = pg.pool().begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('loops/' || $1))")
        .bind(&record.created_by)
        .execute(&mut *tx)
        .await?;
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM loops WHERE created_by = $1 AND NOT (record->>'archived')::boolean",
    )
    .bind(&record.created_by)
    .fetch_one(&mut *tx)
    .await?;
    let active = usize::try_from(active).unwrap_or(usize::MAX);
    if active >= max_active {
        return Ok(Err(active));
    }
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO loops (id, created_by, record) VALUES ($1, $2, $3) RETURNING version",
    )
    .bind(record.id.0)
    .bind(&record.created_by)
    .bind(Json(record))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2::text)")
        .bind(CHANNEL)
        .bind(record.id.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Ok(version))
}

/// Removes a record that was never used (its workspace could not be made).
pub async fn delete(pg: &Pg, id: LoopId) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM loops WHERE id = $1")
        .bind(id.0)
        .execute(pg.pool())
        .await?;
    Ok(())
}

/// Keeps `index` following the database: a notified id is re-read at once,
/// and every poll re-reads what changed lately.
pub fn follow(pg: &Arc<Pg>, index: Index, versions: Versions, highest: i64) {
    let watermark = Arc::new(Mutex::new(Watermark::default()));
    watermark.lock().expect("watermark").saw(highest);
    // Weak: the database's list of watchers must not keep it alive.
    let pg2 = Arc::downgrade(pg);
    pg.watch(
        CHANNEL,
        Arc::new(move |payload: Option<String>| {
            let (pg, index, watermark) = (pg2.clone(), index.clone(), watermark.clone());
            let versions = versions.clone();
            Box::pin(async move {
                let Some(pg) = pg.upgrade() else { return };
                let read = match payload.as_deref().map(Uuid::parse_str) {
                    Some(Ok(id)) => changed_one(&pg, id).await,
                    Some(Err(_)) => return,
                    None => {
                        let floor = watermark.lock().expect("watermark").floor();
                        changed_since(&pg, floor).await
                    }
                };
                match read {
                    Ok(rows) => {
                        let highest = rows.iter().map(|(_, v)| *v).max();
                        let mut index = index.write().expect("loop index poisoned");
                        let mut versions = versions.lock().expect("versions poisoned");
                        for (Json(mut record), version) in rows {
                            if versions
                                .get(&record.id)
                                .is_some_and(|known| *known >= version)
                            {
                                continue; // this node has it, or newer
                            }
                            versions.insert(record.id, version);
                            // Activity this node noted but has not written yet stays.
                            if let Some(known) = index.get(&record.id) {
                                record.last_active_at =
                                    record.last_active_at.max(known.last_active_at);
                            }
                            index.insert(record.id, record);
                        }
                        drop(versions);
                        drop(index);
                        if let Some(h) = highest {
                            watermark.lock().expect("watermark").saw(h);
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "could not read changed loops"),
                }
            })
        }),
    );
}

type Row = (Json<LoopRecord>, i64);

async fn changed_one(pg: &Pg, id: Uuid) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as("SELECT record, version FROM loops WHERE id = $1")
        .bind(id)
        .fetch_all(pg.pool())
        .await
}

async fn changed_since(pg: &Pg, floor: i64) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as("SELECT record, version FROM loops WHERE version > $1")
        .bind(floor)
        .fetch_all(pg.pool())
        .await
}
