//! Table tests of a loop's rules: each case is a story of inputs, each with
//! the effects it must have, written in a short form (see [`show`]).

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::agent::Decision;

/// Ids counted from 1, so a table can name them.
#[derive(Default)]
struct Counted {
    turns: usize,
    choices: usize,
}

impl Ids for Counted {
    fn turn(&mut self) -> String {
        self.turns += 1;
        format!("turn_{}", self.turns)
    }
    fn choice(&mut self) -> String {
        self.choices += 1;
        format!("choice_{}", self.choices)
    }
}

fn rules() -> Rules {
    Rules {
        default_mode: PermissionMode::Default,
        native: NativeModes {
            bypass: false,
            dont_ask: true,
        },
        max_queued: 2,
        idle_timeout: Duration::from_secs(60),
        interrupt_grace: Duration::from_secs(5),
    }
}

enum Step {
    /// A message (admitted, then sent) with an optional mode.
    Say(&'static str, Option<PermissionMode>),
    In(Input<()>),
    /// Time passes (seconds since the story began), then `Tick`.
    At(u64),
}

use Step::{At, In, Say};

fn say(text: &'static str) -> Step {
    Say(text, None)
}

fn agent(event: AgentEvent) -> Step {
    In(Input::Agent(event))
}

fn delta(text: &str) -> Step {
    agent(AgentEvent::TextDelta(text.into()))
}

fn init() -> Step {
    agent(AgentEvent::Init {
        session_id: "s".into(),
    })
}

fn success() -> Step {
    agent(AgentEvent::TurnEnd(TurnEnd::Success {
        usage: Default::default(),
    }))
}

fn failed(message: &str) -> Step {
    agent(AgentEvent::TurnEnd(TurnEnd::Failed {
        message: message.into(),
        usage: Default::default(),
    }))
}

fn ask(request_id: &str, tool: &str) -> Step {
    agent(AgentEvent::PermissionRequest {
        request_id: request_id.into(),
        tool: tool.into(),
        input: json!({"command": "ls"}),
        title: None,
    })
}

fn allow(choice_id: &str, allow: bool) -> Step {
    In(Input::Answer {
        choice_id: choice_id.into(),
        answer: ChoiceAnswer::Allow {
            allow,
            message: None,
        },
        source: ChoiceSource::Api,
    })
}

fn started_agent(resumed: bool) -> Step {
    In(Input::AgentStarted { resumed })
}

/// A live agent, started for the first message: the steps every story with
/// a running agent begins with.
fn warm() -> Vec<(Step, &'static [&'static str])> {
    vec![
        (
            say("hi"),
            &["user_message turn_1", "reply sent", "acquire slot"],
        ),
        (In(Input::SlotGranted), &["start agent"]),
        (started_agent(false), &["→agent user hi"]),
        (init(), &["started turn_1 cold"]),
        (success(), &["done turn_1"]),
    ]
}

fn show(effect: &Effect) -> String {
    match effect {
        Effect::Emit(event) => show_event(event),
        Effect::ToAgent(input) => match input {
            AgentInput::User(text) => format!("→agent user {text}"),
            AgentInput::Answer {
                request_id,
                decision: Decision::Allow { .. },
            } => format!("→agent allow {request_id}"),
            AgentInput::Answer {
                request_id,
                decision: Decision::Deny { .. },
            } => format!("→agent deny {request_id}"),
            AgentInput::Interrupt => "→agent interrupt".into(),
            AgentInput::SetMode(mode) => format!("→agent mode {}", mode.as_str()),
        },
        Effect::AcquireSlot => "acquire slot".into(),
        Effect::StartAgent { fresh: false } => "start agent".into(),
        Effect::StartAgent { fresh: true } => "start fresh agent".into(),
        Effect::StopAgent(Stopping::Release) => "stop agent".into(),
        Effect::StopAgent(Stopping::KeepSlot) => "stop agent keeping slot".into(),
        Effect::StopAgent(Stopping::Wait) => "stop agent and wait".into(),
        Effect::Reply(Reply::Sent) => "reply sent".into(),
        Effect::Reply(Reply::Answered(Ok(()))) => "reply answered".into(),
        Effect::Reply(Reply::Answered(Err(Refusal::NotPending))) => "reply not pending".into(),
        Effect::Reply(Reply::Answered(Err(Refusal::Misfit(_)))) => "reply misfit".into(),
        Effect::Reply(Reply::Interrupting(Some(id))) => format!("reply interrupting {id}"),
        Effect::Reply(Reply::Interrupting(None)) => "reply nothing runs".into(),
        Effect::Reply(Reply::Stopped) => "reply stopped".into(),
        Effect::Warn(_) => "warn".into(),
    }
}

