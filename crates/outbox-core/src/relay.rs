//! The relay: moves committed events from a store to a publisher.
//!
//! # Guarantees
//! - **At least once.** An event leaves the pending state only after the publisher reported it
//!   delivered (or after its last rejected attempt, as dead). A crash between delivery and
//!   completion re-sends it later, with the same bytes and `event_id`.
//! - **Order per aggregate.** An event is published only after every earlier event of its
//!   aggregate was published or is dead. A rejected event blocks its own aggregate until its
//!   retry; other aggregates keep flowing.
//! - **Several relays.** Aggregates are hashed into [`crate::PARTITIONS`] partitions; each
//!   relay takes a fair share of partition leases (database clock) and works only on those.
//!   A crashed relay's leases expire and are taken over. Every change a relay makes to an
//!   event is fenced by its lease, so a relay frozen past its lease changes nothing when it
//!   wakes up.
//! - **Pipelined, still in order.** While one batch is published, the previous one is written
//!   back and the next one is claimed, leaving out the events still in flight. An event is
//!   completed only if no earlier event of its aggregate in those overlapping batches went
//!   undelivered; otherwise it stays pending and is sent again after that event.
//! - **Outage is not failure.** A publisher that reports the broker unavailable pauses the
//!   relay, which probes again with growing backoff; no attempt is counted. When the broker
//!   took other messages of the batch, or answers the probe although it took none, the
//!   trouble is those messages' partitions (a Kafka partition without a leader): only their
//!   aggregates wait ([`RelayConfig::defer_min`] doubling to `defer_max`, stored as a retry
//!   time with the attempts unchanged) and everything else keeps flowing.
//!
//! # Limits
//! - Delivery is at least once: a consumer sees duplicates after crashes, lease take-overs or
//!   a rejected message in the middle of an aggregate's batch (later events of that aggregate
//!   that the broker already accepted are sent again after the rejected one). Deduplicate by
//!   `event_id` (see the inbox).
//! - Order is the order of the table's sequence within one aggregate. Stores make that equal
//!   to commit order (the PostgreSQL store serialises writers of one aggregate).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::config::RelayConfig;
use crate::event::{AggregateRef, OutboxMessage};
use crate::metrics::{FailureReason, TableMetrics};
use crate::partition::{PartitionNo, PARTITIONS};
use crate::publisher::{PublishOutcome, Publisher};
use crate::retry::{Backoff, RetryPolicy};
use crate::store::{
    AfterFailure, FailedAttempt, Fenced, PartitionLease, RelayActivity, RelayId, RelayStore,
};

/// Wakes a relay at once, e.g. right after a transaction with events committed.
///
/// Cloneable and cheap; a wake-up given while the relay is busy is remembered, so none is lost.
#[derive(Clone, Default, Debug)]
pub struct WakeSignal(Arc<Notify>);

impl WakeSignal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn wake(&self) {
        self.0.notify_one();
    }

    async fn woken(&self) {
        self.0.notified().await;
    }
}

/// What a relay did before it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    pub published: u64,
    pub rejected_attempts: u64,
    pub dead_lettered: u64,
    pub outage_pauses: u64,
    /// Events put back for a while without counting an attempt, because the broker could not
    /// take them while it took others (e.g. one partition without a leader).
    pub deferred: u64,
    /// Batches claimed while the previous one was being published (the pipeline at work).
    pub claimed_ahead: u64,
    /// Where the time went (a coarse profile): claiming, publishing, writing outcomes back.
    /// With the pipeline on the three overlap, so their sum exceeds the time spent.
    pub time_claiming: Duration,
    pub time_publishing: Duration,
    pub time_settling: Duration,
}

/// A relay over one outbox table. Build it, then [`Relay::run`] it until shutdown.
pub struct Relay<S, P> {
    store: Arc<S>,
    publisher: Arc<P>,
    config: RelayConfig,
    metrics: Option<TableMetrics>,
    wake: WakeSignal,
    id: RelayId,
}

impl<S: RelayStore, P: Publisher> Relay<S, P> {
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Self {
        Self::from_shared(Arc::new(store), Arc::new(publisher), config)
    }

    /// Like [`Relay::new`] for a store and publisher the caller keeps using too.
    pub fn from_shared(store: Arc<S>, publisher: Arc<P>, config: RelayConfig) -> Self {
        Self {
            store,
            publisher,
            config,
            metrics: None,
            wake: WakeSignal::new(),
            id: RelayId::new(),
        }
    }

