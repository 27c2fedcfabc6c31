//! Webhooks: turning a loop's events into deliveries, and sending them.
//!
//! The loop's log is the record. After this node writes events other than
//! deltas, the loop is marked dirty; one task reads what is new in each
//! dirty log (from the outbox's mark for that loop, so events written just
//! before a crash are found again at the next start) and puts a delivery
//! per matching webhook into the durable outbox, moving the mark on in the
//! same write. Another task ([`deliver`]) sends what is due.

mod deliver;
pub mod guard;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::Runtime;
use super::log::Entry;
use crate::store::webhooks::{Delivery, DeliveryStatus, EVENTS, Webhook, WebhookStore};
use crate::store::{LoopId, StoreError};

/// The most of an event's payload a delivery carries; a larger one is sent
/// with its ids only and `"truncated": true` (read it whole from `/turns`).
pub const MAX_DATA_BYTES: usize = 16 * 1024;
/// Deliveries put in the outbox per write while catching up on a long log.
const CHUNK: usize = 100;
/// A loop's mark is moved on without a delivery to write only once it is
/// this many events behind (what a restart reads again, at most).
const MARK_EVERY: u64 = 1000;

/// This node's part in webhooks: the outbox, what is dirty, and how far
/// each loop's log has been read.
pub struct Webhooks {
    pub store: Arc<WebhookStore>,
    /// This node's name in delivery claims.
    node: String,
    dirty: Mutex<HashSet<LoopId>>,
    wake: Notify,
    /// Wakes the sender (something new is due).
    send_wake: Notify,
    /// Loop → the last seq read here (never behind the outbox's mark).
    read_to: Mutex<HashMap<LoopId, u64>>,
    client: reqwest::Client,
    allow_private: bool,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Webhooks {
    pub fn new(
        store: Arc<WebhookStore>,
        node: String,
        allow_private: bool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            store,
            node,
            dirty: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            send_wake: Notify::new(),
            read_to: Mutex::new(HashMap::new()),
            client: guard::client(allow_private),
            allow_private,
            metrics,
        }
    }

    /// Whether targets on private addresses are allowed.
    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Says a loop's log has something new to look at.
    pub fn poke(&self, id: LoopId) {
        self.dirty.lock().expect("dirty poisoned").insert(id);
        self.wake.notify_one();
    }

    /// Wakes the sender (a webhook was made or removed, say).
    pub fn poke_sender(&self) {
        self.send_wake.notify_one();
    }
}

/// An event as a frame shows it: its name and its v1 payload.
fn parse_frame(frame: &[u8]) -> Option<(&str, &[u8])> {
    let rest = frame.strip_prefix(b"event: ")?;
    let nl = memchr::memchr(b'\n', rest)?;
    let name = std::str::from_utf8(&rest[..nl]).ok()?;
    let at = memchr::memmem::find(rest, b"\ndata: ")? + 7;
    let data = rest[at..].strip_suffix(b"\n\n")?;
    Some((name, data))
}

/// The body of one event's delivery (the same for every webhook).
pub fn body(loop_id: &str, seq: u64, name: &str, at: DateTime<Utc>, data: &[u8]) -> String {
    let mut data: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
    let turn_id = data.get("turn_id").cloned().unwrap_or(Value::Null);
    if serde_json::to_vec(&data).map_or(0, |v| v.len()) > MAX_DATA_BYTES {
        let keep = ["turn_id", "choice_id", "kind", "code"];
        let mut small = serde_json::Map::new();
        for key in keep {
            if let Some(v) = data.get(key) {
                small.insert(key.into(), v.clone());
            }
        }
        small.insert("truncated".into(), Value::Bool(true));
        data = Value::Object(small);
    }
    json!({
        "type": name,
        "loop_id": loop_id,
        "turn_id": turn_id,
        "seq": seq,
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    })
    .to_string()
}

/// The deliveries one entry makes for `hooks`; `None` when it is not an
/// event webhooks are told of.
fn deliveries_for(loop_id: &str, entry: &Entry, hooks: &[Webhook]) -> Option<Vec<Delivery>> {
    let (name, data) = parse_frame(&entry.frame)?;
    if !EVENTS.contains(&name) {
        return None;
    }
    let at = entry.at.unwrap_or_else(Utc::now);
    let wanting: Vec<&Webhook> = hooks
        .iter()
        .filter(|h| h.wants(loop_id, name, at))
        .collect();
    if wanting.is_empty() {
        return Some(Vec::new());
    }
    let body = body(loop_id, entry.seq, name, at, data);
    let msg_id = format!(
        "msg_{}_{}",
        loop_id.strip_prefix("loop_").unwrap_or(loop_id),
        entry.seq
    );
    Some(
        wanting
            .into_iter()
            .map(|h| Delivery {
                webhook_id: h.id.clone(),
                msg_id: msg_id.clone(),
                event: name.to_owned(),
                loop_id: loop_id.to_owned(),
                seq: entry.seq,
                body: body.clone(),
                created_at: at,
                status: DeliveryStatus::Pending,
                attempts: 0,
                next_at: Some(Utc::now()),
                last_attempt_at: None,
                response_code: None,
                error: None,
                claimed: None,
            })
            .collect(),
    )
}

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::io(std::path::Path::new("webhooks"), std::io::Error::other(e)))?
}

