//! pyvisor's runtime: supervised pools of Python worker processes.
//!
//! A [`Pool`] runs `workers` Python processes (each owned by a worker actor, governed by a
//! pool router actor) and routes typed calls to them over a socketpair, without an actor hop
//! per call. Crashes become [`DeathCertificate`]s, failures typed [`CallError`]s.
//!
//! Modules, in layers (each imports only from the layers above it in this list):
//! - values: `spec`, `backoff`, `python`, `confine` (configuration), `clock`, `death`, `error`, `events`,
//!   `status` (what users see);
//! - `barrier`: the crash barrier's policies (start failures, retry and poison, quarantine) as
//!   pure values with an injected clock;
//! - `os`: pidfds, `/proc`, the run's markers, and a worker's process family (every signal
//!   pyvisor sends and every process it reaps);
//! - `io`: the socket with one worker (reader, writer), without knowledge of calls;
//! - `dispatch`: how a call gets a worker (slots, picking, the fair queue);
//! - `shared`: the state a pool's handles, router and workers share;
//! - `observe`: spans, metrics and the telemetry set-up;
//! - `process`: spawning and stdio;
//! - `worker`: the worker actor (one process) and its health verdicts;
//! - `router`: the pool router actor (membership, the routing table, restarts, recycling);
//! - `chaos`: fault injection (below `pool`, which hands it out);
//! - `pool`: the pool handle and the path of one call;
//! - `supervisor`: supervision trees of pools and user actors.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "pyvisor supports Linux only: it relies on PR_SET_PDEATHSIG, process groups, pidfds and /proc \
     (see the README's Platform line)"
);

mod backoff;
mod barrier;
mod buffers;
mod chaos;
mod clock;
mod confine;
mod death;
mod dispatch;
mod error;
mod events;
mod io;
#[doc(hidden)]
pub mod message;
mod observe;
mod os;
mod pool;
mod process;
mod python;
mod router;
mod shared;
mod spec;
mod status;
pub mod supervisor;
mod worker;

pub use observe::telemetry;

/// Metrics as plain values and in the Prometheus text format: the same metrics pyvisor exports
/// over OTLP (docs/observability.md), readable whether or not export is set up.
pub use observe::prometheus as metrics;

pub use backoff::{Backoff, Jitter};
pub use buffers::{memfd_available, BufferPolicy, SharedBytes, DEFAULT_BUFFER_THRESHOLD, DEFAULT_MAX_BUFFER, DEFAULT_MAX_BYTES_IN_FLIGHT};
pub use chaos::{Chaos, ChaosAction};
pub use confine::{ConfineError, Confinement, Limit, Principal, Resource};
pub use death::{is_fault_signal, signal_name, CallInFlight, DeathCause, DeathCertificate, WorkerId};
pub use error::{AffinityLostReason, CallError, PythonError, StartError};
pub use events::{EventHandler, PoolEvent, RecycleReason};
pub use pool::{CallOptions, Function, ItemStream, Pool, PoolService, StreamOptions, DEFAULT_STREAM_CREDIT};
pub use shared::{KEPT_CERTIFICATES, STATUS_CERTIFICATES};
pub use os::markers::{program_id, reap_orphans, run_id, set_child_subreaper};
pub use python::{find_executable, Interpreter};
pub use router::PoolFailure;
pub use spec::{IdempotencyPolicy, PoolSpec, RecyclePolicy, Target, MAX_DURATION, WORKER_MALLOC_MMAP_THRESHOLD, WORKER_MALLOC_TOP_PAD};
pub use status::{PoolStatus, WorkerState, WorkerStatus};

/// The wire protocol crate, re-exported.
pub use pyvisor_protocol as protocol;

/// The tower version whose `Service` and `Load` [`Function`] and [`Pool`] implement,
/// re-exported so your middleware matches it.
pub use tower;

/// The actor runtime pyvisor is built on, re-exported so your actors link with the same
/// version.
pub use ractor;
