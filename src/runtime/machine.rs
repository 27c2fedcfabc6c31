//! The rules of one loop, as a pure state machine: [`LoopMachine::handle`]
//! takes what happened (a message, an answer, something the agent said, a
//! timer) and returns what to do ([`Effect`]s). No tokio and no I/O here;
//! the loop's task (`runtime::actor`) feeds inputs and performs effects.
//!
//! A turn waits in the queue, is sent to the agent, streams, may wait on a
//! choice or be interrupted, and ends with `done`, `interrupted` or `error`.
//! Only one turn runs at a time and a message goes to the agent only after
//! the previous turn ended, so the agent never merges two messages.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::choices::{self, ChoiceAnswer};
use super::error::RuntimeError;
use super::events::{ChoiceKind, ChoiceSource, Event, Origin, TurnId};
use crate::agent::rules::{self, Behavior, StandingRule};
use crate::agent::{AgentEvent, AgentInput, Decision, NativeModes, PermissionMode, TurnEnd};

/// What the rules depend on, fixed for the server's life.
#[derive(Debug, Clone)]
pub struct Rules {
    pub default_mode: PermissionMode,
    pub native: NativeModes,
    pub max_queued: usize,
    /// An agent with nothing to do (or a choice nobody answers) is reclaimed after this.
    pub idle_timeout: Duration,
    /// How long an interrupted agent may take to end its turn before it is killed.
    pub interrupt_grace: Duration,
}

/// Permission requests that may wait behind the one being asked.
const MAX_WAITING_REQUESTS: usize = 64;

/// Where new turn and choice ids come from (random in the server, counted in tests).
pub trait Ids: Send {
    fn turn(&mut self) -> String;
    fn choice(&mut self) -> String;
}

pub struct RandomIds;

impl Ids for RandomIds {
    fn turn(&mut self) -> String {
        super::events::new_turn_id()
    }
    fn choice(&mut self) -> String {
        super::events::new_choice_id()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Archived,
    Shutdown,
}

/// What happened to the loop.
#[derive(Debug)]
pub enum Input<H> {
    /// A message admitted by [`LoopMachine::admit`] and written to the log.
    /// `hold` stays with the turn while it waits (its queued bytes).
    Send {
        turn_id: TurnId,
        content: String,
        mode: Option<PermissionMode>,
        hold: H,
    },
    Answer {
        choice_id: String,
        answer: ChoiceAnswer,
        source: ChoiceSource,
    },
    Interrupt,
    /// Another loop needs the agent slot: give it back if idle.
    Reclaim,
    Stop(StopReason),
    /// An agent slot is ours (at once or after waiting).
    SlotGranted,
    /// No slot is free now; one is being waited for.
    SlotBusy,
    /// The agent process runs; `resumed`: it continues the loop's conversation.
    AgentStarted {
        resumed: bool,
    },
    AgentFailedToStart(String),
    Agent(AgentEvent),
    AgentExited(String),
    /// The agent's input is full: it stopped reading, a message was not sent.
    AgentStuck,
    /// Time passed (see [`LoopMachine::next_deadline`]).
    Tick,
    /// The loop's log refuses its events: the running turn cannot go on.
    LogUnwritable,
}

/// What the loop's task must do, in order.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Write this event to the log (a batch is written in one go).
    Emit(Event),
    ToAgent(AgentInput),
    /// Get an agent slot: answer with `SlotGranted`, or `SlotBusy` and wait.
    AcquireSlot,
    /// Start the agent holding the slot (`fresh`: a new conversation even if
    /// the loop has one); answer with `AgentStarted` or `AgentFailedToStart`.
    StartAgent {
        fresh: bool,
    },
    StopAgent(Stopping),
    Reply(Reply),
    /// Worth a line in the server log.
    Warn(String),
}

/// How an agent is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    /// In the background (tracked); its slot is given back when it is gone.
    Release,
    /// Wait until it is gone and keep the slot for the next start.
    KeepSlot,
    /// Wait until it is gone, then give the slot back (the loop stops).
    Wait,
}

#[derive(Debug, PartialEq)]
pub enum Reply {
    Sent,
    Answered(Result<(), Refusal>),
    /// The running turn's id, if one ran.
    Interrupting(Option<String>),
    Stopped,
}