    pub fn with_metrics(mut self, metrics: TableMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Use a wake signal shared with the writers of this process.
    pub fn with_wake_signal(mut self, wake: WakeSignal) -> Self {
        self.wake = wake;
        self
    }

    pub fn wake_signal(&self) -> WakeSignal {
        self.wake.clone()
    }

    pub fn id(&self) -> RelayId {
        self.id
    }

    /// Runs until `shutdown` completes, then finishes the batch in flight, gives its partitions
    /// back and returns. Database and broker errors are logged and retried, never fatal.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RelayReport {
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            started: Instant::now(),
            loop_alive_ms: AtomicU64::new(0),
            live_relays: AtomicUsize::new(1),
            activity: Default::default(),
        });
        // Everything runs inside this one future, so dropping or aborting it (a crash, as far
        // as the database can tell) stops the lease keeper too and the leases lapse.
        let keeper = keep_leases(
            self.store.clone(),
            self.id,
            self.config.clone(),
            self.metrics.clone(),
            shared.clone(),
        );
        let stop_on_shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            std::future::pending::<()>().await
        };
        if self.config.instance.is_some() {
            // Partitions of this instance's previous incarnation (crashed, or it would still
            // be running under this name) are free at once, not after its lease.
            let name = self.config.relay_name();
            match self.store.take_over_instance(self.id, &name).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(relay = %self.id, %name, partitions = n, "took over the partitions of this instance's previous run")
                }
                Err(e) => {
                    tracing::warn!(relay = %self.id, error = %e, "taking over this instance's partitions failed; they move after the lease")
                }
            }
        }
        let mut worker = Worker {
            relay: &self,
            shared,
            stop: stop_rx,
            held: Vec::new(),
            report: RelayReport::default(),
            deferrals: Deferrals::default(),
        };
        tokio::select! {
            _ = worker.run() => {}
            _ = keeper => {}
            _ = stop_on_shutdown => {}
        }
        let report = worker.report.clone();
        let held: Vec<PartitionNo> = worker.held.iter().map(|l| l.partition).collect();
        if let Err(e) = self.store.release_partitions(self.id, &held).await {
            tracing::warn!(relay = %self.id, error = %e, "could not release partitions; they move after the lease expires");
        }
        if let Err(e) = self.store.deregister(self.id).await {
            tracing::warn!(relay = %self.id, error = %e, "could not deregister relay");
        }
        if let Some(m) = &self.metrics {
            m.set_paused(false);
        }
        tracing::info!(relay = %self.id, ?report, "relay stopped");
        report
    }
}

struct Shared {
    started: Instant,
    /// When the worker loop last made progress, in ms since `started`.
    loop_alive_ms: AtomicU64,
    live_relays: AtomicUsize,
    activity: std::sync::Mutex<Activity>,
}

/// What the worker is doing, per topic, for the keeper to report.
#[derive(Default)]
struct Activity {
    in_flight: BTreeMap<String, u64>,
    /// Published since start (cumulative).
    published: BTreeMap<String, u64>,
}

/// Adds one to `topic`'s count, allocating only for a topic not seen before.
fn bump(counts: &mut BTreeMap<String, u64>, topic: &str) {
    match counts.get_mut(topic) {
        Some(n) => *n += 1,
        None => {
            counts.insert(topic.to_owned(), 1);
        }
    }
}

/// Cumulative published counts sampled over the last minute.
#[derive(Default)]
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, BTreeMap<String, u64>)>,
}

impl RateWindow {
    const WINDOW: Duration = Duration::from_secs(60);

    /// A window whose baseline is "nothing published yet" at `start`.
    fn starting(start: Instant) -> Self {
        let mut w = Self::default();
        w.samples.push_back((start, BTreeMap::new()));
        w
    }

    /// Records the current totals; returns the activity to report.
    fn observe(&mut self, now: Instant, activity: &Activity) -> RelayActivity {
        self.samples.push_back((now, activity.published.clone()));
        // Keep the newest sample at least a minute old as the baseline.
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= Self::WINDOW {
            self.samples.pop_front();
        }
        let baseline = &self.samples.front().expect("just pushed").1;
        let mut out = RelayActivity::default();
        for (topic, total) in &activity.published {
            let before = baseline.get(topic).copied().unwrap_or(0);
            if *total > before {
                out.0
                    .entry(topic.clone())
                    .or_default()
                    .published_last_minute = total - before;
            }
        }
        for (topic, n) in &activity.in_flight {
            out.0.entry(topic.clone()).or_default().in_flight = *n;
        }
        out
    }
}

impl Shared {
    fn stamp(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.loop_alive_ms.store(ms, Ordering::Relaxed);
    }

    fn loop_silent_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.loop_alive_ms.load(Ordering::Relaxed)))
    }
}

/// Heartbeats, lease renewal and table gauges, beside the worker loop so that a long publish
/// does not let leases lapse; but only while the loop shows progress, so that a wedged loop
/// does lose its partitions.
async fn keep_leases<S: RelayStore>(
    store: Arc<S>,
    relay: RelayId,
    config: RelayConfig,
    metrics: Option<TableMetrics>,
    shared: Arc<Shared>,
) {
    let renew_every = config.lease / 3;
    let tick = renew_every.min(config.stats_interval);
    let mut last_renew = Instant::now();
    let mut last_stats: Option<Instant> = None;
    let mut rate = RateWindow::starting(Instant::now());
    loop {
        tokio::time::sleep(tick).await;
        let activity = {
            let a = shared.activity.lock().expect("activity lock");
            rate.observe(Instant::now(), &a)
        };
        if let Err(e) = store.report_activity(relay, &activity).await {
            tracing::debug!(%relay, error = %e, "reporting activity failed");
        }
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            let silent = shared.loop_silent_for();
            if silent >= config.lease {
                tracing::warn!(%relay, ?silent, "relay loop made no progress; letting its leases lapse");
            } else {
                match store
                    .heartbeat(relay, &config.relay_name(), config.lease)
                    .await
                {
                    Ok(n) => shared.live_relays.store(n.max(1), Ordering::Relaxed),
                    Err(e) => tracing::warn!(%relay, error = %e, "heartbeat failed"),
                }
                if let Err(e) = store.renew_leases(relay, config.lease).await {
                    tracing::warn!(%relay, error = %e, "lease renewal failed");
                }
            }
        }
        if let Some(m) = &metrics {
            if last_stats.is_none_or(|t| t.elapsed() >= config.stats_interval) {
                last_stats = Some(Instant::now());
                match store.stats().await {
                    Ok(stats) => m.observe(&stats),
                    Err(e) => tracing::warn!(%relay, error = %e, "reading outbox stats failed"),
                }
            }
        }
    }
}

