//! The agent's environment: built, never inherited wholesale. It gets PATH,
//! HOME, LANG and USER, the `ANTHROPIC_*`, `CLAUDE_*` and `DISABLE_*`
//! variables of the server's environment, the names given with
//! `--agent-env`, the loop's vault, and its marker. Nothing of the server's
//! own (`LOOPD_*`) reaches it. In a sandbox, HOME is the loop's agent home.
//!
//! A vault cannot set the variables that decide what code runs (`PATH`,
//! `LD_*`, `NODE_OPTIONS`, …) unless the operator allows them by name.

use std::collections::BTreeMap;
use std::path::Path;

use super::process::MARKER_VAR;

const BASE: &[&str] = &["PATH", "HOME", "LANG", "USER"];
const PREFIXES: &[&str] = &["ANTHROPIC_", "CLAUDE_", "DISABLE_"];
/// Quiet defaults for a CLI run by a server (the environment may override them).
const DEFAULTS: &[(&str, &str)] = &[
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_AUTOUPDATER", "1"),
];

/// Variables a vault may not set (exact names, then prefixes): they decide
/// which programs and libraries run, or where the agent keeps its state.
const LOADER_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TMPDIR",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "BASH_ENV",
    "ENV",
    "PROMPT_COMMAND",
    "IFS",
    "GCONV_PATH",
    "GIT_EXEC_PATH",
    "GIT_ASKPASS",
    "GIT_PROXY_COMMAND",
    "GIT_EXTERNAL_DIFF",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_PAGER",
    "GIT_EDITOR",
    "GIT_SEQUENCE_EDITOR",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "LESSOPEN",
    "LESSCLOSE",
    "XDG_CONFIG_HOME",
    "ZDOTDIR",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "CLAUDE_CONFIG_DIR",
    MARKER_VAR,
];
const LOADER_PREFIXES: &[&str] = &[
    "LD_",
    "DYLD_",
    "BASH_FUNC_",
    "GIT_CONFIG",
    "GIT_SSH",
    "BUN_",
    "LOOPD_",
];

/// Refuses a vault that sets a loader variable not in `allowed`.
pub fn check_vault(vault: &[(String, String)], allowed: &[String]) -> Result<(), String> {
    for (key, _) in vault {
        let loader = LOADER_VARS.contains(&key.as_str())
            || LOADER_PREFIXES.iter().any(|p| key.starts_with(p));
        if loader && !allowed.contains(key) {
            return Err(format!(
                "the loop's vault sets `{key}`, which decides what code the agent runs; \
                 the operator can allow it with --vault-allow-env {key}"
            ));
        }
    }
    Ok(())
}

/// The environment for an agent, from the server's environment `server_env`;
/// `home`: the agent's own HOME (in a sandbox).
pub fn build(
    server_env: impl IntoIterator<Item = (String, String)>,
    extra_names: &[String],
    vault: &[(String, String)],
    marker: &str,
    home: Option<&Path>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = DEFAULTS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (key, value) in server_env {
        let passed = BASE.contains(&key.as_str())
            || PREFIXES.iter().any(|p| key.starts_with(p))
            || extra_names.contains(&key);
        if passed && !key.starts_with("LOOPD_") {
            env.insert(key, value);
        }
    }
    for (key, value) in vault {
        env.insert(key.clone(), value.clone());
    }
    if let Some(home) = home {
        env.insert("HOME".to_owned(), home.display().to_string());
        // A config dir of the server's user is not in the sandbox.
        env.remove("CLAUDE_CONFIG_DIR");
    }
    env.insert(MARKER_VAR.to_owned(), marker.to_owned());
    env.into_iter().collect()
}

/// Reads a vault file: `KEY=VALUE` lines, `#` comments, blank lines, an
/// optional `export ` and optional quotes around the value.
pub fn read_vault(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_vault(&text).map_err(|(line, why)| format!("{} line {line}: {why}", path.display()))
}

