//! Sending what is due: claims deliveries from the outbox (so two nodes
//! never send one at once), posts each signed as Standard Webhooks says,
//! and records how it went. Sends run side by side, a few per webhook at
//! most, each with a timeout: a slow or dead receiver holds up neither a
//! turn nor another receiver.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Webhooks, blocking};
use crate::store::webhooks::{Attempted, Delivery};

/// Sends in flight at once, in all.
const IN_FLIGHT: usize = 32;
/// Sends in flight at once to one webhook.
const PER_HOOK: usize = 4;
/// How long a claim keeps other nodes off a delivery: well over a send's
/// timeout, so only a node that died mid-send leaves it to another.
const CLAIM: Duration = Duration::from_secs(60);
/// The waits before each retry; after the last, the delivery has failed.
/// They add up to 31.7 hours.
pub const RETRIES: [u64; 12] = [
    1, 5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800, 28800,
];

/// When to try a delivery again after its `attempts`-th attempt failed.
pub fn retry_after(attempts: u32) -> Option<Duration> {
    RETRIES
        .get(attempts.saturating_sub(1) as usize)
        .map(|s| Duration::from_secs(*s))
}

pub fn start(hooks: Arc<Webhooks>, tasks: &TaskTracker, stopping: CancellationToken) {
    tasks.spawn(async move {
        let (store, node) = (hooks.store.clone(), hooks.node.clone());
        if let Err(err) = blocking(move || store.release_claims(&node)).await {
            tracing::warn!(error = %err, "could not release this node's old webhook claims");
        }
        let mut sending: JoinSet<Attempted> = JoinSet::new();
        loop {
            let room = IN_FLIGHT - sending.len();
            let next_due = match claim(&hooks, room).await {
                Ok((claimed, next_due)) => {
                    for d in claimed {
                        let hooks = hooks.clone();
                        sending.spawn(async move { send(&hooks, d).await });
                    }
                    next_due
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not read the webhook outbox");
                    None
                }
            };
            let next = next_due.map_or(Duration::from_secs(5), |at| {
                (at - Utc::now()).to_std().unwrap_or_default().min(Duration::from_secs(5))
            });
            tokio::select! {
                () = stopping.cancelled() => break,
                () = hooks.send_wake.notified() => {}
                () = tokio::time::sleep(next.max(Duration::from_millis(20))) => {}
                Some(done) = sending.join_next(), if !sending.is_empty() => {
                    // Everything that finished meanwhile, in one write.
                    let mut results: Vec<Attempted> = done.into_iter().collect();
                    while let Some(done) = sending.try_join_next() {
                        results.extend(done);
                    }
                    let store = hooks.store.clone();
                    if let Err(err) = blocking(move || store.record(results)).await {
                        tracing::warn!(error = %err, "could not record webhook attempts; they will be retried when their claim runs out");
                    }
                }
            }
        }
        // At shutdown a send is cut short: its claim runs out and it is
        // retried (at least once, never lost).
        sending.abort_all();
    });
}

/// Claims up to `room` due deliveries, and says when the next one after
/// them is due: both off the async threads (each reads the whole outbox).
async fn claim(
    hooks: &Arc<Webhooks>,
    room: usize,
) -> Result<(Vec<Delivery>, Option<chrono::DateTime<Utc>>), crate::store::StoreError> {
    let (store, node) = (hooks.store.clone(), hooks.node.clone());
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(CLAIM).expect("a claim fits");
    blocking(move || {
        let claimed = if room > 0 {
            store.claim_due(&node, now, until, room, PER_HOOK)?
        } else {
            Vec::new()
        };
        Ok((claimed, store.next_due()))
    })
    .await
}

/// One attempt: signed, posted, and what came of it.
async fn send(hooks: &Webhooks, d: Delivery) -> Attempted {
    let at = Utc::now();
    let outcome = attempt(hooks, &d, at.timestamp()).await;
    let ok = matches!(outcome, Ok(code) if (200..300).contains(&code));
    let retry_at = (!ok)
        .then(|| retry_after(d.attempts + 1))
        .flatten()
        .map(|wait| at + chrono::Duration::from_std(wait).expect("a retry fits"));
    hooks.metrics.delivery(match &outcome {
        Ok(_) if ok => "delivered",
        Ok(_) => "refused",
        Err(_) => "unreachable",
    });
    match &outcome {
        Ok(code) if ok => {
            tracing::debug!(webhook_id = %d.webhook_id, msg_id = %d.msg_id, code, "webhook delivered")
        }
        Ok(code) => {
            tracing::info!(webhook_id = %d.webhook_id, msg_id = %d.msg_id, code, "webhook refused by its receiver")
        }
        Err(why) => {
            tracing::info!(webhook_id = %d.webhook_id, msg_id = %d.msg_id, error = %why, "webhook not delivered")
        }
    }
    Attempted {
        key: d.key(),
        at,
        outcome,
        retry_at,
    }
}

async fn attempt(hooks: &Webhooks, d: &Delivery, timestamp: i64) -> Result<u16, String> {
    let hook = match hooks.store.hook(&d.webhook_id) {
        Some(hook) => hook,
        None => return Err("the webhook was deleted".into()),
    };
    let url = reqwest::Url::parse(&hook.url).map_err(|e| e.to_string())?;
    // A literal address never reaches the resolver: checked here.
    if let Some(ip) = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    } && let Some(why) = super::guard::refuse(ip, hooks.allow_private())
    {
        return Err(why);
    }
    let signer = standardwebhooks::Webhook::new(&hook.secret).map_err(|e| e.to_string())?;
    let signature = signer
        .sign(&d.msg_id, timestamp, d.body.as_bytes())
        .map_err(|e| e.to_string())?;
    let response = hooks
        .client
        .post(url)
        .header("content-type", "application/json")
        .header(standardwebhooks::HEADER_WEBHOOK_ID, &d.msg_id)
        .header(
            standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
            timestamp.to_string(),
        )
        .header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature)
        .body(d.body.clone())
        .send()
        .await
        .map_err(|e| describe(&e))?;
    Ok(response.status().as_u16())
}

/// A send's failure, said without the URL (it may hold credentials).
fn describe(e: &reqwest::Error) -> String {
    let mut why = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "the request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_come_within_seconds_then_grow_for_over_a_day() {
        assert_eq!(retry_after(1), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(2), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(3), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(RETRIES.len() as u32 + 1), None);
        let total: u64 = RETRIES.iter().sum();
        assert!(total >= 24 * 3600, "{total}");
        assert!(RETRIES.windows(2).all(|w| w[0] <= w[1]));
    }
}
