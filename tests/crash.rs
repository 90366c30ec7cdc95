//! Worker crashes: callers get `WorkerCrashed` with a death certificate, no call hangs, and
//! the pool returns to full strength.

mod common;

use std::time::Duration;

use pyvisor::{CallError, Pool, WorkerState};

const HOURS: Duration = Duration::from_secs(3 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_call_gives_worker_crashed_and_the_pool_recovers() {
    common::logs();
    // Heartbeat and call timeouts in hours: only noticing the exit can end these calls.
    let pool = Pool::start(
        common::spec("basic.py")
            .workers(2)
            .max_in_flight(3)
            .heartbeat_interval(HOURS)
            .call_timeout(Some(HOURS))
            // The surviving worker holds hour-long inline calls; a short taint window lets the
            // replacement take the follow-up call once it expires (DESIGN: tainted workers take
            // calls only when no untainted worker is ready).
            .taint_window(Duration::from_millis(300))
            .shutdown_timeouts(Duration::from_millis(500), Duration::from_millis(500)),
    )
    .await
    .expect("pool starts");
    let before = pool.status().await;
    assert_eq!(before.ready(), 2);

    let calls: Vec<_> = (0..3)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.call::<_, String>("die_after", &3600).await })
        })
        .collect();
    // Find the worker holding calls.
    let mut victim = None;
    for _ in 0..200 {
        let s = pool.status().await;
        if let Some(w) = s.workers.iter().find(|w| w.in_flight > 0) {
            victim = Some((w.index, w.pid.expect("pid"), w.in_flight));
            if s.workers.iter().map(|w| w.in_flight).sum::<usize>() == 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (index, pid, _) = victim.expect("a worker holds the calls");
    let on_victim: Vec<usize> = pool.status().await.workers.iter().map(|w| w.in_flight).collect();
    common::signal(pid, libc::SIGKILL);

    let expected = on_victim[index];
    let mut pending: futures::stream::FuturesUnordered<_> = calls.into_iter().collect();
    let mut crashed = 0;
    while crashed < expected {
        use futures::StreamExt;
        let r = tokio::time::timeout(Duration::from_secs(30), pending.next())
            .await
            .expect("no call hangs")
            .expect("a call is pending")
            .unwrap();
        match r {
            Err(CallError::WorkerCrashed { certificate, attempts, .. }) => {
                crashed += 1;
                assert_eq!(attempts, 1);
                assert_eq!(certificate.pid, Some(pid));
                assert_eq!(certificate.signal, Some(libc::SIGKILL));
                assert!(certificate.became_ready);
                assert!(!certificate.killed_by_pyvisor);
                assert!(certificate.uptime > Duration::ZERO);
                assert!(certificate.calls_in_flight.iter().all(|c| c.function == "die_after"));
                assert_eq!(certificate.calls_in_flight.len(), expected);
                assert!(certificate.to_string().contains("SIGKILL"));
            }
            other => panic!("expected WorkerCrashed, got {other:?}"),
        }
    }
    // Calls on the surviving worker are still running (they cannot finish within an hour).
    for c in pending.iter() {
        c.abort();
    }
    assert_eq!(crashed, on_victim[index]);
    assert!(common::eventually(Duration::from_secs(10), || !common::alive(pid)).await);

    // Back to full strength with a new process in the victim's position.
    let mut recovered = false;
    for _ in 0..500 {
        let s = pool.status().await;
        let w = &s.workers[index];
        if s.ready() == 2 && w.pid != Some(pid) && w.state == WorkerState::Ready {
            assert_eq!(w.restarts, 1);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(recovered, "the pool did not return to full strength");
    // The replacement sits out its taint window; once it has passed, it takes calls (the
    // surviving worker is busy with hour-long inline calls).
    let mut clear = false;
    for _ in 0..500 {
        if pool.status().await.workers.iter().all(|w| !w.tainted) {
            clear = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(clear, "the taint window never closed");
    let v: i32 = pool.call("echo", &5).await.expect("the pool serves after the crash");
    assert_eq!(v, 5);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_racing_with_kills_never_hang_and_never_return_wrong_values() {
    let pool = Pool::start(common::spec("basic.py").workers(3).max_in_flight(4).heartbeat_interval(HOURS))
        .await
        .expect("pool starts");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|c| {
            let p = pool.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut crashed, mut i) = (0u32, 0u32, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let v = (c, i);
                    match p.call::<_, (u32, u64)>("echo", &v).await {
                        Ok(back) => {
                            assert_eq!(back, v);
                            ok += 1;
                        }
                        Err(CallError::WorkerCrashed { .. }) => crashed += 1,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                (ok, crashed)
            })
        })
        .collect();
    let mut kills = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = pool.status().await;
        let ready: Vec<u32> = s.workers.iter().filter(|w| w.state == WorkerState::Ready).filter_map(|w| w.pid).collect();
        if let Some(pid) = ready.first() {
            common::signal(*pid, libc::SIGKILL);
            kills += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_ok = 0;
    for c in callers {
        let (ok, _) = tokio::time::timeout(Duration::from_secs(30), c).await.expect("no caller hangs").unwrap();
        total_ok += ok;
    }
    assert!(kills >= 5);
    assert!(total_ok > 0);
    let mut full = false;
    for _ in 0..750 {
        if pool.status().await.ready() == 3 {
            full = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(full, "the pool did not return to full strength");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_then_stops_every_process() {
    let pool = Pool::start(common::spec("basic.py").workers(2)).await.expect("pool starts");
    let pids: Vec<u32> = pool.status().await.workers.iter().filter_map(|w| w.pid).collect();
    assert_eq!(pids.len(), 2);
    let running = {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, f64>("sleep", &0.5).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.shutdown().await;
    assert_eq!(running.await.unwrap().expect("the call in flight finished during the drain"), 0.5);
    for pid in pids {
        assert!(!common::alive(pid), "worker {pid} survived shutdown");
    }
    pool.shutdown().await; // idempotent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_workers_that_ignore_sigterm_and_their_subprocesses() {
    let pool = Pool::start(
        common::spec("stubborn.py")
            .workers(1)
            .shutdown_timeouts(Duration::from_millis(300), Duration::from_millis(300)),
    )
    .await
    .expect("pool starts");
    let pid = pool.status().await.workers[0].pid.unwrap();
    let child: u32 = pool.call("spawn_child", &()).await.expect("spawn_child");
    assert!(common::alive(child));
    let stuck = {
        let p = pool.clone();
        tokio::spawn(async move { p.call_with::<_, u64>("hold_gil", &(), pyvisor::CallOptions::new().no_timeout()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(30), pool.shutdown()).await.expect("shutdown completes");
    assert!(matches!(stuck.await.unwrap(), Err(CallError::ShutDown { .. })));
    assert!(common::eventually(Duration::from_secs(10), || !common::alive(pid) && !common::alive(child)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_pool() {
    let pool = Pool::start(common::spec("basic.py").workers(2)).await.expect("pool starts");
    let clone = pool.clone();
    let pids: Vec<u32> = pool.status().await.workers.iter().filter_map(|w| w.pid).collect();
    drop(pool);
    // A clone keeps it alive.
    let v: i32 = clone.call("echo", &1).await.expect("still running while a handle exists");
    assert_eq!(v, 1);
    drop(clone);
    assert!(common::eventually(Duration::from_secs(20), || pids.iter().all(|p| !common::alive(*p))).await);
}