fn show_event(event: &Event) -> String {
    match event {
        Event::UserMessage { turn_id, .. } => format!("user_message {turn_id}"),
        Event::Queued { turn_id, position } => format!("queued {turn_id} @{position}"),
        Event::Started {
            turn_id,
            cold_start,
            origin,
            history_lost,
        } => {
            let mut s = format!("started {turn_id}");
            if *cold_start {
                s += " cold";
            }
            if origin.is_some() {
                s += " by agent";
            }
            if *history_lost {
                s += " history_lost";
            }
            s
        }
        Event::AssistantDelta { turn_id, text } => format!("delta {turn_id} {text}"),
        Event::ThinkingDelta { turn_id, text } => format!("thinking {turn_id} {text}"),
        Event::ToolCall { turn_id, tool, .. } => format!("tool_call {turn_id} {tool}"),
        Event::ToolResult { turn_id, ok, .. } => format!("tool_result {turn_id} {ok}"),
        Event::RequiresChoice {
            turn_id,
            choice_id,
            kind,
            ..
        } => format!("requires_choice {turn_id} {choice_id} {kind:?}").to_lowercase(),
        Event::ChoiceResolved {
            turn_id,
            choice_id,
            source: ChoiceSource::Rule,
            rule_id,
            rule,
            ..
        } => format!(
            "choice_resolved {turn_id} {choice_id} rule {} {}",
            rule_id.as_deref().unwrap_or("-"),
            rule.as_deref().unwrap_or("-")
        ),
        Event::ChoiceResolved {
            turn_id, choice_id, ..
        } => format!("choice_resolved {turn_id} {choice_id}"),
        Event::Done { turn_id, .. } => format!("done {turn_id}"),
        Event::Interrupted { turn_id } => format!("interrupted {turn_id}"),
        Event::Error { turn_id, code, .. } => {
            format!("error {} {code}", turn_id.as_deref().unwrap_or("-"))
        }
    }
}

/// Plays a story and checks every step's effects (and the machine's state
/// questions after the last one, when given).
fn play(name: &str, rules: Rules, steps: Vec<(Step, &[&str])>) -> LoopMachine<()> {
    play_with(name, rules, Vec::new(), steps)
}

/// [`play`] with standing permission rules in force.
fn play_with(
    name: &str,
    rules: Rules,
    standing: Vec<crate::agent::rules::StandingRule>,
    steps: Vec<(Step, &[&str])>,
) -> LoopMachine<()> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut m = LoopMachine::new(rules, Box::new(Counted::default()), t0);
    m.set_standing(standing);
    for (i, (step, want)) in steps.into_iter().enumerate() {
        let got: Vec<String> = match step {
            Say(text, mode) => match m.admit(text, chrono::Utc::now()) {
                Err(err) => vec![format!("refused {}", err.code().unwrap_or("-"))],
                Ok(admission) => {
                    let mut got: Vec<String> = admission.events.iter().map(show_event).collect();
                    let input = Input::Send {
                        turn_id: admission.turn_id,
                        content: text.into(),
                        mode,
                        hold: (),
                    };
                    got.extend(m.handle(input, now).iter().map(show));
                    got
                }
            },
            In(input) => m.handle(input, now).iter().map(show).collect(),
            At(secs) => {
                now = t0 + Duration::from_secs(secs);
                m.handle(Input::Tick, now).iter().map(show).collect()
            }
        };
        assert_eq!(got, want, "{name}, step {}", i + 1);
    }
    m
}

