//! Pool specs: what to run and how many, as a builder with DESIGN.md's defaults.
//!
//! Owns configuration values and their validation; it starts nothing (see [`crate::Pool`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::confine::{Access, Confinement};
use crate::error::StartError;
use crate::events::{EventHandler, PoolEvent};
use crate::python::Interpreter;

/// What the worker runs: a script file or an importable module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `python -m pyvisor_worker SCRIPT`.
    Script(PathBuf),
    /// `python -m pyvisor_worker --module MODULE`.
    Module(String),
}

/// glibc's `MALLOC_TOP_PAD_` that pyvisor gives its workers, in bytes: how much freed memory
/// an allocator arena keeps for reuse instead of handing it back to the kernel.
///
/// A worker serves calls on a thread of its own, whose glibc arena is trimmed as soon as its
/// free top exceeds the (small) trim threshold. A call carrying a 1 MiB payload allocates and
/// frees a few MiB (the decoded argument, the encoded reply), so without padding every such
/// call faults those pages in again: about 500 page faults per 1 MiB call, measured, which
/// tripled its latency (docs/benchmarks.md). With 16 MiB kept, the pages are reused. Memory is
/// only kept once it has been touched, so a worker that never sees a large payload keeps
/// nothing more; one that does keeps at most this much more per arena.
///
/// Setting the pad switches off glibc's adaptive mmap threshold, which would send every
/// allocation above 128 KiB to `mmap` (a 24 MiB call then faulted twice as many pages as with
/// no setting at all), so pyvisor also sets `MALLOC_MMAP_THRESHOLD_` to
/// [`WORKER_MALLOC_MMAP_THRESHOLD`]. Both are set unless the parent's environment has
/// `MALLOC_TOP_PAD_`, `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES`; [`PoolSpec::env`]
/// overrides them. They are inherited by processes the worker starts; other C libraries
/// ignore them.
///
/// ```
/// assert_eq!(pyvisor_core::WORKER_MALLOC_TOP_PAD, 16 << 20);
/// ```
pub const WORKER_MALLOC_TOP_PAD: usize = 16 << 20;

/// glibc's `MALLOC_MMAP_THRESHOLD_` that pyvisor gives its workers with
/// [`WORKER_MALLOC_TOP_PAD`], in bytes: allocations up to this size come from (and return to)
/// the arena; larger ones are mapped and unmapped each time.
///
/// ```
/// assert!(pyvisor_core::WORKER_MALLOC_MMAP_THRESHOLD > pyvisor_core::WORKER_MALLOC_TOP_PAD);
/// ```
pub const WORKER_MALLOC_MMAP_THRESHOLD: usize = 32 << 20;

/// The longest duration any knob accepts (100 years): longer ones would overflow the
/// deadlines computed from them.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Everything needed to start a pool. Build with [`PoolSpec::script`] or [`PoolSpec::module`].
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::PoolSpec;
/// let spec = PoolSpec::script("examples/workers/quickstart.py")
///     .name("ml")
///     .workers(2)
///     .max_in_flight(8)
///     .call_timeout(Some(Duration::from_secs(5)));
/// assert_eq!(spec.worker_count(), 2);
/// ```
#[derive(Clone)]
pub struct PoolSpec {
    pub(crate) name: String,
    pub(crate) target: Target,
    pub(crate) interpreter: Interpreter,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) workers: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_queue: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) start_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) buffers: crate::buffers::BufferPolicy,
    pub(crate) start_backoff: Backoff,
    pub(crate) max_start_failures: usize,
    pub(crate) start_failure_period: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) sigterm_wait: Duration,
    pub(crate) on_event: Option<EventHandler>,
    pub(crate) heartbeat_max_missed: u32,
    pub(crate) max_retries: u32,
    pub(crate) taint_window: Duration,
    pub(crate) poison_threshold: u32,
    pub(crate) quarantine_window: Duration,
    pub(crate) harakiri_grace: Option<Duration>,
    pub(crate) recycle: RecyclePolicy,
    pub(crate) confine: Confinement,
    pub(crate) affinity_max_keys: usize,
    pub(crate) affinity_idle: Duration,
    pub(crate) idempotency: IdempotencyPolicy,
}

