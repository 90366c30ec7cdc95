//! Reading a death certificate for the barrier: whether a death before `hello` is a start
//! failure, and whether a death is evidence against a given call.
//!
//! Owns only these two judgements. The facts (signal, exit code, who sent the kill, OOM
//! suspicion) are the certificate's (`death`); counting and verdicts are `start_failures`'
//! and `retry`'s.

use crate::death::{DeathCause, DeathCertificate};

/// Whether this death counts toward `max_start_failures`: the worker died before `hello` and
/// caused it itself — an exit with any code (an exception at import included), a start
/// timeout, a fault signal, an OOM kill, a protocol error, a version mismatch, a failed spawn,
/// or any other kill pyvisor sent for the worker's behaviour. An external kill (SIGKILL,
/// SIGTERM, SIGINT, SIGHUP that pyvisor did not send and the OOM killer did not cause) never
/// counts: it is retried with backoff, but kills from outside must never fail the pool.
///
/// Stops pyvisor asked for (shutdown, recycling) are not crashes; the caller does not bring
/// them here.
pub(crate) fn is_start_failure(cert: &DeathCertificate) -> bool {
    !cert.became_ready && !cert.is_external_kill()
}

/// Whether this death is evidence against the call `call_id` (which was in flight on the
/// worker): [`DeathCertificate::implicates_calls`], except that a harakiri implicates only the
/// call that overran its deadline, never its neighbours.
pub(crate) fn implicates(cert: &DeathCertificate, call_id: u64) -> bool {
    let culprit = match &cert.cause {
        DeathCause::Harakiri { call_id: culprit, .. } => *culprit == call_id,
        _ => true,
    };
    culprit && cert.implicates_calls()
}

/// Whether `call_id` was alone on the worker when it died: the certificate holds it and no
/// other call (an abandoned call is still on the worker, so it counts as another).
pub(crate) fn alone(cert: &DeathCertificate, call_id: u64) -> bool {
    matches!(cert.calls_in_flight.as_slice(), [only] if only.id == call_id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::barrier::testing::{death, start_death};

    #[test]
    fn start_failures_are_what_the_worker_caused() {
        for code in [0, 1, 2, 127] {
            assert!(is_start_failure(&start_death(Some(code), None)), "exit code {code}");
        }
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGABRT, libc::SIGILL, libc::SIGFPE] {
            assert!(is_start_failure(&start_death(None, Some(sig))), "signal {sig}");
        }
        let oom = DeathCertificate { oom_suspected: true, ..start_death(None, Some(libc::SIGKILL)) };
        assert!(is_start_failure(&oom));
        let pyvisor_kills = [
            DeathCause::StartTimeout(Duration::from_secs(30)),
            DeathCause::ProtocolError("garbage".into()),
            DeathCause::VersionMismatch { worker: 9, parent: 1 },
        ];
        for cause in pyvisor_kills {
            let c = DeathCertificate { cause, killed_by_pyvisor: true, ..start_death(None, Some(libc::SIGKILL)) };
            assert!(is_start_failure(&c), "{}", c.cause);
        }
        let spawn = DeathCertificate { cause: DeathCause::SpawnFailed("ENOENT".into()), ..start_death(None, None) };
        assert!(is_start_failure(&spawn));
    }

    #[test]
    fn external_kills_and_ready_workers_are_not_start_failures() {
        for sig in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            let c = start_death(None, Some(sig));
            assert!(c.is_external_kill());
            assert!(!is_start_failure(&c), "signal {sig}");
        }
        assert!(!is_start_failure(&death(Some(1), None, &[])), "died after hello");
    }

    #[test]
    fn evidence_against_calls() {
        assert!(implicates(&death(Some(1), None, &[(1, false), (2, false)]), 1));
        assert!(implicates(&death(None, Some(libc::SIGSEGV), &[(1, false)]), 1));
        assert!(!implicates(&death(None, Some(libc::SIGKILL), &[(1, false)]), 1), "external kill");
        let oom = DeathCertificate { oom_suspected: true, ..death(None, Some(libc::SIGKILL), &[(1, false)]) };
        assert!(implicates(&oom, 1));
        let harakiri = DeathCertificate {
            cause: DeathCause::Harakiri { call_id: 2, function: "f".into(), overrun: Duration::from_secs(1) },
            killed_by_pyvisor: true,
            ..death(None, Some(libc::SIGKILL), &[(1, false), (2, false)])
        };
        assert!(implicates(&harakiri, 2));
        assert!(!implicates(&harakiri, 1), "a neighbour's harakiri");
    }

    #[test]
    fn resource_limit_signals_are_the_workers_own_doing() {
        for (sig, limit) in [(libc::SIGXCPU, "RLIMIT_CPU"), (libc::SIGXFSZ, "RLIMIT_FSIZE")] {
            let before = start_death(None, Some(sig));
            assert!(!before.is_external_kill(), "signal {sig}");
            assert!(is_start_failure(&before), "signal {sig} before hello is a start failure");
            let after = death(None, Some(sig), &[(1, false), (2, false)]);
            assert!(implicates(&after, 1) && implicates(&after, 2), "signal {sig} implicates the calls in flight");
            assert!(before.ending().contains(limit), "{}", before.ending());
            assert!(before.to_string().contains(limit), "{before}");
        }
        assert_eq!(start_death(None, Some(libc::SIGXCPU)).ending(), "signal 24 (SIGXCPU: CPU time limit (RLIMIT_CPU) reached)");
    }

    #[test]
    fn alone_means_no_other_call_not_even_an_abandoned_one() {
        assert!(alone(&death(Some(1), None, &[(7, false)]), 7));
        assert!(!alone(&death(Some(1), None, &[(7, false), (8, true)]), 7));
        assert!(!alone(&death(Some(1), None, &[(8, false)]), 7));
        assert!(!alone(&death(Some(1), None, &[]), 7));
    }
}
