//! tower integration: a [`Function`] is a `tower::Service<I>`, a [`PoolService`] (from
//! [`Pool::service`]) a `tower::Service<(name, payload)>`; they and [`Pool`] are
//! `tower::load::Load`.
//!
//! Owns what tower middleware sees of a pool: readiness and load. `poll_ready` reflects the
//! pool's bounded queue: it is `Pending` while `max_queue` calls already wait (backpressure)
//! instead of letting the call fail with [`CallError::Overloaded`], and wakes when a queued
//! call leaves the line. `Load` is the pool's calls in flight ([`Pool::in_flight`]). The call
//! itself is [`Function::call`]'s; this module adds nothing to the call path.
//!
//! Readiness is a hint, not a reservation: callers that bypass the service (or many clones of
//! it) can fill the queue between `poll_ready` and `call`, and such a call still gets
//! `Overloaded` (which [`CallError::is_retryable`]). Put a `tower::limit::ConcurrencyLimit`
//! (below `max_queue` plus the pool's capacity) in front to make that impossible.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::function::Function;
use super::handle::Pool;
use super::options::CallOptions;
use super::readiness::Readiness;
use crate::error::CallError;

/// A typed handle as a tower service: `I` in, `O` out, errors [`CallError`].
///
/// `poll_ready` waits while the pool's queue is full (see the module documentation); `call`
/// encodes the input at once and returns a boxed future that makes the call with the pool's
/// defaults (as [`Function::call`]). Compose tower middleware around it:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use std::time::Duration;
/// use pyvisor_core::{Pool, PoolSpec};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// let pool = Pool::start(PoolSpec::script("worker.py").workers(2)).await?;
/// let mut add = ServiceBuilder::new()
///     .concurrency_limit(8)
///     .timeout(Duration::from_secs(5))
///     .service(pool.function::<(i64, i64), i64>("add")?);
/// let sum = add.ready().await?.call((1, 2)).await?;
/// assert_eq!(sum, 3);
/// # Ok(()) }
/// ```
impl<I, O> tower::Service<I> for Function<I, O>
where
    I: Serialize,
    O: DeserializeOwned + Send + 'static,
{
    type Response = O;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<O, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.readiness.poll(cx, &self.target.pool).map(Ok)
    }

    fn call(&mut self, input: I) -> Self::Future {
        let payload = self.encode(&input);
        let target = self.target.clone();
        Box::pin(async move { target.call_encoded(payload?, CallOptions::default()).await })
    }
}

/// The pool's calls in flight ([`Pool::in_flight`]), for `tower::balance` and other
/// load-aware middleware.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_core::{Pool, PoolSpec};
/// use tower::load::Load;
/// let pool = Pool::start(PoolSpec::script("worker.py")).await?;
/// let echo = pool.function::<u64, u64>("echo")?;
/// assert_eq!(echo.load(), 0);
/// # Ok(()) }
/// ```
impl<I: ?Sized, O> tower::load::Load for Function<I, O> {
    type Metric = usize;

    fn load(&self) -> usize {
        self.pool().in_flight()
    }
}

/// A pool as a tower service over any of its functions: the request is the function's name and
/// its MessagePack-encoded input, the response the encoded result (as [`Pool::call_raw`] with
/// the pool's defaults). For gateways that route by name; with one function known in advance,
/// a typed [`Function`] is simpler and skips the name lookup.
///
/// Readiness and load are the same as a [`Function`]'s (see the module documentation). Cheap to
/// clone; a clone starts without a pending wait.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use pyvisor_core::{Pool, PoolSpec};
/// use tower::{Service, ServiceExt};
///
/// let pool = Pool::start(PoolSpec::script("worker.py")).await?;
/// let mut any = pool.service();
/// let input = rmp_serde::to_vec(&(1, 2))?;
/// // The request type is generic (any `AsRef<str>` name, any `AsRef<[u8]>` payload): name it
/// // for `ready`, or let `oneshot` infer it.
/// let reply = ServiceExt::<(&str, Vec<u8>)>::ready(&mut any).await?.call(("add", input)).await?;
/// let sum: i64 = rmp_serde::from_slice(&reply)?;
/// assert_eq!(sum, 3);
/// let reply = any.clone().oneshot(("add", rmp_serde::to_vec(&(2, 2))?)).await?;
/// assert_eq!(rmp_serde::from_slice::<i64>(&reply)?, 4);
/// # Ok(()) }
/// ```
pub struct PoolService {
    pool: Pool,
    readiness: Readiness,
}

impl Clone for PoolService {
    fn clone(&self) -> Self {
        PoolService { pool: self.pool.clone(), readiness: Readiness::default() }
    }
}

impl std::fmt::Debug for PoolService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolService").field("pool", &self.pool.name()).finish_non_exhaustive()
    }
}

impl PoolService {
    /// The pool it calls.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl Pool {
    /// This pool as a `tower::Service<(name, payload)>`: see [`PoolService`].
    pub fn service(&self) -> PoolService {
        PoolService { pool: self.clone(), readiness: Readiness::default() }
    }
}

impl<N, P> tower::Service<(N, P)> for PoolService
where
    N: AsRef<str> + Send + Sync + 'static,
    P: AsRef<[u8]> + Send + Sync + 'static,
{
    type Response = Bytes;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<Bytes, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.readiness.poll(cx, &self.pool).map(Ok)
    }

    fn call(&mut self, (function, payload): (N, P)) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move { pool.call_raw(function.as_ref(), payload.as_ref(), CallOptions::default()).await })
    }
}

/// The pool's calls in flight ([`Pool::in_flight`]).
impl tower::load::Load for PoolService {
    type Metric = usize;

    fn load(&self) -> usize {
        self.pool.in_flight()
    }
}

/// The pool's calls in flight ([`Pool::in_flight`]).
impl tower::load::Load for Pool {
    type Metric = usize;

    fn load(&self) -> usize {
        self.in_flight()
    }
}
