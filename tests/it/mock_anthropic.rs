//! A mock of the Anthropic Messages API for the real Claude Code CLI: the
//! only fake part of the end-to-end tests. It streams scripted replies
//! chosen by directives in the latest user prompt:
//!
//! | prompt contains | reply |
//! |---|---|
//! | `[[bash:CMD]]` | a `Bash` tool_use running CMD; after its result, text quoting the result |
//! | `[[write:PATH|TEXT]]` | a `Write` tool_use writing TEXT to PATH (in the working directory) |
//! | `[[ask]]` | an `AskUserQuestion` tool_use (two questions, one multi-select) |
//! | `[[think:TEXT]]` | a thinking block TEXT, then text |
//! | `[[slow:N]]` | N text chunks, 200 ms apart |
//! | `[[history]]` | text listing every user prompt of the conversation so far |
//! | `[[fail]]` | HTTP 400 (not retried by the CLI) |
//! | anything else | `You said: <prompt>` |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Clone, Default)]
pub struct MockApi {
    pub requests: Arc<Mutex<Vec<Value>>>,
}

pub struct RunningMock {
    pub addr: SocketAddr,
    pub api: MockApi,
}

impl RunningMock {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request bodies of streamed (model) calls so far.
    pub fn model_calls(&self) -> Vec<Value> {
        let requests = self.api.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
            .cloned()
            .collect()
    }
}

pub async fn start() -> RunningMock {
    let api = MockApi::default();
    let app = Router::new()
        .route("/v1/messages", post(messages))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    RunningMock { addr, api }
}

async fn messages(State(api): State<MockApi>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.requests.lock().unwrap().push(request.clone());
    let side_call = request["tools"].as_array().is_none_or(|t| t.is_empty());
    if side_call && request["stream"] == true {
        // Side calls without tools (a title for the session): short text.
        return stream(0, vec![Block::Text(words("Mock title"))], Duration::ZERO);
    }
    if request["stream"] != true {
        // Other side calls (summaries): a plain short answer.
        return axum::Json(json!({
            "id": "msg_side", "type": "message", "role": "assistant", "model": "claude-mock",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 5, "output_tokens": 1}
        }))
        .into_response();
    }
    let n = api.requests.lock().unwrap().len();
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    // The CLI puts `system` messages among them; the prompt is the last user one.
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .cloned()
        .unwrap_or(Value::Null);
    let reply = script(&messages, &last, n);
    match reply {
        Reply::Fail => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"type": "error", "error": {"type": "invalid_request_error", "message": "mock refuses [[fail]]"}})),
        )
            .into_response(),
        Reply::Stream { blocks, delay } => stream(n, blocks, delay),
    }
}

enum Block {
    Text(Vec<String>),
    Thinking(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

enum Reply {
    Fail,
    Stream { blocks: Vec<Block>, delay: Duration },
}

/// Text of the user's own words in a message (not tool results, not system reminders).
fn prompt_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .filter(|t| !t.trim_start().starts_with("<system-reminder>"))
            .filter(|t| !t.trim_start().starts_with("[Request interrupted"))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn tool_result(message: &Value) -> Option<(String, bool)> {
    message["content"]
        .as_array()?
        .iter()
        .find(|b| b["type"] == "tool_result")
        .map(|b| {
            let content = match &b["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => String::new(),
            };
            (content, b["is_error"].as_bool().unwrap_or(false))
        })
}

fn directive<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("[[{name}"))? + 2 + name.len();
    let rest = &text[start..];
    let end = rest.find("]]")?;
    Some(rest[..end].strip_prefix(':').unwrap_or(&rest[..end]))
}

