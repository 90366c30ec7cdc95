//! Streams: the items of a Python generator function, as a [`futures::Stream`].
//!
//! Owns [`StreamOptions`], [`ItemStream`] and the path of one stream: admission (the function
//! must be a generator), a worker (as for a call: the fair queue, the taint rule, alone for a
//! suspect), the stream call with its credit window, items handed to the caller as it reads
//! them — credit granted back every half window, so the worker never runs ahead of the reader
//! by more than the window — and the stream's end. Dropping the stream, or its deadline
//! passing, cancels it: the worker closes the generator (its `finally` runs).
//!
//! The crash barrier for streams: a crash before any item arrived is a crash of a call (an
//! idempotent function is retried elsewhere, nothing repeats); after items arrived, the stream
//! ends with `WorkerCrashed` and the count delivered, unless the caller asked for
//! [`StreamOptions::restart_on_crash`] and the function is idempotent — then it is told
//! (`StreamRestarted`) and the stream starts over on another worker.
//!
//! Does not own the flow-control counters or their checks (`dispatch::stream`), the crash
//! policy (`barrier::retry`) or the queue (`dispatch::queue`).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use pyvisor_protocol::{encode_call_options_head, encode_credit, CallHeader, RemoteErrorKind, WireCallOptions};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::call::{acquire, admit, poisoned, record_function_span};
use super::options::CallOptions;
use crate::barrier::retry::{CallBarrier, CrashVerdict, RetryPolicy};
use crate::clock::unix_ms;
use crate::dispatch::slot::InFlight;
use crate::dispatch::stream::{Grants, StreamEvent, StreamFlow};
use crate::dispatch::{Failure, QueueExit, Want, WorkerSlot};
use crate::error::CallError;
use crate::observe::call_trace::{AttemptTrace, CallTrace};
use crate::shared::PoolShared;

/// The credit window of a stream unless [`StreamOptions::credit`] says otherwise: items a
/// worker may send ahead of its reader.
pub const DEFAULT_STREAM_CREDIT: u32 = 256;

/// Options of one stream: its deadline, its credit window, and whether a crash may restart it.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::StreamOptions;
/// let opts = StreamOptions::new().credit(64).timeout(Duration::from_secs(600)).restart_on_crash(true);
/// assert_eq!(opts.credit_window(), 64);
/// ```
#[derive(Debug, Clone)]
pub struct StreamOptions {
    call: CallOptions,
    credit: u32,
    restart_on_crash: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { call: CallOptions::new(), credit: DEFAULT_STREAM_CREDIT, restart_on_crash: false }
    }
}

impl StreamOptions {
    pub(crate) fn with_buffers(mut self, buffers: Option<std::sync::Arc<[crate::os::memfd::SharedBytes]>>) -> Self {
        self.call = self.call.with_buffers(buffers);
        self
    }

    /// The pool's defaults: the pool's call timeout for the whole stream, a window of
    /// [`DEFAULT_STREAM_CREDIT`] items, no restart after a crash that follows delivered items.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
    /// End the stream with `Timeout` after `d`, counted from the first poll, for the whole
    /// stream (instead of the pool's call timeout).
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.call = self.call.timeout(d);
        self
    }
    /// End the stream with `Timeout` at `at`.
    #[must_use]
    pub fn deadline(mut self, at: Instant) -> Self {
        self.call = self.call.deadline(at);
        self
    }
    /// No deadline at all (an endless stream).
    #[must_use]
    pub fn no_timeout(mut self) -> Self {
        self.call = self.call.no_timeout();
        self
    }
    /// The credit window: how many items the worker may send before the reader takes them
    /// (at least 1). The items buffered in the parent for this stream never exceed it; a
    /// larger window keeps a fast reader from waiting, a smaller one holds less memory.
    #[must_use]
    pub fn credit(mut self, items: u32) -> Self {
        self.credit = items.max(1);
        self
    }
    /// For an idempotent function: when the worker dies after items were delivered, start
    /// the stream over on another worker instead of ending it. The stream then yields
    /// [`CallError::StreamRestarted`] once and goes on **from the first item**: items already
    /// received may come again. Ignored for a function that is not idempotent (its stream
    /// ends with `WorkerCrashed`). A crash before any item is retried for an idempotent
    /// function either way (nothing repeats).
    #[must_use]
    pub fn restart_on_crash(mut self, yes: bool) -> Self {
        self.restart_on_crash = yes;
        self
    }
    /// Propagate this W3C trace context to the worker.
    #[must_use]
    pub fn trace_context(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.call = self.call.trace_context(traceparent, tracestate);
        self
    }
    /// The credit window.
    pub fn credit_window(&self) -> u32 {
        self.credit
    }
}

