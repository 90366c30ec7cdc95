//! Hostile workers (tests/workers/raw_protocol.py speaks the protocol by hand): a mistyped
//! hello, a frame that announces the maximum size and never ends, and a flood of beats. The
//! parent stays up, tells what happened, and the pool recovers. (An over-long output line and
//! a second hello are tested in bounded_output.rs and call_path.rs; the decoder's allocation
//! bound with a counting allocator in pyvisor-protocol's alloc_bound.rs.)

mod common;

use std::time::Duration;

use pyvisor::{CallError, DeathCause, Pool, StartError};

fn raw(mode: &str) -> pyvisor::PoolSpec {
    common::spec("raw_protocol.py").env("RAW_MODE", mode).workers(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_hello_is_a_protocol_error_and_a_start_failure() {
    let spec = raw("bad_hello").max_start_failures(1, Duration::from_secs(60)).start_backoff(pyvisor::Backoff::default().base(Duration::from_millis(10)));
    match Pool::start(spec).await {
        Err(StartError::TooManyStartFailures { certificate, .. }) => {
            assert!(matches!(certificate.cause, DeathCause::ProtocolError(_)), "{}", certificate.cause);
            assert!(certificate.cause.to_string().contains("functions"), "the error names the field: {}", certificate.cause);
        }
        Err(e) => panic!("expected TooManyStartFailures, got {e}"),
        Ok(p) => {
            p.shutdown().await;
            panic!("a worker with a mistyped hello was taken as ready");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_never_ends_gets_the_worker_killed_and_the_pool_recovers() {
    // 256 MiB announced; a parent that reserved it would not show it in RSS (untouched pages):
    // the allocation bound itself is the counting-allocator test of the decoder.
    let spec = raw("stall_prefix").max_frame(256 << 20).heartbeat_interval(Duration::from_millis(100)).heartbeat_max_missed(3);
    let pool = Pool::start(spec).await.expect("pool starts");
    match pool.call::<_, String>("echo", &"stall").await {
        Err(CallError::WorkerCrashed { certificate, .. }) => {
            assert!(matches!(certificate.cause, DeathCause::Hung { .. } | DeathCause::Unresponsive { .. }), "{}", certificate.cause)
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    let v: String = pool.call("echo", &"after").await.expect("the replacement serves");
    assert_eq!(v, "after");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_beats_does_not_stop_the_calls() {
    let pool = Pool::start(raw("flood").heartbeat_interval(Duration::from_millis(100))).await.expect("pool starts");
    let pid = pool.status().await.workers[0].pid;
    for i in 0..500u32 {
        let v: u32 = pool.call("echo", &i).await.expect("echo during the flood");
        assert_eq!(v, i);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = pool.status().await;
    assert_eq!(s.workers[0].pid, pid, "the flooding worker is not killed for it");
    assert!(pool.death_certificates().is_empty());
    pool.shutdown().await;
}
