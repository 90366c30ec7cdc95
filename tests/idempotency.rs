//! Idempotency keys against real workers (docs/idempotency.md): one execution per key (single
//! flight), the outcome kept and returned again without running anything, conflicts, and the
//! crash barrier of keyed calls — retried when the worker died before the function started,
//! `WorkerCrashed { started: true }` (remembered) after it started. The worker's side-effect
//! log counts executions.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pyvisor::{CallError, CallOptions, IdempotencyPolicy, Pool};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-idem-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

/// How many times `token` ran.
fn runs(log: &Path, token: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| *l == token).count()
}

async fn pool(tag: &str, workers: usize, max_in_flight: usize, tweak: impl FnOnce(pyvisor::PoolSpec) -> pyvisor::PoolSpec) -> (Pool, PathBuf) {
    common::logs();
    let log = tmpdir(tag).join("side_effects.log");
    let spec = common::spec("keyed.py")
        .workers(workers)
        .max_in_flight(max_in_flight)
        .env("KEYED_SIDE_EFFECT_LOG", log.to_str().expect("a UTF-8 temporary path"));
    (Pool::start(tweak(spec)).await.expect("the pool starts"), log)
}

type Spawned<T> = tokio::task::JoinHandle<Result<T, CallError>>;

/// A plain call that keeps the worker's one inline executor busy (`block` 5 s), then a keyed
/// `record` of `token` queued in the worker behind it.
async fn keyed_behind_a_busy_call(pool: &Pool, token: &'static str, k: &'static str) -> (Spawned<f64>, Spawned<String>) {
    let busy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call::<_, f64>("block", &5.0).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keyed = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call_with::<_, String>("record", &token, key(k)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    (busy, keyed)
}

fn key(k: &str) -> CallOptions {
    CallOptions::new().idempotency_key(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_calls_with_one_key_run_the_function_once() {
    pyvisor::metrics::enable();
    let (pool, log) = pool("hundred", 2, 4, |s| s.name("hundred")).await;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call_with::<_, String>("record_slowly", &("once", 0.3), key("k-once")).await })
        })
        .collect();
    for c in futures::future::join_all(calls).await {
        assert_eq!(c.expect("the caller does not panic").expect("the call succeeds"), "once");
    }
    assert_eq!(runs(&log, "once"), 1, "the function ran once for 100 callers");

    // Later: the kept outcome, without running anything.
    let again: String = pool.call_with("record_slowly", &("once", 0.3), key("k-once")).await.expect("a hit");
    assert_eq!(again, "once");
    assert_eq!(runs(&log, "once"), 1);

    // The key with another payload or another function: a conflict, nothing runs.
    match pool.call_with::<_, String>("record_slowly", &("twice", 0.3), key("k-once")).await {
        Err(CallError::IdempotencyKeyConflict { key, function, held_by }) => {
            assert_eq!((key.as_str(), function.as_str(), held_by.as_str()), ("k-once", "record_slowly", "record_slowly"));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    match pool.call_with::<_, String>("record", &"once", key("k-once")).await {
        Err(e @ CallError::IdempotencyKeyConflict { .. }) => assert_eq!(e.kind(), "idempotency_key_conflict"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(runs(&log, "twice"), 0);
    // The key's metric, in the Prometheus output too.
    let m = pyvisor::metrics::snapshot();
    let count = |how: &str| m.value("pyvisor.call.idempotency", &["hundred", "record_slowly", how]).unwrap_or(0);
    // (A caller scheduled only after the 0.3 s execution ended is a hit, not coalesced.)
    assert_eq!((count("miss"), count("coalesced") + count("hit")), (1, 100));
    assert!(count("coalesced") > 0 && count("hit") > 0);
    let text = m.to_prometheus();
    assert!(
        text.contains("pyvisor_call_idempotency_total{pyvisor_pool=\"hundred\",rpc_method=\"record_slowly\",pyvisor_idempotency=\"miss\"} 1"),
        "{text}"
    );
    // Without a key, it runs every time.
    for _ in 0..2 {
        let _: String = pool.call("record", &"plain").await.expect("a plain call");
    }
    assert_eq!(runs(&log, "plain"), 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_that_leave_do_not_cancel_the_execution_the_others_wait_on() {
    let (pool, log) = pool("leave", 1, 4, |s| s).await;
    // The first caller (who starts the execution) gives up quickly; so does a coalesced one.
    let first = tokio::time::timeout(
        Duration::from_millis(100),
        pool.call_with::<_, String>("record_slowly", &("stay", 0.5), key("k-stay")),
    );
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            pool.call_with::<_, String>("record_slowly", &("stay", 0.5), key("k-stay")).await
        })
    };
    let impatient = {
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let opts = key("k-stay").timeout(Duration::from_millis(100));
            pool.call_with::<_, String>("record_slowly", &("stay", 0.5), opts).await
        })
    };
    assert!(first.await.is_err(), "the first caller left");
    match impatient.await.expect("no panic") {
        Err(CallError::Timeout { .. }) => {}
        other => panic!("the impatient waiter times out on its own deadline: {other:?}"),
    }
    assert_eq!(waiter.await.expect("no panic").expect("the execution went on"), "stay");
    assert_eq!(runs(&log, "stay"), 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_exception_is_kept_and_returned_again_without_running() {
    let (pool, log) = pool("exception", 1, 1, |s| s).await;
    for _ in 0..3 {
        match pool.call_with::<_, String>("fail", &"bad", key("k-bad")).await {
            Err(CallError::Python { error, .. }) => {
                assert_eq!(error.type_name, "ValueError");
                assert_eq!(error.message, "no good: bad");
                assert!(error.traceback.as_deref().is_some_and(|t| t.contains("no good")));
            }
            other => panic!("expected the Python exception, got {other:?}"),
        }
    }
    assert_eq!(runs(&log, "bad"), 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_the_start_fails_started_and_is_remembered() {
    // `die` logs, then its worker is SIGKILLed right away: the start acknowledgement is in the
    // socket when the worker dies. Read before the crash is judged, it says "started": never
    // run again. (Judged before the socket is read to its end, the call would look not
    // started, be retried, and run twice.)
    let (pool, log) = pool("started", 2, 1, |s| s.max_retries(5)).await;
    let first = pool.call_with::<_, String>("die", &"d1", key("k-die")).await;
    let certificate = match first {
        Err(CallError::WorkerCrashed { started: true, attempts: 1, certificate, .. }) => certificate,
        other => panic!("expected WorkerCrashed {{ started: true }}, got {other:?}"),
    };
    assert_eq!(certificate.signal, Some(libc::SIGKILL));
    assert_eq!(runs(&log, "d1"), 1);
    // Remembered like a result: the same outcome again, nothing runs.
    match pool.call_with::<_, String>("die", &"d1", key("k-die")).await {
        Err(CallError::WorkerCrashed { started: true, certificate: again, .. }) => {
            assert_eq!(again.pid, certificate.pid, "the same death");
        }
        other => panic!("expected the remembered crash, got {other:?}"),
    }
    assert_eq!(runs(&log, "d1"), 1);
    // Without a key: a non-idempotent call whose worker crashed may have run (started: true).
    match pool.call::<_, String>("die", &"d2").await {
        Err(CallError::WorkerCrashed { started: true, attempts: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_call_killed_before_it_started_is_retried_and_runs_once() {
    let (pool, log) = pool("queued", 1, 2, |s| s).await;
    // The worker's one inline executor is busy: the keyed call waits in the worker's queue.
    let (busy, keyed) = keyed_behind_a_busy_call(&pool, "q1", "k-q1").await;
    assert_eq!(runs(&log, "q1"), 0, "queued behind the busy call");
    pool.chaos().kill(None).expect("a ready worker to kill");
    match busy.await.expect("no panic") {
        Err(CallError::WorkerCrashed { started: true, .. }) => {}
        other => panic!("the running non-idempotent call fails: {other:?}"),
    }
    // Not started: retried on the replacement (a non-idempotent function, but it never ran).
    assert_eq!(keyed.await.expect("no panic").expect("retried after the crash"), "q1");
    assert_eq!(runs(&log, "q1"), 1);
    assert_eq!(pool.status().await.retried, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_without_start_acknowledgements_makes_a_keyed_crash_count_as_started() {
    let (pool, log) = pool("old-adapter", 1, 2, |s| s.env("KEYED_NO_CAPABILITIES", "1")).await;
    let (busy, keyed) = keyed_behind_a_busy_call(&pool, "old1", "k-old1").await;
    pool.chaos().kill(None).expect("a ready worker to kill");
    let _ = busy.await;
    // Whether it started is unknown: it may have run, so it is never retried.
    match keyed.await.expect("no panic") {
        Err(CallError::WorkerCrashed { started: true, attempts: 1, .. }) => {}
        other => panic!("expected WorkerCrashed {{ started: true }}, got {other:?}"),
    }
    assert_eq!(runs(&log, "old1"), 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_outcomes_expire_after_the_ttl() {
    let policy = IdempotencyPolicy { ttl: Duration::from_millis(300), ..IdempotencyPolicy::default() };
    let (pool, log) = pool("ttl", 1, 1, |s| s.idempotency(policy)).await;
    let _: String = pool.call_with("record", &"t1", key("k-t1")).await.expect("runs");
    let _: String = pool.call_with("record", &"t1", key("k-t1")).await.expect("a hit");
    assert_eq!(runs(&log, "t1"), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _: String = pool.call_with("record", &"t1", key("k-t1")).await.expect("runs again");
    assert_eq!(runs(&log, "t1"), 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_start_is_judged_only_after_the_dead_workers_socket_is_read_to_its_end() {
    // A hand-written worker acknowledges the start behind 200 000 beats (8 MB) in one write and
    // exits at once: its exit is seen while the acknowledgement still waits in the socket.
    // Judged then, the call would look not started, be retried and "run" again (checked: with
    // the calls failed at the top of `finalize`, this fails after 4 attempts).
    common::logs();
    let log = tmpdir("ordering").join("side_effects.log");
    let spec = common::spec("raw_protocol.py")
        .workers(1)
        .max_retries(3)
        .taint_window(Duration::ZERO)
        .env("RAW_MODE", "started_then_exit")
        .env("RAW_BEATS", "200000")
        .env("RAW_LOG", log.to_str().expect("a UTF-8 temporary path"));
    let pool = Pool::start(spec).await.expect("the pool starts");
    match pool.call_with::<_, String>("echo", &"s1", key("k-s1")).await {
        Err(CallError::WorkerCrashed { started: true, attempts: 1, .. }) => {}
        other => panic!("expected WorkerCrashed {{ started: true }} after one attempt, got {other:?}"),
    }
    assert_eq!(runs(&log, "s1"), 1, "ran once");
    pool.shutdown().await;
}

/// The outcome is kept before its callers hear it: a caller that got it and calls again with
/// the key gets a hit, never the execution that is ending (it was "coalesced" into it, seen
/// once in a telemetry test, before the order was fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_got_the_outcome_and_calls_again_gets_a_hit() {
    pyvisor::metrics::enable();
    let (pool, log) = pool("again", 1, 4, |s| s.name("again")).await;
    for i in 0..300 {
        let k = format!("k-again-{i}");
        let first: String = pool.call_with("record", &format!("again-{i}"), key(&k)).await.unwrap();
        let second: String = pool.call_with("record", &format!("again-{i}"), key(&k)).await.unwrap();
        assert_eq!(first, second);
    }
    let m = pyvisor::metrics::snapshot();
    let count = |how: &str| m.value("pyvisor.call.idempotency", &["again", "record", how]).unwrap_or(0);
    assert_eq!((count("miss"), count("hit"), count("coalesced")), (300, 300, 0));
    assert_eq!(std::fs::read_to_string(&log).unwrap_or_default().lines().count(), 300, "each key ran once");
    pool.shutdown().await;
}
