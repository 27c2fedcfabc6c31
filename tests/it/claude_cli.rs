//! Finding (or installing) the real Claude Code CLI, the environment that
//! points it at the mock model API, and a recorder of its raw output.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::mock_anthropic::RunningMock;

/// `node_modules` of the repository (installed with `npm install` from
/// `package.json` on first use): the Claude Code CLI and playwright-core.
pub fn node_modules() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let wanted = [
            "node_modules/.bin/claude",
            "node_modules/playwright-core/package.json",
        ];
        if !wanted.iter().all(|p| root.join(p).exists()) {
            let status = std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .current_dir(root)
                .status()
                .expect("npm is needed to install the test tools (package.json)");
            assert!(status.success(), "npm install failed");
        }
        root.join("node_modules")
    })
    .clone()
}

/// The CLI from `node_modules`, or `LOOPD_TEST_CLAUDE_BIN`.
pub fn claude_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LOOPD_TEST_CLAUDE_BIN") {
        return PathBuf::from(bin);
    }
    let bin = node_modules().join(".bin/claude");
    assert!(
        bin.exists(),
        "{} is missing after npm install",
        bin.display()
    );
    bin
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
