//! A throwaway Postgres server for the tests: Debian's `initdb` and
//! `postgres` on a temporary directory, on a loopback port; one per test
//! process (it dies with the process), a new database for each data
//! directory a test uses.
//!
//! The `postgres` test target (`tests/postgres`) runs the whole suite on
//! it: every `TestApp` (and every account store a test opens) then lives
//! in a database instead of the data directory's files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use loopd::store::{Accounts, Pg};

/// Where a data directory's database is remembered (so a test that
/// restarts a server on the same directory gets the same database).
const DATABASE_FILE: &str = ".test-database-url";

/// Whether this run puts every test server on Postgres: the `postgres`
/// test target, or `LOOPD_TEST_BACKEND=postgres`.
pub fn on_postgres() -> bool {
    crate::ON_POSTGRES || std::env::var("LOOPD_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

pub struct PgServer {
    port: u16,
    bin: PathBuf,
}

/// The one server of this test process, started on first use.
pub fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

/// The database of the data directory `dir`: made on first use.
pub fn database_for(dir: &Path) -> String {
    let file = dir.join(DATABASE_FILE);
    if let Ok(url) = std::fs::read_to_string(&file) {
        return url;
    }
    let url = server().new_database();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&file, &url).unwrap();
    url
}

/// The accounts in `url`'s database, as the CLI would open them.
pub fn accounts(url: &str) -> Accounts {
    let url = url.to_owned();
    let pg = std::thread::scope(|s| {
        s.spawn(|| runtime().block_on(Pg::connect(&url)).unwrap())
            .join()
            .unwrap()
    });
    Accounts::open_pg(&pg).unwrap()
}

/// A runtime for the tests' own database handles (the servers under test
/// have their own).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

impl PgServer {
    /// `postgres://…` of a new, empty database.
    pub fn new_database(&self) -> String {
        let name = format!("t_{}", loopd::ids::random_hex(8));
        let status = self
            .client("createdb")
            .arg(&name)
            .status()
            .expect("createdb runs");
        assert!(status.success(), "createdb {name} failed");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn start() -> Self {
        let bin = bin_dir();
        let root = tempfile::Builder::new()
            .prefix("loopd-test-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let data = root.join("data");
        let owner = owner();
        if let Some((uid, gid)) = owner {
            // initdb and postgres refuse to run as root.
            std::os::unix::fs::chown(&root, Some(uid.as_raw()), Some(gid.as_raw())).unwrap();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .stdout(Stdio::null());
        as_owner(&mut initdb, owner);
        assert!(
            initdb.status().expect("initdb runs").success(),
            "initdb failed"
        );
        let port = free_port();
        let (bin2, root2) = (bin.clone(), root.clone());
        // The thread that starts postgres waits for it for good: postgres
        // is told to quit when that thread (so this process) is gone.
        std::thread::spawn(move || {
            let mut postgres = Command::new(bin2.join("postgres"));
            postgres
                .args(["-D", root2.join("data").to_str().unwrap()])
                .args(["-k", root2.to_str().unwrap(), "-p", &port.to_string()])
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=1000",
                ])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "shared_buffers=32MB"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(root2.join("postgres.log")).unwrap());
            as_owner(&mut postgres, owner);
            unsafe {
                use std::os::unix::process::CommandExt;
                postgres.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGQUIT)
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = postgres.spawn().expect("postgres starts");
            let _ = child.wait();
        });
        let server = Self { port, bin };
        server.wait_ready(&root);
        server
    }

    /// One of the server's client programs, pointed at it as `postgres`.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        cmd
    }

    fn wait_ready(&self, root: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .client("pg_isready")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not come up; see {}",
                root.join("postgres.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Debian's server binaries: `/usr/lib/postgresql/<version>/bin`, the
/// newest there (or `$LOOPD_TEST_PG_BIN`).
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LOOPD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("no Postgres server found: install Debian's `postgresql` package (see .ci/run)")
}

/// The user the server runs as when the tests run as root: `postgres`.
fn owner() -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("running as root needs the `postgres` user (Debian's postgresql package makes it)");
    Some((user.uid, user.gid))
}

fn as_owner(cmd: &mut Command, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A document (`users`, `api-tokens`, `sessions`) and its version, as the
/// database holds it.
pub fn document(url: &str, name: &str) -> Option<(serde_json::Value, i64)> {
    let sql = "SELECT body, version FROM documents WHERE name = $1";
    let name = name.to_owned();
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query_as(sql)
                .bind(name)
                .fetch_optional(&pool)
                .await
                .unwrap()
        })
    })
}

/// Replaces a document (a migration of the schema first, as a server would).
pub fn set_document(url: &str, name: &str, body: serde_json::Value) {
    let name = name.to_owned();
    let url2 = url.to_owned();
    query(url, move |pool| {
        Box::pin(async move {
            pool.close().await;
            let pg = Pg::connect(&url2).await.unwrap();
            sqlx::query(
                "INSERT INTO documents (name, body) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET body = $2",
            )
            .bind(name)
            .bind(sqlx::types::Json(body))
            .execute(pg.pool())
            .await
            .unwrap();
        })
    })
}

/// A loop's record as the database holds it.
pub fn loop_record(url: &str, uuid: uuid::Uuid) -> Option<serde_json::Value> {
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query_scalar("SELECT record FROM loops WHERE id = $1")
                .bind(uuid)
                .fetch_optional(&pool)
                .await
                .unwrap()
        })
    })
}

