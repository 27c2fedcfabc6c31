//! The one task per live loop, a thin shell around its [`LoopMachine`]: it
//! feeds the machine what happens (commands, the agent's output, an agent
//! slot, the time) and performs the effects it returns: events written to
//! the log (all of one wake-up in one write), input to the agent, starting
//! and stopping the agent process. The rules themselves are in `machine`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::choices::ChoiceAnswer;
use super::error::RuntimeError;
use super::events::{ChoiceSource, Event, IdemRecord};
use super::idempotency::Recorded;
use super::log::{Append, EventLog};
use super::machine::{Effect, Input, LoopMachine, RandomIds, Refusal, Reply, StopReason, Stopping};
use crate::agent::rules::StandingRule;
use crate::agent::{AgentEvent, AgentOutput, AgentProcess, PermissionMode};
use crate::budget::Taken;
use crate::store::LoopId;
use crate::store::audit::AuditEntry;

/// While waiting for an agent slot, how often to ask an idle loop for one.
const SLOT_RETRY: Duration = Duration::from_millis(250);
/// How often events the log refused are tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Events kept for a log that refuses them, at most.
const MAX_UNWRITTEN: usize = 4096;
/// Agent output already waiting is gathered into one write up to this many events.
const COALESCE_EVENTS: usize = 2048;

/// What the rest of the server asks of a loop.
pub enum Command {
    Send {
        content: String,
        mode: Option<PermissionMode>,
        idem: Option<IdemRecord>,
        /// Its place among the user's queued bytes, held while it waits.
        reserved: Taken<String>,
        reply: oneshot::Sender<Result<Sent, RuntimeError>>,
    },
    Answer {
        choice_id: String,
        answer: ChoiceAnswer,
        source: ChoiceSource,
        reply: oneshot::Sender<Result<(), RuntimeError>>,
    },
    /// Replies with the interrupted turn's id, if a turn was running.
    Interrupt {
        reply: oneshot::Sender<Option<String>>,
    },
    /// Give the agent back if it is idle (another loop needs the slot).
    Reclaim,
    /// Turns a node that died left waiting (already in the log): run them.
    Requeue {
        turns: Vec<(String, String, Taken<String>)>,
    },
    Stop {
        reason: StopReason,
        reply: oneshot::Sender<()>,
    },
}

/// A message accepted: its turn and the seq of its `user_message`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub turn_id: String,
    pub seq: u64,
    pub turn: usize,
}

type SlotWait = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

/// What the loop holds of the machine's resources.
enum Held {
    Nothing,
    /// Waiting for an agent slot.
    Waiting(SlotWait),
    /// A slot, no process (about to start one).
    Slot(OwnedSemaphorePermit),
    Agent(OwnedSemaphorePermit, AgentProcess),
}

pub struct Actor {
    id: LoopId,
    shared: Arc<Shared>,
    log: Arc<EventLog>,
    commands: mpsc::Receiver<Command>,
    /// Weak: the loop's task ends when the runtime lets go of its sender.
    me: mpsc::WeakSender<Command>,
    /// Cancelled when this node lets the loop's lease go: from then on this
    /// task writes, sends and starts nothing, and ends at once (the loop
    /// may be this node's again soon, with a new task).
    retired: CancellationToken,
    machine: LoopMachine<Taken<String>>,
    held: Held,
    /// Told the slots that this loop's agent may be reclaimed.
    offered: bool,
    /// Events gathered while handling one wake-up, written in one go.
    out: Vec<Append>,
    effects: Vec<Effect>,
    /// Inputs that performing effects brought, fed next.
    follow_ups: VecDeque<Input<Taken<String>>>,
    /// Agent processes started so far (tells one process's output from the next's).
    started: u64,
    /// The log refused more events than [`MAX_UNWRITTEN`]: the turn must end.
    unwritable: bool,
    /// The shared log refused a write (another node holds the lease now, or
    /// this node let it go), with the generation it was written under (0:
    /// none was held).
    fenced: Option<i64>,
    /// The agent's exit, read while gathering its output (handled next).
    pending_exit: Option<String>,
}

enum Wake {
    /// This node let the loop's lease go (see [`Actor::retired`]).
    Retired,
    Command(Option<Command>),
    Output(Option<AgentOutput>),
    Slot(OwnedSemaphorePermit),
    Tick,
    SlotRetry,
    /// Events are waiting for the log to take them again.
    RetryWrite,
}

