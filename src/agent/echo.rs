//! The echo agent: a built-in, deterministic development agent. It streams
//! back what it is sent, and a command at the start of a message makes it
//! exercise one event kind. It never executes anything.
//!
//! | message | what happens |
//! |---|---|
//! | anything else | the text streams back word by word |
//! | `/think TEXT` | a thinking delta, then TEXT |
//! | `/tool TEXT` | a tool call (`echo`) that succeeds, then TEXT |
//! | `/fail TEXT` | a tool call that fails, then TEXT |
//! | `/edit PATH` | an `Edit` tool call on PATH (its input an old and a new string; nothing is written) |
//! | `/permission CMD` | asks to run `Bash` CMD; says whether it was allowed (never runs it) |
//! | `/question` | asks two questions (one multi-select) and echoes the answers |
//! | `/sleep SECS` | says it sleeps, pauses SECS seconds (interruptible), says it woke |
//! | `/hold NAME` | says it holds, waits (interruptible) until a file NAME is in its workspace, says it was released |
//! | `/error TEXT` | the turn fails with `agent_error` TEXT |
//! | `/crash` | the agent process dies mid-turn (`agent_crashed`) |
//! | `/later SECS TEXT` | ends the turn, then says TEXT SECS seconds later on its own (an agent-initiated turn) |

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    AgentEvent, AgentHandle, AgentInput, AgentOutput, AgentProcess, AgentSpec, CHANNEL, Decision,
    TurnEnd, Usage,
};

pub fn spawn(spec: AgentSpec) -> AgentProcess {
    let (input_tx, input_rx) = mpsc::channel(CHANNEL);
    let (output_tx, output_rx) = mpsc::channel(CHANNEL);
    let task = tokio::spawn(run(
        spec.session.id().to_owned(),
        spec.cwd,
        input_rx,
        output_tx,
    ));
    AgentProcess {
        input: input_tx,
        output: output_rx,
        handle: AgentHandle::Echo(task),
    }
}

struct Echo {
    session_id: String,
    /// Its workspace (where `/hold` looks for its release).
    cwd: std::path::PathBuf,
    input: mpsc::Receiver<AgentInput>,
    output: mpsc::Sender<AgentOutput>,
    requests: u64,
    /// Something to say on its own later (`/later`).
    later: Option<(tokio::time::Instant, String)>,
}

/// How a turn ended early.
enum Cut {
    Interrupted,
    Closed,
}

async fn run(
    session_id: String,
    cwd: std::path::PathBuf,
    input: mpsc::Receiver<AgentInput>,
    output: mpsc::Sender<AgentOutput>,
) {
    let mut echo = Echo {
        session_id,
        cwd,
        input,
        output,
        requests: 0,
        later: None,
    };
    loop {
        let msg = match echo.later.clone() {
            Some((at, text)) => tokio::select! {
                msg = echo.input.recv() => msg,
                () = tokio::time::sleep_until(at) => {
                    // Output while no turn runs: the runtime opens an agent turn.
                    echo.later = None;
                    echo.say(&text).await;
                    echo.emit(AgentEvent::TurnEnd(TurnEnd::Success { usage: Usage::default() })).await;
                    continue;
                }
            },
            None => echo.input.recv().await,
        };
        let Some(msg) = msg else { break };
        let AgentInput::User(text) = msg else {
            // Interrupts while idle, stray answers and modes change nothing.
            continue;
        };
        echo.emit(AgentEvent::Init {
            session_id: echo.session_id.clone(),
        })
        .await;
        let started = std::time::Instant::now();
        let end = match echo.turn(&text).await {
            Ok(Some(end)) => end,
            Ok(None) => return, // `/crash`
            Err(Cut::Interrupted) => TurnEnd::Aborted {
                usage: Usage::default(),
            },
            Err(Cut::Closed) => return,
        };
        let end = with_usage(end, &text, started.elapsed());
        echo.emit(AgentEvent::TurnEnd(end)).await;
    }
}

