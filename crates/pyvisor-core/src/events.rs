//! Pool lifecycle events: what happened to which worker, for logs, CLIs and tests.
//!
//! Owns the [`PoolEvent`] type and the callback type. Every event is also emitted as a
//! `tracing` event by the router; the callback is for programs that react to them.

use std::sync::Arc;
use std::time::Duration;

use crate::death::{DeathCertificate, WorkerId};

/// Something that happened in a pool's control plane.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A worker process was spawned (not yet ready).
    WorkerSpawned {
        /// The worker.
        worker: WorkerId,
        /// Its position in the pool.
        index: usize,
        /// Its pid.
        pid: u32,
    },
    /// A worker sent `hello` and takes calls.
    WorkerReady {
        /// The worker.
        worker: WorkerId,
        /// Its position.
        index: usize,
        /// Its pid.
        pid: u32,
        /// Spawn to `hello`.
        startup: Duration,
    },
    /// A worker crashed or failed to start.
    WorkerDied {
        /// How.
        certificate: Arc<DeathCertificate>,
    },
    /// A start failure: the next start of that position waits `delay`.
    RestartScheduled {
        /// Position.
        index: usize,
        /// Consecutive failures of that position.
        failures: u32,
        /// Backoff delay.
        delay: Duration,
    },
    /// The pool failed (too many start failures).
    PoolFailed {
        /// Why.
        reason: String,
    },
    /// The pool finished shutting down.
    PoolStopped,
    /// A poison request's fingerprint was quarantined.
    Quarantined {
        /// Its function.
        function: String,
        /// For how long.
        window: Duration,
    },
    /// A healthy worker was replaced (make-before-break).
    Recycled {
        /// The worker replaced.
        worker: WorkerId,
        /// Why.
        reason: RecycleReason,
    },
}

/// Why a worker was recycled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecycleReason {
    /// It reached its (jittered) age limit.
    Ttl,
    /// It served its (jittered) number of requests.
    MaxRequests,
    /// Its memory passed the soft limit.
    MemorySoftLimit {
        /// Measured bytes.
        bytes: u64,
    },
    /// Its watchdog (the process that takes the worker's group down when the worker dies)
    /// died: without it, subprocesses of user code could outlive a killed worker.
    WatchdogLost,
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecycleReason::Ttl => f.write_str("ttl"),
            RecycleReason::MaxRequests => f.write_str("max_requests"),
            RecycleReason::MemorySoftLimit { bytes } => write!(f, "memory soft limit ({} MiB)", bytes >> 20),
            RecycleReason::WatchdogLost => f.write_str("watchdog lost"),
        }
    }
}

/// A callback receiving pool events; must be cheap and must not block.
pub type EventHandler = Arc<dyn Fn(&PoolEvent) + Send + Sync + 'static>;