/// The items of one stream (`Pool::stream`): a [`futures::Stream`] of `Result<O, CallError>`.
///
/// It ends (`None`) after the generator's last item, or after yielding a terminal error: the
/// generator raised (`Python`), the deadline passed (`Timeout`), the worker died
/// (`WorkerCrashed`, with the items delivered). [`CallError::StreamRestarted`] is the one
/// error that is not an end. Dropping it cancels the stream: the generator is closed in the
/// worker (`GeneratorExit` at its `yield`, so `finally` blocks run). Nothing is sent before
/// the first poll.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::StreamExt;
/// use pyvisor_core::{Pool, PoolSpec};
/// let pool = Pool::start(PoolSpec::script("worker.py")).await?;
/// let mut tokens = pool.stream::<_, String>("generate", &"Once upon a time");
/// while let Some(token) = tokens.next().await {
///     print!("{}", token?);
/// }
/// # Ok(()) }
/// ```
#[must_use = "a stream does nothing until it is polled"]
pub struct ItemStream<O> {
    inner: BoxStream<'static, Result<Bytes, CallError>>,
    flow: Arc<StreamFlow>,
    delivered: Arc<AtomicU64>,
    function: Arc<str>,
    /// The inner stream ended: `None` from now on (it must not be polled again).
    ended: bool,
    _out: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for ItemStream<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStream")
            .field("function", &self.function)
            .field("delivered", &self.delivered())
            .field("buffered", &self.buffered_items())
            .finish_non_exhaustive()
    }
}

impl<O> ItemStream<O> {
    /// Items received from the worker and not yet read: never more than the credit window.
    /// (Not `buffered`: that name is `StreamExt::buffered`'s.)
    pub fn buffered_items(&self) -> usize {
        self.flow.buffered()
    }
    /// The most items that were ever buffered at once.
    pub fn peak_buffered(&self) -> usize {
        self.flow.peak()
    }
    /// The credit window.
    pub fn credit_window(&self) -> u64 {
        self.flow.window()
    }
    /// Items yielded to the reader so far (of every attempt, for a restarted stream).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }
}

/// Ended streams stay ended: polling one again is allowed and yields `None`.
impl<O: DeserializeOwned> futures::stream::FusedStream for ItemStream<O> {
    fn is_terminated(&self) -> bool {
        self.ended
    }
}

impl<O: DeserializeOwned> Stream for ItemStream<O> {
    type Item = Result<O, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let function = Arc::clone(&self.function);
        let polled = self.inner.poll_next_unpin(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.ended = true;
        }
        polled.map(|item| {
            item.map(|r| {
                r.and_then(|bytes| {
                    rmp_serde::from_slice(&bytes)
                        .map_err(|e| CallError::Deserialize { function: function.to_string(), detail: e.to_string() })
                })
            })
        })
    }
}

/// Start (lazily) a stream of `function` with the encoded `payload` on `shared` (kept alive by
/// `keep`, the pool's handle).
pub(super) fn start<O, K>(keep: K, shared: Arc<PoolShared>, function: &str, payload: Result<Vec<u8>, CallError>, opts: StreamOptions) -> ItemStream<O>
where
    K: Send + Sync + 'static,
{
    let flow = StreamFlow::new(opts.credit);
    let delivered = Arc::new(AtomicU64::new(0));
    let function: Arc<str> = Arc::from(function);
    let call = StreamCall {
        _keep: Box::new(keep),
        shared,
        function: Arc::clone(&function),
        payload,
        opts,
        flow: Arc::clone(&flow),
        delivered: Arc::clone(&delivered),
        state: None,
        done: false,
    };
    let inner = futures::stream::unfold(call, |mut call| async move { call.next().await.map(|item| (item, call)) }).boxed();
    ItemStream { inner, flow, delivered, function, ended: false, _out: PhantomData }
}

