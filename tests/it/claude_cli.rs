//! Finding (or installing) the real Claude Code CLI, the environment that
//! points it at the mock model API, and a recorder of its raw output.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::mock_anthropic::RunningMock;

/// The CLI from `node_modules` (installed with `npm install` on first use),
/// or `LOOPD_TEST_CLAUDE_BIN`.
pub fn claude_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LOOPD_TEST_CLAUDE_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin = root.join("node_modules/.bin/claude");
        if !bin.exists() {
            let status = std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .current_dir(root)
                .status()
                .expect("npm is needed to install the Claude Code CLI for the tests");
            assert!(status.success(), "npm install failed");
        }
        assert!(
            bin.exists(),
            "{} is missing after npm install",
            bin.display()
        );
        bin
    })
    .clone()
}

/// The environment an agent gets in tests: a private HOME, the mock API.
pub fn agent_env(mock: &RunningMock, home: &Path) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HOME".into(), home.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("USER".into(), "root".into()),
        ("ANTHROPIC_BASE_URL".into(), mock.base_url()),
        ("ANTHROPIC_API_KEY".into(), "sk-ant-test-key".into()),
        ("CLAUDE_CODE_MAX_RETRIES".into(), "0".into()),
    ]
}
