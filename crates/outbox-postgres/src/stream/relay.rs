//! The stream relay: publishes the events of a slot's stream in commit order, and confirms
//! the slot past a transaction only once the broker acknowledged its events (or they were
//! parked in the table).
//!
//! A session: connect in replication mode, take the slot (a second relay on the same slot
//! is refused by the server and waits as a standby, trying again every `standby_poll`),
//! then a reader task decodes transactions into a channel while this side publishes them
//! in batches. A batch:
//! 1. looks up which of its aggregates still have pending rows in the table: their events
//!    are parked behind those rows;
//! 2. publishes the rest (one call, pipelined by the publisher);
//! 3. parks what the broker rejected (one attempt counted) together with the later events
//!    of those aggregates, what can never be published (dead), and, when the broker took
//!    some messages but not others, the others (deferred, no attempt);
//! 4. writes the parked rows in one statement, then hands the batch's end to the reader,
//!    which confirms it to the server.
//!
//! An outage (the broker took nothing and reported itself unavailable) pauses the relay: it
//! probes with growing backoff and sends the same messages again, burning no attempt. The
//! database failing (or restarting) ends the session; the next one resumes from the slot,
//! re-sending what was published but not yet confirmed (at least once).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::metrics::FailureReason;
use outbox_core::retry::Backoff;
use outbox_core::{
    OutboxMessage, PublishOutcome, Publisher, RelayConfig, TableMetrics, WakeSignal,
};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use super::layout;
use super::lsn::Lsn;
use super::park::{Park, ParkState, Parked};
use super::reader::{self, Prefixes, ReaderEnd, Txn};
use super::slot::{check_slot, slot_status, SlotName};
use super::wire::{ConnectTarget, ReplicationConnection, WireError};
use super::StreamError;
use crate::Schema;

/// How a stream relay runs. `relay` supplies the service name, batch size, retry policy
/// (for parked rejections), outage backoff and deferral times, as for the table relay.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub slot: SlotName,
    pub relay: RelayConfig,
    /// With no event of ours for this long, the relay emits a heartbeat message (its own
    /// prefix, outside any transaction) so the slot moves on even when this database is
    /// idle and others on the server write WAL.
    pub heartbeat: Duration,
    /// Status reports to the server at least this often (well inside `wal_sender_timeout`).
    pub status_interval: Duration,
    /// A standby tries to take the slot this often.
    pub standby_poll: Duration,
    /// How often the slot's lag and retained WAL are read for the metrics and the limit.
    pub stats_interval: Duration,
    /// Above this much retained WAL the relay logs an error at every stats read and the
    /// gauge `outbox_stream_retained_wal_limit_bytes` lets an alert fire.
    pub max_retained_wal: Option<u64>,
    pub connect_timeout: Duration,
}