/// One stream's state across its attempts.
struct StreamCall {
    _keep: Box<dyn Send + Sync>,
    shared: Arc<PoolShared>,
    function: Arc<str>,
    /// The encoded input, or why it could not be encoded (the first item then).
    payload: Result<Vec<u8>, CallError>,
    opts: StreamOptions,
    flow: Arc<StreamFlow>,
    delivered: Arc<AtomicU64>,
    /// Set once admitted.
    state: Option<Admission>,
    done: bool,
}

/// What admission decided, and the attempts so far.
struct Admission {
    id: u64,
    called: Instant,
    deadline: Option<Instant>,
    queue_until: Instant,
    barrier: CallBarrier,
    trace: Option<CallTrace>,
    attempt_trace: Option<AttemptTrace>,
    previous_attempt: Option<AttemptTrace>,
    /// The attempt streaming now.
    active: Option<Active>,
    /// Items received from the attempt streaming now.
    received: u64,
    /// A first attempt has been admitted to the queue.
    queued: bool,
}

impl Admission {
    /// `Timeout` for this stream: the time from its first poll to its deadline; `sent`: it had
    /// reached a worker.
    fn timeout(&self, function: &str, sent: bool) -> CallError {
        CallError::Timeout {
            function: function.to_string(),
            after: self.deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(self.called)),
            sent,
        }
    }
}

/// The attempt streaming now.
struct Active {
    /// Dropped before the end: the stream is abandoned and `cancel` sent.
    in_flight: InFlight,
    rx: UnboundedReceiver<StreamEvent>,
    slot: Arc<WorkerSlot>,
    grants: Grants,
    attempt: u32,
}

impl StreamCall {
    /// The next item, or the terminal error, or `None` after the end.
    async fn next(&mut self) -> Option<Result<Bytes, CallError>> {
        if self.done {
            return None;
        }
        let result = self.step().await;
        match result {
            Some(Ok(_)) => {}
            Some(Err(CallError::StreamRestarted { .. })) => {}
            Some(Err(ref e)) => self.finish(Err(e)),
            None => self.finish(Ok(())),
        }
        result
    }

    /// Record the end (spans, metrics) and drop the attempt.
    fn finish(&mut self, result: Result<(), &CallError>) {
        self.done = true;
        if let Some(mut st) = self.state.take() {
            if let (Err(CallError::Timeout { .. }), Some(a)) = (result, &mut st.attempt_trace) {
                a.timed_out();
            }
            let attempts = st.barrier.attempt();
            if let Some(t) = st.trace.take() {
                t.finish(result, attempts);
            }
            crate::observe::metrics::call_done(
                &self.shared.name,
                &self.function,
                result.map_or_else(CallError::kind, |()| "ok"),
                st.called.elapsed().as_secs_f64(),
            );
        }
    }

