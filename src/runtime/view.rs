//! `LogView`: what a loop's event log says right now, folded event by event.
//! Everything the API reports about a loop's runtime (busy, queue depth,
//! turn count, the current turn, the pending choice, the snapshot) comes
//! from here, so it is the same after a restart as before it.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::events::{ChoiceKind, Event, Origin};

#[derive(Debug, Clone)]
pub struct TurnIndex {
    pub turn_id: String,
    /// Seq and byte offset of the turn's first event.
    pub first_seq: u64,
    pub offset: u64,
    pub origin: Origin,
    pub ended: bool,
}

#[derive(Debug, Clone)]
pub struct PendingChoice {
    pub choice_id: String,
    pub kind: ChoiceKind,
    pub payload: Value,
    /// When it was asked.
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Current {
    /// Index into `turns`.
    pub turn: usize,
    pub started_at: DateTime<Utc>,
    pub text: String,
    pub pending: Option<PendingChoice>,
}

#[derive(Debug, Default)]
pub struct LogView {
    /// The seq the next event gets (the first event is 1).
    pub next_seq: u64,
    pub turns: Vec<TurnIndex>,
    by_id: HashMap<String, usize>,
    /// User turns that arrived and have not started (indices into `turns`).
    pub queue: VecDeque<usize>,
    pub current: Option<Current>,
    /// Every choice ever asked, with its kind (to check answers' shapes).
    pub choices: HashMap<String, (usize, ChoiceKind)>,
}

impl LogView {
    pub fn new() -> Self {
        Self {
            next_seq: 1,
            ..Self::default()
        }
    }

    pub fn turn(&self, turn_id: &str) -> Option<usize> {
        // Nearly every event belongs to the running turn: check it first.
        if let Some(cur) = &self.current
            && self.turns[cur.turn].turn_id == turn_id
        {
            return Some(cur.turn);
        }
        self.by_id.get(turn_id).copied()
    }

    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Turns that have begun (or are waiting) and have not ended.
    pub fn unfinished(&self) -> Vec<String> {
        self.turns
            .iter()
            .filter(|t| !t.ended)
            .map(|t| t.turn_id.clone())
            .collect()
    }

    /// Folds one event in; returns the index of the turn it belongs to.
    pub fn apply(
        &mut self,
        seq: u64,
        at: Option<DateTime<Utc>>,
        offset: u64,
        event: &Event,
    ) -> Option<usize> {
        self.next_seq = self.next_seq.max(seq + 1);
        let at = at.unwrap_or_else(Utc::now);
        match event {
            Event::UserMessage { turn_id, .. } => {
                let t = self.new_turn(turn_id, seq, offset, Origin::User);
                self.queue.push_back(t);
                Some(t)
            }
            Event::Started {
                turn_id, origin, ..
            } => {
                let t = match self.turn(turn_id) {
                    Some(t) => t,
                    None => self.new_turn(turn_id, seq, offset, origin.unwrap_or(Origin::Agent)),
                };
                self.queue.retain(|&q| q != t);
                self.current = Some(Current {
                    turn: t,
                    started_at: at,
                    text: String::new(),
                    pending: None,
                });
                Some(t)
            }
            Event::AssistantDelta { turn_id, text } => {
                let t = self.turn(turn_id);
                if let Some(cur) = self.current.as_mut().filter(|c| Some(c.turn) == t) {
                    cur.text.push_str(text);
                }
                t
            }
            Event::RequiresChoice {
                turn_id,
                choice_id,
                kind,
                payload,
            } => {
                let t = self.turn(turn_id);
                if let Some(t) = t {
                    self.choices.insert(choice_id.clone(), (t, *kind));
                }
                if let Some(cur) = self.current.as_mut().filter(|c| Some(c.turn) == t) {
                    cur.pending = Some(PendingChoice {
                        choice_id: choice_id.clone(),
                        kind: *kind,
                        payload: payload.clone(),
                        created_at: at,
                    });
                }
                t
            }
            Event::ChoiceResolved {
                turn_id, choice_id, ..
            } => {
                if let Some(cur) = self.current.as_mut()
                    && cur
                        .pending
                        .as_ref()
                        .is_some_and(|p| &p.choice_id == choice_id)
                {
                    cur.pending = None;
                }
                self.turn(turn_id)
            }
            Event::Done { turn_id, .. } | Event::Interrupted { turn_id } => self.end(turn_id),
            Event::Error { turn_id, .. } => turn_id.as_deref().and_then(|t| self.end(t)),
            Event::Queued { turn_id, .. }
            | Event::ThinkingDelta { turn_id, .. }
            | Event::ToolCall { turn_id, .. }
            | Event::ToolResult { turn_id, .. } => self.turn(turn_id),
        }
    }

