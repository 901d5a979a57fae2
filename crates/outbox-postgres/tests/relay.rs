//! The relay on real PostgreSQL: atomicity, order, retries, dead letters, outages, crashes,
//! fencing, leases and retention. A scripted test publisher stands in for the broker.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outbox_core::testing::TestPublisher;
use outbox_core::{
    EnqueueOutcome, EventId, Fenced, OutboxMessage, RelayConfig, RelayId, RelayStore, RetryPolicy,
};

const LIMIT: Duration = Duration::from_secs(30);

/// Walks deliveries in global order: the first delivery of every event must be the next
/// event of its aggregate in sequence order, and every event must arrive.
fn assert_order_per_aggregate(
    delivered: &[OutboxMessage],
    expected: &HashMap<String, Vec<EventId>>,
) {
    let mut seen = HashSet::new();
    let mut next: HashMap<&str, usize> = HashMap::new();
    for m in delivered {
        if !seen.insert(m.event_id) {
            continue; // a re-send of something already delivered
        }
        let agg = m.aggregate.id();
        let order = &expected[agg];
        let i = next.entry(agg).or_default();
        assert_eq!(
            order.get(*i),
            Some(&m.event_id),
            "aggregate {agg}: event #{i} delivered out of order"
        );
        *i += 1;
    }
    for (agg, order) in expected {
        assert_eq!(
            next.get(agg.as_str()).copied().unwrap_or(0),
            order.len(),
            "aggregate {agg}: events lost"
        );
    }
}

#[tokio::test]
async fn rolled_back_events_vanish_and_committed_ones_are_published() {
    let db = TestDb::new().await;
    let outbox = db.outbox();

    let kept = event("o-1", 1);
    let dropped = event("o-2", 1);
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &dropped).await.unwrap();
    tx.rollback().await.unwrap();
    db.write("o-1", std::slice::from_ref(&kept)).await;
    assert_eq!(db.count("true").await, 1);

    let publisher = TestPublisher::new();
    let relay = spawn_relay(&db, publisher.clone(), fast_config());
    wait_until(LIMIT, "event published", || async {
        publisher.delivered_count() == 1 && db.count("true").await == 0
    })
    .await;
    let report = relay.stop().await;
    let delivered = publisher.delivered();
    assert_eq!(delivered[0].event_id, kept.event_id());
    assert_eq!(
        &delivered[0].payload,
        kept.payload(),
        "payload must be verbatim"
    );
    assert_eq!(delivered[0].key, "o-1");
    assert_eq!(publisher.offered(dropped.event_id()), 0);
    assert_eq!(report.published, 1);
    db.drop().await;
}

