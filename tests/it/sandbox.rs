//! The sandbox tried as an attacker would, from inside a loop: the real
//! Claude Code CLI runs Bash commands the mock model scripts, by absolute
//! and by relative path, against everything loopd owns. Each escape must
//! fail and leave the files byte-identical; normal work must still succeed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::claude::Rig;
use crate::support::{Auth, eventually, names, text};

/// A turn in `bypassPermissions` (the sandbox lets Claude Code run it
/// itself): every tool runs without a prompt.
async fn run(rig: &Rig, loop_id: &str, command: &str) -> Vec<crate::support::Sse> {
    let body =
        json!({"content": format!("[[bash:{command}]]"), "permission_mode": "bypassPermissions"});
    let events = rig
        .app
        .send_with(&rig.bearer, loop_id, body, None)
        .await
        .until_end()
        .await;
    assert_eq!(events.last().unwrap().name, "done", "{:?}", names(&events));
    assert!(
        !names(&events).contains(&"requires_choice"),
        "{:?}",
        names(&events)
    );
    events
}

fn workspace(data: &Path, loop_id: &str) -> PathBuf {
    data.join("loops")
        .join(loop_id.strip_prefix("loop_").unwrap())
        .join("workspace")
}

/// Every file under `dir` (but `skip`, workspaces and agent homes) and its
/// bytes. `lastUsedAt` in `api-tokens.json` is left out: the server writes
/// it on a timer of its own.
fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            // The audit trail grows by what loopd records of the attack
            // itself (checked apart: only ever appended to).
            if name == "workspace" || name == "home" || name == "audit.jsonl" || path == skip {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(mut bytes) = std::fs::read(&path) {
                if name == "api-tokens.json" {
                    bytes = without_last_used(&bytes);
                }
                out.insert(path, bytes);
            }
        }
    }
    out
}

