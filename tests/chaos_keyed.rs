//! External chaos against keyed non-idempotent calls (docs/idempotency.md): a monkey thread
//! SIGKILLs a random process of the pool (workers, starting workers, watchdogs) every 50 ms for
//! 20 s while 16 callers make keyed calls of a non-idempotent function; pairs of callers use
//! the same keys, so keys are also coalesced and hit. The worker's side-effect log shows that
//! no key ran twice, every call succeeded or — only if its function had started — failed with
//! `WorkerCrashed { started: true }`, which a later call with the key gets again without
//! running anything.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{descendants, kill_listed, XorShift};
use pyvisor::{CallError, CallOptions, IdempotencyPolicy, Pool};

const WORKERS: usize = 4;
const CALLERS: u64 = 16;
const CHAOS_FOR: Duration = Duration::from_secs(20);
const KILL_EVERY: Duration = Duration::from_millis(50);
/// How long the function runs after its side effect: kills land in running calls too.
const SLEEP: f64 = 0.01;

/// SIGKILL a random live descendant of this process every `KILL_EVERY` until `stop` or
/// `CHAOS_FOR`; returns the kills.
fn monkey(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let mut rng = XorShift::seeded();
    eprintln!("monkey seed {}", rng.0);
    std::thread::spawn(move || {
        let me = std::process::id();
        let started = Instant::now();
        let mut kills = 0;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < CHAOS_FOR {
            std::thread::sleep(KILL_EVERY);
            let procs = descendants(me);
            if !procs.is_empty() && kill_listed(&procs[rng.below(procs.len())]) {
                kills += 1;
            }
        }
        kills
    })
}

#[derive(Default)]
struct Tally {
    issued: Vec<String>,
    ok: Vec<String>,
    crashed_started: Vec<String>,
    problems: Vec<String>,
}

/// Caller `c`: keyed `record_slowly` calls; callers `c` and `c + 8` use the same keys (and payloads).
async fn caller(pool: Pool, c: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let token = format!("p{}-{i}", c % 8);
        t.issued.push(token.clone());
        let args = (token.as_str(), SLEEP);
        match pool.call_with::<_, String>("record_slowly", &args, CallOptions::new().idempotency_key(token.as_str())).await {
            Ok(v) if v == token => t.ok.push(token),
            Ok(v) => t.problems.push(format!("record_slowly({token}) returned {v:?}")),
            Err(CallError::WorkerCrashed { started: true, .. }) => t.crashed_started.push(token),
            Err(e) => t.problems.push(format!("record_slowly({token}) failed [{}]: {e}", e.kind())),
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_non_idempotent_calls_never_run_twice_under_external_chaos() {
    common::logs();
    let me = std::process::id();
    assert!(descendants(me).is_empty(), "processes left over before the test");
    let dir = std::env::temp_dir().join(format!("pyvisor-chaos-keyed-{me}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let log = dir.join("side_effects.log");
    // Plenty of retries: a call whose worker died before its function started must never be
    // lost for want of attempts. Room to keep every key's outcome (the default keeps 10 000;
    // an evicted key runs again, by design).
    let keep_all = IdempotencyPolicy { max_entries: 1 << 20, max_bytes: 1 << 30, ..IdempotencyPolicy::default() };
    let spec = common::spec("keyed.py")
        .workers(WORKERS)
        .max_in_flight(2)
        .max_retries(100)
        .idempotency(keep_all)
        .env("KEYED_SIDE_EFFECT_LOG", log.to_str().expect("a UTF-8 temporary path"));
    let pool = Pool::start(spec).await.expect("the pool starts");

    let stop_callers = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS).map(|c| tokio::spawn(caller(pool.clone(), c, Arc::clone(&stop_callers)))).collect();
    let stop_monkey = Arc::new(AtomicBool::new(false));
    let monkey = monkey(Arc::clone(&stop_monkey));
    while !monkey.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kills = monkey.join().expect("the monkey does not panic");
    stop_callers.store(true, Ordering::Relaxed);

    let mut tally = Tally::default();
    let results = tokio::time::timeout(Duration::from_secs(90), futures::future::join_all(callers))
        .await
        .expect("callers finish within 90 s of the chaos");
    for r in results {
        let t = r.expect("a caller does not panic");
        tally.issued.extend(t.issued);
        tally.ok.extend(t.ok);
        tally.crashed_started.extend(t.crashed_started);
        tally.problems.extend(t.problems);
    }

    // Every key ran at most once; every success ran.
    let issued: Vec<String> = tally.issued.iter().cloned().collect::<HashSet<_>>().into_iter().collect();
    let mut violations = common::side_effects::check(&log, &tally.ok, &issued);
    if !tally.problems.is_empty() {
        violations.push(format!("{} calls ended otherwise than ok or started-then-crashed: {:?}", tally.problems.len(), &tally.problems[..tally.problems.len().min(10)]));
    }

    // A started-then-crashed key is remembered: the same outcome again, nothing runs.
    let before = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    let crashed: HashSet<&String> = tally.crashed_started.iter().collect();
    for token in crashed.iter().take(50) {
        match pool.call_with::<_, String>("record_slowly", &(token.as_str(), SLEEP), CallOptions::new().idempotency_key(token.as_str())).await {
            Err(CallError::WorkerCrashed { started: true, .. }) => {}
            other => violations.push(format!("record_slowly({token}) again after a started crash: {other:?}")),
        }
    }
    let ok: HashSet<&String> = tally.ok.iter().collect();
    for token in ok.iter().take(50) {
        match pool.call_with::<_, String>("record_slowly", &(token.as_str(), SLEEP), CallOptions::new().idempotency_key(token.as_str())).await {
            Ok(v) if &&v == token => {}
            other => violations.push(format!("record_slowly({token}) again after success: {other:?}")),
        }
    }
    let after = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    if after != before {
        violations.push(format!("calls with kept keys ran again: {} new side effects", after - before));
    }
    // A key never has two different outcomes.
    let mut outcome_of: HashMap<&String, bool> = HashMap::new();
    for t in &tally.ok {
        outcome_of.insert(t, true);
    }
    for t in &tally.crashed_started {
        if outcome_of.get(t) == Some(&true) {
            violations.push(format!("{t}: one caller got ok, another a crash"));
        }
    }

    let status = pool.status().await;
    eprintln!(
        "keyed chaos: {kills} kills, {} calls ({} keys), {} ok, {} started-then-crashed, {} retried attempts, {} side effects",
        tally.issued.len(),
        issued.len(),
        tally.ok.len(),
        tally.crashed_started.len(),
        status.retried,
        after
    );
    assert!(kills > 100, "the monkey killed only {kills} processes");
    assert!(tally.ok.len() > 100, "too few calls succeeded to mean anything: {}", tally.ok.len());
    // Non-idempotent calls are retried only when their worker died before they started: some
    // were (the monkey kills workers with calls queued in them).
    assert!(status.retried > 0, "no call was retried: the not-started path was not exercised");
    pool.shutdown().await;
    assert!(
        common::eventually(Duration::from_secs(10), || descendants(me).is_empty()).await,
        "processes outlived the shutdown: {:?}",
        descendants(me)
    );
    assert!(violations.is_empty(), "violations:\n{}", violations.join("\n"));
}
