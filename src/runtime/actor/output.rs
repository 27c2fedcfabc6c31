//! What the agent says: its events become the turn's v1 events; a
//! permission request becomes a choice (or is answered at once under a held
//! mode); the end of its turn or of its process ends the loop's turn.

use std::time::Instant;

use serde_json::Value;

use super::{Actor, Choice};
use crate::agent::{AgentEvent, AgentInput, AgentOutput, Decision, TurnEnd};
use crate::runtime::choices;
use crate::runtime::events::{ChoiceKind, Event, new_choice_id};

impl Actor {
    pub(super) async fn output(&mut self, output: AgentOutput) {
        self.last_activity = Instant::now();
        match output {
            AgentOutput::Event(event) => self.agent_event(event).await,
            AgentOutput::Events(events) => {
                for event in events {
                    self.agent_event(event).await;
                }
            }
            AgentOutput::Exited { reason } => self.agent_exited(reason).await,
        }
    }

    async fn agent_event(&mut self, event: AgentEvent) {
        match event {
            AgentEvent::Init { .. } => self.ensure_started(),
            AgentEvent::TextDelta(text) => {
                let turn_id = self.current_turn();
                self.emit(Event::AssistantDelta { turn_id, text });
            }
            AgentEvent::ThinkingDelta(text) => {
                let turn_id = self.current_turn();
                self.emit(Event::ThinkingDelta { turn_id, text });
            }
            AgentEvent::ToolCall {
                tool_use_id,
                tool,
                input_summary,
            } => {
                let turn_id = self.current_turn();
                self.emit(Event::ToolCall {
                    turn_id,
                    tool_use_id,
                    tool,
                    input_summary,
                });
            }
            AgentEvent::ToolResult { tool_use_id, ok } => {
                let turn_id = self.current_turn();
                self.emit(Event::ToolResult {
                    turn_id,
                    tool_use_id,
                    ok,
                });
            }
            AgentEvent::PermissionRequest {
                request_id,
                tool,
                input,
                title,
            } => {
                self.permission_request(request_id, tool, input, title);
            }
            AgentEvent::RequestCancelled { request_id } => {
                if let Some(turn) = self.turn.as_mut()
                    && turn
                        .pending
                        .as_ref()
                        .is_some_and(|p| p.request_id == request_id)
                {
                    turn.pending = None;
                }
            }
            AgentEvent::ControlResponse {
                request_id,
                error: Some(error),
            } => {
                tracing::warn!(loop_id = %self.id, %request_id, %error, "the agent refused a control request");
            }
            AgentEvent::ControlResponse { .. } => {}
            AgentEvent::TurnEnd(end) => self.turn_end(end).await,
        }
    }

    fn permission_request(
        &mut self,
        request_id: String,
        tool: String,
        input: Value,
        title: Option<String>,
    ) {
        let turn_id = self.current_turn();
        let kind = choices::kind_of(&tool);
        let native = self.shared.config.native_modes();
        let held = self.turn.as_ref().and_then(|t| t.mode.held_answer(native));
        if let (ChoiceKind::Permission, Some(allow)) = (kind, held) {
            // The loop holds this mode itself: answer without asking anyone.
            let decision = if allow {
                Decision::Allow {
                    updated_input: input,
                }
            } else {
                Decision::Deny {
                    message: format!(
                        "Permission to use {tool} was denied: this turn runs in don't-ask mode."
                    ),
                }
            };
            self.send_to_agent(AgentInput::Answer {
                request_id,
                decision,
            });
            return;
        }
        let choice_id = new_choice_id();
        let payload = choices::payload(kind, &tool, &input, title.as_deref());
        if let Some(turn) = self.turn.as_mut() {
            turn.pending = Some(Choice {
                choice_id: choice_id.clone(),
                request_id,
                kind,
                input,
            });
        }
        self.emit(Event::RequiresChoice {
            turn_id,
            choice_id,
            kind,
            payload,
        });
    }

    pub(super) fn send_to_agent(&mut self, input: AgentInput) {
        if let Some(live) = &self.agent
            && live.input.try_send(input).is_err()
        {
            tracing::warn!(loop_id = %self.id, "the agent is not taking input");
        }
    }

    async fn turn_end(&mut self, end: TurnEnd) {
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        if let TurnEnd::Failed { message, .. } = &end
            && self.resume_failed(message)
        {
            return self.restart_fresh().await;
        }
        let turn_id = turn.turn_id.clone();
        let interrupted = turn.interrupt_deadline.is_some();
        self.ensure_started();
        let event = match end {
            _ if interrupted => Event::Interrupted { turn_id },
            TurnEnd::Aborted { .. } => Event::Interrupted { turn_id },
            TurnEnd::Success { usage } => Event::Done {
                turn_id,
                usage: Some(usage),
            },
            TurnEnd::Failed { message, .. } => Event::Error {
                turn_id: Some(turn_id),
                code: "agent_error".into(),
                message,
            },
        };
        self.emit(event);
        self.finish_turn();
    }

    async fn agent_exited(&mut self, reason: String) {
        if self.turn.is_some() && self.resume_failed("") {
            return self.restart_fresh().await;
        }
        tracing::warn!(loop_id = %self.id, %reason, "the agent exited");
        if let Some(turn) = self.turn.as_ref() {
            let turn_id = turn.turn_id.clone();
            self.ensure_started();
            self.emit(Event::Error {
                turn_id: Some(turn_id),
                code: "agent_crashed".into(),
                message: reason,
            });
            self.finish_turn();
        }
        self.stop_agent(false).await;
    }

    pub(super) fn finish_turn(&mut self) {
        self.turn = None;
        self.last_activity = Instant::now();
        let base = self
            .shared
            .config
            .permission_mode
            .agent_side(self.shared.config.native_modes());
        if let Some(live) = self.agent.as_mut() {
            if live.mode != base {
                live.mode = base;
                let _ = live.input.try_send(AgentInput::SetMode(base));
            }
            self.shared.slots.set_idle(self.id, self.me.clone());
        }
    }
}
