//! The call path against workers that die at awkward moments: each test pins one defect of the
//! call path (issue 12) with real Python processes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pyvisor::{CallError, CallOptions, DeathCause, Pool, PoolEvent, RecyclePolicy};

use common::Events;

/// A pool whose router is killed (as `Shutdown::Brutal` or a shutdown timeout does): calls
/// pending without a timeout get a typed error instead of hanging, new calls are refused, and
/// no process is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_a_killed_pool_get_an_error_and_nothing_is_left() {
    let pool = Pool::start(common::spec("faults.py").workers(2).max_in_flight(2)).await.unwrap();
    let pids: Vec<u32> = pool.status().await.workers.iter().filter_map(|w| w.pid).collect();
    let pending: Vec<_> = (0..3)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.call_with::<_, f64>("nap", &30.0, CallOptions::new().no_timeout()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pool.actor().kill();
    for p in pending {
        let r = tokio::time::timeout(Duration::from_secs(10), p).await.expect("a pending call hangs after its pool was killed");
        // Which typed error depends on whether the worker or the router went first.
        let r = r.unwrap();
        assert!(
            matches!(r, Err(CallError::ShutDown { .. } | CallError::PoolFailed { .. } | CallError::WorkerCrashed { .. })),
            "{r:?}"
        );
    }
    let again = tokio::time::timeout(Duration::from_secs(10), pool.call::<_, u64>("echo", &1u64)).await.expect("a new call hangs");
    assert!(matches!(again, Err(CallError::ShutDown { .. })), "{again:?}");
    for pid in pids {
        assert!(common::eventually(Duration::from_secs(10), || !common::alive(pid)).await, "worker {pid} outlived its killed pool");
    }
}

/// A worker that crashes while it drains for a recycle is a crash: its idempotent call is
/// retried on the replacement, its non-idempotent call fails with `WorkerCrashed` — not
/// `ShutDown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_draining_goes_through_the_crash_barrier() {
    common::logs();
    let events = Events::default();
    let pool = Pool::start(events.spec(
        common::spec("faults.py")
            .workers(1)
            .max_in_flight(4)
            .taint_window(Duration::ZERO)
            .recycle(RecyclePolicy::default().max_requests(1).jitter(0.0).drain_timeout(Duration::from_secs(30))),
    ))
    .await
    .unwrap();
    let old = pool.status().await.workers[0].pid.unwrap();
    let idem = {
        let p = pool.clone();
        tokio::spawn(async move { p.call_with::<_, f64>("async_wait", &4.0, CallOptions::new().idempotent(true)).await })
    };
    let once = {
        let p = pool.clone();
        tokio::spawn(async move { p.call_with::<_, f64>("async_wait", &4.0, CallOptions::new().idempotent(false)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One request served: the worker is recycled; its replacement starts, then it drains.
    let _: u64 = pool.call("echo", &1u64).await.unwrap();
    assert!(common::eventually(Duration::from_secs(20), || events.recycled()).await, "no recycle");
    common::signal(old, libc::SIGKILL);
    let idem = tokio::time::timeout(Duration::from_secs(30), idem).await.unwrap().unwrap();
    assert!(idem.is_ok(), "the idempotent call must be retried on the replacement: {idem:?}");
    let once = tokio::time::timeout(Duration::from_secs(30), once).await.unwrap().unwrap();
    match once {
        Err(CallError::WorkerCrashed { certificate, .. }) => assert_eq!(certificate.pid, Some(old)),
        other => panic!("the non-idempotent call must fail with WorkerCrashed, got {other:?}"),
    }
    pool.shutdown().await;
}

/// Replies a worker wrote just before it exited reach their callers: the reader delivers every
/// reply still in the socket before the death certificate fails what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_written_in_a_burst_just_before_exit_are_all_delivered() {
    let n = 5000u64;
    let pool = Pool::start(
        common::spec("raw_protocol.py")
            .workers(1)
            .max_in_flight(n as usize)
            .env("RAW_MODE", "batch_then_exit")
            .env("RAW_BATCH", n.to_string()),
    )
    .await
    .unwrap();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let p = pool.clone();
            tokio::spawn(async move { p.call::<_, u64>("echo", &i).await })
        })
        .collect();
    let mut lost = 0;
    for (i, c) in calls.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), c).await.unwrap().unwrap() {
            Ok(v) => assert_eq!(v, i as u64),
            Err(_) => lost += 1,
        }
    }
    assert_eq!(lost, 0, "{lost} of {n} replies written before the exit were dropped");
    pool.shutdown().await;
}

