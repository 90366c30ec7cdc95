//! Start failures that are not crashes of a running worker: a hung import, a wrong protocol.

mod common;

use std::time::Duration;

use pyvisor::{Backoff, DeathCause, Jitter, Pool, StartError};

fn quick_failure(spec: pyvisor::PoolSpec) -> pyvisor::PoolSpec {
    spec.workers(1)
        .start_backoff(Backoff::default().base(Duration::from_millis(10)).jitter(Jitter::None))
        .max_start_failures(1, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_import_hits_the_start_timeout_with_its_stderr_tail() {
    let spec = quick_failure(common::spec("slow_import.py").start_timeout(Duration::from_millis(1500)));
    match Pool::start(spec).await {
        Err(StartError::TooManyStartFailures { certificate, failures, .. }) => {
            assert_eq!(failures, 2);
            assert_eq!(certificate.cause, DeathCause::StartTimeout(Duration::from_millis(1500)));
            assert!(certificate.killed_by_pyvisor);
            assert!(!certificate.became_ready);
            assert!(certificate.stderr_tail.iter().any(|l| l.contains("loading the model")), "{:?}", certificate.stderr_tail);
            let pid = certificate.pid.expect("it was spawned");
            assert!(!common::alive(pid));
        }
        other => panic!("expected TooManyStartFailures, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_mismatch_is_refused_with_both_versions() {
    match Pool::start(quick_failure(common::spec("bad_version.py"))).await {
        Err(e @ StartError::TooManyStartFailures { .. }) => {
            let StartError::TooManyStartFailures { certificate, .. } = &e else { unreachable!() };
            assert_eq!(certificate.cause, DeathCause::VersionMismatch { worker: 99, parent: pyvisor::protocol::PROTOCOL_VERSION });
            let msg = e.to_string();
            assert!(msg.contains("worker speaks 99") && msg.contains(&format!("pyvisor speaks {}", pyvisor::protocol::PROTOCOL_VERSION)), "{msg}");
        }
        other => panic!("expected TooManyStartFailures, got {other:?}"),
    }
}
