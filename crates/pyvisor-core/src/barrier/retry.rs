//! One call's crash barrier: after each crash of the worker that held it, fail the call, retry
//! it (alone on a worker once it is suspect), declare it a poison request, or give up.
//!
//! Owns the call's attempt number, its death certificates and the evidence against it. It does
//! not pick the worker for a retry (dispatch), wait for one, quarantine a poison request
//! (`quarantine`), or build the caller's error.

use std::sync::Arc;

use super::classify;
use crate::death::DeathCertificate;
use crate::spec::PoolSpec;

/// The pool's retry and poison knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Retries after crashes: a call makes at most `max_retries + 1` attempts.
    pub max_retries: u32,
    /// Crashes with the call alone in flight, each implicating it, that make it poison.
    pub poison_threshold: u32,
}

impl RetryPolicy {
    pub(crate) fn from_spec(spec: &PoolSpec) -> Self {
        RetryPolicy { max_retries: spec.max_retries, poison_threshold: spec.poison_threshold }
    }
}

/// What to do with a call whose worker crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashVerdict {
    /// Not idempotent: fail with `WorkerCrashed` at once, never retried.
    Fail,
    /// Retries used up: fail with `WorkerCrashed` and the attempts made.
    Exhausted,
    /// A poison request: fail with `PoisonRequest` and quarantine its fingerprint.
    Poison,
    /// Retry as the next attempt; `alone`: only on a worker with no other call in flight.
    Retry { alone: bool },
}

/// The crash barrier of one call, across its attempts.
#[derive(Debug, Clone)]
pub(crate) struct CallBarrier {
    policy: RetryPolicy,
    idempotent: bool,
    attempt: u32,
    certificates: Vec<Arc<DeathCertificate>>,
    /// A crash implicated it: retried alone from then on.
    suspect: bool,
    /// Crashes that implicated it while it was alone on the worker.
    alone_evidence: u32,
    /// An earlier crash by a fault signal implicated it.
    fault_evidence: bool,
}

impl CallBarrier {
    pub(crate) fn new(policy: RetryPolicy, idempotent: bool) -> Self {
        CallBarrier {
            policy,
            idempotent,
            attempt: 1,
            certificates: Vec::new(),
            suspect: false,
            alone_evidence: 0,
            fault_evidence: false,
        }
    }

