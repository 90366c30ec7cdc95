//! Trace context on the wire: W3C `traceparent`/`tracestate` headers to and from
//! OpenTelemetry contexts.
//!
//! Owns the conversions only: an attempt span's context as the `traceparent` of a `call`, and a
//! caller's `traceparent` (given in `CallOptions`) as the parent of the call's span.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::SpanContext;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The W3C `traceparent` (and `tracestate`) of a span context. Written digit by digit: it is
/// made for every traced call, and `format!` through the ids' `Display` took several times as
/// long.
pub(crate) fn traceparent(sc: &SpanContext) -> (String, Option<String>) {
    fn hex(out: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
    }
    let mut tp = String::with_capacity(55);
    tp.push_str("00-");
    hex(&mut tp, &sc.trace_id().to_bytes());
    tp.push('-');
    hex(&mut tp, &sc.span_id().to_bytes());
    tp.push('-');
    hex(&mut tp, &[sc.trace_flags().to_u8()]);
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
        // Leading zeros and an unsampled flag survive the digit-by-digit writing.
        let tp = "00-000000000000000000000000000000ff-0000000000000a0b-00";
        assert_eq!(traceparent(remote_context(tp, None).span().span_context()).0, tp);
    }
}
