//! Out-of-band buffers from a worker (issue 16's first step, docs/design/out_of_band_buffers.md):
//! a worker that announces `oob` passes sealed memfds with an `fds` message; the parent checks
//! each fd before any use (sealed against writes, shrinking and growing; as long as announced;
//! a cap per message and on unclaimed fds) and kills a worker that breaks a rule, with a
//! certificate saying which. The adapter does not send buffers yet: the worker here is
//! tests/workers/raw_protocol.py, speaking the protocol by hand.

mod common;

use std::time::Duration;

use pyvisor::{CallError, CallOptions, DeathCause, Pool};

fn raw(mode: &str) -> pyvisor::PoolSpec {
    common::spec("raw_protocol.py").env("RAW_MODE", mode).workers(1).heartbeat_interval(Duration::from_millis(200))
}

/// The tests here count the process's memfds: one at a time (another test's buffers in flight
/// would be counted too).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The parent's open fds that are memfds the raw workers made (named `raw-MODE`): what a leak
/// of buffers would leave.
fn open_memfds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| {
        d.filter_map(Result::ok).filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:raw-"))).count()
    })
}

/// Wait (a guard, not a timing claim) for the count to come back to `before`: a stopped
/// worker's reader closes the fds it still held as it ends, a moment after the pool stops.
async fn back_to(before: usize) -> usize {
    common::eventually(Duration::from_secs(30), || open_memfds() <= before).await;
    open_memfds()
}

fn bytes_of(value: &[u8]) -> Vec<u8> {
    match rmpv::decode::read_value(&mut &value[..]) {
        Ok(rmpv::Value::Binary(b)) => b,
        other => panic!("expected bin, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_buffers_arrive_and_no_fd_is_left_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(raw("oob_reply")).await.expect("pool starts");
    // Earlier tests' stopped workers may still be closing theirs.
    let _ = back_to(0).await;
    let payload = |n: u32| rmp_serde::to_vec(&n).expect("encodes");
    for n in [0u32, 1, 70_000, 4 << 20] {
        let reply = pool.call_raw("echo", &payload(n), CallOptions::new()).await.expect("a reply");
        let got = bytes_of(&reply);
        assert_eq!(got.len(), n as usize);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "the buffer's bytes");
    }
    let before = open_memfds();
    for _ in 0..2000 {
        let reply = pool.call_raw("echo", &payload(100), CallOptions::new()).await.expect("a reply");
        assert_eq!(bytes_of(&reply).len(), 100);
    }
    // Each buffer is closed before its reply reaches the caller: no wait needed here.
    assert_eq!(open_memfds(), before, "the parent keeps no fd of a buffer it has read");
    assert!(pool.death_certificates().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_passes_a_bad_buffer_is_killed_with_a_certificate_saying_why() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let before = open_memfds();
    for (mode, says) in [
        ("oob_unsealed", "not sealed against WRITE"),
        ("oob_short", "the message references"),
        ("oob_many", "fds in one message"),
        ("oob_unclaimed", "not claimed by an fds message"),
        ("oob_repeat", "referenced more than once"),
    ] {
        let pool = Pool::start(raw(mode)).await.expect("pool starts");
        let payload = rmp_serde::to_vec(&64u32).expect("encodes");
        let mut end = None;
        // The unclaimed fds pile up call after call until the cap.
        for _ in 0..40 {
            match pool.call_raw("echo", &payload, CallOptions::new().timeout(Duration::from_secs(30))).await {
                Ok(_) => continue,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        match end {
            Some(CallError::WorkerCrashed { certificate, .. }) => {
                assert!(matches!(certificate.cause, DeathCause::ProtocolError(_)), "{mode}: {}", certificate.cause);
                assert!(certificate.cause.to_string().contains(says), "{mode}: {}", certificate.cause);
                assert!(certificate.killed_by_pyvisor, "{mode}: killed by the parent");
            }
            other => panic!("{mode}: expected WorkerCrashed, got {other:?}"),
        }
        pool.shutdown().await;
    }
    assert_eq!(back_to(before).await, before, "every fd the hostile workers passed was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fds_message_from_a_worker_that_did_not_announce_oob_is_a_protocol_error() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // `oob_reply` without the capability: the same bytes from a worker that never said `oob`.
    let pool = Pool::start(raw("oob_reply").env("RAW_NO_OOB", "1")).await.expect("pool starts");
    match pool.call_raw("echo", &rmp_serde::to_vec(&8u32).expect("encodes"), CallOptions::new()).await {
        Err(CallError::WorkerCrashed { certificate, .. }) => {
            assert!(certificate.cause.to_string().contains("did not announce `oob`"), "{}", certificate.cause)
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    pool.shutdown().await;
}
