//! The v1 event vocabulary (what streams carry and `events.jsonl` keeps),
//! and the one serialization that yields both the log line and the SSE frame.

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use crate::agent::Usage;
use crate::ids;

/// `turn_<16 hex>`.
pub fn new_turn_id() -> String {
    format!("turn_{}", ids::random_hex(8))
}

/// `choice_<16 hex>`.
pub fn new_choice_id() -> String {
    format!("choice_{}", ids::random_hex(8))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    User,
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChoiceKind {
    Permission,
    Question,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChoiceSource {
    Api,
    Web,
    /// **(beyond)** A standing rule answered it (`rule_id` says which);
    /// no `requires_choice` came first.
    Rule,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A turn's id (`turn_<16 hex>`), shared rather than copied: every event
/// of a turn carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TurnId(std::sync::Arc<str>);

impl TurnId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TurnId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for TurnId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TurnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for TurnId {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl From<&str> for TurnId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<TurnId> for String {
    fn from(t: TurnId) -> Self {
        t.0.to_string()
    }
}

impl PartialEq<str> for TurnId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TurnId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for TurnId {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl Serialize for TurnId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TurnId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self(s.as_ref().into()))
    }
}

/// One event of a loop. Serialized as `{"event": name, "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// A message arrived (not on the sender's own `POST /messages` stream).
    UserMessage {
        #[schema(value_type = String)]
        turn_id: TurnId,
        content: String,
        created_at: DateTime<Utc>,
    },
    /// The loop was busy; `position` 1 is next.
    Queued {
        #[schema(value_type = String)]
        turn_id: TurnId,
        position: usize,
    },
    Started {
        #[schema(value_type = String)]
        turn_id: TurnId,
        /// The agent process had to be started for this turn.
        cold_start: bool,
        /// `agent`: output the agent produced while no turn ran.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<Origin>,
        /// An earlier conversation could not be resumed; a fresh one started.
        #[serde(default, skip_serializing_if = "is_false")]
        history_lost: bool,
    },
    AssistantDelta {
        #[schema(value_type = String)]
        turn_id: TurnId,
        text: String,
    },
    ThinkingDelta {
        #[schema(value_type = String)]
        turn_id: TurnId,
        text: String,
    },
    ToolCall {
        #[schema(value_type = String)]
        turn_id: TurnId,
        tool_use_id: String,
        tool: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_summary: Option<String>,
        /// **(beyond)** The tool's whole input (as a permission's payload has it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<Value>,
    },
    ToolResult {
        #[schema(value_type = String)]
        turn_id: TurnId,
        tool_use_id: String,
        ok: bool,
        /// **(beyond)** What the tool returned, as text, at most 16 KiB.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        /// **(beyond)** `output` was cut at 16 KiB.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    RequiresChoice {
        #[schema(value_type = String)]
        turn_id: TurnId,
        choice_id: String,
        kind: ChoiceKind,
        payload: Value,
    },
    ChoiceResolved {
        #[schema(value_type = String)]
        turn_id: TurnId,
        choice_id: String,
        source: ChoiceSource,
        /// **(beyond)** What was answered: `{"allow": bool}` or `{"answers": {…}}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<Value>,
        /// **(beyond)** With `"source": "rule"`: the standing rule's id…
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule_id: Option<String>,
        /// …and the rule, in Claude Code's syntax (`Bash(npm test)`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
    },
    Done {
        #[schema(value_type = String)]
        turn_id: TurnId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    Interrupted {
        #[schema(value_type = String)]
        turn_id: TurnId,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        turn_id: Option<TurnId>,
        code: String,
        message: String,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Self::UserMessage { .. } => "user_message",
            Self::Queued { .. } => "queued",
            Self::Started { .. } => "started",
            Self::AssistantDelta { .. } => "assistant_delta",
            Self::ThinkingDelta { .. } => "thinking_delta",
            Self::ToolCall { .. } => "tool_call",
            Self::ToolResult { .. } => "tool_result",
            Self::RequiresChoice { .. } => "requires_choice",
            Self::ChoiceResolved { .. } => "choice_resolved",
            Self::Done { .. } => "done",
            Self::Interrupted { .. } => "interrupted",
            Self::Error { .. } => "error",
        }
    }

    pub fn turn_id(&self) -> Option<&str> {
        match self {
            Self::UserMessage { turn_id, .. }
            | Self::Queued { turn_id, .. }
            | Self::Started { turn_id, .. }
            | Self::AssistantDelta { turn_id, .. }
            | Self::ThinkingDelta { turn_id, .. }
            | Self::ToolCall { turn_id, .. }
            | Self::ToolResult { turn_id, .. }
            | Self::RequiresChoice { turn_id, .. }
            | Self::ChoiceResolved { turn_id, .. }
            | Self::Done { turn_id, .. }
            | Self::Interrupted { turn_id } => Some(turn_id),
            Self::Error { turn_id, .. } => turn_id.as_deref(),
        }
    }

    /// `done`, `interrupted` and `error` end a turn.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Done { .. } | Self::Interrupted { .. } | Self::Error { .. }
        )
    }

    /// Deltas are many and need no clock reading; everything else is timed.
    pub fn is_delta(&self) -> bool {
        matches!(
            self,
            Self::AssistantDelta { .. } | Self::ThinkingDelta { .. }
        )
    }
}