/// How long, and how many, outcomes of calls with an idempotency key
/// ([`crate::CallOptions::idempotency_key`]) a pool keeps (see docs/idempotency.md).
///
/// An outcome is kept for `ttl` after its execution ended; beyond `max_entries` outcomes or
/// `max_bytes` (the value's bytes, or the error's texts and certificates, plus 128 bytes per
/// entry and the key), the oldest go first. An outcome larger than `max_bytes` alone is not
/// kept. A bound of 0 keeps nothing (calls with one key are still coalesced while one runs).
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::{IdempotencyPolicy, PoolSpec};
/// let p = IdempotencyPolicy { ttl: Duration::from_secs(60), ..IdempotencyPolicy::default() };
/// assert_eq!(p.max_entries, 10_000);
/// let spec = PoolSpec::script("w.py").idempotency(p);
/// # let _ = spec;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyPolicy {
    /// How long an outcome is kept after its execution ended. Default 10 min.
    pub ttl: Duration,
    /// Outcomes kept at most. Default 10 000.
    pub max_entries: usize,
    /// Bytes kept at most. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        IdempotencyPolicy { ttl: Duration::from_secs(600), max_entries: 10_000, max_bytes: 64 << 20 }
    }
}

/// When workers are replaced although healthy: age, requests served, memory.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::RecyclePolicy;
/// let r = RecyclePolicy::default().ttl(Duration::from_secs(3600)).max_requests(10_000);
/// assert_eq!(r.jitter, 0.1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RecyclePolicy {
    /// Replace a worker after this age (jittered). Default off.
    pub ttl: Option<Duration>,
    /// Replace a worker after this many calls (jittered). Default off.
    pub max_requests: Option<u64>,
    /// Drain and replace a worker whose memory passes this many bytes. Default off.
    pub memory_soft_limit: Option<u64>,
    /// Kill a worker whose memory passes this many bytes (the crash barrier applies). Default off.
    pub memory_hard_limit: Option<u64>,
    /// Relative jitter of `ttl` and `max_requests` (0.1 = ±10%).
    pub jitter: f64,
    /// Never fewer ready workers than this because of recycling. Default workers − 1 (≥ 1).
    pub min_ready: Option<usize>,
    /// Recycles in progress at once. Default 1.
    pub max_concurrent: usize,
    /// Longest wait for a recycled worker's calls to finish. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for RecyclePolicy {
    fn default() -> Self {
        RecyclePolicy {
            ttl: None,
            max_requests: None,
            memory_soft_limit: None,
            memory_hard_limit: None,
            jitter: 0.1,
            min_ready: None,
            max_concurrent: 1,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl RecyclePolicy {
    /// Set `ttl`.
    #[must_use]
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = Some(d);
        self
    }
    /// Set `max_requests`.
    #[must_use]
    pub fn max_requests(mut self, n: u64) -> Self {
        self.max_requests = Some(n);
        self
    }
    /// Set the memory limits in bytes (soft: drain and replace; hard: kill).
    #[must_use]
    pub fn memory_limits(mut self, soft: Option<u64>, hard: Option<u64>) -> Self {
        self.memory_soft_limit = soft;
        self.memory_hard_limit = hard;
        self
    }
    /// Set the jitter (0.1 = ±10%).
    #[must_use]
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j;
        self
    }
    /// The `min_ready` in force for a pool of `workers`: the one set, else `workers − 1` (at
    /// least 1), and never more than `workers`. Recycling never takes a pool below it, and a pool below it is not *ready*
    /// (`pyvisor run`'s `READY=1`, [`crate::PoolStatus::is_ready`]).
    ///
    /// ```
    /// use pyvisor_core::RecyclePolicy;
    /// assert_eq!(RecyclePolicy::default().min_ready_for(4), 3);
    /// assert_eq!(RecyclePolicy::default().min_ready_for(1), 1);
    /// assert_eq!(RecyclePolicy::default().min_ready(2).min_ready_for(4), 2);
    /// assert_eq!(RecyclePolicy::default().min_ready(9).min_ready_for(4), 4);
    /// ```
    pub fn min_ready_for(&self, workers: usize) -> usize {
        // Never more than the pool has: a pool with every worker ready is ready.
        self.min_ready.unwrap_or_else(|| workers.saturating_sub(1).max(1)).min(workers.max(1))
    }
    /// Set `min_ready`.
    #[must_use]
    pub fn min_ready(mut self, n: usize) -> Self {
        self.min_ready = Some(n);
        self
    }
    /// Set `max_concurrent` recycles.
    #[must_use]
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }
    /// Set the drain timeout.
    #[must_use]
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }
}

