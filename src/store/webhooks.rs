//! Webhooks: the subscriptions (`webhooks.json`) and the durable outbox of
//! deliveries (`webhook-outbox.json`), each one document (a file, or a row
//! of the shared database). The outbox also keeps, per loop, the last seq
//! whose events were turned into deliveries, so events written just before
//! a crash are found again from the log.
//!
//! Everything here is bounded: subscriptions per user, deliveries waiting
//! per webhook, finished ones kept per webhook.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, LoopId, StoreError};
use crate::ids;

/// Webhooks one user may have.
pub const MAX_WEBHOOKS_PER_USER: usize = 10;
/// Deliveries waiting (not yet answered 2xx, not yet given up) per webhook;
/// past it, a new delivery is recorded as failed at once, never dropped.
pub const MAX_PENDING_PER_WEBHOOK: usize = 100;
/// Finished deliveries (delivered or failed) kept per webhook, newest.
pub const KEPT_FINISHED_PER_WEBHOOK: usize = 50;
/// The event names a webhook may ask for.
pub const EVENTS: [&str; 6] = [
    "started",
    "requires_choice",
    "choice_resolved",
    "done",
    "error",
    "interrupted",
];

/// One subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub user: String,
    pub url: String,
    pub events: Vec<String>,
    /// `None`: every loop of the user.
    pub loop_ids: Option<Vec<String>>,
    /// `whsec_` and base64 of 24 random bytes: the signing key.
    pub secret: String,
    pub created_at: DateTime<Utc>,
}

impl Webhook {
    /// Whether an event of `loop_id` named `name` at `at` goes to this hook.
    pub fn wants(&self, loop_id: &str, name: &str, at: DateTime<Utc>) -> bool {
        at >= self.created_at
            && self.events.iter().any(|e| e == name)
            && self
                .loop_ids
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|l| l == loop_id))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HooksFile {
    #[serde(default)]
    pub hooks: BTreeMap<String, Webhook>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

/// One event on its way to one webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub webhook_id: String,
    /// The `webhook-id` header: the same for every attempt, and for every
    /// webhook that gets this event (`msg_<loop>_<seq>`).
    pub msg_id: String,
    pub event: String,
    pub loop_id: String,
    pub seq: u64,
    /// The exact body that is signed and sent.
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    pub next_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub response_code: Option<u16>,
    pub error: Option<String>,
    /// The node sending it now, and until when that claim holds.
    #[serde(default)]
    pub claimed: Option<(String, DateTime<Utc>)>,
}

