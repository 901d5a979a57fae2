//! Trace context across hops, as the original carries it: a W3C `traceparent`
//! (`00-<trace id>-<span id>-<flags>`) in the envelope's `metadata` (what its
//! `inject_trace_context` writes) and, here, also as a message header.
//!
//! A trace starts at the HTTP request (or continues the caller's `traceparent` header); every
//! event written while handling it carries the trace with a span of its own; a consumer
//! handles the event in a child span of that trace, so the events it writes continue it. The
//! services' log lines inside the request or the handling carry `trace_id` and `span_id`
//! (tracing spans), so one teacher's action reads as one trace across the services, and an
//! OpenTelemetry collector fed the same header joins it.

use std::fmt;
use std::future::Future;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header and metadata key.
pub const TRACEPARENT: &str = "traceparent";

/// A position in a trace: the trace, this span, whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

fn random_u64() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl TraceContext {
    /// A new trace.
    pub fn root() -> Self {
        Self {
            trace_id: uuid::Uuid::new_v4().as_u128(),
            span_id: random_u64(),
            sampled: true,
        }
    }

    /// A span of the same trace below this one.
    pub fn child(&self) -> Self {
        Self {
            span_id: random_u64(),
            ..*self
        }
    }

    /// Reads a `traceparent` (version 00); anything else is no context.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        // All-zero ids are invalid by the specification.
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The context of the task, if it runs inside one.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|c| *c).ok()
    }

    /// Runs `fut` inside this context, in a tracing span carrying its ids.
    pub async fn scope<F: Future>(self, what: &'static str, fut: F) -> F::Output {
        let span = tracing::info_span!("trace", what, trace_id = %self.trace_id(), span_id = %self.span_id());
        CURRENT.scope(self, fut.instrument(span)).await
    }

    /// The context an incoming message carries (its envelope's `metadata.traceparent`, else
    /// its header), continued in a child span; a new trace when it carries none.
    pub fn of_message(metadata: Option<&serde_json::Value>, header: Option<&str>) -> Self {
        metadata
            .and_then(|m| m.get(TRACEPARENT))
            .and_then(|t| t.as_str())
            .or(header)
            .and_then(Self::parse)
            .map_or_else(Self::root, |c| c.child())
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// Axum middleware: each request runs in the trace its `traceparent` names (a child span of
/// it), or a new one; the response names the request's span in its own `traceparent`.
pub async fn http_layer(request: Request, next: Next) -> Response {
    let context = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::root, |c| c.child());
    let mut response = context.scope("http", next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&context.to_string()) {
        response.headers_mut().insert(TRACEPARENT, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_nonsense() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(header).unwrap();
        assert_eq!(c.to_string(), header);
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = c.child();
        assert_eq!(child.trace_id(), c.trace_id());
        assert_ne!(child.span_id(), c.span_id());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        let root = TraceContext::root();
        assert_eq!(TraceContext::parse(&root.to_string()), Some(root));
    }

    #[tokio::test]
    async fn the_context_is_the_tasks() {
        assert_eq!(TraceContext::current(), None);
        let c = TraceContext::root();
        let seen = c.scope("test", async { TraceContext::current() }).await;
        assert_eq!(seen, Some(c));
    }
}
