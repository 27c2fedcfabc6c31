//! Several `loopd serve` processes on one Postgres database, on loopback
//! ports: any node answers any request, one node runs each loop's agent,
//! and a node killed with SIGKILL costs only the turn it was running.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{Auth, PASSWORD, TestApp, assert_error, choice_id, eventually, names, seqs};

/// Lease time of the test nodes: a dead node's loops move after this.
const LEASE_TTL: &str = "3";

pub(crate) struct Node {
    pub(crate) app: TestApp,
    child: Child,
    _dir: TempDir,
}

impl Node {
    async fn start(database: &str) -> Self {
        Self::start_with(database, &[]).await
    }

    async fn start_with(database: &str, args: &[&str]) -> Self {
        Self::start_full(database, args, None).await
    }

    /// With `env` only (instead of this process's environment), when given.
    async fn start_full(database: &str, args: &[&str], env: Option<&[(String, String)]>) -> Self {
        Self::start_at(database, crate::pg::free_port(), args, env).await
    }

    /// On loopback `port`.
    async fn start_at(
        database: &str,
        port: u16,
        args: &[&str],
        env: Option<&[(String, String)]>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let mut command = serve(database, port, dir.path(), args);
        if let Some(env) = env {
            command.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
            command
                .env("LOOPD_DATA_DIR", dir.path())
                .env("LOOPD_DATABASE_URL", database)
                .env("LOOPD_LOG", "info,sqlx=warn");
        }
        let child = command.stderr(log).spawn().unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let app = TestApp::external(addr, dir.path().to_owned()).await;
        Self {
            app,
            child,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.app.addr)
    }

    /// kill -9: no goodbye, no lease given back.
    pub(crate) fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.app.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `loopd serve` of a test node on loopback `port`, data in `dir`.
fn serve(database: &str, port: u16, dir: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_loopd"));
    command.args(["serve", "--bind", &format!("127.0.0.1:{port}")]);
    if !args.contains(&"--agent") {
        command.args(["--agent", "echo"]);
    }
    command
        .args(["--lease-ttl", LEASE_TTL])
        .args(args)
        .env("LOOPD_DATA_DIR", dir)
        .env("LOOPD_DATABASE_URL", database)
        .env("LOOPD_LOG", "info,sqlx=warn")
        .stdout(Stdio::null());
    command
}

/// `n` nodes on a new database holding users alice and bob.
async fn cluster(n: usize) -> (String, Vec<Node>) {
    cluster_with(n, &[]).await
}

/// [`cluster`], every node started with `args`.
pub(crate) async fn cluster_with(n: usize, args: &[&str]) -> (String, Vec<Node>) {
    let database = crate::pg::server().new_database();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::start_with(&database, args).await);
    }
    let accounts = crate::pg::accounts(&database);
    for name in ["alice", "bob"] {
        accounts.users.add(name, false, PASSWORD).unwrap();
    }
    // Every node knows them (the change feed), before the test starts.
    for node in &nodes {
        eventually("the users on every node", async || {
            let body = json!({"username": "alice", "password": PASSWORD});
            node.app.post("/api/auth/login", &Auth::None, body).await.0 == StatusCode::OK
        })
        .await;
    }
    (database, nodes)
}

/// User alice (password [`PASSWORD`]) in `database`.
fn add_alice(database: &str) {
    crate::pg::accounts(database)
        .users
        .add("alice", false, PASSWORD)
        .unwrap();
}

pub(crate) fn workspace_of(node: &Node, loop_id: &str) -> PathBuf {
    let uuid = loop_id.strip_prefix("loop_").unwrap();
    node.app.dir.join("loops").join(uuid).join("workspace")
}

/// Every event of the loop, as `node` serves them from the start.
pub(crate) async fn all_events(
    node: &Node,
    auth: &Auth,
    loop_id: &str,
    until_seq: u64,
) -> Vec<(u64, String)> {
    let mut stream = node.app.watch(auth, loop_id, Some(0)).await;
    let mut out = Vec::new();
    while out.last().is_none_or(|(seq, _)| *seq < until_seq) {
        let e = stream.next().await.expect("the stream ended early");
        out.push((e.id.unwrap(), e.name));
    }
    out
}

pub(crate) fn assert_contiguous(events: &[(u64, String)]) {
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "no gap, no duplicate: {events:?}");
}

