//! The path of one call, from admission to its one outcome.
//!
//! 1. *Admit*: resolve the deadline, check the function name against `hello`, the frame size
//!    and the quarantine.
//! 2. *Acquire*: a reservation from the dispatcher — at once, or after waiting in the fair
//!    queue (first attempts count toward `max_queue`; retries were admitted already).
//! 3. *Attempt*: register the call in the worker's table, write its frame, await the outcome
//!    (dropping the future abandons the call and sends `cancel`).
//! 4. *Barrier*: a crash goes to the call's [`CallBarrier`], which says fail, retry (alone for
//!    a suspect) or poison; a `refused` reply (the worker was going away and did not run the
//!    call) sends the same attempt to another worker. A keyed call on a worker that
//!    acknowledges starts is sent as `call_options` with `ack_start`; if its worker died
//!    before the function started, it is retried whatever its idempotency.
//!
//! A call with an affinity key wants its key's worker (`dispatch::affinity`) instead of any,
//! and is never sent elsewhere: when that worker is gone (before the call, while it waited, or
//! while it ran), the call fails with `AffinityLost` and the key is unbound.
//!
//! No actor is on this path. Owns none of the policies it applies: they are in
//! `crate::barrier` and `crate::dispatch`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pyvisor_protocol::{
    call_overhead, encode_call_head, encode_call_options_head, CallHeader, RemoteErrorKind, WireCallOptions,
    CALL_OPTIONS_EXTRA,
};
use tokio::time::Instant;

use super::options::CallOptions;
use crate::buffers::Reply;
use crate::barrier::quarantine::fingerprint;
use crate::clock::unix_ms;
use crate::barrier::retry::{CallBarrier, CrashVerdict, RetryPolicy};
use crate::death::DeathCertificate;
use crate::dispatch::affinity::Route;
use crate::dispatch::{Failure, Outcome, QueueExit, Reservation, SlotEnd, Want, WorkerSlot};
use crate::error::{AffinityLostReason, CallError};
use crate::events::PoolEvent;
use crate::io::writer::{BuffersSent, FrameWriter, WriteClosed};
use crate::os::memfd::SharedBytes;
use crate::observe::call_trace::{AttemptTrace, CallTrace};
use crate::observe::function_span::FunctionSpan;
use crate::shared::{PoolShared, Resolved};

/// A function name a typed handle ([`super::function::Function`]) resolved once: its shared
/// name, and what the pool's table said then (`None`: no worker had said `hello` yet).
#[derive(Clone, Copy)]
pub(crate) struct Known<'a> {
    pub name: &'a Arc<str>,
    pub resolved: Option<Resolved>,
}

/// A call (or a stream) past admission.
pub(super) struct Admitted<'a> {
    pub(super) function: &'a str,
    pub(super) called: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) id: u64,
    pub(super) idempotent: bool,
    /// It has an idempotency key: ask workers that can for a start acknowledgement.
    keyed: bool,
    pub(super) traceparent: Option<&'a str>,
    pub(super) tracestate: Option<&'a str>,
}

impl Admitted<'_> {
    pub(super) fn timeout(&self, sent: bool) -> CallError {
        CallError::Timeout {
            function: self.function.to_string(),
            after: self.deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(self.called)),
            sent,
        }
    }

    pub(super) fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Check a call (`stream`: a stream) before it may wait for a worker.
