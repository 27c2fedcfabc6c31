//! End to end with the real Claude Code CLI behind loopd, pointed at the
//! mock model API: the only fake part is the model.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tempfile::TempDir;

use crate::claude_cli::{agent_env, claude_bin};
use crate::mock_anthropic::{self, RunningMock};
use crate::support::{Auth, PASSWORD, TestApp, eventually, names, text};

pub struct Rig {
    pub app: TestApp,
    pub mock: RunningMock,
    pub home: TempDir,
    pub data: TempDir,
    pub bearer: Auth,
    pub loop_id: String,
}

impl Rig {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut loopd::Config)) -> Self {
        let mock = mock_anthropic::start().await;
        let home = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        crate::support::accounts(data.path())
            .users
            .add("alice", false, PASSWORD)
            .unwrap();
        let config = config_for(&data, &mock, &home, tweak);
        let app = TestApp::start_with(config).await;
        let bearer = app.bearer("alice").await;
        let loop_id = app.create_loop(&bearer, json!({"title": "claude"})).await;
        Self {
            app,
            mock,
            home,
            data,
            bearer,
            loop_id,
        }
    }

    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    pub async fn restart_with(self, tweak: impl FnOnce(&mut loopd::Config)) -> Self {
        let Self {
            app,
            mock,
            home,
            data,
            bearer,
            loop_id,
        } = self;
        app.stop().await;
        let app = TestApp::start_with(config_for(&data, &mock, &home, tweak)).await;
        Self {
            app,
            mock,
            home,
            data,
            bearer,
            loop_id,
        }
    }

    pub fn uuid(&self) -> String {
        self.loop_id.strip_prefix("loop_").unwrap().to_owned()
    }

    pub fn workspace(&self) -> PathBuf {
        self.data
            .path()
            .join("loops")
            .join(self.uuid())
            .join("workspace")
    }

    /// Where the agent keeps its transcripts: the loop's own home in a
    /// sandbox, else the HOME the server gave it.
    pub async fn agent_home(&self) -> PathBuf {
        let (_, health) = self.app.get("/healthz", &Auth::None).await;
        match health["sandbox"].as_str().unwrap() {
            "bwrap" => self
                .data
                .path()
                .join("loops")
                .join(self.uuid())
                .join("home"),
            _ => self.home.path().to_owned(),
        }
    }

    /// Sends a message to the rig's loop; returns its turn's stream.
    pub async fn send(&self, content: &str) -> crate::support::SseStream {
        self.app.send(&self.bearer, &self.loop_id, content).await
    }

    pub async fn turn(&self, content: &str) -> Vec<crate::support::Sse> {
        self.app
            .send(&self.bearer, &self.loop_id, content)
            .await
            .until_end()
            .await
    }

    /// Sends a message whose Bash tool runs `command` (read-only, so not
    /// asked about); returns once that process runs.
    pub async fn start_long_tool(&self, command: &str) -> crate::support::SseStream {
        let prompt = format!("[[bash:{command}]]");
        let mut stream = self.send(&prompt).await;
        stream.until("tool_call").await;
        eventually("the tool to run", async || {
            self.processes().iter().any(|c| c.contains(command))
        })
        .await;
        stream
    }

    /// Command lines of the live processes marked as this loop's.
    pub fn processes(&self) -> Vec<String> {
        loopd::agent::process::marked_loop(&self.uuid())
            .into_iter()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .collect()
    }
}

fn config_for(
    data: &TempDir,
    mock: &RunningMock,
    home: &TempDir,
    tweak: impl FnOnce(&mut loopd::Config),
) -> loopd::Config {
    let mut config = loopd::Config::for_data_dir(data.path());
    config.agent = loopd::agent::AgentKind::Claude;
    config.claude_bin = claude_bin();
    config.agent_base_env = agent_env(mock, home.path());
    tweak(&mut config);
    config
}

