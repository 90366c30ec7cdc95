//! The call path against workers that die at awkward moments: each test pins one defect of the
//! call path (issue 12) with real Python processes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyvisor::{CallError, CallOptions, DeathCause, Pool, PoolEvent, RecyclePolicy};

/// Events of a pool, collected for assertions.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<PoolEvent>>>);
impl Events {
    fn spec(&self, spec: pyvisor::PoolSpec) -> pyvisor::PoolSpec {
        let me = self.clone();
        spec.on_event(move |e| me.0.lock().unwrap().push(e.clone()))
    }
    fn recycled(&self) -> bool {
        self.0.lock().unwrap().iter().any(|e| matches!(e, PoolEvent::Recycled { .. }))
    }
}

async fn ready(pool: &Pool, n: usize) -> bool {
    for _ in 0..1000 {
        if pool.status().await.ready() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

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
        assert!(matches!(r.unwrap(), Err(CallError::ShutDown { .. }) | Err(CallError::PoolFailed { .. })));
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

/// Replies a worker wrote just before it exited reach their callers: the death certificate
/// fails only the calls that were not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_written_just_before_exit_is_delivered() {
    let pool = Pool::start(common::spec("raw_protocol.py").workers(1).taint_window(Duration::ZERO).env("RAW_MODE", "reply_then_exit"))
        .await
        .unwrap();
    let n = 8 << 20;
    let mut last_pid = None;
    for round in 0..5 {
        // Wait for the replacement of the worker that exited after the last round.
        let mut pid = None;
        for _ in 0..1000 {
            let s = pool.status().await;
            pid = s.workers[0].pid.filter(|p| s.ready() == 1 && Some(*p) != last_pid);
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(pid.is_some(), "no worker came back");
        last_pid = pid;
        let reply = pool.call_raw("blob", &rmp_serde_encode(n), CallOptions::new()).await;
        match reply {
            Ok(bytes) => assert!(bytes.len() >= n, "round {round}: short reply"),
            Err(e) => panic!("round {round}: the worker answered before exiting, yet: {e}"),
        }
    }
    pool.shutdown().await;
}

fn rmp_serde_encode(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    rmpv::encode::write_value(&mut v, &rmpv::Value::from(n as u64)).unwrap();
    v
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
