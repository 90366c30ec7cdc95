//! The pool as its users see it.
//!
//! - [`handle`]: the [`Pool`] handle, cheap to clone — start, call, status, death
//!   certificates, chaos, shutdown;
//! - [`options`]: the per-call [`CallOptions`];
//! - [`function`]: the typed handle [`Function`] on one function, its name resolved once;
//! - [`readiness`]: a tower service's wait for room in the pool's queue;
//! - [`service`]: tower's `Service` (readiness from the pool's queue) and `Load` (calls in
//!   flight) for [`Function`] and [`PoolService`] (any function by name), `Load` for [`Pool`];
//! - [`call`]: the path of one call — admit, acquire a worker, attempt, apply the crash
//!   barrier — with no actor on it;
//! - [`keyed`]: the path of a call with an idempotency key — a kept outcome, the execution in
//!   flight to join, or a new execution (single flight);
//! - [`stream`]: the items of a generator function as a `futures::Stream` ([`ItemStream`],
//!   [`StreamOptions`]): credit granted back as the caller reads, cancel on drop, the crash
//!   barrier for streams;
//! - [`traced`]: one call made and observed (its span and metrics), for the handle and the
//!   keyed path.
//!
//! The router actor is asked only for status and shutdown.

pub(crate) mod call;
pub(crate) mod function;
pub(crate) mod handle;
pub(crate) mod keyed;
pub(crate) mod options;
pub(crate) mod readiness;
pub(crate) mod service;
pub(crate) mod stream;
pub(crate) mod traced;

pub use function::Function;
pub use handle::Pool;
pub use service::PoolService;
pub use options::CallOptions;
pub use stream::{ItemStream, StreamOptions, DEFAULT_STREAM_CREDIT};
