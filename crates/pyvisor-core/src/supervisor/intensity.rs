//! Restart intensity: at most `max_restarts` restarts within `period`, OTP's rule.
//!
//! A policy value plus its tracker, testable on its own; the supervisor decides what exceeding
//! it means (stop everything, fail, escalate).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `max_restarts` within `period`. OTP's default is 3 in 5 s.
///
/// ```
/// use std::time::{Duration, Instant};
/// use pyvisor_core::supervisor::Intensity;
/// let mut t = Intensity::new(2, Duration::from_secs(5)).tracker();
/// let now = Instant::now();
/// assert!(t.record(now));
/// assert!(t.record(now));
/// assert!(!t.record(now)); // a third restart within 5 s exceeds it
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within the period.
    pub max_restarts: u32,
    /// The sliding window.
    pub period: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity { max_restarts: 3, period: Duration::from_secs(5) }
    }
}

impl Intensity {
    /// `max_restarts` within `period`.
    pub fn new(max_restarts: u32, period: Duration) -> Self {
        Intensity { max_restarts, period }
    }
    /// A tracker applying this limit.
    pub fn tracker(self) -> IntensityTracker {
        IntensityTracker { limit: self, restarts: VecDeque::new() }
    }
}

/// Counts restarts in the sliding window.
#[derive(Debug, Clone)]
pub struct IntensityTracker {
    limit: Intensity,
    restarts: VecDeque<Instant>,
}

impl IntensityTracker {
    /// Record a restart at `now`; false if it exceeds the limit.
    pub fn record(&mut self, now: Instant) -> bool {
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > self.limit.period) {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        self.restarts.len() <= self.limit.max_restarts as usize
    }
    /// Restarts inside the window now.
    pub fn count(&self) -> usize {
        self.restarts.len()
    }
}