/// What a stored line carries besides the event (never sent to clients).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdemRecord {
    pub user: String,
    pub key: String,
    /// SHA-256 of loop id + body.
    pub body_hash: String,
}

/// One event encoded once: its `events.jsonl` line and its SSE frame.
pub struct Encoded {
    pub line: Vec<u8>,
    pub frame: Bytes,
}

/// Encodes `event` with its `seq`. The adjacently tagged serialization is
/// `{"event":"NAME","data":DATA}`; the log line splices `seq` (and `at`,
/// `idem`) in front of it, and the frame reuses DATA as is.
pub fn encode(
    seq: u64,
    at: Option<DateTime<Utc>>,
    idem: Option<&IdemRecord>,
    event: &Event,
) -> Encoded {
    let mut scratch = Vec::new();
    let mut line = Vec::new();
    let mut frame = BytesMut::new();
    encode_into(seq, at, idem, event, &mut scratch, &mut line, &mut frame);
    Encoded {
        line,
        frame: frame.freeze(),
    }
}

/// [`encode`] into buffers a batch reuses: the log line is appended to
/// `lines` and the frame to `frames`; `scratch` holds the event's JSON
/// meanwhile. No allocation once the buffers have grown.
pub fn encode_into(
    seq: u64,
    at: Option<DateTime<Utc>>,
    idem: Option<&IdemRecord>,
    event: &Event,
    scratch: &mut Vec<u8>,
    lines: &mut Vec<u8>,
    frames: &mut BytesMut,
) {
    let data = serialize(event, scratch);
    let mut seq_text = itoa::Buffer::new();
    let seq_text = seq_text.format(seq).as_bytes();

    lines.extend_from_slice(b"{\"seq\":");
    lines.extend_from_slice(seq_text);
    if let Some(at) = at {
        lines.extend_from_slice(b",\"at\":");
        serde_json::to_writer(&mut *lines, &at).expect("timestamps serialize");
    }
    if let Some(idem) = idem {
        lines.extend_from_slice(b",\"idem\":");
        serde_json::to_writer(&mut *lines, idem).expect("idem serializes");
    }
    lines.push(b',');
    lines.extend_from_slice(&scratch[1..]);
    lines.push(b'\n');

    super::wire::frame_into(frames, event.name(), seq_text, &scratch[data]);
}

/// Only the SSE frame of [`encode_into`] (an event read back from the file).
pub fn frame_into(seq: u64, event: &Event, scratch: &mut Vec<u8>, frames: &mut BytesMut) {
    let data = serialize(event, scratch);
    let seq_text = itoa::Buffer::new().format(seq).as_bytes().to_owned();
    super::wire::frame_into(frames, event.name(), &seq_text, &scratch[data]);
}

/// Serializes `event` into `scratch` (`{"event":"NAME","data":DATA}`) and
/// returns where DATA is.
fn serialize(event: &Event, scratch: &mut Vec<u8>) -> std::ops::Range<usize> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, event).expect("events serialize");
    // `{"event":"` + name + `","data":`
    let data_start = 10 + event.name().len() + 9;
    debug_assert_eq!(&scratch[data_start - 7..data_start], b"\"data\":");
    data_start..scratch.len() - 1
}