impl Actor {
    /// Gives the machine the standing rules in force on this loop now
    /// (read just before a permission request is handled, so a rule made
    /// or deleted a moment ago counts).
    fn refresh_standing(&mut self) {
        let Some(record) = self.shared.loops.get(self.id) else {
            return;
        };
        let standing = self
            .shared
            .rules
            .applicable(&record.created_by, self.id)
            .into_iter()
            .map(|r| StandingRule {
                id: r.id,
                behavior: r.behavior,
                rule: r.rule,
            })
            .collect();
        self.machine.set_standing(standing);
    }

    /// Records in the audit trail that a standing rule answered a choice
    /// (in the background: the turn does not wait for the disk).
    fn audit_rule_answer(
        &self,
        choice_id: &str,
        answer: Option<&serde_json::Value>,
        rule_id: Option<&str>,
    ) {
        let Some(record) = self.shared.loops.get(self.id) else {
            return;
        };
        let allowed = answer.and_then(|a| a["allow"].as_bool()) == Some(true);
        let entry = AuditEntry::new(&record.created_by, "choice.answered")
            .with("loop_id", self.id.to_string())
            .with("choice_id", choice_id)
            .with("how", if allowed { "allowed" } else { "denied" })
            .with("via", "rule")
            .with("rule_id", rule_id);
        let audit = self.shared.audit.clone();
        self.shared.tasks.spawn_blocking(move || {
            if let Err(err) = audit.record(&entry) {
                tracing::error!(error = %err, "could not write the audit trail");
            }
        });
    }

    pub fn new(
        id: LoopId,
        shared: Arc<Shared>,
        log: Arc<EventLog>,
        commands: mpsc::Receiver<Command>,
        me: mpsc::WeakSender<Command>,
        retired: CancellationToken,
    ) -> Self {
        let machine = LoopMachine::new(shared.rules(), Box::new(RandomIds), Instant::now());
        Self {
            id,
            shared,
            log,
            commands,
            me,
            retired,
            machine,
            held: Held::Nothing,
            offered: false,
            out: Vec::new(),
            effects: Vec::new(),
            follow_ups: VecDeque::new(),
            started: 0,
            unwritable: false,
            fenced: None,
            pending_exit: None,
        }
    }

    pub async fn run(mut self) {
        loop {
            match self.wait().await {
                Wake::Command(Some(Command::Stop { reason, reply })) => {
                    self.stop(reason).await;
                    if let Some(cluster) = self.shared.cluster.clone() {
                        cluster.release(self.id, &self.log).await;
                    }
                    let _ = reply.send(());
                    return;
                }
                Wake::Command(None) => return self.stop(StopReason::Shutdown).await,
                // (The runtime let the lease go already: it may be this
                // node's again, under a new generation, by now, with
                // another task.)
                Wake::Retired => {
                    self.lost(None).await;
                    return self.refuse_queued();
                }
                Wake::Command(Some(cmd)) => self.command(cmd).await,
                Wake::Output(Some(AgentOutput::Events(events))) => {
                    let now = Instant::now();
                    let from = self.started;
                    let mut events = Some(events);
                    // Whatever else the agent said meanwhile goes into the
                    // same write (one round trip to a shared log, not one
                    // per read of the agent's output).
                    while let Some(batch) = events.take() {
                        for event in batch {
                            // The rest of a batch is dropped with its process.
                            if self.started != from || !matches!(self.held, Held::Agent(..)) {
                                break;
                            }
                            if matches!(
                                event,
                                AgentEvent::PermissionRequest { .. }
                                    | AgentEvent::RequestCancelled { .. }
                            ) {
                                self.refresh_standing();
                            }
                            self.feed_at(Input::Agent(event), now).await;
                        }
                        if self.out.len() >= COALESCE_EVENTS || self.started != from {
                            break;
                        }
                        events = match &mut self.held {
                            Held::Agent(_, process) => match process.output.try_recv() {
                                Ok(AgentOutput::Events(more)) => Some(more),
                                Ok(AgentOutput::Exited { reason }) => {
                                    self.pending_exit = Some(reason);
                                    None
                                }
                                Err(_) => None,
                            },
                            _ => None,
                        };
                    }
                    if let Some(reason) = self.pending_exit.take() {
                        self.feed(Input::AgentExited(reason)).await;
                    }
                }
                Wake::Output(Some(AgentOutput::Exited { reason })) => {
                    self.feed(Input::AgentExited(reason)).await;
                }
                Wake::Output(None) => {
                    // The agent's side is gone without a word.
                    let reason = "the agent's output ended".to_owned();
                    self.feed(Input::AgentExited(reason)).await;
                }
                Wake::Slot(permit) => {
                    self.held = Held::Slot(permit);
                    self.feed(Input::SlotGranted).await;
                }
                Wake::Tick => {
                    self.feed(Input::Tick).await;
                }
                Wake::SlotRetry => {
                    self.shared.slots.reclaim_one(self.id);
                }
                Wake::RetryWrite => {}
            }
            self.flush().await;
            if self.unwritable {
                self.unwritable = false;
                self.feed(Input::LogUnwritable).await;
                self.flush().await;
            }
            if let Some(generation) = self.fenced {
                tracing::warn!(loop_id = %self.id, "another node holds this loop's lease now, or this node let it go; stopping here");
                self.lost(Some(generation)).await;
                return self.refuse_queued();
            }
            if self.out.is_empty()
                && self.machine.quiet()
                && self.log.held().is_some()
                && let Some(cluster) = self.shared.cluster.clone()
            {
                // Nothing runs here any more: the loop is free for any node
                // (this task stays, lease-less, for the next command).
                let _claimed = cluster.claiming.lock().await;
                if self.commands.is_empty() {
                    cluster.release(self.id, &self.log).await;
                }
            }
        }
    }