/// Why an answer was not taken.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// No such choice waits (it was answered, withdrawn or never asked).
    NotPending,
    /// The answer does not fit the choice; the message says how it should.
    Misfit(String),
}

/// A message waiting for its turn.
#[derive(Debug)]
struct Waiting<H> {
    turn_id: TurnId,
    content: String,
    mode: Option<PermissionMode>,
    /// `queued` was already said for it.
    announced: bool,
    _hold: H,
}

#[derive(Debug)]
enum Agent {
    Absent,
    WaitingSlot,
    Starting,
    Live(Live),
}

#[derive(Debug)]
struct Live {
    /// The mode the agent process runs in now.
    mode: PermissionMode,
    /// It continues an earlier conversation (which may turn out to be lost).
    resumed: bool,
    /// No turn has been sent to this process yet.
    fresh: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Choice {
    choice_id: String,
    request_id: String,
    kind: ChoiceKind,
    input: Value,
}

/// A permission request that came while another was being asked.
#[derive(Debug)]
struct Request {
    request_id: String,
    tool: String,
    input: Value,
    title: Option<String>,
}

#[derive(Debug)]
struct Running {
    turn_id: TurnId,
    /// The user's message, kept to send again if a resume fails; `None` for
    /// a turn the agent began on its own.
    content: Option<String>,
    mode: PermissionMode,
    /// The agent process was started for this turn.
    cold: bool,
    history_lost: bool,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Sent to a cold agent, which has not said it began (`started` not said).
    Sent,
    /// The conversation could not be resumed; a fresh agent is starting.
    Restarting,
    /// `started` said.
    Streaming,
    AwaitingChoice {
        choice: Choice,
        later: VecDeque<Request>,
    },
    /// Interrupt sent; killed at `deadline` if it has not ended.
    Interrupting { deadline: Instant },
}

pub struct LoopMachine<H> {
    rules: Rules,
    /// The standing permission rules in force (set by the loop's task
    /// before it hands on a permission request).
    standing: Vec<StandingRule>,
    ids: Box<dyn Ids>,
    queue: VecDeque<Waiting<H>>,
    agent: Agent,
    turn: Option<Running>,
    last_activity: Instant,
}

/// The events that admit a message: its `user_message`, and `queued` when it must wait.
pub struct Admission {
    pub turn_id: TurnId,
    pub events: Vec<Event>,
}

impl<H> LoopMachine<H> {
    pub fn new(rules: Rules, ids: Box<dyn Ids>, now: Instant) -> Self {
        Self {
            rules,
            standing: Vec::new(),
            ids,
            queue: VecDeque::new(),
            agent: Agent::Absent,
            turn: None,
            last_activity: now,
        }
    }

    /// The standing rules from now on.
    pub fn set_standing(&mut self, standing: Vec<StandingRule>) {
        self.standing = standing;
    }

    /// Whether a message can be taken now, and what to log for it. Refused
    /// (queue full) before anything is written; feed `Input::Send` once logged.
    pub fn admit(&mut self, content: &str, at: DateTime<Utc>) -> Result<Admission, RuntimeError> {
        let waits = self.must_wait();
        let cap = self.rules.max_queued;
        if waits && self.queue.len() >= cap {
            return Err(RuntimeError::Full(
                "queue_full",
                format!(
                    "this loop already has {cap} turns waiting (--max-queued-turns); \
                     send again when one has run"
                ),
                Duration::from_secs(1),
            ));
        }
        let turn_id: TurnId = self.ids.turn().into();
        let mut events = vec![Event::UserMessage {
            turn_id: turn_id.clone(),
            content: content.to_owned(),
            created_at: at,
        }];
        if waits {
            events.push(Event::Queued {
                turn_id: turn_id.clone(),
                position: self.queue.len() + 1,
            });
        }
        Ok(Admission { turn_id, events })
    }

    fn must_wait(&self) -> bool {
        self.turn.is_some()
            || !self.queue.is_empty()
            || !matches!(self.agent, Agent::Absent | Agent::Live(_))
    }

    /// The agent lives and has nothing to do: another loop may have its slot.
    pub fn reclaimable(&self) -> bool {
        self.turn.is_none() && self.queue.is_empty() && matches!(self.agent, Agent::Live(_))
    }