struct Worker<'a, S, P> {
    relay: &'a Relay<S, P>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    held: Vec<PartitionLease>,
    report: RelayReport,
    deferrals: Deferrals,
}

/// Why the worker is waiting.
enum Pause {
    Idle(Duration),
    Outage(Duration),
    StoreError(Duration),
}

/// A batch as claimed, with the lease each event was claimed under.
struct Claimed {
    batch: Vec<OutboxMessage>,
    fences: Vec<Fenced>,
    claimed_at: Instant,
}

impl Claimed {
    fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.batch.iter().map(|m| m.seq)
    }
}

/// A published batch whose outcomes are not yet written back.
struct Published {
    claimed: Claimed,
    resolution: Resolution,
    acked_after: Duration,
}

/// What one settle did, added to the report afterwards (settling runs beside other stages).
#[derive(Default)]
struct Settled {
    published: u64,
    rejected_attempts: u64,
    dead_lettered: u64,
    deferred: u64,
    time: Duration,
}

impl<S: RelayStore, P: Publisher> Worker<'_, S, P> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Claims a batch from the partitions held now, leaving out `in_flight`.
    async fn claim(&self, in_flight: &[i64]) -> Result<(Claimed, Duration), crate::StoreError> {
        let started = Instant::now();
        let batch = self
            .relay
            .store
            .claim_excluding(&self.held, self.relay.config.batch_size, in_flight)
            .await?;
        let fences = batch
            .iter()
            .map(|m| Fenced {
                seq: m.seq,
                lease: self
                    .held
                    .iter()
                    .find(|l| l.partition == m.partition)
                    .copied()
                    // Not ours (a store bug): the fence fails and nothing is changed.
                    .unwrap_or(PartitionLease {
                        partition: m.partition,
                        fence: -1,
                    }),
            })
            .collect();
        Ok((
            Claimed {
                batch,
                fences,
                claimed_at: started,
            },
            started.elapsed(),
        ))
    }

    fn add_settled(&mut self, s: Settled) {
        self.report.published += s.published;
        self.report.rejected_attempts += s.rejected_attempts;
        self.report.dead_lettered += s.dead_lettered;
        self.report.deferred += s.deferred;
        self.report.time_settling += s.time;
    }

    /// Writes back a batch on a sequential path (no pipeline, outage, shutdown, empty claim).
    async fn settle_now(&mut self, published: Option<Published>) {
        if let Some(p) = published {
            let s = settle(self.relay, &self.shared, &p).await;
            self.add_settled(s);
        }
        self.show_in_flight(&[]);
    }

    fn show_in_flight(&self, batches: &[&Claimed]) {
        let mut a = self.shared.activity.lock().expect("activity lock");
        a.in_flight.clear();
        for c in batches {
            for m in &c.batch {
                bump(&mut a.in_flight, m.topic.as_str());
            }
        }
    }

    /// The loop. With `pipeline`, each round publishes one batch while the previous batch is
    /// written back and the next one is claimed (past both of them); without it, claim,
    /// publish and settle run one after the other.
    ///
    /// Order per aggregate holds across overlapping batches: a claim returns events in
    /// sequence order, and an event whose aggregate has an undelivered earlier event in one of
    /// the two batches before it (whose outcome the claim could not see yet) is not completed;
    /// it is sent again after that event (see [`Recent`]).
    async fn run(&mut self) {
        let cfg = self.relay.config.clone();
        let rebalance_every = cfg.lease / 3;
        let mut last_rebalance: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        let mut idle = cfg.poll_min;
        let mut outage = Backoff::new(cfg.outage_backoff_min, cfg.outage_backoff_max);
        let mut store_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Claimed while the previous batch was being published.
        let mut ahead: Option<Claimed> = None;
        // Published, not yet written back.
        let mut unsettled: Option<Published> = None;
        let mut recent = Recent::default();

        while !self.stopping() {
            self.shared.stamp();
            if last_rebalance.is_none_or(|t| t.elapsed() >= rebalance_every) {
                match self.rebalance().await {
                    Ok(()) => last_rebalance = Some(Instant::now()),
                    Err(e) => {
                        tracing::warn!(relay = %self.relay.id, error = %e, "rebalance failed");
                        self.pause(Pause::StoreError(store_backoff.next_delay()))
                            .await;
                        continue;
                    }
                }
            }
            if cfg.retention > Duration::ZERO
                && last_sweep.elapsed() >= cfg.retention_sweep_interval
                && self.held.iter().any(|l| l.partition == 0)
            {
                last_sweep = Instant::now();
                self.sweep_retained().await;
            }
            if self.held.is_empty() {
                self.settle_now(unsettled.take()).await;
                ahead = None;
                recent.clear();
                self.pause(Pause::Idle(cfg.poll_max.min(rebalance_every)))
                    .await;
                continue;
            }

            if outage.failures() > 0 {
                // Paused by an outage: ask before claiming and sending a batch again.
                if let Err(reason) = self.relay.publisher.probe().await {
                    self.report.outage_pauses += 1;
                    let delay = outage.next_delay();
                    tracing::debug!(relay = %self.relay.id, %reason, ?delay, "broker still unavailable");
                    self.pause(Pause::Outage(delay)).await;
                    continue;
                }
            }

            let current = match ahead.take() {
                Some(c) => c,
                None => {
                    let in_flight: Vec<i64> =
                        unsettled.iter().flat_map(|p| p.claimed.seqs()).collect();
                    match self.claim(&in_flight).await {
                        Ok((c, took)) => {
                            store_backoff.reset();
                            self.report.time_claiming += took;
                            c
                        }
                        Err(e) => {
                            tracing::warn!(relay = %self.relay.id, error = %e, "claim failed; retrying");
                            self.settle_now(unsettled.take()).await;
                            recent.clear();
                            self.pause(Pause::StoreError(store_backoff.next_delay()))
                                .await;
                            continue;
                        }
                    }
                }
            };
            if current.batch.is_empty() {
                let had_work = unsettled.is_some();
                self.settle_now(unsettled.take()).await;
                recent.clear();
                if !had_work {
                    self.pause(Pause::Idle(idle)).await;
                    idle = (idle * 2).min(cfg.poll_max);
                }
                continue;
            }
            idle = cfg.poll_min;

            self.shared.stamp();
            let showing: Vec<&Claimed> = std::iter::once(&current)
                .chain(unsettled.as_ref().map(|p| &p.claimed))
                .collect();
            self.show_in_flight(&showing);
            // Claim ahead only after a full batch: otherwise the table is (nearly) drained and
            // the next round's claim sees everything committed meanwhile anyway.
            let claim_ahead = cfg.pipeline && current.batch.len() >= cfg.batch_size;
            let in_flight: Vec<i64> = if claim_ahead {
                current
                    .seqs()
                    .chain(unsettled.iter().flat_map(|p| p.claimed.seqs()))
                    .collect()
            } else {
                Vec::new()
            };
            let previous = unsettled.take();
            let publish = async {
                let started = Instant::now();
                let outcomes = publish_unless_held_back(
                    self.relay.publisher.as_ref(),
                    &current.batch,
                    &recent,
                )
                .await;
                (outcomes, started.elapsed())
            };
            let write_back = async {
                match &previous {
                    Some(p) => settle(self.relay, &self.shared, p).await,
                    None => Settled::default(),
                }
            };
            let claim_next = async {
                if claim_ahead {
                    Some(self.claim(&in_flight).await)
                } else {
                    None
                }
            };
            let ((outcomes, publish_time), settled, next) =
                tokio::join!(publish, write_back, claim_next);
            self.report.time_publishing += publish_time;
            self.add_settled(settled);
            self.shared.stamp();
            match next {
                Some(Ok((c, took))) => {
                    self.report.time_claiming += took;
                    if !c.batch.is_empty() {
                        self.report.claimed_ahead += 1;
                    }
                    ahead = Some(c);
                }
                Some(Err(e)) => {
                    tracing::warn!(relay = %self.relay.id, error = %e, "claim failed; retrying");
                }
                None => {}
            }

            let acked_after = current.claimed_at.elapsed();
            let mut resolution = resolve(&current.batch, &outcomes, &cfg.retry);
            if resolution.outage.is_some() && self.only_part_unavailable(&resolution).await {
                // The broker works but could not take these messages (a partition without a
                // leader, say): put their aggregates back for a while, count no attempt, and
                // keep the rest flowing instead of pausing everything.
                self.deferrals.defer(&current.batch, &mut resolution, &cfg);
            } else if !self.deferrals.is_empty() {
                self.deferrals.forget_delivered(&current.batch, &resolution);
            }
            recent.push(&current.batch, &resolution);
            let outage_reason = resolution.outage.clone();
            unsettled = Some(Published {
                claimed: current,
                resolution,
                acked_after,
            });
            if !cfg.pipeline || outage_reason.is_some() {
                // Nothing stays in flight across a pause (or at all, without the pipeline).
                self.settle_now(unsettled.take()).await;
                ahead = None;
                recent.clear();
            }

            match outage_reason {
                Some(reason) => {
                    self.report.outage_pauses += 1;
                    if let Some(m) = &self.relay.metrics {
                        m.set_paused(true);
                    }
                    let delay = outage.next_delay();
                    tracing::warn!(relay = %self.relay.id, %reason, ?delay, probes = outage.failures(), "broker unavailable; relay paused, no attempts counted");
                    self.pause(Pause::Outage(delay)).await;
                }
                None if outage.failures() > 0 => {
                    tracing::info!(relay = %self.relay.id, "broker reachable again; relay resumed");
                    outage.reset();
                    if let Some(m) = &self.relay.metrics {
                        m.set_paused(false);
                    }
                }
                None => {}
            }
        }
        self.settle_now(unsettled.take()).await;
    }

    /// Whether a batch with unavailable messages met a working broker: it delivered or
    /// rejected other messages of the batch, or, when it took none, it answers the probe
    /// promptly. A probe that succeeds only slowly met a broker coming back from an outage
    /// (frozen, restarting), which the relay-wide pause handles.
    async fn only_part_unavailable(&self, r: &Resolution) -> bool {
        /// A healthy cluster answers a metadata request in milliseconds.
        const PROMPT: Duration = Duration::from_secs(1);
        if !r.delivered.is_empty() || !r.rejected.is_empty() {
            return true;
        }
        // The publish that brought us here may have waited for a delivery timeout: that is
        // progress, not a wedged loop, as far as the lease keeper is concerned.
        self.shared.stamp();
        let asked = Instant::now();
        let answered = self.relay.publisher.probe().await.is_ok();
        self.shared.stamp();
        answered && asked.elapsed() < PROMPT
    }

    /// Takes this relay's fair share of partitions and gives back any excess.
    async fn rebalance(&mut self) -> Result<(), crate::StoreError> {
        let cfg = &self.relay.config;
        let store = &self.relay.store;
        let id = self.relay.id;
        let live = store
            .heartbeat(id, &cfg.relay_name(), cfg.lease)
            .await?
            .max(1);
        self.shared.live_relays.store(live, Ordering::Relaxed);
        let mut held = store.renew_leases(id, cfg.lease).await?;
        let share = usize::from(PARTITIONS).div_ceil(live);
        if held.len() > share {
            held.sort_by_key(|l| l.partition);
            let extra: Vec<PartitionNo> = held.drain(share..).map(|l| l.partition).collect();
            store.release_partitions(id, &extra).await?;
            tracing::debug!(relay = %id, released = extra.len(), share, "released partitions");
        } else if held.len() < share {
            let got = store
                .acquire_partitions(id, share - held.len(), cfg.lease)
                .await?;
            if !got.is_empty() {
                tracing::debug!(relay = %id, acquired = got.len(), share, "acquired partitions");
            }
            held.extend(got);
        }
        // A store may answer an acquire with every lease the relay holds (MySQL cannot
        // return the rows an UPDATE changed): one lease per partition, the newest fence.
        held.sort_by_key(|l| (l.partition, std::cmp::Reverse(l.fence)));
        held.dedup_by_key(|l| l.partition);
        self.held = held;
        Ok(())
    }

    async fn sweep_retained(&self) {
        let cfg = &self.relay.config;
        // A bounded number of small deletes per sweep keeps publishing responsive.
        for _ in 0..10 {
            match self
                .relay
                .store
                .purge_published(cfg.retention, cfg.retention_sweep_batch)
                .await
            {
                Ok(n) if n as usize >= cfg.retention_sweep_batch => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(relay = %self.relay.id, error = %e, "retention sweep failed");
                    break;
                }
            }
        }
    }

    async fn pause(&mut self, why: Pause) {
        let (delay, wakeable) = match why {
            Pause::Idle(d) => (d, true),
            Pause::Outage(d) | Pause::StoreError(d) => (d, false),
        };
        let wake = self.relay.wake.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wake.woken(), if wakeable => {}
            _ = self.stop.changed() => {}
        }
    }
}