fn parse_vault(text: &str) -> Result<Vec<(String, String)>, (usize, &'static str)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or((i + 1, "expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((i + 1, "a key is letters, digits and `_`"));
        }
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| value.strip_prefix(*a)?.strip_suffix(*b))
            .unwrap_or(value);
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn passes_what_agents_need_and_nothing_of_the_servers() {
        let server = vars(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("ANTHROPIC_API_KEY", "sk-x"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:1"),
            ("CLAUDE_CODE_MAX_RETRIES", "1"),
            ("LOOPD_DATA_DIR", "/secret"),
            ("AWS_SECRET_ACCESS_KEY", "no"),
            ("GIT_AUTHOR_NAME", "me"),
            ("DISABLE_AUTOUPDATER", "0"),
        ]);
        let vault = vars(&[("DEPLOY_TOKEN", "v1"), (MARKER_VAR, "spoofed")]);
        let env: BTreeMap<_, _> = build(server, &["GIT_AUTHOR_NAME".into()], &vault, "m1", None)
            .into_iter()
            .collect();
        assert_eq!(env["PATH"], "/usr/bin");
        assert_eq!(env["ANTHROPIC_API_KEY"], "sk-x");
        assert_eq!(env["CLAUDE_CODE_MAX_RETRIES"], "1");
        assert_eq!(env["GIT_AUTHOR_NAME"], "me");
        assert_eq!(env["DEPLOY_TOKEN"], "v1");
        assert_eq!(
            env["DISABLE_AUTOUPDATER"], "0",
            "the environment overrides a default"
        );
        assert_eq!(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1");
        assert_eq!(env[MARKER_VAR], "m1", "the marker cannot be overridden");
        assert!(!env.contains_key("LOOPD_DATA_DIR"));
        assert!(!env.contains_key("AWS_SECRET_ACCESS_KEY"));
    }

    #[test]
    fn a_sandboxed_agent_gets_its_own_home() {
        let server = vars(&[("HOME", "/root"), ("CLAUDE_CONFIG_DIR", "/root/.claude")]);
        let env: BTreeMap<_, _> = build(server, &[], &[], "m", Some(Path::new("/d/loops/1/home")))
            .into_iter()
            .collect();
        assert_eq!(env["HOME"], "/d/loops/1/home");
        assert!(!env.contains_key("CLAUDE_CONFIG_DIR"));
    }

    #[test]
    fn vaults_cannot_set_loader_variables_unless_allowed() {
        for key in [
            "PATH",
            "HOME",
            "LD_PRELOAD",
            "NODE_OPTIONS",
            "BASH_ENV",
            "GIT_SSH_COMMAND",
            "GIT_DIR",
            "EDITOR",
            "JAVA_TOOL_OPTIONS",
            "LOOPD_X",
        ] {
            let vault = vars(&[("OK", "1"), (key, "x")]);
            let err = check_vault(&vault, &[]).unwrap_err();
            assert!(err.contains(key), "{err}");
            assert!(
                !err.contains("  "),
                "one sentence, no runs of spaces: {err}"
            );
            check_vault(&vault, &[key.to_owned()]).unwrap();
        }
        check_vault(
            &vars(&[
                ("DEPLOY_TOKEN", "x"),
                ("PATHWAY", "y"),
                ("GIT_AUTHOR_NAME", "me"),
            ]),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn vault_files_parse_like_dotenv() {
        let parsed =
            parse_vault("# comment\n\nA=1\nexport B = two words \nC=\"quoted value\"\nD='x'\nE=\n")
                .unwrap();
        assert_eq!(
            parsed,
            vars(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "quoted value"),
                ("D", "x"),
                ("E", "")
            ])
        );
        assert_eq!(parse_vault("A=1\nnope\n"), Err((2, "expected KEY=VALUE")));
        assert!(parse_vault("BAD KEY=1").is_err());
    }
}