#[tokio::test]
async fn order_per_aggregate_holds_with_interleaved_writers_failures_and_three_relays() {
    let db = Arc::new(TestDb::new().await);
    let publisher = TestPublisher::new();
    let mut config = fast_config();
    config.batch_size = 40;
    // Short leases rebalance often, so partitions change hands while events flow.
    config.lease = std::time::Duration::from_millis(600);
    let relays: Vec<_> = (0..3)
        .map(|_| spawn_relay(&db, publisher.clone(), config.clone()))
        .collect();

    const AGGREGATES: usize = 20;
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 150;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let db = db.clone();
        let publisher = publisher.clone();
        writers.push(tokio::spawn(async move {
            let outbox = db.outbox();
            let mut written = Vec::new();
            for i in 0..PER_WRITER {
                let agg = format!("agg-{}", (w * 7 + i) % AGGREGATES);
                let e = event(&agg, (w * 1000 + i) as u32);
                if i % 17 == 3 {
                    publisher.reject_times(e.event_id(), 1 + (i % 2) as u32);
                }
                let mut tx = db.pool.begin().await.unwrap();
                let outcome = outbox.enqueue(&mut tx, &e).await.unwrap();
                tx.commit().await.unwrap();
                let EnqueueOutcome::Inserted { seq } = outcome else {
                    panic!("not inserted")
                };
                written.push((agg, seq, e.event_id()));
                // Spread the writes over ~1.5 s so that relays join and rebalance mid-stream.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written
        }));
    }
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    all.sort_by_key(|(_, seq, _)| *seq);
    let mut expected: HashMap<String, Vec<EventId>> = HashMap::new();
    for (agg, _, id) in &all {
        expected.entry(agg.clone()).or_default().push(*id);
    }
    let total = all.len();
    let ids: HashSet<EventId> = all.iter().map(|(_, _, id)| *id).collect();

    wait_until(LIMIT * 2, "all events delivered and completed", || async {
        let delivered: HashSet<EventId> =
            publisher.delivered().iter().map(|m| m.event_id).collect();
        delivered.len() == total && db.count("true").await == 0
    })
    .await;
    let mut reports = Vec::new();
    for r in relays {
        reports.push(r.stop().await);
    }
    let delivered = publisher.delivered();
    assert!(delivered.iter().all(|m| ids.contains(&m.event_id)));
    assert_order_per_aggregate(&delivered, &expected);
    let published: u64 = reports.iter().map(|r| r.published).sum();
    assert_eq!(
        published as usize, total,
        "each event completed exactly once"
    );
    assert!(
        reports.iter().filter(|r| r.published > 0).count() >= 2,
        "work was shared between relays: {reports:?}"
    );
    assert!(reports.iter().map(|r| r.rejected_attempts).sum::<u64>() > 0);
    Arc::try_unwrap(db).ok().unwrap().drop().await;
}

#[tokio::test]
async fn a_pipelined_relay_keeps_order_when_rejections_fall_in_overlapping_batches() {
    // A backlog first, so that every batch is full and the relay claims the next batch while
    // one is published: the claim cannot see the retry time of a rejection in flight.
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    const AGGREGATES: usize = 12;
    const TRANSACTIONS: usize = 60;
    const PER_TX: usize = 20;
    let mut expected: HashMap<String, Vec<EventId>> = HashMap::new();
    for t in 0..TRANSACTIONS {
        let events: Vec<_> = (0..PER_TX)
            .map(|i| {
                let n = t * PER_TX + i;
                let agg = format!("agg-{}", n % AGGREGATES);
                let e = event(&agg, n as u32);
                if n % 37 == 5 {
                    publisher.reject_times(e.event_id(), 1 + (n % 2) as u32);
                }
                expected.entry(agg).or_default().push(e.event_id());
                e
            })
            .collect();
        db.write(&format!("order-{t}"), &events).await;
    }
    let total = TRANSACTIONS * PER_TX;
    let mut config = fast_config();
    config.batch_size = 25;
    assert!(config.pipeline, "the pipeline is on by default");
    let relay = spawn_relay(&db, publisher.clone(), config);
    wait_until(LIMIT, "backlog drained", || async {
        db.count("true").await == 0
    })
    .await;
    let report = relay.stop().await;
    assert_order_per_aggregate(&publisher.delivered(), &expected);
    assert_eq!(
        report.published as usize, total,
        "each event completed once"
    );
    assert!(report.rejected_attempts > 0);
    assert!(
        report.claimed_ahead > 10,
        "the pipeline was not used: {report:?}"
    );
    db.drop().await;
}

