//! Operator actions on every store: list, show, requeue, purge dead letters, and replay.

use std::time::Duration;

use outbox_conformance::stores::{MySqlStore, PgStore, SqliteStore};
use outbox_conformance::{init_logs, wait_for, Store};
use outbox_core::testing::TestPublisher;
use outbox_core::{AggregateRef, EventFilter, NewEvent, Relay, RelayConfig, RetryPolicy, Topic};

const LIMIT: Duration = Duration::from_secs(30);

async fn operator_can_see_and_fix_a_stuck_outbox(store: Box<dyn Store>) {
    init_logs();
    let topic = Topic::new(format!("admin.{}", uuid::Uuid::new_v4().simple())).unwrap();
    let ev = |agg: &str, body: &str| {
        NewEvent::new(
            topic.clone(),
            AggregateRef::new("agg", agg).unwrap(),
            body.to_owned(),
        )
    };
    let stuck = ev("a", "\"first\"");
    let behind = ev("a", "\"second\"");
    let fine = ev("b", "\"other\"");
    let publisher = TestPublisher::new();
    publisher.reject_always(stuck.event_id());
    store
        .commit(&[stuck.clone(), behind.clone(), fine.clone()])
        .await;

    let config = RelayConfig {
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(50),
        retry: RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(50),
            max_attempts: 2,
        },
        retention: Duration::from_secs(3600),
        ..RelayConfig::default()
    };
    let relay = Relay::new(store.relay_store(), publisher.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let admin = store.admin();
    let by_topic = EventFilter {
        topic: Some(topic.to_string()),
        ..Default::default()
    };
    wait_for(LIMIT, "the stuck event is dead", || async {
        admin.dead(&by_topic, 10).await.unwrap().len() == 1
    })
    .await;

    let dead = admin.dead(&by_topic, 10).await.unwrap();
    assert_eq!(dead[0].event_id, stuck.event_id());
    assert_eq!(dead[0].attempts, 2);
    assert!(dead[0].last_error.as_deref().unwrap().contains("rejects"));
    let loud = EventFilter {
        error_contains: Some("REJECTS".into()),
        ..Default::default()
    };
    assert_eq!(
        admin.dead(&loud, 10).await.unwrap().len(),
        1,
        "error filter is case-insensitive"
    );
    let wildcard = EventFilter {
        error_contains: Some("%".into()),
        ..Default::default()
    };
    assert_eq!(
        admin.dead(&wildcard, 10).await.unwrap().len(),
        0,
        "no pattern injection"
    );
    let other = EventFilter {
        aggregate_id: Some("zzz".into()),
        ..Default::default()
    };
    assert!(admin.dead(&other, 10).await.unwrap().is_empty());

    // A dead head no longer holds back its aggregate: its successor goes out (the relay may
    // still be publishing it when the head turns dead).
    wait_for(
        LIMIT,
        "the successor of the dead event is published",
        || async {
            let status = admin.topic_status().await.unwrap();
            status
                .iter()
                .any(|s| s.topic == topic.as_str() && s.pending == 0)
        },
    )
    .await;
    let status = admin.topic_status().await.unwrap();
    let mine = status.iter().find(|s| s.topic == topic.as_str()).unwrap();
    assert_eq!(
        (mine.pending, mine.dead, mine.published_retained),
        (0, 1, 2),
        "{mine:?}"
    );
    let shown = admin.event(stuck.event_id()).await.unwrap().unwrap();
    assert_eq!(
        (shown.status.as_str(), &shown.payload[..]),
        ("dead", &stuck.payload()[..])
    );

    // The cause is fixed; the requeued event goes out with its original event_id and bytes.
    publisher.accept(stuck.event_id());
    assert_eq!(admin.requeue_dead(&by_topic).await.unwrap(), 1);
    wait_for(LIMIT, "requeued event published", || async {
        publisher.offered(stuck.event_id()) == 3
    })
    .await;
    // Delivered is not yet completed: the relay marks it published just after the ack, and
    // the replay below counts published events.
    wait_for(LIMIT, "requeued event marked published", || async {
        admin
            .event(stuck.event_id())
            .await
            .unwrap()
            .is_some_and(|e| e.status == "published")
    })
    .await;
    let sent = publisher.delivered();
    let again = sent
        .iter()
        .find(|m| m.event_id == stuck.event_id())
        .unwrap();
    assert_eq!(&again.payload[..], &stuck.payload()[..]);
    assert_eq!(admin.dead(&by_topic, 10).await.unwrap().len(), 0);

    // Replay aggregate "a" from the retained published events.
    let hour = Duration::from_secs(3600);
    assert_eq!(
        admin
            .replay(topic.as_str(), hour, Some("a"), true)
            .await
            .unwrap(),
        2,
        "dry run counts"
    );
    assert_eq!(
        publisher.offered(stuck.event_id()),
        3,
        "dry run changes nothing"
    );
    assert_eq!(
        admin
            .replay(topic.as_str(), hour, Some("a"), false)
            .await
            .unwrap(),
        2
    );
    wait_for(LIMIT, "replayed", || async {
        publisher.offered(behind.event_id()) == 2
    })
    .await;
    let replayed = admin.event(stuck.event_id()).await.unwrap().unwrap();
    assert_eq!(
        replayed.event_id,
        stuck.event_id(),
        "same event_id on replay"
    );

    // Purge with filters.
    let doomed = ev("c", "\"doomed\"");
    publisher.reject_always(doomed.event_id());
    store.commit(std::slice::from_ref(&doomed)).await;
    wait_for(LIMIT, "second dead event", || async {
        admin.dead(&by_topic, 10).await.unwrap().len() == 1
    })
    .await;
    let nomatch = EventFilter {
        topic: Some(topic.to_string()),
        error_contains: Some("nomatch".into()),
        ..Default::default()
    };
    assert_eq!(admin.purge_dead(&nomatch).await.unwrap(), 0);
    let just_it = EventFilter {
        event_id: Some(doomed.event_id()),
        ..Default::default()
    };
    assert_eq!(admin.purge_dead(&just_it).await.unwrap(), 1);
    assert!(admin.event(doomed.event_id()).await.unwrap().is_none());

    let _ = stop.send(());
    running.await.unwrap();
    store.cleanup().await;
}

