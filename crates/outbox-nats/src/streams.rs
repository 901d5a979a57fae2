//! Where a topic's messages live: subject = topic, one stream per topic.
//!
//! A topic name (`[A-Za-z0-9._-]`) is a valid subject as it is; its dots are subject tokens.
//! The stream the outbox creates for it is named after it with `.` as `_` (stream names
//! cannot hold dots) and covers exactly that subject, so a topic `a` never captures `a.b`.
//! A stream that already covers the subject, created by an operator with other limits, is
//! used as it is; two topics that map to one stream name (`a.b`, `a_b`) share that stream,
//! each under its own subject.

use std::collections::HashSet;
use std::sync::Mutex;

use async_nats::jetstream::{self, stream};

use crate::NatsConfig;

/// The header that carries the message key (NATS messages have none of their own).
pub const KEY_HEADER: &str = "Outbox-Key";

/// The name of the stream the outbox creates for `subject`.
pub fn stream_name(subject: &str) -> String {
    format!("OUTBOX_{}", subject.replace('.', "_"))
}

/// A durable consumer's name for a consumer group (names cannot hold dots either).
pub fn durable_name(group: &str) -> String {
    group.replace(['.', '*', '>', ' '], "_")
}

/// Makes sure a stream takes `subject`, once per subject and process.
#[derive(Default)]
pub struct Streams {
    known: Mutex<HashSet<String>>,
}

impl Streams {
    /// Whether `subject` is known to have a stream.
    pub fn known(&self, subject: &str) -> bool {
        self.known.lock().unwrap().contains(subject)
    }

    /// Forgets `subject` (its stream was deleted: the next publish creates it again).
    pub fn forget(&self, subject: &str) {
        self.known.lock().unwrap().remove(subject);
    }

    /// The name of the stream that takes `subject`, created (or extended) if none does.
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
        config: &NatsConfig,
        subject: &str,
    ) -> Result<String, String> {
        let name = match js.stream_by_subject(subject).await {
            Ok(existing) => existing,
            Err(_) => create_or_extend(js, config, subject).await?,
        };
        self.known.lock().unwrap().insert(subject.to_owned());
        Ok(name)
    }
}

async fn create_or_extend(
    js: &jetstream::Context,
    config: &NatsConfig,
    subject: &str,
) -> Result<String, String> {
    let name = stream_name(subject);
    let wanted = stream::Config {
        name: name.clone(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        num_replicas: config.replicas,
        ..Default::default()
    };
    let mut existing = js
        .get_or_create_stream(wanted)
        .await
        .map_err(|e| format!("creating stream {name} for {subject}: {e}"))?;
    let info = existing
        .info()
        .await
        .map_err(|e| format!("reading stream {name}: {e}"))?;
    if !info.config.subjects.iter().any(|s| s == subject) {
        let mut extended = info.config.clone();
        extended.subjects.push(subject.to_owned());
        js.update_stream(extended)
            .await
            .map_err(|e| format!("adding {subject} to stream {name}: {e}"))?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hold_no_dots() {
        assert_eq!(
            stream_name("huleedu.essay.spellcheck.completed.v1"),
            "OUTBOX_huleedu_essay_spellcheck_completed_v1"
        );
        assert_eq!(
            durable_name("essay.lifecycle group"),
            "essay_lifecycle_group"
        );
    }
}