    async fn step(&mut self) -> Option<Result<Bytes, CallError>> {
        let payload = match &self.payload {
            Ok(p) => p,
            Err(e) => return Some(Err(e.clone())),
        };
        if self.state.is_none() {
            let call_opts = &self.opts.call;
            let admitted = match admit(&self.shared, &self.function, None, payload, call_opts, true) {
                Ok(a) => a,
                Err(e) => return Some(Err(e)),
            };
            let spec = &self.shared.spec;
            let queue_until = {
                let q = admitted.called + spec.queue_timeout;
                admitted.deadline.map_or(q, |d| d.min(q))
            };
            let trace = CallTrace::start(&self.shared.name, &self.function, admitted.traceparent, admitted.tracestate);
            if let Some(t) = &trace {
                t.idempotent(admitted.idempotent);
            }
            self.state = Some(Admission {
                id: admitted.id,
                called: admitted.called,
                deadline: admitted.deadline,
                queue_until,
                barrier: CallBarrier::new(RetryPolicy::from_spec(spec), admitted.idempotent),
                trace,
                attempt_trace: None,
                previous_attempt: None,
                active: None,
                received: 0,
                queued: false,
            });
        }
        loop {
            let st = self.state.as_mut()?;
            if st.active.is_none() {
                if let Err(e) = begin(&self.shared, &self.function, payload, &self.opts, &self.flow, st).await {
                    return Some(Err(e));
                }
            }
            let active = st.active.as_mut()?;
            // The deadline first: a reader slower than its generator always finds an item
            // waiting, and a timeout that polls the channel first would never fire.
            let event = match st.deadline {
                Some(d) if Instant::now() >= d => None,
                Some(d) => tokio::time::timeout_at(d, active.rx.recv()).await.ok(),
                None => Some(active.rx.recv().await),
            };
            let Some(event) = event else {
                // The deadline covers the whole stream: cancelled as the attempt drops.
                return Some(Err(st.timeout(&self.function, true)));
            };
            match event {
                Some(StreamEvent::Item(value)) => {
                    self.flow.taken();
                    st.received += 1;
                    self.delivered.fetch_add(1, Ordering::AcqRel);
                    if let Some(n) = active.grants.taken(self.flow.window()) {
                        // Counted before it is written: the reader must never see an item the
                        // grant allowed before it knows of the grant.
                        self.flow.grant(n);
                        if let Some(w) = active.slot.writer() {
                            let _ = w.send(&encode_credit(st.id, n));
                        }
                    }
                    return Some(Ok(value));
                }
                Some(StreamEvent::End(outcome)) => {
                    let mut active = st.active.take()?;
                    active.in_flight.done();
                    record_function_span(st.attempt_trace.as_ref(), &outcome, &self.function, st.id, active.attempt, &active.slot);
                    let certificate = match outcome.result {
                        Ok(_) => return None,
                        // Going away, it did not run it: the same attempt, another worker —
                        // unless it sent items first (a worker that breaks the protocol): going
                        // on elsewhere would repeat them silently.
                        Err(Failure::Remote(e)) if e.kind == RemoteErrorKind::Refused && st.received == 0 => continue,
                        Err(Failure::Remote(e)) if e.kind == RemoteErrorKind::Refused => {
                            return Some(Err(CallError::Worker {
                                function: self.function.to_string(),
                                message: format!("the worker refused the stream after sending {} items", st.received),
                            }))
                        }
                        Err(Failure::Remote(e)) => {
                            return Some(Err(CallError::from_remote(&self.function, e, self.shared.functions().as_deref())))
                        }
                        Err(Failure::ShutDown) => return Some(Err(self.shared.closed_error())),
                        Err(Failure::Crashed(c)) => c,
                    };
                    if let Some(a) = &mut st.attempt_trace {
                        a.crashed(&certificate);
                    }
                    st.previous_attempt = st.attempt_trace.take();
                    let delivered = std::mem::take(&mut st.received);
                    let crashed = |attempts| CallError::WorkerCrashed {
                        function: self.function.to_string(),
                        attempts,
                        certificate: Arc::clone(&certificate),
                        started: true,
                        delivered: Some(delivered),
                    };
                    // Nothing delivered: a call that crashed. Items delivered: a restart only
                    // if asked for.
                    if delivered > 0 && !self.opts.restart_on_crash {
                        return Some(Err(crashed(active.attempt)));
                    }
                    match st.barrier.on_crash(st.id, Arc::clone(&certificate)) {
                        CrashVerdict::Retry { .. } => {
                            self.shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                            crate::observe::metrics::retry(&self.shared.name, &self.function);
                            if let Some(t) = &st.trace {
                                t.retrying(st.barrier.attempt());
                            }
                            if delivered > 0 {
                                return Some(Err(CallError::StreamRestarted {
                                    function: self.function.to_string(),
                                    delivered,
                                    attempt: st.barrier.attempt(),
                                    certificate,
                                }));
                            }
                        }
                        CrashVerdict::Fail | CrashVerdict::Exhausted => return Some(Err(crashed(active.attempt))),
                        CrashVerdict::Poison => {
                            return Some(Err(poisoned(
                                &self.shared,
                                &self.function,
                                (payload, self.opts.call.buffers()),
                                st.trace.as_ref(),
                                active.attempt,
                                st.barrier.certificates(),
                            )))
                        }
                    }
                }
                // The table dropped the stream without an end: the pool is gone.
                None => return Some(Err(self.shared.closed_error())),
            }
        }
    }
}