#[tokio::test]
async fn hello_streams_the_models_text() {
    let rig = Rig::start().await;
    let events = rig.turn("hello there").await;
    assert_eq!(names(&events)[0], "started");
    assert_eq!(events[0].data["cold_start"], true);
    assert_eq!(text(&events), "You said: hello there");
    let done = events.last().unwrap();
    assert_eq!(done.name, "done", "{events:?}");
    assert!(done.data["usage"]["input_tokens"].is_u64(), "{}", done.data);
    assert!(done.data["usage"]["cost_usd"].is_number());
    // The workspace has the instructions, and the model saw the prompt.
    assert!(
        std::fs::read_to_string(rig.workspace().join("CLAUDE.md"))
            .unwrap()
            .contains("loopd")
    );
    assert_eq!(rig.mock.model_calls().len(), 1);
}

#[tokio::test]
async fn an_allowed_bash_tool_really_writes_in_the_workspace_and_a_denied_one_does_not() {
    let rig = Rig::start().await;
    let mut stream = rig.send("[[bash:echo made by claude > made.txt]]").await;
    let asked = stream.until("requires_choice").await;
    let choice = asked.last().unwrap();
    assert_eq!(choice.data["kind"], "permission");
    assert_eq!(choice.data["payload"]["tool"], "Bash");
    assert_eq!(
        choice.data["payload"]["input_summary"],
        "echo made by claude > made.txt"
    );
    let call = asked.iter().find(|e| e.name == "tool_call").unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap();
    assert_eq!(
        rig.app
            .choose(&rig.bearer, &rig.loop_id, choice_id, json!({"allow": true}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let rest = stream.until_end().await;
    assert_eq!(rest[0].name, "choice_resolved");
    let result = rest.iter().find(|e| e.name == "tool_result").unwrap();
    assert_eq!(result.data["tool_use_id"], call.data["tool_use_id"]);
    assert_eq!(result.data["ok"], true);
    assert_eq!(rest.last().unwrap().name, "done");
    assert_eq!(
        std::fs::read_to_string(rig.workspace().join("made.txt")).unwrap(),
        "made by claude\n"
    );

    let mut stream = rig.send("[[bash:touch denied.txt]]").await;
    let choice = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap();
    rig.app
        .choose(
            &rig.bearer,
            &rig.loop_id,
            choice_id,
            json!({"allow": false, "message": "not that one"}),
        )
        .await;
    let rest = stream.until_end().await;
    assert_eq!(
        rest.iter().find(|e| e.name == "tool_result").unwrap().data["ok"],
        false
    );
    assert!(text(&rest).contains("not that one"), "{}", text(&rest));
    assert!(!rig.workspace().join("denied.txt").exists());
}

#[tokio::test]
async fn a_failing_tool_reports_not_ok() {
    let rig = Rig::start().await;
    let mut stream = rig.send("[[bash:ls /definitely/not/here]]").await;
    stream.until("tool_call").await;
    // Reading outside the workspace may be asked about first.
    let mut rest = Vec::new();
    loop {
        let event = stream.next().await.unwrap();
        if event.name == "requires_choice" {
            let id = event.data["choice_id"].as_str().unwrap().to_owned();
            rig.app
                .choose(&rig.bearer, &rig.loop_id, &id, json!({"allow": true}))
                .await;
        }
        let end = crate::support::TERMINAL.contains(&event.name.as_str());
        rest.push(event);
        if end {
            break;
        }
    }
    assert_eq!(
        rest.iter().find(|e| e.name == "tool_result").unwrap().data["ok"],
        false
    );
    assert!(text(&rest).contains("No such file"), "{}", text(&rest));
}

#[tokio::test]
async fn the_conversation_keeps_its_history_across_turns() {
    let rig = Rig::start().await;
    rig.turn("my favourite fruit is a banana").await;
    let events = rig.turn("[[history]]").await;
    assert_eq!(events[0].data["cold_start"], false);
    assert!(
        text(&events).contains("my favourite fruit is a banana"),
        "{}",
        text(&events)
    );
}

#[tokio::test]
async fn a_question_is_answered_with_labels() {
    let rig = Rig::start().await;
    let mut stream = rig.send("[[ask]]").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    assert_eq!(asked.data["kind"], "question");
    assert_eq!(asked.data["payload"]["questions"][1]["multi_select"], true);
    let answers = json!({"answers": {"Which color do you prefer?": "Blue", "Which sizes do you need?": ["S", "L"]}});
    let choice_id = asked.data["choice_id"].as_str().unwrap();
    assert_eq!(
        rig.app
            .choose(&rig.bearer, &rig.loop_id, choice_id, answers)
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let said = text(&stream.until_end().await);
    assert!(
        said.contains(r#""Which color do you prefer?"="Blue""#),
        "{said}"
    );
    assert!(
        said.contains(r#""Which sizes do you need?"="S, L""#),
        "{said}"
    );
}

#[tokio::test]
async fn interrupting_a_long_tool_leaves_no_process_behind() {
    let rig = Rig::start().await;
    let mut stream = rig.start_long_tool("sleep 47").await;
    let (status, _) = rig
        .app
        .post(
            &format!("/api/v1/loops/{}/interrupt", rig.loop_id),
            &rig.bearer,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let end = stream.until_end().await.pop().unwrap();
    assert_eq!(end.name, "interrupted");
    eventually("the tool to be gone", async || {
        !rig.processes().iter().any(|c| c.contains("sleep 47"))
    })
    .await;
    // The agent itself lives on and the next message works.
    let events = rig.turn("still there?").await;
    assert_eq!(events[0].data["cold_start"], false);
    assert_eq!(text(&events), "You said: still there?");
}

#[tokio::test]
async fn an_idle_agent_is_reclaimed_and_the_conversation_resumes() {
    let rig = Rig::start_with(|c| c.idle_timeout = Duration::from_millis(800)).await;
    rig.turn("remember the word tangerine").await;
    eventually("the idle agent to be reclaimed", async || {
        rig.app.get("/healthz", &Auth::None).await.1["live_agents"] == 0
            && rig.processes().is_empty()
    })
    .await;
    let events = rig.turn("[[history]]").await;
    assert_eq!(events[0].data["cold_start"], true);
    assert!(events[0].data.get("history_lost").is_none());
    assert!(
        text(&events).contains("remember the word tangerine"),
        "{}",
        text(&events)
    );
}

#[tokio::test]
async fn a_server_restart_continues_the_same_conversation() {
    let rig = Rig::start().await;
    rig.turn("the password is swordfish").await;
    let rig = rig.restart().await;
    let events = rig.turn("[[history]]").await;
    assert_eq!(events[0].data["cold_start"], true);
    assert!(
        text(&events).contains("the password is swordfish"),
        "{}",
        text(&events)
    );
}

#[tokio::test]
async fn a_lost_conversation_starts_fresh_and_says_so() {
    let rig = Rig::start_with(|c| c.idle_timeout = Duration::from_millis(500)).await;
    rig.turn("something to forget").await;
    eventually("the idle agent to be reclaimed", async || {
        rig.processes().is_empty()
    })
    .await;
    // The CLI's transcripts are gone (a new machine, a wiped HOME).
    std::fs::remove_dir_all(rig.agent_home().await.join(".claude/projects")).unwrap();
    let events = rig.turn("[[history]]").await;
    assert_eq!(events[0].name, "started");
    assert_eq!(events[0].data["history_lost"], true, "{:?}", events[0]);
    assert_eq!(events.last().unwrap().name, "done");
    assert!(!text(&events).contains("something to forget"));
}

#[tokio::test]
async fn an_agent_crash_ends_the_turn_and_the_next_message_resumes() {
    let rig = Rig::start().await;
    rig.turn("first of all").await;
    let mut stream = rig.send("[[slow:30]]").await;
    stream.until("assistant_delta").await;
    let cli: Vec<i32> = loopd::agent::process::marked_loop(&rig.uuid());
    for pid in cli {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let end = stream.until_end().await.pop().unwrap();
    assert_eq!(end.name, "error");
    assert_eq!(end.data["code"], "agent_crashed");
    let events = rig.turn("[[history]]").await;
    assert!(text(&events).contains("first of all"), "{}", text(&events));
}

#[tokio::test]
async fn archiving_kills_the_agent_and_its_tools() {
    let rig = Rig::start().await;
    let mut stream = rig.start_long_tool("sleep 53").await;
    let (status, _) = rig
        .app
        .delete(&format!("/api/v1/loops/{}", rig.loop_id), &rig.bearer)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stream.until_end().await.pop().unwrap().name, "interrupted");
    assert!(
        rig.processes().is_empty(),
        "left behind: {:?}",
        rig.processes()
    );
    assert_eq!(
        rig.app.get("/healthz", &Auth::None).await.1["live_agents"],
        0
    );
}

#[tokio::test]
async fn a_missing_binary_is_agent_unavailable_with_a_way_out() {
    let rig = Rig::start_with(|c| c.claude_bin = "/nonexistent/claude".into()).await;
    let events = rig.turn("hello").await;
    let end = events.last().unwrap();
    assert_eq!(end.data["code"], "agent_unavailable");
    assert!(
        end.data["message"]
            .as_str()
            .unwrap()
            .contains("npm install"),
        "{}",
        end.data
    );
}

#[tokio::test]
async fn the_agent_gets_its_vault_and_none_of_the_servers_settings() {
    let rig = Rig::start_with(|c| {
        c.agent_base_env
            .push(("LOOPD_SECRET".into(), "server-only".into()));
        c.agent_base_env
            .push(("AWS_SECRET_ACCESS_KEY".into(), "not-for-agents".into()));
    })
    .await;
    std::fs::create_dir_all(rig.data.path().join("vaults")).unwrap();
    std::fs::write(
        rig.data.path().join("vaults/deploy.env"),
        "DEPLOY_TOKEN=vault-value\n",
    )
    .unwrap();
    std::fs::write(rig.data.path().join("vaults/deploy.users"), "alice\n").unwrap();
    let id = rig
        .app
        .create_loop(&rig.bearer, json!({"vault": "deploy"}))
        .await;
    let mut stream = rig
        .app
        .send(&rig.bearer, &id, "[[bash:env > env.txt]]")
        .await;
    let choice = stream.until("requires_choice").await.pop().unwrap();
    let choice_id = choice.data["choice_id"].as_str().unwrap();
    rig.app
        .choose(&rig.bearer, &id, choice_id, json!({"allow": true}))
        .await;
    assert_eq!(stream.until_end().await.pop().unwrap().name, "done");
    let uuid = id.strip_prefix("loop_").unwrap();
    let env = std::fs::read_to_string(
        rig.data
            .path()
            .join("loops")
            .join(uuid)
            .join("workspace/env.txt"),
    )
    .unwrap();
    assert!(env.contains("DEPLOY_TOKEN=vault-value"), "{env}");
    assert!(env.contains(&format!("LOOP_SANDBOX_ID={uuid}.")), "{env}");
    assert!(env.contains("ANTHROPIC_BASE_URL="), "{env}");
    assert!(!env.contains("LOOPD_"), "{env}");
    assert!(!env.contains("AWS_SECRET_ACCESS_KEY"), "{env}");
}

#[tokio::test]
async fn a_permission_mode_applies_to_its_turn_only() {
    let rig = Rig::start().await;
    let first = rig.workspace().join("first.txt");
    let prompt = |path: &std::path::Path| format!("[[write:{}|hello]]", path.display());
    // acceptEdits for this turn: Claude Code writes without asking.
    let body = json!({"content": prompt(&first), "permission_mode": "acceptEdits"});
    let events = rig
        .app
        .send_with(&rig.bearer, &rig.loop_id, body, None)
        .await
        .until_end()
        .await;
    assert!(
        !names(&events).contains(&"requires_choice"),
        "{:?}",
        names(&events)
    );
    assert_eq!(events.last().unwrap().name, "done");
    assert_eq!(std::fs::read_to_string(&first).unwrap(), "hello");
    // The next turn is back in the server's mode (default): it asks.
    let second = rig.workspace().join("second.txt");
    let mut stream = rig
        .app
        .send(&rig.bearer, &rig.loop_id, &prompt(&second))
        .await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    assert_eq!(asked.data["payload"]["tool"], "Write");
    let choice_id = asked.data["choice_id"].as_str().unwrap();
    rig.app
        .choose(
            &rig.bearer,
            &rig.loop_id,
            choice_id,
            json!({"allow": false}),
        )
        .await;
    assert_eq!(stream.until_end().await.pop().unwrap().name, "done");
    assert!(!second.exists());
}