pub(super) fn admit<'a>(
    shared: &'a PoolShared,
    function: &'a str,
    known: Option<Known<'_>>,
    payload: &'a [u8],
    opts: &'a CallOptions,
    stream: bool,
) -> Result<Admitted<'a>, CallError> {
    let spec = &shared.spec;
    let called = Instant::now();
    let deadline = opts.deadline_from(called, spec.call_timeout);
    let mut exposed_idempotent = false;
    let mut exposed_stream = false;
    match known.and_then(|k| k.resolved) {
        // Resolved by a typed handle against the table still in force: one atomic load.
        Some(r) if r.table == shared.table_id() => (exposed_idempotent, exposed_stream) = (r.idempotent, r.stream),
        // One look at the function table: the name must exist; its flag is the default
        // idempotency.
        _ => {
            if let Some(funcs) = shared.functions() {
                match funcs.iter().find(|f| f.name == function) {
                    Some(f) => (exposed_idempotent, exposed_stream) = (f.idempotent, f.stream),
                    None => {
                        return Err(CallError::UnknownFunction {
                            function: function.to_string(),
                            available: funcs.iter().map(|f| f.name.clone()).collect(),
                        })
                    }
                }
            }
        }
    }
    // Before any hello there is nothing to check against; a worker refuses a mismatch itself.
    if exposed_stream != stream && shared.functions().is_some() {
        return Err(CallError::StreamMismatch { function: function.to_string(), stream: exposed_stream });
    }
    let call = Admitted {
        function,
        called,
        deadline,
        id: shared.next_call_id.fetch_add(1, Ordering::Relaxed),
        idempotent: opts.idempotent_override().unwrap_or(exposed_idempotent),
        keyed: opts.key().is_some(),
        traceparent: opts.traceparent_str(),
        tracestate: opts.tracestate_str(),
    };
    // `max_frame` bounds the frame without its out-of-band buffers; `max_buffer` each of them.
    let max_buffer = spec.buffers.max_buffer;
    if let Some(big) = opts.buffers().iter().find(|b| b.len() > max_buffer) {
        return Err(CallError::BufferTooLarge { function: function.to_string(), size: big.len(), max: max_buffer });
    }
    // A keyed call or a stream may go as `call_options`, a few bytes longer.
    let options = if call.keyed || stream { CALL_OPTIONS_EXTRA } else { 0 };
    let size = call_overhead(&call.header(1, call.traceparent, call.tracestate)) + options + payload.len();
    if size > spec.max_frame {
        return Err(CallError::PayloadTooLarge { function: function.to_string(), size, max: spec.max_frame });
    }
    if shared.quarantine.is_active() {
        if let Some(q) = shared.quarantine.get(fingerprint(function, payload, opts.buffers())) {
            return Err(CallError::PoisonRequest {
                function: function.to_string(),
                certificates: q.certificates,
                quarantined_for: q.until.saturating_duration_since(std::time::Instant::now()),
                refused: true,
            });
        }
    }
    Ok(call)
}

impl<'a> Admitted<'a> {
    pub(super) fn header<'h>(&'h self, attempt: u32, traceparent: Option<&'h str>, tracestate: Option<&'h str>) -> CallHeader<'h> {
        CallHeader {
            id: self.id,
            attempt,
            function: self.function,
            deadline_ms: self.deadline.map(unix_ms),
            traceparent,
            tracestate,
        }
    }
}

