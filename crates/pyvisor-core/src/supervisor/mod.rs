//! Erlang-style supervision trees declared in code.
//!
//! ractor gives links and `SupervisionEvent`s; this module gives them OTP's meaning:
//! strategies (`one_for_one`, `one_for_all`, `rest_for_one`), restart intensity that fails the
//! supervisor and escalates to its parent, restart types (`permanent`, `transient`,
//! `temporary`), per-child shutdown (timeout then kill, or brutal kill), start in order and stop
//! in reverse order, and — unlike OTP — a restart delay with exponential backoff and jitter that
//! resets after a child has been healthy for a while.
//!
//! - `spec`: the declarations ([`SupervisorSpec`], [`ChildSpec`] and the policy enums);
//! - `intensity`: the restart-intensity rule as a value;
//! - `status`: what a supervisor reports about its children, and a whole tree's snapshot;
//! - `readiness`: whether a tree is ready (the one meaning `/readyz`, systemd and
//!   `pyvisor status` share), a pure function of that snapshot;
//! - `registry`: the tree's paths to what runs there now (handles by path follow restarts);
//! - `reload`: what a reload from a new declaration changes (the plan) and reports;
//! - `actor`: the supervisor actor (decisions);
//! - `tree`: the [`Tree`] handle (lookup by path, status, dynamic children, shutdown).
//!
//! It does not supervise a pool's workers: that is the pool router's job (see `router.rs`);
//! a pool is one child here, and a pool that fails escalates to its supervisor.

mod actor;
mod intensity;
mod readiness;
mod registry;
mod reload;
mod spec;
mod status;
mod tree;

pub use intensity::{Intensity, IntensityTracker};
pub use spec::{ChildKind, ChildSpec, Restart, Shutdown, StartFn, Strategy, SupervisorSpec};
pub use readiness::{NotReady, Unready};
pub use reload::ReloadReport;
pub use status::{ChildReport, ChildState, ChildStatus, TreeStatus};
pub use tree::Tree;

/// Why a tree operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// A child could not be started; the tree (or the addition) was abandoned.
    #[error("child `{path}` failed to start: {reason}")]
    ChildStartFailed {
        /// The child's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A child with this id already runs under this supervisor.
    #[error("a child named `{0}` already exists under this supervisor")]
    DuplicateChild(String),
    /// No child has this id.
    #[error("no child named `{0}` under this supervisor")]
    NoSuchChild(String),
    /// The spec is not usable as given (the message names the supervisor and the field).
    #[error("invalid supervisor spec: {0}")]
    InvalidSpec(String),
    /// The supervisor is not running (stopped or failed).
    #[error("the supervisor is not running: {0}")]
    NotRunning(String),
}

/// The error a supervisor fails with (its parent receives it in `SupervisionEvent::ActorFailed`).
#[derive(Debug, Clone)]
pub struct SupervisorFailure(pub String);

impl std::fmt::Display for SupervisorFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SupervisorFailure {}
