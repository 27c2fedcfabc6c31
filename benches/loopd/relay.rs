//! The raw relay (`relay ADDR`): the physical limit of "just piping bytes".
//!
//! One fake agent per loop, each text delta line copied into an SSE frame:
//! no auth, no parsing, no log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::raise_nofile;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;

struct Agent {
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    lines: broadcast::Sender<Bytes>,
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
            .route("/loops/{id}/messages", post(message))
            .route("/loops/{id}/events", get(events))
            .with_state(agents);
        use axum::serve::ListenerExt;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await.unwrap();
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
            let (lines, _) = broadcast::channel(4096);
            let tx = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let frame = if line.contains("\"text_delta\"") {
                        format!("event: delta\ndata: {line}\n\n")
                    } else if line.starts_with("{\"type\":\"result\"") {
                        "event: done\ndata: {}\n\n".to_owned()
                    } else {
                        continue;
                    };
                    let _ = tx.send(Bytes::from(frame));
                }
            });
            Arc::new(Agent {
                stdin: tokio::sync::Mutex::new(child.stdin.take().unwrap()),
                lines,
                _child: child,
            })
        })
        .clone()
}

fn sse(mut rx: broadcast::Receiver<Bytes>, until_done: bool) -> Response {
    let body = async_stream::stream! {
        loop {
            match rx.recv().await {
                Ok(frame) => {
                    let done = frame.starts_with(b"event: done");
                    yield Ok::<_, std::convert::Infallible>(frame);
                    if done && until_done { break; }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
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
    let rx = agent.lines.subscribe();
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
    sse(agent(&agents, &id).lines.subscribe(), false)
}
