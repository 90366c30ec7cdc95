//! Soak (issue 13): minutes of mixed calls against a recycling pool of real Python workers while
//! a monkey SIGKILLs a random process of the pool every ~2 s (starting workers, ready workers,
//! watchdogs) and now and then SIGSTOPs a ready worker (the heartbeat must declare it hung).
//! The parent (this test process) must not grow: open fds, threads and RSS stay within small
//! bounds of a baseline taken after a warm-up, no zombie children are left, no call is lost, and
//! nothing of the pool outlives its shutdown. The load runs in periods of a minute; between two,
//! the pool rests and the parent is measured again, so that a leak shows as a trend.
//!
//! Ignored in the normal suite (it runs for minutes). Run it with (docs/soak.md):
//!
//! ```text
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `PYVISOR_SOAK_SECS` sets the load's duration (default 300), `PYVISOR_SOAK_SEED` replays a
//! monkey's and the callers' choices.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{cmdline, comm, descendants, kill_listed, signal_listed, zombie_children, Proc, XorShift};
use pyvisor::{CallError, CallOptions, DeathCause, DeathCertificate, Pool, PoolEvent, RecycleReason, RecyclePolicy, WorkerId};

const WORKERS: usize = 4;
const CALLERS: u64 = 8;
/// A caller's pause between calls: the load leaves CPU to the rest of the machine.
const THINK: Duration = Duration::from_millis(10);
/// Deadline of every call that is meant to succeed: far above a hung worker's detection
/// (heartbeat 1 s × 4) plus its retries, so a deadline error means something is stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls meant to miss their deadline: they sleep `LATE_SLEEP_MS` with `LATE_TIMEOUT`.
const LATE_TIMEOUT: Duration = Duration::from_millis(100);
const LATE_SLEEP_MS: u64 = 400;
const PAYLOAD: usize = 1 << 20;
const MAX_RETRIES: u32 = 10;
/// Recycling: at the soak's call rate (~30 calls/s per worker) workers reach `max_requests`
/// in ~10 s or their ttl, whichever comes first, unless the monkey kills them before.
const RECYCLE_MAX_REQUESTS: u64 = 300;
const RECYCLE_TTL: Duration = Duration::from_secs(15);
const RECYCLE_JITTER: f64 = 0.2;
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_MISSED: u32 = 4;
const KILL_EVERY: Duration = Duration::from_secs(2);
/// Every this many monkey ticks, the tick SIGSTOPs a ready worker instead of a SIGKILL.
const STOP_EVERY: u64 = 8;
/// Load runs in periods this long; the pool rests and the parent is measured between two.
const REST_EVERY: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

// The bounds (docs/soak.md says why).
const FD_BOUND: usize = 16;
const THREAD_BOUND: usize = 4;
const RSS_BOUND_KIB: u64 = 32 * 1024;
/// Open fds after shutdown against before `Pool::start`.
const FD_BOUND_AFTER_SHUTDOWN: usize = 4;
/// Deadline errors tolerated on calls meant to succeed: this fraction of them (or 3).
const DEADLINE_ERRORS_MAX_FRACTION: f64 = 0.001;

// ---------------------------------------------------------------------------------------------
// The parent's usage, from /proc/self.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
    zombies: usize,
}

fn status_field(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
}

fn usage() -> Usage {
    // The directory listing holds one fd of its own while it runs: not counted.
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count().saturating_sub(1)).expect("/proc/self/fd is readable");
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    let threads = status_field(&status, "Threads:").expect("Threads: in /proc/self/status") as usize;
    let rss_kib = status_field(&status, "VmRSS:").expect("VmRSS: in /proc/self/status");
    Usage { fds, threads, rss_kib, zombies: zombie_children(std::process::id()).len() }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fds {} threads {} rss {:.1} MiB zombies {}", self.fds, self.threads, self.rss_kib as f64 / 1024.0, self.zombies)
    }
}

// ---------------------------------------------------------------------------------------------
// What the pool reports (counted, not kept: the test must not grow either).

#[derive(Default)]
struct Observed {
    ready_pids: Mutex<HashSet<u32>>,
    spawned: AtomicU64,
    deaths: AtomicU64,
    external_kills: AtomicU64,
    /// Pid → when its `Hung` certificate arrived.
    hung: Mutex<HashMap<u32, Instant>>,
    /// Deaths neither an external kill nor a hang of a worker the monkey stopped (checked at the
    /// end against the stops): a sample.
    other_deaths: Mutex<Vec<Arc<DeathCertificate>>>,
    recycles: Mutex<HashMap<String, u64>>,
    /// Pids of live workers by id (to name a recycled worker's pid).
    pids: Mutex<HashMap<WorkerId, u32>>,
    /// Pids of workers pyvisor recycled.
    recycled_pids: Mutex<HashSet<u32>>,
    pool_failed: Mutex<Option<String>>,
}