/// Writes the outcome of one batch back to the store, retrying store errors a few times
/// (an uncompleted delivery is only re-sent later, but a re-send is a duplicate).
async fn settle<S: RelayStore, P: Publisher>(
    relay: &Relay<S, P>,
    shared: &Shared,
    p: &Published,
) -> Settled {
    let started = Instant::now();
    let mut out = Settled::default();
    let (batch, fences, r) = (&p.claimed.batch, &p.claimed.fences, &p.resolution);
    let delivered: Vec<Fenced> = r.delivered.iter().map(|&i| fences[i]).collect();
    let failures: Vec<FailedAttempt> = r
        .rejected
        .iter()
        .chain(&r.deferred)
        .map(|rej| FailedAttempt {
            event: fences[rej.index],
            attempts: rej.attempts,
            error: rej.reason.clone(),
            next: rej.next.clone(),
        })
        .collect();
    let retain = relay.config.retention > Duration::ZERO;
    let store = &relay.store;
    let id = relay.id;

    if !delivered.is_empty() {
        let mut tries = 0;
        loop {
            match store.complete(id, &delivered, retain).await {
                Ok(n) => {
                    out.published += n;
                    {
                        let mut a = shared.activity.lock().expect("activity lock");
                        for &i in &r.delivered {
                            bump(&mut a.published, batch[i].topic.as_str());
                        }
                    }
                    if n < delivered.len() as u64 {
                        tracing::info!(relay = %id, completed = n, delivered = delivered.len(), "some partitions changed hands; the new holder re-sends the rest");
                    }
                    if let Some(m) = &relay.metrics {
                        m.published(n);
                        for &i in &r.delivered {
                            m.commit_to_ack((batch[i].age_at_claim + p.acked_after).as_secs_f64());
                        }
                    }
                    break;
                }
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::warn!(relay = %id, error = %e, "completing delivered events failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                Err(e) => {
                    tracing::error!(relay = %id, error = %e, "could not complete delivered events; they will be sent again");
                    break;
                }
            }
        }
    }
    if !failures.is_empty() {
        let dead = failures
            .iter()
            .filter(|f| f.next == AfterFailure::Dead)
            .count() as u64;
        let (rejected, deferred) = (r.rejected.len() as u64, r.deferred.len() as u64);
        for f in &failures[..r.rejected.len()] {
            tracing::warn!(relay = %id, seq = f.event.seq, attempts = f.attempts, error = %f.error, dead = (f.next == AfterFailure::Dead), "publish rejected");
        }
        for f in &failures[r.rejected.len()..] {
            tracing::info!(relay = %id, seq = f.event.seq, error = %f.error, "deferred without counting an attempt");
        }
        match store.record_failures(id, &failures).await {
            Ok(_) => {
                out.rejected_attempts += rejected;
                out.dead_lettered += dead;
                out.deferred += deferred;
                if let Some(m) = &relay.metrics {
                    m.failures(FailureReason::Rejected, rejected);
                    m.dead_lettered(dead);
                }
            }
            Err(e) => {
                tracing::warn!(relay = %id, error = %e, "recording rejected attempts failed; they will be retried without counting")
            }
        }
    }
    if r.unavailable > 0 {
        if let Some(m) = &relay.metrics {
            m.failures(FailureReason::Unavailable, r.unavailable as u64);
        }
    }
    out.time = started.elapsed();
    out
}

