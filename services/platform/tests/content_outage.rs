//! The Content Service stops for 20 s in the middle of a batch: every service that needs a
//! text waits for it without using up the message's attempts, and once it is back the batch
//! completes with nothing dead-lettered and every effect applied once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_common::runtime::DataLocation;
use essay_platform::demo;
use essay_platform::{Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_service_down_for_20s_mid_batch() {
    let dir = temp_dir("content-outage");
    let broker = Broker::Memory(Bus::default());
    let mut platform = Platform::start(
        &DataLocation::SqliteDir(dir.clone()),
        broker.clone(),
        &Options::default(),
    )
    .await
    .expect("platform starts");
    let api = platform.gateway();
    let run = tokio::spawn(async move { demo::run(&api, &quiet(true)).await });

    // Stop it as soon as the upload is committed: every text is stored, none is read yet.
    wait_for_files(&platform, TOTAL).await;
    platform.stop_content_service().await;
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        !run.is_finished(),
        "no spellcheck or judgement can happen without the texts"
    );
    let metrics = platform.obs.encode();
    assert!(
        counter_total(&metrics, "inbox_unavailable_total") > 0.0,
        "consumers saw the outage as an outage:\n{metrics}"
    );
    platform
        .restart_content_service()
        .await
        .expect("restarts on its address");
    let report = run
        .await
        .unwrap()
        .expect("the batch completes after the Content Service returns");
    println!(
        "completed {:.1?} after the outage began",
        stopped_at.elapsed()
    );
    check_results(&report);
    assert_effects_once(&platform.databases(), &report.batch_id, true).await;
    assert_eq!(
        platform.dead_events().await.unwrap(),
        0,
        "an outage must not dead-letter anything"
    );
    let Broker::Memory(bus) = &broker else {
        unreachable!("the embedded default")
    };
    for topic in essay_common::topics::ALL {
        let parked = bus.messages(&outbox::consume::dead_letter_topic(topic));
        assert!(
            parked.is_empty(),
            "{} messages of {topic} dead-lettered",
            parked.len()
        );
    }
    let published = platform.published() as usize;
    let messages = broker_messages(&broker, published).await;
    assert_events_once(&messages, &report.batch_id, true);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