    /// The attempt the call is on (1-based).
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The certificates of the crashes the call went through, oldest first (at most
    /// `max_retries + 1`).
    pub(crate) fn certificates(&self) -> &[Arc<DeathCertificate>] {
        &self.certificates
    }

    /// Whether a crash implicated the call (it is retried alone).
    pub(crate) fn is_suspect(&self) -> bool {
        self.suspect
    }

    /// The worker running attempt [`Self::attempt`] died with `cert` before the function
    /// started (its worker acknowledges starts and the dead worker's socket was read to the
    /// end without one): the call did not run, so it is retried whatever its idempotency, and
    /// the crash is no evidence against it. The attempt still counts toward `max_retries`.
    pub(crate) fn on_crash_not_started(&mut self, cert: Arc<DeathCertificate>) -> CrashVerdict {
        self.certificates.push(cert);
        if self.attempt > self.policy.max_retries {
            return CrashVerdict::Exhausted;
        }
        self.attempt = self.attempt.saturating_add(1);
        CrashVerdict::Retry { alone: self.suspect }
    }

    /// The worker running attempt [`Self::attempt`] of call `call_id` died with `cert`.
    pub(crate) fn on_crash(&mut self, call_id: u64, cert: Arc<DeathCertificate>) -> CrashVerdict {
        let evidence = classify::implicates(&cert, call_id);
        let alone = classify::alone(&cert, call_id);
        let fault = cert.is_fault();
        self.certificates.push(cert);
        if !self.idempotent {
            return CrashVerdict::Fail;
        }
        if evidence && alone {
            self.alone_evidence = self.alone_evidence.saturating_add(1);
            if self.alone_evidence >= self.policy.poison_threshold || self.fault_evidence {
                return CrashVerdict::Poison;
            }
        }
        // Only a later crash can confirm a fault: this one is checked above before it counts.
        self.fault_evidence |= evidence && fault;
        self.suspect |= evidence;
        if self.attempt > self.policy.max_retries {
            return CrashVerdict::Exhausted;
        }
        self.attempt = self.attempt.saturating_add(1);
        CrashVerdict::Retry { alone: self.suspect }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::barrier::testing::death;
    use crate::death::DeathCause;

    const ME: u64 = 1;
    const OTHER: u64 = 2;

    fn barrier(max_retries: u32, poison_threshold: u32) -> CallBarrier {
        CallBarrier::new(RetryPolicy { max_retries, poison_threshold }, true)
    }

    /// The worker exited with code 1 holding `calls`.
    fn exit(calls: &[(u64, bool)]) -> Arc<DeathCertificate> {
        Arc::new(death(Some(1), None, calls))
    }

    fn signal(sig: i32, calls: &[(u64, bool)]) -> Arc<DeathCertificate> {
        Arc::new(death(None, Some(sig), calls))
    }

    fn harakiri(culprit: u64, calls: &[(u64, bool)]) -> Arc<DeathCertificate> {
        Arc::new(DeathCertificate {
            cause: DeathCause::Harakiri { call_id: culprit, function: "f".into(), overrun: Duration::from_secs(1) },
            killed_by_pyvisor: true,
            ..death(None, Some(libc::SIGKILL), calls)
        })
    }

    #[test]
    fn policy_from_spec() {
        let spec = PoolSpec::script("w.py").max_retries(7).poison_threshold(3);
        assert_eq!(RetryPolicy::from_spec(&spec), RetryPolicy { max_retries: 7, poison_threshold: 3 });
    }

    #[test]
    fn non_idempotent_calls_fail_at_once() {
        let mut b = CallBarrier::new(RetryPolicy { max_retries: 5, poison_threshold: 2 }, false);
        assert_eq!(b.on_crash(ME, signal(libc::SIGKILL, &[(ME, false)])), CrashVerdict::Fail);
        assert_eq!(b.attempt(), 1);
        assert_eq!(b.certificates().len(), 1);
    }

    #[test]
    fn a_crash_before_the_start_is_retried_even_when_not_idempotent() {
        let mut b = CallBarrier::new(RetryPolicy { max_retries: 2, poison_threshold: 1 }, false);
        // Evidence against it (alone, by a fault signal) does not count: it never ran.
        let fault = || signal(libc::SIGSEGV, &[(ME, true)]);
        assert_eq!(b.on_crash_not_started(fault()), CrashVerdict::Retry { alone: false });
        assert_eq!(b.on_crash_not_started(fault()), CrashVerdict::Retry { alone: false });
        assert_eq!(b.attempt(), 3);
        assert!(!b.is_suspect());
        // Still bounded by max_retries.
        assert_eq!(b.on_crash_not_started(fault()), CrashVerdict::Exhausted);
        assert_eq!(b.certificates().len(), 3);
        // A crash after the start of a non-idempotent call fails as before.
        let mut b = CallBarrier::new(RetryPolicy { max_retries: 2, poison_threshold: 2 }, false);
        assert_eq!(b.on_crash_not_started(fault()), CrashVerdict::Retry { alone: false });
        assert_eq!(b.on_crash(ME, fault()), CrashVerdict::Fail);
    }

    #[test]
    fn external_kills_are_retried_and_never_make_a_call_suspect() {
        let mut b = barrier(100, 2);
        for i in 0..100 {
            let calls: &[(u64, bool)] = if i % 2 == 0 { &[(ME, false)] } else { &[(ME, false), (OTHER, false)] };
            assert_eq!(b.on_crash(ME, signal(libc::SIGKILL, calls)), CrashVerdict::Retry { alone: false });
            assert!(!b.is_suspect());
        }
        assert_eq!(b.attempt(), 101);
        assert_eq!(b.on_crash(ME, signal(libc::SIGTERM, &[(ME, false)])), CrashVerdict::Exhausted);
        assert_eq!((b.attempt(), b.certificates().len()), (101, 101));
    }

    #[test]
    fn a_crash_that_implicates_the_call_makes_it_suspect_and_retried_alone() {
        let mut b = barrier(2, 2);
        assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, false)])), CrashVerdict::Retry { alone: true });
        assert!(b.is_suspect());
        assert_eq!(b.attempt(), 2);
        // A later external kill does not clear the suspicion.
        assert_eq!(b.on_crash(ME, signal(libc::SIGKILL, &[(ME, false)])), CrashVerdict::Retry { alone: true });
    }

    #[test]
    fn alone_at_threshold_crashes_is_poison() {
        let mut b = barrier(5, 2);
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Retry { alone: true });
        // An external kill between them is no evidence either way.
        assert_eq!(b.on_crash(ME, signal(libc::SIGKILL, &[(ME, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Poison);
        assert_eq!(b.certificates().len(), 3);
    }

    #[test]
    fn a_fault_then_alone_at_another_crash_is_poison() {
        let mut b = barrier(5, 10);
        assert_eq!(b.on_crash(ME, signal(libc::SIGSEGV, &[(ME, false), (OTHER, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Poison);
        // A fault alone is not enough by itself: it takes another crash.
        let mut b = barrier(5, 10);
        assert_eq!(b.on_crash(ME, signal(libc::SIGABRT, &[(ME, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, signal(libc::SIGABRT, &[(ME, false)])), CrashVerdict::Poison);
    }

    #[test]
    fn a_neighbours_harakiri_is_no_evidence() {
        let mut b = barrier(5, 1);
        assert_eq!(b.on_crash(ME, harakiri(OTHER, &[(ME, false), (OTHER, true)])), CrashVerdict::Retry { alone: false });
        assert!(!b.is_suspect());
        // Its own harakiri, alone, is evidence.
        assert_eq!(b.on_crash(ME, harakiri(ME, &[(ME, false)])), CrashVerdict::Poison);
    }

    #[test]
    fn an_abandoned_neighbour_still_in_flight_means_not_alone() {
        let mut b = barrier(3, 2);
        for _ in 0..3 {
            assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, true)])), CrashVerdict::Retry { alone: true });
        }
        assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, true)])), CrashVerdict::Exhausted);
        assert_eq!(b.attempt(), 4);
    }

    #[test]
    fn at_most_max_retries_plus_one_attempts_and_poison_comes_first() {
        let mut b = barrier(2, 2);
        assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, exit(&[(ME, false), (OTHER, false)])), CrashVerdict::Exhausted);
        assert_eq!(b.attempt(), 3);
        let mut b = barrier(1, 2);
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Retry { alone: true });
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Poison);
        let mut b = barrier(0, 2);
        assert_eq!(b.on_crash(ME, exit(&[(ME, false)])), CrashVerdict::Exhausted);
    }
}