/// Run a call to its one outcome. `attempts` is set to the attempts made.
pub(crate) async fn run(
    shared: &PoolShared,
    function: &str,
    known: Option<Known<'_>>,
    payload: &[u8],
    opts: &CallOptions,
    trace: Option<&CallTrace>,
    attempts: &mut u32,
) -> Result<Reply, CallError> {
    let call = admit(shared, function, known, payload, opts, false)?;
    let spec = &shared.spec;
    if let Some(t) = trace {
        t.idempotent(call.idempotent);
    }
    // The name the worker's call table keeps: a typed handle's shared one, else a copy.
    let name: Arc<str> = match known {
        Some(k) => Arc::clone(k.name),
        None => Arc::from(function),
    };
    let mut barrier = CallBarrier::new(RetryPolicy::from_spec(spec), call.idempotent);
    let mut previous_attempt: Option<AttemptTrace> = None;
    let mut admitted = false;
    // Whether the function started (or may have) on some attempt, for `WorkerCrashed`.
    let mut started_any = false;
    let queue_until = {
        let q = call.called + spec.queue_timeout;
        call.deadline.map_or(q, |d| d.min(q))
    };
    // Out-of-band bytes in flight are capped per pool: past the cap a call waits here, as in
    // the queue, and holds its room until its outcome (retries included).
    let _room = if opts.buffers().is_empty() {
        None
    } else {
        match shared.buffer_budget.acquire(opts.buffers(), queue_until).await {
            Some(room) => room,
            None if call.expired() => return Err(call.timeout(false)),
            None => return Err(CallError::QueueTimeout { function: function.to_string(), waited: call.called.elapsed() }),
        }
    };
    let key = opts.affinity_arc();
    loop {
        let attempt = barrier.attempt();
        // The worker an affinity key is bound to (placed now if it was not).
        let mut pinned: Option<Arc<WorkerSlot>> = None;
        let want = match key {
            // A closed pool is said so, not as a lost key.
            Some(_) if shared.dispatch.is_closed() => return Err(shared.closed_error()),
            Some(key) => match route(shared, key) {
                Route::On(slot) => {
                    let id = slot.id;
                    pinned = Some(slot);
                    Want::On(id)
                }
                Route::Unplaced => Want::Any,
                Route::Lost(slot) => return Err(affinity_lost(shared, key, &slot, call.deadline).await),
            },
            None if barrier.is_suspect() => Want::Alone { call_id: call.id },
            None => Want::Any,
        };
        // A first attempt waits in the bounded queue; a retry was admitted already and waits
        // for a worker up to the call's deadline.
        let until = if attempt == 1 {
            queue_until
        } else {
            call.deadline.unwrap_or_else(|| Instant::now() + spec.queue_timeout)
        };
        let reservation = match acquire(shared, want, !admitted, until, trace, attempt).await {
            Ok(r) => r,
            Err(QueueExit::Full) => {
                return Err(CallError::Overloaded { pool: shared.name.to_string(), max_queue: spec.max_queue })
            }
            Err(QueueExit::Closed) => return Err(shared.closed_error()),
            Err(QueueExit::Gone) => match (key, &pinned) {
                (Some(key), Some(slot)) => {
                    unbind(shared, key, slot);
                    return Err(affinity_lost(shared, key, slot, call.deadline).await);
                }
                _ => continue,
            },
            Err(QueueExit::TimedOut) => {
                let sent = !barrier.certificates().is_empty();
                if call.expired() {
                    return Err(call.timeout(sent));
                }
                if let Some(last) = barrier.certificates().last() {
                    // Retries found no worker in time: report the crash.
                    return Err(CallError::WorkerCrashed {
                        function: function.to_string(),
                        attempts: attempt - 1,
                        certificate: Arc::clone(last),
                        started: started_any,
                        delivered: None,
                    });
                }
                return Err(CallError::QueueTimeout { function: function.to_string(), waited: call.called.elapsed() });
            }
        };
        admitted = true;
        if let (Some(key), None) = (key, &pinned) {
            // Placed on whichever worker had room (none was ready to place it on).
            if let Ok(mut table) = shared.affinity.lock() {
                table.bind(key, &reservation.slot, std::time::Instant::now());
            }
        }
        if call.expired() {
            // Expired while queued: never sent (the reservation goes back as it drops).
            return Err(call.timeout(!barrier.certificates().is_empty()));
        }
        let slot = Arc::clone(&reservation.slot);
        let deadline = call.deadline.map(Instant::into_std);
        // A worker that stopped taking calls meanwhile: the reservation goes back, pick again.
        let Ok((mut in_flight, rx)) = reservation.register(call.id, attempt, &name, deadline, None) else { continue };
        *attempts = attempt;
        // Keyed calls only: the plain path neither asks nor looks.
        let ack_start = call.keyed && slot.capabilities().acks_start();
        if ack_start {
            slot.expect_start(call.id, attempt);
        }
        let mut attempt_trace = trace.map(|t| t.attempt(attempt, &slot.id, slot.pid().unwrap_or(0), previous_attempt.as_ref()));
        let wire = attempt_trace.as_ref().map(|a| crate::observe::tracing_ctx::traceparent(a.context()));
        let (tp, ts) = match &wire {
            Some((tp, ts)) => (Some(tp.as_str()), ts.as_deref()),
            // Without tracing, the caller's own trace context (if any) passes through.
            None => (call.traceparent, call.tracestate),
        };
        if let Some(w) = slot.writer() {
            // A failed write means the worker is going down; its actor fails this call.
            let header = call.header(attempt, tp, ts);
            let _ = send_call(w, &slot, payload, opts.buffers(), |len| {
                if ack_start {
                    encode_call_options_head(&header, WireCallOptions::ack_start(), len)
                } else {
                    encode_call_head(&header, len)
                }
            });
        }
        let outcome = match call.deadline {
            Some(d) => tokio::time::timeout_at(d, rx).await.ok(),
            None => Some(rx.await),
        };
        let Some(outcome) = outcome else {
            if let Some(a) = &mut attempt_trace {
                a.timed_out();
            }
            return Err(call.timeout(true));
        };
        in_flight.done();
        let Ok(outcome) = outcome else { return Err(shared.closed_error()) };
        record_function_span(attempt_trace.as_ref(), &outcome, function, call.id, attempt, &slot);
        let started = outcome.started;
        let certificate = match outcome.result {
            Ok(reply) => return Ok(reply),
            // The worker was going away and did not run it: same attempt, another worker —
            // unless the call is keyed: its worker (and the key's state) is going.
            Err(Failure::Remote(e)) if e.kind == RemoteErrorKind::Refused => match key {
                Some(key) => {
                    unbind(shared, key, &slot);
                    return Err(affinity_lost(shared, key, &slot, call.deadline).await);
                }
                None => continue,
            },
            Err(Failure::Remote(e)) => return Err(CallError::from_remote(function, e, shared.functions().as_deref())),
            Err(Failure::ShutDown) => return Err(shared.closed_error()),
            Err(Failure::Crashed(certificate)) => certificate,
        };
        if let Some(key) = key {
            // Not retried elsewhere: the state it relied on died with the worker.
            unbind(shared, key, &slot);
            if let Some(a) = &mut attempt_trace {
                a.crashed(&certificate);
            }
            return Err(CallError::AffinityLost { key: key.to_string(), reason: AffinityLostReason::Crashed(certificate) });
        }
        if let Some(a) = &mut attempt_trace {
            a.crashed(&certificate);
        }
        previous_attempt = attempt_trace;
        // Known not to have started (acknowledged starts, socket read to its end): it did not
        // run, so it may go again whatever its idempotency.
        let verdict = if started == Some(false) {
            barrier.on_crash_not_started(Arc::clone(&certificate))
        } else {
            started_any = true;
            barrier.on_crash(call.id, Arc::clone(&certificate))
        };
        match verdict {
            CrashVerdict::Retry { .. } => {
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                crate::observe::metrics::retry(&shared.name, function);
                if let Some(t) = trace {
                    t.retrying(barrier.attempt());
                }
                tracing::debug!(pool = %shared.name, function, attempt = barrier.attempt(), suspect = barrier.is_suspect(), "retrying after a crash");
            }
            CrashVerdict::Fail | CrashVerdict::Exhausted => {
                return Err(CallError::WorkerCrashed {
                    function: function.to_string(),
                    attempts: attempt,
                    certificate,
                    started: started_any,
                    delivered: None,
                })
            }
            CrashVerdict::Poison => return Err(poisoned(shared, function, (payload, opts.buffers()), trace, attempt, barrier.certificates())),
        }
    }
}

