//! External chaos (an acceptance test of DESIGN.md, "Fault semantics"): a monkey thread outside
//! the pool SIGKILLs a random process of it every 50 ms for 20 s — starting workers, ready
//! workers and the adapter's watchdogs alike, found through /proc as the descendants of this
//! test process — while 16 callers load a 4-worker pool. Such kills never fail the pool,
//! idempotent calls are saved by the crash barrier, non-idempotent calls run at most once, the
//! pool is back to full strength after the last kill, and nothing outlives its shutdown.
//!
//! Unlike `pool.chaos()` (which picks among ready workers), the monkey knows nothing of the
//! pool: it sees only the process tree.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{cmdline, comm, descendants, kill_listed, XorShift};
use pyvisor::{CallError, CallOptions, DeathCertificate, Pool, PoolEvent};

const WORKERS: usize = 4;
const CALLERS: u64 = 16;
const CHAOS_FOR: Duration = Duration::from_secs(20);
const KILL_EVERY: Duration = Duration::from_millis(50);
const DEFAULT_MAX_RETRIES: u32 = 2;

/// Both tests' monkeys walk the same process tree (this process's): one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// What the pool reports.

#[derive(Clone, Default)]
struct Observed {
    ready_pids: Arc<Mutex<HashSet<u32>>>,
    deaths: Arc<Mutex<Vec<Arc<DeathCertificate>>>>,
    pool_failed: Arc<Mutex<Option<String>>>,
}

impl Observed {
    fn spec(&self, spec: pyvisor::PoolSpec) -> pyvisor::PoolSpec {
        let me = self.clone();
        spec.on_event(move |e| match e {
            PoolEvent::WorkerReady { pid, .. } => {
                me.ready_pids.lock().unwrap().insert(*pid);
            }
            PoolEvent::WorkerDied { certificate } => me.deaths.lock().unwrap().push(Arc::clone(certificate)),
            PoolEvent::PoolFailed { reason } => {
                me.pool_failed.lock().unwrap().get_or_insert_with(|| reason.clone());
            }
            _ => {}
        })
    }
    fn failed(&self) -> Option<String> {
        self.pool_failed.lock().unwrap().clone()
    }
}

/// A kill from outside: SIGKILL that pyvisor did not send.
fn external_kill(c: &DeathCertificate) -> bool {
    c.signal == Some(libc::SIGKILL) && !c.killed_by_pyvisor
}

fn describe(c: &DeathCertificate) -> String {
    format!("{} [cause {}, signal {:?}, killed_by_pyvisor {}]", c.to_string().lines().next().unwrap_or_default(), c.cause.kind(), c.signal, c.killed_by_pyvisor)
}

// ---------------------------------------------------------------------------------------------
// The monkey.

#[derive(Debug, Default, Clone, Copy)]
struct Kills {
    ready_workers: u64,
    starting_workers: u64,
    watchdogs: u64,
    other: u64,
    /// Ticks whose victim was gone before the signal.
    gone: u64,
    /// Ticks that found no process of the pool at all.
    empty: u64,
}

impl Kills {
    fn total(&self) -> u64 {
        self.ready_workers + self.starting_workers + self.watchdogs + self.other
    }
}

struct Monkey {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Kills>>,
}

impl Monkey {
    /// Every `KILL_EVERY` for `CHAOS_FOR` (or until stopped): SIGKILL one random live
    /// descendant of this process.
    fn start(ready_pids: Arc<Mutex<HashSet<u32>>>) -> Monkey {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let mut rng = XorShift::seeded();
        eprintln!("monkey seed {}", rng.0);
        let thread = std::thread::Builder::new()
            .name("chaos-monkey".into())
            .spawn(move || {
                let me = std::process::id();
                let started = Instant::now();
                let mut kills = Kills::default();
                while !flag.load(Ordering::Relaxed) && started.elapsed() < CHAOS_FOR {
                    std::thread::sleep(KILL_EVERY);
                    let procs = descendants(me);
                    if procs.is_empty() {
                        kills.empty += 1;
                        continue;
                    }
                    let victim = procs[rng.below(procs.len())];
                    // Classify before the kill (afterwards /proc has forgotten it).
                    let kind = if comm(victim.pid).starts_with("pyvisor-watch") {
                        &mut kills.watchdogs
                    } else if ready_pids.lock().map(|r| r.contains(&victim.pid)).unwrap_or(false) {
                        &mut kills.ready_workers
                    } else if cmdline(victim.pid).contains("pyvisor_worker") {
                        &mut kills.starting_workers
                    } else {
                        &mut kills.other // e.g. a child between fork and exec
                    };
                    if kill_listed(&victim) {
                        *kind += 1;
                    } else {
                        kills.gone += 1;
                    }
                }
                kills
            })
            .expect("the monkey thread starts");
        Monkey { stop, thread: Some(thread) }
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn join(mut self) -> Kills {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("the monkey does not panic")).unwrap_or_default()
    }
}

