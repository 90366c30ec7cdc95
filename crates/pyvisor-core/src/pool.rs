//! The pool handle and the path of one call.
//!
//! Owns [`Pool`] (cheap to clone), [`CallOptions`], and the data path: encode the input, pick
//! a ready worker through the shared slot table (or wait in the bounded queue), register the
//! call in that worker's table, write its frame, await the reply on a oneshot. No actor is on
//! this path; the router actor is asked only for status and shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pyvisor_protocol::{call_overhead, encode_call, encode_call_head, encode_cancel, CallHeader, FunctionInfo, RemoteError, RemoteErrorKind};
use ractor::{Actor, ActorCell, ActorRef};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::death::{DeathCertificate, WorkerId};
use crate::error::{CallError, PythonError, StartError};
use crate::events::PoolEvent;
use crate::call_trace::{AttemptTrace, CallTrace};
use crate::function_span::FunctionSpan;
use crate::queue::{CapacityQueue, QueueExit};
use crate::router::{PoolRouter, RouterArgs, RouterMsg};
use crate::routing::{PickMode, SlotTable};
use crate::slot::{Failure, WorkerSlot};
use crate::spec::PoolSpec;
use crate::status::PoolStatus;

/// State shared by the pool's handles, its router, its workers and their reader tasks.
pub(crate) struct PoolShared {
    pub name: Arc<str>,
    pub spec: PoolSpec,
    pub python: PathBuf,
    pub table: SlotTable,
    pub queue: CapacityQueue,
    next_call_id: AtomicU64,
    next_worker_id: AtomicU64,
    functions: RwLock<Option<Arc<Vec<FunctionInfo>>>>,
    failed: Mutex<Option<Arc<StartError>>>,
    pub quarantine: Quarantine,
    pub stats: PoolStats,
    deaths: Mutex<std::collections::VecDeque<Arc<DeathCertificate>>>,
    members: RwLock<Vec<Arc<WorkerSlot>>>,
}

/// Death certificates a pool keeps for [`Pool::death_certificates`].
pub const KEPT_CERTIFICATES: usize = 64;

/// Counters of a pool's fault handling.
#[derive(Default)]
pub(crate) struct PoolStats {
    pub retried: AtomicU64,
    pub poisoned: AtomicU64,
    pub crashes: AtomicU64,
    pub recycles: AtomicU64,
}

struct QuarantineEntry {
    until: Instant,
    certificates: Vec<Arc<DeathCertificate>>,
}

/// Fingerprints (function + payload hash) of poison requests, refused until their window ends.
#[derive(Default)]
pub(crate) struct Quarantine {
    active: AtomicU64,
    entries: Mutex<HashMap<u64, QuarantineEntry>>,
}

pub(crate) struct Quarantined {
    pub until: Instant,
    pub certificates: Vec<Arc<DeathCertificate>>,
}

impl Quarantine {
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }
    fn insert(&self, fp: u64, until: Instant, certificates: Vec<Arc<DeathCertificate>>) {
        if let Ok(mut e) = self.entries.lock() {
            e.insert(fp, QuarantineEntry { until, certificates });
            self.active.store(e.len() as u64, Ordering::Release);
        }
    }
    fn get(&self, fp: u64) -> Option<Quarantined> {
        let mut e = self.entries.lock().ok()?;
        let now = Instant::now();
        e.retain(|_, q| q.until > now);
        self.active.store(e.len() as u64, Ordering::Release);
        e.get(&fp).map(|q| Quarantined { until: q.until, certificates: q.certificates.clone() })
    }
}