fn with_usage(end: TurnEnd, text: &str, took: Duration) -> TurnEnd {
    let usage = Usage {
        input_tokens: Some(text.split_whitespace().count() as u64),
        output_tokens: Some(text.split_whitespace().count() as u64),
        cache_read_input_tokens: Some(0),
        cost_usd: Some(0.0),
        duration_ms: Some(took.as_millis() as u64),
    };
    match end {
        TurnEnd::Success { .. } => TurnEnd::Success { usage },
        TurnEnd::Failed { message, .. } => TurnEnd::Failed { message, usage },
        TurnEnd::Aborted { .. } => TurnEnd::Aborted { usage },
    }
}

impl Echo {
    async fn emit(&self, event: AgentEvent) {
        let _ = self.output.send(AgentOutput::Events(vec![event])).await;
    }

    async fn say(&self, text: &str) {
        for word in text.split_inclusive(' ') {
            self.emit(AgentEvent::TextDelta(word.to_owned())).await;
        }
    }

    /// Waits for input during a turn; an interrupt cuts the turn short.
    async fn next_input(&mut self) -> Result<AgentInput, Cut> {
        match self.input.recv().await {
            Some(AgentInput::Interrupt) => Err(Cut::Interrupted),
            Some(other) => Ok(other),
            None => Err(Cut::Closed),
        }
    }

    /// Asks for permission and waits for the answer to this very request.
    async fn ask(&mut self, tool: &str, input: Value) -> Result<Decision, Cut> {
        self.requests += 1;
        let request_id = format!("echo-req-{}", self.requests);
        self.emit(AgentEvent::PermissionRequest {
            request_id: request_id.clone(),
            tool: tool.to_owned(),
            input,
            title: None,
        })
        .await;
        loop {
            match self.next_input().await {
                Ok(AgentInput::Answer {
                    request_id: id,
                    decision,
                }) if id == request_id => {
                    return Ok(decision);
                }
                Ok(_) => continue,
                Err(Cut::Interrupted) => {
                    self.emit(AgentEvent::RequestCancelled { request_id }).await;
                    return Err(Cut::Interrupted);
                }
                Err(cut) => return Err(cut),
            }
        }
    }

    fn tool_id(&self, n: u32) -> String {
        format!("echo-tool-{}-{n}", self.requests)
    }

