//! The pool's restart intensity: start failures counted in a sliding window.
//!
//! Owns the count and its verdict. It does not decide what to do with a worker that died
//! before `hello` (backoff and restart are the router's), nor what a start failure is
//! (`classify`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::classify;
use crate::death::DeathCertificate;

/// What a death before `hello` does to the pool's restart intensity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartVerdict {
    /// Not a start failure (a ready worker, or a kill from outside): retry, count nothing.
    NotCounted,
    /// Counted: `failures` within the period, not more than `max`.
    Counted { failures: usize },
    /// More than `max` within the period: the pool fails. (`failures` stops at `max + 1`.)
    Exceeded { failures: usize },
}

/// Start failures within the last `period`; more than `max` of them fail the pool.
#[derive(Debug, Clone)]
pub(crate) struct StartFailures {
    max: usize,
    period: Duration,
    /// When each counted failure happened, oldest first; at most `max + 1` kept.
    at: VecDeque<Instant>,
    /// Failures expire after `period` (false while the pool's first start is under way: a
    /// worker that can never start, however slowly it fails, must fail the start).
    windowed: bool,
}

impl StartFailures {
    pub(crate) fn new(max: usize, period: Duration) -> Self {
        StartFailures { max, period, at: VecDeque::new(), windowed: true }
    }

    pub(crate) fn from_spec(spec: &crate::spec::PoolSpec) -> Self {
        Self::new(spec.max_start_failures, spec.start_failure_period)
    }

    /// During the first start: count every failure, none expires.
    pub(crate) fn starting(mut self) -> Self {
        self.windowed = false;
        self
    }

    /// The first start completed: forget its failures, count in the sliding window from now.
    pub(crate) fn started(&mut self) {
        self.at.clear();
        self.windowed = true;
    }

    /// Count `cert` if it is a start failure, and judge the pool.
    pub(crate) fn record(&mut self, cert: &DeathCertificate, now: Instant) -> StartVerdict {
        if !classify::is_start_failure(cert) {
            return StartVerdict::NotCounted;
        }
        if self.windowed {
            self.expire(now);
        }
        self.at.push_back(now);
        // Past `max + 1` the verdict cannot change: keep the buffer bounded.
        if self.at.len() > self.max.saturating_add(1) {
            self.at.pop_front();
        }
        let failures = self.at.len();
        if failures > self.max {
            StartVerdict::Exceeded { failures }
        } else {
            StartVerdict::Counted { failures }
        }
    }

    /// Counted failures within the period ending at `now`.
    #[cfg(test)]
    pub(crate) fn failures(&self, now: Instant) -> usize {
        self.at.iter().filter(|t| !self.expired(**t, now)).count()
    }

    /// Forget every failure.
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) fn clear(&mut self) {
        self.at.clear();
    }

    fn expired(&self, t: Instant, now: Instant) -> bool {
        now.saturating_duration_since(t) > self.period
    }

    fn expire(&mut self, now: Instant) {
        while self.at.front().is_some_and(|t| self.expired(*t, now)) {
            self.at.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::barrier::testing::start_death;
    use crate::death::DeathCause;

    const PERIOD: Duration = Duration::from_secs(60);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn external_kills_never_count() {
        let (base, mut f) = (Instant::now(), StartFailures::new(5, PERIOD));
        for i in 0..100 {
            let v = f.record(&start_death(None, Some(libc::SIGKILL)), base + Duration::from_millis(i));
            assert_eq!(v, StartVerdict::NotCounted);
        }
        assert_eq!(f.failures(base + secs(1)), 0);
    }

    #[test]
    fn more_than_max_exits_within_the_period_exceed() {
        let (base, mut f) = (Instant::now(), StartFailures::new(5, PERIOD));
        for i in 1..=5 {
            assert_eq!(f.record(&start_death(Some(1), None), base + secs(i)), StartVerdict::Counted { failures: i as usize });
        }
        assert_eq!(f.record(&start_death(Some(1), None), base + secs(6)), StartVerdict::Exceeded { failures: 6 });
        assert_eq!(f.failures(base + secs(6)), 6);
    }

    #[test]
    fn failures_older_than_the_period_drop_out() {
        let (base, mut f) = (Instant::now(), StartFailures::new(2, PERIOD));
        f.record(&start_death(Some(1), None), base);
        f.record(&start_death(Some(1), None), base + secs(30));
        assert_eq!(f.failures(base + secs(60)), 2, "the period's edge is inside");
        assert_eq!(f.failures(base + secs(61)), 1);
        // The first has dropped out: a third failure is the second in the window.
        assert_eq!(f.record(&start_death(Some(1), None), base + secs(61)), StartVerdict::Counted { failures: 2 });
        assert_eq!(f.failures(base + secs(200)), 0);
        f.clear();
        assert_eq!(f.failures(base + secs(61)), 0);
    }

    #[test]
    fn start_timeout_segfault_and_oom_count() {
        let (base, mut f) = (Instant::now(), StartFailures::new(5, PERIOD));
        let timeout = DeathCertificate {
            cause: DeathCause::StartTimeout(secs(30)),
            killed_by_pyvisor: true,
            ..start_death(None, Some(libc::SIGKILL))
        };
        let oom = DeathCertificate { oom_suspected: true, ..start_death(None, Some(libc::SIGKILL)) };
        assert_eq!(f.record(&timeout, base), StartVerdict::Counted { failures: 1 });
        assert_eq!(f.record(&start_death(None, Some(libc::SIGSEGV)), base), StartVerdict::Counted { failures: 2 });
        assert_eq!(f.record(&oom, base), StartVerdict::Counted { failures: 3 });
    }

    #[test]
    fn the_buffer_stays_bounded() {
        let (base, mut f) = (Instant::now(), StartFailures::new(0, PERIOD));
        for i in 0..1000 {
            assert_eq!(f.record(&start_death(Some(1), None), base + Duration::from_millis(i)), StartVerdict::Exceeded { failures: 1 });
        }
        assert_eq!(f.at.len(), 1);
    }

    #[test]
    fn during_the_first_start_failures_do_not_expire() {
        let base = Instant::now();
        let mut f = StartFailures::new(2, Duration::from_secs(60)).starting();
        let exit = crate::barrier::testing::start_death(Some(1), None);
        // One failure every 45 s: a window of 60 s never holds three, the first start does.
        assert!(matches!(f.record(&exit, base), StartVerdict::Counted { failures: 1 }));
        assert!(matches!(f.record(&exit, base + Duration::from_secs(45)), StartVerdict::Counted { failures: 2 }));
        assert!(matches!(f.record(&exit, base + Duration::from_secs(90)), StartVerdict::Exceeded { failures: 3 }));
        f.started();
        assert!(matches!(f.record(&exit, base + Duration::from_secs(200)), StartVerdict::Counted { failures: 1 }));
        assert!(matches!(f.record(&exit, base + Duration::from_secs(245)), StartVerdict::Counted { failures: 2 }));
        assert!(matches!(f.record(&exit, base + Duration::from_secs(290)), StartVerdict::Counted { failures: 2 }));
    }
}
