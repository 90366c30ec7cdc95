//! The pool as its users see it.
//!
//! - [`handle`]: the [`Pool`] handle, cheap to clone — start, call, status, death
//!   certificates, chaos, shutdown;
//! - [`options`]: the per-call [`CallOptions`];
//! - [`call`]: the path of one call — admit, acquire a worker, attempt, apply the crash
//!   barrier — with no actor on it;
//! - [`keyed`]: the path of a call with an idempotency key — a kept outcome, the execution in
//!   flight to join, or a new execution (single flight).
//!
//! The router actor is asked only for status and shutdown.

pub(crate) mod call;
pub(crate) mod handle;
pub(crate) mod keyed;
pub(crate) mod options;

pub use handle::Pool;
pub use options::CallOptions;
