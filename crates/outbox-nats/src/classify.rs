//! Which JetStream publish errors are the server's problem (an outage) and which the message's.
//!
//! | error | class | relay does |
//! |---|---|---|
//! | no acknowledgement in time (`TimedOut`), connection lost (`BrokenPipe`), too many publishes awaiting acknowledgement (`MaxAckPending`), no stream for the subject (`StreamNotFound`: deleted under the publisher, which creates it again) | outage | pause and probe; no attempt counted |
//! | larger than the server's `max_payload` (refused before sending), larger than the stream's own `max_msg_size`, an invalid header | message | count an attempt; dead after the last |
//! | any other error the server answers | unclassified | the message's fault if the broker took other messages of the batch, an outage if it took none |

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use outbox_core::publisher::waves::Verdict;
use outbox_core::PublishOutcome;

/// What a publish error means for the relay.
pub fn classify(error: &PublishError) -> Verdict {
    let text = error.to_string();
    match error.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::StreamNotFound => {
            Verdict::Known(PublishOutcome::unavailable(format!("NATS: {text}")))
        }
        PublishErrorKind::MaxPayloadExceeded => Verdict::Known(PublishOutcome::rejected(format!(
            "message too large for the NATS server: {text}"
        ))),
        _ if text.contains("exceeds maximum") => Verdict::Known(PublishOutcome::rejected(format!(
            "message too large for its stream: {text}"
        ))),
        _ => Verdict::Unclassified(format!("NATS: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is(error: PublishErrorKind) -> Verdict {
        classify(&PublishError::new(error))
    }

    #[test]
    fn server_trouble_is_an_outage_and_size_is_the_message() {
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::StreamNotFound,
        ] {
            assert!(
                matches!(is(kind), Verdict::Known(PublishOutcome::Unavailable { .. })),
                "{kind:?}"
            );
        }
        match is(PublishErrorKind::MaxPayloadExceeded) {
            Verdict::Known(PublishOutcome::Rejected { reason }) => {
                assert!(reason.contains("large"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            is(PublishErrorKind::Other),
            Verdict::Unclassified(_)
        ));
    }
}
