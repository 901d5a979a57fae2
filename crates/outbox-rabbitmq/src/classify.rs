//! Which RabbitMQ errors are the broker's problem (an outage) and which the message's.
//!
//! | error | class | relay does |
//! |---|---|---|
//! | connection lost, missed heartbeats, channel or connection closed, no confirm in time, no queue bound to the topic yet (the message came back) | outage | pause and probe (or defer the aggregate when the broker took the rest); no attempt counted |
//! | larger than `max_message_size` (refused before sending), a header AMQP cannot carry | message | count an attempt (or dead at once for a header); dead after the last |
//! | a negative confirm (nack), any other protocol error | unclassified | the message's fault if the broker took other messages of the batch, an outage if it took none |

use lapin::ErrorKind;
use outbox_core::publisher::waves::Verdict;
use outbox_core::PublishOutcome;

/// What an AMQP error while publishing means for the relay.
pub fn classify(error: &lapin::Error) -> Verdict {
    match error.kind() {
        ErrorKind::ProtocolError(e) if !is_connection_trouble(e) => {
            Verdict::Unclassified(format!("RabbitMQ: {error}"))
        }
        _ => Verdict::Known(PublishOutcome::unavailable(format!("RabbitMQ: {error}"))),
    }
}

/// Whether a protocol error means the connection or channel is gone rather than that the
/// broker judged the message.
fn is_connection_trouble(e: &lapin::protocol::AMQPError) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    matches!(
        e.kind(),
        AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
            | AMQPErrorKind::Hard(AMQPHardError::CHANNELERROR)
            | AMQPErrorKind::Hard(AMQPHardError::RESOURCEERROR)
            | AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_an_outage() {
        let lost = lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        assert!(matches!(
            classify(&lost),
            Verdict::Known(PublishOutcome::Unavailable { .. })
        ));
    }
}
