//! Essay text travels by reference: a batch of 500 essays of about 5,000 words completes on
//! the embedded default and on PostgreSQL + Kafka, and no message of the run exceeds 256 KB
//! (inline, the CJ request alone would carry ~15 MB).

mod common;

use std::time::Duration;

use common::*;
use essay_common::runtime::DataLocation;
use essay_platform::demo::{self, DemoOptions};
use essay_platform::{Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;
use outbox_kafka::testing::TestBroker;
use outbox_kafka::KafkaConfig;

const ESSAYS: usize = 500;
const WORDS: usize = 5_000;
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Writes `ESSAYS` essays of about `WORDS` words, built from the sample essays' vocabulary:
/// essay `i` draws on a wider vocabulary and has fewer misspellings the higher `i` is.
fn write_essays(dir: &std::path::Path) -> usize {
    let mut vocabulary: Vec<String> = Vec::new();
    for (_, bytes) in demo::read_essays(&demo::default_essays_dir()).unwrap() {
        for w in String::from_utf8_lossy(&bytes).split_whitespace() {
            let w: String = w.chars().filter(|c| c.is_ascii_alphabetic()).collect();
            if w.len() > 2 && w.chars().all(|c| c.is_ascii_lowercase()) && !vocabulary.contains(&w)
            {
                vocabulary.push(w);
            }
        }
    }
    // Only words the dictionary knows: the misspellings are the generator's, counted.
    let speller = spellchecker::Speller::load(&spellchecker::dictionary_dir()).unwrap();
    vocabulary.retain(|w| speller.check(w).corrections.is_empty());
    assert!(vocabulary.len() > 300, "{} words", vocabulary.len());
    std::fs::create_dir_all(dir).unwrap();
    let mut total = 0;
    for i in 0..ESSAYS {
        let mut rng = fastrand::Rng::with_seed(i as u64);
        let span = 100 + i * (vocabulary.len() - 100) / ESSAYS;
        let mut text = String::with_capacity(WORDS * 7);
        let words = WORDS - 250 + rng.usize(0..500);
        let mut in_sentence = 0;
        for n in 0..words {
            let mut w = vocabulary[rng.usize(0..span)].clone();
            if n % 1000 == 7 && i % 5 > n / 1000 {
                w.remove(1); // a misspelling
            }
            if in_sentence == 0 {
                w[..1].make_ascii_uppercase();
            }
            text.push_str(&w);
            in_sentence += 1;
            if in_sentence >= 8 + rng.usize(0..12) {
                text.push_str(". ");
                in_sentence = 0;
            } else {
                text.push(' ');
            }
        }
        text.push('.');
        total += words;
        std::fs::write(dir.join(format!("essay-{i:03}.txt")), text).unwrap();
    }
    total
}

async fn large_batch(location: DataLocation, broker: Broker, tag: &str) {
    let essays_dir = temp_dir(&format!("large-essays-{tag}"));
    let words = write_essays(&essays_dir);
    assert!(words / ESSAYS > 4_700, "about 5,000 words each");
    let platform = Platform::start(&location, broker.clone(), &Options::default())
        .await
        .expect("platform starts");
    let api = platform.gateway();
    let options = DemoOptions {
        essays_dir: essays_dir.clone(),
        with_class: false,
        verbose: std::env::var_os("LARGE_BATCH_VERBOSE").is_some(),
        timeout: Duration::from_secs(600),
    };
    let report = demo::run(&api, &options)
        .await
        .expect("the batch completes");
    println!(
        "{ESSAYS} essays of ~{WORDS} words: {:.1?} ({tag})",
        report.elapsed
    );
    let r = &report.results;
    assert_eq!(r["status"], "COMPLETED", "{}", r["phases"]);
    let ranked = r["essays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["rank"].is_null())
        .count();
    assert_eq!(ranked, ESSAYS);
    assert!(report.failed_validation.is_empty());

    // Wait for the last events to leave the outboxes, then measure every message.
    drain_outboxes(&platform, Duration::from_secs(60)).await;
    let messages = broker_messages(&broker, platform.published() as usize).await;
    let largest = messages
        .iter()
        .max_by_key(|m| m.payload.len())
        .expect("messages");
    println!(
        "{} messages; the largest: {} bytes on {}",
        messages.len(),
        largest.payload.len(),
        largest.topic
    );
    assert!(
        largest.payload.len() <= MAX_MESSAGE_BYTES,
        "{} is {} bytes",
        largest.topic,
        largest.payload.len()
    );
    // Every stored text was named by an event of the run: nothing provisional is left.
    let (stored, provisional) = platform.content.counts().await.unwrap();
    assert_eq!(provisional, 0, "of {stored}");
    assert_eq!(
        stored as usize,
        3 * ESSAYS,
        "raw file, text and corrected text per essay"
    );
    platform.stop().await;
    drop_schemas(&location).await;
    let _ = std::fs::remove_dir_all(essays_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_default_500_essays_of_5000_words() {
    let dir = temp_dir("large-embedded");
    large_batch(
        DataLocation::SqliteDir(dir.clone()),
        Broker::Memory(Bus::default()),
        "embedded",
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_kafka_500_essays_of_5000_words() {
    let broker = TestBroker::start();
    let kafka = Broker::Kafka(KafkaConfig::new(broker.bootstrap()));
    large_batch(pg_location("large"), kafka, "postgres+kafka").await;
}
