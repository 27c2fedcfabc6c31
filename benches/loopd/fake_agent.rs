//! The fake Claude Code CLI (`-p …`): stream-json shapes as the real one writes them.
//!
//! On each user line it writes `system/init`, K `stream_event` text deltas
//! whose text is the CLOCK_REALTIME nanoseconds taken just before the write,
//! an `assistant` message and a `result`; K and the rate come from the
//! message (`K=500 RATE=100`, rate 0 = full speed). Every CLI flag is
//! accepted and ignored.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use crate::now_ns;

pub fn run() {
    let sid = "5f1c2d3e-0000-4000-8000-000000000001";
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if !line.contains("\"type\":\"user\"") {
            continue; // control requests and the like
        }
        let k: usize = param(&line, "K=").unwrap_or(10);
        let rate: u64 = param(&line, "RATE=").unwrap_or(0);
        // TOOL=N: first a Bash call whose result is N bytes of output.
        let tool: Option<usize> = param(&line, "TOOL=");
        let _ = writeln!(
            out,
            r#"{{"type":"system","subtype":"init","cwd":"/w","session_id":"{sid}","tools":["Bash","Read","Write"],"mcp_servers":[],"model":"claude-fake","permissionMode":"default","apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","uuid":"00000000-0000-4000-8000-000000000000"}}"#
        );
        let _ = out.flush();
        if let Some(n) = tool {
            let _ = writeln!(
                out,
                r#"{{"type":"assistant","message":{{"id":"msg_tool","type":"message","role":"assistant","model":"claude-fake","content":[{{"type":"tool_use","id":"toolu_fake","name":"Bash","input":{{"command":"cat big.log","description":"Read the log"}}}}],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":10,"output_tokens":1}}}},"parent_tool_use_id":null,"session_id":"{sid}","uuid":"00000000-0000-4000-8000-000000000004"}}"#
            );
            let printed = "x".repeat(n);
            let _ = writeln!(
                out,
                r#"{{"type":"user","message":{{"role":"user","content":[{{"tool_use_id":"toolu_fake","type":"tool_result","content":"{printed}","is_error":false}}]}},"parent_tool_use_id":null,"session_id":"{sid}","uuid":"00000000-0000-4000-8000-000000000005"}}"#
            );
        }
        let start = Instant::now();
        for i in 0..k {
            if let Some(gap) = 1_000_000_000u64.checked_div(rate) {
                let due = start + Duration::from_nanos(i as u64 * gap);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let stamp = now_ns();
            let _ = writeln!(
                out,
                r#"{{"type":"stream_event","event":{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{stamp} "}}}},"session_id":"{sid}","parent_tool_use_id":null,"uuid":"8b6f4f3e-2a1d-4c5b-9e8f-{i:012}"}}"#
            );
            let _ = out.flush();
        }
        let _ = writeln!(
            out,
            r#"{{"type":"assistant","message":{{"id":"msg_fake","type":"message","role":"assistant","model":"claude-fake","content":[{{"type":"text","text":"({k} deltas)"}}],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":10,"output_tokens":{k}}}}},"parent_tool_use_id":null,"session_id":"{sid}","uuid":"00000000-0000-4000-8000-000000000002"}}"#
        );
        let _ = writeln!(
            out,
            r#"{{"type":"result","subtype":"success","is_error":false,"duration_ms":{},"num_turns":1,"result":"done","stop_reason":"end_turn","session_id":"{sid}","total_cost_usd":0.0001,"usage":{{"input_tokens":10,"cache_read_input_tokens":0,"output_tokens":{k}}},"uuid":"00000000-0000-4000-8000-000000000003"}}"#,
            start.elapsed().as_millis()
        );
        let _ = out.flush();
    }
}

fn param<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
