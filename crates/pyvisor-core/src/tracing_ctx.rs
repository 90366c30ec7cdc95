//! Trace context plumbing between `tracing` spans and the W3C headers on the wire.
//!
//! Owns the conversions only: an attempt span's context (and that as a `traceparent`), a caller's
//! `traceparent` as a span's parent, links between attempts, and the crash event on an attempt.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::death::DeathCertificate;

/// The OpenTelemetry context of `span`, when it is exported.
pub(crate) fn exported_context(span: &tracing::Span) -> Option<SpanContext> {
    if !crate::telemetry::exporting() {
        return None;
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The W3C `traceparent` (and `tracestate`) of a span context.
pub(crate) fn traceparent(sc: &SpanContext) -> (String, Option<String>) {
    let tp = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
    let ts = sc.trace_state().header();
    (tp, (!ts.is_empty()).then_some(ts))
}

/// Make the remote context in `traceparent` the parent of `span`.
pub(crate) fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_string(), ts.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Link `span` (a retry) to the attempt it replaces.
pub(crate) fn link(span: &tracing::Span, previous: &tracing::Span) {
    let sc = previous.context().span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// Record a worker crash on the attempt span: an exception event with the certificate.
pub(crate) fn record_crash(span: &tracing::Span, cert: &DeathCertificate) {
    span.record("error.type", "worker_crashed");
    span.record("otel.status_code", "ERROR");
    tracing::warn!(
        parent: span,
        exception.type = "WorkerCrashed",
        exception.message = %cert,
        pyvisor.death.cause = cert.cause.kind(),
        pyvisor.worker.id = %cert.worker,
        process.pid = cert.pid.unwrap_or(0),
        pyvisor.exit.signal = cert.signal.unwrap_or(0),
        pyvisor.exit.code = cert.exit_code.unwrap_or(0),
        "exception"
    );
}