/// The Python function's span, from the worker's timing in `outcome` (sampled traces only).
pub(super) fn record_function_span(
    attempt_trace: Option<&AttemptTrace>,
    outcome: &Outcome,
    function: &str,
    call_id: u64,
    attempt: u32,
    slot: &WorkerSlot,
) {
    let sampled = attempt_trace.map(AttemptTrace::context).filter(|c| c.is_sampled());
    if let (Some(attempt_ctx), Some(timing)) = (sampled, outcome.span) {
        crate::observe::function_span::record(FunctionSpan {
            attempt: attempt_ctx,
            timing,
            function,
            call_id,
            attempt_no: attempt,
            worker: &slot.id,
            pid: slot.pid().unwrap_or(0),
            error: match &outcome.result {
                Err(Failure::Remote(e)) => Some(e),
                _ => None,
            },
        });
    }
}

/// Where a keyed call goes now (the key's lock, held only for the lookup).
fn route(shared: &PoolShared, key: &Arc<str>) -> Route {
    let slots = shared.dispatch.table.snapshot();
    match shared.affinity.lock() {
        Ok(mut table) => table.route(key, &slots, std::time::Instant::now()),
        // A poisoned table (a panic elsewhere): no affinity rather than no calls.
        Err(_) => Route::Unplaced,
    }
}

