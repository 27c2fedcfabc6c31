//! Three nodes behind a real nginx, configured with the very block that
//! `docs/scale-out.md` gives (round robin, no sticky sessions, SSE
//! unbuffered), and a team's day spoken only to nginx: whichever node gets
//! each request, it behaves as one loopd. On Postgres in either test
//! target, so it is run once (from `tests/it`).

use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::cluster::{Node, assert_contiguous, cluster_with, workspace_of};
use crate::support::{TestApp, choice_id, eventually, names, seqs};

/// The comment an event stream sends every 15 s.
const PING: &str = "event: ping";

struct Nginx {
    child: Child,
    dir: TempDir,
}

impl Nginx {
    /// nginx on loopback `port`, in front of `upstreams` (host:port each),
    /// with the documentation's configuration: its `upstream` servers are
    /// these, and it listens on `port` without TLS. Nothing else changes.
    fn start(port: u16, upstreams: &[String]) -> Self {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scale-out.md"))
                .unwrap();
        let block = doc
            .split("```nginx\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("an nginx block in docs/scale-out.md");
        let mut servers = upstreams.iter();
        let mut conf = String::new();
        for line in block.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("server ")
                && trimmed.ends_with(';')
                && !trimmed.contains("_name")
            {
                let ours = servers.next().expect("as many servers as the docs have");
                conf.push_str(&format!("    server {ours};\n"));
            } else if trimmed.starts_with("listen ") {
                conf.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        assert!(servers.next().is_none(), "the docs name fewer servers");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // Readable by nginx's workers (who run as nobody under root).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let full = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{}}\nhttp {{\n    log_format upstream '$upstream_addr $status \"$request\"';\n\
             access_log {d}/access.log upstream;\n\
             client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n{conf}}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, full).unwrap();
        let child = Command::new(nginx_bin())
            .args(["-e", &format!("{d}/error.log"), "-p", &d.to_string(), "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (apt-get install nginx)");
        Self { child, dir }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Which upstream got each request, by nginx's access log.
    fn spread(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (a SIGKILL would leave them
        // running), then it is reaped.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> String {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nginx")
        .to_owned()
}

fn owner_of(nodes: &[Node], detail: &Value) -> usize {
    nodes
        .iter()
        .position(|n| json!(n.url()) == detail["node"])
        .unwrap_or_else(|| panic!("no node runs it: {detail}"))
}

#[tokio::test]
async fn a_team_through_nginx_that_sends_each_request_to_any_node() {
    // As the docs say: the public name is nginx's, forwarded-for trusted.
    let port = crate::pg::free_port();
    let public = format!("http://127.0.0.1:{port}");
    let args = ["--public-url", &public, "--trust-forwarded-for"];
    let (_database, mut nodes) = cluster_with(3, &args).await;
    let upstreams: Vec<String> = nodes.iter().map(|n| n.app.addr.to_string()).collect();
    let nginx = Nginx::start(port, &upstreams);
    let lb = TestApp::external(
        format!("127.0.0.1:{port}").parse().unwrap(),
        nginx.dir.path().to_owned(),
    )
    .await;

    // A bot's token and a person's web session, made through any node.
    let alice = lb.bearer("alice").await;
    let page = lb.session("alice").await;
    let id = lb.create_loop(&alice, json!({"title": "team"})).await;
    let detail_path = format!("/api/v1/loops/{id}");
    eventually("the loop on every node", async || {
        let mut ok = true;
        for _ in 0..3 {
            ok &= lb.get(&detail_path, &alice).await.0 == StatusCode::OK;
        }
        ok
    })
    .await;

    // A held turn streams through nginx while it runs: its first words
    // arrive before it ends (nothing buffers the stream).
    let mut held = lb.send(&alice, &id, "/hold one").await;
    let begun = held.until("assistant_delta").await;
    // Not pushed out by the stream's 15 s ping (a buffering proxy lets
    // events out only with more bytes behind them): it came on its own.
    assert!(!held.raw.contains(PING), "{}", held.raw);
    let user_seq = begun[0].id.unwrap();
    let owner = owner_of(&nodes, &lb.get(&detail_path, &alice).await.1);
    // Watchers from just after the user_message, on whichever nodes.
    let mut watchers = Vec::new();
    for _ in 0..3 {
        watchers.push(lb.watch(&alice, &id, Some(user_seq)).await);
    }
    std::fs::write(workspace_of(&nodes[owner], &id).join("one"), "").unwrap();
    let from_sender = held.until_end().await;
    assert_eq!(from_sender.last().unwrap().name, "done");
    for watcher in &mut watchers {
        let seen = watcher.until("done").await;
        let sent: Vec<_> = begun[1..].iter().chain(&from_sender).cloned().collect();
        assert_eq!(seqs(&seen), seqs(&sent), "the same events, the same seqs");
    }

    // A choice asked through one node, answered through another.
    let mut asking = lb.send(&alice, &id, "/permission ls").await;
    let choice = choice_id(&asking.until("requires_choice").await);
    let (status, body) = lb
        .choose(&alice, &id, &choice, json!({"allow": true}))
        .await;
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(asking.until_end().await.last().unwrap().name, "done");

    // The web page's interrupt: a cookie, and the public Origin.
    let mut held = lb.send(&alice, &id, "/hold never").await;
    held.until("assistant_delta").await;
    let resp = lb
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/loops/{id}/interrupt"),
            &page,
        )
        .header("origin", &public)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (status, body) = crate::support::read(resp).await;
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(held.until_end().await.last().unwrap().name, "interrupted");

    // The owner dies mid-turn: the turn ends node_lost, the next one runs
    // on a node that is left, and nginx stops sending to the dead one.
    let mut held = lb.send(&alice, &id, "/hold forever").await;
    let begun = held.until("assistant_delta").await;
    let owner = owner_of(&nodes, &lb.get(&detail_path, &alice).await.1);
    nodes[owner].kill();
    let mut watcher = lb.watch(&alice, &id, Some(begun[0].id.unwrap())).await;
    let lost = watcher.until("error").await;
    assert_eq!(lost.last().unwrap().data["code"], "node_lost", "{lost:?}");
    let next = lb.send(&alice, &id, "after").await.until_end().await;
    assert_eq!(next.last().unwrap().name, "done", "{next:?}");

    // Archived through any node; the whole log, through any node, has no
    // gap and no duplicate.
    let (status, _) = lb.delete(&detail_path, &alice).await;
    assert!(status.is_success(), "{status}");
    let last = next.last().unwrap().id.unwrap();
    let mut stream = lb.watch(&alice, &id, Some(0)).await;
    let mut all = Vec::new();
    while all.last().is_none_or(|(seq, _)| *seq < last) {
        let e = stream.next().await.expect("the stream ended early");
        all.push((e.id.unwrap(), e.name));
    }
    assert_contiguous(&all);
    assert!(
        names(&next).contains(&"started"),
        "{next:?}\n{}",
        nginx.error_log()
    );
    // Every node was asked something (round robin, no stickiness).
    let spread = nginx.spread();
    for upstream in &upstreams {
        assert!(
            spread.contains(upstream.as_str()),
            "{upstream} never asked:\n{spread}"
        );
    }
}
