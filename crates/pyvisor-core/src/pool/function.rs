//! Typed function handles: [`Function`], one pool and one function name, resolved once.
//!
//! Owns [`Pool::function`] (checking the name against the workers' `hello`) and the typed call
//! through a handle, which neither looks the name up nor copies it per call. Its tower
//! `Service` and `Load` are in [`super::service`].

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::call::Known;
use super::handle::Pool;
use super::options::CallOptions;
use super::readiness::Readiness;
use crate::buffers::{Payload, Reply};
use crate::error::CallError;
use crate::shared::Resolved;

/// A typed handle on one function of a pool: `I` in, `O` out. Cheap to clone (two reference
/// counts); every clone calls the same pool.
///
/// Made by [`Pool::function`], which checks the name against the functions the workers
/// announced in their `hello` and remembers what it found (the name, shared, and the
/// function's `idempotent` flag). A call then skips the name lookup and the name copy that
/// [`Pool::call`] makes, and checks with one atomic load that the pool's function table is still
/// the one the handle resolved against. If the table changed (a handle got by path from a tree
/// now points at a restarted pool whose script exposes other functions), each call looks the
/// name up as [`Pool::call`] does, and fails with [`CallError::UnknownFunction`] if the name is
/// gone.
///
/// It is also a `tower::Service<I>` with `tower::load::Load`: see `pool::service` and
/// `docs/typed_handles_and_tower.md`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_core::{Function, Pool, PoolSpec};
/// let pool = Pool::start(PoolSpec::script("worker.py").workers(2)).await?;
/// let add: Function<(i64, i64), i64> = pool.function("add")?;
/// assert_eq!(add.call(&(1, 2)).await?, 3);
/// let again = add.clone(); // same pool, same resolved name
/// assert_eq!(again.call(&(20, 22)).await?, 42);
/// # Ok(()) }
/// ```
pub struct Function<I: ?Sized, O> {
    pub(super) target: Target,
    /// The tower service's readiness (per clone: a clone starts without a pending wait).
    pub(super) readiness: Readiness,
    _types: PhantomData<fn(&I) -> O>,
}

/// What a [`Function`] calls, without its types: the pool, the shared name, and what the
/// pool's table said of it when the handle was made.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) pool: Pool,
    name: Arc<str>,
    resolved: Option<Resolved>,
}

impl Target {
    /// Call with an encoded payload; the reply as the worker sent it.
    async fn call_reply(&self, payload: &[u8], opts: CallOptions) -> Result<Reply, CallError> {
        let known = Known { name: &self.name, resolved: self.resolved };
        self.pool.call_known(&self.name, Some(known), payload, opts).await
    }

    /// Call with an encoded payload; the encoded result (its buffers copied in).
    pub(super) async fn call_raw(&self, payload: &[u8], opts: CallOptions) -> Result<Bytes, CallError> {
        let reply = self.call_reply(payload, opts).await?;
        super::handle::in_band(&self.name, reply)
    }

    /// Call with an encoded payload and decode the result.
    pub(super) async fn call_encoded<O: DeserializeOwned>(&self, payload: Payload, opts: CallOptions) -> Result<O, CallError> {
        let reply = self.call_reply(&payload.bytes, opts.with_buffers(payload.buffers)).await?;
        super::handle::decode(&self.name, &reply)
    }
}

impl<I: ?Sized, O> Clone for Function<I, O> {
    fn clone(&self) -> Self {
        Function { target: self.target.clone(), readiness: Readiness::default(), _types: PhantomData }
    }
}

impl<I: ?Sized, O> std::fmt::Debug for Function<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("pool", &self.target.pool.name())
            .field("name", &&*self.target.name)
            .field("idempotent", &self.idempotent())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A typed handle on `function` ([`Function`]), for calls without a name lookup each.
    ///
    /// The name is checked here against the functions the workers announced in `hello`: an
    /// unknown name is [`CallError::UnknownFunction`] (with the names the workers expose). A
    /// pool from [`Pool::start`] has heard `hello` from every worker before it returns, so the
    /// check always happens here for it. Only when no worker has said `hello` yet (a pool
    /// still starting, seen through a handle got by path) does the check move to each call,
    /// exactly as for [`Pool::call`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use pyvisor_core::{CallError, Pool, PoolSpec};
    /// let pool = Pool::start(PoolSpec::script("worker.py")).await?;
    /// let predict = pool.function::<Vec<f64>, f64>("predict")?;
    /// let score = predict.call(&vec![0.5, 1.5]).await?;
    /// match pool.function::<(), ()>("no_such_function") {
    ///     Err(CallError::UnknownFunction { available, .. }) => println!("try one of {available:?}"),
    ///     _ => unreachable!(),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn function<I, O>(&self, function: &str) -> Result<Function<I, O>, CallError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        let resolved = self.resolve(function).transpose()?;
        Ok(Function {
            target: Target { pool: self.clone(), name: Arc::from(function), resolved },
            readiness: Readiness::default(),
            _types: PhantomData,
        })
    }
}

impl<I: ?Sized, O> Function<I, O> {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.target.name
    }

    /// The pool it calls.
    pub fn pool(&self) -> &Pool {
        &self.target.pool
    }

    /// The function's `@expose(idempotent=...)` flag as the workers announced it (`None`: no
    /// worker had said `hello` when the handle was made). A call may override it with
    /// [`CallOptions::idempotent`].
    pub fn idempotent(&self) -> Option<bool> {
        self.target.resolved.map(|r| r.idempotent)
    }

    /// Call with an already-encoded MessagePack payload; returns the encoded result.
    pub async fn call_raw(&self, payload: &[u8], opts: CallOptions) -> Result<Bytes, CallError> {
        self.target.call_raw(payload, opts).await
    }
}

impl<I, O> Function<I, O>
where
    I: Serialize + ?Sized,
    O: DeserializeOwned,
{
    /// Call the function with `input`, with the pool's defaults.
    pub async fn call(&self, input: &I) -> Result<O, CallError> {
        self.call_with(input, CallOptions::default()).await
    }

    /// [`Function::call`] with options.
    pub async fn call_with(&self, input: &I, opts: CallOptions) -> Result<O, CallError> {
        let payload = self.encode(input)?;
        self.target.call_encoded(payload, opts).await
    }

    /// Encode an input for this function.
    pub(super) fn encode(&self, input: &I) -> Result<Payload, CallError> {
        super::handle::encode(&self.target.pool.shared(), &self.target.name, input)
    }
}
