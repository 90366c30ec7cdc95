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
}

/// A callback receiving pool events; must be cheap and must not block.
pub type EventHandler = Arc<dyn Fn(&PoolEvent) + Send + Sync + 'static>;