    /// One turn; `Ok(None)` means the agent "crashed".
    async fn turn(&mut self, text: &str) -> Result<Option<TurnEnd>, Cut> {
        let (command, rest) = match text.strip_prefix('/') {
            Some(cmd) => cmd.split_once(' ').unwrap_or((cmd, "")),
            None => ("", text),
        };
        let rest = rest.trim();
        match command {
            "think" => {
                self.emit(AgentEvent::ThinkingDelta(format!(
                    "The user wants me to say: {rest}"
                )))
                .await;
                self.say(rest).await;
            }
            "edit" => {
                self.requests += 1;
                let id = self.tool_id(1);
                let input = json!({"file_path": rest, "old_string": "let x = 1;", "new_string": "let x = 2;"});
                self.emit(AgentEvent::ToolCall {
                    tool_use_id: id.clone(),
                    tool: "Edit".into(),
                    input_summary: Some(rest.to_owned()),
                    input,
                })
                .await;
                self.emit(AgentEvent::ToolResult {
                    tool_use_id: id,
                    ok: true,
                    output: Some(format!("(the echo agent never edits {rest})")),
                    truncated: false,
                })
                .await;
                self.say(&format!("Edited {rest} (not really)")).await;
            }
            "tool" | "fail" => {
                self.requests += 1;
                let id = self.tool_id(1);
                self.emit(AgentEvent::ToolCall {
                    tool_use_id: id.clone(),
                    tool: "echo".into(),
                    input_summary: Some(rest.to_owned()),
                    input: json!({"text": rest}),
                })
                .await;
                let ok = command == "tool";
                let printed = if ok {
                    rest.to_owned()
                } else {
                    format!("echo: failed on purpose: {rest}")
                };
                let (output, truncated) = super::capped(printed, super::MAX_TOOL_OUTPUT);
                self.emit(AgentEvent::ToolResult {
                    tool_use_id: id,
                    ok,
                    output: Some(output),
                    truncated,
                })
                .await;
                self.say(rest).await;
            }
            "permission" => {
                let input = json!({"command": rest, "description": "Run a command (the echo agent never runs it)"});
                let decision = self.ask("Bash", input).await?;
                let id = self.tool_id(1);
                match decision {
                    Decision::Allow { .. } => {
                        self.emit(AgentEvent::ToolCall {
                            tool_use_id: id.clone(),
                            tool: "Bash".into(),
                            input_summary: Some(rest.to_owned()),
                            input: json!({"command": rest}),
                        })
                        .await;
                        self.emit(AgentEvent::ToolResult {
                            tool_use_id: id,
                            ok: true,
                            output: Some("(the echo agent never runs commands)".into()),
                            truncated: false,
                        })
                        .await;
                        self.say(&format!("Allowed: {rest} (not actually run)"))
                            .await;
                    }
                    Decision::Deny { message } => self.say(&format!("Denied: {message}")).await,
                }
            }
            "question" => {
                let input = json!({"questions": [
                    {"question": "Which color do you prefer?", "header": "Color", "multiSelect": false,
                     "options": [{"label": "Red", "description": "Warm"}, {"label": "Blue", "description": "Cool"}]},
                    {"question": "Which sizes do you need?", "header": "Sizes", "multiSelect": true,
                     "options": [{"label": "S"}, {"label": "M"}, {"label": "L"}]}
                ]});
                match self.ask("AskUserQuestion", input).await? {
                    Decision::Allow { updated_input } => {
                        let answers = updated_input.get("answers").cloned().unwrap_or(Value::Null);
                        self.say(&format!("You answered: {answers}")).await;
                    }
                    Decision::Deny { message } => self.say(&format!("No answer: {message}")).await,
                }
            }
            "sleep" => {
                let secs: f64 = rest.parse().unwrap_or(30.0);
                self.say(&format!("Sleeping {secs} s… ")).await;
                let wake = tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.0, 3600.0)));
                tokio::pin!(wake);
                loop {
                    tokio::select! {
                        () = &mut wake => break,
                        input = self.next_input() => { input?; }
                    }
                }
                self.say("awake.").await;
            }
            "hold" => {
                // A file name only: the release is looked for in the workspace.
                let name = std::path::Path::new(rest)
                    .file_name()
                    .map_or_else(|| "release".into(), |n| n.to_owned());
                let release = self.cwd.join(&name);
                self.say(&format!(
                    "Holding until {} appears… ",
                    name.to_string_lossy()
                ))
                .await;
                let mut look = tokio::time::interval(Duration::from_millis(10));
                loop {
                    tokio::select! {
                        _ = look.tick() => if release.exists() { break },
                        input = self.next_input() => { input?; }
                    }
                }
                self.say("released.").await;
            }
            "error" => {
                return Ok(Some(TurnEnd::Failed {
                    message: if rest.is_empty() {
                        "the echo agent was asked to fail".into()
                    } else {
                        rest.to_owned()
                    },
                    usage: Usage::default(),
                }));
            }
            "later" => {
                let (secs, text) = rest.split_once(' ').unwrap_or((rest, "I am back."));
                let secs: f64 = secs.parse().unwrap_or(1.0);
                let at =
                    tokio::time::Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 3600.0));
                self.later = Some((at, text.to_owned()));
                self.say("I will get back to you.").await;
            }
            "crash" => {
                self.say("Crashing now.").await;
                let _ = self
                    .output
                    .send(AgentOutput::Exited {
                        reason: "the echo agent crashed on purpose (/crash)".into(),
                    })
                    .await;
                return Ok(None);
            }
            _ => self.say(text).await,
        }
        Ok(Some(TurnEnd::Success {
            usage: Usage::default(),
        }))
    }
}
