//! Standing permission rules in Claude Code's own syntax (`Bash(npm test)`,
//! `Edit(//abs/path)`, `WebFetch(domain:example.com)`, `mcp__srv__tool`):
//! the narrowest rule that covers a request, and whether a rule covers
//! one. Pure; loopd answers the requests a rule covers itself.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a rule does to the requests it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    Allow,
    Deny,
}

/// A rule: a tool (as rules name it) and what of its input it covers
/// (`None`: every use of the tool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub tool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// The tools whose rules are named after another: every file-editing tool
/// is governed by `Edit(...)` rules, every reading one by `Read(...)`.
fn rule_tool(tool: &str) -> &str {
    match tool {
        "Edit" | "MultiEdit" | "Write" | "NotebookEdit" => "Edit",
        "Read" | "Grep" | "Glob" | "LS" => "Read",
        other => other,
    }
}

/// The file a request is about, as an absolute path in rule form (`//…`).
fn file_of(tool: &str, input: &Value) -> Option<String> {
    let key = match tool {
        "NotebookEdit" => "notebook_path",
        "Grep" | "Glob" | "LS" => "path",
        _ => "file_path",
    };
    let path = input.get(key)?.as_str()?;
    let clean = normalize(path)?;
    Some(format!("/{clean}"))
}

/// An absolute path without `.`, `..` or repeated slashes; `None` for a
/// relative one, or one that climbs above the root.
fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

impl Rule {
    /// The narrowest rule that covers this request: the exact command, the
    /// exact file, the URL's host; for other tools, the tool. `Err` (why)
    /// when the request cannot be pinned down that narrowly (no command, a
    /// relative path, a path with a wildcard in it, a URL without a host):
    /// such a rule would cover far more than what was asked.
    pub fn narrowest(tool: &str, input: &Value) -> Result<Self, String> {
        let named = rule_tool(tool);
        let content = match named {
            "Bash" => Some(
                input
                    .get("command")
                    .and_then(Value::as_str)
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .ok_or("the request names no command")?,
            ),
            "Edit" | "Read" => {
                let file = file_of(tool, input).ok_or("the request names no absolute path")?;
                if file.contains(['*', '?', '[']) {
                    return Err("the path holds a wildcard".into());
                }
                Some(file)
            }
            "WebFetch" => Some(
                input
                    .get("url")
                    .and_then(Value::as_str)
                    .and_then(|u| reqwest::Url::parse(u).ok())
                    .and_then(|u| u.host_str().map(|h| format!("domain:{h}")))
                    .ok_or("the request names no host")?,
            ),
            _ => None,
        };
        Ok(Self {
            tool: named.to_owned(),
            content,
        })
    }

    /// Whether this rule covers a request to use `tool` with `input`: the
    /// same tool, and the same command, file or host.
    pub fn covers(&self, tool: &str, input: &Value) -> bool {
        if rule_tool(tool) != self.tool {
            return false;
        }
        let Some(content) = &self.content else {
            return true;
        };
        match self.tool.as_str() {
            "Bash" => input
                .get("command")
                .and_then(Value::as_str)
                .is_some_and(|c| c.trim() == content),
            "Edit" | "Read" => file_of(tool, input).is_some_and(|f| f == *content),
            "WebFetch" => {
                let host = input
                    .get("url")
                    .and_then(Value::as_str)
                    .and_then(|u| reqwest::Url::parse(u).ok())
                    .and_then(|u| u.host_str().map(str::to_owned));
                host.is_some_and(|h| content.strip_prefix("domain:") == Some(h.as_str()))
            }
            _ => false,
        }
    }

    /// The rule as Claude Code writes it.
    pub fn display(&self) -> String {
        match &self.content {
            Some(content) => format!("{}({content})", self.tool),
            None => self.tool.clone(),
        }
    }
}

/// A rule in force on a loop, with its id and what it does.
#[derive(Debug, Clone, PartialEq)]
pub struct StandingRule {
    pub id: String,
    pub behavior: Behavior,
    pub rule: Rule,
}

