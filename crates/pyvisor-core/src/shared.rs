//! The state a pool's handles, its router, its workers and their reader tasks share.
//!
//! Owns [`PoolShared`]: the spec, the dispatcher (routing table and queue), the function table
//! from `hello`, the failure reason, the quarantine, counters, the last death certificates and
//! the member list, plus lifecycle event emission. It sits below everything that uses it: it
//! imports no actor, no call path and no observation module.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use pyvisor_protocol::FunctionInfo;

use crate::barrier::idempotency::Idempotency;
use crate::barrier::quarantine::{Quarantine, Quarantined, QUARANTINE_CAP};
use crate::death::{DeathCertificate, WorkerId};
use crate::dispatch::affinity::AffinityTable;
use crate::dispatch::{Dispatcher, WorkerSlot};
use crate::error::{CallError, StartError};
use crate::events::PoolEvent;
use crate::spec::PoolSpec;

/// State shared by the pool's handles, its router, its workers and their reader tasks.
pub(crate) struct PoolShared {
    pub name: Arc<str>,
    pub spec: PoolSpec,
    pub python: PathBuf,
    /// Routing table and waiting line.
    pub dispatch: Arc<Dispatcher>,
    pub(crate) next_call_id: AtomicU64,
    next_worker_id: AtomicU64,
    /// The function table from `hello`, with its [`TableId`] (changed with every new table).
    functions: RwLock<Option<(TableId, Arc<Vec<FunctionInfo>>)>>,
    /// The id of the table in `functions` (0: none yet), readable without the lock.
    table_id: AtomicU64,
    failed: Mutex<Option<Arc<StartError>>>,
    pub quarantine: SharedQuarantine,
    pub stats: PoolStats,
    pub(crate) deaths: Mutex<VecDeque<Arc<DeathCertificate>>>,
    members: RwLock<Vec<Arc<WorkerSlot>>>,
    /// Affinity keys' bindings (only keyed calls take this lock).
    pub(crate) affinity: Mutex<AffinityTable>,
    /// Calls with an idempotency key: executions in flight, kept outcomes.
    pub(crate) idempotency: Idempotency,
    /// Out-of-band bytes in flight ([`crate::BufferPolicy::max_bytes_in_flight`]).
    pub(crate) buffer_budget: crate::buffers::BufferBudget,
}

/// Death certificates a pool keeps for [`crate::Pool::death_certificates`].
pub const KEPT_CERTIFICATES: usize = 64;

/// Death certificates a [`crate::PoolStatus`] carries (the newest of the kept ones).
pub const STATUS_CERTIFICATES: usize = 5;

/// Identifies one function table of one pool, unique in the process (never reused), so that a
/// typed handle can check with one atomic load that what it resolved still holds.
pub(crate) type TableId = u64;

/// The next [`TableId`] (0 is "no table").
fn next_table_id() -> TableId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A function name looked up in a pool's table once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The table it was found in.
    pub table: TableId,
    /// Its `@expose(idempotent=...)` flag.
    pub idempotent: bool,
    /// A generator function (called as a stream).
    pub stream: bool,
}

/// Counters of a pool's fault handling.
#[derive(Default)]
pub(crate) struct PoolStats {
    pub retried: AtomicU64,
    pub poisoned: AtomicU64,
    pub crashes: AtomicU64,
    pub recycles: AtomicU64,
}

/// The pool's quarantine: the crash barrier's [`Quarantine`] value behind a lock, with a
/// lock-free "is anything quarantined" check for the call path.
pub(crate) struct SharedQuarantine {
    active: AtomicU64,
    inner: Mutex<Quarantine>,
}

impl SharedQuarantine {
    fn new() -> Self {
        SharedQuarantine { active: AtomicU64::new(0), inner: Mutex::new(Quarantine::new(QUARANTINE_CAP)) }
    }
    /// Whether any fingerprint may be quarantined (one atomic load).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }
    pub(crate) fn insert(&self, fp: u64, until: Instant, certificates: Vec<Arc<DeathCertificate>>) {
        if let Ok(mut q) = self.inner.lock() {
            q.insert(fp, until, certificates);
            self.active.store(q.len(Instant::now()) as u64, Ordering::Release);
        }
    }
    pub(crate) fn get(&self, fp: u64) -> Option<Quarantined> {
        let mut q = self.inner.lock().ok()?;
        let now = Instant::now();
        let found = q.get(fp, now);
        self.active.store(q.len(now) as u64, Ordering::Release);
        found
    }
}