/// How long each aggregate waits after the broker could not take its event while it took
/// others: from `defer_min`, doubling up to `defer_max` while it keeps failing, forgotten
/// once the aggregate delivers. The wait is stored as the event's retry time with its
/// attempts unchanged, so the claim leaves the aggregate out meanwhile and other aggregates
/// fill the batches. A long wait matters because every batch that offers a stuck message
/// waits for its delivery timeout.
#[derive(Default)]
struct Deferrals {
    backoff: HashMap<AggregateRef, Backoff>,
}

impl Deferrals {
    /// Beyond this many aggregates the memory is dropped (waits start again from the minimum).
    const MAX_REMEMBERED: usize = 100_000;

    fn is_empty(&self) -> bool {
        self.backoff.is_empty()
    }

    /// Turns the batch's stalled messages into deferrals; the batch no longer counts as an
    /// outage.
    fn defer(&mut self, batch: &[OutboxMessage], r: &mut Resolution, cfg: &RelayConfig) {
        self.forget_delivered(batch, r);
        if self.backoff.len() > Self::MAX_REMEMBERED {
            self.backoff.clear();
        }
        for (i, reason) in std::mem::take(&mut r.stalled) {
            let msg = &batch[i];
            let delay = self
                .backoff
                .entry(msg.aggregate.clone())
                .or_insert_with(|| Backoff::new(cfg.defer_min, cfg.defer_max))
                .next_delay();
            r.deferred.push(Rejection {
                index: i,
                attempts: msg.attempts,
                reason: format!("deferred {delay:?}, no attempt counted: {reason}"),
                next: AfterFailure::RetryIn(delay),
            });
        }
        r.outage = None;
    }