impl Observed {
    fn spec(self: &Arc<Self>, spec: pyvisor::PoolSpec) -> pyvisor::PoolSpec {
        let me = Arc::clone(self);
        spec.on_event(move |e| me.on_event(e))
    }

    fn on_event(&self, e: &PoolEvent) {
        match e {
            PoolEvent::WorkerSpawned { worker, pid, .. } => {
                self.spawned.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut p) = self.pids.lock() {
                    p.insert(*worker, *pid);
                }
            }
            PoolEvent::WorkerReady { pid, .. } => {
                if let Ok(mut r) = self.ready_pids.lock() {
                    r.insert(*pid);
                }
            }
            PoolEvent::WorkerDied { certificate: c } => {
                self.deaths.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut p) = self.pids.lock() {
                    p.remove(&c.worker);
                }
                if let Some(pid) = c.pid {
                    if let Ok(mut r) = self.ready_pids.lock() {
                        r.remove(&pid);
                    }
                }
                if external_kill(c) {
                    self.external_kills.fetch_add(1, Ordering::Relaxed);
                } else if let (DeathCause::Hung { .. }, Some(pid)) = (&c.cause, c.pid) {
                    if let Ok(mut h) = self.hung.lock() {
                        h.insert(pid, Instant::now());
                    }
                } else if let Ok(mut o) = self.other_deaths.lock() {
                    if o.len() < 20 {
                        o.push(Arc::clone(c));
                    }
                }
            }
            PoolEvent::Recycled { reason, worker } => {
                if let Some(pid) = self.pids.lock().ok().and_then(|mut p| p.remove(worker)) {
                    if let Ok(mut r) = self.recycled_pids.lock() {
                        r.insert(pid);
                    }
                }
                let key = match reason {
                    RecycleReason::Ttl => "ttl",
                    RecycleReason::MaxRequests => "max_requests",
                    RecycleReason::MemorySoftLimit { .. } => "memory",
                    RecycleReason::WatchdogLost => "watchdog_lost",
                    _ => "other",
                };
                if let Ok(mut r) = self.recycles.lock() {
                    *r.entry(key.to_string()).or_default() += 1;
                }
            }
            PoolEvent::PoolFailed { reason } => {
                if let Ok(mut f) = self.pool_failed.lock() {
                    f.get_or_insert_with(|| reason.clone());
                }
            }
            _ => {}
        }
    }

    fn recycles(&self) -> HashMap<String, u64> {
        self.recycles.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn recycles_total(&self) -> u64 {
        self.recycles().values().sum()
    }

    fn failed(&self) -> Option<String> {
        self.pool_failed.lock().ok().and_then(|f| f.clone())
    }
}

/// A kill from outside: SIGKILL that pyvisor did not send.
fn external_kill(c: &DeathCertificate) -> bool {
    c.signal == Some(libc::SIGKILL) && !c.killed_by_pyvisor
}

fn describe(c: &DeathCertificate) -> String {
    format!(
        "pid {:?} {} [cause {}, signal {:?}, killed_by_pyvisor {}]",
        c.pid,
        c.to_string().lines().next().unwrap_or_default(),
        c.cause.kind(),
        c.signal,
        c.killed_by_pyvisor
    )
}

// ---------------------------------------------------------------------------------------------
// The monkey: a thread that sees only the process tree.

#[derive(Default)]
struct MonkeyCounts {
    ready_workers: AtomicU64,
    starting_workers: AtomicU64,
    watchdogs: AtomicU64,
    other: AtomicU64,
    /// Ticks whose victim was gone before the signal, or that found nothing to signal.
    missed: AtomicU64,
    /// Workers SIGSTOPped: pid and when.
    stops: Mutex<Vec<(u32, Instant)>>,
}

impl MonkeyCounts {
    fn kills(&self) -> u64 {
        self.ready_workers.load(Ordering::Relaxed) + self.starting_workers.load(Ordering::Relaxed) + self.watchdogs.load(Ordering::Relaxed) + self.other.load(Ordering::Relaxed)
    }
    fn stops(&self) -> Vec<(u32, Instant)> {
        self.stops.lock().map(|s| s.clone()).unwrap_or_default()
    }
    fn summary(&self) -> String {
        format!(
            "kills {} (ready {}, starting {}, watchdogs {}, other {}, missed {}), stops {}",
            self.kills(),
            self.ready_workers.load(Ordering::Relaxed),
            self.starting_workers.load(Ordering::Relaxed),
            self.watchdogs.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.missed.load(Ordering::Relaxed),
            self.stops().len()
        )
    }
}

fn stopped(p: &Proc) -> bool {
    matches!(p.state, 'T' | 't')
}

