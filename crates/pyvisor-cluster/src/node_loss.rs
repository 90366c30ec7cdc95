//! What the loss of a node means: the certificate a call lost with it carries ([`NodeLoss`],
//! [`LossCause`]) and the taint window a lost node serves before it takes calls again
//! ([`NodeTaint`], a plain value with the time passed in).
//!
//! A node is lost when its session closes (its process died, its connection broke, it shut
//! down) or when the node heartbeat gives it up. Like a worker's crash, a loss taints: a node
//! that comes back within its window is used only when no untainted member is left, so a node
//! that flaps does not keep taking (and losing) calls. A loss is never evidence against a call:
//! it makes nothing suspect or poison (the call did not crash anything).
//!
//! Owns these values. Not noticing a loss (`node`, `heartbeat`), not what a call does about it
//! (`remote`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why a node was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossCause {
    /// Its session closed: the process died or shut down, or the connection broke.
    Closed,
    /// It stopped answering the node heartbeat (`missed` pings in a row) and its session was
    /// stopped: a stopped process, a frozen machine, a network that drops without a reset.
    Silent { missed: u32 },
}

impl std::fmt::Display for LossCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossCause::Closed => f.write_str("its session closed"),
            LossCause::Silent { missed } => write!(f, "it missed {missed} heartbeats in a row"),
        }
    }
}

/// The certificate of a call lost with its node: which node, why, how long after the call was
/// sent there, and on which attempt (a call retried after an earlier loss has attempt > 1).
///
/// ```
/// use std::time::Duration;
/// use pyvisor_cluster::{LossCause, NodeLoss};
/// let cert = NodeLoss { node: "b@10.0.0.2".into(), cause: LossCause::Closed, after: Duration::from_millis(120), attempt: 1 };
/// assert_eq!(cert.to_string(), "node b@10.0.0.2 was lost 120ms after the call was sent there (attempt 1): its session closed");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoss {
    /// The lost node's name (`name@ip`).
    pub node: String,
    /// Why it counts as lost.
    pub cause: LossCause,
    /// How long after the call was sent to it.
    pub after: Duration,
    /// The call's attempt that was lost (1 for the first).
    pub attempt: u32,
}

impl std::fmt::Display for NodeLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} was lost {:?} after the call was sent there (attempt {}): {}", self.node, self.after, self.attempt, self.cause)
    }
}

/// Taint windows of lost nodes: each loss taints the node for `window` from that moment (a
/// loss while tainted starts the window again).
///
/// ```
/// use std::time::{Duration, Instant};
/// use pyvisor_cluster::NodeTaint;
/// let mut taint = NodeTaint::new(Duration::from_secs(5));
/// let t0 = Instant::now();
/// taint.lost("b@10.0.0.2", t0);
/// assert!(taint.is_tainted("b@10.0.0.2", t0 + Duration::from_secs(4)));
/// assert!(!taint.is_tainted("b@10.0.0.2", t0 + Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone)]
pub struct NodeTaint {
    window: Duration,
    until: HashMap<String, Instant>,
}

impl NodeTaint {
    /// Taint each lost node for `window` (zero: never taint).
    pub fn new(window: Duration) -> Self {
        NodeTaint { window, until: HashMap::new() }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// `node` was lost at `now`.
    pub fn lost(&mut self, node: &str, now: Instant) {
        self.until.retain(|_, until| *until > now);
        if self.window.is_zero() {
            return;
        }
        if let Some(until) = now.checked_add(self.window) {
            self.until.insert(node.to_string(), until);
        }
    }

    /// Whether `node` is in its taint window at `now`.
    pub fn is_tainted(&self, node: &str, now: Instant) -> bool {
        self.until.get(node).is_some_and(|until| *until > now)
    }

    /// The tainted nodes at `now` with the time each has left, by name.
    pub fn tainted(&self, now: Instant) -> Vec<(String, Duration)> {
        let mut v: Vec<(String, Duration)> =
            self.until.iter().filter(|(_, until)| **until > now).map(|(n, until)| (n.clone(), until.saturating_duration_since(now))).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_taints_for_the_window_and_a_new_loss_starts_it_again() {
        let s = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut taint = NodeTaint::new(5 * s);
        assert!(!taint.is_tainted("b", t0));
        taint.lost("b", t0);
        assert!(taint.is_tainted("b", t0 + 4 * s));
        assert!(!taint.is_tainted("c", t0 + s));
        assert_eq!(taint.tainted(t0 + 2 * s), vec![("b".to_string(), 3 * s)]);
        // Lost again at 4 s: tainted until 9 s.
        taint.lost("b", t0 + 4 * s);
        assert!(taint.is_tainted("b", t0 + 8 * s));
        assert!(!taint.is_tainted("b", t0 + 9 * s));
        assert!(taint.tainted(t0 + 9 * s).is_empty());
        // Expired entries are dropped when a loss is recorded.
        taint.lost("c", t0 + 10 * s);
        assert_eq!(taint.until.len(), 1);
    }

    #[test]
    fn a_zero_window_never_taints() {
        let t0 = Instant::now();
        let mut taint = NodeTaint::new(Duration::ZERO);
        taint.lost("b", t0);
        assert!(!taint.is_tainted("b", t0));
        assert!(taint.tainted(t0).is_empty());
    }

    #[test]
    fn certificates_say_what_happened() {
        let cert = NodeLoss { node: "b".into(), cause: LossCause::Silent { missed: 4 }, after: Duration::from_millis(2100), attempt: 2 };
        assert_eq!(cert.to_string(), "node b was lost 2.1s after the call was sent there (attempt 2): it missed 4 heartbeats in a row");
    }
}
