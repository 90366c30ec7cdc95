//! Session affinity with real Python workers: a key's calls see one pid while its worker
//! lives; when the worker dies each of its keys is told once (`AffinityLost`), the others never;
//! a keyed call in flight at the death is not retried elsewhere; a recycled worker's keys are
//! told `Recycled`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::join_all;
use pyvisor::{AffinityLostReason, CallError, CallOptions, Pool, RecyclePolicy};

const GUARD: Duration = Duration::from_secs(60);

fn keyed(key: &str) -> CallOptions {
    CallOptions::new().affinity(key.to_string())
}

async fn pids(pool: &Pool, keys: &[String]) -> Vec<Result<u32, CallError>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(100) {
        out.extend(join_all(chunk.iter().map(|k| pool.call_with::<_, u32>("pid", &(), keyed(k)))).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_calls_stay_on_its_worker_and_a_death_is_told_once_to_its_keys_only() {
    common::logs();
    let pool = Pool::start(common::spec("basic.py").workers(4).max_in_flight(8)).await.unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("session-{i}")).collect();
    let first: Vec<u32> = pids(&pool, &keys).await.into_iter().map(Result::unwrap).collect();
    let second: Vec<u32> = pids(&pool, &keys).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(first, second, "each key's calls see one pid");
    let mut per_pid: BTreeMap<u32, usize> = BTreeMap::new();
    for p in &first {
        *per_pid.entry(*p).or_default() += 1;
    }
    assert_eq!(per_pid.len(), 4, "keys spread over every worker: {per_pid:?}");
    assert!(per_pid.values().all(|n| *n >= 150), "evenly: {per_pid:?}");

    // SIGKILL one worker from outside.
    let victim = *per_pid.keys().next().unwrap();
    common::signal(victim, libc::SIGKILL);
    assert!(common::eventually(GUARD, || !common::alive(victim)).await);

    let mut told: HashMap<&str, usize> = HashMap::new();
    let mut now: Vec<u32> = Vec::with_capacity(keys.len());
    let third = pids(&pool, &keys).await;
    for ((key, before), got) in keys.iter().zip(&first).zip(third) {
        match got {
            Ok(p) => {
                assert_ne!(*before, victim, "{key} was on the dead worker and was not told");
                assert_eq!(p, *before, "{key} moved although its worker lives");
                now.push(p);
            }
            Err(CallError::AffinityLost { key: k, reason: AffinityLostReason::Crashed(cert) }) => {
                assert_eq!((k.as_str(), *before, cert.pid), (key.as_str(), victim, Some(victim)));
                *told.entry(key.as_str()).or_default() += 1;
                now.push(0);
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }
    assert_eq!(told.len(), per_pid[&victim], "every key of the dead worker was told");
    // Told once: from now on they are bound elsewhere and stay there.
    let fourth: Vec<u32> = pids(&pool, &keys).await.into_iter().map(|r| r.expect("no second notice")).collect();
    let fifth: Vec<u32> = pids(&pool, &keys).await.into_iter().map(|r| r.expect("no second notice")).collect();
    assert_eq!(fourth, fifth);
    for ((before, after), k) in first.iter().zip(&fourth).zip(&keys) {
        if *before == victim {
            assert_ne!(*after, victim, "{k}");
        } else {
            assert_eq!(after, before, "{k} moved");
        }
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_call_in_flight_at_the_death_fails_with_affinity_lost_and_is_not_retried() {
    common::logs();
    let pool = Pool::start(common::spec("basic.py").workers(2).max_in_flight(4)).await.unwrap();
    let owner: u32 = pool.call_with("pid", &(), keyed("doc")).await.unwrap();
    let running = {
        let pool = pool.clone();
        // Idempotent, so only affinity keeps it from being retried on the other worker.
        tokio::spawn(async move { pool.call_with::<_, f64>("sleep", &5.0, keyed("doc").idempotent(true)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::signal(owner, libc::SIGKILL);
    let got = tokio::time::timeout(GUARD, running).await.expect("the call hung").unwrap();
    match got {
        Err(CallError::AffinityLost { key, reason: AffinityLostReason::Crashed(cert) }) => {
            assert_eq!((key.as_str(), cert.pid), ("doc", Some(owner)));
        }
        other => panic!("expected AffinityLost, got {other:?}"),
    }
    // That was the key's notice: its next call runs, elsewhere, and stays there.
    let next: u32 = pool.call_with("pid", &(), keyed("doc")).await.expect("one notice only");
    assert_ne!(next, owner);
    let again: u32 = pool.call_with("pid", &(), keyed("doc")).await.unwrap();
    assert_eq!(again, next);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_workers_keys_are_told_recycled_once() {
    common::logs();
    let recycle = RecyclePolicy::default().max_requests(20).jitter(0.0);
    let pool = Pool::start(common::spec("basic.py").workers(2).recycle(recycle)).await.unwrap();
    let owner: u32 = pool.call_with("pid", &(), keyed("conn")).await.unwrap();
    let mut notices = 0;
    let mut last = owner;
    for _ in 0..200 {
        match pool.call_with::<_, u32>("pid", &(), keyed("conn")).await {
            Ok(p) => {
                if notices == 0 {
                    assert_eq!(p, owner, "moved without a notice");
                }
                last = p;
            }
            Err(CallError::AffinityLost { reason: AffinityLostReason::Recycled, .. }) => notices += 1,
            Err(e) => panic!("{e}"),
        }
        if notices == 1 && last != owner {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(notices, 1, "one notice for the recycle");
    assert_ne!(last, owner, "the key moved to another worker after its notice");
    pool.shutdown().await;
}
