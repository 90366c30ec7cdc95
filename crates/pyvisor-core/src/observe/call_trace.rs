//! The spans of one call: `pyvisor.call`, `pyvisor.queue_wait` (only when the call waited for a
//! worker with room), one `pyvisor.attempt` per attempt (a retry linked to the attempt it
//! replaces), and the crash, retry and quarantine events on them. The Python function's span,
//! a child of the attempt, is `function_span.rs`.
//!
//! They are made with the OpenTelemetry API directly rather than as `tracing` spans: through
//! `tracing-opentelemetry` a span costs the caller about 1.7 µs on the reference machine, made
//! directly about 0.35 µs, and every call makes three or four (docs/benchmarks.md). Lifecycle
//! spans, which are rare, stay `tracing` spans. The call span's parent is the `traceparent` given
//! in [`CallOptions`](crate::CallOptions), else the caller's current `tracing` span (through the
//! OpenTelemetry layer of `pyvisor::telemetry`).
//!
//! Owns these spans and their attributes. Not the exporters (`telemetry.rs`), not the W3C
//! header format (`tracing_ctx.rs`).

use std::sync::Arc;

use opentelemetry::trace::{Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span as SdkSpan};

use crate::death::{DeathCertificate, WorkerId};
use crate::error::CallError;

/// The call's span, while the call runs. `None` (no `CallTrace`) when nothing is exported.
pub(crate) struct CallTrace {
    tracer: SdkTracer,
    /// Holds the `pyvisor.call` span.
    cx: Context,
}

/// One attempt's span.
pub(crate) struct AttemptTrace {
    span: SdkSpan,
}

impl CallTrace {
    /// Start the call's span, or `None` when spans are not exported.
    pub(crate) fn start(pool: &Arc<str>, function: &str, traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let tracer = crate::telemetry::call_tracer()?;
        let parent = crate::telemetry::parent_context(traceparent, tracestate);
        let span = tracer
            .span_builder("pyvisor.call")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("rpc.system", "pyvisor"),
                KeyValue::new("rpc.method", function.to_string()),
                KeyValue::new("pyvisor.pool", Arc::clone(pool)),
            ])
            .start_with_context(&tracer, &parent);
        Some(CallTrace { cx: Context::new().with_span(span), tracer })
    }

    pub(crate) fn idempotent(&self, idempotent: bool) {
        self.cx.span().set_attribute(KeyValue::new("pyvisor.idempotent", idempotent));
    }

    /// The call's idempotency key and how it found it (`hit`, `miss`, `coalesced`).
    pub(crate) fn idempotency(&self, key: &str, lookup: &'static str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("pyvisor.idempotency_key", key.to_string()));
        span.set_attribute(KeyValue::new("pyvisor.idempotency", lookup));
    }

    /// A span for a wait in the queue; it ends when dropped.
    pub(crate) fn queue_wait(&self, attempt: u32) -> SdkSpan {
        self.tracer
            .span_builder("pyvisor.queue_wait")
            .with_attributes([KeyValue::new("pyvisor.attempt", i64::from(attempt))])
            .start_with_context(&self.tracer, &self.cx)
    }

    /// Start an attempt's span on a worker, linked to the attempt it replaces.
    pub(crate) fn attempt(&self, attempt: u32, worker: &WorkerId, pid: u32, previous: Option<&AttemptTrace>) -> AttemptTrace {
        let mut builder = self.tracer.span_builder("pyvisor.attempt").with_kind(SpanKind::Client).with_attributes([
            KeyValue::new("pyvisor.attempt", i64::from(attempt)),
            KeyValue::new("pyvisor.worker.id", worker.to_string()),
            KeyValue::new("process.pid", i64::from(pid)),
        ]);
        if let Some(p) = previous {
            builder = builder.with_links(vec![Link::with_context(p.context().clone())]);
        }
        AttemptTrace { span: builder.start_with_context(&self.tracer, &self.cx) }
    }

    /// A retry is about to start.
    pub(crate) fn retrying(&self, attempt: u32) {
        self.cx.span().add_event("retry", vec![KeyValue::new("pyvisor.attempt", i64::from(attempt))]);
    }

    /// The call was found to be a poison request and quarantined.
    pub(crate) fn quarantined(&self) {
        self.cx.span().add_event("quarantined", Vec::new());
    }

    /// End the call's span with its outcome.
    pub(crate) fn finish(self, result: Result<(), &CallError>, attempts: u32) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("pyvisor.attempts", i64::from(attempts)));
        match result {
            Ok(()) => span.set_attribute(KeyValue::new("pyvisor.outcome", "ok")),
            Err(e) => {
                span.set_attribute(KeyValue::new("pyvisor.outcome", e.kind()));
                span.set_attribute(KeyValue::new("error.type", e.kind()));
                span.set_status(Status::error(e.kind()));
            }
        }
        span.end();
    }
}

impl AttemptTrace {
    pub(crate) fn context(&self) -> &SpanContext {
        self.span.span_context()
    }

    /// The attempt timed out (the call's deadline passed while it ran).
    pub(crate) fn timed_out(&mut self) {
        self.span.set_attribute(KeyValue::new("error.type", "timeout"));
        self.span.set_status(Status::error("timeout"));
    }

    /// The worker died with the attempt in flight: an exception event with the certificate.
    pub(crate) fn crashed(&mut self, cert: &DeathCertificate) {
        self.span.set_attribute(KeyValue::new("error.type", "worker_crashed"));
        self.span.set_status(Status::error("worker_crashed"));
        self.span.add_event(
            "exception",
            vec![
                KeyValue::new("exception.type", "WorkerCrashed"),
                KeyValue::new("exception.message", cert.to_string()),
                KeyValue::new("pyvisor.death.cause", cert.cause.kind()),
                KeyValue::new("pyvisor.worker.id", cert.worker.to_string()),
                KeyValue::new("process.pid", i64::from(cert.pid.unwrap_or(0))),
                KeyValue::new("pyvisor.exit.signal", i64::from(cert.signal.unwrap_or(0))),
                KeyValue::new("pyvisor.exit.code", i64::from(cert.exit_code.unwrap_or(0))),
            ],
        );
    }
}

impl Drop for AttemptTrace {
    fn drop(&mut self) {
        self.span.end();
    }
}
