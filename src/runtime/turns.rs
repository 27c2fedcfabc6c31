//! The conversation as turns (`GET /loops/{id}/turns`), derived from the
//! event log alone, so it reads the same after a restart.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::error::RuntimeError;
use super::events::{ChoiceKind, ChoiceSource, Event, Origin, StoredEvent, Usage};
use super::log::EventLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TurnStatus {
    Queued,
    Running,
    Done,
    Interrupted,
    Error,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallView {
    pub tool_use_id: String,
    pub tool: String,
    pub input_summary: Option<String>,
    /// **(beyond)** The tool's whole input.
    pub input: Option<Value>,
    /// `null` until the tool finished.
    pub ok: Option<bool>,
    /// **(beyond)** What it returned, at most 16 KiB (`truncated` when cut).
    pub output: Option<String>,
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChoiceView {
    pub choice_id: String,
    pub kind: ChoiceKind,
    pub payload: Value,
    /// `{"allow": bool}` or `{"answers": {…}}`; `null` if never answered.
    pub answer: Option<Value>,
    pub source: Option<ChoiceSource>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TurnError {
    pub code: String,
    pub message: String,
}

/// One user message (or agent-initiated burst) and everything done for it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Turn {
    pub turn_id: String,
    pub origin: Origin,
    pub status: TurnStatus,
    /// The user's message ("" for agent turns).
    pub content: String,
    pub assistant_text: String,
    pub thinking_text: String,
    pub tool_calls: Vec<ToolCallView>,
    pub choices: Vec<ChoiceView>,
    pub usage: Option<Usage>,
    pub error: Option<TurnError>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TurnPage {
    /// Oldest first.
    pub data: Vec<Turn>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
    /// **(beyond)** The seq of the last event these turns reflect: follow
    /// `GET /events?after=<last_seq>` to keep them current without a gap.
    pub last_seq: u64,
}

/// A page of turns holds at most about this many bytes of JSON (and always
/// at least one turn).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Which turns a page asks for.
#[derive(Debug, Default)]
pub struct TurnQuery {
    pub limit: usize,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The page of turns: the newest `limit` by default, the `limit` just
/// before `before` or just after `after`; always oldest first.
/// A page of turns, read in the pool of file reads (many pages at once take turns).
pub async fn page(log: Arc<EventLog>, query: TurnQuery) -> Result<TurnPage, RuntimeError> {
    super::log::in_read_pool(move || read_page(&log, &query)).await
}

fn read_page(log: &EventLog, query: &TurnQuery) -> Result<TurnPage, RuntimeError> {
    // The view, its length and its last seq from one moment: the scan reads
    // no further, so `last_seq` never passes an event it did not see.
    let (has_more, offset, ids, log_len, snapshot_seq) = log.view_with_len(|v, log_len| {
        let cursor = |id: &Option<String>| -> Result<Option<usize>, RuntimeError> {
            id.as_ref()
                .map(|id| {
                    v.turn(id).ok_or_else(|| {
                        RuntimeError::invalid(
                            "invalid_cursor",
                            format!("`{id}` is not a turn of this loop"),
                        )
                    })
                })
                .transpose()
        };
        let n = v.turns.len();
        let limit = query.limit.max(1);
        let (mut start, mut end, mut more) = match (cursor(&query.before)?, cursor(&query.after)?) {
            (Some(_), Some(_)) => {
                return Err(RuntimeError::invalid(
                    "invalid_cursor",
                    "give `before` or `after`, not both",
                ));
            }
            (Some(b), None) => (b.saturating_sub(limit), b, b > limit),
            (None, Some(a)) => (a + 1, (a + 1 + limit).min(n), a + 1 + limit < n),
            (None, None) => (n.saturating_sub(limit), n, n > limit),
        };
        // Bounded by bytes too, before anything is read: a turn spans about
        // from its start to the next one's in the log. The turns farthest
        // from where the page starts (the oldest going back, the newest
        // going forward) are left to the next page, which its cursor asks for.
        let span = |i: usize| {
            let next = v.turns.get(i + 1).map_or(log_len, |t| t.offset);
            next.saturating_sub(v.turns[i].offset) as usize
        };
        let forward = query.after.is_some();
        let mut bytes: usize = (start..end).map(span).sum();
        while end - start > 1 && bytes > MAX_PAGE_BYTES {
            if forward {
                end -= 1;
                bytes -= span(end);
            } else {
                bytes -= span(start);
                start += 1;
            }
            more = true;
        }
        let offset = v.turns[start..end].iter().map(|t| t.offset).min();
        let ids: Vec<(String, Origin)> = v.turns[start..end]
            .iter()
            .map(|t| (t.turn_id.clone(), t.origin))
            .collect();
        Ok((more, offset, ids, log_len, v.next_seq - 1))
    })?;
    let Some(offset) = offset else {
        return Ok(TurnPage {
            data: vec![],
            first_id: None,
            last_id: None,
            has_more,
            last_seq: snapshot_seq,
        });
    };
    let mut turns: Vec<Turn> = ids.iter().map(|(id, origin)| empty(id, *origin)).collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    // Folded as read: only the page's own turns are held, never the log,
    // and reading stops once every one of them has ended.
    // Read to the end of the snapshot: then it reflects every event up to
    // its last seq (other turns' events included, which are not this page's).
    let mut last_seq = snapshot_seq;
    let mut ended = vec![false; turns.len()];
    let mut open = turns.len();
    log.scan_from_offset_to(offset, log_len, |stored| {
        match stored.event.turn_id().and_then(|t| index.get(t)) {
            Some(&i) => {
                fold(&mut turns[i], &stored);
                if stored.event.is_terminal() && !ended[i] {
                    ended[i] = true;
                    open -= 1;
                }
            }
            // A newer turn this page does not hold begins: following on from
            // `last_seq` must bring it, so the page reflects no further.
            None if matches!(
                stored.event,
                crate::runtime::events::Event::UserMessage { .. }
            ) =>
            {
                last_seq = last_seq.min(stored.seq - 1);
            }
            None => {}
        }
        // Stopping early: the page reflects events up to this one.
        if open == 0 {
            last_seq = last_seq.min(stored.seq);
        }
        open > 0
    })?;
    Ok(TurnPage {
        first_id: turns.first().map(|t| t.turn_id.clone()),
        last_id: turns.last().map(|t| t.turn_id.clone()),
        has_more,
        data: turns,
        last_seq,
    })
}

fn empty(turn_id: &str, origin: Origin) -> Turn {
    Turn {
        turn_id: turn_id.to_owned(),
        origin,
        status: TurnStatus::Queued,
        content: String::new(),
        assistant_text: String::new(),
        thinking_text: String::new(),
        tool_calls: vec![],
        choices: vec![],
        usage: None,
        error: None,
        created_at: None,
        started_at: None,
        ended_at: None,
    }
}

fn fold(turn: &mut Turn, stored: &StoredEvent) {
    let at = stored.at;
    match &stored.event {
        Event::UserMessage {
            content,
            created_at,
            ..
        } => {
            turn.content = content.clone();
            turn.created_at = Some(*created_at);
        }
        Event::Queued { .. } => {}
        Event::Started { .. } => {
            turn.status = TurnStatus::Running;
            turn.started_at = at;
            turn.created_at = turn.created_at.or(at);
        }
        Event::AssistantDelta { text, .. } => turn.assistant_text.push_str(text),
        Event::ThinkingDelta { text, .. } => turn.thinking_text.push_str(text),
        Event::ToolCall {
            tool_use_id,
            tool,
            input_summary,
            input,
            ..
        } => turn.tool_calls.push(ToolCallView {
            tool_use_id: tool_use_id.clone(),
            tool: tool.clone(),
            input_summary: input_summary.clone(),
            input: input.clone(),
            ok: None,
            output: None,
            truncated: false,
        }),
        Event::ToolResult {
            tool_use_id,
            ok,
            output,
            truncated,
            ..
        } => {
            if let Some(call) = turn
                .tool_calls
                .iter_mut()
                .rev()
                .find(|c| &c.tool_use_id == tool_use_id)
            {
                call.ok = Some(*ok);
                call.output = output.clone();
                call.truncated = *truncated;
            }
        }
        Event::RequiresChoice {
            choice_id,
            kind,
            payload,
            ..
        } => turn.choices.push(ChoiceView {
            choice_id: choice_id.clone(),
            kind: *kind,
            payload: payload.clone(),
            answer: None,
            source: None,
        }),
        Event::ChoiceResolved {
            choice_id,
            source,
            answer,
            rule,
            ..
        } => {
            if let Some(choice) = turn.choices.iter_mut().find(|c| &c.choice_id == choice_id) {
                choice.answer = answer.clone();
                choice.source = Some(*source);
            } else if *source == ChoiceSource::Rule {
                // Answered by a standing rule: never asked, listed all the same.
                turn.choices.push(ChoiceView {
                    choice_id: choice_id.clone(),
                    kind: ChoiceKind::Permission,
                    payload: serde_json::json!({ "rule": rule }),
                    answer: answer.clone(),
                    source: Some(*source),
                });
            }
        }
        Event::Done { usage, .. } => {
            turn.status = TurnStatus::Done;
            turn.usage = usage.clone();
            turn.ended_at = at;
        }
        Event::Interrupted { .. } => {
            turn.status = TurnStatus::Interrupted;
            turn.ended_at = at;
        }
        Event::Error { code, message, .. } => {
            turn.status = TurnStatus::Error;
            turn.error = Some(TurnError {
                code: code.clone(),
                message: message.clone(),
            });
            turn.ended_at = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::log::fixtures::{done, said, started};

    fn query(limit: usize, before: Option<&str>, after: Option<&str>) -> TurnQuery {
        TurnQuery {
            limit,
            before: before.map(str::to_owned),
            after: after.map(str::to_owned),
        }
    }

    /// t2 was queued while t1 ran: its user_message (seq 3) comes before t1's done (4).
    fn interleaved() -> (tempfile::TempDir, std::sync::Arc<EventLog>) {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(dir.path().join("events.jsonl")).unwrap();
        log.append(&[
            said("t1", "one"),
            started("t1"),
            said("t2", "two"),
            done("t1"),
            started("t2"),
            done("t2"),
        ])
        .unwrap();
        (dir, log)
    }

    #[test]
    fn a_page_reflects_no_event_of_a_turn_it_does_not_hold() {
        let (_dir, log) = interleaved();
        let newest = read_page(&log, &query(1, None, None)).unwrap();
        assert_eq!(newest.data[0].turn_id, "t2");
        assert_eq!((newest.has_more, newest.last_seq), (true, 6));
        // The older page stops before t2's user_message: following on from
        // its last_seq brings t2 whole.
        let older = read_page(&log, &query(1, Some("t2"), None)).unwrap();
        assert_eq!(older.data[0].turn_id, "t1");
        assert_eq!(older.data[0].content, "one");
        assert!(
            matches!(older.data[0].status, TurnStatus::Done),
            "{:?}",
            older.data[0].status
        );
        assert_eq!(older.last_seq, 2);
        let forward = read_page(&log, &query(1, None, Some("t1"))).unwrap();
        assert_eq!(forward.data[0].turn_id, "t2");
        assert!(!forward.has_more);
    }

    #[test]
    fn a_page_is_bounded_by_bytes_and_the_cursor_brings_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(dir.path().join("events.jsonl")).unwrap();
        let big = "x".repeat(MAX_PAGE_BYTES / 3);
        for t in ["a", "b", "c", "d", "e"] {
            log.append(&[said(t, &big), started(t), done(t)]).unwrap();
        }
        let newest = read_page(&log, &query(100, None, None)).unwrap();
        let got: Vec<&str> = newest.data.iter().map(|t| t.turn_id.as_str()).collect();
        assert!(got.len() < 5 && got.last() == Some(&"e"), "{got:?}");
        assert!(newest.has_more);
        let older = read_page(&log, &query(100, Some(got[0]), None)).unwrap();
        let mut all: Vec<&str> = older.data.iter().map(|t| t.turn_id.as_str()).collect();
        all.extend(&got);
        assert!(all.ends_with(&["a", "b", "c", "d", "e"][5 - all.len()..]));
        let forward = read_page(&log, &query(100, None, Some("a"))).unwrap();
        assert_eq!(
            forward.data[0].turn_id, "b",
            "going forward keeps the oldest"
        );
        assert!(forward.has_more);
    }
}