    fn forget_delivered(&mut self, batch: &[OutboxMessage], r: &Resolution) {
        for &i in &r.delivered {
            self.backoff.remove(&batch[i].aggregate);
        }
    }
}

/// Undelivered events of the last two batches, per aggregate. A pipelined claim runs while
/// those batches are published and written back, so it cannot see their failures (a retry
/// time not yet stored) and may return later events of the same aggregates: those must wait.
#[derive(Default)]
struct Recent {
    batches: std::collections::VecDeque<HashMap<AggregateRef, Vec<i64>>>,
}

impl Recent {
    /// The batches a claim can overlap: the one being published and the one being settled.
    const DEPTH: usize = 2;

    fn push(&mut self, batch: &[OutboxMessage], r: &Resolution) {
        let mut undelivered: HashMap<AggregateRef, Vec<i64>> = HashMap::new();
        if r.delivered.len() < batch.len() {
            let delivered: HashSet<usize> = r.delivered.iter().copied().collect();
            for (i, m) in batch.iter().enumerate() {
                if !delivered.contains(&i) {
                    undelivered
                        .entry(m.aggregate.clone())
                        .or_default()
                        .push(m.seq);
                }
            }
        }
        self.batches.push_front(undelivered);
        self.batches.truncate(Self::DEPTH);
    }

    fn clear(&mut self) {
        self.batches.clear();
    }

    fn is_empty(&self) -> bool {
        self.batches.iter().all(HashMap::is_empty)
    }

    /// Which events of `batch` must wait: an earlier event of their aggregate is undelivered
    /// and not sent again, ahead of them, in this batch. Empty when none must.
    fn held_back(&self, batch: &[OutboxMessage]) -> Vec<bool> {
        if self.is_empty() {
            return Vec::new();
        }
        let in_batch: HashSet<i64> = batch.iter().map(|m| m.seq).collect();
        let mask: Vec<bool> = batch
            .iter()
            .map(|m| {
                self.batches.iter().any(|b| {
                    b.get(&m.aggregate).is_some_and(|seqs| {
                        seqs.iter().any(|&s| s < m.seq && !in_batch.contains(&s))
                    })
                })
            })
            .collect();
        if mask.contains(&true) {
            mask
        } else {
            Vec::new()
        }
    }
}

/// Publishes `batch` except the events [`Recent`] holds back, which are not offered to the
/// broker at all (so it never sees them ahead of the event they wait for) and come back
/// [`PublishOutcome::Skipped`], and except malformed rows ([`OutboxMessage::malformed`]),
/// which come back [`PublishOutcome::Refused`] with the later events of their aggregate
/// skipped behind them.
async fn publish_unless_held_back<P: Publisher>(
    publisher: &P,
    batch: &[OutboxMessage],
    recent: &Recent,
) -> Vec<PublishOutcome> {
    let held = recent.held_back(batch);
    let refused: Vec<(usize, String)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.malformed().map(|reason| (i, reason)))
        .collect();
    if held.is_empty() && refused.is_empty() {
        return publisher.publish(batch).await;
    }
    let mut fixed: Vec<Option<PublishOutcome>> = held
        .iter()
        .map(|&h| h.then_some(PublishOutcome::Skipped))
        .chain(std::iter::repeat(None))
        .take(batch.len())
        .collect();
    for (i, reason) in refused {
        fixed[i] = Some(PublishOutcome::Refused { reason });
        let aggregate = &batch[i].aggregate;
        for (later, m) in batch.iter().enumerate().skip(i + 1) {
            if &m.aggregate == aggregate && fixed[later].is_none() {
                fixed[later] = Some(PublishOutcome::Skipped);
            }
        }
    }
    let to_send: Vec<OutboxMessage> = batch
        .iter()
        .zip(&fixed)
        .filter(|(_, f)| f.is_none())
        .map(|(m, _)| m.clone())
        .collect();
    let mut sent = if to_send.is_empty() {
        Vec::new()
    } else {
        publisher.publish(&to_send).await
    }
    .into_iter();
    fixed
        .into_iter()
        .map(|f| {
            f.unwrap_or_else(|| {
                sent.next().unwrap_or_else(|| {
                    PublishOutcome::unavailable("publisher returned too few outcomes")
                })
            })
        })
        .collect()
}