/// A permission request for `Bash` running `command`.
fn bash(request_id: &str, command: &str) -> Step {
    agent(AgentEvent::PermissionRequest {
        request_id: request_id.into(),
        tool: "Bash".into(),
        input: json!({"command": command}),
        title: None,
    })
}

#[test]
fn a_standing_rule_answers_what_it_covers_and_nothing_else() {
    use crate::agent::rules::{Behavior, Rule, StandingRule};
    let rule = |id: &str, behavior, command: &str| StandingRule {
        id: id.into(),
        behavior,
        rule: Rule {
            tool: "Bash".into(),
            content: Some(command.into()),
        },
    };
    let standing = vec![
        rule("rule_a", Behavior::Allow, "npm test"),
        rule("rule_d", Behavior::Deny, "rm -rf build"),
        // A deny rule wins over an allow rule for the same request.
        rule("rule_both", Behavior::Allow, "rm -rf build"),
    ];
    let mut steps = warm();
    steps.extend(vec![
        (
            say("go"),
            &[
                "user_message turn_2",
                "reply sent",
                "→agent user go",
                "started turn_2",
            ][..],
        ),
        (
            bash("r1", "npm test"),
            &[
                "→agent allow r1",
                "choice_resolved turn_2 choice_1 rule rule_a Bash(npm test)",
            ][..],
        ),
        (
            bash("r2", "rm -rf build"),
            &[
                "→agent deny r2",
                "choice_resolved turn_2 choice_2 rule rule_d Bash(rm -rf build)",
            ][..],
        ),
        // Anything else is asked, as without rules.
        (
            bash("r3", "npm test -- --all"),
            &["requires_choice turn_2 choice_3 permission"][..],
        ),
        (
            allow("choice_3", true),
            &[
                "→agent allow r3",
                "choice_resolved turn_2 choice_3",
                "reply answered",
            ][..],
        ),
        // Never a question.
        (
            ask("r4", "AskUserQuestion"),
            &["requires_choice turn_2 choice_4 question"][..],
        ),
    ]);
    play_with("rules", rules(), standing, steps);
}

fn story(name: &str, steps: Vec<(Step, &[&str])>) -> LoopMachine<()> {
    play(name, rules(), steps)
}

fn warm_story(name: &str, more: Vec<(Step, &[&str])>) -> LoopMachine<()> {
    let mut steps = warm();
    steps.extend(more);
    story(name, steps)
}

#[test]
fn a_first_message_gets_an_agent_and_runs() {
    let m = warm_story(
        "first message",
        vec![(
            delta("late"),
            &["started turn_2 by agent", "delta turn_2 late"],
        )],
    );
    assert!(!m.reclaimable(), "an agent turn runs");
}

#[test]
fn messages_queue_while_busy_and_run_in_order() {
    let m = warm_story(
        "queueing",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                say("b"),
                &["user_message turn_3", "queued turn_3 @1", "reply sent"],
            ),
            (
                say("c"),
                &["user_message turn_4", "queued turn_4 @2", "reply sent"],
            ),
            (say("d"), &["refused queue_full"]),
            (delta("x"), &["delta turn_2 x"]),
            (
                success(),
                &["done turn_2", "→agent user b", "started turn_3"],
            ),
            (
                success(),
                &["done turn_3", "→agent user c", "started turn_4"],
            ),
            (success(), &["done turn_4"]),
        ],
    );
    assert!(m.reclaimable());
}

