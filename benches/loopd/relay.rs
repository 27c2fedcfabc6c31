//! The raw relay (`relay ADDR`): the strongest fair competitor for loopd's job.
//!
//! One fake agent per loop; each text delta line of its stdout becomes an SSE
//! frame, with no auth, no JSON parsing, no log and no mapping. It batches
//! the way loopd does, so that the comparison is of the work, not of the
//! syscall pattern:
//! - the agent's stdout is read in chunks of up to 64 KiB, and the frames of
//!   every complete line of one read are joined into one `Bytes`: one
//!   broadcast send, one wake-up per stream, per read;
//! - a stream drains whatever batches are waiting (`try_recv`) into one
//!   chunk before yielding it: one write per wake-up;
//! - `TCP_NODELAY` on every connection, a multi-thread runtime, and the
//!   router served with `into_make_service` (no route table cloned per
//!   connection).
//!
//! A stream that falls more than [`BACKLOG`] batches behind loses batches
//! (a broadcast `Lagged`): that would make the relay look faster than it
//! is, so every lost batch is counted and `GET /lagged` reports the count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::raise_nofile;

/// Bytes asked for per read of an agent's stdout (loopd reads 64 KiB too).
const READ: usize = 64 * 1024;
/// Batches a stream may fall behind before it loses some.
const BACKLOG: usize = 4096;
/// Most bytes one stream chunk coalesces.
const MAX_CHUNK: usize = 1024 * 1024;
/// The frame that ends a turn.
const DONE: &[u8] = b"event: done\ndata: {}\n\n";

/// Batches lost by lagging streams since the relay started.
static LAGGED: AtomicU64 = AtomicU64::new(0);

struct Agent {
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    batches: broadcast::Sender<Bytes>,
    _child: tokio::process::Child,
}

type Agents = Arc<Mutex<HashMap<String, Arc<Agent>>>>;

pub fn serve(addr: SocketAddr) {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let agents: Agents = Arc::default();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/lagged",
                get(|| async { LAGGED.load(Ordering::Relaxed).to_string() }),
            )
            .route("/loops/{id}/messages", post(message))
            .route("/loops/{id}/events", get(events))
            .with_state(agents);
        use axum::serve::ListenerExt;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app.into_make_service())
            .await
            .unwrap();
    });
}

fn agent(agents: &Agents, id: &str) -> Arc<Agent> {
    let mut map = agents.lock().unwrap();
    map.entry(id.to_owned())
        .or_insert_with(|| {
            let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
                .arg("-p")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (batches, _) = broadcast::channel(BACKLOG);
            tokio::spawn(relay_stdout(stdout, batches.clone()));
            Arc::new(Agent {
                stdin: tokio::sync::Mutex::new(child.stdin.take().unwrap()),
                batches,
                _child: child,
            })
        })
        .clone()
}

/// Reads the agent's stdout in big chunks; the frames of all complete lines
/// of one read go out as one batch.
async fn relay_stdout(mut stdout: tokio::process::ChildStdout, tx: broadcast::Sender<Bytes>) {
    let mut buf = BytesMut::with_capacity(READ);
    loop {
        buf.reserve(READ);
        match stdout.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some(last) = buf.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let lines = buf.split_to(last + 1);
        let mut out = BytesMut::with_capacity(lines.len() + lines.len() / 4 + DONE.len());
        for line in lines[..last].split(|&b| b == b'\n') {
            if is_text_delta(line) {
                out.extend_from_slice(b"event: delta\ndata: ");
                out.extend_from_slice(line);
                out.extend_from_slice(b"\n\n");
            } else if line.starts_with(b"{\"type\":\"result\"") {
                out.extend_from_slice(DONE);
            }
        }
        if !out.is_empty() {
            let _ = tx.send(out.freeze());
        }
    }
}

fn is_text_delta(line: &[u8]) -> bool {
    // `str::contains` is SIMD-accelerated for short needles; the lines are ASCII.
    std::str::from_utf8(line).is_ok_and(|l| l.contains("\"text_delta\""))
}

/// An SSE stream of the agent's batches; with `until_done`, it ends after
/// the turn's `done` (the last frame of the batch holding it).
fn sse(mut rx: broadcast::Receiver<Bytes>, until_done: bool) -> Response {
    let body = async_stream::stream! {
        loop {
            let first = match rx.recv().await {
                Ok(batch) => batch,
                Err(RecvError::Lagged(n)) => {
                    LAGGED.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Err(RecvError::Closed) => break,
            };
            let mut done = first.ends_with(DONE);
            // Whatever else is already waiting goes out in the same chunk.
            let mut joined: Option<BytesMut> = None;
            while !(done && until_done) {
                let next = match rx.try_recv() {
                    Ok(next) => next,
                    Err(TryRecvError::Lagged(n)) => {
                        LAGGED.fetch_add(n, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) => break, // empty or closed
                };
                let chunk = joined.get_or_insert_with(|| {
                    let mut chunk = BytesMut::with_capacity(4 * (first.len() + next.len()));
                    chunk.extend_from_slice(&first);
                    chunk
                });
                chunk.extend_from_slice(&next);
                done = next.ends_with(DONE);
                if chunk.len() >= MAX_CHUNK {
                    break;
                }
            }
            yield Ok::<_, std::convert::Infallible>(joined.map_or(first, BytesMut::freeze));
            if done && until_done {
                break;
            }
        }
    };
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

async fn message(State(agents): State<Agents>, Path(id): Path<String>, body: String) -> Response {
    let agent = agent(&agents, &id);
    let rx = agent.batches.subscribe();
    let line =
        format!("{{\"type\":\"user\",\"message\":{{\"role\":\"user\",\"content\":\"{body}\"}}}}\n");
    agent
        .stdin
        .lock()
        .await
        .write_all(line.as_bytes())
        .await
        .unwrap();
    sse(rx, true)
}

async fn events(State(agents): State<Agents>, Path(id): Path<String>) -> Response {
    sse(agent(&agents, &id).batches.subscribe(), false)
}
