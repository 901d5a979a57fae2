//! The stream's reading side: decodes the replication connection into whole transactions of
//! this outbox's events, hands them to the relay through a bounded channel, and reports to
//! the server the position the relay acknowledged.
//!
//! # The confirmed position
//! The server keeps WAL from the slot's confirmed position and restarts the stream there, so
//! that position may pass a transaction only once all of its events were published (or
//! parked in the table). The reader reports:
//! - the end of the last transaction the relay acknowledged, while any transaction it was
//!   handed is unacknowledged;
//! - otherwise the furthest point with nothing of ours before it: the end of a transaction
//!   without our events, the position of a heartbeat, or a keepalive's "sent up to" taken
//!   outside a transaction. That is what keeps an idle outbox from holding WAL.
//!
//! When the channel is full (a relay paused by a broker outage) the reader stops reading,
//! and the server, seeing no progress, stops decoding; statuses still go out on the timer,
//! so the server never times the connection out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use outbox_core::OutboxMessage;

use super::layout;
use super::lsn::Lsn;
use super::pgoutput::{self, Decoded};
use super::wire::{Replicated, ReplicationConnection, WireError};

/// The events of one committed transaction, in the order they were enqueued; each one's
/// `seq` is the transaction's end.
#[derive(Debug)]
pub struct Txn {
    pub events: Vec<OutboxMessage>,
    /// Where the stream resumes after this transaction.
    pub end: Lsn,
    pub committed_at: SystemTime,
    /// The commit's age when the server sent it (server clock on both ends), and when that
    /// was here: the age now is the sum, free of clock skew between the two machines.
    pub age_when_sent: Duration,
    pub received: Instant,
}

impl Txn {
    pub fn age(&self) -> Duration {
        self.age_when_sent + self.received.elapsed()
    }
}

/// Why the reader stopped.
#[derive(Debug)]
pub enum ReaderEnd {
    /// The relay finished (its acknowledgement sender was dropped): final status sent.
    Done,
    Wire(WireError),
    /// A message with this outbox's prefix that cannot be read.
    Layout {
        lsn: Lsn,
        reason: String,
    },
}

pub struct Prefixes {
    pub events: String,
    pub heartbeat: String,
}

struct Open {
    events: Vec<OutboxMessage>,
    committed_at: SystemTime,
    sent_at: SystemTime,
}

/// Reads until the relay drops `acked` (then sends the last status and returns `Done`) or
/// the connection fails. `broken` is set on failure so the relay stops at once.
pub async fn read(
    mut conn: ReplicationConnection,
    prefixes: Prefixes,
    out: mpsc::Sender<Txn>,
    mut acked: watch::Receiver<Lsn>,
    status_interval: Duration,
    broken: Arc<AtomicBool>,
) -> ReaderEnd {
    let end = read_inner(&mut conn, &prefixes, &out, &mut acked, status_interval).await;
    if !matches!(end, ReaderEnd::Done) {
        broken.store(true, Ordering::SeqCst);
    }
    drop(out);
    conn.close().await;
    end
}

async fn read_inner(
    conn: &mut ReplicationConnection,
    prefixes: &Prefixes,
    out: &mpsc::Sender<Txn>,
    acked: &mut watch::Receiver<Lsn>,
    status_interval: Duration,
) -> ReaderEnd {
    let mut open: Option<Open> = None;
    let mut waiting: Option<Txn> = None;
    let mut forwarded = Lsn(0);
    let mut idle_end = Lsn(0);
    let mut acked_at = Lsn(0);
    let mut reported = Lsn(0);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + status_interval,
        status_interval,
    );
    loop {
        let mut force = false;
        tokio::select! {
            m = conn.next(), if waiting.is_none() => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => return ReaderEnd::Wire(e),
                };
                match m {
                    Replicated::Keepalive { wal_end, reply_requested } => {
                        if open.is_none() {
                            idle_end = idle_end.max(wal_end);
                        }
                        force = reply_requested;
                    }
                    Replicated::Data { start, sent_at, data } => {
                        match on_data(data, start, sent_at, prefixes, &mut open) {
                            Ok(Some(Step::Txn(t))) => {
                                let end = t.end;
                                match out.try_send(t) {
                                    Ok(()) => {}
                                    Err(mpsc::error::TrySendError::Full(t)) => waiting = Some(t),
                                    Err(mpsc::error::TrySendError::Closed(_)) => return ReaderEnd::Done,
                                }
                                forwarded = end;
                            }
                            Ok(Some(Step::Nothing(at))) => idle_end = idle_end.max(at),
                            Ok(None) => {}
                            Err(end) => return end,
                        }
                    }
                }
            }
            permit = out.reserve(), if waiting.is_some() => {
                match permit {
                    Ok(p) => p.send(waiting.take().expect("checked")),
                    Err(_) => return ReaderEnd::Done,
                }
            }
            changed = acked.changed() => {
                if changed.is_err() {
                    // The relay is done: confirm what it acknowledged, then leave.
                    let last = *acked.borrow();
                    let flush = if last >= forwarded { last.max(idle_end) } else { last };
                    if flush > reported {
                        let _ = conn.send_status(flush, false).await;
                    }
                    return ReaderEnd::Done;
                }
                acked_at = *acked.borrow_and_update();
            }
            _ = tick.tick() => force = true,
        }
        let flush = if acked_at >= forwarded && waiting.is_none() {
            acked_at.max(idle_end)
        } else {
            acked_at
        };
        if flush > reported || force {
            if let Err(e) = conn.send_status(flush.max(reported), false).await {
                return ReaderEnd::Wire(e);
            }
            reported = flush.max(reported);
        }
    }
}

enum Step {
    Txn(Txn),
    /// A point with nothing of ours before it (a transaction without our events ended, or
    /// a heartbeat arrived).
    Nothing(Lsn),
}

fn on_data(
    data: Bytes,
    start: Lsn,
    sent_at: SystemTime,
    prefixes: &Prefixes,
    open: &mut Option<Open>,
) -> Result<Option<Step>, ReaderEnd> {
    let decoded =
        pgoutput::decode(data).map_err(|reason| ReaderEnd::Layout { lsn: start, reason })?;
    Ok(match decoded {
        Decoded::Begin { commit_time } => {
            *open = Some(Open {
                events: Vec::new(),
                committed_at: commit_time,
                sent_at,
            });
            None
        }
        Decoded::Message {
            transactional: true,
            lsn,
            prefix,
            content,
        } if prefix == prefixes.events => {
            let events =
                layout::decode(&content).map_err(|reason| ReaderEnd::Layout { lsn, reason })?;
            match open.as_mut() {
                Some(o) => o.events.extend(events),
                None => {
                    return Err(ReaderEnd::Layout {
                        lsn,
                        reason: "a transactional message outside a transaction".into(),
                    })
                }
            }
            None
        }
        Decoded::Message {
            transactional: false,
            lsn,
            prefix,
            ..
        } if prefix == prefixes.heartbeat && open.is_none() => Some(Step::Nothing(lsn)),
        Decoded::Commit { end } => match open.take() {
            Some(mut o) if !o.events.is_empty() => Some(Step::Txn(Txn {
                events: {
                    for e in &mut o.events {
                        e.seq = end.0 as i64;
                    }
                    o.events
                },
                end,
                committed_at: o.committed_at,
                age_when_sent: o.sent_at.duration_since(o.committed_at).unwrap_or_default(),
                received: Instant::now(),
            })),
            _ => Some(Step::Nothing(end)),
        },
        Decoded::Message { .. } | Decoded::Other(_) => None,
    })
}