impl PoolShared {
    pub(crate) fn new(spec: PoolSpec, python: PathBuf) -> Self {
        let idempotency = Idempotency::new(spec.idempotency);
        let buffer_budget = crate::buffers::BufferBudget::new(&spec.buffers);
        PoolShared {
            name: Arc::from(spec.name.as_str()),
            affinity: Mutex::new(AffinityTable::new(spec.affinity_max_keys, spec.affinity_idle)),
            spec,
            python,
            dispatch: Dispatcher::new(),
            next_call_id: AtomicU64::new(1),
            next_worker_id: AtomicU64::new(1),
            functions: RwLock::new(None),
            table_id: AtomicU64::new(0),
            failed: Mutex::new(None),
            quarantine: SharedQuarantine::new(),
            stats: PoolStats::default(),
            deaths: Mutex::new(VecDeque::new()),
            members: RwLock::new(Vec::new()),
            idempotency,
            buffer_budget,
        }
    }

    pub(crate) fn next_worker_id(&self) -> WorkerId {
        WorkerId(self.next_worker_id.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn set_functions(&self, f: &[FunctionInfo]) {
        if let Ok(mut g) = self.functions.write() {
            if !g.as_ref().is_some_and(|(_, cur)| cur.as_slice() == f) {
                let id = next_table_id();
                *g = Some((id, Arc::new(f.to_vec())));
                self.table_id.store(id, Ordering::Release);
            }
        }
    }

    pub(crate) fn functions(&self) -> Option<Arc<Vec<FunctionInfo>>> {
        self.functions.read().ok().and_then(|g| g.as_ref().map(|(_, f)| Arc::clone(f)))
    }

    /// The id of the current function table (0: no worker has said `hello` yet): one load.
    pub(crate) fn table_id(&self) -> TableId {
        self.table_id.load(Ordering::Acquire)
    }

    /// Look `function` up in the current table: `None` when no worker has said `hello` yet.
    pub(crate) fn resolve(&self, function: &str) -> Option<Result<Resolved, CallError>> {
        let g = self.functions.read().ok()?;
        let (table, funcs) = g.as_ref()?;
        Some(match funcs.iter().find(|f| f.name == function) {
            Some(f) => Ok(Resolved { table: *table, idempotent: f.idempotent, stream: f.stream }),
            None => Err(CallError::UnknownFunction {
                function: function.to_string(),
                available: funcs.iter().map(|f| f.name.clone()).collect(),
            }),
        })
    }

    pub(crate) fn fail(&self, err: Arc<StartError>) {
        if let Ok(mut g) = self.failed.lock() {
            *g = Some(err);
        }
        self.dispatch.close();
    }

    /// Stop taking calls: every waiter is told at once.
    pub(crate) fn close(&self) {
        self.dispatch.close();
    }

    /// Whether calls' buffers go out of band ([`crate::BufferPolicy`], and this system has
    /// memfds); a worker that does not take them still gets them in band.
    pub(crate) fn out_of_band(&self) -> bool {
        self.spec.buffers.out_of_band && crate::buffers::memfd_available()
    }

    /// The size from which a call's `SharedBytes` go out of band (`None`: in band).
    pub(crate) fn buffer_threshold(&self) -> Option<usize> {
        self.out_of_band().then_some(self.spec.buffers.threshold)
    }

    /// Whether the pool stopped taking calls.
    pub(crate) fn is_closed(&self) -> bool {
        self.dispatch.is_closed()
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

    /// The newest [`STATUS_CERTIFICATES`] death certificates, oldest first.
    pub(crate) fn last_deaths(&self) -> Vec<DeathCertificate> {
        let Ok(d) = self.deaths.lock() else { return Vec::new() };
        d.iter().skip(d.len().saturating_sub(STATUS_CERTIFICATES)).map(|c| DeathCertificate::clone(c)).collect()
    }

    pub(crate) fn closed_error(&self) -> CallError {
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