/// A rejected message and what to do with it.
#[derive(Debug, PartialEq)]
struct Rejection {
    index: usize,
    attempts: u32,
    reason: String,
    next: AfterFailure,
}

/// What a batch's outcomes mean for each message.
#[derive(Debug, Default, PartialEq)]
struct Resolution {
    /// Indexes to complete.
    delivered: Vec<usize>,
    rejected: Vec<Rejection>,
    /// Messages with no verdict this round (outage), left pending untouched.
    unavailable: usize,
    /// The reason of the first unavailable outcome, if any.
    outage: Option<String>,
    /// The first unavailable message of each aggregate (its later ones are blocked).
    stalled: Vec<(usize, String)>,
    /// Stalled messages put back for a while, attempts unchanged (see [`Deferrals`]).
    deferred: Vec<Rejection>,
}

/// Applies the ordering rule: within an aggregate, nothing after the first message that was
/// not delivered may be completed, because that would let it overtake an earlier event.
fn resolve(
    batch: &[OutboxMessage],
    outcomes: &[PublishOutcome],
    retry: &RetryPolicy,
) -> Resolution {
    let mut r = Resolution::default();
    let mut blocked: HashSet<&AggregateRef> = HashSet::new();
    for (i, msg) in batch.iter().enumerate() {
        let outcome = outcomes.get(i).cloned().unwrap_or_else(|| {
            PublishOutcome::unavailable(format!(
                "publisher returned {} outcomes for {} messages",
                outcomes.len(),
                batch.len()
            ))
        });
        if blocked.contains(&msg.aggregate) {
            if let PublishOutcome::Unavailable { .. } = outcome {
                r.unavailable += 1;
            }
            continue;
        }
        match outcome {
            PublishOutcome::Delivered => r.delivered.push(i),
            PublishOutcome::Rejected { reason } => {
                let attempts = msg.attempts.saturating_add(1);
                let next = if retry.exhausted(attempts) {
                    AfterFailure::Dead
                } else {
                    AfterFailure::RetryIn(retry.delay(attempts))
                };
                r.rejected.push(Rejection {
                    index: i,
                    attempts,
                    reason,
                    next,
                });
                blocked.insert(&msg.aggregate);
            }
            PublishOutcome::Refused { reason } => {
                r.rejected.push(Rejection {
                    index: i,
                    attempts: msg.attempts.saturating_add(1),
                    reason,
                    next: AfterFailure::Dead,
                });
                blocked.insert(&msg.aggregate);
            }
            PublishOutcome::Unavailable { reason } => {
                r.unavailable += 1;
                r.outage.get_or_insert_with(|| reason.clone());
                r.stalled.push((i, reason));
                blocked.insert(&msg.aggregate);
            }
            PublishOutcome::Skipped => {
                blocked.insert(&msg.aggregate);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn rate_window_counts_the_last_minute_only() {
        let t0 = Instant::now();
        let mut w = RateWindow::starting(t0);
        let mut a = Activity::default();
        a.published.insert("t".into(), 5);
        a.in_flight.insert("u".into(), 7);
        let r = w.observe(t0 + Duration::from_secs(5), &a);
        assert_eq!(r.0["t"].published_last_minute, 5);
        assert_eq!(r.0["u"].in_flight, 7);
        a.published.insert("t".into(), 8);
        a.in_flight.clear();
        let r = w.observe(t0 + Duration::from_secs(70), &a);
        assert_eq!(
            r.0["t"].published_last_minute, 3,
            "only what was published after t0+5s"
        );
        assert!(!r.0.contains_key("u"));
        assert_eq!(r.total().published_last_minute, 3);
        let merged = RelayActivity::merge([r.to_json().as_str(), r.to_json().as_str(), "garbage"]);
        assert_eq!(merged.total().published_last_minute, 6);
    }

    use super::*;
    use crate::event::{EventId, Topic};

    fn msg(seq: i64, agg: &str, attempts: u32) -> OutboxMessage {
        let aggregate = AggregateRef::new("a", agg).unwrap();
        OutboxMessage {
            seq,
            event_id: EventId::new(),
            partition: aggregate.partition(),
            aggregate,
            event_type: "t".into(),
            topic: Topic::new("t").unwrap(),
            key: agg.into(),
            headers: Default::default(),
            payload: Default::default(),
            attempts,
            age_at_claim: Duration::ZERO,
        }
    }

    #[test]
    fn a_rejection_blocks_later_events_of_its_aggregate_only() {
        let batch = [
            msg(1, "x", 0),
            msg(2, "y", 0),
            msg(3, "x", 0),
            msg(4, "y", 0),
        ];
        let outcomes = [
            PublishOutcome::rejected("too large"),
            PublishOutcome::Delivered,
            PublishOutcome::Delivered,
            PublishOutcome::Delivered,
        ];
        let r = resolve(&batch, &outcomes, &RetryPolicy::default());
        assert_eq!(r.delivered, vec![1, 3]);
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].index, 0);
        assert_eq!(r.rejected[0].attempts, 1);
        assert!(matches!(r.rejected[0].next, AfterFailure::RetryIn(_)));
        assert_eq!(r.outage, None);
    }

    #[test]
    fn skipped_messages_are_untouched_and_block_their_aggregate() {
        let batch = [msg(1, "x", 0), msg(2, "x", 0), msg(3, "x", 0)];
        let outcomes = [
            PublishOutcome::Delivered,
            PublishOutcome::Skipped,
            PublishOutcome::Delivered,
        ];
        let r = resolve(&batch, &outcomes, &RetryPolicy::default());
        assert_eq!(r.delivered, vec![0]);
        assert!(r.rejected.is_empty());
        assert_eq!(r.unavailable, 0);
        assert_eq!(r.outage, None);
    }

    #[test]
    fn last_attempt_goes_dead() {
        let batch = [msg(1, "x", 4)];
        let r = resolve(
            &batch,
            &[PublishOutcome::rejected("no")],
            &RetryPolicy::default(),
        );
        assert_eq!(r.rejected[0].next, AfterFailure::Dead);
        assert_eq!(r.rejected[0].attempts, 5);
    }

    #[test]
    fn unavailable_burns_nothing_and_blocks_its_aggregate() {
        let batch = [msg(1, "x", 2), msg(2, "x", 0), msg(3, "y", 0)];
        let outcomes = [
            PublishOutcome::unavailable("broker down"),
            PublishOutcome::Delivered,
            PublishOutcome::Delivered,
        ];
        let r = resolve(&batch, &outcomes, &RetryPolicy::default());
        assert_eq!(r.delivered, vec![2]);
        assert!(r.rejected.is_empty());
        assert_eq!(r.unavailable, 1);
        assert_eq!(r.outage.as_deref(), Some("broker down"));
    }

    /// Delivers everything except the events named, and records what it was offered.
    #[derive(Default)]
    struct Offered {
        reject: HashSet<i64>,
        seen: std::sync::Mutex<Vec<i64>>,
    }

    #[async_trait::async_trait]
    impl Publisher for Offered {
        async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
            let mut seen = self.seen.lock().unwrap();
            batch
                .iter()
                .map(|m| {
                    seen.push(m.seq);
                    if self.reject.contains(&m.seq) {
                        PublishOutcome::rejected("no")
                    } else {
                        PublishOutcome::Delivered
                    }
                })
                .collect()
        }
    }

    /// One relay round: publish (minus held-back events), resolve, remember.
    async fn round(p: &Offered, batch: &[OutboxMessage], recent: &mut Recent) -> Vec<usize> {
        let outcomes = publish_unless_held_back(p, batch, recent).await;
        let r = resolve(batch, &outcomes, &RetryPolicy::default());
        recent.push(batch, &r);
        r.delivered
    }

    #[tokio::test]
    async fn overlapping_batches_keep_an_aggregate_behind_its_undelivered_event() {
        let rejecting = Offered {
            reject: [1].into(),
            ..Default::default()
        };
        let mut recent = Recent::default();
        // Batch 1: A's first event is rejected; B flows.
        let d = round(&rejecting, &[msg(1, "a", 0), msg(2, "b", 0)], &mut recent).await;
        assert_eq!(d, vec![1]);
        // Batch 2 was claimed before batch 1's retry time was stored: A's later event waits,
        // and the broker is not even offered it.
        let d = round(&rejecting, &[msg(3, "a", 0), msg(4, "b", 0)], &mut recent).await;
        assert_eq!(d, vec![1], "seq 3 must not overtake seq 1");
        assert_eq!(*rejecting.seen.lock().unwrap(), vec![1, 2, 4]);
        // Batch 3 holds seq 1 again (now accepted) and a later A event: seq 1 goes, seq 5
        // waits for seq 3.
        let accepting = Offered::default();
        let batch = [msg(1, "a", 1), msg(5, "a", 0), msg(6, "b", 0)];
        let d = round(&accepting, &batch, &mut recent).await;
        assert_eq!(d, vec![0, 2]);
        assert_eq!(*accepting.seen.lock().unwrap(), vec![1, 6]);
        // Batch 4 holds seq 3 and 5 again: both go, nothing undelivered is older.
        let batch = [msg(3, "a", 0), msg(5, "a", 0)];
        assert!(recent.held_back(&batch).is_empty());
        assert_eq!(round(&accepting, &batch, &mut recent).await, vec![0, 1]);
        assert!(!recent.is_empty(), "batch 3's seq 5 is still remembered");
        round(&accepting, &batch, &mut recent).await;
        assert!(recent.is_empty(), "only the last two batches count");
    }

    #[test]
    fn missing_outcomes_count_as_unavailable() {
        let batch = [msg(1, "x", 0), msg(2, "y", 0)];
        let r = resolve(
            &batch,
            &[PublishOutcome::Delivered],
            &RetryPolicy::default(),
        );
        assert_eq!(r.delivered, vec![0]);
        assert_eq!(r.unavailable, 1);
        assert!(r.outage.unwrap().contains("1 outcomes for 2"));
    }
}
