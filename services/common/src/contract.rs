//! The wire contract shared with the original Python platform (`../shared/contracts/events.md`):
//! topic names, the JSON envelope, the message key and headers.

use chrono::{SecondsFormat, Utc};
use outbox::{AggregateRef, EventId, HandlerError, IncomingMessage, NewEvent, Topic};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every topic of the contract, by the short name the services use.
pub mod topics {
    pub const BATCH_ESSAYS_REGISTERED: &str = "huleedu.batch.essays.registered.v1";
    pub const FILE_ADDED: &str = "huleedu.file.batch.file.added.v1";
    pub const FILE_REMOVED: &str = "huleedu.file.batch.file.removed.v1";
    pub const CONTENT_PROVISIONED: &str = "huleedu.file.essay.content.provisioned.v1";
    pub const VALIDATION_FAILED: &str = "huleedu.file.essay.validation.failed.v1";
    pub const SLOT_ASSIGNED: &str = "huleedu.els.essay.slot.assigned.v1";
    pub const EXCESS_CONTENT: &str = "huleedu.els.excess.content.provisioned.v1";
    pub const PROVISIONING_COMPLETED: &str = "huleedu.batch.content.provisioning.completed.v1";
    pub const MATCHING_INITIATE: &str = "huleedu.batch.student.matching.initiate.command.v1";
    pub const MATCHING_REQUESTED: &str = "huleedu.batch.student.matching.requested.v1";
    pub const AUTHOR_MATCHES_SUGGESTED: &str = "huleedu.batch.author.matches.suggested.v1";
    pub const CLASS_CREATED: &str = "huleedu.class.created.v1";
    pub const CLASS_UPDATED: &str = "huleedu.class.updated.v1";
    pub const STUDENT_CREATED: &str = "huleedu.class.student.created.v1";
    pub const STUDENT_UPDATED: &str = "huleedu.class.student.updated.v1";
    pub const ASSOCIATIONS_CONFIRMED: &str = "huleedu.class.student.associations.confirmed.v1";
    pub const BATCH_ESSAYS_READY: &str = "huleedu.els.batch.essays.ready.v1";
    pub const SPELLCHECK_INITIATE: &str = "huleedu.els.spellcheck.initiate.command.v1";
    pub const SPELLCHECK_REQUESTED: &str = "huleedu.essay.spellcheck.requested.v1";
    pub const SPELLCHECK_PHASE_COMPLETED: &str = "huleedu.batch.spellcheck.phase.completed.v1";
    pub const SPELLCHECK_RESULTS: &str = "huleedu.essay.spellcheck.results.v1";
    pub const CJ_INITIATE: &str = "huleedu.batch.cj_assessment.initiate.command.v1";
    pub const CJ_REQUESTED: &str = "huleedu.els.cj_assessment.requested.v1";
    pub const CJ_COMPLETED: &str = "huleedu.cj_assessment.completed.v1";
    pub const ASSESSMENT_RESULT_PUBLISHED: &str = "huleedu.assessment.result.published.v1";
    pub const RESOURCE_CONSUMPTION: &str = "huleedu.resource.consumption.v1";
    pub const CJ_FAILED: &str = "huleedu.cj_assessment.failed.v1";
    pub const PHASE_OUTCOME: &str = "huleedu.els.batch.phase.outcome.v1";
    pub const PIPELINE_COMPLETED: &str = "huleedu.batch.pipeline.completed.v1";
    pub const RESULTS_READY: &str = "huleedu.ras.batch.results.ready.v1";
    /// The client's pipeline command (`ClientBatchPipelineRequestV1`): from the original's API
    /// Gateway, or Batch Orchestrator's own HTTP endpoint.
    pub const CLIENT_PIPELINE_REQUEST: &str = "huleedu.commands.batch.pipeline.v1";
    pub const PIPELINE_DENIED: &str = "huleedu.pipeline.denied.v1";

