//! pyvisor's runtime: supervised pools of Python worker processes.
//!
//! A [`Pool`] runs `workers` Python processes (each owned by a worker actor, governed by a
//! pool router actor) and routes typed calls to them over a socketpair, without an actor hop
//! per call. Crashes become [`DeathCertificate`]s, failures typed [`CallError`]s.
//!
//! Modules, one concept each:
//! - `spec`, `backoff`, `python`: configuration values and policies;
//! - `pool` (handle and call path), `routing` (choice of worker), `queue` (bounded wait),
//!   `slot` (a worker's shared state and call table), `writer` (socket writes),
//!   `connection` (socket reads);
//! - `worker` (worker actor: one process), `router` (pool router actor: membership,
//!   replacement, intensity), `process` (spawning, stdio, process groups);
//! - `barrier`: the crash barrier's policies (start failures, retry and poison, quarantine) as
//!   pure values with an injected clock;
//! - `death`, `error`, `events`, `status`: what users see; `telemetry`: the tracing set-up.

mod backoff;
#[allow(dead_code)] // pure policy values, not yet on the call path
mod barrier;
mod call_trace;
mod chaos;
mod connection;
mod death;
mod error;
mod events;
mod function_span;
mod metrics;
mod pool;
mod process;
mod python;
mod queue;
mod router;
mod routing;
mod slot;
mod spec;
mod status;
pub mod supervisor;
pub mod telemetry;
mod tracing_ctx;
mod worker;
mod writer;

pub use backoff::{Backoff, Jitter};
pub use chaos::{Chaos, ChaosAction};
pub use death::{is_fault_signal, signal_name, CallInFlight, DeathCause, DeathCertificate, WorkerId};
pub use error::{CallError, PythonError, StartError};
pub use events::{EventHandler, PoolEvent, RecycleReason};
pub use pool::{CallOptions, Pool, KEPT_CERTIFICATES};
pub use process::{program_id, reap_orphans, run_id};
pub use python::{find_executable, Interpreter};
pub use router::PoolFailure;
pub use slot::WorkerState;
pub use spec::{PoolSpec, RecyclePolicy, Target, WORKER_MALLOC_MMAP_THRESHOLD, WORKER_MALLOC_TOP_PAD};
pub use status::{PoolStatus, WorkerStatus};

/// The wire protocol crate, re-exported.
pub use pyvisor_protocol as protocol;

/// The actor runtime pyvisor is built on, re-exported so your actors link with the same
/// version.
pub use ractor;
