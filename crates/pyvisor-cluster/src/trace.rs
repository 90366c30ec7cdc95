//! The caller's side of a remote call's trace: the span a [`crate::RemotePool`] call makes on
//! the calling node, `pyvisor.remote_call`, and the W3C context it passes to the serving node
//! (whose `pyvisor.call`, attempt and function spans then sit beneath it, in the same trace).
//!
//! The span is made with the OpenTelemetry API and pyvisor-core's tracer
//! (`pyvisor_core::telemetry::tracer`), like core's call spans, so it is exported with them and
//! costs nothing while nothing is exported: no span then, and the caller's own context (if any)
//! goes on unchanged.
//!
//! Owns that span: its parent, attributes, `node_lost` events and outcome. Not the serving
//! node's spans (pyvisor-core makes them from the context), not the W3C header format (core's).

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use pyvisor_core::telemetry;

use crate::remote::RemoteCallError;

/// The span of one remote call on the calling node (none while nothing is exported).
pub(crate) struct RemoteSpan {
    inner: Inner,
}

enum Inner {
    /// Exporting: the context holding the `pyvisor.remote_call` span.
    Traced(Context),
    /// Not exporting: what the caller gave, passed on as it is.
    Untraced(Option<(String, Option<String>)>),
}

impl RemoteSpan {
    /// Start the call's span, a child of `given` (a caller's W3C context) or of the current
    /// `tracing` span.
    pub(crate) fn start(pool: &str, function: &str, given: Option<&(String, Option<String>)>) -> RemoteSpan {
        let Some(tracer) = telemetry::tracer() else {
            return RemoteSpan { inner: Inner::Untraced(given.cloned()) };
        };
        let parent = telemetry::parent_context(given.map(|g| g.0.as_str()), given.and_then(|g| g.1.as_deref()));
        let span = tracer
            .span_builder("pyvisor.remote_call")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("rpc.system", "pyvisor"),
                KeyValue::new("rpc.method", function.to_string()),
                KeyValue::new("pyvisor.pool", pool.to_string()),
            ])
            .start_with_context(&tracer, &parent);
        RemoteSpan { inner: Inner::Traced(Context::new().with_span(span)) }
    }

    /// The context to send with the call: this span's, or what the caller gave.
    pub(crate) fn traceparent(&self) -> Option<(String, Option<String>)> {
        match &self.inner {
            Inner::Traced(cx) => Some(telemetry::traceparent(cx.span().span_context())),
            Inner::Untraced(given) => given.clone(),
        }
    }

    /// The node running the call was lost (`retried`: the call goes on elsewhere).
    pub(crate) fn node_lost(&self, node: &str, retried: bool) {
        if let Inner::Traced(cx) = &self.inner {
            cx.span().add_event("node_lost", vec![KeyValue::new("pyvisor.node", node.to_string()), KeyValue::new("pyvisor.retried", retried)]);
        }
    }

    /// End the span with the call's outcome.
    pub(crate) fn finish(mut self, result: Result<(), &RemoteCallError>) {
        let Inner::Traced(cx) = std::mem::replace(&mut self.inner, Inner::Untraced(None)) else { return };
        let span = cx.span();
        match result {
            Ok(()) => span.set_attribute(KeyValue::new("pyvisor.outcome", "ok")),
            Err(e) => {
                let kind = e.kind();
                span.set_attribute(KeyValue::new("pyvisor.outcome", kind));
                span.set_attribute(KeyValue::new("error.type", kind));
                if let RemoteCallError::Remote { node, kind: remote, .. } = e {
                    // What failed over there (the serving node's `CallError::kind`), and where.
                    span.set_attribute(KeyValue::new("pyvisor.remote.error.type", remote.clone()));
                    span.set_attribute(KeyValue::new("pyvisor.node", node.clone()));
                }
                span.set_status(Status::error(kind));
            }
        }
        span.end();
    }
}

impl Drop for RemoteSpan {
    /// Dropped unfinished: the caller dropped the call's future (the call is cancelled on the
    /// node running it).
    fn drop(&mut self) {
        if let Inner::Traced(cx) = &self.inner {
            cx.span().set_attribute(KeyValue::new("pyvisor.outcome", "cancelled"));
            cx.span().end();
        }
    }
}
