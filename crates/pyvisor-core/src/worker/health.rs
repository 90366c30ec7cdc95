//! Health verdicts: what a worker's latest observations say should happen to it.
//!
//! Owns the rules, as a pure function of observations and limits (no clock of its own, no
//! process): hung (no beat for `max_missed` intervals), unresponsive (beats but no answer to
//! a `ping` through its reading side), harakiri (a call its caller gave up on still running
//! past its deadline plus grace), memory hard limit (kill) and soft limit, ttl and
//! max_requests (recycle). The worker actor gathers the observations and carries the verdict
//! out.

use std::time::{Duration, Instant};

use crate::events::RecycleReason;

/// The limits a verdict is judged against.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// No beat for longer than this: hung.
    pub hung_after: Duration,
    /// A ping unanswered for longer than this: unresponsive.
    pub deaf_after: Duration,
    /// Harakiri grace after a deadline (`None`: off).
    pub harakiri_grace: Option<Duration>,
    pub memory_soft: Option<u64>,
    pub memory_hard: Option<u64>,
    pub ttl: Option<Duration>,
    pub max_requests: Option<u64>,
}

/// A call the worker still runs although its caller gave up on it.
#[derive(Debug, Clone)]
pub(crate) struct Overrun {
    pub call_id: u64,
    pub function: String,
    pub deadline: Instant,
}

/// What the actor saw at one check.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed {
    /// Time since the last beat (or since ready, before the first).
    pub silent_for: Duration,
    /// When the last beat arrived.
    pub last_beat_at: Option<Instant>,
    /// Abandoned calls the last beat reported running.
    pub abandoned_running: Vec<Overrun>,
    /// How long the oldest unanswered ping has waited.
    pub ping_unanswered_for: Option<Duration>,
    /// Measured memory, when a memory limit is set.
    pub memory: Option<u64>,
    /// Time since ready.
    pub ready_for: Duration,
    /// Calls completed.
    pub served: u64,
    /// The worker is draining (recycled): recycling thresholds no longer apply.
    pub draining: bool,
    /// The last beat said the worker's watchdog is gone.
    pub watchdog_lost: bool,
}

/// What should happen to the worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Healthy,
    Hung { silent_for: Duration },
    Unresponsive { silent_for: Duration },
    Harakiri { call_id: u64, function: String, overrun: Duration },
    MemoryHard { bytes: u64, limit: u64 },
    Recycle(RecycleReason),
}

/// Judge `o` against `l` at `now`. Kills come before recycles; a measured memory over the hard
/// limit comes first (a worker busy touching memory in C stops beating too, and the memory is
/// the cause).
pub(crate) fn judge(l: &Limits, o: &Observed, now: Instant) -> Verdict {
    if let (Some(bytes), Some(limit)) = (o.memory, l.memory_hard) {
        if bytes > limit {
            return Verdict::MemoryHard { bytes, limit };
        }
    }
    if o.silent_for > l.hung_after {
        return Verdict::Hung { silent_for: o.silent_for };
    }
    if let Some(waited) = o.ping_unanswered_for.filter(|w| *w > l.deaf_after) {
        return Verdict::Unresponsive { silent_for: waited };
    }
    if let (Some(grace), Some(beat_at)) = (l.harakiri_grace, o.last_beat_at) {
        // The beat that reported it running must itself be later than deadline + grace.
        if let Some(c) = o.abandoned_running.iter().find(|c| beat_at > c.deadline + grace && now > c.deadline + grace) {
            return Verdict::Harakiri {
                call_id: c.call_id,
                function: c.function.clone(),
                overrun: now.saturating_duration_since(c.deadline),
            };
        }
    }
    if let Some(bytes) = o.memory {
        if !o.draining && l.memory_soft.is_some_and(|s| bytes > s) {
            return Verdict::Recycle(RecycleReason::MemorySoftLimit { bytes });
        }
    }
    if o.draining {
        return Verdict::Healthy;
    }
    if o.watchdog_lost {
        return Verdict::Recycle(RecycleReason::WatchdogLost);
    }
    if l.ttl.is_some_and(|ttl| o.ready_for >= ttl) {
        return Verdict::Recycle(RecycleReason::Ttl);
    }
    if l.max_requests.is_some_and(|m| o.served >= m) {
        return Verdict::Recycle(RecycleReason::MaxRequests);
    }
    Verdict::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            hung_after: Duration::from_secs(5),
            deaf_after: Duration::from_secs(5),
            harakiri_grace: Some(Duration::from_secs(1)),
            memory_soft: Some(100),
            memory_hard: Some(200),
            ttl: Some(Duration::from_secs(60)),
            max_requests: Some(10),
        }
    }

    #[test]
    fn silence_is_a_hang_and_an_unanswered_ping_is_unresponsive() {
        let now = Instant::now();
        let o = Observed { silent_for: Duration::from_secs(6), ..Default::default() };
        assert!(matches!(judge(&limits(), &o, now), Verdict::Hung { .. }));
        let o = Observed { ping_unanswered_for: Some(Duration::from_secs(6)), ..Default::default() };
        assert!(matches!(judge(&limits(), &o, now), Verdict::Unresponsive { .. }));
        let o = Observed { ping_unanswered_for: Some(Duration::from_secs(4)), ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Healthy);
    }

    #[test]
    fn harakiri_needs_a_beat_after_deadline_and_grace() {
        let t0 = Instant::now();
        let call = Overrun { call_id: 7, function: "f".into(), deadline: t0 };
        let mut o = Observed { abandoned_running: vec![call], last_beat_at: Some(t0 + Duration::from_millis(500)), ..Default::default() };
        assert_eq!(judge(&limits(), &o, t0 + Duration::from_secs(3)), Verdict::Healthy, "beat too old");
        o.last_beat_at = Some(t0 + Duration::from_secs(2));
        assert!(matches!(judge(&limits(), &o, t0 + Duration::from_secs(3)), Verdict::Harakiri { call_id: 7, .. }));
    }

    #[test]
    fn memory_and_recycling_thresholds() {
        let now = Instant::now();
        let o = Observed { memory: Some(250), ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::MemoryHard { bytes: 250, limit: 200 });
        // Silent because it is busy touching memory: the memory is the cause.
        let o = Observed { memory: Some(250), silent_for: Duration::from_secs(9), ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::MemoryHard { bytes: 250, limit: 200 });
        let o = Observed { memory: Some(150), ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Recycle(RecycleReason::MemorySoftLimit { bytes: 150 }));
        let o = Observed { served: 10, ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Recycle(RecycleReason::MaxRequests));
        let o = Observed { watchdog_lost: true, ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Recycle(RecycleReason::WatchdogLost));
        let o = Observed { ready_for: Duration::from_secs(61), ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Recycle(RecycleReason::Ttl));
        // A draining worker is not recycled again, but still killed for a hang.
        let o = Observed { served: 10, draining: true, ..Default::default() };
        assert_eq!(judge(&limits(), &o, now), Verdict::Healthy);
        let o = Observed { silent_for: Duration::from_secs(9), draining: true, ..Default::default() };
        assert!(matches!(judge(&limits(), &o, now), Verdict::Hung { .. }));
    }
}