impl std::fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSpec")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("interpreter", &self.interpreter)
            .field("workers", &self.workers)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_queue", &self.max_queue)
            .field("call_timeout", &self.call_timeout)
            .field("start_timeout", &self.start_timeout)
            .field("confine", &self.confine)
            .finish_non_exhaustive()
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl PoolSpec {
    fn new(target: Target) -> Self {
        PoolSpec {
            name: "pool".to_string(),
            target,
            interpreter: Interpreter::Default,
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            workers: default_workers(),
            max_in_flight: 1,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(10),
            call_timeout: Some(Duration::from_secs(60)),
            start_timeout: Duration::from_secs(30),
            max_frame: pyvisor_protocol::DEFAULT_MAX_FRAME,
            buffers: crate::buffers::BufferPolicy::default(),
            start_backoff: Backoff::default(),
            max_start_failures: 5,
            start_failure_period: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            sigterm_wait: Duration::from_secs(2),
            on_event: None,
            heartbeat_max_missed: 5,
            max_retries: 2,
            taint_window: Duration::from_secs(5),
            poison_threshold: 2,
            quarantine_window: Duration::from_secs(300),
            affinity_max_keys: 100_000,
            affinity_idle: Duration::from_secs(600),
            harakiri_grace: Some(Duration::from_secs(5)),
            recycle: RecyclePolicy::default(),
            confine: Confinement::default(),
            idempotency: IdempotencyPolicy::default(),
        }
    }

    /// A pool running a Python script (`@expose`d functions, ending in `run_worker()`).
    #[must_use]
    pub fn script(path: impl Into<PathBuf>) -> Self {
        Self::new(Target::Script(path.into()))
    }

    /// A pool running an importable module (`python -m pyvisor_worker --module NAME`).
    #[must_use]
    pub fn module(name: impl Into<String>) -> Self {
        Self::new(Target::Module(name.into()))
    }

    /// Pool name, used in logs, errors and events. Default `pool`.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// The interpreter to run. Default: `PYVISOR_PYTHON`, else `python3` on `PATH`.
    #[must_use]
    pub fn python(mut self, path: impl Into<PathBuf>) -> Self {
        self.interpreter = Interpreter::Path(path.into());
        self
    }
    /// Run `VENV/bin/python`.
    #[must_use]
    pub fn venv(mut self, dir: impl Into<PathBuf>) -> Self {
        self.interpreter = Interpreter::Venv(dir.into());
        self
    }
    /// Run this interpreter (e.g. `Interpreter::from_option(cli_flag)`).
    #[must_use]
    pub fn interpreter(mut self, interpreter: Interpreter) -> Self {
        self.interpreter = interpreter;
        self
    }
    /// Extra arguments for the script (its `sys.argv[1:]`).
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }
    /// Set an environment variable for the workers (added to the parent's environment).
    ///
    /// pyvisor sets `PYVISOR_*` variables of its own, the OpenTelemetry exporter's variables
    /// when it exports, and glibc's `MALLOC_TOP_PAD_` and `MALLOC_MMAP_THRESHOLD_` unless the
    /// parent's environment sets the allocator ([`WORKER_MALLOC_TOP_PAD`]: calls with large
    /// payloads reuse freed memory instead of faulting it in again). Values set here are applied last and win over all of those.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Working directory of the workers. Default: the parent's.
    #[must_use]
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    /// Number of worker processes. Default: number of CPUs.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Calls the parent may have outstanding on one worker (pipelining depth). Default 1.
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }
    /// Calls that may wait for a free worker before `Overloaded`. Default 1024.
    #[must_use]
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }
    /// Longest wait in the queue before `QueueTimeout`. Default 10 s.
    #[must_use]
    pub fn queue_timeout(mut self, d: Duration) -> Self {
        self.queue_timeout = d;
        self
    }
    /// Default per-call timeout (`None`: no timeout). Default 60 s.
    #[must_use]
    pub fn call_timeout(mut self, d: Option<Duration>) -> Self {
        self.call_timeout = d;
        self
    }
    /// Longest time from spawn to `hello`. Default 30 s.
    #[must_use]
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }
    /// Maximum frame body size, both directions. Default 64 MiB.
    #[must_use]
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }
    /// How large byte values travel: out of band in sealed memfds (the default, where the
    /// system has memfds) or in band; the workers' threshold for their results; the largest
    /// buffer. See [`crate::BufferPolicy`] and docs/buffers.md.
    #[must_use]
    pub fn buffers(mut self, policy: crate::buffers::BufferPolicy) -> Self {
        self.buffers = policy;
        self
    }
    /// Backoff between start failures. Default 100 ms × 2, cap 10 s, full jitter.
    #[must_use]
    pub fn start_backoff(mut self, b: Backoff) -> Self {
        self.start_backoff = b;
        self
    }
    /// Start failures tolerated within `period` before the pool fails. Default 5 / 60 s.
    #[must_use]
    pub fn max_start_failures(mut self, n: usize, period: Duration) -> Self {
        self.max_start_failures = n;
        self.start_failure_period = period;
        self
    }
    /// Interval of the workers' beats. Default 1 s.
    #[must_use]
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }
    /// Beats that may be missed before a worker is declared hung. Default 5.
    #[must_use]
    pub fn heartbeat_max_missed(mut self, n: u32) -> Self {
        self.heartbeat_max_missed = n;
        self
    }
    /// Retries of an idempotent call after crashes. Default 2.
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// How long a crashed worker's replacement is avoided. Default 5 s.
    #[must_use]
    pub fn taint_window(mut self, d: Duration) -> Self {
        self.taint_window = d;
        self
    }
    /// Crashes with a call alone in flight that make it a poison request. Default 2.
    #[must_use]
    pub fn poison_threshold(mut self, n: u32) -> Self {
        self.poison_threshold = n;
        self
    }
    /// How long a poison request's fingerprint is refused. Default 5 min.
    #[must_use]
    pub fn quarantine_window(mut self, d: Duration) -> Self {
        self.quarantine_window = d;
        self
    }
    /// Bounds of the affinity table ([`crate::CallOptions::affinity`]): at most `max_keys`
    /// bindings (past it, idle ones expire, then the least recently used goes), and a key
    /// unused for `idle` is forgotten (its next call is placed afresh, without
    /// `AffinityLost`). Default 100,000 keys, 10 min.
    pub fn affinity_bounds(mut self, max_keys: usize, idle: Duration) -> Self {
        self.affinity_max_keys = max_keys.max(1);
        self.affinity_idle = idle;
        self
    }
    /// How long, and how many, outcomes of keyed calls are kept. Default
    /// [`IdempotencyPolicy::default`] (10 min, 10 000 outcomes, 64 MiB).
    pub fn idempotency(mut self, policy: IdempotencyPolicy) -> Self {
        self.idempotency = policy;
        self
    }
    /// Kill a worker whose call overran its deadline by more than this (`None`: never).
    /// Default 5 s.
    #[must_use]
    pub fn harakiri_grace(mut self, d: Option<Duration>) -> Self {
        self.harakiri_grace = d;
        self
    }
    /// Recycling policy. Default: no recycling.
    #[must_use]
    pub fn recycle(mut self, r: RecyclePolicy) -> Self {
        self.recycle = r;
        self
    }
    /// Confine the workers: resource limits, a filtered environment, another user and group,
    /// `no_new_privs` (docs/configuration.md, "Confinement"). Default: nothing confined.
    ///
    /// ```
    /// use pyvisor_core::{Confinement, PoolSpec};
    /// let spec = PoolSpec::script("examples/workers/quickstart.py")
    ///     .confine(Confinement::default().open_files(256).cpu_time(600).no_new_privs(true));
    /// # let _ = spec;
    /// ```
    #[must_use]
    pub fn confine(mut self, c: Confinement) -> Self {
        self.confine = c;
        self
    }
    /// On shutdown: time for in-flight calls to finish, then the wait after SIGTERM before
    /// SIGKILL. Default 5 s, 2 s.
    #[must_use]
    pub fn shutdown_timeouts(mut self, grace: Duration, sigterm_wait: Duration) -> Self {
        self.shutdown_grace = grace;
        self.sigterm_wait = sigterm_wait;
        self
    }
    /// Receive lifecycle events (spawn, ready, death, restart). The callback must not block.
    #[must_use]
    pub fn on_event<F>(mut self, f: F) -> Self
    where
        F: Fn(&PoolEvent) + Send + Sync + 'static,
    {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Whether `other` declares the same pool: every setting equal, the event handler aside
    /// (a function cannot be compared). A supervisor's reload replaces a pool whose settings
    /// changed and keeps one whose settings did not ([`crate::supervisor::Tree::reload`]).
    ///
    /// ```
    /// use pyvisor_core::PoolSpec;
    /// let a = PoolSpec::script("w.py").workers(2).on_event(|_| {});
    /// assert!(a.same_settings(&PoolSpec::script("w.py").workers(2)));
    /// assert!(!a.same_settings(&PoolSpec::script("w.py").workers(3)));
    /// ```
    pub fn same_settings(&self, other: &PoolSpec) -> bool {
        // Destructured field by field: a field added to `PoolSpec` fails to compile here until
        // it is compared (or, like the handler, said not to be).
        let PoolSpec {
            name,
            target,
            interpreter,
            args,
            env,
            cwd,
            workers,
            max_in_flight,
            max_queue,
            queue_timeout,
            call_timeout,
            start_timeout,
            max_frame,
            buffers,
            start_backoff,
            max_start_failures,
            start_failure_period,
            heartbeat_interval,
            shutdown_grace,
            sigterm_wait,
            on_event: _,
            heartbeat_max_missed,
            max_retries,
            taint_window,
            poison_threshold,
            quarantine_window,
            harakiri_grace,
            recycle,
            confine,
            affinity_max_keys,
            affinity_idle,
            idempotency,
        } = self;
        *name == other.name
            && *target == other.target
            && *interpreter == other.interpreter
            && *args == other.args
            && *env == other.env
            && *cwd == other.cwd
            && *workers == other.workers
            && *max_in_flight == other.max_in_flight
            && *max_queue == other.max_queue
            && *queue_timeout == other.queue_timeout
            && *call_timeout == other.call_timeout
            && *start_timeout == other.start_timeout
            && *max_frame == other.max_frame
            && *buffers == other.buffers
            && *start_backoff == other.start_backoff
            && *max_start_failures == other.max_start_failures
            && *start_failure_period == other.start_failure_period
            && *heartbeat_interval == other.heartbeat_interval
            && *shutdown_grace == other.shutdown_grace
            && *sigterm_wait == other.sigterm_wait
            && *heartbeat_max_missed == other.heartbeat_max_missed
            && *max_retries == other.max_retries
            && *taint_window == other.taint_window
            && *poison_threshold == other.poison_threshold
            && *quarantine_window == other.quarantine_window
            && *harakiri_grace == other.harakiri_grace
            && *recycle == other.recycle
            && *confine == other.confine
            && *affinity_max_keys == other.affinity_max_keys
            && *affinity_idle == other.affinity_idle
            && *idempotency == other.idempotency
    }

    /// Number of workers this spec starts.
    pub fn worker_count(&self) -> usize {
        self.workers
    }
    /// The pool's `min_ready` in effect: [`RecyclePolicy::min_ready`], or workers − 1 (at
    /// least 1) when unset. Recycling never takes the pool below it, and a tree counts as
    /// ready only while every pool has at least this many ready workers (capped at the
    /// worker count; see `supervisor::TreeStatus::readiness`).
    pub fn min_ready_count(&self) -> usize {
        self.recycle.min_ready_for(self.workers)
    }
    /// The pool's name.
    pub fn pool_name(&self) -> &str {
        &self.name
    }

    /// Check the spec and the files it names; resolve the interpreter.
    /// Every duration must fit the clock's arithmetic: at most [`MAX_DURATION`] (a longer one
    /// would overflow a deadline computed from it, later, in a worker or a call).
    fn check_durations(&self) -> Result<(), StartError> {
        let r = &self.recycle;
        let b = &self.start_backoff;
        let hung = self.heartbeat_interval.checked_mul(self.heartbeat_max_missed).unwrap_or(Duration::MAX);
        let fields: [(&str, Option<Duration>); 16] = [
            ("idempotency ttl", Some(self.idempotency.ttl)),
            ("queue_timeout", Some(self.queue_timeout)),
            ("call_timeout", self.call_timeout),
            ("start_timeout", Some(self.start_timeout)),
            ("max_start_failures period", Some(self.start_failure_period)),
            ("heartbeat_interval × heartbeat_max_missed", Some(hung)),
            ("shutdown grace", Some(self.shutdown_grace)),
            ("sigterm wait", Some(self.sigterm_wait)),
            ("taint_window", Some(self.taint_window)),
            ("quarantine_window", Some(self.quarantine_window)),
            ("harakiri_grace", self.harakiri_grace),
            ("recycle ttl (with its jitter)", r.ttl.map(|t| Duration::try_from_secs_f64(t.as_secs_f64() * (1.0 + r.jitter)).unwrap_or(Duration::MAX))),
            ("recycle drain_timeout", Some(r.drain_timeout)),
            ("start backoff base", Some(b.base)),
            ("start backoff cap", Some(b.cap)),
            ("heartbeat_interval", Some(self.heartbeat_interval)),
        ];
        for (field, d) in fields {
            if let Some(d) = d.filter(|d| *d > MAX_DURATION) {
                return Err(StartError::InvalidSpec(format!(
                    "{field} is too long: {d:?} (at most {} days)",
                    MAX_DURATION.as_secs() / 86_400
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<PathBuf, StartError> {
        if self.workers == 0 {
            return Err(StartError::InvalidSpec("workers must be at least 1".into()));
        }
        if self.max_in_flight == 0 {
            return Err(StartError::InvalidSpec("max_in_flight must be at least 1".into()));
        }
        if self.max_frame < 64 * 1024 || self.max_frame > u32::MAX as usize {
            return Err(StartError::InvalidSpec(format!(
                "max_frame must be between 64 KiB and 4 GiB, got {}",
                self.max_frame
            )));
        }
        self.buffers.validate().map_err(StartError::InvalidSpec)?;
        if self.heartbeat_max_missed == 0 {
            return Err(StartError::InvalidSpec("heartbeat_max_missed must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.recycle.jitter) {
            return Err(StartError::InvalidSpec("recycle jitter must be in [0, 1)".into()));
        }
        if self.recycle.max_concurrent == 0 {
            return Err(StartError::InvalidSpec("max_concurrent recycles must be at least 1".into()));
        }
        if let (Some(s), Some(h)) = (self.recycle.memory_soft_limit, self.recycle.memory_hard_limit) {
            if s > h {
                return Err(StartError::InvalidSpec("the memory soft limit must not exceed the hard limit".into()));
            }
        }
        if self.heartbeat_interval.is_zero() {
            return Err(StartError::InvalidSpec("heartbeat_interval must be positive".into()));
        }
        self.check_durations()?;
        self.confine.check()?;
        let cwd = match &self.cwd {
            Some(d) => {
                check_working_directory(d)?;
                d.clone()
            }
            None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        };
        let script = match &self.target {
            Target::Script(p) => {
                let full = if p.is_absolute() { p.clone() } else { cwd.join(p) };
                if !full.is_file() {
                    return Err(StartError::ScriptNotFound { path: p.clone(), cwd });
                }
                Some(full)
            }
            Target::Module(_) => None,
        };
        let python = self.interpreter.resolve()?;
        // A worker running as another user must reach what it runs (checked by mode bits).
        if let Some(id) = self.confine.identity()? {
            id.check_access(&python, Access::Run)?;
            if let Some(script) = &script {
                id.check_access(script, Access::Read)?;
            }
            id.check_access(&cwd, Access::Enter)?;
        }
        Ok(python)
    }
}

/// A configured working directory must exist, be a directory, and be enterable by this
/// process (a change of user is checked separately, against the worker's ids).
fn check_working_directory(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::ffi::OsStrExt;
    let problem = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_string()),
        Err(e) => Some(format!("cannot be read: {e}")),
        Ok(m) if !m.is_dir() => Some("is not a directory".to_string()),
        Ok(_) => match std::ffi::CString::new(dir.as_os_str().as_bytes()) {
            Err(_) => Some("contains a NUL byte".to_string()),
            // SAFETY: a valid C string for the duration of the call.
            Ok(c) if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 => {
                Some(format!("cannot be entered: {}", std::io::Error::last_os_error()))
            }
            Ok(_) => None,
        },
    };
    match problem {
        Some(problem) => Err(StartError::WorkingDirectory { path: dir.to_path_buf(), problem }),
        None => Ok(()),
    }
}
