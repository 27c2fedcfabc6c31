//! Server-sent event streams read from a loop's log: a turn's own events for
//! `POST /messages`, everything for `GET /events`. Frames are written once
//! by the log and shared; a batch of them goes out in one chunk. Streams
//! ping every 15 s and end on shutdown.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use super::limits::StreamSlot;
use crate::runtime::log::{Entry, Follower};
use crate::runtime::wire::PING;

const PING_EVERY: Duration = Duration::from_secs(15);

/// Which events a stream passes, and when it ends.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Every event, until the client leaves or the server stops.
    Everything,
    /// One turn's events (by its index in the log), ending with its end.
    Turn(usize),
}

pub fn response(
    stream: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The stream of `follower`'s events in `scope`, after an optional first
/// frame. It holds `slot` (its place among its user's streams) until it ends.
pub fn stream(
    first: Option<Bytes>,
    mut follower: Follower,
    scope: Scope,
    shutdown: CancellationToken,
    slot: StreamSlot,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        let _slot = slot;
        if let Some(first) = first {
            yield Ok(first);
        }
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                batch = follower.next_batch() => {
                    let batch = match batch {
                        Ok(batch) if !batch.is_empty() => batch,
                        Ok(_) => break,
                        Err(err) => {
                            tracing::error!(path = %follower.path().display(), error = %err, "reading the event log");
                            break;
                        }
                    };
                    let (chunk, ended) = select(&batch, scope);
                    // Not held while the client takes its time with the chunk.
                    drop(batch);
                    if !chunk.is_empty() {
                        yield Ok(chunk);
                    }
                    if ended {
                        break;
                    }
                }
                _ = ping.tick() => yield Ok(Bytes::from_static(PING)),
                () = shutdown.cancelled() => break,
            }
        }
    }
}

/// The frames of a batch that the scope passes, joined (a lone frame as it
/// is, without a copy); and whether the scope's turn ended in it.
fn select(batch: &[Entry], scope: Scope) -> (Bytes, bool) {
    let passes = |e: &Entry| match scope {
        Scope::Everything => true,
        Scope::Turn(turn) => e.turn == Some(turn),
    };
    if let [only] = batch {
        return if passes(only) {
            (
                only.frame.clone(),
                matches!(scope, Scope::Turn(_)) && only.terminal,
            )
        } else {
            (Bytes::new(), false)
        };
    }
    let mut out = BytesMut::new();
    for entry in batch {
        match scope {
            Scope::Everything => out.extend_from_slice(&entry.frame),
            Scope::Turn(turn) if entry.turn == Some(turn) => {
                out.extend_from_slice(&entry.frame);
                if entry.terminal {
                    return (out.freeze(), true);
                }
            }
            Scope::Turn(_) => {}
        }
    }
    (out.freeze(), false)
}