    /// Answers what waits in the queue of a retired task: sent again, it
    /// finds the loop where it runs now.
    fn refuse_queued(&mut self) {
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(RuntimeError::Moving));
                }
                Command::Answer { reply, .. } => {
                    let _ = reply.send(Err(RuntimeError::Moving));
                }
                Command::Stop { reply, .. } => {
                    let _ = reply.send(());
                }
                // (Dropped: the caller hears the loop's task went away.)
                Command::Interrupt { .. } | Command::Reclaim | Command::Requeue { .. } => {}
            }
        }
    }

    /// The lease is gone: the agent stops, and nothing more is written.
    /// `refused_under`: this task found out itself (a write under that
    /// generation was refused), so it lets the lease go, if this node
    /// still holds it under that generation (not if it was let go and
    /// taken again meanwhile).
    async fn lost(&mut self, refused_under: Option<i64>) {
        if let Some(generation) = refused_under
            && self.log.let_go_if(generation)
            && let Some(cluster) = &self.shared.cluster
        {
            cluster.forget(self.id);
        }
        self.out.clear();
        // Killed at once, no grace: another node may run this loop soon,
        // and the tool in flight must not go on beside it.
        if let Held::Agent(permit, process) = std::mem::replace(&mut self.held, Held::Nothing) {
            let AgentProcess { input, handle, .. } = process;
            drop(input);
            self.shared.tasks.spawn(async move {
                handle.kill().await;
                drop(permit);
            });
        }
        if self.offered {
            self.shared.slots.set_busy(self.id);
        }
    }

    async fn wait(&mut self) -> Wake {
        let deadline = self.machine.next_deadline();
        let Self {
            commands,
            held,
            out,
            retired,
            ..
        } = self;
        let (output, slot) = match held {
            Held::Agent(_, process) => (Some(&mut process.output), None),
            Held::Waiting(wait) => (None, Some(wait)),
            Held::Nothing | Held::Slot(_) => (None, None),
        };
        let waiting = slot.is_some();
        let unwritten = !out.is_empty();
        tokio::select! {
            biased;
            () = retired.cancelled() => Wake::Retired,
            cmd = commands.recv() => Wake::Command(cmd),
            out = recv(output) => Wake::Output(out),
            permit = wait_slot(slot) => Wake::Slot(permit),
            () = sleep_until(deadline) => Wake::Tick,
            () = tokio::time::sleep(SLOT_RETRY), if waiting => Wake::SlotRetry,
            () = tokio::time::sleep(WRITE_RETRY), if unwritten => Wake::RetryWrite,
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
            } => match self.log_message(&content, idem).await {
                Err(err) => {
                    let _ = reply.send(Err(err));
                }
                Ok(sent) => {
                    // Answered once the message is in the log: the stream
                    // starts while the agent may still be starting.
                    let turn_id = sent.turn_id.as_str().into();
                    let _ = reply.send(Ok(sent));
                    let input = Input::Send {
                        turn_id,
                        content,
                        mode,
                        hold: reserved,
                    };
                    self.feed(input).await;
                    self.touch();
                }
            },
            Command::Answer {
                choice_id,
                answer,
                source,
                reply,
            } => {
                let not_pending = format!("no pending choice `{choice_id}`");
                // Requests waiting behind this choice are handled next:
                // with the rules in force now (one just made, say).
                self.refresh_standing();
                let input = Input::Answer {
                    choice_id,
                    answer,
                    source,
                };
                let answered = match self.feed(input).await {
                    Some(Reply::Answered(Ok(()))) => Ok(()),
                    Some(Reply::Answered(Err(Refusal::Misfit(message)))) => {
                        Err(RuntimeError::invalid("invalid_choice_payload", message))
                    }
                    _ => Err(RuntimeError::NotFound("choice_not_found", not_pending)),
                };
                let _ = reply.send(answered);
            }
            Command::Interrupt { reply } => {
                let id = match self.feed(Input::Interrupt).await {
                    Some(Reply::Interrupting(id)) => id,
                    _ => None,
                };
                let _ = reply.send(id);
            }
            Command::Reclaim => {
                self.feed(Input::Reclaim).await;
            }
            Command::Requeue { turns } => {
                for (turn_id, content, hold) in turns {
                    let input = Input::Send {
                        turn_id: turn_id.as_str().into(),
                        content,
                        mode: None,
                        hold,
                    };
                    self.feed(input).await;
                }
            }
            Command::Stop { .. } => unreachable!("run handles Stop"),
        }
    }

    /// Logs the message (and `queued` if it must wait) and records its
    /// idempotency key; the machine takes the message after that.
    async fn log_message(
        &mut self,
        content: &str,
        idem: Option<IdemRecord>,
    ) -> Result<Sent, RuntimeError> {
        self.flush().await;
        if self.retired.is_cancelled() || self.fenced.is_some() {
            return Err(RuntimeError::Moving);
        }
        if !self.out.is_empty() {
            return Err(RuntimeError::Internal(
                "the loop's event log cannot be written".into(),
            ));
        }
        let admission = self.machine.admit(content, crate::ids::now())?;
        let mut batch: Vec<Append> = admission.events.into_iter().map(Append::from).collect();
        batch[0].idem = idem.clone();
        // Refused before the machine takes it: a message not logged was not
        // sent. Refused because the lease went (or was let go while the
        // write waited, when it may still land): the caller sends it again,
        // to whichever node runs the loop now (with its Idempotency-Key).
        let (seq, turn) = match append_noting_fence(&self.log, &mut self.fenced, &batch).await {
            Ok(placed) => placed,
            Err(crate::store::StoreError::Fenced(_)) => return Err(RuntimeError::Moving),
            Err(err) => return Err(err.into()),
        };
        let turn_id = admission.turn_id;
        if let Some(idem) = idem {
            // Recorded here, not by the request: a client that gives up
            // waiting cannot leave a logged message without its key.
            let recorded = Recorded {
                body_hash: idem.body_hash,
                loop_id: self.id,
                turn_id: turn_id.to_string(),
                seq,
                at: chrono::Utc::now(),
            };
            let mut index = self.shared.idem.lock().expect("idem poisoned");
            index.insert(&idem.user, &idem.key, recorded);
        }
        Ok(Sent {
            turn_id: turn_id.to_string(),
            seq,
            turn: turn.expect("a user message opens a turn"),
        })
    }

    /// Hands one input to the machine and performs what it says, with the
    /// inputs that performing brings (a slot, an agent started or stuck).
    /// Returns the machine's reply to the input, if it gave one.
    async fn feed(&mut self, input: Input<Taken<String>>) -> Option<Reply> {
        self.feed_at(input, Instant::now()).await
    }

    /// [`Self::feed`] at a moment already read (one clock reading per batch).
    async fn feed_at(&mut self, input: Input<Taken<String>>, now: Instant) -> Option<Reply> {
        let mut next = Some(input);
        let mut reply = None;
        let mut now = now;
        while let Some(input) = next.take().or_else(|| self.follow_ups.pop_front()) {
            let mut effects = std::mem::take(&mut self.effects);
            self.machine.handle_into(input, now, &mut effects);
            for effect in effects.drain(..) {
                if let Some(r) = self.perform(effect).await {
                    reply = Some(r);
                }
            }
            self.effects = effects;
            if !self.follow_ups.is_empty() {
                // They may come after a start that took a while.
                now = Instant::now();
            }
        }
        if !self.machine.wants_slot() && matches!(self.held, Held::Waiting(_)) {
            self.held = Held::Nothing;
        }
        self.offer_slot();
        reply
    }

    async fn perform(&mut self, effect: Effect) -> Option<Reply> {
        // Let go of: nothing more is written, sent or started (stops and
        // replies still happen).
        if self.retired.is_cancelled()
            && !matches!(
                effect,
                Effect::Reply(_) | Effect::Warn(_) | Effect::StopAgent(_)
            )
        {
            return None;
        }
        match effect {
            Effect::Emit(event) => {
                if let Event::ChoiceResolved {
                    choice_id,
                    source: ChoiceSource::Rule,
                    answer,
                    rule_id,
                    ..
                } = &event
                {
                    self.audit_rule_answer(choice_id, answer.as_ref(), rule_id.as_deref());
                }
                self.out.push(event.into());
            }
            Effect::ToAgent(input) => {
                if let Held::Agent(_, process) = &self.held
                    && let Err(TrySendError::Full(_)) = process.input.try_send(input)
                {
                    self.follow_ups.push_back(Input::AgentStuck);
                }
                // Closed: the agent is gone, and its output says so next.
            }
            Effect::AcquireSlot => match self.shared.slots.try_acquire() {
                Some(permit) => {
                    self.held = Held::Slot(permit);
                    self.follow_ups.push_back(Input::SlotGranted);
                }
                None => {
                    self.held = Held::Waiting(Box::pin(self.shared.slots.clone().acquire()));
                    self.shared.slots.reclaim_one(self.id);
                    self.follow_ups.push_back(Input::SlotBusy);
                }
            },
            Effect::StartAgent { fresh } => {
                let Held::Slot(permit) = std::mem::replace(&mut self.held, Held::Nothing) else {
                    let message = "the loop has no agent slot to start an agent with".into();
                    self.follow_ups
                        .push_back(Input::AgentFailedToStart(message));
                    return None;
                };
                // Events so far go out before a start that may take a while.
                self.flush().await;
                self.follow_ups.push_back(
                    match super::launch::start(&self.shared, self.id, fresh).await {
                        Ok((process, _)) if self.retired.is_cancelled() => {
                            // Let go of while it started: it never runs.
                            self.shared.tasks.spawn(async move {
                                process.handle.kill().await;
                                drop(permit);
                            });
                            Input::AgentFailedToStart("this node let the loop go".into())
                        }
                        Ok((process, resumed)) => {
                            self.started += 1;
                            self.held = Held::Agent(permit, process);
                            Input::AgentStarted { resumed }
                        }
                        Err(message) => Input::AgentFailedToStart(message),
                    },
                );
            }
            Effect::StopAgent(how) => self.stop_agent(how).await,
            Effect::Reply(reply) => return Some(reply),
            Effect::Warn(message) => tracing::warn!(loop_id = %self.id, "{message}"),
        }
        None
    }

    /// Ends the agent process and everything it started (its stdin closed
    /// first, for a graceful exit).
    async fn stop_agent(&mut self, how: Stopping) {
        let Held::Agent(permit, process) = std::mem::replace(&mut self.held, Held::Nothing) else {
            return;
        };
        let AgentProcess { input, handle, .. } = process;
        drop(input);
        match how {
            Stopping::Release => {
                // Tracked: shutdown waits for the stop and its sweep.
                self.shared.tasks.spawn(async move {
                    handle.stop().await;
                    drop(permit);
                });
            }
            Stopping::KeepSlot => {
                handle.stop().await;
                self.held = Held::Slot(permit);
            }
            Stopping::Wait => handle.stop().await,
        }
    }

    /// Keeps the slots' list of reclaimable agents true to the machine.
    fn offer_slot(&mut self) {
        let reclaimable = self.machine.reclaimable();
        if reclaimable == self.offered {
            return;
        }
        self.offered = reclaimable;
        if reclaimable {
            let me = self.me.clone();
            let reclaim = move || {
                me.upgrade()
                    .is_some_and(|tx| tx.try_send(Command::Reclaim).is_ok())
            };
            self.shared.slots.set_idle(self.id, Box::new(reclaim));
        } else {
            self.shared.slots.set_busy(self.id);
        }
    }

    /// Writes the gathered events to the log (one write); a batch that ends
    /// a turn is synced to disk soon, in the background. Events the log
    /// refuses are kept and tried again (every [`WRITE_RETRY`]); past
    /// [`MAX_UNWRITTEN`] they are dropped, loudly, and the turn is ended.
    async fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        if self.retired.is_cancelled() {
            self.out.clear();
            return;
        }
        match append_noting_fence(&self.log, &mut self.fenced, &self.out).await {
            Ok(_) => {
                let ends_turn = self.out.iter().any(|a| a.event.is_terminal());
                self.out.clear();
                if ends_turn {
                    self.log
                        .sync_soon(&self.shared.tasks, &self.shared.stopping);
                }
            }
            Err(crate::store::StoreError::Fenced(_)) => self.out.clear(),
            Err(err) if self.out.len() > MAX_UNWRITTEN => {
                tracing::error!(
                    loop_id = %self.id, error = %err, lost = self.out.len(),
                    "could not write the event log; dropping its unwritten events and stopping the turn"
                );
                self.out.clear();
                self.unwritable = true;
            }
            Err(err) => {
                tracing::error!(loop_id = %self.id, error = %err, "could not write the event log; will try again");
            }
        }
    }

    /// Records the loop's last activity (in the background, tracked).
    fn touch(&self) {
        let loops = self.shared.loops.clone();
        let id = self.id;
        self.shared.tasks.spawn_blocking(move || {
            if let Err(err) = loops.touch(id, crate::ids::now()) {
                tracing::warn!(loop_id = %id, error = %err, "could not record loop activity");
            }
        });
    }

    async fn stop(&mut self, reason: StopReason) {
        self.feed(Input::Stop(reason)).await;
        self.held = Held::Nothing;
        self.flush().await;
        if let Err(err) = self.log.sync() {
            tracing::warn!(error = %err, "could not sync the event log");
        }
    }
}