#[tokio::test]
async fn rejected_event_backs_off_exponentially_then_dies_without_blocking_others() {
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    let mut config = fast_config();
    config.retry = RetryPolicy {
        base: Duration::from_millis(200),
        cap: Duration::from_millis(800),
        max_attempts: 3,
    };
    let poison = event("bad", 1);
    let after_poison = event("bad", 2);
    let other = event("good", 1);
    publisher.reject_always(poison.event_id());
    db.write(
        "o-1",
        &[poison.clone(), after_poison.clone(), other.clone()],
    )
    .await;

    let relay = spawn_relay(&db, publisher.clone(), config);
    wait_until(LIMIT, "other aggregate delivered", || async {
        publisher.offered(other.event_id()) == 1
    })
    .await;
    // While the head of "bad" is retrying, its successor waits.
    assert_eq!(publisher.offered(after_poison.event_id()), 0);
    // The rejection is written back after the batch's publish returns.
    let attempt_recorded = || async {
        let row: (i32, Option<String>) = sqlx::query_as(&format!(
            "SELECT attempts, last_error FROM {} WHERE event_id = $1",
            db.table("event_outbox")
        ))
        .bind(poison.event_id().as_uuid())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        row
    };
    wait_until(LIMIT, "first rejection recorded", || async {
        attempt_recorded().await.0 >= 1
    })
    .await;
    let (_, last_error) = attempt_recorded().await;
    assert!(last_error.unwrap().contains("rejects"));

    wait_until(LIMIT, "poison event dead", || async {
        db.count("status = 'dead'").await == 1
    })
    .await;
    let (attempts, status, err): (i32, String, Option<String>) = sqlx::query_as(&format!(
        "SELECT attempts, status, last_error FROM {} WHERE event_id = $1",
        db.table("event_outbox")
    ))
    .bind(poison.event_id().as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((attempts, status.as_str()), (3, "dead"));
    assert!(err.unwrap().contains("rejects this event"));

    // Gaps between attempts: within [nominal/2, nominal] plus polling slack.
    let times = publisher.offer_times(poison.event_id());
    assert_eq!(times.len(), 3, "exactly max_attempts attempts");
    for (k, nominal_ms) in [(1usize, 200u64), (2, 400)] {
        let gap = times[k] - times[k - 1];
        let nominal = Duration::from_millis(nominal_ms);
        assert!(
            gap >= nominal / 2 && gap <= nominal + Duration::from_millis(400),
            "gap {k} was {gap:?}, nominal {nominal:?}"
        );
    }

    // A dead head no longer blocks its aggregate.
    wait_until(LIMIT, "successor of the dead event delivered", || async {
        publisher.offered(after_poison.event_id()) == 1
    })
    .await;
    let report = relay.stop().await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(db.count("status = 'pending'").await, 0);
    db.drop().await;
}

#[tokio::test]
async fn broker_outage_burns_no_attempts_and_loses_nothing() {
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    publisher.set_unavailable(true);
    let relay = spawn_relay(&db, publisher.clone(), fast_config());

    let mut expected: HashMap<String, Vec<EventId>> = HashMap::new();
    for i in 0..60u32 {
        let agg = format!("a{}", i % 6);
        let e = event(&agg, i);
        expected.entry(agg).or_default().push(e.event_id());
        db.write(&format!("o-{i}"), &[e]).await;
    }
    // Let the relay probe the dead broker for a while.
    wait_until(LIMIT, "several probes", || async {
        publisher.probes() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        publisher.calls() <= 2,
        "a paused relay probes instead of sending batch after batch: {} publishes",
        publisher.calls()
    );
    assert_eq!(db.count("status = 'pending'").await, 60);
    assert_eq!(
        db.count("attempts > 0 OR retry_at IS NOT NULL").await,
        0,
        "an outage must not count as attempts"
    );
    assert_eq!(publisher.delivered_count(), 0);

    publisher.set_unavailable(false);
    wait_until(LIMIT, "backlog drained after the outage", || async {
        db.count("true").await == 0
    })
    .await;
    let report = relay.stop().await;
    assert!(report.outage_pauses >= 5);
    assert_eq!(report.rejected_attempts, 0);
    assert_eq!(report.dead_lettered, 0);
    assert_order_per_aggregate(&publisher.delivered(), &expected);
    db.drop().await;
}

#[tokio::test]
async fn a_killed_relays_claims_are_recovered_by_another_after_its_lease() {
    let db = TestDb::new().await;
    let mut expected: HashMap<String, Vec<EventId>> = HashMap::new();
    let mut events = Vec::new();
    for i in 0..200u32 {
        let agg = format!("a{}", i % 10);
        let e = event(&agg, i);
        expected.entry(agg).or_default().push(e.event_id());
        events.push(e);
    }
    db.write("o-1", &events).await;

    let slow = TestPublisher::new();
    slow.set_delay(Duration::from_secs(60));
    let doomed = spawn_relay(&db, slow.clone(), fast_config());
    wait_until(LIMIT, "first relay holds every partition", || async {
        let owned: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE owner IS NOT NULL",
            db.table("event_outbox_partition")
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        owned == 64
    })
    .await;
    // It claims a batch and hangs in publish (the delay), i.e. dies mid-batch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.kill();
    let killed_at = Instant::now();

    let publisher = TestPublisher::new();
    let survivor = spawn_relay(&db, publisher.clone(), fast_config());
    wait_until(LIMIT, "survivor delivered everything", || async {
        db.count("true").await == 0
    })
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_secs(1),
        "partitions moved before the dead relay's lease could expire"
    );
    survivor.stop().await;
    assert_eq!(slow.delivered_count(), 0);
    assert_order_per_aggregate(&publisher.delivered(), &expected);
    db.drop().await;
}

#[tokio::test]
async fn a_relay_frozen_past_its_lease_cannot_complete_or_fail_taken_over_events() {
    let db = TestDb::new().await;
    let store = db.store();
    let e = event("x", 1);
    db.write("o-1", std::slice::from_ref(&e)).await;
    let lease = Duration::from_secs(1);

    let stale = RelayId::new();
    let held = store.acquire_partitions(stale, 64, lease).await.unwrap();
    assert_eq!(held.len(), 64);
    let batch = store.claim(&held, 10).await.unwrap();
    assert_eq!(batch.len(), 1);
    let stale_fenced = Fenced {
        seq: batch[0].seq,
        lease: *held
            .iter()
            .find(|l| l.partition == batch[0].partition)
            .unwrap(),
    };

    // The stale relay freezes; its lease runs out; another takes the partition over.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let fresh = RelayId::new();
    let taken = store.acquire_partitions(fresh, 64, lease).await.unwrap();
    assert_eq!(taken.len(), 64);
    let new_lease = *taken
        .iter()
        .find(|l| l.partition == batch[0].partition)
        .unwrap();
    assert!(new_lease.fence > stale_fenced.lease.fence);

    // The stale relay wakes up: nothing it does sticks.
    assert_eq!(
        store.complete(stale, &[stale_fenced], false).await.unwrap(),
        0
    );
    let failure = outbox_core::FailedAttempt {
        event: stale_fenced,
        attempts: 5,
        error: "stale".into(),
        next: outbox_core::AfterFailure::Dead,
    };
    assert_eq!(store.record_failures(stale, &[failure]).await.unwrap(), 0);
    assert_eq!(store.renew_leases(stale, lease).await.unwrap(), vec![]);
    assert_eq!(db.count("status = 'pending' AND attempts = 0").await, 1);

    // The new holder completes it.
    let batch = store.claim(&taken, 10).await.unwrap();
    assert_eq!(batch[0].event_id, e.event_id());
    let fenced = Fenced {
        seq: batch[0].seq,
        lease: new_lease,
    };
    assert_eq!(store.complete(fresh, &[fenced], false).await.unwrap(), 1);
    assert_eq!(db.count("true").await, 0);
    db.drop().await;
}

/// The race the lease lock closes: a stale relay's fenced statement whose snapshot predates a
/// take-over. A trigger holds the stale relay's "dead" update in flight while another relay
/// takes the partition over (its lease expired) and claims. Without the share lock on the
/// lease, the new owner claimed the still-pending event and the stale update then marked it
/// dead under it; with it, the take-over waits (it skips the locked partition) and never
/// sees the event pending.
#[tokio::test]
async fn a_stale_relays_statement_in_flight_cannot_mark_dead_what_a_new_owner_claimed() {
    let db = TestDb::new().await;
    let store = db.store();
    let e = event("race", 1);
    db.write("o-1", std::slice::from_ref(&e)).await;
    let lease = Duration::from_millis(300);
    let stale = RelayId::new();
    let held = store.acquire_partitions(stale, 64, lease).await.unwrap();
    let batch = store.claim(&held, 10).await.unwrap();
    let stale_fenced = Fenced {
        seq: batch[0].seq,
        lease: *held
            .iter()
            .find(|l| l.partition == batch[0].partition)
            .unwrap(),
    };
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {schema}.slow_dead() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.status = 'dead' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;
         CREATE TRIGGER slow_dead BEFORE UPDATE ON {table}
             FOR EACH ROW EXECUTE FUNCTION {schema}.slow_dead();",
        schema = format!("\"{}\"", db.schema.name()),
        table = db.table("event_outbox"),
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let failing = {
        let store = store.clone();
        let failure = outbox_core::FailedAttempt {
            event: stale_fenced,
            attempts: 5,
            error: "stale".into(),
            next: outbox_core::AfterFailure::Dead,
        };
        tokio::spawn(async move { store.record_failures(stale, &[failure]).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = RelayId::new();
    let taken = store
        .acquire_partitions(fresh, 64, Duration::from_secs(30))
        .await
        .unwrap();
    let claimed = store.claim(&taken, 10).await.unwrap();
    let marked = failing.await.unwrap().unwrap();
    let dead = db.count("status = 'dead'").await == 1;
    let claimed_by_new_owner = claimed.iter().any(|m| m.event_id == e.event_id());
    assert!(
        !(dead && claimed_by_new_owner),
        "the new owner claimed an event that the stale relay then marked dead"
    );
    assert_eq!(
        marked, 1,
        "the stale relay still held the lease when it locked it"
    );
    assert!(!claimed_by_new_owner && dead);
    db.drop().await;
}

#[tokio::test]
async fn relays_share_partitions_fairly_and_release_them_on_shutdown() {
    let db = TestDb::new().await;
    let owners = || async {
        let rows: Vec<(Option<uuid::Uuid>, i64)> = sqlx::query_as(&format!(
            "SELECT owner, count(*) FROM {} GROUP BY owner ORDER BY 2 DESC",
            db.table("event_outbox_partition")
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        rows
    };
    let a = spawn_relay(&db, TestPublisher::new(), fast_config());
    let b = spawn_relay(&db, TestPublisher::new(), fast_config());
    wait_until(LIMIT, "two relays with 32 partitions each", || async {
        let o = owners().await;
        o.len() == 2 && o.iter().all(|(owner, n)| owner.is_some() && *n == 32)
    })
    .await;
    a.stop().await;
    let after_stop = owners().await;
    assert!(
        after_stop
            .iter()
            .any(|(owner, n)| owner.is_none() && *n == 32),
        "graceful shutdown releases partitions at once: {after_stop:?}"
    );
    wait_until(LIMIT, "the remaining relay takes all 64", || async {
        let o = owners().await;
        o.len() == 1 && o[0].0.is_some() && o[0].1 == 64
    })
    .await;
    b.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn writers_of_one_aggregate_commit_in_sequence_order() {
    let db = Arc::new(TestDb::new().await);
    let outbox = db.outbox();
    let mut first = db.pool.begin().await.unwrap();
    let EnqueueOutcome::Inserted { seq: first_seq } =
        outbox.enqueue(&mut first, &event("same", 1)).await.unwrap()
    else {
        panic!()
    };
    // A second writer of the same aggregate waits for the first to finish...
    let db2 = db.clone();
    let second = tokio::spawn(async move {
        let outbox = db2.outbox();
        let mut tx = db2.pool.begin().await.unwrap();
        let outcome = outbox.enqueue(&mut tx, &event("same", 2)).await.unwrap();
        tx.commit().await.unwrap();
        outcome
    });
    // ...while a writer of another aggregate does not.
    let mut other = db.pool.begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        outbox.enqueue(&mut other, &event("different", 1)),
    )
    .await
    .expect("another aggregate must not wait")
    .unwrap();
    other.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "second writer must wait for the first"
    );
    first.commit().await.unwrap();
    let EnqueueOutcome::Inserted { seq: second_seq } = second.await.unwrap() else {
        panic!()
    };
    assert!(second_seq > first_seq);
    Arc::try_unwrap(db).ok().unwrap().drop().await;
}

#[tokio::test]
async fn retention_keeps_published_events_then_sweeps_them() {
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    let config = RelayConfig {
        retention: Duration::from_secs(1),
        retention_sweep_interval: Duration::from_millis(100),
        retention_sweep_batch: 7,
        ..fast_config()
    };
    let events: Vec<_> = (0..30).map(|i| event(&format!("a{i}"), i)).collect();
    db.write("o-1", &events).await;
    let relay = spawn_relay(&db, publisher.clone(), config);
    wait_until(LIMIT, "events kept as published", || async {
        db.count("status = 'published' AND published_at IS NOT NULL")
            .await
            == 30
    })
    .await;
    let stats = db.store().stats().await.unwrap();
    assert_eq!((stats.pending, stats.published_retained), (0, 30));
    wait_until(LIMIT, "published events swept after retention", || async {
        db.count("true").await == 0
    })
    .await;
    relay.stop().await;
    assert_eq!(publisher.delivered_count(), 30);
    db.drop().await;
}

#[tokio::test]
async fn stats_are_read_from_the_table() {
    let db = TestDb::new().await;
    let events: Vec<_> = (0..5).map(|i| event("s", i)).collect();
    db.write("o-1", &events).await;
    sqlx::query(&format!(
        "UPDATE {} SET status = 'dead' WHERE event_id = $1",
        db.table("event_outbox")
    ))
    .bind(events[0].event_id().as_uuid())
    .execute(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = db.store().stats().await.unwrap();
    assert_eq!(stats.pending, 4);
    assert_eq!(stats.dead, 1);
    let age = stats.oldest_pending_age.unwrap();
    assert!(
        age >= Duration::from_millis(50) && age < Duration::from_secs(30),
        "{age:?}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_malformed_row_is_parked_dead_instead_of_stalling_its_partition() {
    let db = TestDb::new().await;
    let good = event("m", 2);
    db.write("o-1", &[event("m", 1), good.clone()]).await;
    // Someone edits a row by hand and breaks it.
    sqlx::query(&format!(
        "UPDATE {} SET topic = 'not a topic' WHERE seq = (SELECT min(seq) FROM {})",
        db.table("event_outbox"),
        db.table("event_outbox")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let publisher = TestPublisher::new();
    let relay = spawn_relay(&db, publisher.clone(), fast_config());
    wait_until(LIMIT, "the good event flows", || async {
        publisher.offered(good.event_id()) == 1
    })
    .await;
    relay.stop().await;
    let err: String = sqlx::query_scalar(&format!(
        "SELECT last_error FROM {} WHERE status = 'dead'",
        db.table("event_outbox")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(err.contains("topic"), "{err}");
    db.drop().await;
}

/// A relay whose polling is so slow (20 s) that only a wake-up can explain a prompt
/// delivery, and the signal that wakes it.
fn slowly_polling_relay(
    db: &TestDb,
    publisher: &TestPublisher,
) -> (RunningRelay, outbox_core::WakeSignal) {
    let config = RelayConfig {
        poll_min: Duration::from_secs(20),
        poll_max: Duration::from_secs(20),
        ..fast_config()
    };
    let wake = outbox_core::WakeSignal::new();
    let relay = outbox_core::Relay::new(db.store(), publisher.clone(), config)
        .with_wake_signal(wake.clone());
    (spawn(relay), wake)
}

/// Once the relay is idle, a write that nothing announces waits for the 20 s poll.
async fn assert_an_unannounced_write_waits(db: &TestDb, publisher: &TestPublisher) {
    // Straight after a batch the relay claims again and would find the write: let it idle.
    wait_until(Duration::from_secs(5), "the relay is idle", || async {
        db.store().stats().await.unwrap().pending == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let silent = event("n", 99);
    db.write("o-silent", std::slice::from_ref(&silent)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(publisher.offered(silent.event_id()), 0);
}

#[tokio::test]
async fn opt_in_listen_notify_wakes_a_relay_in_another_process_without_polling() {
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    let (running, wake) = slowly_polling_relay(&db, &publisher);
    let listener = tokio::spawn(outbox_postgres::listen_for_commits(
        db.pool.clone(),
        db.schema.clone(),
        wake,
    ));
    // Let the relay go idle on its 20 s poll.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A writer elsewhere: no shared wake signal, only NOTIFY.
    let writer = db.outbox().with_notify(true);
    for round in 0..3u32 {
        let e = event("n", round);
        let mut tx = db.pool.begin().await.unwrap();
        writer.enqueue(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        wait_until(
            Duration::from_secs(5),
            "a notified relay publishes promptly",
            || async { publisher.offered(e.event_id()) == 1 },
        )
        .await;
    }
    // Without NOTIFY the same write waits for the poll.
    assert_an_unannounced_write_waits(&db, &publisher).await;
    listener.abort();
    running.stop().await;
    db.drop().await;
}

/// The sidecar's default wake-up: with polling too slow to matter, writers that do nothing
/// special (no NOTIFY, no shared wake signal) get their events published promptly because the
/// sequence watch sees the sequence move; a writer that commits 40 ms after its insert is
/// caught by the watch's re-wakes; without the watch the same write waits for the poll.
#[tokio::test]
async fn the_sequence_watch_wakes_a_sidecar_relay_without_anything_from_writers() {
    let db = TestDb::new().await;
    let publisher = TestPublisher::new();
    let (running, wake) = slowly_polling_relay(&db, &publisher);
    let watch = tokio::spawn(outbox_postgres::watch_for_commits(
        db.pool.clone(),
        db.schema.clone(),
        wake,
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writer = db.outbox();
    for round in 0..3u32 {
        let e = event("w", round);
        let mut tx = db.pool.begin().await.unwrap();
        writer.enqueue(&mut tx, &e).await.unwrap();
        // The insert moved the sequence before the commit: a claim right away finds nothing.
        tokio::time::sleep(Duration::from_millis(40)).await;
        tx.commit().await.unwrap();
        wait_until(
            Duration::from_secs(5),
            "a watched relay publishes promptly",
            || async { publisher.offered(e.event_id()) == 1 },
        )
        .await;
    }
    // Only the watch explains the prompt deliveries.
    watch.abort();
    assert_an_unannounced_write_waits(&db, &publisher).await;
    running.stop().await;
    db.drop().await;
}

/// Past `STATS_EXACT_UP_TO` rows per state the gauges stop counting (bounded work every
/// `stats_interval` whatever the backlog) and estimate: pending from the span of the pending
/// sequence numbers, which is exact for a dense backlog; never below the cap.
#[tokio::test]
async fn stats_count_exactly_up_to_the_cap_and_estimate_a_larger_backlog() {
    let db = TestDb::new().await;
    let n = outbox_postgres::STATS_EXACT_UP_TO + 2_000;
    sqlx::query(&format!(
        "INSERT INTO {} (event_id, aggregate_type, aggregate_id, partition_no, event_type,
                         topic, message_key, payload)
         SELECT gen_random_uuid(), 'order', 'o-' || (i % 100), 0::int2, 't', 't', 'k', '\\x00'
         FROM generate_series(1, $1) AS i",
        db.table("event_outbox")
    ))
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
    let stats = db.store().stats().await.unwrap();
    assert_eq!(
        stats.pending, n as u64,
        "a dense backlog is estimated exactly"
    );
    assert!(stats.oldest_pending_age.is_some());
    // Publishing a stretch in the middle leaves a gap: the estimate is an upper bound.
    sqlx::raw_sql(&format!(
        "DELETE FROM {} WHERE seq % 2 = 0",
        db.table("event_outbox")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let pending = db.store().stats().await.unwrap().pending;
    assert_eq!(pending, (n / 2) as u64, "below the cap again: exact");
    db.drop().await;
}
