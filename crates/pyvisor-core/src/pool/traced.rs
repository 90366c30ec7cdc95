//! One call made and observed: the call span (with an idempotency key and how it was found,
//! for a keyed execution), [`super::call::run`], and the call metrics.
//!
//! Shared by the handle (every call) and the keyed path (an execution); it owns neither the
//! call path nor the handle, and imports neither of them but `call`.

use tokio::time::Instant;

use super::call::Known;
use super::options::CallOptions;
use crate::buffers::Reply;
use crate::error::CallError;
use crate::observe::call_trace::CallTrace;
use crate::shared::PoolShared;

/// One call on `shared`, traced and counted: its call span (with the idempotency key and how
/// it was found, for a keyed execution), [`super::call::run`], the call metrics.
pub(crate) async fn traced_call(
    shared: &PoolShared,
    function: &str,
    known: Option<Known<'_>>,
    payload: &[u8],
    opts: &CallOptions,
    attempts: &mut u32,
    idempotency: Option<(&str, &'static str)>,
) -> Result<Reply, CallError> {
    let started = Instant::now();
    let trace = CallTrace::start(&shared.name, function, opts.traceparent_str(), opts.tracestate_str());
    if let (Some(t), Some((key, how))) = (&trace, idempotency) {
        t.idempotency(key, how);
    }
    let result = super::call::run(shared, function, known, payload, opts, trace.as_ref(), attempts).await;
    if let Some(t) = trace {
        t.finish(result.as_ref().map(|_| ()), *attempts);
    }
    crate::observe::metrics::call_done(
        &shared.name,
        function,
        result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
        started.elapsed().as_secs_f64(),
    );
    result
}