impl Runtime {
    /// Starts the two webhook tasks, and looks at every loop once (for
    /// events written before a crash and not yet in the outbox).
    pub fn start_webhooks(self: &Arc<Self>) {
        let hooks = self.shared.hooks.clone();
        for id in self.shared.loops.ids() {
            hooks.dirty.lock().expect("dirty poisoned").insert(id);
        }
        let (me, stopping) = (Arc::downgrade(self), self.shared.stopping.clone());
        let finder = hooks.clone();
        self.shared.tasks.spawn(async move {
            loop {
                let dirty: Vec<LoopId> =
                    finder.dirty.lock().expect("dirty poisoned").drain().collect();
                let Some(runtime) = me.upgrade() else { return };
                let mut found = 0;
                for id in dirty {
                    match runtime.find_deliveries(id).await {
                        Ok(n) => found += n,
                        Err(err) => {
                            tracing::warn!(loop_id = %id, error = %err, "could not look for webhook deliveries; trying again soon");
                            finder.dirty.lock().expect("dirty poisoned").insert(id);
                        }
                    }
                }
                drop(runtime);
                if found > 0 {
                    finder.send_wake.notify_one();
                }
                tokio::select! {
                    () = stopping.cancelled() => return,
                    () = finder.wake.notified() => {}
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        });
        deliver::start(hooks, &self.shared.tasks, self.shared.stopping.clone());
    }

    /// Reads what is new in a loop's log and puts its deliveries in the
    /// outbox; returns how many were taken.
    async fn find_deliveries(&self, id: LoopId) -> Result<usize, StoreError> {
        let hooks = &self.shared.hooks;
        let Some(record) = self.shared.loops.get(id) else {
            return Ok(0);
        };
        let log = self.log(id)?;
        let head = log.view(|v| v.next_seq - 1);
        let subscribed = hooks.store.list(&record.created_by);
        let read_to = hooks
            .read_to
            .lock()
            .expect("read_to poisoned")
            .get(&id)
            .copied();
        if subscribed.is_empty() {
            hooks
                .read_to
                .lock()
                .expect("read_to poisoned")
                .insert(id, head);
            return Ok(0);
        }
        // A mark past the log's head (a power loss took events the outbox
        // had seen) counts only up to the head.
        let durable = hooks.store.mark(id).unwrap_or(0).min(head);
        let from = read_to.unwrap_or(0).max(durable);
        if from >= head {
            return Ok(0);
        }
        let loop_id = id.to_string();
        let mut follower = log.follow(from);
        // `marked`: where the outbox's mark stands as this pass moves it.
        let (mut last, mut taken, mut marked) = (from, 0, durable);
        let mut found: Vec<Delivery> = Vec::new();
        while last < head {
            let batch = follower.next_batch().await?;
            if batch.is_empty() {
                break; // the log is gone
            }
            for entry in batch.iter().take_while(|e| e.seq <= head) {
                last = entry.seq;
                if let Some(new) = deliveries_for(&loop_id, entry, &subscribed) {
                    found.extend(new);
                }
            }
            if found.len() >= CHUNK {
                let store = hooks.store.clone();
                let chunk = std::mem::take(&mut found);
                taken += blocking(move || store.enqueue(id, last, chunk)).await?;
                marked = last;
            }
        }
        // Written when there is something to deliver, or the mark is far
        // behind: events no webhook wants cost no write.
        if !found.is_empty() || last.saturating_sub(marked) >= MARK_EVERY {
            let store = hooks.store.clone();
            taken += blocking(move || store.enqueue(id, last, found)).await?;
        }
        hooks
            .read_to
            .lock()
            .expect("read_to poisoned")
            .insert(id, last);
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_gives_its_name_and_payload() {
        let frame =
            b"event: requires_choice\nid: 7\ndata: {\"turn_id\":\"t\",\"choice_id\":\"c\"}\n\n";
        let (name, data) = parse_frame(frame).unwrap();
        assert_eq!(name, "requires_choice");
        assert_eq!(data, br#"{"turn_id":"t","choice_id":"c"}"#);
        assert!(parse_frame(b"garbage").is_none());
    }

    #[test]
    fn a_body_carries_the_event_and_a_huge_payload_only_its_ids() {
        let at = "2026-12-01T10:00:00.123Z".parse().unwrap();
        let b: Value = serde_json::from_str(&body(
            "loop_x",
            3,
            "done",
            at,
            br#"{"turn_id":"t","usage":{}}"#,
        ))
        .unwrap();
        assert_eq!(
            b,
            json!({"type":"done","loop_id":"loop_x","turn_id":"t","seq":3,
                   "timestamp":"2026-12-01T10:00:00.123Z","data":{"turn_id":"t","usage":{}}})
        );
        let huge = json!({"turn_id":"t","choice_id":"c","kind":"permission",
                          "payload":{"input":{"content":"x".repeat(MAX_DATA_BYTES)}}});
        let b: Value = serde_json::from_str(&body(
            "loop_x",
            4,
            "requires_choice",
            at,
            huge.to_string().as_bytes(),
        ))
        .unwrap();
        assert_eq!(
            b["data"],
            json!({"turn_id":"t","choice_id":"c","kind":"permission","truncated":true})
        );
    }
}
