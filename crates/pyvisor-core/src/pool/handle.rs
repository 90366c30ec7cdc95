//! The pool handle: [`Pool`], cheap to clone; every clone is the same pool.
//!
//! Owns starting a pool (the router actor, waiting until every worker is ready), the typed
//! call API over [`super::call::run`], status, death certificates, chaos and shutdown (also
//! when the last handle drops).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use pyvisor_protocol::FunctionInfo;
use ractor::{Actor, ActorCell, ActorRef};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::call::Known;
use super::options::CallOptions;
use super::stream::{ItemStream, StreamOptions};
use crate::death::DeathCertificate;
use crate::dispatch::Dispatcher;
use crate::error::{CallError, StartError};
use crate::router::{PoolRouter, RouterArgs, RouterMsg};
use crate::buffers::{Payload, Reply};
use crate::shared::{PoolShared, Resolved};
use crate::spec::PoolSpec;
use crate::status::PoolStatus;

struct PoolInner {
    shared: Arc<PoolShared>,
    router: ActorRef<RouterMsg>,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PoolInner {
    /// The last handle is gone: shut the pool down (gracefully, in the background).
    fn drop(&mut self) {
        if !self.shared.is_closed() {
            self.shared.close();
            let (tx, _rx) = oneshot::channel();
            let _ = self.router.cast(RouterMsg::Shutdown(tx.into()));
        }
    }
}

/// A running pool of Python workers. Cheap to clone; every clone is the same pool. The pool
/// runs until [`Pool::shutdown`] or until its last handle is dropped (which starts the same
/// shutdown in the background).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_core::{Pool, PoolSpec};
/// let pool = Pool::start(PoolSpec::script("worker.py").workers(2)).await?;
/// let sum: i64 = pool.call("add", &(1, 2)).await?;
/// assert_eq!(sum, 3);
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    cell: Arc<PoolCell>,
}

/// What a handle points at: one running pool, or — for a handle got by path from a tree — the
/// pool running at that path now, which the supervisor replaces on restart (as a registered
/// name follows a restarted process in OTP).
struct PoolCell {
    /// The pool's name (a replacement has the same spec, so the same name).
    name: Arc<str>,
    current: RwLock<Arc<PoolInner>>,
    /// The handle follows restarts (got by path).
    follows: bool,
    /// Set when the path's pool is replaced or stopped for good.
    changed: Notify,
    /// The path's pool stopped for good: no replacement will come.
    ended: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.inner().shared.name).finish_non_exhaustive()
    }
}

impl Pool {
    /// Start a pool and wait until every worker is ready. Start failures are retried with
    /// backoff; more than `max_start_failures` fail the start with the last death certificate.
    pub async fn start(spec: PoolSpec) -> Result<Pool, StartError> {
        Self::start_inner(spec, None).await
    }

    /// Like [`Pool::start`], with the pool's router linked under `supervisor`: the supervisor
    /// receives ordinary `SupervisionEvent`s for it (a failed pool arrives as `ActorFailed`
    /// with a [`crate::PoolFailure`]).
    pub async fn start_linked(spec: PoolSpec, supervisor: ActorCell) -> Result<Pool, StartError> {
        Self::start_inner(spec, Some(supervisor)).await
    }

    async fn start_inner(spec: PoolSpec, supervisor: Option<ActorCell>) -> Result<Pool, StartError> {
        let python = spec.validate()?;
        // Once per process: stop what earlier, crashed runs of this program left behind. It
        // reads every process's environment: off the async threads, and only the first start
        // waits for it (a later start must not meet an orphan holding a resource it needs).
        static REAPED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        REAPED
            .get_or_init(|| async {
                let _ = tokio::task::spawn_blocking(crate::os::markers::reap_orphans).await;
            })
            .await;
        let shared = Arc::new(PoolShared::new(spec, python));
        crate::observe::prometheus::register_pool(&shared);
        let (tx, rx) = oneshot::channel();
        let args = RouterArgs { shared: Arc::clone(&shared), startup: Some(tx) };
        let spawned = match supervisor {
            Some(sup) => Actor::spawn_linked(None, PoolRouter, args, sup).await,
            None => Actor::spawn(None, PoolRouter, args).await,
        };
        let (router, join) = spawned.map_err(|e| StartError::Actor(e.to_string()))?;
        match rx.await {
            Ok(Ok(())) => Ok(Pool::from_inner(Arc::new(PoolInner { shared, router, join: Mutex::new(Some(join)) }), false)),
            Ok(Err(e)) => {
                let _ = join.await;
                Err(e)
            }
            Err(_) => {
                let _ = join.await;
                Err(StartError::Actor("the pool router stopped while starting".into()))
            }
        }
    }

