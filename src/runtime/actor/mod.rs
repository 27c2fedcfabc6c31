//! The one task per live loop: it owns the loop's agent process and its turn
//! queue, runs turns one at a time in arrival order, and writes every event
//! to the loop's log. The rest of the server talks to it with [`Command`]s.
//!
//! A turn is `queued` (waiting behind another turn or for an agent slot),
//! then running from `started` to one of `done`, `interrupted`, `error`. A
//! message goes to the agent only after the previous turn's end, and only
//! one turn runs at a time, so the agent never merges two messages.

mod lifecycle;
mod output;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::Shared;
use super::choices::{self, ChoiceAnswer};
use super::events::{ChoiceKind, ChoiceSource, Event, IdemRecord, Origin, new_turn_id};
use super::log::{Append, EventLog};
use crate::agent::{AgentHandle, AgentInput, AgentOutput, PermissionMode, Session};
use crate::budget::Taken;
use crate::error::ApiError;
use crate::store::LoopId;

/// How long an interrupted agent may take to end its turn before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// While waiting for an agent slot, how often to ask an idle loop for one.
const SLOT_RETRY: Duration = Duration::from_millis(250);

pub enum Command {
    Send {
        content: String,
        mode: Option<PermissionMode>,
        idem: Option<IdemRecord>,
        /// Its place among the user's queued bytes, held while it waits.
        reserved: Taken<String>,
        reply: oneshot::Sender<Result<Sent, ApiError>>,
    },
    Answer {
        choice_id: String,
        answer: ChoiceAnswer,
        source: ChoiceSource,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Replies with the interrupted turn's id, if a turn was running.
    Interrupt {
        reply: oneshot::Sender<Option<String>>,
    },
    /// Give the agent back if it is idle (another loop needs the slot).
    Reclaim,
    Stop {
        reason: StopReason,
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Archived,
    Shutdown,
}

/// A message accepted: its turn and the seq of its `user_message`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub turn_id: String,
    pub seq: u64,
    pub turn: usize,
}

struct Pending {
    turn_id: String,
    content: String,
    mode: Option<PermissionMode>,
    /// `queued` was already said for it.
    announced: bool,
    /// Given back when the turn leaves the queue.
    _reserved: Taken<String>,
}

struct Live {
    input: mpsc::Sender<AgentInput>,
    output: mpsc::Receiver<AgentOutput>,
    handle: AgentHandle,
    permit: OwnedSemaphorePermit,
    /// The permission mode the agent process is in now.
    mode: PermissionMode,
    session: Session,
    /// No turn has begun in this process yet.
    fresh: bool,
}

struct Choice {
    choice_id: String,
    request_id: String,
    kind: ChoiceKind,
    input: Value,
}

struct Running {
    turn_id: String,
    /// The message, kept to send again if a resume fails (user turns only).
    content: Option<String>,
    mode: PermissionMode,
    started: bool,
    cold: bool,
    history_lost: bool,
    pending: Option<Choice>,
    interrupt_deadline: Option<Instant>,
}

type SlotWait = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

pub struct Actor {
    id: LoopId,
    shared: Arc<Shared>,
    log: Arc<EventLog>,
    commands: mpsc::Receiver<Command>,
    me: mpsc::Sender<Command>,
    queue: VecDeque<Pending>,
    agent: Option<Live>,
    turn: Option<Running>,
    waiting_slot: Option<SlotWait>,
    last_activity: Instant,
    /// Events gathered while handling one wake-up, written in one go.
    out: Vec<Append>,
}

enum Wake {
    Command(Option<Command>),
    Output(Vec<AgentOutput>),
    Slot(OwnedSemaphorePermit),
    Idle,
    InterruptOverdue,
    SlotRetry,
}

impl Actor {
    pub fn new(
        id: LoopId,
        shared: Arc<Shared>,
        log: Arc<EventLog>,
        commands: mpsc::Receiver<Command>,
        me: mpsc::Sender<Command>,
    ) -> Self {
        Self {
            id,
            shared,
            log,
            commands,
            me,
            queue: VecDeque::new(),
            agent: None,
            turn: None,
            waiting_slot: None,
            last_activity: Instant::now(),
            out: Vec::new(),
        }
    }