/// The rule that answers a request, if any: a deny rule before an allow
/// rule, as Claude Code orders them.
pub fn answering<'a>(
    rules: &'a [StandingRule],
    tool: &str,
    input: &Value,
) -> Option<&'a StandingRule> {
    let covering = |b: Behavior| {
        rules
            .iter()
            .find(move |r| r.behavior == b && r.rule.covers(tool, input))
    };
    covering(Behavior::Deny).or_else(|| covering(Behavior::Allow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_narrowest_rule_of_a_request() {
        // The inputs as Claude Code sends them (see the protocol reference).
        let table: &[(&str, Value, &str)] = &[
            (
                "Bash",
                json!({"command": "touch perm_test.txt", "description": "Create file"}),
                "Bash(touch perm_test.txt)",
            ),
            ("Bash", json!({"command": "npm test"}), "Bash(npm test)"),
            (
                "Write",
                json!({"file_path": "/work/loop/w.txt", "content": "x\n"}),
                "Edit(//work/loop/w.txt)",
            ),
            (
                "Edit",
                json!({"file_path": "/work/loop/src/../lib.rs"}),
                "Edit(//work/loop/lib.rs)",
            ),
            (
                "NotebookEdit",
                json!({"notebook_path": "/w/n.ipynb"}),
                "Edit(//w/n.ipynb)",
            ),
            (
                "Read",
                json!({"file_path": "/etc/hosts"}),
                "Read(//etc/hosts)",
            ),
            (
                "WebFetch",
                json!({"url": "https://docs.rs/tokio", "prompt": "x"}),
                "WebFetch(domain:docs.rs)",
            ),
            (
                "mcp__github__create_issue",
                json!({"title": "x"}),
                "mcp__github__create_issue",
            ),
        ];
        for (tool, input, want) in table {
            let rule = Rule::narrowest(tool, input).unwrap();
            assert_eq!(rule.display(), *want, "{tool} {input}");
            assert!(rule.covers(tool, input), "covers its own request: {want}");
        }
        // What cannot be pinned down makes no rule (it would cover all).
        for (tool, input) in [
            ("Bash", json!({})),
            ("Bash", json!({"command": "  "})),
            ("Write", json!({"file_path": "relative.txt"})),
            ("Edit", json!({"file_path": "/../x"})),
            ("Edit", json!({"file_path": "/home/u/**"})),
            ("Grep", json!({"pattern": "x"})),
            ("WebFetch", json!({"url": "data:text/plain,x"})),
        ] {
            assert!(Rule::narrowest(tool, &input).is_err(), "{tool} {input}");
        }
    }

    #[test]
    fn what_a_rule_covers() {
        let bash = |c: &str| Rule {
            tool: "Bash".into(),
            content: Some(c.into()),
        };
        let edit = |c: &str| Rule {
            tool: "Edit".into(),
            content: Some(c.into()),
        };
        let fetch = |c: &str| Rule {
            tool: "WebFetch".into(),
            content: Some(c.into()),
        };
        let any = |t: &str| Rule {
            tool: t.into(),
            content: None,
        };
        let table: &[(Rule, &str, Value, bool)] = &[
            (
                bash("npm test"),
                "Bash",
                json!({"command": "npm test"}),
                true,
            ),
            (
                bash("npm test"),
                "Bash",
                json!({"command": "  npm test "}),
                true,
            ),
            (
                bash("npm test"),
                "Bash",
                json!({"command": "npm test && rm -rf /"}),
                false,
            ),
            (
                bash("npm test"),
                "Bash",
                json!({"command": "npm testx"}),
                false,
            ),
            (
                bash("npm test"),
                "Write",
                json!({"file_path": "/npm test"}),
                false,
            ),
            (
                edit("//w/src/a.rs"),
                "Edit",
                json!({"file_path": "/w/src/a.rs"}),
                true,
            ),
            (
                edit("//w/src/a.rs"),
                "Write",
                json!({"file_path": "/w/src/./a.rs"}),
                true,
            ),
            (
                edit("//w/src/a.rs"),
                "MultiEdit",
                json!({"file_path": "/w/x/../src/a.rs"}),
                true,
            ),
            (
                edit("//w/src/a.rs"),
                "Edit",
                json!({"file_path": "/w/src/a.rsx"}),
                false,
            ),
            (
                edit("//w/src/a.rs"),
                "Edit",
                json!({"file_path": "/w/src/b.rs"}),
                false,
            ),
            (
                edit("//w/src/a.rs"),
                "Edit",
                json!({"file_path": "src/a.rs"}),
                false,
            ),
            (
                edit("//w/src/a.rs"),
                "Read",
                json!({"file_path": "/w/src/a.rs"}),
                false,
            ),
            // Literal: a `*` in a stored rule matches only itself.
            (
                edit("//w/*.md"),
                "Edit",
                json!({"file_path": "/w/README.md"}),
                false,
            ),
            (
                edit("//w/ü.md"),
                "Edit",
                json!({"file_path": "/w/ü.md"}),
                true,
            ),
            (
                fetch("domain:docs.rs"),
                "WebFetch",
                json!({"url": "https://docs.rs/x"}),
                true,
            ),
            (
                fetch("domain:docs.rs"),
                "WebFetch",
                json!({"url": "https://evil.docs.rs.example/x"}),
                false,
            ),
            (any("mcp__s__t"), "mcp__s__t", json!({"any": 1}), true),
            (any("mcp__s__t"), "mcp__s__u", json!({}), false),
        ];
        for (rule, tool, input, want) in table {
            assert_eq!(
                rule.covers(tool, input),
                *want,
                "{} on {tool} {input}",
                rule.display()
            );
        }
    }

    #[test]
    fn a_deny_rule_answers_before_an_allow_rule() {
        let rule = |id: &str, behavior| StandingRule {
            id: id.into(),
            behavior,
            rule: Rule {
                tool: "Bash".into(),
                content: Some("ls".into()),
            },
        };
        let rules = [rule("a", Behavior::Allow), rule("d", Behavior::Deny)];
        let ls = json!({"command": "ls"});
        assert_eq!(answering(&rules, "Bash", &ls).unwrap().id, "d");
        assert_eq!(answering(&rules[..1], "Bash", &ls).unwrap().id, "a");
        assert!(answering(&rules, "Bash", &json!({"command": "pwd"})).is_none());
    }
}