fn fingerprint(function: &str, payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    function.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl PoolShared {
    fn new(spec: PoolSpec, python: PathBuf) -> Self {
        PoolShared {
            name: Arc::from(spec.name.as_str()),
            spec,
            python,
            table: SlotTable::default(),
            queue: CapacityQueue::default(),
            next_call_id: AtomicU64::new(1),
            next_worker_id: AtomicU64::new(1),
            functions: RwLock::new(None),
            failed: Mutex::new(None),
            quarantine: Quarantine::default(),
            stats: PoolStats::default(),
            deaths: Mutex::new(std::collections::VecDeque::new()),
            members: RwLock::new(Vec::new()),
        }
    }

    pub(crate) fn next_worker_id(&self) -> WorkerId {
        WorkerId(self.next_worker_id.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn set_functions(&self, f: &[FunctionInfo]) {
        if let Ok(mut g) = self.functions.write() {
            if g.as_ref().map_or(true, |cur| cur.as_slice() != f) {
                *g = Some(Arc::new(f.to_vec()));
            }
        }
    }

    pub(crate) fn functions(&self) -> Option<Arc<Vec<FunctionInfo>>> {
        self.functions.read().ok().and_then(|g| g.clone())
    }

    pub(crate) fn fail(&self, err: Arc<StartError>) {
        if let Ok(mut g) = self.failed.lock() {
            *g = Some(err);
        }
        self.queue.close();
    }

    pub(crate) fn close(&self) {
        self.queue.close();
    }

    /// Every worker the router holds now (any state), for gauges.
    pub(crate) fn members(&self) -> Vec<Arc<WorkerSlot>> {
        self.members.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub(crate) fn set_members(&self, m: Vec<Arc<WorkerSlot>>) {
        if let Ok(mut g) = self.members.write() {
            *g = m;
        }
    }

    pub(crate) fn record_death(&self, cert: Arc<DeathCertificate>) {
        if let Ok(mut d) = self.deaths.lock() {
            if d.len() == KEPT_CERTIFICATES {
                d.pop_front();
            }
            d.push_back(cert);
        }
    }

    fn closed_error(&self) -> CallError {
        match self.failed.lock().ok().and_then(|g| g.clone()) {
            Some(reason) => CallError::PoolFailed { pool: self.name.to_string(), reason },
            None => CallError::ShutDown { pool: self.name.to_string() },
        }
    }

    pub(crate) fn emit(&self, event: PoolEvent) {
        // Each lifecycle occurrence is a short span of its own, so that it reaches traces too.
        let pool = &*self.name;
        match &event {
            PoolEvent::WorkerSpawned { worker, index, pid } => {
                let _s = tracing::debug_span!("pyvisor.worker.spawn", pyvisor.pool = pool, pyvisor.worker.id = %worker, pyvisor.worker.index = index, process.pid = pid).entered();
                tracing::info!(pool, worker = %worker, index, pid, "worker spawned")
            }
            PoolEvent::WorkerReady { worker, pid, startup, .. } => {
                let _s = tracing::debug_span!("pyvisor.worker.ready", pyvisor.pool = pool, pyvisor.worker.id = %worker, process.pid = pid, pyvisor.startup_ms = startup.as_millis() as u64).entered();
                tracing::info!(pool, worker = %worker, pid, startup_ms = startup.as_millis() as u64, "worker ready")
            }
            PoolEvent::WorkerDied { certificate: c } => {
                let _s = tracing::info_span!(
                    "pyvisor.worker.crash",
                    otel.status_code = "ERROR",
                    pyvisor.pool = pool,
                    pyvisor.worker.id = %c.worker,
                    process.pid = c.pid.unwrap_or(0),
                    pyvisor.death.cause = c.cause.kind(),
                    pyvisor.exit.code = c.exit_code.unwrap_or(0),
                    pyvisor.exit.signal = c.signal.unwrap_or(0),
                    pyvisor.became_ready = c.became_ready,
                    pyvisor.uptime_ms = c.uptime.as_millis() as u64,
                    pyvisor.calls_in_flight = c.calls_in_flight.len(),
                    pyvisor.oom_suspected = c.oom_suspected,
                )
                .entered();
                tracing::warn!(exception.type = "WorkerDied", exception.message = %c, "death certificate")
            }
            PoolEvent::RestartScheduled { index, failures, delay } => {
                let _s = tracing::debug_span!("pyvisor.worker.restart_scheduled", pyvisor.pool = pool, pyvisor.worker.index = index, pyvisor.failures = failures, pyvisor.backoff_ms = delay.as_millis() as u64).entered();
                tracing::warn!(pool, index, failures, delay_ms = delay.as_millis() as u64, "worker start failed; restart scheduled")
            }
            PoolEvent::PoolFailed { reason } => {
                let _s = tracing::debug_span!("pyvisor.pool.failed", otel.status_code = "ERROR", pyvisor.pool = pool).entered();
                tracing::error!(pool, "pool failed: {reason}")
            }
            PoolEvent::PoolStopped => tracing::info!(pool, "pool stopped"),
            PoolEvent::Quarantined { function, window } => {
                let _s = tracing::debug_span!("pyvisor.quarantine", pyvisor.pool = pool, rpc.method = %function, pyvisor.quarantine_s = window.as_secs()).entered();
                tracing::error!(pool, function, window_s = window.as_secs(), "poison request quarantined")
            }
            PoolEvent::Recycled { worker, reason } => {
                let _s = tracing::debug_span!("pyvisor.worker.recycle", pyvisor.pool = pool, pyvisor.worker.id = %worker, pyvisor.recycle.reason = %reason).entered();
                tracing::info!(pool, worker = %worker, reason = %reason, "worker recycled")
            }
        }
        if let Some(cb) = &self.spec.on_event {
            cb(&event);
        }
    }
}

/// Per-call options: timeout or deadline, and the idempotency override.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::CallOptions;
/// let opts = CallOptions::new().timeout(Duration::from_millis(250)).idempotent(true);
/// assert_eq!(opts.idempotent_override(), Some(true));
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    no_timeout: bool,
    idempotent: Option<bool>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl CallOptions {
    /// The pool's defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Fail with `Timeout` after `d` (instead of the pool's call timeout).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// Fail with `Timeout` at `at` (takes precedence over any timeout).
    pub fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }
    /// No timeout at all for this call.
    pub fn no_timeout(mut self) -> Self {
        self.no_timeout = true;
        self
    }
    /// Override whether this call may be retried after a crash (default: the function's
    /// `@expose(idempotent=...)`).
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = Some(yes);
        self
    }
    /// The idempotency override, if set.
    pub fn idempotent_override(&self) -> Option<bool> {
        self.idempotent
    }
    /// Propagate this W3C trace context to the worker.
    pub fn trace_context(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }
}

struct PoolInner {
    shared: Arc<PoolShared>,
    router: ActorRef<RouterMsg>,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PoolInner {
    /// The last handle is gone: shut the pool down (gracefully, in the background).
    fn drop(&mut self) {
        if !self.shared.queue.is_closed() {
            self.shared.close();
            let (tx, _rx) = oneshot::channel();
            let _ = self.router.cast(RouterMsg::Shutdown(tx.into()));
        }
    }
}

/// A running pool of Python workers. Cheap to clone; every clone is the same pool. The pool
/// runs until [`Pool::shutdown`] or until its last handle is dropped (which starts the same
/// shutdown in the background).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_core::{Pool, PoolSpec};
/// let pool = Pool::start(PoolSpec::script("worker.py").workers(2)).await?;
/// let sum: i64 = pool.call("add", &(1, 2)).await?;
/// assert_eq!(sum, 3);
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.inner.shared.name).finish_non_exhaustive()
    }
}