#[test]
fn a_turn_mode_switches_the_agent_and_back() {
    warm_story(
        "modes",
        vec![
            (
                Say("edit", Some(PermissionMode::AcceptEdits)),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent mode acceptEdits",
                    "→agent user edit",
                    "started turn_2",
                ],
            ),
            (success(), &["done turn_2", "→agent mode default"]),
        ],
    );
}

#[test]
fn permission_and_question_choices_wait_for_an_answer() {
    warm_story(
        "choices",
        vec![
            (
                say("go"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user go",
                    "started turn_2",
                ],
            ),
            (
                ask("r1", "Bash"),
                &["requires_choice turn_2 choice_1 permission"],
            ),
            // A second request waits behind the first.
            (ask("r2", "AskUserQuestion"), &[]),
            (allow("choice_9", true), &["reply not pending"]),
            (
                In(Input::Answer {
                    choice_id: "choice_1".into(),
                    answer: ChoiceAnswer::Answers(Default::default()),
                    source: ChoiceSource::Api,
                }),
                &["reply misfit"],
            ),
            (
                allow("choice_1", true),
                &[
                    "→agent allow r1",
                    "choice_resolved turn_2 choice_1",
                    "requires_choice turn_2 choice_2 question",
                    "reply answered",
                ],
            ),
            (
                agent(AgentEvent::RequestCancelled {
                    request_id: "r2".into(),
                }),
                &[],
            ),
            (allow("choice_2", true), &["reply not pending"]),
            (success(), &["done turn_2"]),
        ],
    );
}

#[test]
fn held_modes_answer_without_asking() {
    let mut held = rules();
    held.native = NativeModes {
        bypass: false,
        dont_ask: false,
    };
    let mut steps = warm();
    steps.extend::<Vec<(Step, &[&str])>>(vec![
        (
            Say("yes", Some(PermissionMode::BypassPermissions)),
            &[
                "user_message turn_2",
                "reply sent",
                "→agent user yes",
                "started turn_2",
            ],
        ),
        (ask("r1", "Bash"), &["→agent allow r1"]),
        // A question is still asked.
        (
            ask("r2", "AskUserQuestion"),
            &["requires_choice turn_2 choice_1 question"],
        ),
        (allow("choice_1", false), &["reply misfit"]),
        (success(), &["done turn_2"]),
        (
            Say("no", Some(PermissionMode::DontAsk)),
            &[
                "user_message turn_3",
                "reply sent",
                "→agent user no",
                "started turn_3",
            ],
        ),
        (ask("r3", "Bash"), &["→agent deny r3"]),
        (success(), &["done turn_3"]),
    ]);
    play("held modes", held, steps);
}

#[test]
fn interrupt_ends_the_turn_or_kills_the_agent_at_its_deadline() {
    warm_story(
        "interrupt",
        vec![
            (In(Input::Interrupt), &["reply nothing runs"]),
            (
                say("long"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user long",
                    "started turn_2",
                ],
            ),
            (
                ask("r1", "Bash"),
                &["requires_choice turn_2 choice_1 permission"],
            ),
            (
                In(Input::Interrupt),
                &["→agent interrupt", "reply interrupting turn_2"],
            ),
            // Asked twice, interrupted once; the withdrawn choice takes no answer.
            (In(Input::Interrupt), &["reply interrupting turn_2"]),
            (allow("choice_1", true), &["reply not pending"]),
            (ask("r2", "Bash"), &["→agent deny r2"]),
            (At(4), &[]),
            (success(), &["interrupted turn_2"]),
            (
                say("again"),
                &[
                    "user_message turn_3",
                    "reply sent",
                    "→agent user again",
                    "started turn_3",
                ],
            ),
            (
                In(Input::Interrupt),
                &["→agent interrupt", "reply interrupting turn_3"],
            ),
            (At(10), &["warn", "interrupted turn_3", "stop agent"]),
            // The next message needs a new agent.
            (
                say("next"),
                &["user_message turn_4", "reply sent", "acquire slot"],
            ),
        ],
    );
}