#[tokio::test]
async fn three_nodes_behave_as_one() {
    let (_db, nodes) = cluster(3).await;
    let (a, b, c) = (&nodes[0].app, &nodes[1].app, &nodes[2].app);
    // A token made through A works on C at once (C fetches what it lacks).
    let alice = a.bearer("alice").await;
    assert_eq!(c.get("/api/auth/me", &alice).await.1["user_id"], "alice");
    // So does a web session.
    let session = a.session("alice").await;
    assert_eq!(c.get("/api/auth/me", &session).await.1["user_id"], "alice");

    // Create on A; C sees it at once (it reads the database's record).
    let id = a.create_loop(&alice, json!({"title": "shared"})).await;
    eventually("the loop on C", async || {
        c.get(&format!("/api/v1/loops/{id}"), &alice).await.0 == StatusCode::OK
    })
    .await;

    // Send on B: B takes the loop and runs its agent. C watches from the
    // user_message on, with Last-Event-ID.
    let mut sent = b.send(&alice, &id, "/hold first").await;
    let started = sent.until("started").await.pop().unwrap().id.unwrap();
    // From just after the user_message on (its seq is the one before).
    let mut watcher = c.watch(&alice, &id, Some(started - 1)).await;
    assert_eq!(watcher.next().await.unwrap().id, Some(started));
    let (_, detail) = c.get(&format!("/api/v1/loops/{id}"), &alice).await;
    assert_eq!(detail["node"], json!(nodes[1].url()), "{detail}");
    assert_eq!(detail["busy"], true);
    std::fs::write(workspace_of(&nodes[1], &id).join("first"), "").unwrap();
    let from_b = sent.until_end().await;
    let from_c = watcher.until("done").await;
    assert_eq!(
        seqs(&from_b),
        seqs(&from_c),
        "the same events, the same seqs"
    );

    // A choice asked through A (forwarded to B), answered on C.
    let mut asking = a.send(&alice, &id, "/permission ls").await;
    let choice = choice_id(&asking.until("requires_choice").await);
    let (status, body) = c.choose(&alice, &id, &choice, json!({"allow": true})).await;
    assert!(status.is_success(), "{status} {body}");
    let rest = asking.until_end().await;
    assert!(names(&rest).contains(&"choice_resolved"), "{rest:?}");
    assert_eq!(rest.last().unwrap().name, "done");

    // Interrupt through A (not the owner), as the web chat on A's page
    // would (cookie and Origin: B checks them as A would): the held turn
    // on B stops.
    let mut held = c.send(&alice, &id, "/hold never").await;
    held.until("assistant_delta").await;
    let page = a.session("alice").await;
    let resp = a
        .request(
            reqwest::Method::POST,
            &format!("/api/v1/loops/{id}/interrupt"),
            &page,
        )
        .header("origin", format!("http://{}", a.addr))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (status, body) = crate::support::read(resp).await;
    assert!(status.is_success(), "{status} {body}");
    let interrupted = held.until_end().await.pop().unwrap();
    assert_eq!(interrupted.name, "interrupted");
    let last_seq = interrupted.id.unwrap();

    // Bob sees none of it on any node.
    let bob = b.bearer("bob").await;
    for node in [a, b, c] {
        // (Once his new token has reached the node.)
        eventually("bob refused", async || {
            let got = node.get(&format!("/api/v1/loops/{id}"), &bob).await;
            got.0 != StatusCode::UNAUTHORIZED
        })
        .await;
        let got = node.get(&format!("/api/v1/loops/{id}"), &bob).await;
        assert_eq!(got.0, StatusCode::FORBIDDEN, "{}", got.1);
    }

    // Archive through C: B stops the agent; every node lists it archived.
    let (status, _) = c.delete(&format!("/api/v1/loops/{id}"), &alice).await;
    assert!(status.is_success(), "{status}");
    for node in [a, b, c] {
        eventually("archived everywhere", async || {
            node.get(&format!("/api/v1/loops/{id}"), &alice).await.1["archived"] == true
        })
        .await;
    }
    eventually("B gives the loop back", async || {
        c.get(&format!("/api/v1/loops/{id}"), &alice).await.1["node"] == Value::Null
    })
    .await;

    // One log: every node serves the same events with the same seqs, 1 to
    // the last, and the same turns.
    let on_a = all_events(&nodes[0], &alice, &id, last_seq).await;
    assert_contiguous(&on_a);
    assert_eq!(on_a, all_events(&nodes[2], &alice, &id, last_seq).await);
    assert_eq!(on_a, all_events(&nodes[1], &alice, &id, last_seq).await);
    let (_, turns) = c.get(&format!("/api/v1/loops/{id}/turns"), &alice).await;
    assert_eq!(turns["data"].as_array().unwrap().len(), 3, "{turns}");
    assert_eq!(
        turns,
        a.get(&format!("/api/v1/loops/{id}/turns"), &alice).await.1
    );

    // A token revoked on A is refused by C.
    let session = a.session("alice").await;
    let (_, list) = a.get("/api/v1/me/tokens", &session).await;
    for token in list["tokens"].as_array().unwrap() {
        let token_id = token["tokenId"].as_str().unwrap();
        let (status, _) = a
            .delete(&format!("/api/v1/me/tokens/{token_id}"), &session)
            .await;
        assert!(status.is_success());
    }
    eventually("the revocation on C", async || {
        c.get("/api/auth/me", &alice).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_error(
        &c.get("/api/auth/me", &alice).await,
        401,
        "authentication_error",
        "invalid_token",
    );
}

#[tokio::test]
async fn a_killed_node_costs_only_the_turn_it_was_running() {
    let (_db, mut nodes) = cluster(2).await;
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0].app.create_loop(&alice, json!({})).await;
    // B runs the loop: a held turn, and one queued behind it (sent through A).
    let mut running = nodes[1].app.send(&alice, &id, "/hold never").await;
    running.until("assistant_delta").await;
    let mut queued = nodes[0].app.send(&alice, &id, "after the loss").await;
    queued.until("queued").await;
    let mut watcher = nodes[0].app.watch(&alice, &id, None).await;

    nodes[1].kill();

    // A takes the loop over once B's lease expires: the running turn ends
    // node_lost, the queued one runs on A.
    let lost = watcher.until("error").await;
    let error = lost.last().unwrap();
    assert_eq!(
        error.data["code"],
        "node_lost",
        "{:?}\n{}",
        lost,
        nodes[0].log()
    );
    let next = watcher.until("done").await;
    assert_eq!(names(&next)[0], "started", "{next:?}");
    assert!(
        crate::support::text(&next).contains("after the loss"),
        "{next:?}"
    );
    let (_, detail) = nodes[0]
        .app
        .get(&format!("/api/v1/loops/{id}"), &alice)
        .await;
    assert_eq!(detail["node"], json!(nodes[0].url()), "{detail}");

    // The next message works, and the log has no gap and no duplicate.
    let more = nodes[0]
        .app
        .send(&alice, &id, "and more")
        .await
        .until_end()
        .await;
    assert_eq!(more.last().unwrap().name, "done");
    let last = more.last().unwrap().id.unwrap();
    let events = all_events(&nodes[0], &alice, &id, last).await;
    assert_contiguous(&events);
    let (_, turns) = nodes[0]
        .app
        .get(&format!("/api/v1/loops/{id}/turns"), &alice)
        .await;
    let statuses: Vec<&str> = turns["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["error", "done", "done"], "{turns}");
}

/// Nodes A (reaching the database through a relay the test controls) and
/// B, a loop created through B, and a turn running on A (`hold`, after its
/// first words), watched through B.
struct Relayed {
    database: String,
    relay: crate::pg::Relay,
    nodes: [Node; 2],
    alice: Auth,
    id: String,
    _running: crate::support::SseStream,
    watcher: crate::support::SseStream,
}

async fn relayed(hold: &str) -> Relayed {
    let database = crate::pg::server().new_database();
    let relay = crate::pg::Relay::start(&database);
    let nodes = [Node::start(&relay.url).await, Node::start(&database).await];
    add_alice(&database);
    let alice = nodes[1].app.bearer("alice").await;
    let id = nodes[1].app.create_loop(&alice, json!({})).await;
    eventually("the loop on A", async || {
        let path = format!("/api/v1/loops/{id}");
        nodes[0].app.get(&path, &alice).await.0 == StatusCode::OK
    })
    .await;
    let mut running = nodes[0].app.send(&alice, &id, hold).await;
    running.until("assistant_delta").await;
    let watcher = nodes[1].app.watch(&alice, &id, None).await;
    Relayed {
        database,
        relay,
        nodes,
        alice,
        id,
        _running: running,
        watcher,
    }
}

#[tokio::test]
async fn a_node_cut_off_from_the_database_stops_its_agent_and_another_takes_over() {
    let Relayed {
        database,
        relay,
        nodes,
        alice,
        id,
        mut watcher,
        _running,
        ..
    } = relayed("/hold never").await;

    relay.cut();
    // A cannot renew: it stops the agent itself, before its lease can run
    // out; B then takes the loop over, and the running turn ends node_lost.
    eventually(
        "A to stop the agent it can no longer be sure of",
        async || {
            nodes[0]
                .log()
                .contains("could not renew the loop's lease in time")
        },
    )
    .await;
    let lost = watcher.until("error").await;
    assert_eq!(lost.last().unwrap().data["code"], "node_lost", "{lost:?}");
    let next = nodes[1]
        .app
        .send(&alice, &id, "after the cut")
        .await
        .until_end()
        .await;
    assert_eq!(next.last().unwrap().name, "done", "{next:?}");

    // A gets its database back: a message through it works again (B,
    // the loop's home now, runs it).
    relay.restore();
    let path = format!("/api/v1/loops/{id}/messages");
    let mut answered = None;
    eventually("A to take a message again", async || {
        let resp = nodes[0]
            .app
            .request(reqwest::Method::POST, &path, &alice)
            .json(&json!({"content": "through A again"}))
            .send()
            .await
            .unwrap();
        let ok = resp.status() == StatusCode::OK;
        if ok {
            answered = Some(crate::support::SseStream::new(resp));
        }
        ok
    })
    .await;
    let last = answered.unwrap().until_end().await;
    assert_eq!(last.last().unwrap().name, "done", "{last:?}");
    let (_, detail) = nodes[0]
        .app
        .get(&format!("/api/v1/loops/{id}"), &alice)
        .await;
    assert_eq!(detail["node"], json!(nodes[1].url()), "{detail}");
    let events = all_events(&nodes[0], &alice, &id, last.last().unwrap().id.unwrap()).await;
    assert_contiguous(&events);
    // (Reading the database's chunks checks their numbering.)
    let uuid: uuid::Uuid = id.strip_prefix("loop_").unwrap().parse().unwrap();
    crate::pg::lines(&database, uuid);
}

#[tokio::test]
async fn a_node_whose_database_hangs_mid_write_stops_its_agent_all_the_same() {
    let Relayed {
        relay,
        nodes,
        alice,
        id,
        mut watcher,
        _running,
        ..
    } = relayed("/hold go").await;

    // The database stops answering A (connections stay open), and the
    // agent says more: A's write of it waits, and its renewals too.
    relay.stall();
    std::fs::write(workspace_of(&nodes[0], &id).join("go"), "").unwrap();
    // The write in flight does not keep the agent alive: A stops it.
    eventually("A to give up its write and stop the agent", async || {
        let log = nodes[0].log();
        log.contains("could not renew the loop's lease in time")
            && log.contains("or this node let it go; stopping here")
    })
    .await;
    // B takes the loop: the turn ends node_lost, and the next one runs.
    let lost = watcher.until("error").await;
    assert_eq!(lost.last().unwrap().data["code"], "node_lost", "{lost:?}");
    assert!(
        !crate::support::text(&lost).contains("released"),
        "{lost:?}"
    );
    let next = nodes[1]
        .app
        .send(&alice, &id, "after")
        .await
        .until_end()
        .await;
    assert_eq!(next.last().unwrap().name, "done", "{next:?}");
    relay.restore();
}

#[tokio::test]
async fn a_node_that_stopped_its_agent_for_the_database_resumes_the_loop_as_node_lost() {
    // One node, through a relay: it has to let the loop go while the
    // database is away, and takes it back itself when it returns.
    let database = crate::pg::server().new_database();
    let relay = crate::pg::Relay::start(&database);
    let node = Node::start(&relay.url).await;
    add_alice(&database);
    let alice = node.app.bearer("alice").await;
    let id = node.app.create_loop(&alice, json!({})).await;
    let mut running = node.app.send(&alice, &id, "/hold never").await;
    running.until("assistant_delta").await;
    let mut queued = node.app.send(&alice, &id, "waiting its turn").await;
    queued.until("queued").await;

    relay.cut();
    eventually(
        "the node to stop the agent it can no longer be sure of",
        async || {
            node.log()
                .contains("could not renew the loop's lease in time")
        },
    )
    .await;
    relay.restore();
    // Not a restart of this node: the running turn was lost with its
    // agent, the queued one is still wanted and runs.
    let mut watcher = node.app.watch(&alice, &id, Some(0)).await;
    let lost = watcher.until("error").await;
    assert_eq!(
        lost.last().unwrap().data["code"],
        "node_lost",
        "{lost:?}\n{}",
        node.log()
    );
    let next = watcher.until("done").await;
    assert!(
        crate::support::text(&next).contains("waiting its turn"),
        "{next:?}"
    );
}

#[tokio::test]
async fn a_data_directory_migrates_into_the_database_and_a_node_serves_it() {
    // A single node on files, with a loop and a finished turn.
    let tmp = tempfile::tempdir().unwrap();
    let files = loopd::store::DataDir::create(tmp.path()).unwrap();
    let accounts = loopd::store::Accounts::open(&files).unwrap();
    accounts.users.add("alice", false, PASSWORD).unwrap();
    // On files, whatever backend the suite runs on.
    let app = TestApp::start_on_files(loopd::Config::for_data_dir(tmp.path())).await;
    let alice = app.bearer("alice").await;
    let id = app.create_loop(&alice, json!({"title": "old"})).await;
    let said = app.send(&alice, &id, "from before").await.until_end().await;
    let last = said.last().unwrap().id.unwrap();
    let (dir, _) = app.stop().await;
    let _keep = tmp;

    let database = crate::pg::server().new_database();
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_loopd"))
            .args(["migrate"])
            .env("LOOPD_DATA_DIR", &dir)
            .env("LOOPD_DATABASE_URL", &database)
            .output()
            .unwrap()
    };
    let first = migrate();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let said = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(
        said.contains(&format!("1 loops and {last} events")),
        "{said}"
    );
    // Again: nothing more to copy, nothing overwritten.
    let again = migrate();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 documents, 0 loops and 0 events"));

    // A node on the database serves it: the user, the loop, its log.
    let node = Node::start(&database).await;
    let alice = node.app.bearer("alice").await;
    let (_, detail) = node.app.get(&format!("/api/v1/loops/{id}"), &alice).await;
    assert_eq!(
        (detail["title"].as_str(), detail["turn_count"].as_u64()),
        (Some("old"), Some(1))
    );
    let events = all_events(&node, &alice, &id, last).await;
    assert_contiguous(&events);
    let uuid: uuid::Uuid = id.strip_prefix("loop_").unwrap().parse().unwrap();
    assert_eq!(crate::pg::lines(&database, uuid).len() as u64, last);
    let next = node.app.send(&alice, &id, "after").await.until_end().await;
    assert_eq!(next.last().unwrap().name, "done");
    // Its user_message took the next seq after the copied ones.
    assert_eq!(next[0].id, Some(last + 2));
}

#[tokio::test]
async fn an_idle_loop_goes_back_to_the_node_that_has_its_workspace() {
    // Agents are reclaimed after a second idle, and their lease given back.
    let (database, mut nodes) = cluster_with(3, &["--idle-timeout", "1"]).await;
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0].app.create_loop(&alice, json!({})).await;
    let node_of = async |nodes: &[Node]| {
        nodes[2]
            .app
            .get(&format!("/api/v1/loops/{id}"), &alice)
            .await
            .1["node"]
            .clone()
    };
    let first = nodes[0]
        .app
        .send(&alice, &id, "hello")
        .await
        .until_end()
        .await;
    assert_eq!(first.last().unwrap().name, "done");
    eventually("A to give the idle loop back", async || {
        node_of(&nodes).await == Value::Null
    })
    .await;

    // Sent through B, it runs on A again, in the same workspace.
    held_turn_runs_on(&nodes, &alice, &id, 1, 0).await;
    eventually("A to give it back again", async || {
        node_of(&nodes).await == Value::Null
    })
    .await;

    // A dies while the loop is idle, and still looks alive in the nodes
    // table: B cannot reach it, and takes the loop itself.
    let a_url = nodes[0].url();
    nodes[0].kill();
    crate::pg::pretend_alive(&database, &a_url);
    let after = nodes[1]
        .app
        .send(&alice, &id, "after")
        .await
        .until_end()
        .await;
    assert_eq!(after.last().unwrap().name, "done", "{after:?}");
    assert!(
        nodes[1].log().contains("could not reach the loop's node"),
        "{}",
        nodes[1].log()
    );
    // B is its home now: once B gave it back too, through C, it runs on B.
    eventually("B to give the idle loop back", async || {
        node_of(&nodes).await == Value::Null
    })
    .await;
    held_turn_runs_on(&nodes, &alice, &id, 2, 1).await;
}