/// Undo a reservation if the call ends before it is registered or answered.
struct InFlightGuard<'a> {
    slot: &'a WorkerSlot,
    id: u64,
    armed: bool,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.armed && self.slot.abandon(self.id) {
            if let Some(w) = self.slot.writer() {
                let _ = w.send(&encode_cancel(self.id));
            }
        }
    }
}

fn unix_ms(at: Instant) -> u64 {
    let from_now = at.saturating_duration_since(Instant::now());
    (SystemTime::now() + from_now).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Pool {
    /// Start a pool and wait until every worker is ready. Start failures are retried with
    /// backoff; more than `max_start_failures` fail the start with the last death certificate.
    pub async fn start(spec: PoolSpec) -> Result<Pool, StartError> {
        Self::start_inner(spec, None).await
    }

    /// Like [`Pool::start`], with the pool's router linked under `supervisor`: the supervisor
    /// receives ordinary `SupervisionEvent`s for it (a failed pool arrives as `ActorFailed`
    /// with a [`crate::PoolFailure`]).
    pub async fn start_linked(spec: PoolSpec, supervisor: ActorCell) -> Result<Pool, StartError> {
        Self::start_inner(spec, Some(supervisor)).await
    }

    async fn start_inner(spec: PoolSpec, supervisor: Option<ActorCell>) -> Result<Pool, StartError> {
        let python = spec.validate()?;
        // Once per process: stop what earlier, crashed runs of this program left behind.
        static REAPED: std::sync::Once = std::sync::Once::new();
        REAPED.call_once(|| {
            crate::process::reap_orphans();
        });
        let shared = Arc::new(PoolShared::new(spec, python));
        crate::metrics::register_pool(&shared);
        let (tx, rx) = oneshot::channel();
        let args = RouterArgs { shared: Arc::clone(&shared), startup: Some(tx) };
        let spawned = match supervisor {
            Some(sup) => Actor::spawn_linked(None, PoolRouter, args, sup).await,
            None => Actor::spawn(None, PoolRouter, args).await,
        };
        let (router, join) = spawned.map_err(|e| StartError::Actor(e.to_string()))?;
        match rx.await {
            Ok(Ok(())) => Ok(Pool { inner: Arc::new(PoolInner { shared, router, join: Mutex::new(Some(join)) }) }),
            Ok(Err(e)) => {
                let _ = join.await;
                Err(e)
            }
            Err(_) => {
                let _ = join.await;
                Err(StartError::Actor("the pool router stopped while starting".into()))
            }
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The router actor, e.g. to link or monitor it.
    pub fn actor(&self) -> ActorCell {
        self.inner.router.get_cell()
    }

    /// The functions the workers expose (from their `hello`).
    pub fn functions(&self) -> Vec<FunctionInfo> {
        self.inner.shared.functions().map(|f| f.to_vec()).unwrap_or_default()
    }

    /// Call `function` with `input`, deserializing the result as `O`.
    pub async fn call<I, O>(&self, function: &str, input: &I) -> Result<O, CallError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        self.call_with(function, input, CallOptions::default()).await
    }

    /// [`Pool::call`] with options.
    pub async fn call_with<I, O>(&self, function: &str, input: &I, opts: CallOptions) -> Result<O, CallError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        let payload = rmp_serde::to_vec_named(input)
            .map_err(|e| CallError::Serialize { function: function.to_string(), detail: e.to_string() })?;
        let reply = self.call_raw(function, &payload, opts).await?;
        rmp_serde::from_slice(&reply)
            .map_err(|e| CallError::Deserialize { function: function.to_string(), detail: e.to_string() })
    }

    /// Call with an already-encoded MessagePack payload; returns the encoded result.
    pub async fn call_raw(&self, function: &str, payload: &[u8], opts: CallOptions) -> Result<Bytes, CallError> {
        let shared = &*self.inner.shared;
        let started = Instant::now();
        let trace = CallTrace::start(&shared.name, function, opts.traceparent.as_deref(), opts.tracestate.as_deref());
        let mut attempts = 0;
        let result = self.call_inner(function, payload, opts, trace.as_ref(), &mut attempts).await;
        if let Some(t) = trace {
            t.finish(result.as_ref().map(|_| ()), attempts);
        }
        crate::metrics::call_done(
            &shared.name,
            function,
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn call_inner(
        &self,
        function: &str,
        payload: &[u8],
        opts: CallOptions,
        trace: Option<&CallTrace>,
        attempts: &mut u32,
    ) -> Result<Bytes, CallError> {
        let shared = &*self.inner.shared;
        let spec = &shared.spec;
        let called = Instant::now();
        let deadline = match (opts.deadline, opts.no_timeout) {
            (Some(d), _) => Some(d),
            (None, true) => None,
            (None, false) => opts.timeout.or(spec.call_timeout).map(|t| called + t),
        };
        // One look at the function table: the name must exist; its flag is the default idempotency.
        let mut exposed_idempotent = false;
        if let Some(funcs) = shared.functions() {
            match funcs.iter().find(|f| f.name == function) {
                Some(f) => exposed_idempotent = f.idempotent,
                None => {
                    return Err(CallError::UnknownFunction {
                        function: function.to_string(),
                        available: funcs.iter().map(|f| f.name.clone()).collect(),
                    })
                }
            }
        }
        let header = CallHeader {
            id: shared.next_call_id.fetch_add(1, Ordering::Relaxed),
            attempt: 1,
            function,
            deadline_ms: deadline.map(unix_ms),
            traceparent: opts.traceparent.as_deref(),
            tracestate: opts.tracestate.as_deref(),
        };
        let size = call_overhead(&header) + payload.len();
        if size > spec.max_frame {
            return Err(CallError::PayloadTooLarge { function: function.to_string(), size, max: spec.max_frame });
        }
        let fingerprint = || fingerprint(function, payload);
        if shared.quarantine.is_active() {
            if let Some(q) = shared.quarantine.get(fingerprint()) {
                return Err(CallError::PoisonRequest {
                    function: function.to_string(),
                    certificates: q.certificates,
                    quarantined_for: q.until.saturating_duration_since(Instant::now()),
                    refused: true,
                });
            }
        }
        let idempotent = opts.idempotent.unwrap_or(exposed_idempotent);
        if let Some(t) = trace {
            t.idempotent(idempotent);
        }
        let mut previous_attempt: Option<AttemptTrace> = None;
        let queue_until = {
            let q = called + spec.queue_timeout;
            deadline.map_or(q, |d| d.min(q))
        };
        let timeout_err = |sent: bool| CallError::Timeout {
            function: function.to_string(),
            after: deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(called)),
            sent,
        };
        let mut header = header;
        let mut certificates: Vec<Arc<DeathCertificate>> = Vec::new();
        let mut alone_evidence = 0u32;
        let mut fault_before = false;
        let mut suspect = false;
        loop {
            // A first attempt waits in the bounded queue; a retry was admitted already and waits
            // for a worker up to the call's deadline.
            let (mode, max_queue, until) = if header.attempt == 1 {
                (PickMode::Normal, spec.max_queue, queue_until)
            } else {
                let until = deadline.unwrap_or_else(|| Instant::now() + spec.queue_timeout);
                let mode = if suspect { PickMode::Alone { call_id: header.id } } else { PickMode::Normal };
                (mode, usize::MAX, until)
            };
            // A call that finds room at once has no queue-wait span.
            let acquired = match shared.queue.try_acquire(&shared.table, mode) {
                Some(now) => now,
                None => {
                    let _wait = trace.map(|t| t.queue_wait(header.attempt));
                    shared.queue.acquire(&shared.table, mode, max_queue, until).await
                }
            };
            let slot = match acquired {
                Ok(s) => s,
                Err(QueueExit::Full) => {
                    return Err(CallError::Overloaded { pool: shared.name.to_string(), max_queue: spec.max_queue })
                }
                Err(QueueExit::Closed) => return Err(shared.closed_error()),
                Err(QueueExit::TimedOut) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(timeout_err(!certificates.is_empty()));
                    }
                    if let Some(last) = certificates.last() {
                        // Retries found no worker in time: report the crash.
                        return Err(CallError::WorkerCrashed {
                            function: function.to_string(),
                            attempts: header.attempt - 1,
                            certificate: Arc::clone(last),
                        });
                    }
                    return Err(CallError::QueueTimeout { function: function.to_string(), waited: called.elapsed() });
                }
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // Expired while queued: never sent.
                slot.release();
                shared.queue.on_release();
                return Err(timeout_err(!certificates.is_empty()));
            }
            let Ok(rx) = slot.register(header.id, header.attempt, function, deadline.map(Instant::into_std), None) else {
                slot.release();
                continue;
            };
            let mut guard = InFlightGuard { slot: &slot, id: header.id, armed: true };
            *attempts = header.attempt;
            let mut attempt_trace =
                trace.map(|t| t.attempt(header.attempt, &slot.id, slot.pid().unwrap_or(0), previous_attempt.as_ref()));
            let wire = attempt_trace.as_ref().map(|a| crate::tracing_ctx::traceparent(a.context()));
            let (tp, ts) = match &wire {
                Some((tp, ts)) => (Some(tp.as_str()), ts.as_deref()),
                // Without tracing, the caller's own trace context (if any) passes through.
                None => (header.traceparent, header.tracestate),
            };
            if let Some(w) = slot.writer() {
                // A failed write means the worker is going down; its actor fails this call.
                let head = encode_call_head(&CallHeader { traceparent: tp, tracestate: ts, ..header }, payload.len());
                let _ = w.send_parts(&head, payload);
            }
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, rx).await.ok(),
                    None => Some(rx.await),
                }
            };
            let Some(outcome) = wait.await else {
                if let Some(a) = &mut attempt_trace {
                    a.timed_out();
                }
                return Err(timeout_err(true));
            };
            guard.armed = false;
            let Ok(outcome) = outcome else { return Err(shared.closed_error()) };
            // The Python function's span, from the worker's timing (sampled traces only).
            let sampled = attempt_trace.as_ref().map(AttemptTrace::context).filter(|c| c.is_sampled());
            if let (Some(attempt), Some(timing)) = (sampled, outcome.span) {
                crate::function_span::record(FunctionSpan {
                    attempt,
                    timing,
                    function,
                    call_id: header.id,
                    attempt_no: header.attempt,
                    worker: &slot.id,
                    pid: slot.pid().unwrap_or(0),
                    error: match &outcome.result {
                        Err(Failure::Remote(e)) => Some(e),
                        _ => None,
                    },
                });
            }
            let certificate = match outcome.result {
                Ok(bytes) => return Ok(bytes),
                Err(Failure::Remote(e)) => return Err(remote_error(function, e, shared)),
                Err(Failure::ShutDown) => return Err(shared.closed_error()),
                Err(Failure::Crashed(certificate)) => certificate,
            };
            // The crash barrier.
            if let Some(a) = &mut attempt_trace {
                a.crashed(&certificate);
            }
            previous_attempt = attempt_trace;
            certificates.push(Arc::clone(&certificate));
            if !idempotent {
                return Err(CallError::WorkerCrashed { function: function.to_string(), attempts: header.attempt, certificate });
            }
            let evidence = certificate.implicates_calls();
            let alone = certificate.calls_in_flight.len() == 1;
            if evidence && alone {
                alone_evidence += 1;
            }
            if evidence && alone && (alone_evidence >= spec.poison_threshold || fault_before) {
                let until = Instant::now() + spec.quarantine_window;
                shared.quarantine.insert(fingerprint(), until, certificates.clone());
                shared.stats.poisoned.fetch_add(1, Ordering::Relaxed);
                tracing::error!(pool = %shared.name, function, attempts = header.attempt, "poison request quarantined");
                if let Some(t) = trace {
                    t.quarantined();
                }
                shared.emit(PoolEvent::Quarantined { function: function.to_string(), window: spec.quarantine_window });
                return Err(CallError::PoisonRequest {
                    function: function.to_string(),
                    certificates,
                    quarantined_for: spec.quarantine_window,
                    refused: false,
                });
            }
            fault_before |= evidence && certificate.is_fault();
            if header.attempt > spec.max_retries {
                return Err(CallError::WorkerCrashed { function: function.to_string(), attempts: header.attempt, certificate });
            }
            suspect = true;
            header.attempt += 1;
            shared.stats.retried.fetch_add(1, Ordering::Relaxed);
            crate::metrics::retry(&shared.name, function);
            if let Some(t) = trace {
                t.retrying(header.attempt);
            }
            tracing::debug!(pool = %shared.name, function, attempt = header.attempt, "retrying after a crash");
        }
    }

    /// The last death certificates of this pool's workers (up to [`KEPT_CERTIFICATES`]),
    /// oldest first.
    pub fn death_certificates(&self) -> Vec<Arc<DeathCertificate>> {
        self.inner.shared.deaths.lock().map(|d| d.iter().cloned().collect()).unwrap_or_default()
    }

    /// Fault injection for tests: kill or stop workers, arm chaos points.
    pub fn chaos(&self) -> crate::chaos::Chaos {
        crate::chaos::Chaos { shared: Arc::clone(&self.inner.shared) }
    }

    /// A snapshot of every position: worker, pid, state, in flight, served, restarts.
    pub async fn status(&self) -> PoolStatus {
        match self.inner.router.call(RouterMsg::Status, Some(Duration::from_secs(5))).await {
            Ok(ractor::rpc::CallResult::Success(s)) => s,
            _ => PoolStatus {
                name: self.inner.shared.name.to_string(),
                workers: Vec::new(),
                queued: self.inner.shared.queue.len(),
                closed: true,
                retried: 0,
                poisoned: 0,
                crashes: 0,
                recycles: 0,
            },
        }
    }

    /// Stop taking calls, let calls in flight finish (shutdown grace), then stop every worker
    /// (`shutdown` → SIGTERM → SIGKILL to its process group). Idempotent.
    pub async fn shutdown(&self) {
        let inner = &*self.inner;
        inner.shared.close();
        let spec = &inner.shared.spec;
        let budget = spec.shutdown_grace + spec.sigterm_wait + Duration::from_secs(10);
        let _ = inner.router.call(RouterMsg::Shutdown, Some(budget)).await;
        let join = inner.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.await;
        }
    }
}