    fn from_inner(inner: Arc<PoolInner>, follows: bool) -> Pool {
        Pool {
            cell: Arc::new(PoolCell {
                name: Arc::clone(&inner.shared.name),
                current: RwLock::new(inner),
                follows,
                changed: Notify::new(),
                ended: AtomicBool::new(false),
            }),
        }
    }

    /// The pool this handle points at now.
    fn inner(&self) -> Arc<PoolInner> {
        match self.cell.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(e) => Arc::clone(&e.into_inner()),
        }
    }

    /// The pool this handle points at now, for a call: a pool whose router has stopped takes
    /// no more calls. ractor reports a killed actor `Stopped` (and the supervisor starts the
    /// replacement) a moment *before* it drops the actor's state, whose `Drop` closes the pool;
    /// without this, a call in that moment would reach a worker being killed with its router.
    fn inner_for_call(&self) -> Arc<PoolInner> {
        let inner = self.inner();
        if inner.router.get_status() == ractor::ActorStatus::Stopped && !inner.shared.is_closed() {
            inner.shared.close();
        }
        inner
    }

    /// A handle to the same pool that will follow its replacements ([`Pool::replace_with`]).
    pub(crate) fn following(&self) -> Pool {
        Pool::from_inner(self.inner(), true)
    }

    /// Point this (following) handle, and every clone of it, at `new`.
    pub(crate) fn replace_with(&self, new: &Pool) {
        let inner = new.inner();
        if let Ok(mut g) = self.cell.current.write() {
            *g = inner;
        }
        self.cell.ended.store(false, Ordering::SeqCst);
        self.cell.changed.notify_waiters();
    }

    /// No replacement will come (the path's child stopped for good).
    pub(crate) fn end(&self) {
        self.cell.ended.store(true, Ordering::SeqCst);
        self.cell.changed.notify_waiters();
    }

    /// Wait (until `until`) for the pool at this handle's path to be replaced by another than
    /// `old`; `None` when it will not be.
    async fn replacement(&self, old: &Arc<PoolInner>, until: Instant) -> Option<Arc<PoolInner>> {
        loop {
            let changed = self.cell.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = self.inner();
            if !Arc::ptr_eq(&now, old) && !now.shared.is_closed() {
                return Some(now);
            }
            if self.cell.ended.load(Ordering::SeqCst) {
                return None;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return None;
            }
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.cell.name
    }

    /// The router actor, e.g. to link or monitor it.
    pub fn actor(&self) -> ActorCell {
        self.inner().router.get_cell()
    }

    /// The functions the workers expose (from their `hello`).
    pub fn functions(&self) -> Vec<FunctionInfo> {
        self.inner().shared.functions().map(|f| f.to_vec()).unwrap_or_default()
    }

    /// Call `function` with `input`, deserializing the result as `O`.
    pub async fn call<I, O>(&self, function: &str, input: &I) -> Result<O, CallError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        self.call_with(function, input, CallOptions::default()).await
    }

    /// [`Pool::call`] with options.
    pub async fn call_with<I, O>(&self, function: &str, input: &I, opts: CallOptions) -> Result<O, CallError>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        let payload = encode(&self.inner().shared, function, input)?;
        let reply = self.call_known(function, None, &payload.bytes, opts.with_buffers(payload.buffers)).await?;
        decode(function, &reply)
    }

    /// Stream the items of the generator function `function` called with `input`, each
    /// deserialized as `O`. Lazy: the call is sent on the first poll. See [`ItemStream`] and
    /// docs/streaming.md.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::TryStreamExt;
    /// use pyvisor_core::{Pool, PoolSpec};
    /// let pool = Pool::start(PoolSpec::script("worker.py")).await?;
    /// // def count(n): yield from range(n)
    /// let items: Vec<u64> = pool.stream::<_, u64>("count", &10).try_collect().await?;
    /// assert_eq!(items, (0..10).collect::<Vec<_>>());
    /// # Ok(()) }
    /// ```
    pub fn stream<I, O>(&self, function: &str, input: &I) -> ItemStream<O>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        self.stream_with(function, input, StreamOptions::default())
    }

    /// [`Pool::stream`] with options: deadline, credit window, restart after a crash.
    pub fn stream_with<I, O>(&self, function: &str, input: &I, opts: StreamOptions) -> ItemStream<O>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        let shared = Arc::clone(&self.inner_for_call().shared);
        let (payload, opts) = match encode(&shared, function, input) {
            Ok(p) => (Ok(p.bytes), opts.with_buffers(p.buffers)),
            Err(e) => (Err(e), opts),
        };
        super::stream::start(self.clone(), shared, function, payload, opts)
    }

    /// The function table's entry for `function` (`None`: no worker has said `hello` yet).
    pub(super) fn resolve(&self, function: &str) -> Option<Result<Resolved, CallError>> {
        self.inner().shared.resolve(function)
    }

    /// The shared state of the pool this handle points at now.
    pub(super) fn shared(&self) -> Arc<PoolShared> {
        Arc::clone(&self.inner().shared)
    }

    /// The dispatcher and queue bound of the pool this handle points at now.
    pub(super) fn queue(&self) -> (Arc<Dispatcher>, usize) {
        let inner = self.inner();
        (Arc::clone(&inner.shared.dispatch), inner.shared.spec.max_queue)
    }

    /// Calls in flight: calls on the pool's routable workers now plus calls waiting in its
    /// queue. What a load balancer should compare between pools (it is the pool's
    /// `tower::load::Load`): one atomic read per routable worker and one for the queue.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use pyvisor_core::{Pool, PoolSpec};
    /// let pool = Pool::start(PoolSpec::script("worker.py").workers(2)).await?;
    /// assert_eq!(pool.in_flight(), 0);
    /// # Ok(()) }
    /// ```
    pub fn in_flight(&self) -> usize {
        let inner = self.inner();
        let dispatch = &inner.shared.dispatch;
        let running: usize = dispatch.table.snapshot().iter().map(|s| s.in_flight()).sum();
        running + dispatch.len()
    }

    /// Call with an already-encoded MessagePack payload; returns the encoded result.
    pub async fn call_raw(&self, function: &str, payload: &[u8], opts: CallOptions) -> Result<Bytes, CallError> {
        let reply = self.call_known(function, None, payload, opts).await?;
        in_band(function, reply)
    }

    /// [`Pool::call_raw`] for a name resolved beforehand by a typed handle (`known`), or not.
    pub(crate) async fn call_known(
        &self,
        function: &str,
        known: Option<Known<'_>>,
        payload: &[u8],
        opts: CallOptions,
    ) -> Result<Reply, CallError> {
        let mut inner = self.inner_for_call();
        if !self.cell.follows {
            return Self::call_on(&inner, function, known, payload, &opts, &mut 0).await;
        }
        // A handle got by path follows restarts: a call that found its pool closed and was
        // never sent waits for the replacement (up to the queue timeout and its own deadline,
        // both counted from the call), then goes there.
        let called = Instant::now();
        let mut followed: Option<CallOptions> = None;
        loop {
            let mut attempts = 0;
            let result = Self::call_on(&inner, function, known, payload, followed.as_ref().unwrap_or(&opts), &mut attempts).await;
            let closed = matches!(result, Err(CallError::ShutDown { .. } | CallError::PoolFailed { .. }));
            if !(closed && attempts == 0) {
                return result;
            }
            let spec = &inner.shared.spec;
            let deadline = opts.deadline_from(called, spec.call_timeout);
            let queue_until = called + spec.queue_timeout;
            match self.replacement(&inner, deadline.map_or(queue_until, |d| d.min(queue_until))).await {
                Some(next) => {
                    inner = next;
                    followed = deadline.map(|d| opts.clone().deadline(d));
                }
                None => return result,
            }
        }
    }

    async fn call_on(
        inner: &PoolInner,
        function: &str,
        known: Option<Known<'_>>,
        payload: &[u8],
        opts: &CallOptions,
        attempts: &mut u32,
    ) -> Result<Reply, CallError> {
        if let Some(key) = opts.key() {
            return super::keyed::call(&inner.shared, key, function, payload, opts, attempts).await;
        }
        super::traced::traced_call(&inner.shared, function, known, payload, opts, attempts, None).await
    }

    /// The last death certificates of this pool's workers (up to [`crate::KEPT_CERTIFICATES`]),
    /// oldest first.
    pub fn death_certificates(&self) -> Vec<Arc<DeathCertificate>> {
        self.inner().shared.deaths.lock().map(|d| d.iter().cloned().collect()).unwrap_or_default()
    }

    /// Fault injection for tests: kill or stop workers, arm chaos points.
    pub fn chaos(&self) -> crate::chaos::Chaos {
        crate::chaos::Chaos { shared: Arc::clone(&self.inner().shared) }
    }

    /// A snapshot of every position: worker, pid, state, in flight, served, restarts.
    pub async fn status(&self) -> PoolStatus {
        let inner = self.inner();
        match inner.router.call(RouterMsg::Status, Some(Duration::from_secs(5))).await {
            Ok(ractor::rpc::CallResult::Success(s)) => s,
            _ => PoolStatus {
                name: inner.shared.name.to_string(),
                workers: Vec::new(),
                queued: inner.shared.dispatch.len(),
                closed: true,
                retried: 0,
                poisoned: 0,
                crashes: 0,
                recycles: 0,
                min_ready: inner.shared.spec.min_ready_count(),
                last_deaths: inner.shared.last_deaths(),
            },
        }
    }

    /// Stop taking calls, let calls in flight finish (shutdown grace), then stop every worker
    /// (`shutdown` → SIGTERM → SIGKILL to its process group). Idempotent.
    pub async fn shutdown(&self) {
        let inner = self.inner();
        inner.shared.close();
        let spec = &inner.shared.spec;
        let budget = spec.shutdown_grace + spec.sigterm_wait + Duration::from_secs(10);
        let _ = inner.router.call(RouterMsg::Shutdown, Some(budget)).await;
        let join = inner.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.await;
        }
    }
}