/// A held turn sent through node `through` runs on node `on`: that node
/// says so, and the file in its workspace releases the turn.
async fn held_turn_runs_on(nodes: &[Node], alice: &Auth, id: &str, through: usize, on: usize) {
    let name = format!("on-{on}");
    let mut held = nodes[through]
        .app
        .send(alice, id, &format!("/hold {name}"))
        .await;
    held.until("assistant_delta").await;
    let (_, detail) = nodes[through]
        .app
        .get(&format!("/api/v1/loops/{id}"), alice)
        .await;
    assert_eq!(detail["node"], json!(nodes[on].url()), "{detail}");
    std::fs::write(workspace_of(&nodes[on], id).join(name), "").unwrap();
    assert_eq!(held.until_end().await.last().unwrap().name, "done");
}

#[tokio::test]
async fn a_change_a_node_has_not_seen_yet_is_not_written_over() {
    let (database, nodes) = cluster(1).await;
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0]
        .app
        .create_loop(&alice, json!({"title": "mine"}))
        .await;
    let uuid: uuid::Uuid = id.strip_prefix("loop_").unwrap().parse().unwrap();
    // Another node renamed it a moment ago; this node has not heard yet.
    crate::pg::retitle_unseen(&database, uuid, "renamed elsewhere");
    // A turn (its activity, the agent's session) and an archive through
    // this node keep the rename.
    let said = nodes[0].app.send(&alice, &id, "hi").await.until_end().await;
    assert_eq!(said.last().unwrap().name, "done");
    // Writing the activity brought the record back as it is: the node
    // knows the rename now (the change feed skips that version).
    let (_, detail) = nodes[0]
        .app
        .get(&format!("/api/v1/loops/{id}"), &alice)
        .await;
    assert_eq!(detail["title"], "renamed elsewhere", "{detail}");
    let (status, _) = nodes[0]
        .app
        .delete(&format!("/api/v1/loops/{id}"), &alice)
        .await;
    assert!(status.is_success(), "{status}");
    let record = crate::pg::record(&database, uuid);
    assert_eq!(record["title"], "renamed elsewhere", "{record}");
    assert_eq!(record["archived"], true, "{record}");
}