    /// Nothing running, nothing waiting, no agent: the loop's task may end.
    pub fn quiet(&self) -> bool {
        self.turn.is_none() && self.queue.is_empty() && matches!(self.agent, Agent::Absent)
    }

    /// Waiting for an agent slot.
    pub fn wants_slot(&self) -> bool {
        matches!(self.agent, Agent::WaitingSlot)
    }

    /// When to feed `Tick`: an interrupt overdue, or the agent idle too long.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.turn.as_ref().map(|t| &t.phase) {
            Some(Phase::Interrupting { deadline }) => Some(*deadline),
            // A choice nobody answers counts as idle.
            Some(Phase::AwaitingChoice { .. }) => Some(self.idle_at()),
            Some(_) => None,
            None if self.reclaimable() => Some(self.idle_at()),
            None => None,
        }
    }

    fn idle_at(&self) -> Instant {
        self.last_activity + self.rules.idle_timeout
    }

    pub fn handle(&mut self, input: Input<H>, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.handle_into(input, now, &mut fx);
        fx
    }

    /// [`Self::handle`], appending to `fx` (which the caller reuses).
    pub fn handle_into(&mut self, input: Input<H>, now: Instant, fx: &mut Vec<Effect>) {
        match input {
            Input::Send {
                turn_id,
                content,
                mode,
                hold,
            } => {
                let announced = self.must_wait();
                self.queue.push_back(Waiting {
                    turn_id,
                    content,
                    mode,
                    announced,
                    _hold: hold,
                });
                self.last_activity = now;
                fx.push(Effect::Reply(Reply::Sent));
            }
            Input::Answer {
                choice_id,
                answer,
                source,
            } => {
                let result = self.answer(&choice_id, &answer, source, now, fx);
                fx.push(Effect::Reply(Reply::Answered(result)));
            }
            Input::Interrupt => {
                let id = self.interrupt(now, fx);
                fx.push(Effect::Reply(Reply::Interrupting(id)));
            }
            Input::Reclaim => {
                if self.reclaimable() {
                    self.drop_agent(Stopping::Release, fx);
                }
            }
            Input::Stop(reason) => {
                self.stop(reason, fx);
                fx.push(Effect::Reply(Reply::Stopped));
                return;
            }
            Input::SlotGranted => {
                if matches!(self.agent, Agent::WaitingSlot) {
                    self.agent = Agent::Starting;
                    fx.push(Effect::StartAgent { fresh: false });
                }
            }
            Input::SlotBusy => {
                if let Some(first) = self.queue.front_mut()
                    && !first.announced
                {
                    first.announced = true;
                    fx.push(Effect::Emit(Event::Queued {
                        turn_id: first.turn_id.clone(),
                        position: 1,
                    }));
                }
            }
            Input::AgentStarted { resumed } => self.agent_started(resumed, fx),
            Input::AgentFailedToStart(message) => self.agent_failed(message, fx),
            // What a process that is no longer the loop's agent said.
            Input::Agent(_) | Input::AgentExited(_) | Input::AgentStuck
                if !matches!(self.agent, Agent::Live(_)) => {}
            Input::Agent(event) => {
                self.last_activity = now;
                self.agent_event(event, now, fx);
            }
            Input::AgentExited(reason) => {
                self.last_activity = now;
                self.agent_exited(reason, now, fx);
            }
            Input::AgentStuck => self.agent_stuck(now, fx),
            Input::Tick => self.tick(now, fx),
            Input::LogUnwritable => {
                self.end_turn(
                    "log_unwritable",
                    "the loop's event log could not be written; events of this turn were lost"
                        .into(),
                    fx,
                );
                self.drop_agent(Stopping::Release, fx);
            }
        }
        self.start_next(now, fx);
    }

    /// Starts the next queued turn while nothing runs (asking for an agent first).
    fn start_next(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if self.turn.is_some() || self.queue.is_empty() {
            return;
        }
        let live = match &mut self.agent {
            Agent::Absent => {
                self.agent = Agent::WaitingSlot;
                fx.push(Effect::AcquireSlot);
                return;
            }
            Agent::WaitingSlot | Agent::Starting => return,
            Agent::Live(live) => live,
        };
        let next = self.queue.pop_front().expect("the queue is not empty");
        let mode = next.mode.unwrap_or(self.rules.default_mode);
        let cold = std::mem::replace(&mut live.fresh, false);
        switch_mode(live, mode.agent_side(self.rules.native), fx);
        fx.push(Effect::ToAgent(AgentInput::User(next.content.clone())));
        // A warm agent starts at once; a cold one when it says it began.
        let phase = if cold { Phase::Sent } else { Phase::Streaming };
        if !cold {
            fx.push(started(&next.turn_id, false, None, false));
        }
        self.turn = Some(Running {
            turn_id: next.turn_id,
            content: Some(next.content),
            mode,
            cold,
            history_lost: false,
            phase,
        });
        self.last_activity = now;
    }

    fn agent_started(&mut self, resumed: bool, fx: &mut Vec<Effect>) {
        let mut live = Live {
            mode: self.rules.default_mode.agent_side(self.rules.native),
            resumed,
            fresh: true,
        };
        if let Some(turn) = self.turn.as_mut()
            && matches!(turn.phase, Phase::Restarting)
        {
            // The fresh conversation for a turn whose resume failed.
            live.fresh = false;
            switch_mode(&mut live, turn.mode.agent_side(self.rules.native), fx);
            let content = turn.content.clone().unwrap_or_default();
            fx.push(Effect::ToAgent(AgentInput::User(content)));
            turn.phase = Phase::Sent;
        }
        self.agent = Agent::Live(live);
    }

    fn agent_failed(&mut self, message: String, fx: &mut Vec<Effect>) {
        self.agent = Agent::Absent;
        let (turn_id, message) = match self.turn.take() {
            Some(turn) => (
                turn.turn_id,
                format!(
                    "the conversation could not be resumed, and a fresh one could not be started: {message}"
                ),
            ),
            None => match self.queue.pop_front() {
                Some(first) => (first.turn_id, message),
                None => return,
            },
        };
        fx.push(Effect::Warn(format!("a turn could not start: {message}")));
        fx.push(error(Some(turn_id), "agent_unavailable", message));
    }

    fn agent_event(&mut self, event: AgentEvent, now: Instant, fx: &mut Vec<Effect>) {
        match event {
            AgentEvent::Init { .. } => {
                if let Some(turn) = self.turn.as_mut() {
                    say_started(turn, fx);
                }
            }
            AgentEvent::TextDelta(text) => {
                let turn_id = self.output_turn(fx);
                fx.push(Effect::Emit(Event::AssistantDelta { turn_id, text }));
            }
            AgentEvent::ThinkingDelta(text) => {
                let turn_id = self.output_turn(fx);
                fx.push(Effect::Emit(Event::ThinkingDelta { turn_id, text }));
            }
            AgentEvent::ToolCall {
                tool_use_id,
                tool,
                input_summary,
                input,
            } => {
                let turn_id = self.output_turn(fx);
                fx.push(Effect::Emit(Event::ToolCall {
                    turn_id,
                    tool_use_id,
                    tool,
                    input_summary,
                    input: (!input.is_null()).then_some(input),
                }));
            }
            AgentEvent::ToolResult {
                tool_use_id,
                ok,
                output,
                truncated,
            } => {
                let turn_id = self.output_turn(fx);
                fx.push(Effect::Emit(Event::ToolResult {
                    turn_id,
                    tool_use_id,
                    ok,
                    output,
                    truncated,
                }));
            }
            AgentEvent::PermissionRequest {
                request_id,
                tool,
                input,
                title,
            } => {
                self.output_turn(fx);
                let request = Request {
                    request_id,
                    tool,
                    input,
                    title,
                };
                self.permission_request(request, fx);
            }
            AgentEvent::RequestCancelled { request_id } => self.request_cancelled(&request_id, fx),
            AgentEvent::ControlResponse {
                request_id,
                error: Some(error),
            } => fx.push(Effect::Warn(format!(
                "the agent refused control request {request_id}: {error}"
            ))),
            AgentEvent::ControlResponse { .. } => {}
            AgentEvent::TurnEnd(end) => self.turn_end(end, now, fx),
        }
    }

    /// The running turn's id, `started` said; output while no turn runs
    /// opens a turn of the agent's own.
    fn output_turn(&mut self, fx: &mut Vec<Effect>) -> TurnId {
        let turn = self.turn.get_or_insert_with(|| {
            let turn_id: TurnId = self.ids.turn().into();
            fx.push(started(&turn_id, false, Some(Origin::Agent), false));
            Running {
                turn_id,
                content: None,
                mode: self.rules.default_mode,
                cold: false,
                history_lost: false,
                phase: Phase::Streaming,
            }
        });
        say_started(turn, fx);
        turn.turn_id.clone()
    }

    fn permission_request(&mut self, request: Request, fx: &mut Vec<Effect>) {
        let turn = self.turn.as_mut().expect("output_turn opened a turn");
        let kind = choices::kind_of(&request.tool);
        let held = match kind {
            ChoiceKind::Permission => turn.mode.held_answer(self.rules.native),
            ChoiceKind::Question => None,
        };
        let ruled = match (&turn.phase, kind) {
            (Phase::Interrupting { .. }, _) | (_, ChoiceKind::Question) => None,
            _ => rules::answering(&self.standing, &request.tool, &request.input),
        };
        if let Some(hit) = ruled {
            // A standing rule answers it: nobody is asked.
            let allow = hit.behavior == Behavior::Allow;
            let decision = if allow {
                Decision::Allow {
                    updated_input: request.input,
                }
            } else {
                Decision::Deny {
                    message: format!("Denied by the standing rule {}.", hit.rule.display()),
                }
            };
            fx.push(answer_agent(request.request_id, decision));
            fx.push(Effect::Emit(Event::ChoiceResolved {
                turn_id: turn.turn_id.clone(),
                choice_id: self.ids.choice(),
                source: ChoiceSource::Rule,
                answer: Some(serde_json::json!({ "allow": allow })),
                rule_id: Some(hit.id.clone()),
                rule: Some(hit.rule.display()),
            }));
            return;
        }
        let refusal = match (&mut turn.phase, held) {
            // The loop holds this mode itself: answer without asking anyone.
            (_, Some(true)) => {
                fx.push(answer_agent(
                    request.request_id,
                    Decision::Allow {
                        updated_input: request.input,
                    },
                ));
                return;
            }
            (_, Some(false)) => format!(
                "Permission to use {} was denied: this turn runs in don't-ask mode.",
                request.tool
            ),
            (Phase::Interrupting { .. }, None) => "The turn was interrupted.".to_owned(),
            (Phase::AwaitingChoice { later, .. }, None) => {
                if later.len() < MAX_WAITING_REQUESTS {
                    later.push_back(request);
                    return;
                }
                "Too many requests are waiting for an answer.".to_owned()
            }
            (phase, None) => {
                let choice_id = self.ids.choice();
                let payload = choices::payload(
                    kind,
                    &request.tool,
                    &request.input,
                    request.title.as_deref(),
                );
                fx.push(Effect::Emit(Event::RequiresChoice {
                    turn_id: turn.turn_id.clone(),
                    choice_id: choice_id.clone(),
                    kind,
                    payload,
                }));
                *phase = Phase::AwaitingChoice {
                    choice: Choice {
                        choice_id,
                        request_id: request.request_id,
                        kind,
                        input: request.input,
                    },
                    later: VecDeque::new(),
                };
                return;
            }
        };
        fx.push(answer_agent(
            request.request_id,
            Decision::Deny { message: refusal },
        ));
    }

    /// The choice was answered or withdrawn: ask the next waiting request.
    fn next_request(&mut self, later: VecDeque<Request>, fx: &mut Vec<Effect>) {
        let turn = self.turn.as_mut().expect("a turn runs");
        turn.phase = Phase::Streaming;
        for request in later {
            self.permission_request(request, fx);
        }
    }

    fn request_cancelled(&mut self, request_id: &str, fx: &mut Vec<Effect>) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        if let Phase::AwaitingChoice { choice, later } = &mut turn.phase {
            if choice.request_id == request_id {
                let later = std::mem::take(later);
                self.next_request(later, fx);
            } else {
                later.retain(|r| r.request_id != request_id);
            }
        }
    }

    fn answer(
        &mut self,
        choice_id: &str,
        answer: &ChoiceAnswer,
        source: ChoiceSource,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        let turn = self.turn.as_mut().ok_or(Refusal::NotPending)?;
        let Phase::AwaitingChoice { choice, later } = &mut turn.phase else {
            return Err(Refusal::NotPending);
        };
        if choice.choice_id != choice_id {
            return Err(Refusal::NotPending);
        }
        let decision =
            choices::decide(choice.kind, &choice.input, answer).map_err(Refusal::Misfit)?;
        fx.push(answer_agent(choice.request_id.clone(), decision));
        fx.push(Effect::Emit(Event::ChoiceResolved {
            turn_id: turn.turn_id.clone(),
            choice_id: choice_id.to_owned(),
            source,
            answer: Some(answer.to_json()),
            rule_id: None,
            rule: None,
        }));
        let later = std::mem::take(later);
        self.last_activity = now;
        self.next_request(later, fx);
        Ok(())
    }

    fn interrupt(&mut self, now: Instant, fx: &mut Vec<Effect>) -> Option<String> {
        let turn = self.turn.as_mut()?;
        if !matches!(turn.phase, Phase::Interrupting { .. }) {
            say_started(turn, fx);
            // The agent withdraws its own pending requests when interrupted.
            turn.phase = Phase::Interrupting {
                deadline: now + self.rules.interrupt_grace,
            };
            fx.push(Effect::ToAgent(AgentInput::Interrupt));
        }
        Some(turn.turn_id.to_string())
    }

    /// A cold turn on a resumed conversation that failed before it began:
    /// the conversation could not be resumed.
    fn resume_failed(&self, message: &str) -> bool {
        let resumed = matches!(&self.agent, Agent::Live(live) if live.resumed);
        let turn = self.turn.as_ref();
        resumed
            && turn.is_some_and(|t| t.cold && matches!(t.phase, Phase::Sent) && t.content.is_some())
            && (message.is_empty() || message.contains("No conversation found"))
    }

    /// Starts a fresh conversation for the running turn; its `started` will
    /// say `history_lost`.
    fn restart_fresh(&mut self, fx: &mut Vec<Effect>) {
        fx.push(Effect::Warn(
            "the conversation could not be resumed; starting a fresh one".into(),
        ));
        let turn = self.turn.as_mut().expect("a turn runs");
        turn.history_lost = true;
        turn.phase = Phase::Restarting;
        self.agent = Agent::Starting;
        fx.push(Effect::StopAgent(Stopping::KeepSlot));
        fx.push(Effect::StartAgent { fresh: true });
    }

    fn turn_end(&mut self, end: TurnEnd, now: Instant, fx: &mut Vec<Effect>) {
        if let TurnEnd::Failed { message, .. } = &end
            && self.resume_failed(message)
        {
            return self.restart_fresh(fx);
        }
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let interrupted = matches!(turn.phase, Phase::Interrupting { .. });
        say_started(turn, fx);
        let turn_id = turn.turn_id.clone();
        fx.push(match end {
            _ if interrupted => Event::Interrupted { turn_id }.into(),
            TurnEnd::Aborted { .. } => Event::Interrupted { turn_id }.into(),
            TurnEnd::Success { usage } => Event::Done {
                turn_id,
                usage: Some(usage),
            }
            .into(),
            TurnEnd::Failed { message, .. } => error(Some(turn_id), "agent_error", message),
        });
        self.finish_turn(now, fx);
    }

    fn agent_exited(&mut self, reason: String, now: Instant, fx: &mut Vec<Effect>) {
        if self.resume_failed("") {
            return self.restart_fresh(fx);
        }
        fx.push(Effect::Warn(format!("the agent exited: {reason}")));
        self.end_turn("agent_crashed", reason, fx);
        self.drop_agent(Stopping::Release, fx);
        self.last_activity = now;
    }
    fn agent_stuck(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        fx.push(Effect::Warn(
            "the agent stopped taking input; stopping it".into(),
        ));
        self.end_turn(
            "agent_unresponsive",
            "the agent stopped taking input and was stopped; the next message starts it again"
                .into(),
            fx,
        );
        self.drop_agent(Stopping::Release, fx);
        self.last_activity = now;
    }

    /// Ends the running turn (if any) with an error, `started` said first.
    fn end_turn(&mut self, code: &str, message: String, fx: &mut Vec<Effect>) {
        if let Some(mut turn) = self.turn.take() {
            say_started(&mut turn, fx);
            fx.push(error(Some(turn.turn_id), code, message));
        }
    }

    fn tick(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let phase = self.turn.as_ref().map(|t| &t.phase);
        match phase {
            Some(Phase::Interrupting { deadline }) if now >= *deadline => {
                fx.push(Effect::Warn(
                    "the agent did not stop when interrupted; killing it".into(),
                ));
                let turn = self.turn.take().expect("a turn runs");
                fx.push(
                    Event::Interrupted {
                        turn_id: turn.turn_id,
                    }
                    .into(),
                );
                self.drop_agent(Stopping::Release, fx);
                self.last_activity = now;
            }
            Some(Phase::AwaitingChoice { .. }) if now >= self.idle_at() => {
                self.end_turn(
                    "sandbox_evicted",
                    "the agent was reclaimed while it waited for an answer".into(),
                    fx,
                );
                self.drop_agent(Stopping::Release, fx);
                self.last_activity = now;
            }
            None if self.reclaimable() && now >= self.idle_at() => {
                fx.push(Effect::Warn("reclaiming an idle agent".into()));
                self.drop_agent(Stopping::Release, fx);
            }
            _ => {}
        }
    }

    fn finish_turn(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        self.turn = None;
        self.last_activity = now;
        if let Agent::Live(live) = &mut self.agent {
            switch_mode(
                live,
                self.rules.default_mode.agent_side(self.rules.native),
                fx,
            );
        }
    }

    /// Gives the live agent up (a slot being waited for is given up too).
    fn drop_agent(&mut self, how: Stopping, fx: &mut Vec<Effect>) {
        if let Agent::Live(_) = std::mem::replace(&mut self.agent, Agent::Absent) {
            fx.push(Effect::StopAgent(how));
        }
    }

    fn stop(&mut self, reason: StopReason, fx: &mut Vec<Effect>) {
        if self.turn.is_some() && matches!(self.agent, Agent::Live(_)) {
            fx.push(Effect::ToAgent(AgentInput::Interrupt));
        }
        self.drop_agent(Stopping::Wait, fx);
        let (code, message) = match reason {
            StopReason::Archived => ("loop_archived", "the loop was archived"),
            StopReason::Shutdown => (
                "server_restarted",
                "the server stopped while this turn was running",
            ),
        };
        if let Some(turn) = self.turn.take() {
            let began = !matches!(turn.phase, Phase::Sent | Phase::Restarting);
            fx.push(if began && reason == StopReason::Archived {
                Event::Interrupted {
                    turn_id: turn.turn_id,
                }
                .into()
            } else {
                error(Some(turn.turn_id), code, message.into())
            });
        }
        for waiting in std::mem::take(&mut self.queue) {
            fx.push(error(Some(waiting.turn_id), code, message.into()));
        }
    }
}