/// Encode `input` for a call to `function` on the pool of `shared`: its [`crate::SharedBytes`]
/// become out-of-band buffers when the pool sends buffers out of band.
pub(super) fn encode<I: Serialize + ?Sized>(shared: &PoolShared, function: &str, input: &I) -> Result<Payload, CallError> {
    crate::buffers::encode(input, shared.buffer_threshold())
        .map_err(|e| CallError::Serialize { function: function.to_string(), detail: e.to_string() })
}

/// Decode the reply of a call to `function` (its out-of-band buffers taken as they are by the
/// `SharedBytes` in `O`).
pub(super) fn decode<O: DeserializeOwned>(function: &str, reply: &Reply) -> Result<O, CallError> {
    reply.decode().map_err(|detail| CallError::Deserialize { function: function.to_string(), detail })
}

/// The reply of a call to `function` as self-contained MessagePack (its buffers copied in), for
/// the raw API.
pub(super) fn in_band(function: &str, reply: Reply) -> Result<Bytes, CallError> {
    reply.into_inlined().map_err(|e| CallError::Deserialize { function: function.to_string(), detail: e.to_string() })
}


#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for a router that ractor already reports `Stopped` while its state (whose
    /// `Drop` closes the pool) is not dropped yet — the moment a killed router is in.
    struct Gone;

    impl Actor for Gone {
        type Msg = RouterMsg;
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<RouterMsg>, _: ()) -> Result<(), ractor::ActorProcessingErr> {
            Ok(())
        }
    }

    /// A call on a pool whose router has stopped is refused as shut down at once — it neither
    /// waits in the queue nor reaches a worker being killed with the router — so that a handle
    /// got by path goes on to the replacement (seen failing in CI without the check:
    /// `a_typed_handle_by_path_follows_restarts_of_its_pool` got `WorkerCrashed`).
    #[tokio::test]
    async fn a_call_on_a_pool_whose_router_stopped_is_refused_as_shut_down() {
        let (router, join) = Actor::spawn(None, Gone, ()).await.expect("spawn");
        router.stop(None);
        join.await.expect("stopped");
        assert_eq!(router.get_status(), ractor::ActorStatus::Stopped);
        // The pool itself was never closed, and it has no worker: without the check the call
        // would wait in the queue for one (up to the queue timeout).
        let spec = PoolSpec::script("never_started.py").queue_timeout(Duration::from_secs(60));
        let shared = Arc::new(PoolShared::new(spec, "python3".into()));
        let inner = Arc::new(PoolInner { shared: Arc::clone(&shared), router, join: Mutex::new(None) });
        let pool = Pool::from_inner(inner, false);
        let result = tokio::time::timeout(Duration::from_secs(10), pool.call::<_, u32>("pid", &())).await.expect("the call waited");
        assert!(matches!(result, Err(CallError::ShutDown { .. })), "{result:?}");
        assert!(shared.is_closed());
    }
}
