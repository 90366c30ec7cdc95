//! Typed function handles and tower (issue 15, items 4 and 5), against real Python workers:
//! the name checked once, `poll_ready` as the queue's backpressure, `Load` as calls in flight,
//! and tower's timeout, concurrency limit, retry and balance composed around a pool.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use pyvisor::{CallError, ChaosAction, Function, Pool};
use tower::load::Load;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A guard against hangs, not a timing claim.
const GUARD: Duration = Duration::from_secs(20);

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("a temporary directory");
    d
}

/// Wait until `pool` has `n` calls in flight (on workers or queued).
async fn until_in_flight(pool: &Pool, n: usize) {
    assert!(common::eventually(GUARD, || pool.in_flight() == n).await, "in flight: {} (want {n})", pool.in_flight());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handle_is_checked_once_and_calls_like_pool_call() {
    let pool = Pool::start(common::spec("basic.py").workers(2)).await.unwrap();
    let add: Function<(i64, i64), i64> = pool.function("add").unwrap();
    assert_eq!(add.name(), "add");
    assert_eq!(add.idempotent(), Some(false));
    assert_eq!(add.call(&(1, 2)).await.unwrap(), 3);
    let clone = add.clone();
    let (a, b) = tokio::join!(add.call(&(20, 22)), clone.call(&(-1, 1)));
    assert_eq!((a.unwrap(), b.unwrap()), (42, 0));

    let echo = pool.function::<str, String>("echo").unwrap();
    assert_eq!(echo.idempotent(), Some(true));
    assert_eq!(echo.call("hi").await.unwrap(), "hi");

    // Unknown at creation, with what the workers expose.
    match pool.function::<u64, u64>("no_such_function") {
        Err(CallError::UnknownFunction { function, available }) => {
            assert_eq!(function, "no_such_function");
            assert!(available.iter().any(|f| f == "add") && available.iter().any(|f| f == "echo"), "{available:?}");
        }
        other => panic!("{other:?}"),
    }
    // Typed errors stay typed: a Python exception, and a result of the wrong type.
    let fail = pool.function::<str, ()>("fail").unwrap();
    match fail.call("boom").await {
        Err(CallError::Python { function, error }) => assert_eq!((function.as_str(), error.type_name.as_str()), ("fail", "ValueError")),
        other => panic!("{other:?}"),
    }
    let wrong = pool.function::<(i64, i64), String>("add").unwrap();
    assert!(matches!(wrong.call(&(1, 2)).await, Err(CallError::Deserialize { .. })));
    pool.shutdown().await;
    // A handle on a pool that is gone fails as the pool does.
    assert!(matches!(add.call(&(1, 2)).await, Err(CallError::ShutDown { .. })));
}

/// The acceptance test: tower's timeout and concurrency limit around a typed handle, real calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_builder_with_timeout_and_concurrency_limit_makes_real_calls() {
    let pool = Pool::start(common::spec("faults.py").workers(2)).await.unwrap();
    let svc = ServiceBuilder::new()
        .concurrency_limit(2)
        .timeout(Duration::from_secs(3))
        .service(pool.function::<f64, f64>("nap").unwrap());

    // Six calls at once, two workers: the limit keeps at most two in the pool at any moment.
    let calls: Vec<_> = (0..6).map(|i| tokio::spawn(svc.clone().oneshot(0.2 + f64::from(i) / 100.0))).collect();
    let mut most = 0;
    while !calls.iter().all(|c| c.is_finished()) {
        most = most.max(pool.in_flight());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (i, c) in calls.into_iter().enumerate() {
        assert_eq!(c.await.unwrap().unwrap(), 0.2 + i as f64 / 100.0);
    }
    assert!((1..=2).contains(&most), "calls in flight reached {most} under a concurrency limit of 2");

    // The timeout layer ends a call that runs too long (and cancel goes to the worker).
    let wait = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .service(pool.function::<f64, String>("wait_cancel").unwrap());
    let err = tokio::time::timeout(GUARD, wait.oneshot(30.0)).await.expect("the timeout layer did not fire").unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err:?}");
    // The worker saw the cancel and is free again: both workers take calls.
    until_in_flight(&pool, 0).await;
    // The pool's own errors come through the layers as `CallError`.
    let mut unknown_input = ServiceBuilder::new().timeout(Duration::from_secs(3)).service(pool.function::<&str, f64>("nap").unwrap());
    let err = unknown_input.ready().await.unwrap().call("not a number").await.unwrap_err();
    assert!(matches!(err.downcast_ref::<CallError>(), Some(CallError::Python { .. })), "{err:?}");
    pool.shutdown().await;
}

