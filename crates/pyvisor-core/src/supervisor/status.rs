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
    /// Being restarted now (a pool: its workers are starting). The supervisor answers and
    /// handles its other children meanwhile.
    Starting,
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


impl std::fmt::Display for ChildState {
    /// `running`, `restarting in 120 ms`, `stopped`, `failed: <first line of the reason>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildState::Running => f.write_str("running"),
            ChildState::Restarting { next_in } => write!(f, "restarting in {} ms", next_in.as_millis()),
            ChildState::Starting => f.write_str("starting"),
            ChildState::Stopped => f.write_str("stopped"),
            ChildState::Failed { reason } => write!(f, "failed: {}", reason.lines().next().unwrap_or("")),
        }
    }
}

/// A whole tree (or subtree) at one moment: every child of the supervisor, with each running
/// pool's workers and each running nested supervisor's own children. Serializes to the JSON
/// that `pyvisor run --http` serves at `/status` (docs/operations.md, "Endpoints").
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct TreeStatus {
    /// The supervisor's path (`""` for the root).
    pub path: String,
    /// Its children, in start order.
    pub children: Vec<ChildReport>,
}

/// One child of a [`TreeStatus`]: what its supervisor says about it and, while it runs, what
/// it says about itself.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct ChildReport {
    /// Id, path, kind, state, restarts and restart type, as its supervisor reports them.
    #[serde(flatten)]
    pub child: ChildStatus,
    /// A running pool's status: workers (pid, state, served, restarts), counters, `min_ready`
    /// and its last death certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::status::PoolStatus>,
    /// A running nested supervisor's children.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<Vec<ChildReport>>,
    /// Why a running pool's or supervisor's detail is missing (it did not answer, or was being
    /// replaced at that moment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}
