//! Whatever arrives on a platform topic, the envelope decoder answers with an envelope or a
//! poison verdict (parked with its reason), never a panic and never a retry loop.

use bytes::Bytes;
use essay_common::{topics, Envelope, EventFactory};
use outbox::{HandlerError, IncomingMessage};
use proptest::prelude::*;

fn message(topic: &str, payload: Vec<u8>) -> IncomingMessage {
    IncomingMessage {
        topic: topic.into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: Bytes::from(payload),
        headers: Default::default(),
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        any::<String>().prop_map(Into::into),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Into::into),
            prop::collection::btree_map(
                prop_oneof![
                    Just("event_id".to_string()),
                    Just("event_type".to_string()),
                    Just("schema_version".to_string()),
                    Just("data".to_string()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_poison(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let verdict = Envelope::parse(&message(topics::FILE_ADDED, bytes));
        prop_assert!(matches!(verdict, Err(HandlerError::Poison(_))) || verdict.is_ok());
    }

    #[test]
    fn random_json_is_an_envelope_or_poison(v in json_value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        match Envelope::parse(&message(topics::FILE_ADDED, bytes)) {
            Ok(env) => {
                prop_assert_eq!(env.event_type, topics::FILE_ADDED);
                prop_assert_eq!(env.schema_version, 1);
            }
            Err(e) => prop_assert!(matches!(e, HandlerError::Poison(_)), "{:?}", e),
        }
    }

    /// A real envelope with one field changed to junk is poison unless the change is harmless
    /// (unknown fields, metadata).
    #[test]
    fn mutated_envelopes_are_judged_not_retried(field in prop::sample::select(vec![
            "event_id", "event_type", "event_timestamp", "source_service", "schema_version",
            "correlation_id", "data", "metadata", "extra"]),
            junk in json_value()) {
        let e = EventFactory::new("test").event(topics::FILE_ADDED, ("batch", "b"), uuid::Uuid::new_v4(),
                                                &serde_json::json!({"batch_id": "b"})).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(e.payload()).unwrap();
        v[field] = junk;
        match Envelope::parse(&message(topics::FILE_ADDED, serde_json::to_vec(&v).unwrap())) {
            Ok(env) => { let _ = env.data::<serde_json::Value>(); }
            Err(e) => prop_assert!(matches!(e, HandlerError::Poison(_))),
        }
    }
}