fn words(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

fn script(messages: &[Value], last: &Value, n: usize) -> Reply {
    let fast = Duration::ZERO;
    let prompt = prompt_text(last);
    // After an interrupt, the CLI sends the rejected tool result and the
    // next prompt together: the prompt wins.
    if let Some((content, is_error)) = tool_result(last).filter(|_| prompt.trim().is_empty()) {
        let head: String = content.chars().take(300).collect();
        let said = if is_error {
            format!("The tool failed: {head}")
        } else {
            format!("The tool said: {head}")
        };
        return Reply::Stream {
            blocks: vec![Block::Text(words(&said))],
            delay: fast,
        };
    }
    let tool_id = format!("toolu_{n:03}");
    if directive(&prompt, "fail").is_some() {
        return Reply::Fail;
    }
    if let Some(cmd) = directive(&prompt, "bash") {
        let input = json!({"command": cmd, "description": "Run a command for the test"});
        return Reply::Stream {
            blocks: vec![
                Block::Text(words("Running it now. ")),
                Block::ToolUse {
                    id: tool_id,
                    name: "Bash".into(),
                    input,
                },
            ],
            delay: fast,
        };
    }
    if let Some(spec) = directive(&prompt, "write") {
        let (path, content) = spec.split_once('|').unwrap_or((spec, ""));
        let input = json!({"file_path": path, "content": content});
        return Reply::Stream {
            blocks: vec![Block::ToolUse {
                id: tool_id,
                name: "Write".into(),
                input,
            }],
            delay: fast,
        };
    }
    if directive(&prompt, "ask").is_some() {
        let input = json!({"questions": [
            {"question": "Which color do you prefer?", "header": "Color", "multiSelect": false,
             "options": [{"label": "Red", "description": "Warm color"}, {"label": "Blue", "description": "Cool color"}]},
            {"question": "Which sizes do you need?", "header": "Sizes", "multiSelect": true,
             "options": [{"label": "S", "description": "Small"}, {"label": "M", "description": "Medium"}, {"label": "L", "description": "Large"}]}
        ]});
        return Reply::Stream {
            blocks: vec![Block::ToolUse {
                id: tool_id,
                name: "AskUserQuestion".into(),
                input,
            }],
            delay: fast,
        };
    }
    if let Some(thought) = directive(&prompt, "think") {
        return Reply::Stream {
            blocks: vec![
                Block::Thinking(thought.to_owned()),
                Block::Text(words("Thought it through.")),
            ],
            delay: fast,
        };
    }
    if let Some(count) = directive(&prompt, "slow") {
        let n: usize = count.parse().unwrap_or(50);
        let chunks = (0..n).map(|i| format!("chunk{i} ")).collect();
        return Reply::Stream {
            blocks: vec![Block::Text(chunks)],
            delay: Duration::from_millis(200),
        };
    }
    if directive(&prompt, "history").is_some() {
        let prompts: Vec<String> = messages
            .iter()
            .filter(|m| m["role"] == "user")
            .map(prompt_text)
            .filter(|p| !p.is_empty())
            .collect();
        return Reply::Stream {
            blocks: vec![Block::Text(words(&format!(
                "History: {}",
                prompts.join(" | ")
            )))],
            delay: fast,
        };
    }
    Reply::Stream {
        blocks: vec![Block::Text(words(&format!("You said: {prompt}")))],
        delay: fast,
    }
}

fn sse(event: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn stream(n: usize, blocks: Vec<Block>, delay: Duration) -> Response {
    let body = async_stream::stream! {
        let stop_reason = if blocks.iter().any(|b| matches!(b, Block::ToolUse { .. })) { "tool_use" } else { "end_turn" };
        yield Ok::<_, Infallible>(sse("message_start", json!({"type": "message_start", "message": {
            "id": format!("msg_{n:03}"), "type": "message", "role": "assistant", "model": "claude-mock",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 1}}})));
        for (index, block) in blocks.into_iter().enumerate() {
            match block {
                Block::Text(chunks) => {
                    yield Ok(sse("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
                    for chunk in chunks {
                        if !delay.is_zero() { tokio::time::sleep(delay).await; }
                        yield Ok(sse("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": chunk}})));
                    }
                }
                Block::Thinking(text) => {
                    yield Ok(sse("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})));
                    yield Ok(sse("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": text}})));
                    yield Ok(sse("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": "sigmock"}})));
                }
                Block::ToolUse { id, name, input } => {
                    yield Ok(sse("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}})));
                    yield Ok(sse("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": input.to_string()}})));
                }
            }
            yield Ok(sse("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
        yield Ok(sse("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": 5}})));
        yield Ok(sse("message_stop", json!({"type": "message_stop"})));
    };
    let mut response = Response::new(Body::from_stream(body));
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}