/// `poll_ready` is `Pending` while the queue is full (instead of the call failing with
/// `Overloaded`) and wakes when a queued call leaves; `Load` counts the calls in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_ready_waits_while_the_queue_is_full_and_load_counts_calls() {
    let pool = Pool::start(common::spec("faults.py").workers(1).max_in_flight(1).max_queue(1)).await.unwrap();
    let mut nap = pool.function::<f64, f64>("nap").unwrap();
    assert_eq!(nap.load(), 0);
    assert!(nap.ready().now_or_never().is_some(), "an idle pool is ready");

    // One call runs, one waits in the queue: the queue (max_queue 1) is full.
    let running = tokio::spawn({
        let nap = nap.clone();
        async move { nap.call(&1.5).await }
    });
    until_in_flight(&pool, 1).await;
    let queued = tokio::spawn({
        let nap = nap.clone();
        async move { nap.call(&0.0).await }
    });
    until_in_flight(&pool, 2).await;
    assert_eq!(nap.load(), 2);
    assert_eq!(Load::load(&pool), 2);
    // A plain call is refused now; the service waits instead.
    assert!(matches!(pool.call::<_, f64>("nap", &0.0).await, Err(CallError::Overloaded { .. })));
    assert!(nap.ready().now_or_never().is_none(), "poll_ready must be Pending while the queue is full");
    let mut other = nap.clone();
    assert!(other.ready().now_or_never().is_none(), "a clone sees the same full queue");

    // When the queued call gets the worker, the line has room: the waiting service wakes.
    let svc = tokio::time::timeout(GUARD, nap.ready()).await.expect("poll_ready never woke").unwrap();
    assert_eq!(svc.call(0.25).await.unwrap(), 0.25);
    assert_eq!(running.await.unwrap().unwrap(), 1.5);
    assert_eq!(queued.await.unwrap().unwrap(), 0.0);
    until_in_flight(&pool, 0).await;
    assert_eq!(nap.load(), 0);

    // A closed pool is ready at once, and the call says why.
    pool.shutdown().await;
    let svc = tokio::time::timeout(GUARD, other.ready()).await.expect("a closed pool must not leave poll_ready pending").unwrap();
    assert!(matches!(svc.call(0.0).await, Err(CallError::ShutDown { .. })));
}

/// A retry policy that repeats what `CallError::is_retryable` allows, up to `left` times.
#[derive(Clone)]
struct RetryWhatNeverRan {
    left: usize,
    retried: Arc<AtomicUsize>,
}