impl Drop for Monkey {
    fn drop(&mut self) {
        // A failing test must not leave the monkey loose on the next one.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The callers.

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Input {
    n: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retries {
    /// `max_retries(100)` and no deadline: every idempotent call must come back right.
    Plenty,
    /// The default `max_retries` (2): an idempotent call comes back right or fails with
    /// `WorkerCrashed` after every attempt, each death an external kill.
    Default,
}

impl Retries {
    fn max_retries(self) -> u32 {
        match self {
            Retries::Plenty => 100,
            Retries::Default => DEFAULT_MAX_RETRIES,
        }
    }
}

#[derive(Default)]
struct Tally {
    idempotent_ok: u64,
    idempotent_crashed: u64,
    recorded_ok: Vec<String>,
    recorded_crashed: u64,
    issued_tokens: Vec<String>,
    /// Outcomes the contract does not allow (a sample of them) and how many.
    problems: Vec<String>,
    problem_count: u64,
    pool_failed: Option<String>,
}

impl Tally {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < 5 {
            self.problems.push(p);
        }
    }
    fn merge(&mut self, other: Tally) {
        self.idempotent_ok += other.idempotent_ok;
        self.idempotent_crashed += other.idempotent_crashed;
        self.recorded_ok.extend(other.recorded_ok);
        self.recorded_crashed += other.recorded_crashed;
        self.issued_tokens.extend(other.issued_tokens);
        self.problem_count += other.problem_count;
        for p in other.problems {
            if self.problems.len() < 10 {
                self.problems.push(p);
            }
        }
        if self.pool_failed.is_none() {
            self.pool_failed = other.pool_failed;
        }
    }
}

/// One caller: alternately an idempotent `compute` and a non-idempotent `record`, until `stop`
/// (or until the pool has failed: every later call would fail at once).
async fn caller(pool: Pool, c: u64, retries: Retries, stop: Arc<AtomicBool>) -> Tally {
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        if i.is_multiple_of(2) {
            let input = Input { n: c * 1_000_000 + i };
            let opts = match retries {
                Retries::Plenty => CallOptions::new().no_timeout(),
                Retries::Default => CallOptions::new(),
            };
            match pool.call_with::<_, Input>("compute", &input, opts).await {
                Ok(v) if v == input => t.idempotent_ok += 1,
                Ok(v) => t.problem(format!("compute({input:?}) returned {v:?}")),
                Err(e @ CallError::PoolFailed { .. }) => {
                    t.pool_failed = Some(e.to_string());
                    break;
                }
                Err(CallError::WorkerCrashed { attempts, certificate, .. }) if retries == Retries::Default => {
                    t.idempotent_crashed += 1;
                    if attempts != retries.max_retries() + 1 {
                        t.problem(format!("compute({input:?}) failed WorkerCrashed after {attempts} attempt(s), not {}: {}", retries.max_retries() + 1, describe(&certificate)));
                    } else if !external_kill(&certificate) {
                        t.problem(format!("compute({input:?}) failed WorkerCrashed; not an external kill: {}", describe(&certificate)));
                    }
                }
                Err(e) => t.problem(format!("compute({input:?}) failed [{}]: {e}", e.kind())),
            }
        } else {
            let token = format!("c{c}-{i}");
            t.issued_tokens.push(token.clone());
            match pool.call::<_, String>("record", &token).await {
                Ok(v) if v == token => t.recorded_ok.push(token),
                Ok(v) => t.problem(format!("record({token}) returned {v:?}")),
                Err(e @ CallError::PoolFailed { .. }) => {
                    t.pool_failed = Some(e.to_string());
                    break;
                }
                Err(CallError::WorkerCrashed { attempts, certificate, .. }) => {
                    t.recorded_crashed += 1;
                    if attempts != 1 {
                        t.problem(format!("record({token}) was attempted {attempts} times: a non-idempotent call is never retried"));
                    } else if !external_kill(&certificate) {
                        t.problem(format!("record({token}) failed WorkerCrashed; not an external kill: {}", describe(&certificate)));
                    }
                }
                Err(e) => t.problem(format!("record({token}) failed [{}]: {e}", e.kind())),
            }
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// The scenario.

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

async fn external_chaos(retries: Retries) {
    let _serial = SERIAL.lock().await;
    common::logs();
    let me = std::process::id();
    assert!(descendants(me).is_empty(), "processes left over before the test: {:?}", descendants(me));
    let dir = tmpdir(&format!("chaos-external-{retries:?}").to_lowercase());
    let log = dir.join("side_effects.log");
    let observed = Observed::default();
    let mut spec = common::spec("chaos_target.py")
        .workers(WORKERS)
        .max_in_flight(2)
        .env("CHAOS_SIDE_EFFECT_LOG", log.to_str().expect("a UTF-8 temporary path"));
    if retries == Retries::Plenty {
        spec = spec.max_retries(retries.max_retries());
    }
    let pool = Pool::start(observed.spec(spec)).await.expect("the pool starts");

    // Load, then the monkey.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS).map(|c| tokio::spawn(caller(pool.clone(), c, retries, Arc::clone(&stop)))).collect();
    let monkey = Monkey::start(Arc::clone(&observed.ready_pids));
    let started = Instant::now();
    while !monkey.finished() && observed.failed().is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kills = monkey.join();
    let chaos_ran = started.elapsed();
    let last_kill = Instant::now();
    stop.store(true, Ordering::Relaxed);

    let mut violations = Vec::new();
    let mut tally = Tally::default();
    // A guard against callers stuck for good (calls without a deadline), not a timing claim.
    match tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(callers)).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(t) => tally.merge(t),
                    Err(e) => violations.push(format!("a caller panicked: {e}")),
                }
            }
        }
        Err(_) => violations.push("callers still stuck in calls 60 s after the chaos ended".into()),
    }

    // The pool never fails, and says so.
    if let Some(reason) = observed.failed() {
        violations.push(format!("the pool failed (PoolFailed event) after {chaos_ran:.1?} of chaos: {reason}"));
    }
    if let Some(e) = &tally.pool_failed {
        violations.push(format!("calls failed with PoolFailed: {e}"));
    }
    let status = pool.status().await;
    if status.closed || status.workers.len() != WORKERS {
        violations.push(format!("pool.status() after the chaos: closed {}, {} position(s)", status.closed, status.workers.len()));
    }
    // Calls: every outcome is one the contract allows, and there was real load.
    if tally.problem_count > 0 {
        violations.push(format!("{} call outcome(s) the contract does not allow, e.g.:\n     {}", tally.problem_count, tally.problems.join("\n     ")));
    }
    if observed.failed().is_none() && (tally.idempotent_ok < 100 || tally.recorded_ok.is_empty()) {
        violations.push(format!("too little load got through: {} idempotent ok, {} non-idempotent ok", tally.idempotent_ok, tally.recorded_ok.len()));
    }
    violations.extend(common::side_effects::check(&log, &tally.recorded_ok, &tally.issued_tokens));
    // Every death was one of the monkey's kills.
    let deaths = observed.deaths.lock().unwrap().clone();
    let not_kills: Vec<String> = deaths.iter().filter(|c| !external_kill(c)).take(5).map(|c| describe(c)).collect();
    if !not_kills.is_empty() {
        violations.push(format!("deaths that are not external kills: {not_kills:?}"));
    }
    let kept: Vec<String> = pool.death_certificates().iter().filter(|c| !external_kill(c)).take(5).map(|c| describe(c)).collect();
    if !kept.is_empty() {
        violations.push(format!("pool.death_certificates() holds deaths that are not external kills: {kept:?}"));
    }
    if chaos_ran >= CHAOS_FOR && kills.total() < 100 {
        violations.push(format!("the monkey killed only {} processes: {kills:?}", kills.total()));
    }

    // Back to full strength after the last kill (a guard, not a timing claim).
    let mut full_strength = None;
    while last_kill.elapsed() < Duration::from_secs(30) {
        let s = pool.status().await;
        if s.closed {
            break;
        }
        if s.ready() >= WORKERS {
            full_strength = Some(last_kill.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if full_strength.is_none() {
        let s = pool.status().await;
        let states: Vec<String> = s.workers.iter().map(|w| format!("{:?}", w.state)).collect();
        violations.push(format!("not back to full strength within 30 s of the last kill: closed {}, states {states:?}", s.closed));
    }

    // Nothing outlives the shutdown.
    pool.shutdown().await;
    violations.extend(common::procs::leftovers_after_shutdown(me).await);

    eprintln!(
        "external chaos ({retries:?}): {:.1?} of chaos, kills {} {kills:?}; idempotent ok {}, crashed {}; non-idempotent ok {}, crashed {}; deaths {}, retried {}; full strength {full_strength:.1?} after the last kill",
        chaos_ran,
        kills.total(),
        tally.idempotent_ok,
        tally.idempotent_crashed,
        tally.recorded_ok.len(),
        tally.recorded_crashed,
        deaths.len(),
        status.retried,
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(violations.is_empty(), "external chaos ({retries:?}): {} violation(s):\n - {}", violations.len(), violations.join("\n - "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_kills_with_plenty_of_retries_lose_no_idempotent_call() {
    external_chaos(Retries::Plenty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_kills_with_default_retries_fail_only_with_external_kill_certificates() {
    external_chaos(Retries::Default).await;
}