impl StreamConfig {
    pub fn new(slot: SlotName, relay: RelayConfig) -> Self {
        Self {
            slot,
            relay,
            heartbeat: Duration::from_secs(10),
            status_interval: Duration::from_secs(1),
            standby_poll: Duration::from_secs(1),
            stats_interval: Duration::from_secs(5),
            max_retained_wal: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What a stream relay did before it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    pub published: u64,
    /// Events written to the table (behind a parked event, rejected, deferred or dead).
    pub parked: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
    pub outage_pauses: u64,
    /// Sessions in which this relay held the slot.
    pub sessions: u64,
    /// Times this relay found the slot held by another and waited.
    pub standby_waits: u64,
    pub heartbeats: u64,
}

/// A relay from a logical replication slot. Build it, then [`StreamRelay::run`] it.
pub struct StreamRelay<P: ?Sized> {
    pool: PgPool,
    url: String,
    schema: Schema,
    publisher: Arc<P>,
    config: StreamConfig,
    metrics: Option<TableMetrics>,
    table_wake: Option<WakeSignal>,
    park: Park,
}

enum SessionEnd {
    /// Shut down as asked.
    Stopped,
    /// Another relay holds the slot.
    Standby,
    /// The database or the connection failed: try again after a backoff.
    Retry(String),
    Fatal(StreamError),
}

impl<P: Publisher + ?Sized> StreamRelay<P> {
    /// `url` is the database URL (the replication connection is opened from it); `pool`
    /// reaches the same database for the table path, heartbeats and slot statistics.
    pub fn new(
        pool: PgPool,
        url: impl Into<String>,
        schema: Schema,
        publisher: Arc<P>,
        config: StreamConfig,
    ) -> Self {
        let park = Park::new(&schema);
        Self {
            pool,
            url: url.into(),
            schema,
            publisher,
            config,
            metrics: None,
            table_wake: None,
            park,
        }
    }

    pub fn with_metrics(mut self, metrics: TableMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Wakes the table relay of this process when events were parked.
    pub fn with_table_wake(mut self, wake: WakeSignal) -> Self {
        self.table_wake = Some(wake);
        self
    }

    /// Refuses to start without logical WAL, a usable slot or a usable URL; then streams
    /// until `shutdown` completes (finishing the batch in hand). Database and broker
    /// trouble is waited out, never returned.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<StreamReport, StreamError> {
        let target = ConnectTarget::parse(&self.url)?;
        let (stop_tx, stop) = watch::channel(false);
        tokio::pin!(shutdown);
        // A database that is down at start is waited for; a missing slot or the wrong
        // `wal_level` is refused at once.
        let mut backoff = Backoff::new(
            self.config.relay.outage_backoff_min,
            self.config.relay.outage_backoff_max,
        );
        loop {
            match check_slot(&self.pool, &self.config.slot).await {
                Ok(_) => break,
                Err(StreamError::Database(e)) if crate::is_unavailable(&e) => {
                    tracing::warn!(error = %e, "the database is unavailable; the stream relay waits for it");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = &mut shutdown => return Ok(StreamReport::default()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut report = StreamReport::default();
        let stats = self.watch_slot();
        let sessions = async {
            let mut backoff = Backoff::new(
                self.config.relay.outage_backoff_min,
                self.config.relay.outage_backoff_max,
            );
            loop {
                if *stop.borrow() {
                    return Ok(());
                }
                let sessions_before = report.sessions;
                let end = self.session(&target, stop.clone(), &mut report).await;
                if report.sessions > sessions_before {
                    // It streamed: the next trouble starts from the shortest wait again.
                    backoff.reset();
                }
                let wait = match end {
                    SessionEnd::Stopped => return Ok(()),
                    SessionEnd::Fatal(e) => return Err(e),
                    SessionEnd::Standby => {
                        report.standby_waits += 1;
                        if report.standby_waits == 1 {
                            tracing::info!(slot = %self.config.slot, "another relay streams from the slot; this one waits as its standby");
                        }
                        self.set_active(false);
                        self.config.standby_poll
                    }
                    SessionEnd::Retry(why) => {
                        self.set_active(false);
                        let wait = backoff.next_delay();
                        tracing::warn!(slot = %self.config.slot, error = %why, ?wait, "stream session ended; resuming from the slot");
                        wait
                    }
                };
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(&mut stop) => return Ok(()),
                }
            }
        };
        let outcome = tokio::select! {
            r = sessions => r,
            _ = stats => Ok(()),
            _ = async {
                shutdown.await;
                let _ = stop_tx.send(true);
                std::future::pending::<()>().await
            } => Ok(()),
        };
        self.set_active(false);
        if let Some(m) = &self.metrics {
            m.set_paused(false);
        }
        tracing::info!(slot = %self.config.slot, ?report, "stream relay stopped");
        outcome.map(|()| report)
    }

    fn set_active(&self, active: bool) {
        if let Some(m) = &self.metrics {
            m.set_stream_active(active);
        }
    }

    /// Reads the slot's lag and retained WAL every `stats_interval`, for the metrics and
    /// the retained-WAL limit. Never returns.
    async fn watch_slot(&self) {
        let limit = self.config.max_retained_wal;
        loop {
            match slot_status(&self.pool, &self.config.slot).await {
                Ok(Some(s)) => {
                    if let Some(m) = &self.metrics {
                        m.set_stream_lag(s.lag_bytes, s.retained_bytes, limit);
                    }
                    if limit.is_some_and(|l| s.retained_bytes > l) {
                        tracing::error!(slot = %self.config.slot, retained = s.retained_bytes, limit = ?limit, wal_status = %s.wal_status, "the slot retains more WAL than allowed: is the stream relay running and the broker reachable?");
                    }
                }
                Ok(None) => {
                    tracing::error!(slot = %self.config.slot, "the replication slot is gone: run `outbox migrate` to create it again")
                }
                Err(e) => tracing::warn!(error = %e, "reading the slot's state failed"),
            }
            tokio::time::sleep(self.config.stats_interval).await;
        }
    }

    async fn session(
        &self,
        target: &ConnectTarget,
        mut stop: watch::Receiver<bool>,
        report: &mut StreamReport,
    ) -> SessionEnd {
        let name = format!("outbox-stream-{}", self.config.relay.service);
        let mut conn = match ReplicationConnection::connect(
            target,
            &name,
            self.config.connect_timeout,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return classify(e),
        };
        let slot = self.config.slot.as_str();
        if let Err(e) = conn.start_logical(slot, slot).await {
            conn.close().await;
            return classify(e);
        }
        report.sessions += 1;
        self.set_active(true);
        tracing::info!(slot, "streaming from the slot");
        let capacity = self.config.relay.batch_size.clamp(64, 4096);
        let (tx, mut rx) = mpsc::channel::<Txn>(capacity);
        let (acked_tx, acked_rx) = watch::channel(Lsn(0));
        let broken = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(reader::read(
            conn,
            Prefixes {
                events: layout::event_prefix(&self.schema),
                heartbeat: layout::heartbeat_prefix(&self.schema),
            },
            tx,
            acked_rx,
            self.config.status_interval,
            broken.clone(),
        ));
        let end = self
            .publish_loop(&mut rx, &acked_tx, &mut stop, &broken, report)
            .await;
        // Dropping the acknowledgement sender makes the reader confirm and close.
        drop(acked_tx);
        drop(rx);
        let reader_end = reader.await.unwrap_or(ReaderEnd::Done);
        match (end, reader_end) {
            (_, ReaderEnd::Layout { lsn, reason }) => SessionEnd::Fatal(StreamError::Layout {
                lsn: lsn.to_string(),
                reason,
            }),
            (SessionEnd::Retry(_), ReaderEnd::Wire(e))
            | (SessionEnd::Stopped, ReaderEnd::Wire(e)) => classify(e),
            (end, _) => end,
        }
    }

    async fn publish_loop(
        &self,
        rx: &mut mpsc::Receiver<Txn>,
        acked: &watch::Sender<Lsn>,
        stop: &mut watch::Receiver<bool>,
        broken: &AtomicBool,
        report: &mut StreamReport,
    ) -> SessionEnd {
        let batch_size = self.config.relay.batch_size.max(1);
        loop {
            let first = tokio::select! {
                t = rx.recv() => match t {
                    Some(t) => t,
                    None => return SessionEnd::Retry("the replication stream ended".into()),
                },
                _ = stopped(stop) => return SessionEnd::Stopped,
                _ = tokio::time::sleep(self.config.heartbeat) => {
                    if let Err(e) = self.heartbeat().await {
                        return SessionEnd::Retry(format!("heartbeat: {e}"));
                    }
                    report.heartbeats += 1;
                    continue;
                }
            };
            let mut txns = vec![first];
            let mut events = txns[0].events.len();
            while events < batch_size {
                match rx.try_recv() {
                    Ok(t) => {
                        events += t.events.len();
                        txns.push(t);
                    }
                    Err(_) => break,
                }
            }
            if broken.load(Ordering::SeqCst) {
                return SessionEnd::Retry("the replication connection failed".into());
            }
            if let Err(end) = self.settle(&mut txns, stop, report).await {
                return end;
            }
            let end = txns.last().expect("one at least").end;
            let _ = acked.send(end);
            if let Some(m) = &self.metrics {
                let lag = if rx.is_empty() {
                    0.0
                } else {
                    txns.last().map(|t| t.age().as_secs_f64()).unwrap_or(0.0)
                };
                m.set_stream_lag_seconds(lag);
            }
        }
    }

    /// Publishes a batch of transactions; everything not acknowledged ends in the table.
    async fn settle(
        &self,
        txns: &mut [Txn],
        stop: &mut watch::Receiver<bool>,
        report: &mut StreamReport,
    ) -> Result<(), SessionEnd> {
        let mut messages = Vec::new();
        let mut origin = Vec::new();
        for (t, txn) in txns.iter_mut().enumerate() {
            let age = txn.age();
            for mut m in std::mem::take(&mut txn.events) {
                m.age_at_claim = age;
                messages.push(m);
                origin.push(t);
            }
        }
        let aggregates: HashSet<_> = messages.iter().map(|m| &m.aggregate).collect();
        let mut parked_aggs = self
            .park
            .aggregates_on_table(&self.pool, &aggregates)
            .await
            .map_err(|e| SessionEnd::Retry(format!("looking up parked aggregates: {e}")))?;
        let mut parked: Vec<(usize, ParkState)> = Vec::new();
        let mut todo: Vec<usize> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if parked_aggs.contains(&m.aggregate) {
                parked.push((i, ParkState::Behind));
            } else {
                todo.push(i);
            }
        }
        let retry = &self.config.relay.retry;
        let mut outage = Backoff::new(
            self.config.relay.outage_backoff_min,
            self.config.relay.outage_backoff_max,
        );
        let mut published = 0u64;
        while !todo.is_empty() {
            // The first round usually offers everything: no copy then.
            let outcomes = if todo.len() == messages.len() {
                self.publisher.publish(&messages).await
            } else {
                let batch: Vec<OutboxMessage> = todo.iter().map(|&i| messages[i].clone()).collect();
                self.publisher.publish(&batch).await
            };
            let mut again = Vec::new();
            let mut again_aggs = HashSet::new();
            let mut progress = false;
            let mut delivered_any = false;
            let mut unavailable: Option<String> = None;
            for (&i, outcome) in todo.iter().zip(outcomes) {
                let agg = &messages[i].aggregate;
                // Behind a parked or waiting event of its aggregate, whatever the broker said:
                // it is sent again after that one.
                if parked_aggs.contains(agg) {
                    parked.push((i, ParkState::Behind));
                    continue;
                }
                if again_aggs.contains(agg) {
                    again.push(i);
                    continue;
                }
                match outcome {
                    PublishOutcome::Delivered => {
                        progress = true;
                        delivered_any = true;
                        published += 1;
                        if let Some(m) = &self.metrics {
                            m.commit_to_ack(txns[origin[i]].age().as_secs_f64());
                        }
                    }
                    PublishOutcome::Rejected { reason } => {
                        progress = true;
                        report.rejected += 1;
                        if let Some(m) = &self.metrics {
                            m.failures(FailureReason::Rejected, 1);
                        }
                        let state = if retry.exhausted(1) {
                            ParkState::Dead {
                                reason,
                                attempts: 1,
                            }
                        } else {
                            ParkState::Rejected {
                                reason,
                                retry_in: retry.delay(1),
                            }
                        };
                        parked.push((i, state));
                        parked_aggs.insert(agg.clone());
                    }
                    PublishOutcome::Refused { reason } => {
                        progress = true;
                        parked.push((
                            i,
                            ParkState::Dead {
                                reason,
                                attempts: 0,
                            },
                        ));
                    }
                    PublishOutcome::Unavailable { reason } => {
                        unavailable = Some(reason);
                        again.push(i);
                        again_aggs.insert(agg.clone());
                    }
                    PublishOutcome::Skipped => {
                        again.push(i);
                        again_aggs.insert(agg.clone());
                    }
                }
            }
            todo = again;
            if todo.is_empty() {
                break;
            }
            match unavailable {
                Some(reason) if delivered_any => {
                    // The broker works but not for these (a partition without a leader):
                    // they wait in the table, the stream goes on.
                    if let Some(m) = &self.metrics {
                        m.failures(FailureReason::Unavailable, todo.len() as u64);
                    }
                    for &i in &todo {
                        parked.push((
                            i,
                            ParkState::Deferred {
                                reason: reason.clone(),
                                retry_in: self.config.relay.defer_min,
                            },
                        ));
                    }
                    todo.clear();
                }
                Some(reason) => {
                    if let Some(m) = &self.metrics {
                        m.failures(FailureReason::Unavailable, todo.len() as u64);
                    }
                    report.outage_pauses += 1;
                    self.pause(&reason, &mut outage, stop).await?;
                }
                None if !progress => {
                    // Nothing moved and nothing was said: do not spin.
                    self.pause("the publisher skipped every message", &mut outage, stop)
                        .await?;
                }
                None => {}
            }
        }
        parked.sort_by_key(|(i, _)| *i);
        let rows: Vec<Parked> = parked
            .into_iter()
            .map(|(i, state)| Parked {
                message: &messages[i],
                committed_at: txns[origin[i]].committed_at,
                state,
            })
            .collect();
        self.park
            .write(&self.pool, &rows)
            .await
            .map_err(|e| SessionEnd::Retry(format!("parking events in the table: {e}")))?;
        let dead = rows
            .iter()
            .filter(|r| matches!(r.state, ParkState::Dead { .. }))
            .count() as u64;
        report.published += published;
        report.parked += rows.len() as u64;
        report.dead_lettered += dead;
        if let Some(m) = &self.metrics {
            m.published(published);
            if dead > 0 {
                m.dead_lettered(dead);
            }
        }
        if !rows.is_empty() {
            if let Some(w) = &self.table_wake {
                w.wake();
            }
        }
        Ok(())
    }

    /// Waits out a broker outage: probes with growing backoff until the broker answers.
    async fn pause(
        &self,
        reason: &str,
        backoff: &mut Backoff,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionEnd> {
        tracing::warn!(%reason, "broker unavailable; the stream relay pauses");
        if let Some(m) = &self.metrics {
            m.set_paused(true);
        }
        let started = Instant::now();
        loop {
            let wait = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(stop) => return Err(SessionEnd::Stopped),
            }
            if self.publisher.probe().await.is_ok() {
                break;
            }
        }
        if let Some(m) = &self.metrics {
            m.set_paused(false);
        }
        tracing::info!(paused = ?started.elapsed(), "broker answers again; the stream relay resumes");
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_logical_emit_message(false, $1, ''::bytea)::text")
            .bind(layout::heartbeat_prefix(&self.schema))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Completes once the stop flag is set (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What a failed connection or start means for the relay.
fn classify(e: WireError) -> SessionEnd {
    match e.code() {
        // object_in_use: the slot is active for another process.
        Some("55006") => SessionEnd::Standby,
        // undefined_object: no such slot (dropped while we ran) or publication.
        Some("42704") => SessionEnd::Fatal(StreamError::Slot(format!(
            "{e}: run `outbox migrate` with the stream slot configured"
        ))),
        // insufficient_privilege / invalid_authorization: nothing to wait for.
        Some(c) if c.starts_with("28") || c == "42501" => SessionEnd::Fatal(StreamError::Wire(e)),
        _ => match e {
            WireError::Config(_) => SessionEnd::Fatal(StreamError::Wire(e)),
            e => SessionEnd::Retry(e.to_string()),
        },
    }
}
