//! Out-of-band buffers (issue 16, docs/buffers.md). From a worker: one that announces `oob`
//! passes sealed memfds with an `fds` message; the parent checks each fd before any use (sealed
//! against writes, shrinking and growing; as long as announced; a cap per message and on
//! unclaimed fds) and kills a worker that breaks a rule, with a certificate saying which (the
//! hostile worker is tests/workers/raw_protocol.py, speaking the protocol by hand). Both ways
//! with the real adapter (tests/workers/buffers.py): `SharedBytes` inputs reach Python as
//! `bytes` or a read-only `memoryview` over the same pages, results above the threshold come
//! back out of band, nobody can change a buffer, no fd is left behind after many calls or
//! after crashes, a retry reuses the same memfd, and an in-band pool gives the same answers.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use pyvisor::{BufferPolicy, CallError, CallOptions, DeathCause, Pool, SharedBytes};
use rmpv::Value;

fn raw(mode: &str) -> pyvisor::PoolSpec {
    common::spec("raw_protocol.py").env("RAW_MODE", mode).workers(1).heartbeat_interval(Duration::from_millis(200))
}

/// The tests here count the process's memfds: one at a time (another test's buffers in flight
/// would be counted too).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The parent's open fds that are memfds named `name…`.
fn open_memfds_named(name: &str) -> usize {
    let prefix = format!("/memfd:{name}");
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| {
        d.filter_map(Result::ok).filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with(&prefix))).count()
    })
}

/// The parent's open fds that are memfds the raw workers made (named `raw-MODE`): what a leak
/// of buffers would leave.
fn open_memfds() -> usize {
    open_memfds_named("raw-")
}

/// Wait (a guard, not a timing claim) for the count to come back to `before`: a stopped
/// worker's reader closes the fds it still held as it ends, a moment after the pool stops.
async fn back_to(before: usize) -> usize {
    common::eventually(Duration::from_secs(30), || open_memfds() <= before).await;
    open_memfds()
}

