//! The SSE wire format, in one place: an event's frame (`event`, `id`,
//! `data`), a frame without an id (`snapshot`), and the keep-alive ping.
//! The log makes each event's frame once, when it is written; streams only
//! copy frames out.

use bytes::Bytes;
use serde::Serialize;

/// Sent on an idle stream so proxies and clients keep it open.
pub const PING: &[u8] = b"event: ping\ndata: {}\n\n";

/// `event: <name>\nid: <seq>\ndata: <json>\n\n`; `data` is one line of JSON.
pub fn frame(name: &str, seq: u64, data: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(data.len() + name.len() + 40);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(b"\nid: ");
    frame.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// A frame without an id (`snapshot`): not part of the log, not resumable.
pub fn frame_without_id(name: &str, data: &impl Serialize) -> Bytes {
    let mut frame = format!("event: {name}\ndata: ").into_bytes();
    serde_json::to_writer(&mut frame, data).expect("frames serialize");
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}