    /// All of them, for creating topics up front.
    pub const ALL: &[&str] = &[
        BATCH_ESSAYS_REGISTERED,
        FILE_ADDED,
        FILE_REMOVED,
        CONTENT_PROVISIONED,
        VALIDATION_FAILED,
        SLOT_ASSIGNED,
        EXCESS_CONTENT,
        PROVISIONING_COMPLETED,
        MATCHING_INITIATE,
        MATCHING_REQUESTED,
        AUTHOR_MATCHES_SUGGESTED,
        CLASS_CREATED,
        CLASS_UPDATED,
        STUDENT_CREATED,
        STUDENT_UPDATED,
        ASSOCIATIONS_CONFIRMED,
        BATCH_ESSAYS_READY,
        SPELLCHECK_INITIATE,
        SPELLCHECK_REQUESTED,
        SPELLCHECK_PHASE_COMPLETED,
        SPELLCHECK_RESULTS,
        CJ_INITIATE,
        CJ_REQUESTED,
        CJ_COMPLETED,
        ASSESSMENT_RESULT_PUBLISHED,
        RESOURCE_CONSUMPTION,
        CJ_FAILED,
        PHASE_OUTCOME,
        PIPELINE_COMPLETED,
        RESULTS_READY,
        CLIENT_PIPELINE_REQUEST,
        PIPELINE_DENIED,
    ];
}

/// The JSON envelope every message carries (schema version 1). Unknown fields are ignored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_timestamp: String,
    pub source_service: String,
    pub schema_version: i64,
    pub correlation_id: Uuid,
    #[serde(default)]
    pub data_schema_uri: Option<String>,
    pub data: serde_json::Value,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl Envelope {
    /// Decodes a message body; anything that is not a version-1 envelope is poison (it can
    /// never succeed, so it is parked rather than retried).
    pub fn parse(message: &IncomingMessage) -> Result<Self, HandlerError> {
        let envelope: Self = serde_json::from_slice(&message.payload)
            .map_err(|e| HandlerError::poison(format!("not an event envelope: {e}")))?;
        if envelope.schema_version != 1 {
            return Err(HandlerError::poison(format!(
                "envelope schema_version {} is not supported (expected 1)",
                envelope.schema_version
            )));
        }
        // Routed by topic, never by `event_type`: two of the original's producers put a short
        // name there (`batch.pipeline.completed`, `assessment.result.published`), and what the
        // contract allows on a topic is handled, not parked. `event_type` is the topic here.
        let mut envelope = envelope;
        envelope.event_type = message.topic.clone();
        Ok(envelope)
    }

    /// A required text field of the payload; a missing one is poison.
    pub fn text(&self, field: &str) -> Result<String, HandlerError> {
        self.data[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HandlerError::poison(format!("{} without {field}", self.event_type)))
    }

    /// The payload as `T`; a payload of the wrong shape is poison.
    /// The batch the event is about: its `batch_id`, else (the original's batch-level events
    /// that carry none, such as `batch.essays.registered`) its `entity_id`.
    pub fn batch_id(&self) -> Result<String, HandlerError> {
        match self.data["batch_id"].as_str() {
            Some(id) => Ok(id.to_owned()),
            None => self.text("entity_id"),
        }
    }

    pub fn data<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_value(self.data.clone()).map_err(|e| {
            HandlerError::poison(format!("{} payload does not match: {e}", self.event_type))
        })
    }
}

/// Builds outgoing events of one service: envelope, key and headers per the contract.
#[derive(Clone, Copy, Debug)]
pub struct EventFactory {
    source_service: &'static str,
}

impl EventFactory {
    pub const fn new(source_service: &'static str) -> Self {
        Self { source_service }
    }

