//! The bytes of events emitted as transactional logical messages.
//!
//! One `pg_logical_emit_message(true, prefix, content)` call carries the events of one
//! `enqueue` (one event) or `enqueue_all` (several, in order). The prefix names the outbox
//! (`outbox:<schema>`), so several outboxes can share a database and a relay reads only its
//! own. The content, all integers big-endian:
//!
//! ```text
//! u8  layout version (1)
//! u32 number of events
//! per event:
//!   [16] event id (UUID bytes)
//!   str  aggregate type     str aggregate id
//!   str  event type         str topic          str message key
//!   u32  number of headers, then per header: str name, str value
//!   u32  payload length, then the payload bytes verbatim
//! str = u32 length + UTF-8 bytes
//! ```
//!
//! Decoding checks every length against what is left and every name against the same rules
//! as `enqueue` (topic and aggregate), so a foreign or damaged message is reported, never
//! published half-read.

use bytes::Bytes;
use outbox_core::{AggregateRef, EventId, Headers, NewEvent, OutboxMessage, Topic};

use crate::Schema;

/// The only layout version written (and read) so far.
pub const LAYOUT_VERSION: u8 = 1;

/// The logical-message prefix of `schema`'s outbox events.
pub fn event_prefix(schema: &Schema) -> String {
    format!("outbox:{}", schema.name())
}

/// The prefix of the stream relay's own heartbeats (non-transactional, empty).
pub fn heartbeat_prefix(schema: &Schema) -> String {
    format!("outbox-heartbeat:{}", schema.name())
}

/// Appends the content of a message carrying `events` to `out`.
pub fn encode<'a>(events: impl ExactSizeIterator<Item = &'a NewEvent>, out: &mut Vec<u8>) {
    out.push(LAYOUT_VERSION);
    put_u32(out, events.len());
    for e in events {
        out.extend_from_slice(e.event_id().as_uuid().as_bytes());
        put_str(out, e.aggregate().kind());
        put_str(out, e.aggregate().id());
        put_str(out, e.event_type());
        put_str(out, e.topic().as_str());
        put_str(out, e.key());
        put_u32(out, e.headers().len());
        for (name, value) in e.headers() {
            put_str(out, name);
            put_str(out, value);
        }
        put_u32(out, e.payload().len());
        out.extend_from_slice(e.payload());
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lengths are bounded well below 4 GiB: PostgreSQL refuses a value over 1 GiB.
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Decodes the events of one message's content, as the relay hands them to a publisher: no
/// attempt yet, `seq` and `age_at_claim` left for the reader to set from the transaction.
pub fn decode(content: &Bytes) -> Result<Vec<OutboxMessage>, String> {
    let mut r = Reader {
        buf: content,
        at: 0,
    };
    let version = r.u8()?;
    if version != LAYOUT_VERSION {
        return Err(format!(
            "layout version {version} is unknown to this relay (it reads {LAYOUT_VERSION}): \
             run a relay at least as new as the writers"
        ));
    }
    let count = r.u32()? as usize;
    let mut events = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let id = r.take(16)?;
        let event_id = EventId::from_uuid(uuid::Uuid::from_slice(&id).map_err(|e| e.to_string())?);
        let kind = r.string()?;
        let agg_id = r.string()?;
        let aggregate = AggregateRef::new(kind, agg_id).map_err(|e| e.to_string())?;
        let event_type = r.string()?;
        let topic = Topic::new(r.string()?).map_err(|e| e.to_string())?;
        let key = r.string()?;
        let n = r.u32()? as usize;
        let mut headers = Headers::new();
        for _ in 0..n {
            let name = r.string()?;
            headers.insert(name, r.string()?);
        }
        let len = r.u32()? as usize;
        let payload = r.take(len)?;
        events.push(OutboxMessage {
            seq: 0,
            event_id,
            partition: aggregate.partition(),
            aggregate,
            event_type,
            topic,
            key,
            headers,
            payload,
            attempts: 0,
            age_at_claim: std::time::Duration::ZERO,
        });
    }
    if r.at != content.len() {
        return Err(format!(
            "{} bytes after the last event",
            content.len() - r.at
        ));
    }
    Ok(events)
}

struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<Bytes, String> {
        if self.buf.len() - self.at < n {
            return Err(format!(
                "truncated: {n} bytes wanted at offset {}, {} left",
                self.at,
                self.buf.len() - self.at
            ));
        }
        let out = self.buf.slice(self.at..self.at + n);
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("text at offset {} is not UTF-8", self.at - len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &[u8]) -> NewEvent {
        NewEvent::new(
            Topic::new("orders.v1").unwrap(),
            AggregateRef::new("order", "o-1").unwrap(),
            payload.to_vec(),
        )
        .with_header("trace", "t-1")
        .with_key("k-1")
    }

    #[test]
    fn events_round_trip_in_order_with_every_field() {
        let events = [event(b"{\"a\":1}"), event(&[0, 255, 10])];
        let mut out = Vec::new();
        encode(events.iter(), &mut out);
        let back = decode(&Bytes::from(out)).unwrap();
        assert_eq!(back.len(), 2);
        for (e, b) in events.iter().zip(&back) {
            assert_eq!(b.event_id, e.event_id());
            assert_eq!(&b.aggregate, e.aggregate());
            assert_eq!(b.event_type, e.event_type());
            assert_eq!(&b.topic, e.topic());
            assert_eq!(b.key, e.key());
            assert_eq!(&b.headers, e.headers());
            assert_eq!(&b.payload, e.payload());
        }
    }

    #[test]
    fn damaged_content_is_reported_not_half_read() {
        let mut out = Vec::new();
        encode([event(b"{}")].iter(), &mut out);
        let whole = Bytes::from(out.clone());
        for cut in [0, 1, 5, 20, out.len() - 1] {
            assert!(decode(&whole.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut extra = out.clone();
        extra.push(0);
        assert!(decode(&Bytes::from(extra))
            .unwrap_err()
            .contains("after the last"));
        let mut future = out;
        future[0] = 9;
        assert!(decode(&Bytes::from(future))
            .unwrap_err()
            .contains("version 9"));
    }
}
