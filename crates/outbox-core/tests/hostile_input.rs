//! Hostile input to the framework's parsers: configuration (environment and TOML), message
//! headers and envelopes on the consumer side. Whatever arrives, the answer is a value or a
//! clear error, never a panic; and nothing unvalidated becomes a schema name.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_core::config::is_identifier;
use outbox_core::{IncomingMessage, Settings};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "DATABASE_URL",
    "OUTBOX_SCHEMA",
    "OUTBOX_BROKER",
    "OUTBOX_SERVICE",
    "OUTBOX_METRICS_ADDR",
    "OUTBOX_BATCH_SIZE",
    "OUTBOX_POLL_MIN",
    "OUTBOX_POLL_MAX",
    "OUTBOX_LEASE",
    "OUTBOX_RETRY_BASE",
    "OUTBOX_RETRY_CAP",
    "OUTBOX_MAX_ATTEMPTS",
    "OUTBOX_OUTAGE_BACKOFF_MIN",
    "OUTBOX_OUTAGE_BACKOFF_MAX",
    "OUTBOX_RETENTION",
    "OUTBOX_RETENTION_SWEEP_BATCH",
    "OUTBOX_STATS_INTERVAL",
];

/// Values that look almost right as often as they look wrong.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,12}(ms|s|m|h|d|x)?",
        "-?[0-9]{1,25}",
        "[a-z_]{1,70}",
        "[a-z_\"; ]{1,20}(DROP TABLE x;)?",
        "(postgres|sqlite|mysql)://[a-z:@/.]{0,30}",
        "(memory|[a-z0-9.]{1,20}:[0-9]{1,6}(,[a-z0-9.]{1,10}:[0-9]{1,5})?)",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_environment_is_a_setting_or_a_named_error(env in prop::collection::btree_map(
        prop::sample::select(KEYS), value(), 0..8)) {
        let env: BTreeMap<&str, String> = env;
        match Settings::load(None::<&str>, |k| env.get(k).cloned()) {
            Ok(s) => {
                prop_assert!(is_identifier(&s.schema), "schema {:?} is not a plain identifier", s.schema);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(KEYS.iter().any(|k| msg.contains(k)), "error names no key: {msg}");
                if let Some(v) = env.get("DATABASE_URL").filter(|v| v.contains("://") && v.contains('@')) {
                    // The database password never appears in the error.
                    if let Some(password) = v.split("://").nth(1).and_then(|r| r.split('@').next()).and_then(|u| u.split(':').nth(1)) {
                        let elsewhere = env.iter().any(|(k, v)| *k != "DATABASE_URL" && v.contains(password));
                        if password.len() > 3 && !elsewhere {
                            prop_assert!(!msg.contains(password), "{msg}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn any_toml_text_parses_or_errs(text in prop_oneof![
        any::<String>(),
        "([a-z_]{1,12} = (\"[^\"]{0,10}\"|[0-9]{1,5}|true)\n){0,6}",
    ]) {
        let _ = Settings::from_toml_str(&text);
    }

    #[test]
    fn identifiers_admit_nothing_that_could_escape_a_quote(s in any::<String>()) {
        if is_identifier(&s) {
            prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            prop_assert!(!s.is_empty() && s.len() < 64);
        }
    }

    #[test]
    fn any_headers_and_body_give_an_event_id_or_poison(
        headers in prop::collection::btree_map(
            prop_oneof![Just("event_id".to_string()), Just("event_type".to_string()), "[a-z_]{1,10}"],
            prop_oneof![any::<String>(), "[0-9a-f-]{36}"], 0..4),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            "\\{\"event_id\": *(\"[0-9a-f-]{36}\"|[0-9]+|null|\\{\\})\\}".prop_map(String::into_bytes),
        ],
    ) {
        let m = IncomingMessage {
            topic: "t".into(), partition: 0, offset: 0, key: None,
            payload: Bytes::from(body), headers: headers.clone(),
        };
        match m.event_id() {
            Ok(id) => if let Some(h) = headers.get("event_id") {
                prop_assert_eq!(id.to_string(), h.to_lowercase());
            },
            Err(poison) => prop_assert!(!poison.0.is_empty()),
        }
        let _ = m.event_type();
    }
}

/// Security defaults: with nothing configured, the metrics/admin endpoint listens on loopback
/// only; reaching it from elsewhere takes an explicit `OUTBOX_METRICS_ADDR`.
#[test]
fn endpoints_bind_to_loopback_unless_configured() {
    let s = Settings::load(None::<&str>, |_| None).unwrap();
    assert!(s.metrics_addr.ip().is_loopback(), "{}", s.metrics_addr);
    let open = Settings::load(None::<&str>, |k| {
        (k == "OUTBOX_METRICS_ADDR").then(|| "0.0.0.0:9464".to_string())
    })
    .unwrap();
    assert!(!open.metrics_addr.ip().is_loopback());
}
