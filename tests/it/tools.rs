//! What a tool ran and printed: `tool_call.input`, `tool_result.output`
//! (cut at 16 KiB with `truncated`), kept by `/turns`; with the echo agent
//! and the real Claude Code CLI.

use serde_json::json;

use crate::claude::Rig;
use crate::support::TestApp;

#[tokio::test]
async fn a_tool_call_carries_its_input_and_its_result_its_output() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let id = app.create_loop(&bearer, json!({})).await;
    let events = app
        .send(&bearer, &id, "/tool hello tools")
        .await
        .until_end()
        .await;
    let call = events.iter().find(|e| e.name == "tool_call").unwrap();
    assert_eq!(call.data["input"], json!({"text": "hello tools"}));
    let result = events.iter().find(|e| e.name == "tool_result").unwrap();
    assert_eq!(result.data["output"], "hello tools");
    assert!(result.data.get("truncated").is_none(), "only when cut");

    // Long output is cut at 16 KiB, on a character boundary, and says so.
    let long = "é".repeat(10_000);
    let events = app
        .send(&bearer, &id, &format!("/tool {long}"))
        .await
        .until_end()
        .await;
    let result = events.iter().find(|e| e.name == "tool_result").unwrap();
    let output = result.data["output"].as_str().unwrap();
    assert!(
        output.len() <= 16 * 1024 && output.len() > 16 * 1024 - 2,
        "{}",
        output.len()
    );
    assert_eq!(result.data["truncated"], true);
    // The input is whole.
    let call = events.iter().find(|e| e.name == "tool_call").unwrap();
    assert_eq!(
        call.data["input"]["text"].as_str().unwrap().len(),
        long.len()
    );

    // `/turns` keeps both.
    let (_, turns) = app.get(&format!("/api/v1/loops/{id}/turns"), &bearer).await;
    let calls = &turns["data"][0]["tool_calls"];
    assert_eq!(calls[0]["input"], json!({"text": "hello tools"}));
    assert_eq!(calls[0]["output"], "hello tools");
    assert_eq!(calls[0]["truncated"], false);
    assert_eq!(turns["data"][1]["tool_calls"][0]["truncated"], true);
}

#[tokio::test]
async fn with_claude_code_a_bash_call_shows_its_command_and_what_it_printed() {
    let rig = Rig::start().await;
    // `echo` is read-only: Claude Code runs it without asking.
    let rest = rig.turn("[[bash:echo printed-by-the-tool]]").await;
    let call = rest.iter().find(|e| e.name == "tool_call").unwrap();
    assert_eq!(call.data["input"]["command"], "echo printed-by-the-tool");
    let result = rest.iter().find(|e| e.name == "tool_result").unwrap();
    assert_eq!(result.data["ok"], true);
    assert!(
        result.data["output"]
            .as_str()
            .unwrap()
            .contains("printed-by-the-tool"),
        "{}",
        result.data
    );
}