    pub fn source_service(&self) -> &'static str {
        self.source_service
    }

    /// An event on `topic` about aggregate (`kind`, `id`), in the flow `correlation_id`.
    /// The event id is fixed here and stored with the row, so every publish attempt carries
    /// the same id in the body and the headers.
    pub fn event(
        &self,
        topic: &'static str,
        aggregate: (&str, &str),
        correlation_id: Uuid,
        data: &impl Serialize,
    ) -> Result<NewEvent, HandlerError> {
        let event_id = EventId::new();
        let trace = crate::trace::TraceContext::current().map(|t| t.child());
        let occurred_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, false);
        let envelope = Envelope {
            event_id: *event_id.as_uuid(),
            event_type: topic.to_owned(),
            event_timestamp: occurred_at.clone(),
            source_service: self.source_service.to_owned(),
            schema_version: 1,
            correlation_id,
            data_schema_uri: None,
            data: serde_json::to_value(data).map_err(HandlerError::retry)?,
            // Written inside a request or a handling: the trace goes on, in a span of its own.
            metadata: trace.map(|t| serde_json::json!({crate::trace::TRACEPARENT: t.to_string()})),
        };
        let body = serde_json::to_vec(&envelope).map_err(HandlerError::retry)?;
        let topic_name = Topic::new(topic).map_err(HandlerError::retry)?;
        let aggregate = AggregateRef::new(aggregate.0, aggregate.1)
            .map_err(|e| HandlerError::poison(format!("aggregate id: {e}")))?;
        let correlation = correlation_id.to_string();
        let event = NewEvent::new(topic_name, aggregate, body)
            .with_event_id(event_id)
            .with_event_type(topic)
            .with_header("event_id", event_id.to_string())
            .with_header("event_type", topic)
            .with_header("source_service", self.source_service)
            .with_header("correlation_id", correlation.clone())
            .with_header("trace_id", correlation)
            .with_header("schema_version", "1")
            .with_header("occurred_at", occurred_at)
            .with_header("content_type", "application/json");
        Ok(match trace {
            Some(t) => event.with_header(crate::trace::TRACEPARENT, t.to_string()),
            None => event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(event: &NewEvent) -> IncomingMessage {
        IncomingMessage {
            topic: event.topic().as_str().to_owned(),
            partition: 0,
            offset: 0,
            key: Some(event.key().to_owned()),
            headers: event.headers().clone(),
            payload: event.payload().clone(),
        }
    }

    #[test]
    fn events_follow_the_contract() {
        let f = EventFactory::new("file_service");
        let correlation = Uuid::new_v4();
        let e = f
            .event(
                topics::CONTENT_PROVISIONED,
                ("file_upload", "f-1"),
                correlation,
                &serde_json::json!({"batch_id": "b-1"}),
            )
            .unwrap();
        assert_eq!(e.key(), "f-1", "the key is the aggregate id");
        let h = e.headers();
        assert_eq!(h["event_id"], e.event_id().to_string());
        assert_eq!(h["event_type"], topics::CONTENT_PROVISIONED);
        assert_eq!(h["trace_id"], correlation.to_string());
        assert_eq!(h["content_type"], "application/json");
        let env = Envelope::parse(&incoming(&e)).unwrap();
        assert_eq!(env.event_id, *e.event_id().as_uuid());
        assert_eq!(env.correlation_id, correlation);
        assert!(
            env.event_timestamp.ends_with("+00:00"),
            "{}",
            env.event_timestamp
        );
        let raw: serde_json::Value = serde_json::from_slice(e.payload()).unwrap();
        for field in [
            "event_id",
            "event_type",
            "event_timestamp",
            "source_service",
            "schema_version",
            "correlation_id",
            "data_schema_uri",
            "data",
            "metadata",
        ] {
            assert!(raw.get(field).is_some(), "envelope lacks {field}");
        }
    }

    #[test]
    fn bad_bodies_are_poison_not_retries() {
        let f = EventFactory::new("x");
        let good = f
            .event(
                topics::FILE_ADDED,
                ("batch", "b"),
                Uuid::new_v4(),
                &serde_json::json!({}),
            )
            .unwrap();
        let mut m = incoming(&good);
        m.payload = b"{not json".to_vec().into();
        assert!(matches!(Envelope::parse(&m), Err(HandlerError::Poison(_))));
        // The topic routes, whatever `event_type` says (the original's short names).
        let mut v: serde_json::Value = serde_json::from_slice(good.payload()).unwrap();
        v["event_type"] = serde_json::json!("batch.file.added");
        let mut m = incoming(&good);
        m.payload = serde_json::to_vec(&v).unwrap().into();
        assert_eq!(Envelope::parse(&m).unwrap().event_type, topics::FILE_ADDED);
        // Unknown fields are ignored.
        let mut v: serde_json::Value = serde_json::from_slice(good.payload()).unwrap();
        v["something_new"] = serde_json::json!(1);
        let mut m = incoming(&good);
        m.payload = serde_json::to_vec(&v).unwrap().into();
        assert!(Envelope::parse(&m).is_ok());
    }
}