#[tokio::test]
async fn postgres_admin() {
    operator_can_see_and_fix_a_stuck_outbox(PgStore::boxed().await).await;
}

#[tokio::test]
async fn sqlite_admin() {
    operator_can_see_and_fix_a_stuck_outbox(SqliteStore::boxed().await).await;
}

#[tokio::test]
async fn mysql_admin() {
    operator_can_see_and_fix_a_stuck_outbox(MySqlStore::boxed().await).await;
}

/// `status` shows what live relays are doing: events in flight while a publish is under way
/// (here: the broker is down, so the batch stays in flight) and events published in the last
/// minute, per topic and in total.
async fn status_shows_in_flight_and_the_last_minute(store: Box<dyn Store>) {
    init_logs();
    let topic = Topic::new(format!("activity.{}", uuid::Uuid::new_v4().simple())).unwrap();
    let events: Vec<NewEvent> = (0..30)
        .map(|i| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("agg", format!("a{}", i % 5)).unwrap(),
                "{}",
            )
        })
        .collect();
    let publisher = TestPublisher::new();
    publisher.set_delay(Duration::from_millis(300));
    store.commit(&events[..10]).await;
    let config = RelayConfig {
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(50),
        stats_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = Relay::new(store.relay_store(), publisher.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let relay_store = store.relay_store();
    let admin = store.admin();
    wait_for(LIMIT, "10 events published in the last minute", || async {
        relay_store.stats().await.unwrap().published_last_minute == 10
    })
    .await;
    publisher.set_unavailable(true);
    store.commit(&events[10..]).await;
    wait_for(
        LIMIT,
        "20 events in flight while the broker is down",
        || async { relay_store.stats().await.unwrap().in_flight == 20 },
    )
    .await;
    let t = admin.topic_status().await.unwrap();
    let mine = t
        .iter()
        .find(|s| s.topic == topic.as_str())
        .expect("topic listed");
    assert_eq!(
        (mine.pending, mine.in_flight, mine.published_last_minute),
        (20, 20, 10)
    );
    publisher.set_unavailable(false);
    wait_for(LIMIT, "all 30 published, none in flight", || async {
        let s = relay_store.stats().await.unwrap();
        s.published_last_minute == 30 && s.in_flight == 0 && s.pending == 0
    })
    .await;
    let t = admin.topic_status().await.unwrap();
    let mine = t
        .iter()
        .find(|s| s.topic == topic.as_str())
        .expect("still listed by its rate");
    assert_eq!((mine.pending, mine.published_last_minute), (0, 30));
    let _ = stop.send(());
    running.await.unwrap();
    store.cleanup().await;
}

#[tokio::test]
async fn postgres_status_activity() {
    status_shows_in_flight_and_the_last_minute(PgStore::boxed().await).await;
}

#[tokio::test]
async fn sqlite_status_activity() {
    status_shows_in_flight_and_the_last_minute(SqliteStore::boxed().await).await;
}

#[tokio::test]
async fn mysql_status_activity() {
    status_shows_in_flight_and_the_last_minute(MySqlStore::boxed().await).await;
}
