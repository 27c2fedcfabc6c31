//! Permission and question choices: the `requires_choice` payload made from
//! an agent's request, and the agent's decision made from an HTTP answer.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::Runtime;
use super::error::RuntimeError;
use super::events::ChoiceKind;
use crate::agent::Decision;
use crate::agent::mapping::input_summary;
use crate::store::{LoopId, StoreError};

/// A choice a loop waits on, for a bot that was not watching.
#[derive(Debug, Clone)]
pub struct OpenChoice {
    pub loop_id: LoopId,
    pub turn_id: String,
    pub choice_id: String,
    pub kind: ChoiceKind,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

impl Runtime {
    /// The choices these loops wait on now, oldest first. On a shared
    /// database each loop is read from this node's copy of its log (kept
    /// current by the change feed, within milliseconds), not one round
    /// trip per loop.
    pub fn open_choices(&self, loops: &[LoopId]) -> Result<Vec<OpenChoice>, StoreError> {
        let mut open = Vec::new();
        for &loop_id in loops {
            let found = self.log(loop_id)?.view(|v| {
                let cur = v.current.as_ref()?;
                let p = cur.pending.as_ref()?;
                Some(OpenChoice {
                    loop_id,
                    turn_id: v.turns[cur.turn].turn_id.clone(),
                    choice_id: p.choice_id.clone(),
                    kind: p.kind,
                    payload: p.payload.clone(),
                    created_at: p.created_at,
                })
            });
            open.extend(found);
        }
        open.sort_by(|a, b| (a.created_at, &a.choice_id).cmp(&(b.created_at, &b.choice_id)));
        Ok(open)
    }
}

/// The tool whose permission request is really a question to the user.
pub const QUESTION_TOOL: &str = "AskUserQuestion";

/// An answer's shape, checked before anything else.
#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceAnswer {
    Allow {
        allow: bool,
        message: Option<String>,
    },
    Answers(Map<String, Value>),
}

impl ChoiceAnswer {
    /// Whether this shape of answer is one a choice of `kind` takes.
    pub fn fits(&self, kind: ChoiceKind) -> bool {
        matches!(
            (kind, self),
            (ChoiceKind::Permission, Self::Allow { .. }) | (ChoiceKind::Question, Self::Answers(_))
        )
    }

    /// `{"allow": bool, "message"?: string}` or `{"answers": {question: label | [labels]}}`.
    pub fn parse(body: &Value) -> Result<Self, RuntimeError> {
        let bad = || {
            RuntimeError::invalid(
                "invalid_choice_payload",
                r#"answer a permission with {"allow": true|false} and a question with {"answers": {"<question>": "<label>"}}"#,
            )
        };
        let obj = body.as_object().ok_or_else(bad)?;
        match (obj.get("allow"), obj.get("answers")) {
            (Some(Value::Bool(allow)), None) => Ok(Self::Allow {
                allow: *allow,
                message: obj
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            }),
            (None, Some(Value::Object(answers))) if !answers.is_empty() => {
                let shaped = answers.values().all(|v| match v {
                    Value::String(_) => true,
                    Value::Array(items) => items.iter().all(Value::is_string),
                    _ => false,
                });
                if shaped {
                    Ok(Self::Answers(answers.clone()))
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }

    /// The JSON kept with `choice_resolved`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Allow { allow, .. } => json!({"allow": allow}),
            Self::Answers(answers) => json!({"answers": answers}),
        }
    }
}

pub fn kind_of(tool: &str) -> ChoiceKind {
    if tool == QUESTION_TOOL {
        ChoiceKind::Question
    } else {
        ChoiceKind::Permission
    }
}

/// The payload of `requires_choice`.
pub fn payload(kind: ChoiceKind, tool: &str, input: &Value, title: Option<&str>) -> Value {
    match kind {
        ChoiceKind::Permission => {
            let mut p = json!({
                "tool": tool,
                "input_summary": input_summary(tool, input),
                "input": input,
            });
            if let Some(title) = title {
                p["title"] = json!(title);
            }
            p
        }
        ChoiceKind::Question => {
            let questions: Vec<Value> = input["questions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|q| {
                    let options: Vec<Value> = q["options"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|o| {
                            let mut opt = json!({"label": o["label"]});
                            if let Some(d) = o.get("description").filter(|d| d.is_string()) {
                                opt["description"] = d.clone();
                            }
                            opt
                        })
                        .collect();
                    let mut out = json!({
                        "question": q["question"],
                        "options": options,
                        "multi_select": q["multiSelect"].as_bool().unwrap_or(false),
                    });
                    if let Some(h) = q.get("header").filter(|h| h.is_string()) {
                        out["header"] = h.clone();
                    }
                    out
                })
                .collect();
            json!({"questions": questions})
        }
    }
}