#[test]
fn an_idle_agent_is_reclaimed_and_a_choice_nobody_answers_is_evicted() {
    warm_story(
        "idle",
        vec![
            (At(59), &[]),
            (At(61), &["warn", "stop agent"]),
            (
                say("q"),
                &["user_message turn_2", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(true), &["→agent user q"]),
            (
                ask("r1", "Bash"),
                &[
                    "started turn_2 cold",
                    "requires_choice turn_2 choice_1 permission",
                ],
            ),
            (At(100), &[]),
            (At(122), &["error turn_2 sandbox_evicted", "stop agent"]),
            (At(500), &[]),
        ],
    );
}

#[test]
fn reclaim_takes_only_an_idle_agent() {
    warm_story(
        "reclaim",
        vec![
            (
                say("busy"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user busy",
                    "started turn_2",
                ],
            ),
            (In(Input::Reclaim), &[]),
            (success(), &["done turn_2"]),
            (In(Input::Reclaim), &["stop agent"]),
            (In(Input::Reclaim), &[]),
        ],
    );
}

#[test]
fn a_crash_mid_turn_ends_it_and_the_next_turn_starts_a_new_agent() {
    warm_story(
        "crash",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                say("b"),
                &["user_message turn_3", "queued turn_3 @1", "reply sent"],
            ),
            (
                In(Input::AgentExited("killed".into())),
                &[
                    "warn",
                    "error turn_2 agent_crashed",
                    "stop agent",
                    "acquire slot",
                ],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(true), &["→agent user b"]),
            (init(), &["started turn_3 cold"]),
        ],
    );
}

#[test]
fn an_agent_that_stops_reading_fails_its_turn_loudly() {
    warm_story(
        "stuck",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                In(Input::AgentStuck),
                &["warn", "error turn_2 agent_unresponsive", "stop agent"],
            ),
            (In(Input::AgentStuck), &[]),
        ],
    );
}

#[test]
fn output_while_no_turn_runs_is_a_turn_of_the_agent_s_own() {
    warm_story(
        "agent turn",
        vec![
            (
                agent(AgentEvent::ToolCall {
                    tool_use_id: "t".into(),
                    tool: "Bash".into(),
                    input_summary: None,
                    input: json!({"command": "sleep 1"}),
                }),
                &["started turn_2 by agent", "tool_call turn_2 Bash"],
            ),
            (
                say("wait"),
                &["user_message turn_3", "queued turn_3 @1", "reply sent"],
            ),
            (
                ask("r1", "Bash"),
                &["requires_choice turn_2 choice_1 permission"],
            ),
            (
                allow("choice_1", true),
                &[
                    "→agent allow r1",
                    "choice_resolved turn_2 choice_1",
                    "reply answered",
                ],
            ),
            (
                success(),
                &["done turn_2", "→agent user wait", "started turn_3"],
            ),
        ],
    );
}