fn bytes_of(value: &[u8]) -> Vec<u8> {
    match rmpv::decode::read_value(&mut &value[..]) {
        Ok(rmpv::Value::Binary(b)) => b,
        other => panic!("expected bin, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_buffers_arrive_and_no_fd_is_left_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(raw("oob_reply")).await.expect("pool starts");
    // Earlier tests' stopped workers may still be closing theirs.
    let _ = back_to(0).await;
    let payload = |n: u32| rmp_serde::to_vec(&n).expect("encodes");
    for n in [0u32, 1, 70_000, 4 << 20] {
        let reply = pool.call_raw("echo", &payload(n), CallOptions::new()).await.expect("a reply");
        let got = bytes_of(&reply);
        assert_eq!(got.len(), n as usize);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "the buffer's bytes");
    }
    let before = open_memfds();
    for _ in 0..2000 {
        let reply = pool.call_raw("echo", &payload(100), CallOptions::new()).await.expect("a reply");
        assert_eq!(bytes_of(&reply).len(), 100);
    }
    // Each buffer is closed before its reply reaches the caller: no wait needed here.
    assert_eq!(open_memfds(), before, "the parent keeps no fd of a buffer it has read");
    assert!(pool.death_certificates().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_passes_a_bad_buffer_is_killed_with_a_certificate_saying_why() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let before = open_memfds();
    for (mode, says) in [
        ("oob_unsealed", "not sealed against WRITE"),
        ("oob_short", "the message references"),
        ("oob_many", "fds in one message"),
        ("oob_unclaimed", "not claimed by an fds message"),
        ("oob_repeat", "referenced more than once"),
    ] {
        let pool = Pool::start(raw(mode)).await.expect("pool starts");
        let payload = rmp_serde::to_vec(&64u32).expect("encodes");
        let mut end = None;
        // The unclaimed fds pile up call after call until the cap.
        for _ in 0..40 {
            match pool.call_raw("echo", &payload, CallOptions::new().timeout(Duration::from_secs(30))).await {
                Ok(_) => continue,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        match end {
            Some(CallError::WorkerCrashed { certificate, .. }) => {
                assert!(matches!(certificate.cause, DeathCause::ProtocolError(_)), "{mode}: {}", certificate.cause);
                assert!(certificate.cause.to_string().contains(says), "{mode}: {}", certificate.cause);
                assert!(certificate.killed_by_pyvisor, "{mode}: killed by the parent");
            }
            other => panic!("{mode}: expected WorkerCrashed, got {other:?}"),
        }
        pool.shutdown().await;
    }
    assert_eq!(back_to(before).await, before, "every fd the hostile workers passed was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fds_message_from_a_worker_that_did_not_announce_oob_is_a_protocol_error() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // `oob_reply` without the capability: the same bytes from a worker that never said `oob`.
    let pool = Pool::start(raw("oob_reply").env("RAW_NO_OOB", "1")).await.expect("pool starts");
    match pool.call_raw("echo", &rmp_serde::to_vec(&8u32).expect("encodes"), CallOptions::new()).await {
        Err(CallError::WorkerCrashed { certificate, .. }) => {
            assert!(certificate.cause.to_string().contains("did not announce `oob`"), "{}", certificate.cause)
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    pool.shutdown().await;
}

/// Out of band from 64 KiB (the default threshold is larger: these tests are about the path).
const THRESHOLD: usize = 64 << 10;

fn buffers_pool() -> pyvisor::PoolSpec {
    common::spec("buffers.py").workers(1).buffers(BufferPolicy::default().threshold(THRESHOLD))
}

/// The parent's open memfds made by `SharedBytes` or by the adapter (both `pyvisor-buffer`).
fn open_buffers() -> usize {
    open_memfds_named("pyvisor-buffer")
}

async fn buffers_back_to(before: usize) -> usize {
    common::eventually(Duration::from_secs(30), || open_buffers() <= before).await;
    open_buffers()
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ salt).collect()
}

/// `[type, len, sha256]` (+ `readonly` for `view_digest`) as the worker reports it.
async fn summary(pool: &Pool, function: &str, input: &impl serde::Serialize) -> Vec<Value> {
    match pool.call::<_, Value>(function, input).await.expect("a reply") {
        Value::Array(v) => v,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bytes_reach_python_as_bytes_or_a_read_only_view_and_large_results_come_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(buffers_pool()).await.expect("pool starts");
    for n in [1usize, 70_000, 1 << 20, 16 << 20] {
        let data = pattern(n, 7);
        let shared = SharedBytes::from_slice(&data).expect("a memfd");
        // The same bytes in band (a plain `bin`), for the reference digest.
        let in_band = summary(&pool, "digest", &Value::Binary(data.clone())).await;
        let by_default = summary(&pool, "digest", &shared).await;
        assert_eq!(by_default, in_band, "{n} bytes: a function that did not opt in gets the same `bytes`");
        assert_eq!(by_default[0], Value::from("bytes"));
        let view = summary(&pool, "view_digest", &shared).await;
        if n >= THRESHOLD {
            assert_eq!(view[0], Value::from("memoryview"), "{n} bytes: out of band, a view over the mapping");
            assert_eq!(view[3], Value::Boolean(true), "read-only");
        } else {
            assert_eq!(view[0], Value::from("bytes"), "{n} bytes: under the threshold, in band");
        }
        assert_eq!(view[1..3], in_band[1..3]);
        // A result of the same size: every byte read, a new buffer back (out of band from the
        // threshold on), decoded as `SharedBytes` here.
        let back: SharedBytes = pool.call("mirror", &shared).await.expect("a reply");
        assert_eq!(back.len(), n);
        if n >= THRESHOLD {
            // Out of band: the worker's own sealed memfd, taken as it is (not a copy).
            let link = std::fs::read_link(format!("/proc/self/fd/{}", back.as_fd().as_raw_fd())).expect("an fd");
            assert!(link.to_string_lossy().starts_with("/memfd:pyvisor-buffer-python"), "{n} bytes: {link:?}");
        }
        assert!(back.iter().zip(&data).all(|(b, d)| *b == d.wrapping_add(1)), "{n} bytes: every byte");
        let made: Value = pool.call("make", &(n as u64)).await.expect("a reply");
        assert_eq!(made, Value::Binary(pattern(n, 0)));
    }
    // Several in one call, nested: each reaches its place.
    let (a, b) = (SharedBytes::from_slice(&pattern(100_000, 1)).unwrap(), SharedBytes::from_slice(&pattern(200_000, 2)).unwrap());
    let lens: Vec<u64> = pool.call("lengths", &(&a, vec![&b, &a])).await.expect("a reply");
    assert_eq!(lens, vec![100_000, 200_000, 100_000]);
    assert!(pool.death_certificates().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_band_pool_gives_the_same_answers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let oob = Pool::start(buffers_pool()).await.expect("pool starts");
    let in_band = Pool::start(buffers_pool().name("in_band").buffers(BufferPolicy::in_band())).await.expect("pool starts");
    let shared = SharedBytes::from_slice(&pattern(1 << 20, 3)).expect("a memfd");
    let a = summary(&oob, "view_digest", &shared).await;
    let b = summary(&in_band, "view_digest", &shared).await;
    assert_eq!(a[0], Value::from("memoryview"));
    assert_eq!(b[0], Value::from("bytes"), "in band: bytes, as without memfds");
    assert_eq!(a[1..3], b[1..3]);
    let back: SharedBytes = in_band.call("mirror", &shared).await.expect("a reply");
    assert_eq!(back.len(), 1 << 20);
    oob.shutdown().await;
    in_band.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_buffer_bounds_each_buffer_both_ways() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(buffers_pool().buffers(BufferPolicy::default().threshold(THRESHOLD).max_buffer(1 << 20))).await.expect("pool starts");
    let big = SharedBytes::from_slice(&pattern(2 << 20, 0)).expect("a memfd");
    match pool.call::<_, Value>("digest", &big).await {
        Err(CallError::BufferTooLarge { size, max, .. }) => assert_eq!((size, max), (2 << 20, 1 << 20)),
        other => panic!("expected BufferTooLarge, got {other:?}"),
    }
    // A result over it: the worker refuses to send it (an error reply), and lives on.
    match pool.call::<_, Value>("make", &(2u64 << 20)).await {
        Err(CallError::BadResult { .. }) => {}
        other => panic!("expected BadResult, got {other:?}"),
    }
    let ok: Value = pool.call("make", &(1u64 << 20)).await.expect("at the limit");
    assert_eq!(ok, Value::Binary(pattern(1 << 20, 0)));
    assert!(pool.death_certificates().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_change_a_buffer_it_received() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(buffers_pool()).await.expect("pool starts");
    let data = pattern(1 << 20, 9);
    let shared = SharedBytes::from_slice(&data).expect("a memfd");
    let out: std::collections::BTreeMap<String, Value> = pool.call("tamper", &shared).await.expect("a reply");
    assert_eq!(out["memoryview"], Value::from("refused"), "{out:?}");
    // On Python < 3.13 the mapping keeps a duplicate of the fd, which the worker reopens
    // read-write: every change is refused by the seals.
    if out["fds"].as_u64().unwrap_or(0) > 0 {
        for (attempt, errno) in [("mmap_shared_write", "EPERM"), ("write", "EPERM"), ("truncate", "EPERM"), ("grow", "EPERM")] {
            assert_eq!(out[attempt], Value::from(errno), "{attempt}: {out:?}");
        }
    }
    assert_eq!(shared.as_slice(), &data[..], "the parent's bytes are unchanged");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_is_left_behind_after_10000_calls_with_buffers_both_ways() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(buffers_pool()).await.expect("pool starts");
    let parent_before = buffers_back_to(0).await;
    let worker_before: u64 = pool.call("open_fds", &()).await.expect("a reply");
    for i in 0..10_000u32 {
        let shared = SharedBytes::from_slice(&pattern(70_000, i as u8)).expect("a memfd");
        let back: SharedBytes = pool.call("mirror", &shared).await.expect("a reply");
        assert_eq!(back.len(), 70_000);
    }
    assert_eq!(open_buffers(), parent_before, "the parent keeps no fd of a finished call");
    let worker_after: u64 = pool.call("open_fds", &()).await.expect("a reply");
    assert_eq!(worker_after, worker_before, "the worker keeps no fd of a finished call");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_mid_transfer_leave_no_fd_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pool = Pool::start(buffers_pool().workers(2)).await.expect("pool starts");
    let before = buffers_back_to(0).await;
    for round in 0..3u8 {
        // Calls in flight with buffers in hand (held, and being mirrored), then a SIGKILL.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut held = Vec::new();
        let mut mirrored = Vec::new();
        for i in 0..6u8 {
            let pool = pool.clone();
            let stop = std::sync::Arc::clone(&stop);
            let shared = SharedBytes::from_slice(&pattern(4 << 20, round ^ i)).expect("a memfd");
            if i % 2 == 0 {
                held.push(tokio::spawn(async move { pool.call::<_, Value>("hold", &(&shared, 5.0)).await.map(|_| ()) }));
            } else {
                // Mirrors until the kill (a call queued at the kill goes to the replacement).
                mirrored.push(tokio::spawn(async move {
                    let mut crashed = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        match pool.call::<_, SharedBytes>("mirror", &shared).await {
                            Ok(b) => assert_eq!(b.len(), 4 << 20),
                            Err(CallError::WorkerCrashed { .. }) => crashed += 1,
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                    crashed
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (_, pid) in pool.chaos().ready_workers() {
            common::signal(pid, libc::SIGKILL);
        }
        // A call queued at the kill runs on the replacement: only the ones in flight crash.
        let mut crashed = 0;
        for c in held {
            match c.await.expect("joined") {
                Ok(()) => {}
                Err(CallError::WorkerCrashed { .. }) => crashed += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in mirrored {
            crashed += c.await.expect("joined");
        }
        assert!(crashed >= 2, "the kill hit calls in flight (both workers had some): {crashed}");
        assert!(common::eventually(Duration::from_secs(30), || pool.chaos().ready_workers().len() == 2).await, "replaced");
    }
    assert_eq!(buffers_back_to(before).await, before, "every buffer of the crashed calls was closed");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_idempotent_call_reuses_the_same_memfd() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = std::env::temp_dir().join(format!("pyvisor-oob-retry-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let pool = Pool::start(buffers_pool().workers(2)).await.expect("pool starts");
    let shared = SharedBytes::from_slice(&pattern(1 << 20, 5)).expect("a memfd");
    let marker = dir.to_string_lossy().to_string();
    let (inode, _hash): (Option<u64>, String) = pool.call("die_once", &(&shared, &marker)).await.expect("retried after the crash");
    let first = std::fs::read_to_string(&dir).expect("the first attempt wrote its memfd's inode");
    let _ = std::fs::remove_file(&dir);
    // (The router files the certificate a moment after the call heard of the crash.)
    assert!(common::eventually(Duration::from_secs(30), || pool.death_certificates().len() == 1).await, "the first attempt crashed");
    if let Some(inode) = inode {
        assert_eq!(first, inode.to_string(), "both attempts mapped the same memfd: no second copy");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_in_flight_are_capped_per_pool_and_calls_past_the_cap_wait_in_the_queue() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let policy = BufferPolicy::default().threshold(THRESHOLD).max_bytes_in_flight(1 << 20);
    // Two workers: the second is free all along, so only the cap makes a call wait.
    let pool = Pool::start(buffers_pool().buffers(policy).workers(2)).await.expect("pool starts");
    let (a, b) = (SharedBytes::from_slice(&pattern(800 << 10, 1)).unwrap(), SharedBytes::from_slice(&pattern(800 << 10, 2)).unwrap());
    // 800 KiB held for 3 s: another 800 KiB does not fit the 1 MiB cap.
    let holder = {
        let (pool, a) = (pool.clone(), a.clone());
        tokio::spawn(async move { pool.call::<_, u64>("hold", &(&a, 3.0)).await })
    };
    assert!(common::eventually(Duration::from_secs(30), || pool.in_flight() == 1).await);
    match pool.call_with::<_, Value>("digest", &b, CallOptions::new().timeout(Duration::from_millis(300))).await {
        Err(CallError::Timeout { sent: false, .. }) => {}
        other => panic!("expected an unsent Timeout past the cap, got {other:?}"),
    }
    // A call without buffers is not held back; nor one under the threshold (in band).
    let _: u64 = pool.call("open_fds", &()).await.expect("no buffers: runs");
    let small = SharedBytes::from_slice(&pattern(1000, 3)).unwrap();
    let _ = summary(&pool, "digest", &small).await;
    // One that may wait (the queue timeout, 10 s) runs once the holder gives its room back.
    let waiter = {
        let (pool, b) = (pool.clone(), b.clone());
        tokio::spawn(async move { summary(&pool, "digest", &b).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!holder.is_finished(), "the holder holds its room for 3 s");
    assert!(!waiter.is_finished(), "waits while the holder holds its room");
    assert_eq!(pool.in_flight(), 1, "not sent meanwhile");
    assert_eq!(holder.await.expect("joined").expect("the holder's call"), 800 << 10);
    assert_eq!(waiter.await.expect("joined")[1], Value::from(800u64 << 10));
    pool.shutdown().await;
}