impl Delivery {
    /// Its key in the outbox.
    pub fn key(&self) -> String {
        format!("{}/{}", self.webhook_id, self.msg_id)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboxFile {
    /// `<webhook id>/<msg id>` → the delivery.
    #[serde(default)]
    pub deliveries: BTreeMap<String, Delivery>,
    /// Loop id → the last seq turned into deliveries.
    #[serde(default)]
    pub marks: BTreeMap<String, u64>,
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct Attempted {
    pub key: String,
    pub at: DateTime<Utc>,
    /// `Ok(code)` when the receiver answered; `Err(why)` when it could not
    /// be reached (or was refused before sending).
    pub outcome: Result<u16, String>,
    /// When to try again, if it failed and tries are left.
    pub retry_at: Option<DateTime<Utc>>,
}

pub struct WebhookStore {
    hooks: JsonStore<HooksFile>,
    outbox: JsonStore<OutboxFile>,
}

impl WebhookStore {
    pub fn open(hooks: Place, outbox: Place) -> Result<Self, StoreError> {
        Ok(Self {
            hooks: JsonStore::open_in(hooks)?,
            outbox: JsonStore::open_in(outbox)?,
        })
    }

    /// Adds a subscription (already checked) unless the user has as many as
    /// they may.
    pub fn create(
        &self,
        user: &str,
        url: String,
        events: Vec<String>,
        loop_ids: Option<Vec<String>>,
    ) -> Result<Webhook, StoreError> {
        let hook = Webhook {
            id: format!("wh_{}", ids::random_hex(8)),
            user: user.to_owned(),
            url,
            events,
            loop_ids,
            secret: new_secret(),
            created_at: ids::now(),
        };
        self.hooks.update(|f| {
            let held = f.hooks.values().filter(|h| h.user == user).count();
            if held >= MAX_WEBHOOKS_PER_USER {
                return Err(StoreError::Full(
                    "too_many_webhooks",
                    format!("you have {held} webhooks, as many as one user may; delete one first"),
                    super::RETRY_AFTER_FREEING,
                ));
            }
            f.hooks.insert(hook.id.clone(), hook.clone());
            Ok(())
        })?;
        Ok(hook)
    }

    /// The user's webhooks, oldest first.
    pub fn list(&self, user: &str) -> Vec<Webhook> {
        let mut mine: Vec<Webhook> = self
            .hooks
            .read()
            .hooks
            .values()
            .filter(|h| h.user == user)
            .cloned()
            .collect();
        mine.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        mine
    }

    pub fn get(&self, user: &str, id: &str) -> Result<Webhook, StoreError> {
        self.hooks
            .read_having(|f| !f.hooks.contains_key(id))
            .hooks
            .get(id)
            .filter(|h| h.user == user)
            .cloned()
            .ok_or_else(|| no_webhook(id))
    }

    /// A webhook by id, whoever's it is (for sending).
    pub fn hook(&self, id: &str) -> Option<Webhook> {
        self.hooks
            .read_having(|f| !f.hooks.contains_key(id))
            .hooks
            .get(id)
            .cloned()
    }

    /// Removes a subscription and whatever it still had to deliver.
    pub fn delete(&self, user: &str, id: &str) -> Result<(), StoreError> {
        self.hooks.update(|f| match f.hooks.get(id) {
            Some(h) if h.user == user => {
                f.hooks.remove(id);
                Ok(())
            }
            _ => Err(no_webhook(id)),
        })?;
        self.outbox.update(|f| {
            f.deliveries.retain(|_, d| d.webhook_id != id);
            Ok::<_, StoreError>(())
        })
    }

    /// Removes every webhook of a user (when the user is removed).
    pub fn delete_all(&self, user: &str) -> Result<(), StoreError> {
        for hook in self.list(user) {
            self.delete(user, &hook.id)?;
        }
        Ok(())
    }

    /// Whether the user has any webhook.
    pub fn has_any(&self, user: &str) -> bool {
        self.hooks.read().hooks.values().any(|h| h.user == user)
    }

    /// The last seq of a loop turned into deliveries.
    pub fn mark(&self, loop_id: LoopId) -> Option<u64> {
        self.outbox.read().marks.get(&loop_id.to_string()).copied()
    }

    /// Takes new deliveries in, and moves the loop's mark on to `mark`, in
    /// one write. A delivery already there (the same webhook and event,
    /// found again after a crash) is left as it is; one over
    /// [`MAX_PENDING_PER_WEBHOOK`] is recorded as failed (`outbox_full`).
    /// Returns how many were taken as pending.
    pub fn enqueue(
        &self,
        loop_id: LoopId,
        mark: u64,
        new: Vec<Delivery>,
    ) -> Result<usize, StoreError> {
        self.outbox.update(|f| {
            let mut taken = 0;
            let mut pending: BTreeMap<String, usize> = BTreeMap::new();
            for o in f.deliveries.values() {
                if o.status == DeliveryStatus::Pending {
                    *pending.entry(o.webhook_id.clone()).or_default() += 1;
                }
            }
            for mut d in new {
                let key = d.key();
                if f.deliveries.contains_key(&key) {
                    continue;
                }
                let waiting = pending.entry(d.webhook_id.clone()).or_default();
                if *waiting >= MAX_PENDING_PER_WEBHOOK {
                    tracing::warn!(webhook_id = %d.webhook_id, "webhook outbox full; a delivery is recorded as failed");
                    d.status = DeliveryStatus::Failed;
                    d.next_at = None;
                    d.error = Some(format!(
                        "outbox_full: {MAX_PENDING_PER_WEBHOOK} deliveries were already waiting for this webhook"
                    ));
                } else {
                    taken += 1;
                    *waiting += 1;
                }
                f.deliveries.insert(key, d);
            }
            let at = f.marks.entry(loop_id.to_string()).or_insert(0);
            *at = (*at).max(mark);
            prune(f);
            Ok(taken)
        })
    }

    /// Claims for `node` until `until` the pending deliveries due by `now`
    /// that no live claim holds, oldest first, at most `max`, and at most
    /// `per_hook` in flight per webhook (counting those `node` holds).
    pub fn claim_due(
        &self,
        node: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        max: usize,
        per_hook: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        // Most rounds find nothing due: answered from the cached copy.
        let due = |f: &OutboxFile| {
            f.deliveries.values().any(|d| {
                d.status == DeliveryStatus::Pending
                    && d.next_at.is_some_and(|at| at <= now)
                    && d.claimed.as_ref().is_none_or(|(_, till)| *till <= now)
            })
        };
        if !due(&self.outbox.read()) {
            return Ok(Vec::new());
        }
        self.outbox.update(|f| {
            let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
            for d in f.deliveries.values() {
                if d.claimed.as_ref().is_some_and(|(_, till)| *till > now) {
                    *in_flight.entry(d.webhook_id.clone()).or_default() += 1;
                }
            }
            let mut ready: Vec<&mut Delivery> = f
                .deliveries
                .values_mut()
                .filter(|d| {
                    d.status == DeliveryStatus::Pending
                        && d.next_at.is_some_and(|at| at <= now)
                        && d.claimed.as_ref().is_none_or(|(_, till)| *till <= now)
                })
                .collect();
            ready.sort_by_key(|d| (d.next_at, d.created_at, d.seq));
            let mut claimed = Vec::new();
            for d in ready {
                if claimed.len() >= max {
                    break;
                }
                let n = in_flight.entry(d.webhook_id.clone()).or_default();
                if *n >= per_hook {
                    continue;
                }
                *n += 1;
                d.claimed = Some((node.to_owned(), until));
                claimed.push(d.clone());
            }
            Ok(claimed)
        })
    }

    /// Lets go of the claims `node` holds (at its start: a claim left by
    /// the node's previous run is nobody's now).
    pub fn release_claims(&self, node: &str) -> Result<(), StoreError> {
        let held = |f: &OutboxFile| {
            f.deliveries
                .values()
                .any(|d| d.claimed.as_ref().is_some_and(|(n, _)| n == node))
        };
        if !held(&self.outbox.read()) {
            return Ok(());
        }
        self.outbox.update(|f| {
            for d in f.deliveries.values_mut() {
                if d.claimed.as_ref().is_some_and(|(n, _)| n == node) {
                    d.claimed = None;
                }
            }
            Ok(())
        })
    }

    /// Records attempts: a 2xx is delivered; otherwise retried at
    /// `retry_at`, or failed when there is none.
    pub fn record(&self, results: Vec<Attempted>) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        self.outbox.update(|f| {
            for r in results {
                // Deleted with its webhook meanwhile: nothing to record.
                let Some(d) = f.deliveries.get_mut(&r.key) else {
                    continue;
                };
                d.attempts += 1;
                d.last_attempt_at = Some(r.at);
                d.claimed = None;
                let ok = matches!(r.outcome, Ok(code) if (200..300).contains(&code));
                (d.response_code, d.error) = match r.outcome {
                    Ok(code) => (Some(code), None),
                    Err(why) => (None, Some(why)),
                };
                (d.status, d.next_at) = match (ok, r.retry_at) {
                    (true, _) => (DeliveryStatus::Delivered, None),
                    (false, Some(at)) => (DeliveryStatus::Pending, Some(at)),
                    (false, None) => (DeliveryStatus::Failed, None),
                };
            }
            prune(f);
            Ok::<_, StoreError>(())
        })
    }

    /// A webhook's deliveries, newest first.
    pub fn deliveries(&self, webhook_id: &str) -> Vec<Delivery> {
        let mut found: Vec<Delivery> = self
            .outbox
            .read()
            .deliveries
            .values()
            .filter(|d| d.webhook_id == webhook_id)
            .cloned()
            .collect();
        found.sort_by_key(|d| std::cmp::Reverse((d.created_at, d.seq)));
        found
    }

    /// How many deliveries wait to be sent or retried.
    pub fn pending(&self) -> usize {
        self.outbox
            .read()
            .deliveries
            .values()
            .filter(|d| d.status == DeliveryStatus::Pending)
            .count()
    }

    /// When the next pending delivery is due, if any.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.outbox
            .read()
            .deliveries
            .values()
            .filter(|d| d.status == DeliveryStatus::Pending)
            .filter_map(|d| match &d.claimed {
                Some((_, till)) => Some(d.next_at?.max(*till)),
                None => d.next_at,
            })
            .min()
    }
}

/// Keeps the newest [`KEPT_FINISHED_PER_WEBHOOK`] finished deliveries of
/// each webhook.
fn prune(f: &mut OutboxFile) {
    let mut finished: BTreeMap<String, Vec<(DateTime<Utc>, u64, String)>> = BTreeMap::new();
    for (key, d) in &f.deliveries {
        if d.status != DeliveryStatus::Pending {
            finished.entry(d.webhook_id.clone()).or_default().push((
                d.last_attempt_at.unwrap_or(d.created_at),
                d.seq,
                key.clone(),
            ));
        }
    }
    for (_, mut keys) in finished {
        if keys.len() <= KEPT_FINISHED_PER_WEBHOOK {
            continue;
        }
        keys.sort();
        for (_, _, key) in &keys[..keys.len() - KEPT_FINISHED_PER_WEBHOOK] {
            f.deliveries.remove(key);
        }
    }
}

fn no_webhook(id: &str) -> StoreError {
    StoreError::NotFound(
        "webhook_not_found",
        format!("no webhook `{id}` for this user"),
    )
}

/// A signing secret in the Standard Webhooks form.
fn new_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> WebhookStore {
        let place = |name: &str| Place::File {
            path: dir.join(name),
            lock: dir.join(".lock"),
        };
        WebhookStore::open(place("webhooks.json"), place("webhook-outbox.json")).unwrap()
    }

