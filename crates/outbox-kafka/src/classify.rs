//! Which Kafka errors are the broker's problem (an outage) and which are the message's.
//!
//! | class | librdkafka codes | relay does |
//! |---|---|---|
//! | outage | `MessageTimedOut`, `BrokerTransportFailure`, `AllBrokersDown`, `Resolve`, `Transport`-level (`NetworkException`, `RequestTimedOut`, `OperationTimedOut`, `TimedOutQueue`), leadership moves (`LeaderNotAvailable`, `NotLeaderForPartition`, `BrokerNotAvailable`, `ReplicaNotAvailable`, `NotEnoughReplicas`, `NotEnoughReplicasAfterAppend`, `KafkaStorageError`), local back-pressure (`QueueFull`), producer-id churn (`UnknownProducerId`, `OutOfOrderSequenceNumber`, `InvalidProducerEpoch`, `Fenced`, and a producer gone `Fatal`, which the publisher rebuilds), purge on shutdown (`PurgeQueue`, `PurgeInflight`) | pause and probe; no attempt counted. When the broker took other messages of the batch (or answers the probe), only the affected aggregates wait (deferred, see `RelayConfig::defer_min`) |
//! | message | `MessageSizeTooLarge`, `InvalidMessageSize`, `MessageBatchTooLarge`, `InvalidMessage`, `InvalidRecord`, `InvalidTopic`, `UnknownTopic`, `UnknownTopicOrPartition`, `UnknownPartition`, `TopicAuthorizationFailed`, `ClusterAuthorizationFailed`, `PolicyViolation`, `InvalidRequiredAcks`, `KeySerialization`, `ValueSerialization` | count an attempt; dead after the last |
//! | anything else | | a message error if other messages of the same batch were delivered, an outage if none was (a systemic failure must not dead-letter everything) |

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What an error means for the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    Outage,
    Message,
    Unknown,
}

pub fn classify_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode::*;
    match code {
        MessageTimedOut
        | BrokerTransportFailure
        | AllBrokersDown
        | Resolve
        | NetworkException
        | RequestTimedOut
        | OperationTimedOut
        | TimedOutQueue
        | LeaderNotAvailable
        | NotLeaderForPartition
        | BrokerNotAvailable
        | ReplicaNotAvailable
        | NotEnoughReplicas
        | NotEnoughReplicasAfterAppend
        | KafkaStorageError
        | QueueFull
        | UnknownProducerId
        | BrokerDestroy
        | OutOfOrderSequenceNumber
        | InvalidProducerEpoch
        | Fenced
        | PurgeQueue
        | PurgeInflight
        | Fatal
        | CoordinatorNotAvailable
        | NotCoordinator => ErrorClass::Outage,
        MessageSizeTooLarge
        | InvalidMessageSize
        | MessageBatchTooLarge
        | InvalidMessage
        | InvalidRecord
        | InvalidTopic
        | UnknownTopic
        | UnknownTopicOrPartition
        | UnknownPartition
        | TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | PolicyViolation
        | InvalidRequiredAcks
        | KeySerialization
        | ValueSerialization
        | BadMessage => ErrorClass::Message,
        _ => ErrorClass::Unknown,
    }
}

pub fn classify(error: &KafkaError) -> ErrorClass {
    match error.rdkafka_error_code() {
        Some(code) => classify_code(code),
        // Errors without a code come from the client itself (e.g. a cancelled delivery).
        None => ErrorClass::Outage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_trouble_is_an_outage_and_bad_messages_are_not() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::UnknownProducerId,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Outage, "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Message, "{code:?}");
        }
        assert_eq!(
            classify_code(RDKafkaErrorCode::InvalidTimestamp),
            ErrorClass::Unknown
        );
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Outage);
    }
}