fn remote_error(function: &str, e: RemoteError, shared: &PoolShared) -> CallError {
    let function = function.to_string();
    match e.kind {
        RemoteErrorKind::Exception => CallError::Python {
            function,
            error: Box::new(PythonError { type_name: e.type_name, message: e.message, traceback: e.traceback }),
        },
        RemoteErrorKind::UnknownFunction => CallError::UnknownFunction {
            function,
            available: e.functions.unwrap_or_else(|| {
                shared.functions().map(|f| f.iter().map(|f| f.name.clone()).collect()).unwrap_or_default()
            }),
        },
        RemoteErrorKind::ReplyTooLarge | RemoteErrorKind::Unserializable => {
            CallError::BadResult { function, message: format!("{}: {}", e.type_name, e.message) }
        }
        _ => CallError::Worker { function, message: format!("{}: {}", e.type_name, e.message) },
    }
}

/// Call `function` on this particular worker (control calls such as chaos arming), waiting up to
/// `timeout` for room on it.
pub(crate) async fn call_on_slot(
    shared: &PoolShared,
    slot: &Arc<WorkerSlot>,
    function: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Bytes, CallError> {
    let until = Instant::now() + timeout;
    let gone = || CallError::Worker { function: function.to_string(), message: format!("worker {} is gone", slot.id) };
    while !slot.try_reserve() {
        if slot.state() == crate::slot::WorkerState::Dead {
            return Err(gone());
        }
        if Instant::now() >= until {
            return Err(CallError::Timeout { function: function.to_string(), after: timeout, sent: false });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let header = CallHeader {
        id: shared.next_call_id.fetch_add(1, Ordering::Relaxed),
        attempt: 1,
        function,
        deadline_ms: Some(unix_ms(until)),
        traceparent: None,
        tracestate: None,
    };
    let Ok(rx) = slot.register(header.id, 1, function, Some(until.into_std()), None) else {
        slot.release();
        return Err(gone());
    };
    let mut guard = InFlightGuard { slot, id: header.id, armed: true };
    if let Some(w) = slot.writer() {
        let _ = w.send(&encode_call(&header, payload));
    }
    let outcome = tokio::time::timeout_at(until, rx).await;
    guard.armed = false;
    match outcome.map(|o| o.map(|o| o.result)) {
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Ok(Err(Failure::Remote(e)))) => Err(remote_error(function, e, shared)),
        Ok(Ok(Err(Failure::Crashed(certificate)))) => {
            Err(CallError::WorkerCrashed { function: function.to_string(), attempts: 1, certificate })
        }
        Ok(Ok(Err(Failure::ShutDown))) | Ok(Err(_)) => Err(shared.closed_error()),
        Err(_) => Err(CallError::Timeout { function: function.to_string(), after: timeout, sent: true }),
    }
}
