//! Status snapshots of a pool and its workers, for `Pool::status()` and the CLI.

use std::time::Duration;

use crate::death::WorkerId;

/// What a worker is doing, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, waiting for `hello`.
    Starting,
    /// Taking calls.
    Ready,
    /// Finishing its calls, taking no new ones.
    Draining,
    /// Gone.
    Dead,
}

impl WorkerState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => WorkerState::Starting,
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Dead,
        }
    }
    pub(crate) fn as_u8(self) -> u8 {
        match self {
            WorkerState::Starting => 0,
            WorkerState::Ready => 1,
            WorkerState::Draining => 2,
            WorkerState::Dead => 3,
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Dead => "dead",
        })
    }
}

/// One position of the pool and the worker in it now.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Position in the pool (stable across replacements).
    pub index: usize,
    /// The worker in this position, if one is spawned.
    pub worker: Option<WorkerId>,
    /// Its pid.
    pub pid: Option<u32>,
    /// Its state (`Dead` while a restart is pending).
    pub state: WorkerState,
    /// Calls outstanding on it.
    pub in_flight: usize,
    /// Calls it completed.
    pub served: u64,
    /// Replacements of this position so far.
    pub restarts: u32,
    /// RSS from its last beat, bytes.
    pub rss: Option<u64>,
    /// Time since its last beat.
    pub last_beat_age: Option<Duration>,
    /// When a restart is pending: time until it starts.
    pub restart_in: Option<Duration>,
    /// Calls the worker reported in its last beat, with their phase.
    pub in_progress: Vec<pyvisor_protocol::InProgress>,
    /// Whether it is in a taint window (it replaced a crashed worker).
    pub tainted: bool,
}

/// A pool as a whole.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// One entry per position.
    pub workers: Vec<WorkerStatus>,
    /// Calls waiting for a free worker.
    pub queued: usize,
    /// Whether the pool is closed (shut down or failed).
    pub closed: bool,
    /// Attempts retried after crashes (the crash barrier).
    pub retried: u64,
    /// Calls failed as poison requests.
    pub poisoned: u64,
    /// Worker deaths (crashes, hangs, start failures).
    pub crashes: u64,
    /// Workers recycled.
    pub recycles: u64,
    /// The fewest ready workers the pool counts as ready with (`RecyclePolicy::min_ready`,
    /// default workers − 1, at least 1).
    pub min_ready: usize,
}

impl PoolStatus {
    /// Workers in the `Ready` state.
    pub fn ready(&self) -> usize {
        self.workers.iter().filter(|w| w.state == WorkerState::Ready).count()
    }
}
