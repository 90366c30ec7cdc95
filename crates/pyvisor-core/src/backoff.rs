//! Restart backoff: a policy value that turns "the n-th consecutive failure" into a delay.
//!
//! Owns only the arithmetic; the router decides when to count and when to reset.

use std::time::Duration;

/// How a delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the computed delay (useful in tests).
    None,
    /// Uniform in `[0, delay]` ("full jitter"): spreads restarts of many workers best.
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
}

/// Exponential backoff: `base × factor^(n-1)`, capped, then jittered.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_core::{Backoff, Jitter};
/// let b = Backoff::default().jitter(Jitter::None);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(2), Duration::from_millis(200));
/// assert_eq!(b.delay(30), Duration::from_secs(10)); // capped
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Growth per further failure.
    pub factor: f64,
    /// Upper bound before jitter.
    pub cap: Duration,
    /// Randomisation.
    pub jitter: Jitter,
}

impl Default for Backoff {
    /// DESIGN.md's start backoff: 100 ms × 2, cap 10 s, full jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            factor: 2.0,
            cap: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// Set the first delay.
    #[must_use]
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }
    /// Set the growth factor (values below 1 are treated as 1).
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }
    /// Set the cap.
    #[must_use]
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }
    /// Set the jitter.
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before retrying after the `failures`-th consecutive failure (from 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let n = failures.saturating_sub(1).min(64) as i32;
        let factor = if self.factor.is_finite() { self.factor.max(1.0) } else { 1.0 };
        let raw = self.base.as_secs_f64() * factor.powi(n);
        let capped = raw.min(self.cap.as_secs_f64()).max(0.0);
        let secs = match self.jitter {
            Jitter::None => capped,
            Jitter::Full => rand::random_range(0.0..=capped),
            Jitter::Equal => rand::random_range(capped / 2.0..=capped),
        };
        // Saturates: a cap beyond what a `Duration` holds is "forever", never a panic.
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        let b = Backoff::default();
        for n in 1..20 {
            let d = b.delay(n);
            assert!(d <= Duration::from_secs(10));
            let exact = b.jitter(Jitter::None).delay(n);
            assert!(d <= exact);
            let eq = b.jitter(Jitter::Equal).delay(n);
            assert!(eq >= exact / 2 && eq <= exact);
        }
        let none = b.jitter(Jitter::None);
        assert!(none.delay(3) > none.delay(2));
        assert_eq!(none.factor(f64::NAN).delay(5), Duration::from_millis(100));
    }
}