fn unbind(shared: &PoolShared, key: &str, slot: &Arc<WorkerSlot>) {
    if let Ok(mut table) = shared.affinity.lock() {
        table.unbind(key, slot);
    }
}

/// The longest a keyed call waits for a dead worker's certificate (its process is being
/// buried), within the call's deadline.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(10);

/// `AffinityLost` for `key`, whose worker `slot` stopped taking calls, with why.
async fn affinity_lost(shared: &PoolShared, key: &str, slot: &WorkerSlot, deadline: Option<Instant>) -> CallError {
    let stopped = |shared: &PoolShared| if shared.is_closed() { AffinityLostReason::Removed } else { AffinityLostReason::Recycled };
    let reason = match slot.state() {
        // It died: its certificate comes once the process is buried.
        crate::status::WorkerState::Dead => {
            let limit = (Instant::now() + CERTIFICATE_WAIT).min(deadline.unwrap_or_else(|| Instant::now() + CERTIFICATE_WAIT));
            match tokio::time::timeout_at(limit, slot.ended()).await {
                Ok(SlotEnd::Crashed(c)) => AffinityLostReason::Crashed(c),
                _ => stopped(shared),
            }
        }
        // Draining (recycled) or stopped with its pool.
        _ => stopped(shared),
    };
    CallError::AffinityLost { key: key.to_string(), reason }
}

/// Reserve a worker, with a queue-wait span only when the call has to wait.
pub(super) async fn acquire(
    shared: &PoolShared,
    want: Want,
    first: bool,
    until: Instant,
    trace: Option<&CallTrace>,
    attempt: u32,
) -> Result<Reservation, QueueExit> {
    if let Some(now) = shared.dispatch.try_now(want) {
        return now;
    }
    let _wait = trace.map(|t| t.queue_wait(attempt));
    shared.dispatch.acquire(want, first, shared.spec.max_queue, until).await
}

/// Write a call's frame: `head(len)` for a body of `len` bytes, then `payload`. Its
/// out-of-band `buffers` go as fds (on the fd channel, then an `fds` message) to a worker that
/// takes them; to one that does not, or whose fd channel is full, inlined into the payload
/// (one copy). A failed write means the worker is going down: its actor fails the call.
pub(super) fn send_call(
    w: &FrameWriter,
    slot: &WorkerSlot,
    payload: &[u8],
    buffers: &[SharedBytes],
    head: impl Fn(usize) -> Vec<u8>,
) -> Result<(), WriteClosed> {
    if buffers.is_empty() {
        return w.send_parts(&head(payload.len()), payload);
    }
    if slot.capabilities().oob() {
        let lens: Vec<u64> = buffers.iter().map(|b| b.len() as u64).collect();
        if w.send_with_buffers(&pyvisor_protocol::encode_fds(&lens), buffers, &head(payload.len()), payload)? == BuffersSent::OutOfBand {
            return Ok(());
        }
    }
    match crate::buffers::inline(payload, buffers) {
        Ok(inlined) => w.send_parts(&head(inlined.len()), &inlined),
        // Our own encoding references each buffer once: not reached; sent as is, the worker
        // refuses it as a bad payload rather than the call hanging.
        Err(_) => w.send_parts(&head(payload.len()), payload),
    }
}