/// Runs one query on `url`'s database, from any test.
fn query<T: Send>(
    url: &str,
    run: impl FnOnce(sqlx::PgPool) -> futures_util::future::BoxFuture<'static, T> + Send,
) -> T {
    let url = url.to_owned();
    std::thread::scope(|s| {
        s.spawn(|| {
            runtime().block_on(async move {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                let out = run(pool.clone()).await;
                pool.close().await;
                out
            })
        })
        .join()
        .unwrap()
    })
}

/// Takes a loop's lease for a node that does not exist (a new generation).
pub fn steal_lease(url: &str, uuid: uuid::Uuid) {
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query(
                "UPDATE leases SET owner = 'http://elsewhere.invalid', generation = generation + 1, \
                 expires_at = now() + interval '1 hour' WHERE loop_id = $1",
            )
            .bind(uuid)
            .execute(&pool)
            .await
            .unwrap();
        })
    })
}

/// A TCP relay in front of the test server, for one node's connections:
/// [`Relay::cut`] drops every connection and refuses new ones (the
/// database unreachable from that node), [`Relay::stall`] keeps every
/// connection open but passes nothing more, new ones included (a database
/// that hangs), [`Relay::restore`] lets them through again (stalled ones
/// are dropped then).
pub struct Relay {
    /// `url` with the relay's port.
    pub url: String,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    changes: tokio::sync::watch::Sender<u64>,
}

const OPEN: u8 = 0;
const CUT: u8 = 1;
const STALLED: u8 = 2;

impl Relay {
    pub fn start(url: &str) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let port = server().port;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay_port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(OPEN));
        let (changes, _) = tokio::sync::watch::channel(0u64);
        let (now, changed) = (mode.clone(), changes.clone());
        runtime().spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut change = changed.subscribe();
                let now = now.clone();
                tokio::spawn(async move {
                    // Held, passing nothing, until the relay is open again.
                    let stalled = async |change: &mut tokio::sync::watch::Receiver<u64>| {
                        while now.load(SeqCst) == STALLED {
                            if change.changed().await.is_err() {
                                return;
                            }
                        }
                    };
                    match now.load(SeqCst) {
                        CUT => return, // dropped: refused at once
                        STALLED => return stalled(&mut change).await,
                        _ => {}
                    }
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            _ = change.changed() => match now.load(SeqCst) {
                                CUT => return,
                                STALLED => return stalled(&mut change).await,
                                _ => {}
                            },
                        }
                    }
                });
            }
        });
        Self {
            url: url.replacen(&format!(":{port}/"), &format!(":{relay_port}/"), 1),
            mode,
            changes,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn cut(&self) {
        self.set(CUT);
    }

    pub fn stall(&self) {
        self.set(STALLED);
    }

    pub fn restore(&self) {
        self.set(OPEN);
    }
}

/// Makes the node `node` look alive (reported itself just now, with room)
/// for an hour, whatever it is.
pub fn pretend_alive(url: &str, node: &str) {
    let node = node.to_owned();
    query(url, move |pool| {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE nodes SET seen_at = now() + interval '1 hour', owned = 0 WHERE url = $1",
            )
            .bind(node)
            .execute(&pool)
            .await
            .unwrap();
            assert_eq!(done.rows_affected(), 1);
        })
    })
}

/// Seconds until a loop's lease runs out, by the database's clock.
#[allow(dead_code)] // used by the bench
pub fn lease_left(url: &str, uuid: uuid::Uuid) -> f64 {
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT extract(epoch FROM expires_at - now())::float8 FROM leases WHERE loop_id = $1",
            )
            .bind(uuid)
            .fetch_one(&pool)
            .await
            .unwrap()
        })
    })
}

/// A loop's record as the database has it.
pub fn record(url: &str, uuid: uuid::Uuid) -> serde_json::Value {
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query_scalar("SELECT record FROM loops WHERE id = $1")
                .bind(uuid)
                .fetch_one(&pool)
                .await
                .unwrap()
        })
    })
}

/// Changes a loop's title in the database behind every node's back (no
/// new version, no notification), as a change no node has seen yet.
pub fn retitle_unseen(url: &str, uuid: uuid::Uuid, title: &str) {
    let title = serde_json::json!(title);
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query("UPDATE loops SET record = jsonb_set(record, '{title}', $2) WHERE id = $1")
                .bind(uuid)
                .bind(title)
                .execute(&pool)
                .await
                .unwrap();
        })
    })
}

/// A loop's event lines as the database has them.
pub fn lines(url: &str, uuid: uuid::Uuid) -> Vec<String> {
    query(url, move |pool| {
        Box::pin(async move {
            let chunks: Vec<(i64, i64, String)> = sqlx::query_as(
                "SELECT first_seq, last_seq, lines FROM event_chunks WHERE loop_id = $1 \
                 ORDER BY first_seq",
            )
            .bind(uuid)
            .fetch_all(&pool)
            .await
            .unwrap();
            // Each chunk numbers its lines first..=last, and chunks follow
            // on from each other from seq 1.
            let mut lines = Vec::new();
            for (first, last, chunk) in chunks {
                assert_eq!(
                    first,
                    lines.len() as i64 + 1,
                    "a gap or overlap before {first}"
                );
                for (i, line) in chunk.split('\n').enumerate() {
                    let seq =
                        serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"].as_i64();
                    assert_eq!(seq, Some(first + i as i64), "{line}");
                    lines.push(line.to_owned());
                }
                assert_eq!(last, lines.len() as i64, "chunk {first}..={last}");
            }
            lines
        })
    })
}

/// How many nodes have reported themselves in `url`'s database.
pub fn node_count(url: &str) -> i64 {
    query(url, move |pool| {
        Box::pin(async move {
            sqlx::query_scalar("SELECT count(*) FROM nodes")
                .fetch_one(&pool)
                .await
                .unwrap()
        })
    })
}