    fn new_turn(&mut self, turn_id: &str, seq: u64, offset: u64, origin: Origin) -> usize {
        let t = self.turns.len();
        self.turns.push(TurnIndex {
            turn_id: turn_id.to_owned(),
            first_seq: seq,
            offset,
            origin,
            ended: false,
        });
        self.by_id.insert(turn_id.to_owned(), t);
        t
    }

    fn end(&mut self, turn_id: &str) -> Option<usize> {
        let t = self.turn(turn_id)?;
        self.turns[t].ended = true;
        self.queue.retain(|&q| q != t);
        if self.current.as_ref().is_some_and(|c| c.turn == t) {
            self.current = None;
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::events::ChoiceSource;

    fn at() -> Option<DateTime<Utc>> {
        Some(crate::ids::now())
    }

    #[test]
    fn follows_a_busy_loop_with_a_queue_and_a_choice() {
        let mut v = LogView::new();
        let events = [
            Event::UserMessage {
                turn_id: "a".into(),
                content: "1".into(),
                created_at: Utc::now(),
            },
            Event::Started {
                turn_id: "a".into(),
                cold_start: true,
                origin: None,
                history_lost: false,
            },
            Event::AssistantDelta {
                turn_id: "a".into(),
                text: "Hel".into(),
            },
            Event::UserMessage {
                turn_id: "b".into(),
                content: "2".into(),
                created_at: Utc::now(),
            },
            Event::Queued {
                turn_id: "b".into(),
                position: 1,
            },
            Event::AssistantDelta {
                turn_id: "a".into(),
                text: "lo".into(),
            },
            Event::RequiresChoice {
                turn_id: "a".into(),
                choice_id: "c1".into(),
                kind: ChoiceKind::Permission,
                payload: serde_json::json!({"tool": "Bash"}),
            },
        ];
        for (i, e) in events.iter().enumerate() {
            v.apply(i as u64 + 1, at(), 0, e);
        }
        assert_eq!(v.next_seq, 8);
        assert!(v.busy());
        assert_eq!(v.queue.len(), 1);
        let cur = v.current.as_ref().unwrap();
        assert_eq!(v.turns[cur.turn].turn_id, "a");
        assert_eq!(cur.text, "Hello");
        assert_eq!(cur.pending.as_ref().unwrap().choice_id, "c1");
        assert_eq!(v.unfinished(), ["a", "b"]);

        v.apply(
            8,
            at(),
            0,
            &Event::ChoiceResolved {
                turn_id: "a".into(),
                choice_id: "c1".into(),
                source: ChoiceSource::Api,
                answer: None,
                rule_id: None,
                rule: None,
            },
        );
        assert!(v.current.as_ref().unwrap().pending.is_none());
        v.apply(
            9,
            at(),
            0,
            &Event::Done {
                turn_id: "a".into(),
                usage: None,
            },
        );
        assert!(!v.busy());
        v.apply(
            10,
            at(),
            0,
            &Event::Started {
                turn_id: "b".into(),
                cold_start: false,
                origin: None,
                history_lost: false,
            },
        );
        assert!(v.queue.is_empty());
        v.apply(
            11,
            at(),
            0,
            &Event::Error {
                turn_id: Some("b".into()),
                code: "agent_crashed".into(),
                message: "x".into(),
            },
        );
        assert!(v.unfinished().is_empty());
        assert_eq!(v.turns.len(), 2);
        assert_eq!(v.choices["c1"], (0, ChoiceKind::Permission));
    }

    #[test]
    fn output_outside_a_turn_opens_an_agent_turn() {
        let mut v = LogView::new();
        v.apply(
            1,
            at(),
            0,
            &Event::Started {
                turn_id: "x".into(),
                cold_start: false,
                origin: Some(Origin::Agent),
                history_lost: false,
            },
        );
        assert_eq!(v.turns[0].origin, Origin::Agent);
        assert!(v.busy());
        v.apply(
            2,
            at(),
            0,
            &Event::Done {
                turn_id: "x".into(),
                usage: None,
            },
        );
        assert!(!v.busy() && v.turns[0].ended);
    }
}