    pub async fn run(mut self) {
        loop {
            self.start_next().await;
            self.flush();
            match self.wait().await {
                Wake::Command(Some(Command::Stop { reason, reply })) => {
                    self.stop(reason).await;
                    let _ = reply.send(());
                    return;
                }
                Wake::Command(Some(cmd)) => self.command(cmd).await,
                Wake::Command(None) => {
                    self.stop(StopReason::Shutdown).await;
                    return;
                }
                Wake::Output(batch) => {
                    for output in batch {
                        self.output(output).await;
                    }
                }
                Wake::Slot(permit) => {
                    self.waiting_slot = None;
                    self.spawn_agent(permit).await;
                }
                Wake::Idle => self.idle().await,
                Wake::InterruptOverdue => self.interrupt_overdue().await,
                Wake::SlotRetry => {
                    self.shared.slots.reclaim_one(self.id);
                }
            }
            self.flush();
        }
    }

    async fn wait(&mut self) -> Wake {
        let idle_at = self.idle_deadline();
        let overdue_at = self.turn.as_ref().and_then(|t| t.interrupt_deadline);
        let waiting = self.waiting_slot.is_some();
        let Self {
            commands,
            agent,
            waiting_slot,
            ..
        } = self;
        tokio::select! {
            cmd = commands.recv() => Wake::Command(cmd),
            batch = next_outputs(agent) => Wake::Output(batch),
            permit = async { waiting_slot.as_mut().expect("guarded").await }, if waiting => Wake::Slot(permit),
            () = sleep_until(idle_at) => Wake::Idle,
            () = sleep_until(overdue_at) => Wake::InterruptOverdue,
            () = tokio::time::sleep(SLOT_RETRY), if waiting => Wake::SlotRetry,
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let timeout = self.shared.config.idle_timeout;
        match &self.turn {
            // A choice nobody answers counts as idle.
            Some(t) if t.pending.is_some() => Some(self.last_activity + timeout),
            Some(_) => None,
            None if self.agent.is_some() && self.queue.is_empty() => {
                Some(self.last_activity + timeout)
            }
            None => None,
        }
    }

    fn emit(&mut self, event: Event) {
        self.out.push(event.into());
    }

    /// Writes the gathered events to the log (one write).
    fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.out);
        let ends_turn = batch.iter().any(|a| a.event.is_terminal());
        if let Err(err) = self.log.append(batch) {
            tracing::error!(loop_id = %self.id, error = %err, "could not write the event log");
        }
        if ends_turn {
            let log = self.log.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(err) = log.sync() {
                    tracing::warn!(error = %err, "could not sync the event log");
                }
            });
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send {
                content,
                mode,
                idem,
                reserved,
                reply,
            } => {
                let _ = reply.send(self.accept(content, mode, idem, reserved));
            }
            Command::Answer {
                choice_id,
                answer,
                source,
                reply,
            } => {
                let _ = reply.send(self.answer(&choice_id, &answer, source).await);
            }
            Command::Interrupt { reply } => {
                let _ = reply.send(self.interrupt().await);
            }
            Command::Reclaim => {
                if self.turn.is_none() && self.queue.is_empty() && self.agent.is_some() {
                    self.stop_agent(false).await;
                }
            }
            Command::Stop { .. } => unreachable!("handled in run"),
        }
    }

    /// Logs the message (and `queued` if it must wait) and queues its turn.
    fn accept(
        &mut self,
        content: String,
        mode: Option<PermissionMode>,
        idem: Option<IdemRecord>,
        reserved: Taken<String>,
    ) -> Result<Sent, ApiError> {
        self.flush();
        let waiting = self.turn.is_some() || !self.queue.is_empty() || self.waiting_slot.is_some();
        let cap = self.shared.config.limits.queued_turns_per_loop;
        if waiting && self.queue.len() >= cap {
            // Refused before anything is logged: the message was not taken.
            return Err(ApiError::RateLimited(
                "queue_full",
                format!(
                    "this loop already has {cap} turns waiting (--max-queued-turns); \
                     send again when one has run"
                ),
                std::time::Duration::from_secs(1),
            ));
        }
        let turn_id = new_turn_id();
        let mut batch = vec![Append {
            event: Event::UserMessage {
                turn_id: turn_id.clone(),
                content: content.clone(),
                created_at: crate::ids::now(),
            },
            idem,
        }];
        if waiting {
            batch.push(
                Event::Queued {
                    turn_id: turn_id.clone(),
                    position: self.queue.len() + 1,
                }
                .into(),
            );
        }
        let written = self.log.append(batch).map_err(ApiError::from)?;
        let (seq, turn) = written[0];
        self.queue.push_back(Pending {
            turn_id: turn_id.clone(),
            content,
            mode,
            announced: waiting,
            _reserved: reserved,
        });
        self.last_activity = Instant::now();
        self.touch_meta();
        Ok(Sent {
            turn_id,
            seq,
            turn: turn.expect("a user message opens a turn"),
        })
    }

    fn touch_meta(&self) {
        let loops = self.shared.loops.clone();
        let id = self.id;
        tokio::task::spawn_blocking(move || {
            if let Err(err) = loops.update(id, |r| r.last_active_at = crate::ids::now()) {
                tracing::warn!(loop_id = %id, error = %err, "could not record loop activity");
            }
        });
    }

    /// Starts queued turns while nothing runs (getting an agent if needed).
    async fn start_next(&mut self) {
        while self.turn.is_none() && self.waiting_slot.is_none() && !self.queue.is_empty() {
            if self.agent.is_none() {
                match self.shared.slots.try_acquire() {
                    Some(permit) => {
                        if !self.spawn_agent(permit).await {
                            continue;
                        }
                    }
                    None => {
                        let first = self.queue.front_mut().expect("queue is not empty");
                        if !first.announced {
                            first.announced = true;
                            let turn_id = first.turn_id.clone();
                            self.emit(Event::Queued {
                                turn_id,
                                position: 1,
                            });
                        }
                        self.waiting_slot = Some(Box::pin(self.shared.slots.clone().acquire()));
                        self.shared.slots.reclaim_one(self.id);
                        return;
                    }
                }
            }
            let next = self.queue.pop_front().expect("queue is not empty");
            self.begin(next);
        }
    }

    fn fail_first_queued(&mut self, code: &str, message: String) {
        tracing::warn!(loop_id = %self.id, code, %message, "a turn could not start");
        if let Some(p) = self.queue.pop_front() {
            self.emit(Event::Error {
                turn_id: Some(p.turn_id),
                code: code.into(),
                message,
            });
        }
    }

    /// Sends a queued message to the (live) agent.
    fn begin(&mut self, pending: Pending) {
        let default = self.shared.config.permission_mode;
        let mode = pending.mode.unwrap_or(default);
        let live = self.agent.as_mut().expect("an agent is live");
        let cold = live.fresh;
        live.fresh = false;
        let native = self.shared.config.native_modes();
        if mode.agent_side(native) != live.mode {
            live.mode = mode.agent_side(native);
            let _ = live.input.try_send(AgentInput::SetMode(live.mode));
        }
        let _ = live
            .input
            .try_send(AgentInput::User(pending.content.clone()));
        self.shared.slots.set_busy(self.id);
        self.turn = Some(Running {
            turn_id: pending.turn_id.clone(),
            content: Some(pending.content),
            mode,
            started: false,
            cold,
            history_lost: false,
            pending: None,
            interrupt_deadline: None,
        });
        self.last_activity = Instant::now();
        // A warm agent starts at once; a cold one when it says it began.
        if !cold {
            self.ensure_started();
        }
    }

    /// Emits `started` for the running turn if not yet done.
    fn ensure_started(&mut self) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        if !turn.started {
            turn.started = true;
            let event = Event::Started {
                turn_id: turn.turn_id.clone(),
                cold_start: turn.cold,
                origin: None,
                history_lost: turn.history_lost,
            };
            self.emit(event);
        }
    }

    /// The running turn's id; output while no turn runs opens an agent turn.
    fn current_turn(&mut self) -> String {
        if self.turn.is_none() {
            let turn_id = new_turn_id();
            self.shared.slots.set_busy(self.id);
            self.turn = Some(Running {
                turn_id: turn_id.clone(),
                content: None,
                mode: self.shared.config.permission_mode,
                started: true,
                cold: false,
                history_lost: false,
                pending: None,
                interrupt_deadline: None,
            });
            self.emit(Event::Started {
                turn_id,
                cold_start: false,
                origin: Some(Origin::Agent),
                history_lost: false,
            });
        }
        self.ensure_started();
        self.turn.as_ref().expect("a turn runs").turn_id.clone()
    }

    async fn answer(
        &mut self,
        choice_id: &str,
        answer: &ChoiceAnswer,
        source: ChoiceSource,
    ) -> Result<(), ApiError> {
        let not_pending = || {
            ApiError::not_found(
                "choice_not_found",
                format!("no pending choice `{choice_id}`"),
            )
        };
        let turn = self.turn.as_mut().ok_or_else(not_pending)?;
        let pending = turn
            .pending
            .as_ref()
            .filter(|p| p.choice_id == choice_id)
            .ok_or_else(not_pending)?;
        let decision = choices::decide(pending.kind, &pending.input, answer)?;
        let request_id = pending.request_id.clone();
        let turn_id = turn.turn_id.clone();
        turn.pending = None;
        self.last_activity = Instant::now();
        self.send_to_agent(AgentInput::Answer {
            request_id,
            decision,
        });
        self.emit(Event::ChoiceResolved {
            turn_id,
            choice_id: choice_id.to_owned(),
            source,
            answer: Some(answer.to_json()),
        });
        Ok(())
    }

    async fn interrupt(&mut self) -> Option<String> {
        let turn = self.turn.as_mut()?;
        let turn_id = turn.turn_id.clone();
        if turn.interrupt_deadline.is_none() {
            turn.interrupt_deadline = Some(Instant::now() + INTERRUPT_GRACE);
            // The agent withdraws its own pending request when interrupted.
            turn.pending = None;
            self.send_to_agent(AgentInput::Interrupt);
        }
        Some(turn_id)
    }

    /// The agent did not end an interrupted turn in time: end it by force.
    async fn interrupt_overdue(&mut self) {
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        tracing::warn!(loop_id = %self.id, "the agent did not stop when interrupted; killing it");
        let turn_id = turn.turn_id.clone();
        self.ensure_started();
        self.emit(Event::Interrupted { turn_id });
        self.finish_turn();
        self.stop_agent(false).await;
    }

    async fn idle(&mut self) {
        if let Some(turn) = self.turn.as_ref() {
            if turn.pending.is_some() {
                let turn_id = turn.turn_id.clone();
                self.emit(Event::Error {
                    turn_id: Some(turn_id),
                    code: "sandbox_evicted".into(),
                    message: "the agent was reclaimed while it waited for an answer".into(),
                });
                self.turn = None;
                self.stop_agent(false).await;
            }
        } else if self.agent.is_some() {
            tracing::info!(loop_id = %self.id, "reclaiming an idle agent");
            self.stop_agent(false).await;
        }
    }

    async fn stop(&mut self, reason: StopReason) {
        if self.turn.is_some() {
            self.send_to_agent(AgentInput::Interrupt);
        }
        self.stop_agent(true).await;
        let (code, message) = match reason {
            StopReason::Archived => ("loop_archived", "the loop was archived"),
            StopReason::Shutdown => (
                "server_restarted",
                "the server stopped while this turn was running",
            ),
        };
        if let Some(turn) = self.turn.take() {
            let turn_id = turn.turn_id;
            let event = if turn.started && reason == StopReason::Archived {
                Event::Interrupted { turn_id }
            } else {
                Event::Error {
                    turn_id: Some(turn_id),
                    code: code.into(),
                    message: message.into(),
                }
            };
            self.emit(event);
        }
        for pending in std::mem::take(&mut self.queue) {
            self.emit(Event::Error {
                turn_id: Some(pending.turn_id),
                code: code.into(),
                message: message.into(),
            });
        }
        self.flush();
        if let Err(err) = self.log.sync() {
            tracing::warn!(error = %err, "could not sync the event log");
        }
    }
}

async fn next_outputs(agent: &mut Option<Live>) -> Vec<AgentOutput> {
    let Some(live) = agent.as_mut() else {
        return std::future::pending().await;
    };
    let mut batch = Vec::new();
    if live.output.recv_many(&mut batch, 256).await == 0 {
        // The agent's side is gone without a word.
        batch.push(AgentOutput::Exited {
            reason: "the agent's output ended".into(),
        });
    }
    batch
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
