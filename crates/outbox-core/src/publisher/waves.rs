//! Order per aggregate for brokers that acknowledge each message on its own.
//!
//! Kafka's idempotent producer keeps a partition's messages in send order even across retries,
//! so a whole batch can be in flight at once. JetStream and RabbitMQ acknowledge (or refuse)
//! every message separately: with two messages of one aggregate in flight, the first can be
//! refused or time out while the second is stored, and the broker holds them out of order.
//!
//! [`publish_in_waves`] sends a batch so that cannot happen: wave `k` holds the `k`-th message
//! of every aggregate in the batch whose earlier messages were all acknowledged, sent together
//! (pipelined); the next wave starts when every acknowledgement of this one is in. A batch of
//! many aggregates costs one or two round trips; one aggregate's backlog costs one per message.

use std::collections::HashMap;
use std::future::Future;

use crate::event::{AggregateRef, OutboxMessage};
use crate::publisher::PublishOutcome;

/// What a broker adapter could tell about one message of a wave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Known(PublishOutcome),
    /// An error the adapter cannot classify: the message's fault if the broker took other
    /// messages of the batch, the broker's if it took none (a systemic failure must not
    /// dead-letter everything).
    Unclassified(String),
}

impl Verdict {
    /// The outcome, once it is known whether the broker took any message of the batch.
    pub fn into_outcome(self, batch_delivered_any: bool) -> PublishOutcome {
        match self {
            Self::Known(o) => o,
            Self::Unclassified(reason) if batch_delivered_any => {
                PublishOutcome::Rejected { reason }
            }
            Self::Unclassified(reason) => PublishOutcome::Unavailable { reason },
        }
    }
}

impl From<PublishOutcome> for Verdict {
    fn from(o: PublishOutcome) -> Self {
        Self::Known(o)
    }
}

/// Publishes `batch` in waves (see the module docs). `send` gets the indexes (into `batch`) of
/// one wave, in batch order, and returns one verdict per index, in the same order. A message
/// behind an undelivered one of its aggregate is [`PublishOutcome::Skipped`], never sent.
pub async fn publish_in_waves<F, Fut>(batch: &[OutboxMessage], mut send: F) -> Vec<PublishOutcome>
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Vec<Verdict>>,
{
    // Each aggregate's messages, in batch order.
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut lane_of: HashMap<&AggregateRef, usize> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        let lane = *lane_of.entry(&m.aggregate).or_insert_with(|| {
            lanes.push(Vec::new());
            lanes.len() - 1
        });
        lanes[lane].push(i);
    }
    let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
    let mut open: Vec<bool> = vec![true; lanes.len()];
    let mut delivered = 0usize;
    for depth in 0.. {
        let mut wave: Vec<(usize, usize)> = lanes
            .iter()
            .enumerate()
            .filter(|(lane, _)| open[*lane])
            .filter_map(|(lane, members)| members.get(depth).map(|&i| (i, lane)))
            .collect();
        if wave.is_empty() {
            break;
        }
        wave.sort_unstable();
        let indexes: Vec<usize> = wave.iter().map(|(i, _)| *i).collect();
        let answers = send(indexes).await;
        debug_assert_eq!(
            answers.len(),
            wave.len(),
            "one verdict per message of the wave"
        );
        let mut answers = answers.into_iter();
        for (i, lane) in wave {
            let verdict = answers
                .next()
                .unwrap_or_else(|| Verdict::Known(PublishOutcome::unavailable("no answer")));
            if verdict == Verdict::Known(PublishOutcome::Delivered) {
                delivered += 1;
            } else {
                open[lane] = false;
            }
            verdicts[i] = Some(verdict);
        }
    }
    verdicts
        .into_iter()
        .map(|v| match v {
            Some(v) => v.into_outcome(delivered > 0),
            // Behind an undelivered message of its aggregate: never offered.
            None => PublishOutcome::Skipped,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, Topic};
    use std::sync::Mutex;

    fn batch(aggregates: &[&str]) -> Vec<OutboxMessage> {
        aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let aggregate = AggregateRef::new("k", *a).unwrap();
                OutboxMessage {
                    seq: i as i64,
                    event_id: EventId::new(),
                    partition: aggregate.partition(),
                    aggregate,
                    event_type: "t".into(),
                    topic: Topic::new("t").unwrap(),
                    key: a.to_string(),
                    headers: Default::default(),
                    payload: Default::default(),
                    attempts: 0,
                    age_at_claim: std::time::Duration::ZERO,
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn each_wave_takes_the_next_message_of_every_open_aggregate() {
        let b = batch(&["a", "a", "b", "a", "c", "b"]);
        let waves = Mutex::new(Vec::new());
        let out = publish_in_waves(&b, |wave| {
            waves.lock().unwrap().push(wave.clone());
            async move { vec![Verdict::Known(PublishOutcome::Delivered); wave.len()] }
        })
        .await;
        assert_eq!(out, vec![PublishOutcome::Delivered; 6]);
        assert_eq!(
            waves.into_inner().unwrap(),
            vec![vec![0, 2, 4], vec![1, 5], vec![3]]
        );
    }

    #[tokio::test]
    async fn a_failure_closes_its_aggregate_and_unclassified_errors_follow_the_batch() {
        let b = batch(&["a", "a", "b", "b", "c"]);
        let out = publish_in_waves(&b, |wave| async move {
            wave.iter()
                .map(|&i| match i {
                    0 => Verdict::Known(PublishOutcome::rejected("too large")),
                    3 => Verdict::Unclassified("odd".into()),
                    _ => Verdict::Known(PublishOutcome::Delivered),
                })
                .collect()
        })
        .await;
        assert_eq!(
            out,
            vec![
                PublishOutcome::rejected("too large"),
                PublishOutcome::Skipped,
                PublishOutcome::Delivered,
                // Others were delivered: the message's fault.
                PublishOutcome::rejected("odd"),
                PublishOutcome::Delivered,
            ]
        );
        let all_odd = publish_in_waves(&b, |wave| async move {
            vec![Verdict::Unclassified("odd".into()); wave.len()]
        })
        .await;
        assert_eq!(all_odd[0], PublishOutcome::unavailable("odd"));
        assert_eq!(all_odd[1], PublishOutcome::Skipped);
    }
}