/// A line of `events.jsonl` as read back.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub idem: Option<IdemRecord>,
    #[serde(flatten)]
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_encoding_gives_the_log_line_and_the_frame() {
        let event = Event::AssistantDelta {
            turn_id: "turn_1".into(),
            text: "he said \"hi\"\nthen left".into(),
        };
        let enc = encode(42, None, None, &event);
        assert_eq!(
            std::str::from_utf8(&enc.frame).unwrap(),
            "event: assistant_delta\nid: 42\ndata: {\"turn_id\":\"turn_1\",\"text\":\"he said \\\"hi\\\"\\nthen left\"}\n\n"
        );
        let line = std::str::from_utf8(&enc.line).unwrap();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let back: StoredEvent = serde_json::from_str(line).unwrap();
        assert_eq!((back.seq, back.at, back.event), (42, None, event));
    }

    #[test]
    fn every_kind_round_trips_through_the_log_line() {
        let at = ids::now();
        let idem = IdemRecord {
            user: "alice".into(),
            key: "k1".into(),
            body_hash: "ab".into(),
        };
        let t = || TurnId::from("turn_1");
        let events = vec![
            Event::UserMessage {
                turn_id: t(),
                content: "hi".into(),
                created_at: at,
            },
            Event::Queued {
                turn_id: t(),
                position: 2,
            },
            Event::Started {
                turn_id: t(),
                cold_start: true,
                origin: Some(Origin::Agent),
                history_lost: true,
            },
            Event::Started {
                turn_id: t(),
                cold_start: false,
                origin: None,
                history_lost: false,
            },
            Event::ThinkingDelta {
                turn_id: t(),
                text: "hmm".into(),
            },
            Event::ToolCall {
                turn_id: t(),
                tool_use_id: "toolu_1".into(),
                tool: "Bash".into(),
                input_summary: Some("ls".into()),
                input: Some(serde_json::json!({"command": "ls"})),
            },
            Event::ToolResult {
                turn_id: t(),
                tool_use_id: "toolu_1".into(),
                ok: false,
                output: Some("ls: cannot access".into()),
                truncated: true,
            },
            Event::RequiresChoice {
                turn_id: t(),
                choice_id: "choice_1".into(),
                kind: ChoiceKind::Question,
                payload: serde_json::json!({"questions": []}),
            },
            Event::ChoiceResolved {
                turn_id: t(),
                choice_id: "choice_1".into(),
                source: ChoiceSource::Web,
                answer: Some(serde_json::json!({"allow": true})),
                rule_id: None,
                rule: None,
            },
            Event::Done {
                turn_id: t(),
                usage: Some(Usage {
                    input_tokens: Some(3),
                    cost_usd: Some(0.5),
                    ..Default::default()
                }),
            },
            Event::Interrupted { turn_id: t() },
            Event::Error {
                turn_id: None,
                code: "agent_error".into(),
                message: "boom".into(),
            },
        ];
        for (i, event) in events.into_iter().enumerate() {
            let enc = encode(i as u64, Some(at), Some(&idem), &event);
            let back: StoredEvent = serde_json::from_slice(&enc.line).unwrap();
            assert_eq!(back.event, event);
            assert_eq!(back.at, Some(at));
            assert_eq!(back.idem.as_ref(), Some(&idem));
            let frame = std::str::from_utf8(&enc.frame).unwrap();
            assert!(
                frame.starts_with(&format!("event: {}\nid: {i}\ndata: {{", event.name())),
                "{frame}"
            );
        }
    }

    #[test]
    fn optional_fields_stay_off_the_wire() {
        let started = Event::Started {
            turn_id: "t".into(),
            cold_start: false,
            origin: None,
            history_lost: false,
        };
        let frame = encode(1, None, None, &started).frame;
        assert!(
            std::str::from_utf8(&frame)
                .unwrap()
                .contains("data: {\"turn_id\":\"t\",\"cold_start\":false}\n")
        );
    }
}