/// The agent's decision for an answer, or why the answer does not fit
/// (answered as `invalid_choice_payload`).
pub fn decide(kind: ChoiceKind, input: &Value, answer: &ChoiceAnswer) -> Result<Decision, String> {
    let misfit = |want: &str| {
        format!(
            "this choice is a {}; answer it with {want}",
            match kind {
                ChoiceKind::Permission => "permission",
                ChoiceKind::Question => "question",
            }
        )
    };
    match (kind, answer) {
        (ChoiceKind::Permission, ChoiceAnswer::Allow { allow: true, .. }) => Ok(Decision::Allow {
            updated_input: input.clone(),
        }),
        (
            ChoiceKind::Permission,
            ChoiceAnswer::Allow {
                allow: false,
                message,
            },
        ) => Ok(Decision::Deny {
            message: message
                .clone()
                .unwrap_or_else(|| "The user denied this tool use.".to_owned()),
        }),
        (ChoiceKind::Permission, _) => Err(misfit(r#"{"allow": true|false}"#)),
        (ChoiceKind::Question, ChoiceAnswer::Answers(answers)) => {
            let asked: Vec<&str> = input["questions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["question"].as_str())
                .collect();
            if let Some(unknown) = answers.keys().find(|k| !asked.contains(&k.as_str())) {
                return Err(format!("`{unknown}` is not one of the questions asked"));
            }
            // Claude Code takes one string per question; several labels are comma-joined.
            let joined: Map<String, Value> = answers
                .iter()
                .map(|(q, a)| {
                    let text = match a {
                        Value::Array(items) => items
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "),
                        other => other.as_str().unwrap_or_default().to_owned(),
                    };
                    (q.clone(), Value::String(text))
                })
                .collect();
            let mut updated = input.clone();
            updated["answers"] = Value::Object(joined);
            Ok(Decision::Allow {
                updated_input: updated,
            })
        }
        (ChoiceKind::Question, _) => Err(misfit(r#"{"answers": {"<question>": "<label>"}}"#)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_shapes() {
        let table = [
            (json!({"allow": true}), true),
            (json!({"allow": false, "message": "not now"}), true),
            (json!({"answers": {"Q?": "A"}}), true),
            (json!({"answers": {"Q?": ["A", "B"]}}), true),
            (json!({}), false),
            (json!({"allow": "yes"}), false),
            (json!({"answers": {}}), false),
            (json!({"answers": {"Q?": 1}}), false),
            (json!({"allow": true, "answers": {"Q?": "A"}}), false),
            (json!([true]), false),
        ];
        for (body, ok) in table {
            assert_eq!(ChoiceAnswer::parse(&body).is_ok(), ok, "{body}");
        }
    }

    #[test]
    fn permission_answers_become_allow_with_the_input_or_deny() {
        let input = json!({"command": "touch x", "description": "Create file"});
        let allow = decide(
            ChoiceKind::Permission,
            &input,
            &ChoiceAnswer::parse(&json!({"allow": true})).unwrap(),
        );
        assert_eq!(
            allow.unwrap(),
            Decision::Allow {
                updated_input: input.clone()
            }
        );
        let deny = decide(
            ChoiceKind::Permission,
            &input,
            &ChoiceAnswer::parse(&json!({"allow": false})).unwrap(),
        );
        assert!(matches!(deny.unwrap(), Decision::Deny { .. }));
        let misfit = decide(
            ChoiceKind::Permission,
            &input,
            &ChoiceAnswer::parse(&json!({"answers": {"a": "b"}})).unwrap(),
        );
        assert_eq!(
            misfit.unwrap_err(),
            r#"this choice is a permission; answer it with {"allow": true|false}"#
        );
    }

    #[test]
    fn question_answers_are_keyed_by_question_text_and_joined() {
        let input = json!({"questions": [
            {"question": "Which color do you prefer?", "header": "Color", "multiSelect": false,
             "options": [{"label": "Red", "description": "Warm color"}, {"label": "Blue", "description": "Cool color"}]},
            {"question": "Which sizes do you need?", "header": "Sizes", "multiSelect": true,
             "options": [{"label": "S", "description": "Small"}, {"label": "M", "description": "Medium"}, {"label": "L", "description": "Large"}]}
        ]});
        let answer = ChoiceAnswer::parse(&json!({"answers": {
            "Which color do you prefer?": "Blue", "Which sizes do you need?": ["S", "L"]
        }}))
        .unwrap();
        let Decision::Allow { updated_input } =
            decide(ChoiceKind::Question, &input, &answer).unwrap()
        else {
            panic!("a question answer allows");
        };
        assert_eq!(updated_input["questions"], input["questions"]);
        assert_eq!(
            updated_input["answers"],
            json!({"Which color do you prefer?": "Blue", "Which sizes do you need?": "S, L"})
        );
        let unknown = ChoiceAnswer::parse(&json!({"answers": {"Other?": "x"}})).unwrap();
        assert_eq!(
            decide(ChoiceKind::Question, &input, &unknown).unwrap_err(),
            "`Other?` is not one of the questions asked"
        );
        let allow = ChoiceAnswer::parse(&json!({"allow": true})).unwrap();
        assert!(
            decide(ChoiceKind::Question, &input, &allow)
                .unwrap_err()
                .starts_with("this choice is a question")
        );

        let p = payload(ChoiceKind::Question, QUESTION_TOOL, &input, None);
        assert_eq!(p["questions"][1]["multi_select"], true);
        assert_eq!(p["questions"][0]["header"], "Color");
        assert_eq!(
            p["questions"][0]["options"][1],
            json!({"label": "Blue", "description": "Cool color"})
        );
    }

    #[test]
    fn permission_payload_has_tool_summary_and_input() {
        let input = json!({"command": "touch perm_test.txt", "description": "Create file"});
        let p = payload(ChoiceKind::Permission, "Bash", &input, None);
        assert_eq!(
            p,
            json!({"tool": "Bash", "input_summary": "touch perm_test.txt", "input": input})
        );
        assert_eq!(kind_of("AskUserQuestion"), ChoiceKind::Question);
        assert_eq!(kind_of("Write"), ChoiceKind::Permission);
    }
}
