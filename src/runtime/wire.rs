//! The SSE wire format, in one place: an event's frame (`event`, `id`,
//! `data`), a frame without an id (`snapshot`), and the keep-alive ping.
//! The log makes each event's frame once, when it is written; streams only
//! copy frames out.

use bytes::{Bytes, BytesMut};
use serde::Serialize;

/// Sent on an idle stream so proxies and clients keep it open.
pub const PING: &[u8] = b"event: ping\ndata: {}\n\n";

/// `event: <name>\nid: <seq>\ndata: <json>\n\n` appended to `out` (the
/// frames of a batch share one buffer); `data` is one line of JSON.
pub fn frame_into(out: &mut BytesMut, name: &str, seq: &[u8], data: &[u8]) {
    out.reserve(data.len() + name.len() + seq.len() + 18);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\nid: ");
    out.extend_from_slice(seq);
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

/// A frame without an id (`snapshot`): not part of the log, not resumable.
pub fn frame_without_id(name: &str, data: &impl Serialize) -> Bytes {
    let mut frame = format!("event: {name}\ndata: ").into_bytes();
    serde_json::to_writer(&mut frame, data).expect("frames serialize");
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}
