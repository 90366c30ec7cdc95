//! Trace context on the wire: W3C `traceparent`/`tracestate` headers to and from
//! OpenTelemetry contexts.
//!
//! Owns the conversions only: an attempt span's context as the `traceparent` of a `call`, and a
//! caller's `traceparent` (given in `CallOptions`) as the parent of the call's span.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::SpanContext;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The W3C `traceparent` (and `tracestate`) of a span context.
pub(crate) fn traceparent(sc: &SpanContext) -> (String, Option<String>) {
    let tp = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
    let ts = sc.trace_state().header();
    (tp, (!ts.is_empty()).then_some(ts))
}

/// The remote context in `traceparent`, as a parent (an empty context if it is malformed).
pub(crate) fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Context {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_string(), ts.to_string());
    }
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_context(tp, Some("k=v"));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(traceparent(&sc), (tp.to_string(), Some("k=v".to_string())));
        assert!(!remote_context("garbage", None).span().span_context().is_valid());
    }
}
