//! What a supervisor reports about its children.

use std::time::Duration;

use super::spec::Restart;

/// The state of one child, as its supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChildState {
    /// Started and running.
    Running,
    /// Exited; restarts after the delay.
    Restarting {
        /// Time until the restart.
        next_in: Duration,
    },
    /// Exited normally and is not restarted (transient, temporary), or removed.
    Stopped,
    /// Exited abnormally and is not restarted (temporary).
    Failed {
        /// Why it exited.
        reason: String,
    },
}

/// One child of a supervisor.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct ChildStatus {
    /// The child's id.
    pub id: String,
    /// Its path from the root (`"etl/loader"`).
    pub path: String,
    /// `pool`, `supervisor` or `actor`.
    pub kind: &'static str,
    /// Its state.
    pub state: ChildState,
    /// Restarts so far.
    pub restarts: u32,
    /// Its restart type.
    pub restart: Restart,
}