fn without_last_used(bytes: &[u8]) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("lastUsedAt");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(mut v) => {
            strip(&mut v);
            v.to_string().into_bytes()
        }
        Err(_) => bytes.to_vec(),
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn no_escape_from_a_loop_reaches_loopd_its_files_or_another_loop() {
    let rig = Rig::start().await;
    let data = rig.data.path().to_owned();
    // A logged-in CLI's credentials, in the home of the user running loopd.
    let credentials = rig.home.path().join(".claude/.credentials.json");
    std::fs::create_dir_all(credentials.parent().unwrap()).unwrap();
    std::fs::write(&credentials, "creds-of-the-operator").unwrap();
    let (_, health) = rig.app.get("/healthz", &Auth::None).await;
    assert_eq!(
        health["sandbox"], "bwrap",
        "the default sandbox where bubblewrap works: {health}"
    );

    // Bob has a loop with a conversation and a file; a vault alice is not granted.
    rig.app
        .accounts()
        .users
        .add("bob", false, crate::support::PASSWORD)
        .unwrap();
    crate::support::seen_by_server("bob's account", async || {
        let body = json!({"username": "bob", "password": crate::support::PASSWORD});
        rig.app.post("/api/auth/login", &Auth::None, body).await.0 == reqwest::StatusCode::OK
    })
    .await;
    let bob = rig.app.bearer("bob").await;
    let bob_loop = rig.app.create_loop(&bob, json!({"title": "bob's"})).await;
    let said = rig
        .app
        .send(&bob, &bob_loop, "bob-secret-words")
        .await
        .until_end()
        .await;
    assert_eq!(said.last().unwrap().name, "done");
    let bob_ws = workspace(&data, &bob_loop);
    std::fs::write(bob_ws.join("secret.txt"), "bob-file").unwrap();
    std::fs::create_dir_all(data.join("vaults")).unwrap();
    std::fs::write(data.join("vaults/prod.env"), "PROD_DB_PASSWORD=hunter2\n").unwrap();
    std::fs::write(data.join("vaults/prod.users"), "bob\n").unwrap();
    // Alice cannot name it: the same answer as for a vault that does not exist.
    let (status, body) = rig
        .app
        .post("/api/v1/loops", &rig.bearer, json!({"vault": "prod"}))
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("vault_not_found"))
    );

    // Alice's loop needs a workspace to run the attack from.
    rig.turn("hello").await;
    let alice_dir = data.join("loops").join(rig.uuid());
    let before = snapshot(&data, &alice_dir);
    let trail_before = std::fs::read(data.join("audit.jsonl")).unwrap_or_default();
    if !crate::pg::on_postgres() {
        // (On a shared database they live there, out of any agent's reach.)
        assert!(before.contains_key(&data.join("api-tokens.json")));
        assert!(before.contains_key(&data.join("sessions.json")));
    }
    let ws = rig.workspace();
    let bob_uuid = bob_loop.strip_prefix("loop_").unwrap();
    let pid = std::process::id();
    let d = data.display();
    let targets = [
        format!("{d}/api-tokens.json"),
        "../../../api-tokens.json".into(),
        format!("{d}/users.json"),
        "../../../users.json".into(),
        format!("{d}/sessions.json"),
        "../../../sessions.json".into(),
        format!("{d}/loops/{bob_uuid}/events.jsonl"),
        format!("../../{bob_uuid}/events.jsonl"),
        format!("{d}/loops/{bob_uuid}/workspace/secret.txt"),
        format!("../../{bob_uuid}/workspace/secret.txt"),
        format!("{d}/vaults/prod.env"),
        "../../../vaults/prod.env".into(),
        format!("/proc/{pid}/environ"),
        "/etc/shadow".into(),
    ];
    let mut script = String::from("#!/bin/sh\n");
    for t in &targets {
        script.push_str(&format!(
            "if [ -s '{t}' ] && cat '{t}' >/dev/null 2>&1; then echo 'READ {t}'; else echo 'DENIED {t}'; fi\n"
        ));
    }
    for t in [
        format!("{d}/users.json"),
        "../../../users.json".into(),
        format!("{d}/api-tokens.json"),
    ] {
        script.push_str(&format!(
            "if echo '{{}}' >> '{t}' 2>/dev/null; then echo 'WROTE {t}'; else echo 'DENIED write {t}'; fi\n"
        ));
    }
    script.push_str(&format!(
        "if kill -KILL {pid} 2>/dev/null; then echo 'KILLED loopd'; else echo 'DENIED kill'; fi\n\
         tr '\\0' '\\n' < /proc/$PPID/environ | grep -c CARGO_ || true\n\
         echo \"processes $(ls /proc | grep -c '^[0-9]')\"\n\
         echo \"uid $(id -u)\"\n\
         if unshare -U true 2>/dev/null; then echo 'NESTED userns'; else echo 'DENIED userns'; fi\n\
         echo \"credentials $(cat \"$HOME/.claude/.credentials.json\")\"\n\
         if echo x >> \"$HOME/.claude/.credentials.json\" 2>/dev/null; then echo 'WROTE credentials'; else echo 'DENIED write credentials'; fi\n\
         setsid nohup sleep 4747 >/dev/null 2>&1 &\n\
         echo done-probing\n"
    ));
    std::fs::write(ws.join("attack.sh"), script).unwrap();
    run(&rig, &rig.loop_id, "sh attack.sh > report.txt 2>&1").await;

    let report = std::fs::read_to_string(ws.join("report.txt")).unwrap();
    assert!(report.contains("done-probing"), "{report}");
    for t in &targets {
        assert!(
            report.contains(&format!("DENIED {t}\n")),
            "{t} was readable:\n{report}"
        );
    }
    assert!(!report.contains("WROTE"), "{report}");
    assert!(report.contains("DENIED kill"), "{report}");
    assert!(
        report.contains("DENIED userns"),
        "a user namespace inside the sandbox:\n{report}"
    );
    // The credentials are there to read, and only to read.
    assert!(
        report.contains("credentials creds-of-the-operator\n"),
        "{report}"
    );
    assert!(report.contains("DENIED write credentials"), "{report}");
    assert_eq!(
        std::fs::read_to_string(&credentials).unwrap(),
        "creds-of-the-operator"
    );
    assert!(
        report.contains("\n0\n"),
        "loopd's environment leaked through $PPID:\n{report}"
    );
    // As root, the agent has a uid of its own; otherwise loopd's.
    let euid = nix::unistd::geteuid();
    let want = if euid.is_root() { 1000 } else { euid.as_raw() };
    assert!(report.contains(&format!("uid {want}\n")), "{report}");
    let processes: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("processes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        processes < 20,
        "the agent sees {processes} processes: not its own PID namespace"
    );
    assert_eq!(
        snapshot(&data, &alice_dir),
        before,
        "a file of loopd changed"
    );
    let trail = std::fs::read(data.join("audit.jsonl")).unwrap_or_default();
    assert!(
        trail.starts_with(&trail_before),
        "the audit trail was rewritten"
    );

    // The sleeper left the process group and the session; ending the loop ends it.
    assert!(sleeper_alive(), "the sleeper never ran");
    rig.app
        .delete(&format!("/api/v1/loops/{}", rig.loop_id), &rig.bearer)
        .await;
    eventually("the sleeper to be gone", async || !sleeper_alive()).await;
}