impl From<Event> for Effect {
    fn from(event: Event) -> Self {
        Self::Emit(event)
    }
}

fn started(
    turn_id: &TurnId,
    cold_start: bool,
    origin: Option<Origin>,
    history_lost: bool,
) -> Effect {
    Effect::Emit(Event::Started {
        turn_id: turn_id.clone(),
        cold_start,
        origin,
        history_lost,
    })
}

/// Says `started` for a turn sent to a cold agent, once.
fn say_started(turn: &mut Running, fx: &mut Vec<Effect>) {
    if matches!(turn.phase, Phase::Sent) {
        fx.push(started(&turn.turn_id, turn.cold, None, turn.history_lost));
        turn.phase = Phase::Streaming;
    }
}

fn switch_mode(live: &mut Live, mode: PermissionMode, fx: &mut Vec<Effect>) {
    if live.mode != mode {
        live.mode = mode;
        fx.push(Effect::ToAgent(AgentInput::SetMode(mode)));
    }
}

fn answer_agent(request_id: String, decision: Decision) -> Effect {
    Effect::ToAgent(AgentInput::Answer {
        request_id,
        decision,
    })
}

fn error(turn_id: Option<TurnId>, code: &str, message: String) -> Effect {
    Effect::Emit(Event::Error {
        turn_id,
        code: code.into(),
        message,
    })
}

#[cfg(test)]
mod tests;
