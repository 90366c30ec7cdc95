//! The Python function's span, recorded in the parent.
//!
//! A worker times every call that carries a `traceparent` and reports, in its reply, the id it
//! gave the function's span and when the function started and ended ([`SpanTiming`]); spans
//! that user code makes inside the worker already name that id as their parent. This module
//! turns the timing into the span itself — a `SERVER` span, child of the attempt span, under
//! the workers' service name — and exports it with the parent's exporter, so the worker
//! makes no span and encodes no OTLP per call, and the span survives the worker.
//!
//! Owns the span's name, attributes and error recording. It does not own the attempt span
//! (`pool.rs`) or the exporters (`telemetry.rs`).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use pyvisor_protocol::{RemoteError, RemoteErrorKind, SpanTiming};

/// What the parent knows about one traced call that ran on a worker.
pub(crate) struct FunctionSpan<'a> {
    /// The attempt span's context: the parent of the function span.
    pub attempt: &'a SpanContext,
    pub timing: SpanTiming,
    pub function: &'a str,
    pub call_id: u64,
    pub attempt_no: u32,
    pub worker: &'a crate::death::WorkerId,
    pub pid: u32,
    /// The worker's error reply, if the call failed.
    pub error: Option<&'a RemoteError>,
}

fn at(unix_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

/// Record and end the function's span (nothing when spans are not exported).
pub(crate) fn record(f: FunctionSpan<'_>) {
    let parent = Context::new().with_remote_span_context(f.attempt.clone());
    let _ = crate::telemetry::with_worker_tracer(SpanId::from(f.timing.span_id), |tracer| {
        let mut span = tracer
            .span_builder(Cow::Owned(format!("pyvisor.worker {}", f.function)))
            .with_kind(SpanKind::Server)
            .with_start_time(at(f.timing.start_unix_ns))
            .with_attributes([
                KeyValue::new("rpc.system", "pyvisor"),
                KeyValue::new("rpc.method", f.function.to_string()),
                KeyValue::new("pyvisor.call.id", f.call_id as i64),
                KeyValue::new("pyvisor.call.attempt", i64::from(f.attempt_no)),
                KeyValue::new("pyvisor.worker.id", f.worker.to_string()),
                KeyValue::new("process.pid", i64::from(f.pid)),
            ])
            .start_with_context(tracer, &parent);
        if let Some(e) = f.error {
            let error_type =
                if e.kind == RemoteErrorKind::Cancelled { "cancelled".to_string() } else { e.type_name.clone() };
            if e.kind != RemoteErrorKind::Cancelled || !e.type_name.ends_with("CancelledError") {
                let mut attrs = vec![
                    KeyValue::new("exception.type", e.type_name.clone()),
                    KeyValue::new("exception.message", e.message.clone()),
                ];
                if let Some(tb) = &e.traceback {
                    attrs.push(KeyValue::new("exception.stacktrace", tb.clone()));
                }
                span.add_event_with_timestamp("exception", at(f.timing.end_unix_ns), attrs);
            }
            span.set_attribute(KeyValue::new("error.type", error_type.clone()));
            span.set_status(Status::error(error_type));
        }
        span.end_with_timestamp(at(f.timing.end_unix_ns));
    });
}