    fn delivery(hook: &str, seq: u64, now: DateTime<Utc>) -> Delivery {
        Delivery {
            webhook_id: hook.into(),
            msg_id: format!("msg_x_{seq}"),
            event: "done".into(),
            loop_id: "loop_x".into(),
            seq,
            body: "{}".into(),
            created_at: now,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_at: Some(now),
            last_attempt_at: None,
            response_code: None,
            error: None,
            claimed: None,
        }
    }

    #[test]
    fn subscriptions_are_per_user_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let hook = store
            .create("alice", "http://h/".into(), vec!["done".into()], None)
            .unwrap();
        assert!(hook.id.starts_with("wh_") && hook.secret.starts_with("whsec_"));
        assert!(store.get("bob", &hook.id).is_err());
        assert!(store.delete("bob", &hook.id).is_err());
        for _ in 1..MAX_WEBHOOKS_PER_USER {
            store
                .create("alice", "http://h/".into(), vec!["done".into()], None)
                .unwrap();
        }
        assert!(matches!(
            store.create("alice", "http://h/".into(), vec!["done".into()], None),
            Err(StoreError::Full("too_many_webhooks", ..))
        ));
        assert!(store.has_any("alice") && !store.has_any("bob"));
        assert_eq!(open(dir.path()).list("alice").len(), MAX_WEBHOOKS_PER_USER);
    }

    #[test]
    fn an_event_found_twice_is_one_delivery_and_marks_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = LoopId(uuid::Uuid::from_u128(1));
        let now = ids::now();
        assert_eq!(
            store
                .enqueue(id, 5, vec![delivery("wh_a", 5, now)])
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .enqueue(id, 3, vec![delivery("wh_a", 5, now)])
                .unwrap(),
            0
        );
        assert_eq!(store.mark(id), Some(5));
        assert_eq!(open(dir.path()).deliveries("wh_a").len(), 1);
    }

    #[test]
    fn claims_attempts_retries_and_a_full_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = LoopId(uuid::Uuid::from_u128(1));
        let now = ids::now();
        let later = now + chrono::Duration::seconds(60);
        let new: Vec<Delivery> = (1..=3).map(|s| delivery("wh_a", s, now)).collect();
        store.enqueue(id, 3, new).unwrap();
        // At most 2 in flight for the hook; a second claimer gets nothing.
        let got = store.claim_due("n1", now, later, 10, 2).unwrap();
        assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(store.claim_due("n2", now, later, 10, 2).unwrap().is_empty());
        let retry = now + chrono::Duration::seconds(1);
        store
            .record(vec![
                Attempted {
                    key: got[0].key(),
                    at: now,
                    outcome: Ok(204),
                    retry_at: None,
                },
                Attempted {
                    key: got[1].key(),
                    at: now,
                    outcome: Err("refused".into()),
                    retry_at: Some(retry),
                },
            ])
            .unwrap();
        let all = store.deliveries("wh_a");
        let by_seq = |s| all.iter().find(|d| d.seq == s).unwrap();
        assert_eq!(by_seq(1).status, DeliveryStatus::Delivered);
        assert_eq!(by_seq(1).response_code, Some(204));
        assert_eq!(
            (by_seq(2).status, by_seq(2).next_at),
            (DeliveryStatus::Pending, Some(retry))
        );
        assert_eq!(by_seq(2).error.as_deref(), Some("refused"));
        // The third now; the second once its retry is due.
        assert_eq!(store.claim_due("n1", now, later, 10, 2).unwrap()[0].seq, 3);
        assert_eq!(store.next_due(), Some(retry));
        // Out of tries: failed.
        store
            .record(vec![Attempted {
                key: by_seq(2).key(),
                at: retry,
                outcome: Ok(500),
                retry_at: None,
            }])
            .unwrap();
        assert_eq!(
            store
                .deliveries("wh_a")
                .iter()
                .find(|d| d.seq == 2)
                .unwrap()
                .status,
            DeliveryStatus::Failed
        );

        // A full outbox records the overflow as failed, never drops it.
        let many: Vec<Delivery> = (10..10 + MAX_PENDING_PER_WEBHOOK as u64 + 1)
            .map(|s| delivery("wh_b", s, now))
            .collect();
        assert_eq!(
            store.enqueue(id, 99, many).unwrap(),
            MAX_PENDING_PER_WEBHOOK
        );
        let b = store.deliveries("wh_b");
        let failed: Vec<_> = b
            .iter()
            .filter(|d| d.status == DeliveryStatus::Failed)
            .collect();
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0]
                .error
                .as_deref()
                .unwrap()
                .starts_with("outbox_full")
        );
    }

    #[test]
    fn finished_deliveries_are_kept_only_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = LoopId(uuid::Uuid::from_u128(1));
        let now = ids::now();
        let n = KEPT_FINISHED_PER_WEBHOOK as u64 + 10;
        let new: Vec<Delivery> = (1..=n).map(|s| delivery("wh_a", s, now)).collect();
        store.enqueue(id, n, new).unwrap();
        let results = store
            .deliveries("wh_a")
            .iter()
            .map(|d| Attempted {
                key: d.key(),
                at: now,
                outcome: Ok(200),
                retry_at: None,
            })
            .collect();
        store.record(results).unwrap();
        let kept = store.deliveries("wh_a");
        assert_eq!(kept.len(), KEPT_FINISHED_PER_WEBHOOK);
        assert_eq!(kept.last().unwrap().seq, 11, "the oldest went first");
    }
}
