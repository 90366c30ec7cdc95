//! Streams from real Python generators (tests/workers/streams.py): items in order, end to end
//! backpressure (the parent buffers at most the credit window; the generator is not resumed
//! without credit, as its own log shows), cancellation on drop (the generator's `finally`
//! runs), a deadline over the whole stream, a SIGKILL mid-stream (the delivered count; a
//! restart only when asked), mismatched calls, and a hostile worker that sends past its credit.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use pyvisor::{CallError, DeathCause, Pool, StreamOptions};
use serde_json::json;

const GUARD: Duration = Duration::from_secs(60);

async fn pool() -> Pool {
    common::logs();
    Pool::start(common::spec("streams.py").workers(1)).await.expect("pool starts")
}

/// A fresh directory for one test's side-effect files.
fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-streaming-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Lines of a side-effect file (0 if it does not exist yet).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_items_arrive_in_order_from_sync_and_async_generators() {
    let pool = pool().await;
    for function in ["count", "count_async"] {
        let n = if function == "count" { 1_000_000u64 } else { 100_000 };
        let mut stream = pool.stream::<_, u64>(function, &n);
        let mut expected = 0u64;
        while let Some(item) = stream.next().await {
            let item = item.unwrap_or_else(|e| panic!("{function}: item {expected}: {e}"));
            assert_eq!(item, expected, "{function}: out of order");
            expected += 1;
        }
        assert_eq!(expected, n, "{function}: every item arrived");
        assert!(stream.peak_buffered() as u64 <= stream.credit_window(), "{function}: buffered {} > window", stream.peak_buffered());
        assert_eq!(stream.delivered(), n);
        // The stream ended: it stays ended.
        assert!(stream.next().await.is_none());
    }
    // The worker serves calls and other streams afterwards.
    let v: Vec<u64> = pool.stream::<_, u64>("count", &3).try_collect().await.expect("another stream");
    assert_eq!(v, vec![0, 1, 2]);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_generator_back_and_the_parent_buffers_at_most_the_window() {
    let pool = pool().await;
    let dir = scratch("backpressure");
    let log = dir.join("produced.log");
    const WINDOW: u32 = 8;
    let n = 100_000;
    let mut stream = pool.stream_with::<_, u64>("produced", &json!({"log": log, "n": n}), StreamOptions::new().credit(WINDOW));
    for read in 0..10u64 {
        let item = tokio::time::timeout(GUARD, stream.next()).await.expect("an item in time");
        assert_eq!(item.expect("an item").expect("ok"), read);
        // Let the worker run as far as its credit lets it, then look from both sides.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = lines(&log);
        assert!(stream.buffered_items() <= WINDOW as usize, "the parent buffers {} items, window {WINDOW}", stream.buffered_items());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = lines(&log);
        // Credit given back so far: at most the items read; the generator ran no further.
        let limit = WINDOW as usize + read as usize + 1;
        assert!(after <= limit, "after reading {} items the generator produced {after} (> {limit}): no backpressure", read + 1);
        assert_eq!(before, after, "the generator kept running while the reader slept: it is not paused");
    }
    assert!(stream.peak_buffered() <= WINDOW as usize, "peak {} > window {WINDOW}", stream.peak_buffered());
    assert!(lines(&log) < n as usize / 10, "the generator ran ahead: {} items", lines(&log));
    // Reading on, everything arrives.
    let rest: Vec<u64> = stream.try_collect().await.expect("the rest");
    assert_eq!(rest.len() as u64, n - 10);
    assert_eq!(rest.first(), Some(&10));
    assert_eq!(lines(&log), n as usize);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_closes_the_generator_and_its_finally_runs() {
    let pool = pool().await;
    let dir = scratch("drop");
    for (function, pause) in [("endless", 0.0), ("endless", 0.05), ("endless_async", 0.0), ("endless_async", 0.05)] {
        let done = dir.join(format!("{function}-{pause}.done"));
        let mut stream = pool.stream_with::<_, u64>(function, &json!({"done": done, "pause": pause}), StreamOptions::new().credit(4));
        for i in 0..5u64 {
            assert_eq!(stream.next().await.expect("an item").expect("ok"), i);
        }
        assert!(!done.exists(), "{function}: closed before the drop");
        drop(stream);
        assert!(
            common::eventually(GUARD, || std::fs::read_to_string(&done).is_ok_and(|t| t == "closed")).await,
            "{function} (pause {pause}): the generator's finally did not run after the drop"
        );
    }
    // The worker lives on and serves.
    let v: Vec<u64> = pool.stream::<_, u64>("count", &2).try_collect().await.expect("the worker still streams");
    assert_eq!(v, vec![0, 1]);
    let s = pool.status().await;
    assert_eq!(s.workers.iter().map(|w| w.restarts).sum::<u32>(), 0, "no worker died for a cancel");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_covers_the_whole_stream() {
    let pool = pool().await;
    let dir = scratch("deadline");
    let done = dir.join("deadline.done");
    let started = Instant::now();
    let mut stream =
        pool.stream_with::<_, u64>("endless", &json!({"done": done, "pause": 0.01}), StreamOptions::new().timeout(Duration::from_millis(700)));
    let mut items = 0;
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => items += 1,
            Some(Err(e)) => break e,
            None => panic!("an endless stream ended"),
        }
    };
    assert!(matches!(end, CallError::Timeout { sent: true, .. }), "{end:?}");
    assert!(items > 5, "items flowed before the deadline ({items})");
    assert!(started.elapsed() < GUARD);
    assert!(stream.next().await.is_none(), "nothing after the terminal error");
    assert!(common::eventually(GUARD, || done.exists()).await, "the generator was closed at the deadline");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_ends_a_stream_whose_slow_reader_never_empties_its_buffer() {
    // A fast generator and a reader that works on each item: the buffer never runs dry, and
    // the deadline must still end the stream.
    let pool = pool().await;
    let dir = scratch("slow-reader");
    let done = dir.join("slow-reader.done");
    let opts = StreamOptions::new().credit(8).timeout(Duration::from_millis(700));
    let mut stream = pool.stream_with::<_, u64>("endless", &json!({"done": done}), opts);
    let started = Instant::now();
    let end = loop {
        match tokio::time::timeout(GUARD, stream.next()).await.expect("no hang") {
            Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Some(Err(e)) => break e,
            None => panic!("an endless stream ended"),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the deadline never ended the stream");
    };
    assert!(matches!(end, CallError::Timeout { sent: true, .. }), "{end:?}");
    assert!(common::eventually(GUARD, || done.exists()).await, "the generator was closed at the deadline");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_stream_ends_it_with_the_delivered_count_and_restarts_only_when_asked() {
    let pool = Pool::start(common::spec("streams.py").workers(2)).await.expect("pool starts");
    let args = json!({"n": 1000, "pause": 0.01});
    for function in ["pids", "pids_once"] {
        let mut stream = pool.stream::<_, (u32, u64)>(function, &args);
        let mut received = 0u64;
        let mut pid = 0;
        let end = loop {
            match tokio::time::timeout(GUARD, stream.next()).await.expect("no hang") {
                Some(Ok((p, i))) => {
                    assert_eq!(i, received);
                    received += 1;
                    pid = p;
                    if received == 20 {
                        common::signal(pid, libc::SIGKILL);
                    }
                }
                Some(Err(e)) => break e,
                None => panic!("{function}: the stream ended normally after a SIGKILL"),
            }
        };
        match end {
            CallError::WorkerCrashed { delivered, certificate, .. } => {
                assert_eq!(delivered, Some(received), "{function}: the delivered count");
                assert!(received >= 20);
                assert_eq!(certificate.pid, Some(pid));
            }
            other => panic!("{function}: expected WorkerCrashed, got {other:?}"),
        }
        assert!(stream.next().await.is_none());
    }

    // Asked for, an idempotent stream restarts: told once, then from the first item again.
    let opts = StreamOptions::new().restart_on_crash(true);
    let mut stream = pool.stream_with::<_, (u32, u64)>("pids", &json!({"n": 60, "pause": 0.01}), opts.clone());
    let (mut restarts, mut items, mut killed) = (0, Vec::new(), false);
    while let Some(item) = tokio::time::timeout(GUARD, stream.next()).await.expect("no hang") {
        match item {
            Ok((p, i)) => {
                items.push(i);
                if i == 20 && !killed {
                    killed = true;
                    common::signal(p, libc::SIGKILL);
                }
            }
            Err(CallError::StreamRestarted { delivered, attempt, .. }) => {
                restarts += 1;
                assert!(delivered >= 21 && attempt == 2, "delivered {delivered}, attempt {attempt}");
                items.clear();
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(restarts, 1);
    assert_eq!(items, (0..60).collect::<Vec<_>>(), "the restarted stream ran from its first item to its end");
    // Not idempotent: asking is not enough.
    let mut stream = pool.stream_with::<_, (u32, u64)>("pids_once", &json!({"n": 1000, "pause": 0.01}), opts);
    let first = stream.next().await.expect("an item").expect("ok");
    common::signal(first.0, libc::SIGKILL);
    let end = loop {
        match tokio::time::timeout(GUARD, stream.next()).await.expect("no hang") {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("ended normally"),
        }
    };
    assert!(matches!(end, CallError::WorkerCrashed { delivered: Some(n), .. } if n >= 1), "{end:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_mismatches_and_the_stream_after_them() {
    let pool = pool().await;
    // The generator raises after its items: they stand, then the error ends the stream.
    let mut stream = pool.stream::<_, u64>("fails_after", &3);
    for i in 0..3 {
        assert_eq!(stream.next().await.expect("item").expect("ok"), i);
    }
    match stream.next().await {
        Some(Err(CallError::Python { error, .. })) => {
            assert_eq!(error.type_name, "ValueError");
            assert!(error.message.contains("after 3 items"), "{}", error.message);
        }
        other => panic!("expected the Python error, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    // A generator called, a plain function streamed: typed errors, nothing runs.
    match pool.call::<_, Vec<u64>>("count", &3).await {
        Err(CallError::StreamMismatch { stream: true, .. }) => {}
        other => panic!("expected StreamMismatch, got {other:?}"),
    }
    let mut stream = pool.stream::<_, u64>("plain", &3);
    match stream.next().await {
        Some(Err(e @ CallError::StreamMismatch { stream: false, .. })) => assert!(e.to_string().contains("Pool::call"), "{e}"),
        other => panic!("expected StreamMismatch, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    let mut stream = pool.stream::<_, u64>("nope", &3);
    assert!(matches!(stream.next().await, Some(Err(CallError::UnknownFunction { .. }))));
    // An item that is not the type asked for: that item's error; the stream goes on.
    let mut stream = pool.stream::<_, String>("count", &2);
    assert!(matches!(stream.next().await, Some(Err(CallError::Deserialize { .. }))));
    assert!(matches!(stream.next().await, Some(Err(CallError::Deserialize { .. }))));
    assert!(stream.next().await.is_none());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_breaks_the_stream_rules_is_killed_with_a_certificate() {
    for (mode, says) in [("stream_overrun", "without credit"), ("stream_skip", "was due"), ("stream_bad_count", "arrived")] {
        let spec = common::spec("raw_protocol.py").env("RAW_MODE", mode).workers(1);
        let pool = Pool::start(spec).await.expect("pool starts");
        let mut stream = pool.stream_with::<_, u64>("gen", &(), StreamOptions::new().credit(4));
        let end = loop {
            match tokio::time::timeout(GUARD, stream.next()).await.expect("no hang") {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("{mode}: the stream ended normally"),
            }
        };
        match end {
            CallError::WorkerCrashed { certificate, .. } => {
                assert!(matches!(certificate.cause, DeathCause::ProtocolError(_)), "{mode}: {}", certificate.cause);
                assert!(certificate.cause.to_string().contains(says), "{mode}: {}", certificate.cause);
            }
            other => panic!("{mode}: expected WorkerCrashed, got {other:?}"),
        }
        assert!(stream.buffered_items() <= 4, "{mode}: buffered past the window");
        pool.shutdown().await;
    }
}