impl<Req: Clone, Res> tower::retry::Policy<Req, Res, CallError> for RetryWhatNeverRan {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, CallError>) -> Option<Self::Future> {
        match result {
            Err(e) if e.is_retryable() && self.left > 0 => {
                self.left -= 1;
                self.retried.fetch_add(1, Ordering::SeqCst);
                Some(tokio::time::sleep(Duration::from_millis(50)))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// `tower::retry` with `is_retryable`: a call refused as `Overloaded` is sent again and
/// succeeds; a non-idempotent call whose worker crashed after its side effect is not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_retry_on_is_retryable_repeats_refusals_and_never_a_crashed_call() {
    let dir = tmpdir("tower-retry");
    let log = dir.join("side_effects.log");
    let pool = Pool::start(
        common::spec("faults.py")
            .workers(1)
            .max_in_flight(1)
            // No queue: a call that finds the worker busy is refused at once (`Overloaded`).
            .max_queue(0)
            .taint_window(Duration::ZERO)
            .env("SIDE_EFFECT_LOG", log.to_str().unwrap()),
    )
    .await
    .unwrap();
    let retried = Arc::new(AtomicUsize::new(0));
    let policy = RetryWhatNeverRan { left: 200, retried: Arc::clone(&retried) };

    // Refused while the worker is busy, retried until it is free.
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call::<_, f64>("nap", &0.5).await }
    });
    until_in_flight(&pool, 1).await;
    assert!(matches!(pool.call::<_, u64>("echo", &7u64).await, Err(CallError::Overloaded { .. })));
    let echo = ServiceBuilder::new().retry(policy.clone()).service(pool.function::<u64, u64>("echo").unwrap());
    assert_eq!(tokio::time::timeout(GUARD, echo.oneshot(7)).await.expect("retries hang").unwrap(), 7);
    assert!(retried.load(Ordering::SeqCst) >= 1, "the refused call was not retried");
    assert_eq!(busy.await.unwrap().unwrap(), 0.5);

    // Killed after its side effect: `WorkerCrashed`, not retryable, not repeated.
    retried.store(0, Ordering::SeqCst);
    assert_eq!(pool.chaos().arm("after_side_effect", ChaosAction::Kill).await.unwrap(), 1);
    let record = ServiceBuilder::new().retry(policy).service(pool.function::<u64, u64>("record_points").unwrap());
    let r = tokio::time::timeout(GUARD, record.oneshot(1)).await.expect("the crashed call hangs");
    assert!(matches!(r, Err(CallError::WorkerCrashed { .. })), "{r:?}");
    assert_eq!(retried.load(Ordering::SeqCst), 0, "middleware retried a crashed non-idempotent call");
    let runs = std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| *l == "1").count();
    assert_eq!(runs, 1, "the side effect ran {runs} times");
    pool.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tower::balance` (power of two choices over `Load`) across two pools: a call goes to the
/// pool with fewer calls in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_balance_sends_a_call_to_the_less_loaded_pool() {
    let a = Pool::start(common::spec("faults.py").name("a").workers(1)).await.unwrap();
    let b = Pool::start(common::spec("faults.py").name("b").workers(1)).await.unwrap();
    let services = vec![a.function::<f64, f64>("nap").unwrap(), b.function::<f64, f64>("nap").unwrap()];
    let mut balance = tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(services));

    let first = balance.ready().await.unwrap().call(1.0);
    let first = tokio::spawn(first);
    assert!(common::eventually(GUARD, || a.in_flight() + b.in_flight() == 1).await);
    // One pool has a call in flight, the other none: the second call must go to the other.
    let second = tokio::spawn(balance.ready().await.unwrap().call(1.0));
    assert!(common::eventually(GUARD, || a.in_flight() == 1 && b.in_flight() == 1).await, "a: {}, b: {}", a.in_flight(), b.in_flight());
    assert_eq!(first.await.unwrap().unwrap(), 1.0);
    assert_eq!(second.await.unwrap().unwrap(), 1.0);
    a.shutdown().await;
    b.shutdown().await;
}

/// A typed handle on a pool got by path follows the pool's restarts, as the pool handle does:
/// the restarted pool has a new function table, and the handle's calls still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handle_by_path_follows_restarts_of_its_pool() {
    use pyvisor::supervisor::{ChildSpec, Strategy, SupervisorSpec, Tree};

    let tree = Tree::start(SupervisorSpec::new("typed", Strategy::OneForOne).child(ChildSpec::pool("p", common::spec("basic.py").workers(1))))
        .await
        .unwrap();
    let pool = tree.pool("p").unwrap();
    let pid = pool.function::<(), u32>("pid").unwrap();
    let first = pid.call(&()).await.unwrap();
    let old = pool.actor();
    old.kill();
    assert!(common::eventually(GUARD, || old.get_status() == pyvisor::ractor::ActorStatus::Stopped).await);
    let second = tokio::time::timeout(GUARD * 2, pid.call(&())).await.expect("the call hangs").expect("the handle followed the restart");
    assert_ne!(first, second, "served by the new pool's worker");
    let mut svc = pool.function::<u64, u64>("echo").unwrap();
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    tree.shutdown().await;
    assert!(pid.call(&()).await.is_err(), "a stopped tree's pool takes no calls");
}

/// `Pool::service()`: any function by name, MessagePack in and out, with the same readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_service_calls_any_function_by_name() {
    let pool = Pool::start(common::spec("basic.py").workers(1).max_in_flight(1).max_queue(1)).await.unwrap();
    let mut any = ServiceBuilder::new().concurrency_limit(4).service(pool.service());
    let input = rmp_serde::to_vec(&(40, 2)).unwrap();
    let reply = ServiceExt::<(String, Vec<u8>)>::ready(&mut any).await.unwrap().call(("add".to_string(), input)).await.unwrap();
    assert_eq!(rmp_serde::from_slice::<i64>(&reply).unwrap(), 42);
    let unknown = any.clone().oneshot(("nope", rmp_serde::to_vec(&()).unwrap())).await.unwrap_err();
    match &unknown {
        CallError::UnknownFunction { available, .. } => assert!(available.iter().any(|f| f == "add")),
        other => panic!("{other:?}"),
    }

    // Worker busy, queue full: the service is not ready until the queued call gets the worker.
    let mut raw = pool.service();
    let busy = tokio::spawn(pool.service().oneshot(("sleep", rmp_serde::to_vec(&1.0).unwrap())));
    until_in_flight(&pool, 1).await;
    let queued = tokio::spawn(pool.service().oneshot(("echo", rmp_serde::to_vec(&1u8).unwrap())));
    until_in_flight(&pool, 2).await;
    assert_eq!(raw.load(), 2);
    assert!(ServiceExt::<(&str, Vec<u8>)>::ready(&mut raw).now_or_never().is_none(), "ready while the queue is full");
    tokio::time::timeout(GUARD, ServiceExt::<(&str, Vec<u8>)>::ready(&mut raw)).await.expect("never woke").unwrap();
    busy.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    pool.shutdown().await;
}
