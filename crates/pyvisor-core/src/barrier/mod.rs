//! The crash barrier: what a worker's death means for the pool and for the calls it held.
//!
//! Pure policy values, without processes, tasks or locks; every time-dependent method takes
//! `now`, so tests drive the clock. The callers (the router, the call path) own the state these
//! values live in and act on their verdicts.
//!
//! - [`classify`]: reading a death certificate: is it a start failure, is it evidence against
//!   a given call;
//! - [`start_failures`]: the pool's restart intensity (start failures in a sliding window);
//! - [`retry`]: one call's barrier: fail, retry (alone when suspect), poison, or give up;
//! - [`quarantine`]: fingerprints of poison requests, refused until their window ends;
//! - [`idempotency`]: calls with an idempotency key — one execution per key in flight, its
//!   outcome kept (TTL, count and byte bounds). The one module here that is shared state
//!   itself (concurrent maps), since every caller of a key must meet in it.
//!
//! The taint window and the choice of a worker for a retry are dispatch's (`dispatch::pick`).

pub(crate) mod classify;
pub(crate) mod idempotency;
pub(crate) mod quarantine;
pub(crate) mod retry;
pub(crate) mod start_failures;

#[cfg(test)]
pub(crate) mod testing {
    //! Death certificates for the barrier's tests.
    use std::time::{Duration, SystemTime};

    use crate::death::{CallInFlight, DeathCause, DeathCertificate, WorkerId};

    /// A worker that died on its own (`cause: Exited`) with `exit_code` or `signal`, holding
    /// `calls` as `(id, abandoned)`.
    pub(crate) fn death(exit_code: Option<i32>, signal: Option<i32>, calls: &[(u64, bool)]) -> DeathCertificate {
        DeathCertificate {
            pool: "p".to_string(),
            worker: WorkerId(1),
            index: 0,
            pid: Some(42),
            cause: DeathCause::Exited,
            exit_code,
            signal,
            killed_by_pyvisor: false,
            oom_suspected: false,
            uptime: Duration::from_secs(1),
            became_ready: true,
            died_at: SystemTime::UNIX_EPOCH,
            last_rss: None,
            last_beat_age: None,
            calls_in_flight: calls
                .iter()
                .map(|&(id, abandoned)| CallInFlight {
                    id,
                    function: "f".to_string(),
                    attempt: 1,
                    running_for: Duration::from_millis(5),
                    trace_id: None,
                    abandoned,
                })
                .collect(),
            stderr_tail: Vec::new(),
            python_stack: None,
        }
    }

    /// A death before `hello`, holding no call.
    pub(crate) fn start_death(exit_code: Option<i32>, signal: Option<i32>) -> DeathCertificate {
        DeathCertificate { became_ready: false, ..death(exit_code, signal, &[]) }
    }
}