/// Quarantine a poison request's fingerprint and build its error.
pub(super) fn poisoned(
    shared: &PoolShared,
    function: &str,
    (payload, buffers): (&[u8], &[SharedBytes]),
    trace: Option<&CallTrace>,
    attempt: u32,
    certificates: &[Arc<DeathCertificate>],
) -> CallError {
    let spec = &shared.spec;
    let until = std::time::Instant::now() + spec.quarantine_window;
    shared.quarantine.insert(fingerprint(function, payload, buffers), until, certificates.to_vec());
    shared.stats.poisoned.fetch_add(1, Ordering::Relaxed);
    tracing::error!(pool = %shared.name, function, attempts = attempt, "poison request quarantined");
    if let Some(t) = trace {
        t.quarantined();
    }
    shared.emit(PoolEvent::Quarantined { function: function.to_string(), window: spec.quarantine_window });
    CallError::PoisonRequest {
        function: function.to_string(),
        certificates: certificates.to_vec(),
        quarantined_for: spec.quarantine_window,
        refused: false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use pyvisor_protocol::{ExecKind, FunctionInfo};

    use super::{admit, Known};
    use crate::error::CallError;
    use crate::pool::options::CallOptions;
    use crate::shared::PoolShared;
    use crate::spec::PoolSpec;

    fn function(name: &str, idempotent: bool) -> FunctionInfo {
        FunctionInfo { name: name.into(), idempotent, kind: ExecKind::default(), threads: 0, stream: false }
    }

    /// A typed handle's resolution is used while the pool's table is the one it was made
    /// against, and ignored (the name looked up again) once the table changes.
    #[test]
    fn a_resolution_holds_only_for_its_own_table() {
        let shared = PoolShared::new(PoolSpec::script("w.py"), PathBuf::from("python3"));
        let opts = CallOptions::new();
        let name: Arc<str> = Arc::from("f");
        // Before any hello: nothing to check against, the call goes ahead as pool.call's does.
        assert_eq!(shared.table_id(), 0);
        assert!(shared.resolve("f").is_none());
        assert!(admit(&shared, "f", None, b"", &opts, false).is_ok());

        shared.set_functions(&[function("f", true), function("g", false)]);
        let resolved = shared.resolve("f").and_then(Result::ok).expect("f is exposed");
        assert!(resolved.idempotent && resolved.table == shared.table_id());
        assert!(matches!(shared.resolve("h"), Some(Err(CallError::UnknownFunction { .. }))));
        let known = Known { name: &name, resolved: Some(resolved) };
        assert!(admit(&shared, "f", Some(known), b"", &opts, false).expect("admitted").idempotent);

        // The same table announced again (another worker's hello) keeps its id.
        shared.set_functions(&[function("f", true), function("g", false)]);
        assert_eq!(shared.table_id(), resolved.table);

        // A different table: the old resolution is not trusted, the name is looked up again.
        shared.set_functions(&[function("f", false)]);
        assert_ne!(shared.table_id(), resolved.table);
        assert!(!admit(&shared, "f", Some(known), b"", &opts, false).expect("admitted").idempotent);
        shared.set_functions(&[function("g", false)]);
        let gone = admit(&shared, "f", Some(known), b"", &opts, false).err();
        assert!(matches!(gone, Some(CallError::UnknownFunction { ref available, .. }) if available == &["g".to_string()]), "{gone:?}");
    }
}
