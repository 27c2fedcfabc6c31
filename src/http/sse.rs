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

/// The frames of a batch that the scope passes, joined; and whether the
/// scope's turn ended in it. Frames written by one append lie side by side
/// in one block, so a run of them is sent as one slice of it, without a copy.
fn select(batch: &[Entry], scope: Scope) -> (Bytes, bool) {
    let passes = |e: &Entry| match scope {
        Scope::Everything => true,
        Scope::Turn(turn) => e.turn == Some(turn),
    };
    // The run being gathered (its block, start and end within it); runs
    // before it are copied into `joined` (only when there are several).
    let mut run: Option<(&Bytes, usize, usize)> = None;
    let mut joined: Option<BytesMut> = None;
    let mut ended = false;
    for entry in batch.iter().filter(|e| passes(e)) {
        let start = entry.offset_in_block();
        let end = start + entry.frame.len();
        run = match run {
            Some((block, from, to)) if block.as_ptr() == entry.block.as_ptr() && to == start => {
                Some((block, from, end))
            }
            Some((block, from, to)) => {
                joined
                    .get_or_insert_with(BytesMut::new)
                    .extend_from_slice(&block[from..to]);
                Some((&entry.block, start, end))
            }
            None => Some((&entry.block, start, end)),
        };
        if matches!(scope, Scope::Turn(_)) && entry.terminal {
            ended = true;
            break;
        }
    }
    let chunk = match (run, joined) {
        (None, _) => Bytes::new(),
        (Some((block, from, to)), None) => block.slice(from..to),
        (Some((block, from, to)), Some(mut joined)) => {
            joined.extend_from_slice(&block[from..to]);
            joined.freeze()
        }
    };
    (chunk, ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries whose frames are slices of one block, as one append writes them.
    fn entries(block: &Bytes, turns: &[(usize, bool)], width: usize) -> Vec<Entry> {
        turns
            .iter()
            .enumerate()
            .map(|(i, &(turn, terminal))| Entry {
                seq: i as u64 + 1,
                at: None,
                turn: Some(turn),
                terminal,
                frame: block.slice(i * width..(i + 1) * width),
                block: block.clone(),
            })
            .collect()
    }

    #[test]
    fn a_run_of_one_append_goes_out_as_one_slice_and_the_rest_is_joined() {
        let block = Bytes::from_static(b"aaabbbcccddd");
        let batch = entries(&block, &[(0, false), (0, false), (1, false), (0, true)], 3);
        let (all, ended) = select(&batch, Scope::Everything);
        assert_eq!((&all[..], ended), (&b"aaabbbcccddd"[..], false));
        assert_eq!(all.as_ptr(), block.as_ptr(), "no copy");
        // Turn 0 skips ccc: two runs, joined; its end ends the stream.
        let (own, ended) = select(&batch, Scope::Turn(0));
        assert_eq!((&own[..], ended), (&b"aaabbbddd"[..], true));
        let (other, ended) = select(&batch, Scope::Turn(1));
        assert_eq!((&other[..], ended), (&b"ccc"[..], false));
        assert_eq!(
            other.as_ptr(),
            block[6..].as_ptr(),
            "a lone frame is not copied"
        );
        // Frames of different appends are joined, not sliced across blocks.
        let mut two = entries(&Bytes::from_static(b"xx"), &[(0, false)], 2);
        two.extend(entries(&Bytes::from_static(b"yy"), &[(0, false)], 2));
        assert_eq!(&select(&two, Scope::Everything).0[..], b"xxyy");
        assert!(select(&[], Scope::Everything).0.is_empty());
    }
}