#[test]
fn a_lost_conversation_starts_fresh_with_history_lost() {
    story(
        "resume lost",
        vec![
            (
                say("hi"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(true), &["→agent user hi"]),
            (
                failed("No conversation found with session ID: s"),
                &["warn", "stop agent keeping slot", "start fresh agent"],
            ),
            (started_agent(false), &["→agent user hi"]),
            (init(), &["started turn_1 cold history_lost"]),
            (success(), &["done turn_1"]),
        ],
    );
    story(
        "resume lost, exited",
        vec![
            (
                say("hi"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(true), &["→agent user hi"]),
            (
                In(Input::AgentExited("exit 1".into())),
                &["warn", "stop agent keeping slot", "start fresh agent"],
            ),
            (
                In(Input::AgentFailedToStart("no binary".into())),
                &["warn", "error turn_1 agent_unavailable"],
            ),
        ],
    );
    // A failure after the turn began is the agent's error, not a lost conversation.
    story(
        "resumed then failed",
        vec![
            (
                say("hi"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(true), &["→agent user hi"]),
            (init(), &["started turn_1 cold"]),
            (
                failed("No conversation found"),
                &["error turn_1 agent_error"],
            ),
        ],
    );
}

#[test]
fn archive_ends_the_running_turn_and_every_queued_one() {
    warm_story(
        "archive",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                say("b"),
                &["user_message turn_3", "queued turn_3 @1", "reply sent"],
            ),
            (
                In(Input::Stop(StopReason::Archived)),
                &[
                    "→agent interrupt",
                    "stop agent and wait",
                    "interrupted turn_2",
                    "error turn_3 loop_archived",
                    "reply stopped",
                ],
            ),
        ],
    );
    story(
        "shutdown before the agent began",
        vec![
            (
                say("a"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(false), &["→agent user a"]),
            (
                In(Input::Stop(StopReason::Shutdown)),
                &[
                    "→agent interrupt",
                    "stop agent and wait",
                    "error turn_1 server_restarted",
                    "reply stopped",
                ],
            ),
        ],
    );
}

#[test]
fn waiting_for_a_slot_says_queued_once_and_a_failed_start_moves_on() {
    let m = story(
        "slot wait",
        vec![
            (
                say("a"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotBusy), &["queued turn_1 @1"]),
            (
                say("b"),
                &["user_message turn_2", "queued turn_2 @2", "reply sent"],
            ),
            (In(Input::SlotBusy), &[]),
            (In(Input::SlotGranted), &["start agent"]),
            (
                In(Input::AgentFailedToStart("no claude".into())),
                &["warn", "error turn_1 agent_unavailable", "acquire slot"],
            ),
            (In(Input::SlotGranted), &["start agent"]),
            (started_agent(false), &["→agent user b"]),
        ],
    );
    assert!(!m.wants_slot());
    story(
        "archive while waiting",
        vec![
            (
                say("a"),
                &["user_message turn_1", "reply sent", "acquire slot"],
            ),
            (In(Input::SlotBusy), &["queued turn_1 @1"]),
            (
                In(Input::Stop(StopReason::Archived)),
                &["error turn_1 loop_archived", "reply stopped"],
            ),
        ],
    );
}

#[test]
fn deadlines_are_the_interrupt_s_or_the_idle_one() {
    let mut m = warm_story("deadlines", vec![]);
    let t = m.next_deadline().expect("an idle agent has a deadline");
    assert!(m.reclaimable());
    let now = t - Duration::from_secs(60);
    let admission = m.admit("x", chrono::Utc::now()).unwrap();
    let send = Input::Send {
        turn_id: admission.turn_id,
        content: "x".into(),
        mode: None,
        hold: (),
    };
    m.handle(send, now);
    assert_eq!(m.next_deadline(), None, "a running turn has no deadline");
    m.handle(Input::Interrupt, now);
    assert_eq!(m.next_deadline(), Some(now + Duration::from_secs(5)));
}

#[test]
fn what_a_stopped_agent_still_said_is_ignored() {
    warm_story(
        "after the agent",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                In(Input::AgentStuck),
                &["warn", "error turn_2 agent_unresponsive", "stop agent"],
            ),
            // The rest of the stuck process's batch: no phantom turn opens.
            (delta("late"), &[]),
            (ask("r9", "Bash"), &[]),
            (In(Input::AgentExited("gone".into())), &[]),
            (
                say("b"),
                &["user_message turn_3", "reply sent", "acquire slot"],
            ),
        ],
    );
}

#[test]
fn a_log_that_refuses_events_ends_the_turn_and_stops_the_agent() {
    warm_story(
        "log",
        vec![
            (
                say("a"),
                &[
                    "user_message turn_2",
                    "reply sent",
                    "→agent user a",
                    "started turn_2",
                ],
            ),
            (
                In(Input::LogUnwritable),
                &["error turn_2 log_unwritable", "stop agent"],
            ),
            (In(Input::LogUnwritable), &[]),
        ],
    );
}