/// A worker that keeps beating but stops reading its socket is killed with a certificate that
/// says so, and its call goes through the crash barrier instead of waiting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_reading_is_killed_as_unresponsive() {
    let pool = Pool::start(
        common::spec("raw_protocol.py")
            .workers(1)
            .env("RAW_MODE", "deaf")
            .heartbeat_interval(Duration::from_millis(100))
            .heartbeat_max_missed(5),
    )
    .await
    .unwrap();
    let r = pool.call_with::<_, u64>("echo", &1u64, CallOptions::new().timeout(Duration::from_secs(20))).await;
    match r {
        Err(CallError::WorkerCrashed { certificate, .. }) => {
            assert!(matches!(certificate.cause, DeathCause::Unresponsive { .. }), "{}", certificate);
            assert!(certificate.killed_by_pyvisor);
        }
        other => panic!("expected WorkerCrashed (unresponsive), got {other:?}"),
    }
    pool.shutdown().await;
}

/// A SIGTERM from outside is an external kill: the worker finishes its call in flight, calls
/// that reach it meanwhile are refused without running and go to another worker (here: its
/// replacement), and its certificate shows the signal, implicating no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_sigterm_blames_no_call_and_loses_none() {
    let pool = Pool::start(common::spec("faults.py").workers(1).max_in_flight(8).taint_window(Duration::ZERO)).await.unwrap();
    let pid = pool.status().await.workers[0].pid.unwrap();
    let slow = {
        let p = pool.clone();
        tokio::spawn(async move { p.call_with::<_, f64>("async_wait", &1.0, CallOptions::new().idempotent(false)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::signal(pid, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Non-idempotent calls made during the worker's grace: they must not fail, since they never ran.
    let late: Vec<_> = (0..4u64)
        .map(|i| {
            let p = pool.clone();
            tokio::spawn(async move { p.call_with::<_, u64>("record", &i, CallOptions::new().idempotent(false)).await })
        })
        .collect();
    assert_eq!(tokio::time::timeout(Duration::from_secs(30), slow).await.unwrap().unwrap().unwrap(), 1.0);
    for (i, l) in late.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(30), l).await.unwrap().unwrap();
        assert_eq!(r.unwrap_or_else(|e| panic!("a call refused by a terminating worker was lost: {e}")), i as u64);
    }
    assert!(common::eventually(Duration::from_secs(10), || pool.death_certificates().iter().any(|c| c.pid == Some(pid))).await);
    let cert = pool.death_certificates().into_iter().find(|c| c.pid == Some(pid)).unwrap();
    assert_eq!(cert.signal, Some(libc::SIGTERM), "{cert}");
    assert!(!cert.implicates_calls(), "an external SIGTERM implicates no call: {cert}");
    pool.shutdown().await;
}

/// Children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string)))
                .flatten()
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

/// A worker whose watchdog was killed has lost its protection against the parent's death (its
/// subprocesses could outlive it): it is noticed and recycled, make-before-break, with no call
/// lost meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_watchdog_died_is_recycled() {
    let events = Events::default();
    let pool = Pool::start(events.spec(common::spec("faults.py").workers(1).heartbeat_interval(Duration::from_millis(100))))
        .await
        .unwrap();
    let pid = pool.status().await.workers[0].pid.unwrap();
    let watchdogs = children_of(pid);
    assert_eq!(watchdogs.len(), 1, "one watchdog per worker");
    common::signal(watchdogs[0], libc::SIGKILL);
    let calls = {
        let p = pool.clone();
        tokio::spawn(async move {
            for i in 0..200u64 {
                let v: u64 = p.call("echo", &i).await.expect("no call is lost while the worker is recycled");
                assert_eq!(v, i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let recycled = common::eventually(Duration::from_secs(20), || {
        events.0.lock().unwrap().iter().any(|e| matches!(e, PoolEvent::Recycled { reason: pyvisor::RecycleReason::WatchdogLost, .. }))
    })
    .await;
    assert!(recycled, "the worker was not recycled after losing its watchdog");
    assert!(common::eventually(Duration::from_secs(20), || !common::alive(pid)).await, "the old worker still runs");
    tokio::time::timeout(Duration::from_secs(60), calls).await.unwrap().unwrap();
    let now = pool.status().await.workers[0].pid.unwrap();
    assert_eq!(children_of(now).len(), 1, "the replacement has its watchdog");
    pool.shutdown().await;
}

/// A call next to the culprit of a harakiri is innocent: the harakiri implicates only the call
/// that overran, and the culprit (abandoned by its caller) still counts as in flight, so the
/// neighbour was not alone. It is retried, never made a poison request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_neighbour_of_a_harakiri_is_not_poison() {
    let pool = Pool::start(
        common::spec("faults.py")
            .workers(1)
            .max_in_flight(4)
            .taint_window(Duration::ZERO)
            .poison_threshold(1)
            .heartbeat_interval(Duration::from_millis(100))
            .harakiri_grace(Some(Duration::from_millis(200))),
    )
    .await
    .unwrap();
    let innocent = {
        let p = pool.clone();
        tokio::spawn(async move { p.call_with::<_, f64>("async_wait", &2.0, CallOptions::new().idempotent(true).no_timeout()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let culprit = pool.call_with::<_, f64>("overrun", &30.0, CallOptions::new().timeout(Duration::from_millis(300))).await;
    assert!(matches!(culprit, Err(CallError::Timeout { .. })), "{culprit:?}");
    let r = tokio::time::timeout(Duration::from_secs(30), innocent).await.unwrap().unwrap();
    assert_eq!(r.unwrap_or_else(|e| panic!("the innocent neighbour of a harakiri failed: {e}")), 2.0);
    pool.shutdown().await;
}

/// Calls in flight at an external kill are not suspects: under load (`max_in_flight` > 1, so
/// no worker is ever idle) their retries run like any call instead of waiting for an idle
/// worker until the queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_an_external_kill_do_not_wait_for_an_idle_worker() {
    let pool = Pool::start(
        common::spec("faults.py")
            .workers(2)
            .max_in_flight(4)
            .taint_window(Duration::ZERO)
            .queue_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..12u64)
        .map(|c| {
            let (p, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = p.call_with::<_, f64>("nap", &0.02, CallOptions::new().idempotent(true).no_timeout()).await;
                    if let Err(e) = r {
                        failures.push(format!("caller {c}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = pool.status().await;
        if let Some(pid) = s.workers.iter().find(|w| w.in_flight > 0).and_then(|w| w.pid) {
            common::signal(pid, libc::SIGKILL);
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in callers {
        failures.extend(tokio::time::timeout(Duration::from_secs(30), c).await.unwrap().unwrap());
    }
    assert!(failures.is_empty(), "{} failed calls, e.g. {}", failures.len(), failures[0]);
    pool.shutdown().await;
}

/// Only the first `hello` counts: a worker that sends another (here with another function
/// table) is killed for a protocol error, the pool-wide function table is unchanged, and the
/// pool recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_is_a_protocol_error() {
    let pool = Pool::start(common::spec("raw_protocol.py").workers(1).taint_window(Duration::ZERO).env("RAW_MODE", "double_hello"))
        .await
        .unwrap();
    let first = pool.status().await.workers[0].pid;
    match pool.call::<_, u64>("echo", &1u64).await {
        Err(CallError::WorkerCrashed { certificate, .. }) => {
            assert!(matches!(&certificate.cause, DeathCause::ProtocolError(e) if e.contains("second hello")), "{certificate}");
        }
        other => panic!("expected WorkerCrashed for a protocol error, got {other:?}"),
    }
    let names: Vec<String> = pool.functions().into_iter().map(|f| f.name).collect();
    assert_eq!(names, vec!["echo".to_string()], "the second hello must not change the function table");
    let mut back = false;
    for _ in 0..500 {
        let s = pool.status().await;
        if s.ready() == 1 && s.workers[0].pid != first {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the pool did not recover");
    pool.shutdown().await;
}