/// Whether a `sleep 4747` runs anywhere on the host.
fn sleeper_alive() -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == "sleep 4747")
    })
}

#[tokio::test]
async fn normal_work_runs_in_the_sandbox_a_repo_commits_and_its_hooks_are_out_of_reach() {
    let rig = Rig::start().await;
    let data = rig.data.path().to_owned();
    let repo = data.join("repos/app");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "hi\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "init"]);
    let before_config = std::fs::read(repo.join(".git/config")).unwrap();
    let id = rig
        .app
        .create_loop(&rig.bearer, json!({"repo": "app"}))
        .await;
    rig.app
        .send(&rig.bearer, &id, "hello")
        .await
        .until_end()
        .await;
    let ws = workspace(&data, &id);

    // Write and run a file in the workspace.
    let events = run(
        &rig,
        &id,
        "printf 'echo ran-$((40+2))' > job.sh && sh job.sh",
    )
    .await;
    assert!(text(&events).contains("ran-42"), "{}", text(&events));

    // Commit on the loop's branch; plant a hook and change the config: refused.
    let d = data.display();
    let command = format!(
        "echo change >> README && git add README && git -c user.name=agent -c user.email=a@a commit -qm by-the-agent \
         && {{ (echo x > {d}/repos/app/.git/hooks/post-checkout) 2>/dev/null && echo HOOK-WRITTEN || echo hook-denied; \
         git config --local core.hooksPath /tmp 2>/dev/null && echo CONFIG-WRITTEN || echo config-denied; \
         git update-ref refs/heads/main HEAD 2>/dev/null && echo MAIN-MOVED || echo main-denied; }} > result.txt"
    );
    run(&rig, &id, &command).await;
    let result = std::fs::read_to_string(ws.join("result.txt")).unwrap();
    assert_eq!(result, "hook-denied\nconfig-denied\nmain-denied\n");
    let branch = format!(
        "loop/{}",
        &id.strip_prefix("loop_").unwrap().replace('-', "")[..8]
    );
    assert!(git(&repo, &["log", "--format=%s", &branch]).starts_with("by-the-agent\n"));
    assert_eq!(git(&repo, &["log", "--format=%s", "main"]), "init\n");
    assert!(!repo.join(".git/hooks/post-checkout").exists());
    assert_eq!(
        std::fs::read(repo.join(".git/config")).unwrap(),
        before_config
    );
}

#[tokio::test]
async fn a_loop_from_before_the_sandbox_resumes_its_conversation_inside_it() {
    let rig = Rig::start_with(|c| c.sandbox = loopd::agent::sandbox::Sandbox::None).await;
    rig.turn("remember the word pelican").await;
    let rig = rig
        .restart_with(|c| {
            c.sandbox =
                loopd::agent::sandbox::Sandbox::resolve(loopd::agent::sandbox::SandboxMode::Bwrap)
                    .unwrap()
                    .0
        })
        .await;
    let events = rig.turn("[[history]]").await;
    assert_eq!(events[0].data["cold_start"], true);
    assert!(
        events[0].data.get("history_lost").is_none(),
        "{:?}",
        events[0]
    );
    assert!(text(&events).contains("pelican"), "{}", text(&events));
    assert!(rig.agent_home().await.join(".claude/projects").is_dir());
}

#[tokio::test]
async fn permission_modes_are_the_operators_to_grant() {
    let rig = Rig::start_with(|c| {
        c.permission_modes = vec![
            loopd::agent::PermissionMode::Default,
            loopd::agent::PermissionMode::Plan,
        ]
    })
    .await;
    let body = json!({"content": "hi", "permission_mode": "bypassPermissions"});
    let got = rig
        .app
        .post(
            &format!("/api/v1/loops/{}/messages", rig.loop_id),
            &rig.bearer,
            body,
        )
        .await;
    crate::support::assert_error(&got, 403, "permission_error", "permission_mode_forbidden");
    // Without a sandbox, bypassPermissions is off unless listed.
    let none = loopd::agent::sandbox::Sandbox::None;
    assert!(
        !loopd::config::default_permission_modes(&none)
            .contains(&loopd::agent::PermissionMode::BypassPermissions)
    );
}
