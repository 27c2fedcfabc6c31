//! Login throttles every node shares, on Postgres: a GCRA per key (one row:
//! its theoretical arrival time), checked and advanced in one statement, so
//! a guesser gains nothing by spreading attempts over the nodes. Keys are
//! stored hashed (with the cluster's secret), never as addresses or names.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::StoreError;
use super::pg::Pg;

/// Takes one attempt for `key` at `burst` per `period`; refused with how
/// long to wait when the key has used its burst.
pub async fn check(
    pg: &Pg,
    salt: &str,
    key: &str,
    burst: u32,
    period: Duration,
) -> Result<Result<(), Duration>, StoreError> {
    let key = hex::encode(Sha256::digest(format!("{salt}\0{key}")));
    let step = period.as_micros() as i64;
    let tolerance = step * i64::from(burst.saturating_sub(1));
    let taken: Option<i64> = sqlx::query_scalar(
        "INSERT INTO throttles (key, tat) VALUES ($1, now() + make_interval(secs => $2 / 1e6)) \
         ON CONFLICT (key) DO UPDATE \
             SET tat = greatest(throttles.tat, now()) + make_interval(secs => $2 / 1e6) \
             WHERE greatest(throttles.tat, now()) <= now() + make_interval(secs => $3 / 1e6) \
         RETURNING 1::bigint",
    )
    .bind(&key)
    .bind(step as f64)
    .bind(tolerance as f64)
    .fetch_optional(pg.pool())
    .await?;
    if taken.is_some() {
        return Ok(Ok(()));
    }
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM (tat - now()))::float8 - $2 / 1e6 FROM throttles WHERE key = $1",
    )
    .bind(&key)
    .bind(tolerance as f64)
    .fetch_optional(pg.pool())
    .await?
    .unwrap_or(0.0);
    Ok(Err(Duration::from_secs_f64(wait.max(0.001))))
}

/// Forgets keys whose attempts have all aged out (every minute).
pub async fn prune(pg: &Pg) -> Result<u64, StoreError> {
    Ok(sqlx::query("DELETE FROM throttles WHERE tat < now()")
        .execute(pg.pool())
        .await?
        .rows_affected())
}