#[tokio::test]
async fn a_second_process_with_a_live_nodes_advertise_url_refuses_to_start() {
    let database = crate::pg::server().new_database();
    let mut first = Node::start(&database).await;
    let url = first.url();
    // Another process, on its own port and data directory, named as A.
    let dir = tempfile::tempdir().unwrap();
    let twin = serve(
        &database,
        crate::pg::free_port(),
        dir.path(),
        &["--advertise-url", &url],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = twin.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "another loopd is running with --advertise-url {url}"
        )),
        "{said}"
    );
    // A itself, killed and started again on its port (as after a crash,
    // its report still fresh): nothing answers there, so it starts.
    let port = first.app.addr.port();
    first.kill();
    let again = Node::start_at(&database, port, &[], None).await;
    assert_eq!(again.url(), url);
    assert_eq!(
        again
            .app
            .get("/healthz", &crate::support::Auth::None)
            .await
            .1["node"],
        url
    );
}

#[tokio::test]
async fn a_database_with_one_row_per_event_is_brought_to_chunks() {
    // A database as loopd before chunks left it (migrations 1 and 2), with
    // one row per event.
    let url = crate::pg::server().new_database();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version <= 2)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pool).await.unwrap();
    let uuid = uuid::Uuid::new_v4();
    let lines: Vec<String> = (1..=3)
        .map(|seq| format!(r#"{{"seq":{seq},"event":"e{seq}"}}"#))
        .collect();
    for (i, line) in lines.iter().enumerate() {
        sqlx::query("INSERT INTO events (loop_id, seq, line) VALUES ($1, $2, $3)")
            .bind(uuid)
            .bind(i as i64 + 1)
            .bind(line)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;

    // Connecting runs what is new; the events read back the same.
    let pg = loopd::store::Pg::connect(&url).await.unwrap();
    use loopd::store::shared_log;
    assert_eq!(shared_log::last_seq(&pg, uuid).await.unwrap(), 3);
    let (after_one, more) = shared_log::read_after(&pg, uuid, 1, 64, 1 << 20)
        .await
        .unwrap();
    assert!(!more);
    let want: Vec<(i64, String)> = (2..=3)
        .map(|s| (s, lines[s as usize - 1].clone()))
        .collect();
    assert_eq!(after_one, want);
    assert_eq!(crate::pg::lines(&url, uuid), lines);

    // A new append is one chunk; a read from inside it starts where asked.
    let held = shared_log::claim(
        &pg,
        uuid,
        "http://me.invalid",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap()
    .unwrap();
    let more_lines: Vec<String> = (4..=6)
        .map(|seq| format!(r#"{{"seq":{seq},"event":"e{seq}"}}"#))
        .collect();
    let joined = more_lines.join("\n");
    let chunk = shared_log::Chunk {
        first: 4,
        count: 3,
        lines: &joined,
    };
    shared_log::append(pg.pool(), uuid, held.generation, chunk)
        .await
        .unwrap();
    let (from_five, _) = shared_log::read_after(&pg, uuid, 4, 64, 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        from_five,
        [(5, more_lines[1].clone()), (6, more_lines[2].clone())]
    );
    // The same append again (its answer was lost) is already done; other
    // lines at those seqs are another writer's, and refused.
    shared_log::append(pg.pool(), uuid, held.generation, chunk)
        .await
        .unwrap();
    let other = shared_log::Chunk {
        lines: "{}\n{}\n{}",
        ..chunk
    };
    let refused = shared_log::append(pg.pool(), uuid, held.generation, other).await;
    assert!(
        matches!(refused, Err(loopd::store::StoreError::Fenced(_))),
        "{refused:?}"
    );
    // The same through the group commit: its shared statement fails as a
    // whole, and each batch is tried alone, telling the two apart.
    pg.group()
        .append(uuid, held.generation, chunk)
        .await
        .unwrap();
    let refused = pg.group().append(uuid, held.generation, other).await;
    assert!(
        matches!(refused, Err(loopd::store::StoreError::Fenced(_))),
        "{refused:?}"
    );
    // A stale generation is fenced, and the next chunk goes on from 7.
    let next = shared_log::Chunk {
        first: 7,
        count: 1,
        lines: r#"{"seq":7}"#,
    };
    let stale = pg.group().append(uuid, held.generation - 1, next).await;
    assert!(
        matches!(stale, Err(loopd::store::StoreError::Fenced(_))),
        "{stale:?}"
    );
    pg.group()
        .append(uuid, held.generation, next)
        .await
        .unwrap();
    assert_eq!(shared_log::last_seq(&pg, uuid).await.unwrap(), 7);
    // Caught up: nothing comes back (not the last chunk again).
    assert_eq!(
        shared_log::read_after(&pg, uuid, 7, 64, 1 << 20)
            .await
            .unwrap(),
        (vec![], false)
    );
    assert_eq!(
        shared_log::read_after(&pg, uuid, 6, 64, 1 << 20)
            .await
            .unwrap(),
        (vec![(7, r#"{"seq":7}"#.to_owned())], false)
    );
    // A byte budget smaller than a chunk still brings one, and says more.
    let (first, more) = shared_log::read_after(&pg, uuid, 3, 64, 1).await.unwrap();
    assert_eq!((first.len(), more), (3, true), "{first:?}");
    // Two chunks' worth of budget: the first two chunks.
    let (two, _) = shared_log::read_after(&pg, uuid, 0, 2, 1 << 20)
        .await
        .unwrap();
    assert_eq!(two.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
}

#[tokio::test]
async fn a_node_that_lost_its_lease_writes_nothing_more() {
    let (database, nodes) = cluster(1).await;
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0].app.create_loop(&alice, json!({})).await;
    let mut held = nodes[0].app.send(&alice, &id, "/hold never").await;
    held.until("assistant_delta").await;
    // Someone else takes the lease (as a node that believed this one dead).
    let uuid: uuid::Uuid = id.strip_prefix("loop_").unwrap().parse().unwrap();
    crate::pg::steal_lease(&database, uuid);
    // The agent's next words are refused by the database: the node stops
    // the loop there and writes nothing more.
    std::fs::write(workspace_of(&nodes[0], &id).join("never"), "").unwrap();
    eventually("the node to let the loop go", async || {
        nodes[0]
            .log()
            .contains("another node holds this loop's lease")
            || nodes[0].log().contains("lost the loop's lease")
    })
    .await;
    // The agent's "released." came after the loss: it is not in the log.
    let lines = crate::pg::lines(&database, uuid);
    assert!(!lines.iter().any(|l| l.contains("released.")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("Holding")), "{lines:#?}");
}

#[tokio::test]
async fn login_attempts_count_on_every_node() {
    let database = crate::pg::server().new_database();
    let throttled = ["--login-rate-per-user", "3/60m"];
    let nodes = [
        Node::start_with(&database, &throttled).await,
        Node::start_with(&database, &throttled).await,
    ];
    add_alice(&database);
    // Three wrong guesses spread over two nodes use up alice's burst…
    for i in 0..3 {
        let node = &nodes[i % 2].app;
        let wrong = json!({"username": "alice", "password": "a wrong guess"});
        let got = node.post("/api/auth/login", &Auth::None, wrong).await;
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{}", got.1);
    }
    // …on both of them: even the right password waits now.
    for node in &nodes {
        let right = json!({"username": "alice", "password": PASSWORD});
        let got = node.app.post("/api/auth/login", &Auth::None, right).await;
        assert_error(&got, 429, "rate_limit_error", "too_many_login_attempts");
    }
}

#[tokio::test]
async fn with_a_shared_workspace_root_the_new_node_works_in_the_same_files() {
    let database = crate::pg::server().new_database();
    let shared = tempfile::tempdir().unwrap();
    let root = shared.path().to_str().unwrap().to_owned();
    let args = ["--workspace-root", root.as_str()];
    let mut nodes = [
        Node::start_with(&database, &args).await,
        Node::start_with(&database, &args).await,
    ];
    add_alice(&database);
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0].app.create_loop(&alice, json!({})).await;
    let workspace = shared
        .path()
        .join(id.strip_prefix("loop_").unwrap())
        .join("workspace");
    let mut running = nodes[1].app.send(&alice, &id, "/hold never").await;
    running.until("assistant_delta").await;
    // A file the loop's work left in its workspace, on the shared storage.
    std::fs::write(workspace.join("made-on-b"), "").unwrap();
    let mut watcher = nodes[0].app.watch(&alice, &id, None).await;
    nodes[1].kill();
    assert_eq!(
        watcher.until("error").await.pop().unwrap().data["code"],
        "node_lost"
    );
    // On A the agent runs in the same workspace: what B's turn made is there.
    let next = nodes[0]
        .app
        .send(&alice, &id, "/hold made-on-b")
        .await
        .until_end()
        .await;
    assert!(crate::support::text(&next).contains("released"), "{next:?}");
    assert!(
        !nodes[0]
            .app
            .dir
            .join("loops")
            .join(id.strip_prefix("loop_").unwrap())
            .join("workspace")
            .exists(),
        "nothing of the loop's work is in A's data directory"
    );
}

#[tokio::test]
async fn a_node_with_no_agent_left_sends_a_new_loop_to_one_with_room() {
    let database = crate::pg::server().new_database();
    let nodes = [
        Node::start_with(&database, &["--max-agents", "1"]).await,
        Node::start(&database).await,
    ];
    add_alice(&database);
    let (a, b) = (&nodes[0].app, &nodes[1].app);
    let alice = a.bearer("alice").await;
    // A's one agent is busy with a held turn.
    let first = a.create_loop(&alice, json!({})).await;
    let mut held = a.send(&alice, &first, "/hold never").await;
    held.until("assistant_delta").await;
    // Both nodes have reported themselves (every lease-keeping round).
    eventually("both nodes known", async || {
        crate::pg::node_count(&database) == 2
    })
    .await;
    // A new loop's message to A runs on B, which has room.
    let second = a.create_loop(&alice, json!({})).await;
    let done = a.send(&alice, &second, "hello").await.until_end().await;
    assert_eq!(done.last().unwrap().name, "done");
    let (_, detail) = b.get(&format!("/api/v1/loops/{second}"), &alice).await;
    assert_eq!(detail["node"], json!(nodes[1].url()), "{detail}");
}

/// Claude Code on node B, B killed, the next turn on node A: what A's
/// agent says when asked for the whole conversation.
async fn claude_taken_over(shared_root: bool) -> Vec<crate::support::Sse> {
    let database = crate::pg::server().new_database();
    let mock = crate::mock_anthropic::start().await;
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let env = crate::claude_cli::agent_env(&mock, home.path());
    let bin = crate::claude_cli::claude_bin();
    let root_arg = root.path().to_str().unwrap().to_owned();
    let mut args = vec!["--agent", "claude", "--claude-bin", bin.to_str().unwrap()];
    if shared_root {
        args.extend(["--workspace-root", root_arg.as_str()]);
    }
    let mut nodes = [
        Node::start_full(&database, &args, Some(&env)).await,
        Node::start_full(&database, &args, Some(&env)).await,
    ];
    add_alice(&database);
    let alice = nodes[0].app.bearer("alice").await;
    let id = nodes[0].app.create_loop(&alice, json!({})).await;
    let first = nodes[1]
        .app
        .send(&alice, &id, "remember the apples")
        .await
        .until_end()
        .await;
    assert_eq!(
        first.last().unwrap().name,
        "done",
        "{first:?}\n{}",
        nodes[1].log()
    );
    // Claude Code writes its transcript a moment after the turn: a node
    // killed before that loses the turn's history on any storage.
    eventually("the CLI's transcript on the workspace root", async || {
        !shared_root || has_transcript(root.path())
    })
    .await;
    nodes[1].kill();
    // B's lease runs out; with nothing running, A clears it.
    eventually("the loop free again", async || {
        nodes[0]
            .app
            .get(&format!("/api/v1/loops/{id}"), &alice)
            .await
            .1["node"]
            == Value::Null
    })
    .await;
    nodes[0]
        .app
        .send(&alice, &id, "[[history]]")
        .await
        .until_end()
        .await
}

/// Whether a Claude Code transcript (`projects/<slug>/<sid>.jsonl`) is
/// anywhere under `dir`.
fn has_transcript(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => has_transcript(&path),
                Ok(t) if t.is_file() => {
                    path.extension().is_some_and(|x| x == "jsonl")
                        && path
                            .parent()
                            .and_then(|p| p.parent())
                            .is_some_and(|p| p.ends_with("projects"))
                }
                _ => false,
            }
        })
}

#[tokio::test]
async fn with_a_shared_workspace_root_the_conversation_resumes_on_the_new_node() {
    let events = claude_taken_over(true).await;
    assert_eq!(events[0].name, "started");
    assert_ne!(events[0].data["history_lost"], true, "{:?}", events[0]);
    let said = crate::support::text(&events);
    assert!(said.contains("remember the apples"), "{said}");
}

#[tokio::test]
async fn without_one_the_new_node_starts_over_and_says_so() {
    let events = claude_taken_over(false).await;
    assert_eq!(events[0].name, "started");
    assert_eq!(events[0].data["history_lost"], true, "{:?}", events[0]);
    let said = crate::support::text(&events);
    assert!(!said.contains("remember the apples"), "{said}");
}