async fn recv(output: Option<&mut mpsc::Receiver<AgentOutput>>) -> Option<AgentOutput> {
    match output {
        Some(output) => output.recv().await,
        None => std::future::pending().await,
    }
}

/// Appends `items`; a write refused for the lease (lost, or let go while
/// it waited) is noted in `fenced` with the generation it was made under.
async fn append_noting_fence(
    log: &EventLog,
    fenced: &mut Option<i64>,
    items: &[Append],
) -> Result<(u64, Option<usize>), crate::store::StoreError> {
    let under = log.held().unwrap_or(0);
    let appended = log.append_async(items).await;
    if let Err(crate::store::StoreError::Fenced(_)) = &appended {
        *fenced = Some(under);
    }
    appended
}

async fn wait_slot(slot: Option<&mut SlotWait>) -> OwnedSemaphorePermit {
    match slot {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::events::Event;
    use crate::runtime::tests::{new_loop, runtime};

    #[tokio::test]
    async fn an_agent_that_stops_reading_fails_its_turn_with_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime(dir.path());
        let record = new_loop(&runtime);
        let log = runtime.log(record.id).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let mut actor = Actor::new(
            record.id,
            runtime.shared.clone(),
            log.clone(),
            rx,
            tx.downgrade(),
            CancellationToken::new(),
        );
        let reserved = runtime.shared.queued.take("alice".into(), 4).unwrap();
        let sent = actor.log_message("/sleep 60", None).await.unwrap();
        let input = Input::Send {
            turn_id: sent.turn_id.as_str().into(),
            content: "/sleep 60".into(),
            mode: None,
            hold: reserved,
        };
        actor.feed(input).await;
        // The (echo) agent runs the turn; now its input is full.
        let Held::Agent(_, process) = &mut actor.held else {
            panic!("the turn's agent is live");
        };
        let (full, _kept) = mpsc::channel(1);
        full.try_send(crate::agent::AgentInput::Interrupt).unwrap();
        process.input = full;
        actor.feed(Input::Interrupt).await;
        actor.flush().await;
        let mut events: Vec<Event> = Vec::new();
        log.scan_from_offset(0, |stored| {
            if stored.event.turn_id() == Some(sent.turn_id.as_str()) {
                events.push(stored.event);
            }
            true
        })
        .unwrap();
        let last = events.last().expect("the turn has events");
        assert!(
            matches!(last, Event::Error { code, .. } if code == "agent_unresponsive"),
            "{events:?}"
        );
        assert!(
            matches!(actor.held, Held::Nothing),
            "the stuck agent was stopped"
        );
        drop((actor, tx));
        runtime.shutdown().await;
    }
}
