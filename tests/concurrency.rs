//! Pipelining and overlap: calls that could not complete if they ran one at a time.

mod common;

use pyvisor::Pool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_calls_are_outstanding_on_one_worker_at_once() {
    // An asyncio.Barrier(8) opens only when 8 calls are in the worker together, and the pool
    // has a single worker: so max_in_flight = 8 must put 8 on it at once.
    let pool = Pool::start(common::spec("basic.py").workers(1).max_in_flight(8)).await.expect("pool starts");
    let calls = (0..8).map(|_| {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, String>("async_barrier", &(8, 20)).await })
    });
    for c in futures::future::join_all(calls).await {
        assert_eq!(c.unwrap().expect("barrier call"), "passed");
    }
    let status = pool.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].served, 8);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_the_barrier_cannot_open() {
    // The negative control: at max_in_flight = 4 the same 8-party barrier times out in Python.
    let pool = Pool::start(common::spec("basic.py").workers(1).max_in_flight(4)).await.expect("pool starts");
    let calls = (0..4).map(|_| {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, String>("async_barrier", &(5, 2)).await })
    });
    for c in futures::future::join_all(calls).await {
        assert!(matches!(c.unwrap(), Err(pyvisor::CallError::Python { .. })));
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_threaded_functions_overlap() {
    let pool = Pool::start(common::spec("basic.py").workers(1).max_in_flight(4)).await.expect("pool starts");
    let asyncs = (0..4).map(|_| {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, String>("async_barrier", &(4, 20)).await })
    });
    for c in futures::future::join_all(asyncs).await {
        assert_eq!(c.unwrap().expect("async barrier"), "passed");
    }
    let threads = (0..4).map(|_| {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, u64>("thread_barrier", &()).await })
    });
    let mut idents = Vec::new();
    for c in futures::future::join_all(threads).await {
        idents.push(c.unwrap().expect("thread barrier"));
    }
    idents.sort_unstable();
    idents.dedup();
    assert_eq!(idents.len(), 4, "four distinct threads ran the calls");
    pool.shutdown().await;
}