/// Start the stream's current attempt on a worker: reserve one, register the stream, send it.
async fn begin(
    shared: &PoolShared,
    function: &Arc<str>,
    payload: &[u8],
    opts: &StreamOptions,
    flow: &Arc<StreamFlow>,
    st: &mut Admission,
) -> Result<(), CallError> {
    let spec = &shared.spec;
    loop {
        let attempt = st.barrier.attempt();
        let want = if st.barrier.is_suspect() { Want::Alone { call_id: st.id } } else { Want::Any };
        let until = if attempt == 1 { st.queue_until } else { st.deadline.unwrap_or_else(|| Instant::now() + spec.queue_timeout) };
        let reservation = match acquire(shared, want, !st.queued, until, st.trace.as_ref(), attempt).await {
            Ok(r) => r,
            Err(QueueExit::Full) => return Err(CallError::Overloaded { pool: shared.name.to_string(), max_queue: spec.max_queue }),
            Err(QueueExit::Closed) => return Err(shared.closed_error()),
            Err(QueueExit::Gone) => continue,
            Err(QueueExit::TimedOut) => {
                let expired = st.deadline.is_some_and(|d| Instant::now() >= d);
                let last = st.barrier.certificates().last();
                return Err(match last {
                    _ if expired => st.timeout(function, last.is_some()),
                    // Retries found no worker in time: report the crash.
                    Some(last) => CallError::WorkerCrashed {
                        function: function.to_string(),
                        attempts: attempt - 1,
                        certificate: Arc::clone(last),
                        started: true,
                        delivered: Some(0),
                    },
                    None => CallError::QueueTimeout { function: function.to_string(), waited: st.called.elapsed() },
                });
            }
        };
        st.queued = true;
        if st.deadline.is_some_and(|d| Instant::now() >= d) {
            // Expired while queued: never sent (the reservation goes back as it drops).
            return Err(st.timeout(function, !st.barrier.certificates().is_empty()));
        }
        let slot = Arc::clone(&reservation.slot);
        if !slot.capabilities().streams() {
            // Its adapter announced a generator but cannot stream it: not a stream here.
            return Err(CallError::StreamMismatch { function: function.to_string(), stream: false });
        }
        flow.restart();
        let deadline = st.deadline.map(Instant::into_std);
        let Ok((in_flight, rx)) = reservation.register_stream(st.id, attempt, function, deadline, Arc::clone(flow)) else { continue };
        st.attempt_trace = st.trace.as_ref().map(|t| t.attempt(attempt, &slot.id, slot.pid().unwrap_or(0), st.previous_attempt.as_ref()));
        let wire = st.attempt_trace.as_ref().map(|a| crate::observe::tracing_ctx::traceparent(a.context()));
        let (tp, ts) = match &wire {
            Some((tp, ts)) => (Some(tp.as_str()), ts.as_deref()),
            None => (opts.call.traceparent_str(), opts.call.tracestate_str()),
        };
        if let Some(w) = slot.writer() {
            // A failed write means the worker is going down; its actor ends this stream.
            let header = CallHeader { id: st.id, attempt, function, deadline_ms: st.deadline.map(unix_ms), traceparent: tp, tracestate: ts };
            let _ = super::call::send_call(w, &slot, payload, opts.call.buffers(), |len| encode_call_options_head(&header, WireCallOptions::stream(opts.credit), len));
        }
        st.active = Some(Active { in_flight, rx, slot, grants: Grants::default(), attempt });
        return Ok(());
    }
}