struct Monkey {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monkey {
    fn start(observed: Arc<Observed>, counts: Arc<MonkeyCounts>, mut rng: XorShift) -> Monkey {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("soak-monkey".into())
            .spawn(move || {
                let me = std::process::id();
                let mut tick = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    // ~2 s, ±25%, slept in short steps so that a stop is prompt.
                    let pause = KILL_EVERY.mul_f64(0.75 + (rng.next() % 500) as f64 / 1000.0);
                    let until = Instant::now() + pause;
                    while Instant::now() < until && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    tick += 1;
                    // A stopped worker is left to the heartbeat: killing it would hide whether
                    // pyvisor declares it hung.
                    let procs: Vec<Proc> = descendants(me).into_iter().filter(|p| !stopped(p)).collect();
                    let ready: HashSet<u32> = observed.ready_pids.lock().map(|r| r.clone()).unwrap_or_default();
                    if tick % STOP_EVERY == STOP_EVERY / 2 {
                        let workers: Vec<&Proc> = procs.iter().filter(|p| ready.contains(&p.pid) && cmdline(p.pid).contains("pyvisor_worker") && !comm(p.pid).starts_with("pyvisor-watch")).collect();
                        if workers.is_empty() {
                            counts.missed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let victim = workers[rng.below(workers.len())];
                        if signal_listed(victim, libc::SIGSTOP) {
                            if let Ok(mut s) = counts.stops.lock() {
                                s.push((victim.pid, Instant::now()));
                            }
                        } else {
                            counts.missed.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    if procs.is_empty() {
                        counts.missed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let victim = procs[rng.below(procs.len())];
                    // Classify before the kill (afterwards /proc has forgotten it).
                    let kind = if comm(victim.pid).starts_with("pyvisor-watch") {
                        &counts.watchdogs
                    } else if ready.contains(&victim.pid) {
                        &counts.ready_workers
                    } else if cmdline(victim.pid).contains("pyvisor_worker") {
                        &counts.starting_workers
                    } else {
                        &counts.other // e.g. a child between fork and exec
                    };
                    if kill_listed(&victim) {
                        kind.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.missed.fetch_add(1, Ordering::Relaxed);
                    }
                    // Forget ready pids that are gone (the set must not grow).
                    if let Ok(mut r) = observed.ready_pids.lock() {
                        r.retain(|pid| common::alive(*pid));
                    }
                }
            })
            .expect("the monkey thread starts");
        Monkey { stop, thread: Some(thread) }
    }

    fn join(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the monkey does not panic");
        }
    }
}

impl Drop for Monkey {
    fn drop(&mut self) {
        // A failing test must not leave the monkey loose.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The callers.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A small map, echoed.
    Echo,
    /// The same through an `async def`.
    AsyncEcho,
    /// 1 MiB of bytes in, reversed 1 MiB out.
    Reverse,
    /// Pure-Python CPU work.
    Squares,
    /// `time.sleep` of 20..100 ms.
    Nap,
    /// Raises `ValueError`: the expected outcome is `CallError::Python` with the message.
    Fail,
    /// Not idempotent: a side effect in the log.
    Record,
    /// Sleeps 400 ms (sync or async) with a 100 ms deadline: the expected outcome is `Timeout`
    /// (and a cancel sent to the worker).
    Late,
}

const KINDS: [Kind; 8] = [Kind::Echo, Kind::AsyncEcho, Kind::Reverse, Kind::Squares, Kind::Nap, Kind::Fail, Kind::Record, Kind::Late];

impl Kind {
    /// Weights out of 100.
    fn pick(roll: u64) -> Kind {
        match roll % 100 {
            0..=29 => Kind::Echo,
            30..=44 => Kind::AsyncEcho,
            45..=52 => Kind::Reverse,
            53..=62 => Kind::Squares,
            63..=72 => Kind::Nap,
            73..=80 => Kind::Fail,
            81..=94 => Kind::Record,
            _ => Kind::Late,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::AsyncEcho => "async_echo",
            Kind::Reverse => "reverse_1MiB",
            Kind::Squares => "squares",
            Kind::Nap => "nap",
            Kind::Fail => "fail",
            Kind::Record => "record",
            Kind::Late => "late",
        }
    }
    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).expect("every kind is in KINDS")
    }
}

/// How a call ended, against what the contract allows.
enum Outcome {
    /// The right value (or, for `Fail` and `Late`, the right error).
    Ok,
    /// A deadline error (`Timeout`, `QueueTimeout`) on a call meant to succeed: allowed, counted,
    /// bounded.
    Deadline,
    /// A non-idempotent call failed `WorkerCrashed` after one attempt on a worker the monkey
    /// killed or stopped: allowed (at most once means it may not run).
    Crashed,
    /// A `PoisonRequest` whose deaths are all hangs (a call can be alone on two workers the
    /// monkey stopped): allowed, counted.
    Poison,
    /// Anything else: a violation.
    Problem(String),
}

#[derive(Default)]
struct KindStats {
    ok: AtomicU64,
    deadline: AtomicU64,
    crashed: AtomicU64,
    poison: AtomicU64,
    problems: AtomicU64,
}

impl KindStats {
    fn failed(&self) -> u64 {
        self.deadline.load(Ordering::Relaxed) + self.crashed.load(Ordering::Relaxed) + self.poison.load(Ordering::Relaxed) + self.problems.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Stats {
    kinds: [KindStats; 8],
    problem_samples: Mutex<Vec<String>>,
}

impl Stats {
    fn record(&self, kind: Kind, outcome: Outcome) {
        let k = &self.kinds[kind.index()];
        match outcome {
            Outcome::Ok => k.ok.fetch_add(1, Ordering::Relaxed),
            Outcome::Deadline => k.deadline.fetch_add(1, Ordering::Relaxed),
            Outcome::Crashed => k.crashed.fetch_add(1, Ordering::Relaxed),
            Outcome::Poison => k.poison.fetch_add(1, Ordering::Relaxed),
            Outcome::Problem(p) => {
                if let Ok(mut s) = self.problem_samples.lock() {
                    if s.len() < 10 {
                        s.push(format!("{}: {p}", kind.name()));
                    }
                }
                k.problems.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    fn sum(&self, f: impl Fn(&KindStats) -> u64) -> u64 {
        self.kinds.iter().map(f).sum()
    }
    fn line(&self) -> String {
        KINDS.iter().map(|k| format!("{} {}/{}", k.name(), self.kinds[k.index()].ok.load(Ordering::Relaxed), self.kinds[k.index()].failed())).collect::<Vec<_>>().join(" ")
    }
}

/// What a caller keeps of its non-idempotent calls, for the side-effect check.
#[derive(Default)]
struct Records {
    issued: Vec<String>,
    ok: Vec<String>,
}

/// A death the monkey caused: an external kill, or pyvisor's kill of a worker it stopped.
fn monkey_death(c: &DeathCertificate) -> bool {
    external_kill(c) || matches!(c.cause, DeathCause::Hung { .. })
}

/// The outcome of a failed call meant to succeed.
fn judge_error(e: CallError, idempotent: bool) -> Outcome {
    match e {
        CallError::Timeout { .. } | CallError::QueueTimeout { .. } => Outcome::Deadline,
        CallError::WorkerCrashed { attempts, ref certificate, .. } if !idempotent => {
            if attempts != 1 {
                Outcome::Problem(format!("a non-idempotent call was attempted {attempts} times: {e}"))
            } else if !monkey_death(certificate) {
                Outcome::Problem(format!("WorkerCrashed not caused by the monkey: {}", describe(certificate)))
            } else {
                Outcome::Crashed
            }
        }
        CallError::PoisonRequest { ref certificates, refused: false, .. } if certificates.iter().all(|c| matches!(c.cause, DeathCause::Hung { .. })) => Outcome::Poison,
        e => Outcome::Problem(format!("[{}] {e}", e.kind())),
    }
}

fn timeout() -> CallOptions {
    CallOptions::new().timeout(CALL_TIMEOUT)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Small {
    caller: u64,
    i: u64,
    text: String,
}

async fn one_call(pool: &Pool, kind: Kind, c: u64, i: u64, rng: &mut XorShift, records: &mut Records) -> Outcome {
    match kind {
        Kind::Echo | Kind::AsyncEcho => {
            let input = Small { caller: c, i, text: format!("soak {c}/{i}") };
            let function = if kind == Kind::Echo { "echo" } else { "async_echo" };
            match pool.call_with::<_, Small>(function, &input, timeout()).await {
                Ok(v) if v == input => Outcome::Ok,
                Ok(v) => Outcome::Problem(format!("{function}({input:?}) returned {v:?}")),
                Err(e) => judge_error(e, true),
            }
        }
        Kind::Reverse => {
            let mut data = vec![(i % 251) as u8; PAYLOAD];
            data[..8].copy_from_slice(&i.to_le_bytes());
            let mut expected = data.clone();
            expected.reverse();
            match pool.call_with::<_, rmpv::Value>("reverse", &rmpv::Value::Binary(data), timeout()).await {
                Ok(rmpv::Value::Binary(v)) if v == expected => Outcome::Ok,
                Ok(v) => Outcome::Problem(format!("reverse(1 MiB #{i}) returned something else ({} bytes)", v.as_slice().map_or(0, |s| s.len()))),
                Err(e) => judge_error(e, true),
            }
        }
        Kind::Squares => {
            let n = 20_000 + rng.next() % 30_000;
            let expected: u64 = (0..n).map(|k| k * k).sum();
            match pool.call_with::<_, u64>("squares", &n, timeout()).await {
                Ok(v) if v == expected => Outcome::Ok,
                Ok(v) => Outcome::Problem(format!("squares({n}) returned {v}, not {expected}")),
                Err(e) => judge_error(e, true),
            }
        }
        Kind::Nap => {
            let ms = 20 + rng.next() % 80;
            match pool.call_with::<_, u64>("nap", &ms, timeout()).await {
                Ok(v) if v == ms => Outcome::Ok,
                Ok(v) => Outcome::Problem(format!("nap({ms}) returned {v}")),
                Err(e) => judge_error(e, true),
            }
        }
        Kind::Fail => {
            let message = format!("soak failure {c}/{i}");
            match pool.call_with::<_, ()>("fail", &message, timeout()).await {
                Err(CallError::Python { error, .. }) if error.type_name == "ValueError" && error.message == message => Outcome::Ok,
                Err(e @ CallError::Python { .. }) => Outcome::Problem(format!("fail({message:?}) raised something else: {e}")),
                Ok(()) => Outcome::Problem(format!("fail({message:?}) returned")),
                Err(e) => judge_error(e, true),
            }
        }
        Kind::Record => {
            let token = format!("{c}-{i}");
            records.issued.push(token.clone());
            match pool.call_with::<_, String>("record", &token, timeout()).await {
                Ok(v) if v == token => {
                    records.ok.push(token);
                    Outcome::Ok
                }
                Ok(v) => Outcome::Problem(format!("record({token}) returned {v:?}")),
                Err(e) => judge_error(e, false),
            }
        }
        Kind::Late => {
            let function = if i.is_multiple_of(2) { "nap" } else { "async_nap" };
            let started = Instant::now();
            match pool.call_with::<_, u64>(function, &LATE_SLEEP_MS, CallOptions::new().timeout(LATE_TIMEOUT)).await {
                // The deadline is the caller's: it must be kept even while the worker is killed,
                // stopped or recycled (1 s of slack for a loaded machine).
                Err(CallError::Timeout { .. }) if started.elapsed() < LATE_TIMEOUT + Duration::from_secs(1) => Outcome::Ok,
                Err(CallError::Timeout { .. }) => Outcome::Problem(format!("{function}: a {LATE_TIMEOUT:?} deadline reported after {:?}", started.elapsed())),
                Ok(v) => Outcome::Problem(format!("{function}({LATE_SLEEP_MS}) returned {v} within a {LATE_TIMEOUT:?} deadline")),
                Err(e) => judge_error(e, true),
            }
        }
    }
}

async fn caller(pool: Pool, c: u64, seed: u64, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> Records {
    let mut rng = XorShift(seed.wrapping_add(c.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    let mut records = Records::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let kind = Kind::pick(rng.next());
        let outcome = one_call(&pool, kind, c, i, &mut rng, &mut records).await;
        stats.record(kind, outcome);
        tokio::time::sleep(THINK).await;
    }
    records
}

struct Load {
    stop: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<Records>>,
    monkey: Monkey,
}

impl Load {
    /// Callers are numbered from `first_caller` (their tokens must be unique across loads).
    fn start(pool: &Pool, first_caller: u64, seed: u64, stats: &Arc<Stats>, observed: &Arc<Observed>, counts: &Arc<MonkeyCounts>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let callers = (first_caller..first_caller + CALLERS).map(|c| tokio::spawn(caller(pool.clone(), c, seed, Arc::clone(stats), Arc::clone(&stop)))).collect();
        let monkey = Monkey::start(Arc::clone(observed), Arc::clone(counts), XorShift(seed.rotate_left(17) | 1));
        Load { stop, callers, monkey }
    }

    /// Stop the monkey, then the callers (each finishes its call: at most `CALL_TIMEOUT`).
    async fn stop(self, records: &mut Records, violations: &mut Vec<String>) {
        self.monkey.join();
        self.stop.store(true, Ordering::Relaxed);
        let limit = CALL_TIMEOUT + Duration::from_secs(30);
        match tokio::time::timeout(limit, futures::future::join_all(self.callers)).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(r) => {
                            records.issued.extend(r.issued);
                            records.ok.extend(r.ok);
                        }
                        Err(e) => violations.push(format!("a caller panicked: {e}")),
                    }
                }
            }
            Err(_) => violations.push(format!("callers still in a call {limit:?} after they were told to stop")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settling and measuring.

/// Wait until the pool is at rest — every position ready, nothing queued or in flight, exactly
/// a worker and a watchdog per position alive, no zombie child, no stopped process — for two
/// checks in a row a second apart; then trim malloc's free memory and measure. `None` if it never settles within `limit`
/// (ttl recycling goes on while idle, so the rest is waited for, not assumed).
async fn settled_usage(pool: &Pool, limit: Duration) -> Option<Usage> {
    let me = std::process::id();
    let start = Instant::now();
    let mut calm = 0;
    while start.elapsed() < limit {
        let s = pool.status().await;
        let procs = descendants(me);
        let at_rest = s.ready() == WORKERS
            && s.queued == 0
            && s.workers.iter().all(|w| w.in_flight == 0)
            && procs.len() == 2 * WORKERS
            && !procs.iter().any(stopped)
            && zombie_children(me).is_empty();
        calm = if at_rest { calm + 1 } else { 0 };
        if calm >= 2 {
            // Give back what malloc keeps of freed memory (arenas padded by 1 MiB payloads in
            // flight): the RSS compared is then memory in use, not the allocator's cache.
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
            return Some(usage());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

fn soak_secs() -> u64 {
    std::env::var("PYVISOR_SOAK_SECS").ok().map(|s| s.parse::<u64>().expect("PYVISOR_SOAK_SECS is a number of seconds")).unwrap_or(300)
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for minutes: cargo test --release --test soak -- --ignored --nocapture (docs/soak.md)"]
async fn soak_mixed_calls_recycling_and_kills_leak_nothing() {
    common::logs();
    let me = std::process::id();
    let total = Duration::from_secs(soak_secs());
    let warm_up = (total / 5).clamp(Duration::from_secs(10), Duration::from_secs(30));
    assert!(total > warm_up, "PYVISOR_SOAK_SECS must exceed the warm-up ({warm_up:?})");
    assert!(descendants(me).is_empty(), "processes left over before the test: {:?}", descendants(me));
    let seed = XorShift::from_env_or_seeded("PYVISOR_SOAK_SEED").0;
    eprintln!("soak: {total:?} of load ({warm_up:?} warm-up), {WORKERS} workers, {CALLERS} callers, seed {seed} (PYVISOR_SOAK_SEED)");

    let dir = tmpdir();
    let log = dir.join("side_effects.log");
    let observed = Arc::new(Observed::default());
    let spec = common::spec("soak_target.py")
        .workers(WORKERS)
        .max_in_flight(2)
        .max_retries(MAX_RETRIES)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_max_missed(HEARTBEAT_MISSED)
        .start_timeout(Duration::from_secs(20))
        .recycle(RecyclePolicy::default().max_requests(RECYCLE_MAX_REQUESTS).ttl(RECYCLE_TTL).jitter(RECYCLE_JITTER))
        .env("SOAK_SIDE_EFFECT_LOG", log.to_str().expect("a UTF-8 temporary path"));
    let before_pool = usage();
    let pool = Pool::start(observed.spec(spec)).await.expect("the pool starts");

    let stats = Arc::new(Stats::default());
    let counts = Arc::new(MonkeyCounts::default());
    let mut records = Records::default();
    let mut violations = Vec::new();
    let started = Instant::now();
    let mut samples: Vec<(Duration, Usage)> = Vec::new();
    let mut max_zombies = 0;
    let progress = |phase: &str, u: Usage| {
        eprintln!(
            "[{:>4}s {phase}] calls ok/failed: {} | problems {} | {} | deaths {} (external {}, hung {}) | recycles {:?} | {u}",
            started.elapsed().as_secs(),
            stats.line(),
            stats.sum(|k| k.problems.load(Ordering::Relaxed)),
            counts.summary(),
            observed.deaths.load(Ordering::Relaxed),
            observed.external_kills.load(Ordering::Relaxed),
            observed.hung.lock().map(|h| h.len()).unwrap_or(0),
            observed.recycles(),
        );
    };

    // Phase 1: warm-up under load, then rest and measure the baseline.
    let load = Load::start(&pool, 0, seed, &stats, &observed, &counts);
    let mut next_progress = PROGRESS_EVERY;
    while started.elapsed() < warm_up && observed.failed().is_none() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if started.elapsed() >= next_progress {
            next_progress += PROGRESS_EVERY;
            let u = usage();
            max_zombies = max_zombies.max(u.zombies);
            progress("warm-up", u);
        }
    }
    load.stop(&mut records, &mut violations).await;
    let load_ran_before = started.elapsed();
    let baseline = settled_usage(&pool, Duration::from_secs(60)).await.expect("the pool settles after the warm-up (full strength, idle, no zombie)");
    eprintln!("[{:>4}s] baseline (pool at rest after the warm-up): {baseline}", started.elapsed().as_secs());

    // Phase 2: the soak proper, in periods of load; between two, the pool rests and the parent
    // is measured (a leak shows as a trend in these measurements, load noise does not).
    let mut load_ran = load_ran_before;
    let mut rests: Vec<(Duration, Usage)> = vec![(load_ran, baseline)];
    let mut period = 1u64;
    while load_ran < total && observed.failed().is_none() {
        let length = REST_EVERY.min(total - load_ran);
        let period_started = Instant::now();
        let load = Load::start(&pool, period * CALLERS, seed.rotate_left(7 * period as u32), &stats, &observed, &counts);
        while period_started.elapsed() < length && observed.failed().is_none() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if started.elapsed() >= next_progress {
                next_progress += PROGRESS_EVERY;
                let u = usage();
                max_zombies = max_zombies.max(u.zombies);
                samples.push((started.elapsed(), u));
                progress("soak", u);
            }
        }
        load.stop(&mut records, &mut violations).await;
        load_ran += period_started.elapsed();
        period += 1;
        if load_ran >= total {
            break;
        }
        match settled_usage(&pool, Duration::from_secs(60)).await {
            Some(u) => {
                eprintln!("[{:>4}s] at rest after {load_ran:.0?} of load: {u}", started.elapsed().as_secs());
                rests.push((load_ran, u));
            }
            None => violations.push(format!("the pool did not settle within 60 s after {load_ran:.0?} of load")),
        }
    }

    // Rest, then measure: the best of a few settled measurements within 60 s (a leak does not
    // go away with time; a recycle in progress or an idle runtime thread does).
    let mut end: Option<Usage> = None;
    let settle_started = Instant::now();
    while settle_started.elapsed() < Duration::from_secs(60) {
        let Some(u) = settled_usage(&pool, Duration::from_secs(60) - settle_started.elapsed().min(Duration::from_secs(60))).await else { break };
        let better = end.is_none_or(|e| (u.fds, u.threads, u.rss_kib) < (e.fds, e.threads, e.rss_kib));
        if better {
            end = Some(u);
        }
        let within = u.fds <= baseline.fds + FD_BOUND && u.threads <= baseline.threads + THREAD_BOUND && u.rss_kib <= baseline.rss_kib + RSS_BOUND_KIB;
        if within {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    progress("end", end.unwrap_or_else(usage));
    let status = pool.status().await;

    // --- The parent did not grow.
    match end {
        None => violations.push("the pool never settled (full strength, idle, no zombie child) within 60 s after the load".into()),
        Some(end) => {
            if end.fds > baseline.fds + FD_BOUND {
                violations.push(format!("open fds grew: {} at the baseline, {} at the end (bound +{FD_BOUND})", baseline.fds, end.fds));
            }
            if end.threads > baseline.threads + THREAD_BOUND {
                violations.push(format!("threads grew: {} at the baseline, {} at the end (bound +{THREAD_BOUND})", baseline.threads, end.threads));
            }
            if end.rss_kib > baseline.rss_kib + RSS_BOUND_KIB {
                violations.push(format!("RSS grew: {:.1} MiB at the baseline, {:.1} MiB at the end (bound +{} MiB)", mib(baseline.rss_kib), mib(end.rss_kib), RSS_BOUND_KIB / 1024));
            }
            if end.zombies > 0 {
                violations.push(format!("{} zombie children at the end: {:?}", end.zombies, zombie_children(me)));
            }
        }
    }

    // --- The pool never failed and no call was lost.
    if let Some(reason) = observed.failed() {
        violations.push(format!("the pool failed: {reason}"));
    }
    let problems = stats.sum(|k| k.problems.load(Ordering::Relaxed));
    if problems > 0 {
        let samples = stats.problem_samples.lock().map(|s| s.clone()).unwrap_or_default();
        violations.push(format!("{problems} call outcome(s) the contract does not allow, e.g.:\n     {}", samples.join("\n     ")));
    }
    let meant_to_succeed: u64 = KINDS.iter().filter(|k| **k != Kind::Late).map(|k| stats.kinds[k.index()].ok.load(Ordering::Relaxed) + stats.kinds[k.index()].failed()).sum();
    let deadline_errors = stats.sum(|k| k.deadline.load(Ordering::Relaxed));
    let deadline_allowed = ((meant_to_succeed as f64 * DEADLINE_ERRORS_MAX_FRACTION) as u64).max(3);
    if deadline_errors > deadline_allowed {
        violations.push(format!("{deadline_errors} deadline errors ({CALL_TIMEOUT:?}) among {meant_to_succeed} calls meant to succeed (allowed {deadline_allowed})"));
    }
    for k in KINDS {
        if stats.kinds[k.index()].ok.load(Ordering::Relaxed) == 0 {
            violations.push(format!("no `{}` call came back right: the mix did not run", k.name()));
        }
    }
    violations.extend(common::side_effects::check(&log, &records.ok, &records.issued));

    // --- Every death is the monkey's doing; every stopped worker was declared hung.
    let others: Vec<String> = observed.other_deaths.lock().map(|o| o.iter().map(|c| describe(c)).collect()).unwrap_or_default();
    if !others.is_empty() {
        violations.push(format!("deaths that are neither external kills nor hangs: {others:?}"));
    }
    let stops = counts.stops();
    let hung = observed.hung.lock().map(|h| h.clone()).unwrap_or_default();
    let recycled = observed.recycled_pids.lock().map(|r| r.clone()).unwrap_or_default();
    let mut detection: Vec<Duration> = Vec::new();
    // A worker pyvisor is recycling stops like a shutdown once drained: its health checks end
    // and a stopped process is SIGTERMed, then SIGKILLed, with no certificate (recycles are
    // not crashes). Such a worker must be gone (checked when the pool settles), not hung.
    let mut stopped_while_recycled = 0;
    for (pid, at) in &stops {
        match hung.get(pid) {
            Some(died) => detection.push(died.saturating_duration_since(*at)),
            None if recycled.contains(pid) => stopped_while_recycled += 1,
            None => violations.push(format!("worker {pid}, SIGSTOPped by the monkey, was never declared hung (nor recycled)")),
        }
    }
    let stopped_pids: HashSet<u32> = stops.iter().map(|(pid, _)| *pid).collect();
    let unexplained: Vec<&u32> = hung.keys().filter(|pid| !stopped_pids.contains(pid)).collect();
    if !unexplained.is_empty() {
        violations.push(format!("workers declared hung that the monkey did not stop: {unexplained:?}"));
    }
    let hung_limit = HEARTBEAT * (HEARTBEAT_MISSED + 2) + Duration::from_secs(2);
    if let Some(slow) = detection.iter().max().filter(|d| **d > hung_limit) {
        violations.push(format!("a stopped worker was declared hung only after {slow:?} (heartbeat {HEARTBEAT:?} × {HEARTBEAT_MISSED}; limit {hung_limit:?})"));
    }

    // --- The load was real.
    let kills = counts.kills();
    let expected_kills = load_ran.as_secs() / KILL_EVERY.as_secs() / 2;
    if kills < expected_kills {
        violations.push(format!("the monkey killed only {kills} processes in {load_ran:.0?} (expected ≥ {expected_kills})"));
    }
    if stops.is_empty() {
        violations.push("the monkey stopped no worker".into());
    }
    if observed.recycles_total() == 0 {
        violations.push("no worker was recycled".into());
    }
    if status.closed || status.workers.len() != WORKERS {
        violations.push(format!("pool.status() after the load: closed {}, {} position(s)", status.closed, status.workers.len()));
    }

    // --- Nothing outlives the shutdown; the pool's fds are closed.
    pool.shutdown().await;
    drop(pool);
    violations.extend(common::procs::leftovers_after_shutdown(me).await);
    let no_zombies = common::eventually(Duration::from_secs(10), || zombie_children(me).is_empty()).await;
    if !no_zombies {
        violations.push(format!("zombie children after shutdown: {:?}", zombie_children(me)));
    }
    let fds_closed = common::eventually(Duration::from_secs(10), || usage().fds <= before_pool.fds + FD_BOUND_AFTER_SHUTDOWN).await;
    let after = usage();
    if !fds_closed {
        violations.push(format!("open fds after shutdown: {} (before Pool::start: {}, bound +{FD_BOUND_AFTER_SHUTDOWN})", after.fds, before_pool.fds));
    }

    // --- The figures (docs/soak.md records a run's).
    let ok = stats.sum(|k| k.ok.load(Ordering::Relaxed));
    let failed = stats.sum(KindStats::failed);
    eprintln!("soak figures:");
    eprintln!("  load ran {load_ran:.0?} ({warm_up:?} warm-up + soak), seed {seed}");
    eprintln!("  calls {} : right {ok}, failed {failed} (deadline {deadline_errors}, non-idempotent crashed {}, poison {}, problems {problems})", ok + failed, stats.sum(|k| k.crashed.load(Ordering::Relaxed)), stats.sum(|k| k.poison.load(Ordering::Relaxed)));
    eprintln!("  by kind (right/failed): {}", stats.line());
    eprintln!("  monkey: {}", counts.summary());
    eprintln!("  stopped workers: {}; declared hung {} (after at most {:?}); stopped while pyvisor recycled them {stopped_while_recycled}", stops.len(), detection.len(), detection.iter().max());
    eprintln!("  pool: spawned {}, deaths {} (external kills {}, hung {}), retried {}, recycles {:?}", observed.spawned.load(Ordering::Relaxed), observed.deaths.load(Ordering::Relaxed), observed.external_kills.load(Ordering::Relaxed), hung.len(), status.retried, observed.recycles());
    eprintln!("  parent before Pool::start: {before_pool}");
    eprintln!("  parent baseline (at rest after warm-up): {baseline}");
    if let Some(end) = end {
        eprintln!("  parent end (at rest after the soak): {end}");
    }
    eprintln!("  parent after shutdown: {after}; max zombies seen in a sample: {max_zombies}");
    let at_rest: Vec<String> = rests.iter().chain(end.map(|e| (load_ran, e)).as_ref()).map(|(t, u)| format!("{}s: {} fds, {} threads, {:.1} MiB", t.as_secs(), u.fds, u.threads, mib(u.rss_kib))).collect();
    eprintln!("  parent at rest (after N s of load; malloc trimmed): {}", at_rest.join(" | "));
    let rss: Vec<String> = samples.iter().map(|(t, u)| format!("{}s:{:.0}", t.as_secs(), mib(u.rss_kib))).collect();
    eprintln!("  RSS samples under load (MiB): {}", rss.join(" "));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(violations.is_empty(), "soak: {} violation(s):\n - {}", violations.len(), violations.join("\n - "));
}
